//! The prefix directory: which endpoint holds which prefix blocks, as far as the router can tell.
//!
//! Every routing decision records the request's blocks on the chosen endpoint. Each endpoint's set
//! is an LRU bounded by a model of that engine's KV capacity, so the directory forgets roughly what
//! the engine forgets. Blocks are recorded last-to-first, so a prefix's first blocks are the most
//! recently used and are forgotten last, as in vLLM, which frees a finished request's blocks tail
//! first. An index maps each block hash to the bit mask of endpoints holding it; a bounded LRU maps
//! sessions to the endpoint that served them last.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;

use crate::hash::BlockHash;
use crate::MAX_ENDPOINTS;

/// Read access to a directory, live or published.
pub trait PrefixIndex {
    /// Bit mask of the endpoints that hold block `h` (bit `i` = endpoint `i`).
    fn holders(&self, h: BlockHash) -> u64;
    /// The endpoint that last served session `s`.
    fn session_endpoint(&self, s: u64) -> Option<usize>;
}

/// For each of `n` endpoints, how many leading blocks of `blocks` it holds (a run from the start,
/// as an engine's prefix cache hit is). Stops reading the index as soon as no endpoint matches.
pub fn match_lengths(index: &dyn PrefixIndex, blocks: &[BlockHash], n: usize) -> Vec<u32> {
    let n = n.min(MAX_ENDPOINTS);
    let mut lens = vec![0u32; n];
    let all = if n == MAX_ENDPOINTS {
        u64::MAX
    } else {
        (1u64 << n) - 1
    };
    let mut alive = all;
    let mut depth = 0u32;
    for h in blocks {
        if alive == 0 {
            break;
        }
        let still = alive & index.holders(*h);
        let mut dropped = alive & !still;
        while dropped != 0 {
            let e = dropped.trailing_zeros() as usize;
            if let Some(l) = lens.get_mut(e) {
                *l = depth;
            }
            dropped &= dropped - 1;
        }
        alive = still;
        depth += 1;
    }
    while alive != 0 {
        let e = alive.trailing_zeros() as usize;
        if let Some(l) = lens.get_mut(e) {
            *l = depth;
        }
        alive &= alive - 1;
    }
    lens
}

/// Hasher for keys that are already uniformly distributed 64-bit hashes (block hashes, session
/// keys): hashing them again would only cost time.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Prehashed = BuildHasherDefault<PrehashedHasher>;

/// The block index: block hash to the bit mask of the endpoints holding it.
#[derive(Debug, Default)]
struct Index(HashMap<BlockHash, u64, Prehashed>);

impl Index {
    fn get(&self, h: &BlockHash) -> Option<u64> {
        self.0.get(h).copied()
    }
    fn set_bit(&mut self, h: BlockHash, bit: u64) {
        *self.0.entry(h).or_insert(0) |= bit;
    }
    fn unset(&mut self, h: BlockHash, bit: u64) {
        if let Some(v) = self.0.get_mut(&h) {
            *v &= !bit;
            if *v == 0 {
                self.0.remove(&h);
            }
        }
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
    fn sorted(&self) -> Vec<(BlockHash, u64)> {
        let mut v: Vec<(BlockHash, u64)> = self.0.iter().map(|(h, m)| (*h, *m)).collect();
        sort_by_hash(&mut v, |(h, _)| h.0);
        v
    }
}

/// Sorts `items` by a 64-bit `key` in ascending order, in linear time when the keys are uniform
/// (block hashes, session keys): a counting sort on the keys' top bits into about one bucket per
/// item, then each bucket (a few items) sorted on its own. Any keys come out in order; only clustered
/// ones cost more. A snapshot of the directory for publishing ([`Directory::entries`], and its
/// sessions) is sorted this way.
pub fn sort_by_hash<T: Copy>(items: &mut Vec<T>, key: impl Fn(&T) -> u64) {
    let n = items.len();
    if n < 64 || n > u32::MAX as usize {
        items.sort_unstable_by_key(&key);
        return;
    }
    // About one bucket per item; u32 counts keep the table small (32 KB at 8,192 items).
    let bits = (usize::BITS - 1 - n.leading_zeros()).min(24);
    let bucket = |t: &T| (key(t) >> (64 - bits)) as usize;
    // ends[b] = one past bucket b's last slot once the counts are summed.
    let mut ends = vec![0u32; 1usize << bits];
    for t in items.iter() {
        if let Some(c) = ends.get_mut(bucket(t)) {
            *c += 1;
        }
    }
    let mut sum = 0;
    for c in &mut ends {
        sum += *c;
        *c = sum;
    }
    // Filled from each bucket's end down, so `ends` ends up holding each bucket's start.
    let mut out = items.clone();
    for t in items.iter().rev() {
        if let Some(pos) = ends.get_mut(bucket(t)) {
            *pos -= 1;
            if let Some(slot) = out.get_mut(*pos as usize) {
                *slot = *t;
            }
        }
    }
    let mut from = 0usize;
    for end in ends
        .iter()
        .skip(1)
        .map(|e| *e as usize)
        .chain(std::iter::once(n))
    {
        if end - from > 1 {
            if let Some(run) = out.get_mut(from..end) {
                sort_run(run, &key);
            }
        }
        from = end;
    }
    *items = out;
}

/// Sorts one bucket: by insertion when short (most hold one to three items, where a call of the
/// library sort costs more than the sorting), else by the library sort (clustered keys).
fn sort_run<T: Copy>(run: &mut [T], key: &impl Fn(&T) -> u64) {
    if run.len() > 16 {
        run.sort_unstable_by_key(key);
        return;
    }
    for i in 1..run.len() {
        let mut j = i;
        while j > 0 {
            match (run.get(j - 1), run.get(j)) {
                (Some(a), Some(b)) if key(a) > key(b) => {
                    run.swap(j - 1, j);
                    j -= 1;
                }
                _ => break,
            }
        }
    }
}

/// The authoritative, bounded directory (owned by the singleton, or by the simulator).
#[derive(Debug)]
pub struct Directory {
    lrus: Vec<LruCache<BlockHash, (), Prehashed>>,
    index: Index,
    sessions: LruCache<u64, u8, Prehashed>,
    journal: Journal,
}

/// The blocks and sessions whose entries changed since the journal was last reset, so a publisher
/// can send just those (with their current values) on top of its last full snapshot. Bounded: past
/// its capacity, or after a change it does not track one by one, it only says that it overflowed.
#[derive(Debug, Default)]
struct Journal {
    cap: usize,
    blocks: Vec<BlockHash>,
    sessions: Vec<u64>,
    overflow: bool,
}

impl Journal {
    fn block(&mut self, h: BlockHash) {
        if self.blocks.len() + self.sessions.len() < self.cap {
            self.blocks.push(h);
        } else {
            self.overflow = true;
        }
    }
    fn session(&mut self, s: u64) {
        if self.blocks.len() + self.sessions.len() < self.cap {
            self.sessions.push(s);
        } else {
            self.overflow = true;
        }
    }
}

/// What changed in a directory since its journal was reset (see [`Directory::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Blocks whose holders changed, sorted, once each.
    pub blocks: Vec<BlockHash>,
    /// Sessions whose endpoint changed or that were forgotten, sorted, once each.
    pub sessions: Vec<u64>,
}

fn nz(n: u32) -> NonZeroUsize {
    NonZeroUsize::new(n as usize).unwrap_or(NonZeroUsize::MIN)
}

impl Directory {
    /// A directory for endpoints with these capacities (blocks each; at most [`MAX_ENDPOINTS`]).
    pub fn new(capacities: &[u32], session_capacity: u32) -> Self {
        Self {
            lrus: capacities
                .iter()
                .take(MAX_ENDPOINTS)
                .map(|c| LruCache::with_hasher(nz(*c), Prehashed::default()))
                .collect(),
            index: Index::default(),
            sessions: LruCache::with_hasher(nz(session_capacity), Prehashed::default()),
            journal: Journal::default(),
        }
    }

    /// Keeps a journal of up to `cap` changed entries from now on (0: none, the default).
    pub fn set_journal_capacity(&mut self, cap: usize) {
        self.journal.cap = cap;
        self.reset_journal();
    }

    /// Starts the journal afresh (after a full snapshot was taken).
    pub fn reset_journal(&mut self) {
        self.journal.blocks.clear();
        self.journal.sessions.clear();
        self.journal.overflow = false;
    }

    /// The entries that changed since the journal was reset, or None if the journal overflowed
    /// (or is off) and only a full snapshot can say what changed.
    pub fn changes(&self) -> Option<Changes> {
        if self.journal.overflow || self.journal.cap == 0 {
            return None;
        }
        let mut blocks = self.journal.blocks.clone();
        blocks.sort_unstable();
        blocks.dedup();
        let mut sessions = self.journal.sessions.clone();
        sessions.sort_unstable();
        sessions.dedup();
        Some(Changes { blocks, sessions })
    }

    /// [`Directory::changes`], and the journal starts afresh (an overflow stays until
    /// [`Directory::reset_journal`]): what changed since the last take.
    pub fn take_changes(&mut self) -> Option<Changes> {
        let c = self.changes();
        self.journal.blocks.clear();
        self.journal.sessions.clear();
        c
    }

    /// Number of endpoints.
    pub fn endpoints(&self) -> usize {
        self.lrus.len()
    }

    /// Records that `endpoint` now holds `blocks` (and serves `session`).
    ///
    /// Returns whether what the directory holds changed (a block new to the endpoint, an eviction,
    /// a session that moved): a decision that only refreshes recency changes nothing a published
    /// snapshot shows, so it need not be republished.
    pub fn record(&mut self, endpoint: usize, blocks: &[BlockHash], session: Option<u64>) -> bool {
        let Some(lru) = self.lrus.get_mut(endpoint) else {
            return false;
        };
        let bit = 1u64 << endpoint;
        let mut changed = false;
        let journal = self.journal.cap > 0;
        for h in blocks.iter().rev() {
            match lru.push(*h, ()) {
                // Already held: only its recency changed, and the index already has its bit.
                Some((k, ())) if k == *h => continue,
                Some((evicted, ())) => {
                    self.index.unset(evicted, bit);
                    if journal {
                        self.journal.block(evicted);
                    }
                }
                None => {}
            }
            changed = true;
            self.index.set_bit(*h, bit);
            if journal {
                self.journal.block(*h);
            }
        }
        if let Some(s) = session {
            match self.sessions.push(s, endpoint as u8) {
                Some((k, e)) if k == s => {
                    if e != endpoint as u8 {
                        changed = true;
                        if journal {
                            self.journal.session(s);
                        }
                    }
                }
                evicted => {
                    changed = true;
                    if journal {
                        self.journal.session(s);
                        if let Some((k, _)) = evicted {
                            self.journal.session(k);
                        }
                    }
                }
            }
        }
        changed
    }

    /// Changes one endpoint's capacity, forgetting its least recently used blocks if it shrinks.
    pub fn set_capacity(&mut self, endpoint: usize, blocks: u32) {
        let Some(lru) = self.lrus.get_mut(endpoint) else {
            return;
        };
        let bit = 1u64 << endpoint;
        self.journal.overflow = true;
        while lru.len() > blocks as usize {
            if let Some((h, ())) = lru.pop_lru() {
                self.index.unset(h, bit);
            }
        }
        lru.resize(nz(blocks));
    }

    /// Forgets everything one endpoint holds (its engine restarted or reset its cache).
    pub fn clear_endpoint(&mut self, endpoint: usize) {
        let Some(lru) = self.lrus.get_mut(endpoint) else {
            return;
        };
        let bit = 1u64 << endpoint;
        self.journal.overflow = true;
        while let Some((h, ())) = lru.pop_lru() {
            self.index.unset(h, bit);
        }
    }

    /// Forgets everything: every endpoint's blocks and every session (the engines' caches were
    /// reset, or an operator asked for it).
    pub fn clear(&mut self) {
        self.journal.overflow = true;
        for lru in &mut self.lrus {
            lru.clear();
        }
        self.index.clear();
        self.sessions.clear();
    }

    /// Blocks held by one endpoint.
    pub fn endpoint_len(&self, endpoint: usize) -> usize {
        self.lrus.get(endpoint).map_or(0, LruCache::len)
    }

    /// Capacity of one endpoint, in blocks.
    pub fn endpoint_capacity(&self, endpoint: usize) -> usize {
        self.lrus.get(endpoint).map_or(0, |l| l.cap().get())
    }

    /// Distinct block hashes held by any endpoint.
    pub fn distinct_blocks(&self) -> usize {
        self.index.len()
    }

    /// Sessions remembered.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// (hash, holders mask) pairs in ascending hash order.
    pub fn entries(&self) -> Vec<(BlockHash, u64)> {
        self.index.sorted()
    }

    /// (session, endpoint) pairs in no particular order.
    pub fn session_entries(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.sessions.iter().map(|(s, e)| (*s, usize::from(*e)))
    }
}

impl PrefixIndex for Directory {
    fn holders(&self, h: BlockHash) -> u64 {
        self.index.get(&h).unwrap_or(0)
    }
    fn session_endpoint(&self, s: u64) -> Option<usize> {
        self.sessions.peek(&s).map(|e| usize::from(*e))
    }
}

/// An empty index (no state published yet, or publishing switched off).
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyIndex;

impl PrefixIndex for EmptyIndex {
    fn holders(&self, _: BlockHash) -> u64 {
        0
    }
    fn session_endpoint(&self, _: u64) -> Option<usize> {
        None
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hs(v: &[u64]) -> Vec<BlockHash> {
        v.iter().map(|x| BlockHash(*x)).collect()
    }

    #[test]
    fn longest_prefix_per_endpoint() {
        let mut d = Directory::new(&[100, 100, 100], 10);
        d.record(0, &hs(&[1, 2, 3]), None);
        d.record(1, &hs(&[1, 2, 9]), Some(7));
        assert_eq!(match_lengths(&d, &hs(&[1, 2, 3, 4]), 3), vec![3, 2, 0]);
        assert_eq!(match_lengths(&d, &hs(&[5, 1, 2]), 3), vec![0, 0, 0]);
        assert_eq!(match_lengths(&d, &[], 3), vec![0, 0, 0]);
        assert_eq!(d.session_endpoint(7), Some(1));
    }

    #[test]
    fn eviction_forgets_tail_first() {
        let mut d = Directory::new(&[3], 10);
        d.record(0, &hs(&[1, 2, 3]), None);
        d.record(0, &hs(&[10]), None);
        // Block 3 (the tail of the first prefix) went first; 1 and 2 still match.
        assert_eq!(match_lengths(&d, &hs(&[1, 2, 3]), 1), vec![2]);
        assert_eq!(d.holders(BlockHash(3)), 0);
    }

    #[test]
    fn shrink_and_clear() {
        let mut d = Directory::new(&[10, 10], 10);
        d.record(0, &hs(&[1, 2, 3, 4]), None);
        d.record(1, &hs(&[1, 2]), None);
        d.set_capacity(0, 2);
        assert_eq!(d.endpoint_len(0), 2);
        assert_eq!(d.endpoint_capacity(0), 2);
        d.clear_endpoint(1);
        assert_eq!(d.endpoint_len(1), 0);
        assert_eq!(d.holders(BlockHash(1)), 1);
        assert_eq!(d.distinct_blocks(), 2);
        d.record(1, &hs(&[7]), Some(3));
        d.clear();
        assert_eq!(
            (d.distinct_blocks(), d.endpoint_len(0), d.sessions()),
            (0, 0, 0)
        );
        assert_eq!(d.session_endpoint(3), None);
    }

    proptest! {
        /// `sort_by_hash` sorts any keys as a comparison sort does: uniform ones (the counting
        /// path), clustered ones (one bucket holds most), duplicates, and short inputs.
        #[test]
        fn sort_by_hash_equals_a_comparison_sort(
            uniform in prop::collection::vec(any::<u64>(), 0..3000),
            clustered in prop::collection::vec(0u64..500, 0..3000),
            high in prop::collection::vec(u64::MAX - 300..=u64::MAX, 0..300),
        ) {
            for keys in [uniform, clustered.clone(), high, [clustered.clone(), clustered].concat()] {
                let mut items: Vec<(u64, usize)> = keys.iter().copied().zip(0..).collect();
                let mut expected = items.clone();
                expected.sort_unstable();
                sort_by_hash(&mut items, |(k, _)| *k);
                prop_assert!(items.windows(2).all(|w| w[0].0 <= w[1].0));
                items.sort_unstable();
                prop_assert_eq!(items, expected);
            }
        }

        /// A directory's entries come out in ascending hash order, each once, at any size.
        #[test]
        fn entries_are_ascending(
            keys in prop::collection::vec(any::<u64>(), 0..5000),
        ) {
            let mut d = Directory::new(&[4096, 4096], 4);
            for (i, chunk) in keys.chunks(100).enumerate() {
                d.record(i % 2, &hs(chunk), None);
            }
            let e = d.entries();
            prop_assert_eq!(e.len(), d.distinct_blocks());
            prop_assert!(e.windows(2).all(|w| w[0].0 < w[1].0));
        }

        /// `record` says it changed the directory exactly when the published view (blocks with
        /// their holders, sessions with their endpoint) changed.
        #[test]
        fn record_reports_exactly_the_visible_changes(
            ops in prop::collection::vec(
                (0usize..3, prop::collection::vec(0u64..12, 0..6), prop::option::of(0u64..4)),
                0..60,
            ),
        ) {
            let mut d = Directory::new(&[5, 6, 7], 3);
            let view = |d: &Directory| {
                let mut sessions: Vec<(u64, usize)> = d.session_entries().collect();
                sessions.sort_unstable();
                (d.entries(), sessions)
            };
            for (e, blocks, session) in &ops {
                let before = view(&d);
                let changed = d.record(*e, &hs(blocks), *session);
                let after = view(&d);
                prop_assert_eq!(changed, before != after);
            }
        }

        /// No endpoint ever holds more blocks than its capacity, the index holds exactly the union
        /// of the endpoint sets, and the sessions stay within their bound.
        #[test]
        fn stays_within_bounds(
            caps in prop::collection::vec(1u32..20, 1..6),
            ops in prop::collection::vec((0usize..6, prop::collection::vec(0u64..60, 0..30), prop::option::of(0u64..50)), 0..80),
            session_cap in 1u32..8,
        ) {
            let mut d = Directory::new(&caps, session_cap);
            for (e, blocks, s) in ops {
                d.record(e % caps.len(), &hs(&blocks), s);
                for (i, c) in caps.iter().enumerate() {
                    prop_assert!(d.endpoint_len(i) <= *c as usize);
                }
                prop_assert!(d.sessions() <= session_cap as usize);
                let total_bits: usize = d.entries().iter().map(|(_, m)| m.count_ones() as usize).sum();
                let total_len: usize = (0..caps.len()).map(|i| d.endpoint_len(i)).sum();
                prop_assert_eq!(total_bits, total_len);
                prop_assert!(d.entries().iter().all(|(_, m)| *m != 0));
            }
        }
    }
}
