//! The prefix directory: which endpoint holds which prefix blocks, as far as the router can tell.
//!
//! Every routing decision records the request's blocks on the chosen endpoint. Each endpoint's set
//! is an LRU bounded by a model of that engine's KV capacity, so the directory forgets roughly what
//! the engine forgets. Blocks are recorded last-to-first, so a prefix's first blocks are the most
//! recently used and are forgotten last, as in vLLM, which frees a finished request's blocks tail
//! first. One table maps each block hash to the bit mask of endpoints holding it (and to its nodes
//! in the endpoints' LRU lists); a bounded LRU maps sessions to the endpoint that served them last.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::hash::BlockHash;
use crate::MAX_ENDPOINTS;

/// Read access to a directory, live or published.
pub trait PrefixIndex {
    /// Bit mask of the endpoints that hold block `h` (bit `i` = endpoint `i`).
    fn holders(&self, h: BlockHash) -> u64;
    /// The endpoint that last served session `s`.
    fn session_endpoint(&self, s: u64) -> Option<usize>;
    /// How the remembered sessions spread over the endpoints, and how many requests continue one.
    fn session_stats(&self) -> Option<&SessionStats> {
        None
    }
}

/// How sessions spread over the endpoints: what `predicted_ttft` places a new session by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionStats {
    /// Conversations the directory remembers on each endpoint (the one that served each last): the
    /// sessions but those of one request whose head's requests mostly do not continue
    /// ([`SessionStats::is_one_shot`]).
    pub per_endpoint: Vec<u32>,
    /// Share of the recent requests with a session whose session the directory already knew
    /// (a moving average over about [`SessionStats::WINDOW`] requests): near 1 when sessions are
    /// long conversations, 0 when every request is its own session.
    pub continuing: f32,
    /// The same share among the requests that begin with each of the most frequent prompt heads
    /// ([`crate::prefix::head_key`]), at most [`SessionStats::HEADS`] of them: a request is judged
    /// by the requests that begin as it does. Where RAG questions over a few shared documents mix
    /// with conversations, the questions (every one its own session) share a head per document
    /// and never continue, while the conversations' heads are their own.
    pub heads: Vec<HeadStats>,
}

/// Requests with a session that began with one prompt head, and how many continued a known one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadStats {
    /// The head's key ([`crate::prefix::head_key`]).
    pub key: u64,
    /// Requests counted for the head, `inherited` included.
    pub requests: u32,
    /// Of the requests counted since the head took its slot, those that continued a known session.
    pub continuing: u32,
    /// The count of the head whose slot it took (the space-saving algorithm: at most what the head
    /// had before it was counted), not its own.
    pub inherited: u32,
}

impl HeadStats {
    /// Requests counted since the head took its slot.
    pub fn seen(&self) -> u32 {
        self.requests.saturating_sub(self.inherited)
    }

    /// Whether enough of the head's requests were counted for its share to stand for the requests
    /// that begin with it ([`SessionStats::HEAD_MIN_REQUESTS`]).
    pub fn has_own_share(&self) -> bool {
        self.seen() >= SessionStats::HEAD_MIN_REQUESTS
    }

    /// Whether the head has a share of its own and, of its requests, under `continuing_below`
    /// continued a session: questions over a shared document.
    pub fn is_one_shot(&self, continuing_below: f64) -> bool {
        self.has_own_share()
            && f64::from(self.continuing) < continuing_below * f64::from(self.seen())
    }
}

/// A remembered session: the endpoint that served it last, and whether it is a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SessionEntry {
    endpoint: u8,
    /// Whether its next requests are to be expected, so that [`SessionStats::per_endpoint`]
    /// counts it on its endpoint: it continued, or it did not begin as requests that mostly do not
    /// continue theirs ([`SessionStats::is_one_shot`]). A question over a shared document, whose
    /// head never continues, brings no more requests, so it does not count.
    conversation: bool,
}

impl SessionStats {
    /// Requests the continuing share averages over; the heads' counts halve after as many.
    pub const WINDOW: u32 = 256;
    /// Prompt heads followed: the most frequent ones (space-saving: a head seen for the first time
    /// takes the slot of the least counted one).
    pub const HEADS: usize = 32;
    /// The share of a head's requests that continue a session under which a new session that
    /// begins with it is not counted as a conversation until it continues
    /// ([`SessionStats::is_one_shot`]).
    pub const CONVERSATION_SHARE: f64 = 0.5;
    /// Requests a head must have been counted on before its share stands for the requests that
    /// begin with it (before that, the share of all requests does).
    pub const HEAD_MIN_REQUESTS: u32 = 8;

    /// The continuing share that describes a request beginning with `head`: its head's when that
    /// head has been counted on [`SessionStats::HEAD_MIN_REQUESTS`] requests, else
    /// [`SessionStats::continuing`].
    pub fn continuing_for(&self, head: Option<u64>) -> f64 {
        self.head(head)
            .filter(|h| h.has_own_share())
            .map_or(f64::from(self.continuing), |h| {
                f64::from(h.continuing) / f64::from(h.seen())
            })
    }

    /// Whether the requests that begin with `head` mostly do not continue a session, judged only
    /// where the head has a share of its own ([`HeadStats::has_own_share`]): its share of
    /// continuing requests is under [`SessionStats::CONVERSATION_SHARE`].
    pub fn is_one_shot(&self, head: Option<u64>) -> bool {
        self.head(head)
            .is_some_and(|h| h.is_one_shot(Self::CONVERSATION_SHARE))
    }

    /// The share of the recent requests (of those with a session) that begin with `head`, where
    /// the head has a share of its own ([`HeadStats::has_own_share`]); else 0. The heads' counts
    /// sum to the requests counted (the space-saving algorithm passes a slot's count on), and a
    /// head's own count leaves out what its slot inherited, so this is a lower bound.
    pub fn share_of(&self, head: Option<u64>) -> f64 {
        let total = self.counted();
        self.head(head)
            .filter(|h| h.has_own_share() && total > 0)
            .map_or(0.0, |h| f64::from(h.seen()) / total as f64)
    }

    /// At most the share of the recent requests (of those with a session) that begin with `head`:
    /// its count with what its slot inherited, over the requests counted; 0 for a head not
    /// followed (the heads followed are the most frequent, so an unfollowed head's share is under
    /// theirs).
    pub fn share_bound(&self, head: Option<u64>) -> f64 {
        let total = self.counted();
        self.head(head)
            .filter(|_| total > 0)
            .map_or(0.0, |h| f64::from(h.requests) / total as f64)
    }

    /// The share of the recent requests (of those with a session) that begin with a head whose
    /// own share of continuing requests is under `continuing_below`: questions over shared
    /// documents, where RAG and conversations mix. A lower bound, as [`SessionStats::share_of`].
    pub fn one_shot_share(&self, continuing_below: f64) -> f64 {
        let total = self.counted();
        if total == 0 {
            return 0.0;
        }
        let one_shot: u64 = self
            .heads
            .iter()
            .filter(|h| h.is_one_shot(continuing_below))
            .map(|h| u64::from(h.seen()))
            .sum();
        one_shot as f64 / total as f64
    }

    /// The followed head `head`, if it is one.
    fn head(&self, head: Option<u64>) -> Option<&HeadStats> {
        head.and_then(|k| self.heads.iter().find(|h| h.key == k))
    }

    /// The requests the heads' counts stand for (halved as they are).
    fn counted(&self) -> u64 {
        self.heads.iter().map(|h| u64::from(h.requests)).sum()
    }

    /// Counts a request that begins with `key` and did (or did not) continue a known session.
    fn count_head(&mut self, key: u64, continued: bool) {
        let i = match self.heads.iter().position(|h| h.key == key) {
            Some(i) => i,
            None if self.heads.len() < Self::HEADS => {
                self.heads.push(HeadStats {
                    key,
                    ..HeadStats::default()
                });
                self.heads.len() - 1
            }
            None => {
                let Some((i, least)) = self
                    .heads
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, h)| h.requests)
                    .map(|(i, h)| (i, h.requests))
                else {
                    return;
                };
                if let Some(h) = self.heads.get_mut(i) {
                    *h = HeadStats {
                        key,
                        requests: least,
                        continuing: 0,
                        inherited: least,
                    };
                }
                i
            }
        };
        if let Some(h) = self.heads.get_mut(i) {
            h.requests = h.requests.saturating_add(1);
            h.continuing += u32::from(continued);
        }
    }

    /// Halves every head's counts, so that they follow the recent requests.
    fn age_heads(&mut self) {
        for h in &mut self.heads {
            h.requests /= 2;
            h.continuing /= 2;
            h.inherited /= 2;
        }
    }
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
///
/// One table maps each block hash to its holders' mask and to the first of its nodes, one per
/// endpoint holding it, chained through `sibling`. The nodes live in one slab and form each
/// endpoint's LRU list through `u32` links. Recording a new block on a full endpoint is then two
/// lookups in one table (the new block, the evicted one) on a few contiguous arrays, where separate
/// LRU maps and an index took four lookups in three maps and a heap node per entry.
#[derive(Debug)]
pub struct Directory {
    blocks: HashMap<BlockHash, Holders, Prehashed>,
    nodes: Vec<Node>,
    /// Head of the list of free slots in `nodes` (linked through `next`).
    free: u32,
    lists: Vec<List>,
    sessions: LruCache<u64, SessionEntry, Prehashed>,
    /// Conversations per endpoint in `sessions`, and the continuing share.
    session_stats: SessionStats,
    /// Requests with a session the continuing share has seen, up to its window (until then it is
    /// their plain mean).
    session_requests: u32,
    /// Requests with a session counted since the heads' counts last halved.
    head_requests: u32,
    /// Blocks that cover a prompt's head ([`crate::prefix::BlockSpec::head_blocks`]).
    head_blocks: usize,
    journal: Journal,
    /// Blocks of a request before they grow coarser, and how many fine blocks a coarser one
    /// weighs against an endpoint's capacity ([`crate::prefix::BlockSpec`]).
    coarse_after: usize,
    coarse_factor: u32,
}

/// No node.
const NIL: u32 = u32::MAX;

/// A block's entry in the table.
#[derive(Debug, Clone, Copy)]
struct Holders {
    /// Bit `i` = endpoint `i` holds the block.
    mask: u64,
    /// The first of the block's nodes (one per holder).
    first: u32,
}

/// One block held by one endpoint.
#[derive(Debug, Clone, Copy)]
struct Node {
    hash: BlockHash,
    /// Towards the endpoint's most recently used node.
    prev: u32,
    /// Towards its least recently used node (or the next free slot).
    next: u32,
    /// The same block's node on another endpoint.
    sibling: u32,
    endpoint: u8,
    /// Fine blocks this block weighs (1, or the coarse factor).
    weight: u16,
}

/// One endpoint's LRU list.
#[derive(Debug, Clone, Copy)]
struct List {
    /// Most recently used.
    head: u32,
    /// Least recently used: the next to go.
    tail: u32,
    len: u32,
    /// Fine blocks the list's blocks weigh together (its length when every block is fine).
    weight: u64,
    /// Capacity, in fine blocks.
    cap: u32,
}

impl List {
    fn new(cap: u32) -> Self {
        Self {
            head: NIL,
            tail: NIL,
            len: 0,
            weight: 0,
            cap: cap.max(1),
        }
    }
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
            blocks: HashMap::default(),
            nodes: Vec::new(),
            free: NIL,
            lists: capacities
                .iter()
                .take(MAX_ENDPOINTS)
                .map(|c| List::new(*c))
                .collect(),
            sessions: LruCache::with_hasher(nz(session_capacity), Prehashed::default()),
            session_stats: SessionStats {
                per_endpoint: vec![0; capacities.len().min(MAX_ENDPOINTS)],
                continuing: 0.0,
                heads: Vec::new(),
            },
            session_requests: 0,
            head_requests: 0,
            head_blocks: crate::prefix::BlockSpec::default().head_blocks(),
            journal: Journal::default(),
            coarse_after: usize::MAX,
            coarse_factor: 1,
        }
    }

    /// [`Directory::new`], weighing blocks as `spec` cuts them ([`Directory::set_block_spec`]).
    pub fn with_spec(
        capacities: &[u32],
        session_capacity: u32,
        spec: &crate::prefix::BlockSpec,
    ) -> Self {
        let mut d = Self::new(capacities, session_capacity);
        d.set_block_spec(spec);
        d
    }

    /// Weighs a request's blocks as `spec` cuts them: those past `coarse_after` count
    /// `coarse_factor` fine blocks each against the endpoint's capacity (the default weighs every
    /// block as one).
    pub fn set_block_spec(&mut self, spec: &crate::prefix::BlockSpec) {
        self.head_blocks = spec.head_blocks();
        self.coarse_after = spec.coarse_after;
        self.coarse_factor = u32::try_from(spec.coarse_factor.clamp(1, 256)).unwrap_or(1);
    }

    fn weight_of(&self, i: usize) -> u16 {
        if i < self.coarse_after {
            1
        } else {
            u16::try_from(self.coarse_factor).unwrap_or(1)
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
        self.lists.len()
    }

    fn node(&self, i: u32) -> Option<&Node> {
        self.nodes.get(i as usize)
    }

    fn node_mut(&mut self, i: u32) -> Option<&mut Node> {
        self.nodes.get_mut(i as usize)
    }

    /// `endpoint`'s node of a block whose first node is `first`.
    fn find(&self, first: u32, endpoint: u8) -> u32 {
        let mut i = first;
        while let Some(n) = self.node(i) {
            if n.endpoint == endpoint {
                return i;
            }
            i = n.sibling;
        }
        NIL
    }

    /// Takes node `i` out of its endpoint's list.
    fn unlink(&mut self, e: usize, i: u32) {
        let Some(&Node {
            prev, next, weight, ..
        }) = self.node(i)
        else {
            return;
        };
        match self.node_mut(prev) {
            Some(p) => p.next = next,
            None => {
                if let Some(l) = self.lists.get_mut(e) {
                    l.head = next;
                }
            }
        }
        match self.node_mut(next) {
            Some(n) => n.prev = prev,
            None => {
                if let Some(l) = self.lists.get_mut(e) {
                    l.tail = prev;
                }
            }
        }
        if let Some(l) = self.lists.get_mut(e) {
            l.len -= 1;
            l.weight = l.weight.saturating_sub(u64::from(weight));
        }
    }

    /// Puts node `i` at the head (most recent end) of its endpoint's list.
    fn push_front(&mut self, e: usize, i: u32) {
        let weight = self.node(i).map_or(1, |n| u64::from(n.weight));
        let Some(l) = self.lists.get_mut(e) else {
            return;
        };
        let old = l.head;
        l.head = i;
        if old == NIL {
            l.tail = i;
        }
        l.len += 1;
        l.weight += weight;
        if let Some(n) = self.node_mut(i) {
            n.prev = NIL;
            n.next = old;
        }
        if let Some(o) = self.node_mut(old) {
            o.prev = i;
        }
    }

    /// Removes `endpoint`'s least recently used block: out of its list, out of the block's
    /// holders (the block's entry goes with its last holder), and its slot to the free list.
    /// Returns the block.
    fn evict_tail(&mut self, e: usize) -> Option<BlockHash> {
        let i = self.lists.get(e)?.tail;
        let h = self.node(i)?.hash;
        self.unlink(e, i);
        self.forget_node(h, i, e);
        Some(h)
    }

    /// Takes node `i` (block `h` on endpoint `e`, already out of its list) out of the block's
    /// holders and frees its slot.
    fn forget_node(&mut self, h: BlockHash, i: u32, e: usize) {
        let sibling = self.node(i).map_or(NIL, |n| n.sibling);
        if let Some(entry) = self.blocks.get_mut(&h) {
            entry.mask &= !(1u64 << e);
            if entry.mask == 0 {
                self.blocks.remove(&h);
            } else if entry.first == i {
                entry.first = sibling;
            } else {
                let mut j = entry.first;
                while let Some(n) = self.nodes.get_mut(j as usize) {
                    if n.sibling == i {
                        n.sibling = sibling;
                        break;
                    }
                    j = n.sibling;
                }
            }
        }
        let free = self.free;
        if let Some(n) = self.node_mut(i) {
            n.next = free;
            n.sibling = NIL;
        }
        self.free = i;
    }

    /// A slot for a new node: a free one, or a new one at the slab's end (None past `u32` slots,
    /// which no configuration reaches: at most 64 endpoints of at most 2^20 blocks each).
    fn alloc(&mut self, node: Node) -> Option<u32> {
        if let Some(slot) = self.nodes.get_mut(self.free as usize) {
            let i = self.free;
            self.free = slot.next;
            *slot = node;
            return Some(i);
        }
        let i = u32::try_from(self.nodes.len()).ok().filter(|i| *i != NIL)?;
        self.nodes.push(node);
        Some(i)
    }

    /// Records that `endpoint` now holds `blocks` (and serves `session`).
    ///
    /// Returns whether what the directory holds changed (a block new to the endpoint, an eviction,
    /// a session that moved): a decision that only refreshes recency changes nothing a published
    /// snapshot shows, so it need not be republished.
    pub fn record(&mut self, endpoint: usize, blocks: &[BlockHash], session: Option<u64>) -> bool {
        let Some(cap) = self.lists.get(endpoint).map(|l| l.cap) else {
            return false;
        };
        let e8 = endpoint as u8;
        let bit = 1u64 << endpoint;
        let mut changed = false;
        let journal = self.journal.cap > 0;
        for (k, h) in blocks.iter().enumerate().rev() {
            let weight = self.weight_of(k);
            let held = self.blocks.get(h).filter(|x| x.mask & bit != 0).copied();
            if let Some(entry) = held {
                // Already held: only its recency changes.
                let i = self.find(entry.first, e8);
                if i != NIL && self.lists.get(endpoint).is_some_and(|l| l.head != i) {
                    self.unlink(endpoint, i);
                    self.push_front(endpoint, i);
                }
                continue;
            }
            while self
                .lists
                .get(endpoint)
                .is_some_and(|l| l.len > 0 && l.weight + u64::from(weight) > u64::from(cap))
            {
                match self.evict_tail(endpoint) {
                    Some(evicted) if journal => self.journal.block(evicted),
                    Some(_) => {}
                    None => break,
                }
            }
            let sibling = self.blocks.get(h).map_or(NIL, |x| x.first);
            let node = Node {
                hash: *h,
                prev: NIL,
                next: NIL,
                sibling,
                endpoint: e8,
                weight,
            };
            let Some(i) = self.alloc(node) else {
                break;
            };
            let entry = self.blocks.entry(*h).or_insert(Holders {
                mask: 0,
                first: NIL,
            });
            entry.mask |= bit;
            entry.first = i;
            self.push_front(endpoint, i);
            changed = true;
            if journal {
                self.journal.block(*h);
            }
        }
        if let Some(s) = session {
            let known = self.sessions.contains(&s);
            let head = crate::prefix::head_key(blocks, self.head_blocks);
            // A new session is a conversation unless the requests that begin as it does mostly
            // do not continue theirs (questions over a shared document); then once it continues.
            let conversation = known || !self.session_stats.is_one_shot(head);
            let now = SessionEntry {
                endpoint: e8,
                conversation,
            };
            let pushed = self.sessions.push(s, now);
            self.count_session(pushed.map(|(_, e)| e), now, known);
            if let Some(head) = head {
                self.session_stats.count_head(head, known);
                self.head_requests += 1;
                if self.head_requests >= 2 * SessionStats::WINDOW {
                    self.session_stats.age_heads();
                    self.head_requests = 0;
                }
            }
            match pushed {
                Some((k, e)) if k == s => {
                    if e.endpoint != e8 {
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

    /// Moves a conversation's count from the endpoint it left (or was forgotten from) to the one
    /// that now serves it, and folds whether the session was known into the continuing share.
    /// Only conversations count ([`SessionEntry::conversation`]).
    fn count_session(&mut self, left: Option<SessionEntry>, now: SessionEntry, known: bool) {
        let st = &mut self.session_stats;
        let counted = |e: SessionEntry| e.conversation.then_some(usize::from(e.endpoint));
        if let Some(c) = left
            .and_then(counted)
            .and_then(|e| st.per_endpoint.get_mut(e))
        {
            *c = c.saturating_sub(1);
        }
        if let Some(c) = counted(now).and_then(|e| st.per_endpoint.get_mut(e)) {
            *c += 1;
        }
        self.session_requests = (self.session_requests + 1).min(SessionStats::WINDOW);
        let x = if known { 1.0 } else { 0.0 };
        st.continuing += (x - st.continuing) / self.session_requests as f32;
    }

    /// Changes one endpoint's capacity, forgetting its least recently used blocks if it shrinks.
    pub fn set_capacity(&mut self, endpoint: usize, blocks: u32) {
        let Some(list) = self.lists.get_mut(endpoint) else {
            return;
        };
        list.cap = blocks.max(1);
        let cap = list.cap;
        self.journal.overflow = true;
        while self
            .lists
            .get(endpoint)
            .is_some_and(|l| l.weight > u64::from(cap))
        {
            if self.evict_tail(endpoint).is_none() {
                break;
            }
        }
    }

    /// Forgets everything one endpoint holds (its engine restarted or reset its cache).
    pub fn clear_endpoint(&mut self, endpoint: usize) {
        if endpoint >= self.lists.len() {
            return;
        }
        self.journal.overflow = true;
        while self.evict_tail(endpoint).is_some() {}
    }

    /// Forgets everything: every endpoint's blocks and every session (the engines' caches were
    /// reset, or an operator asked for it).
    pub fn clear(&mut self) {
        self.journal.overflow = true;
        for l in &mut self.lists {
            *l = List::new(l.cap);
        }
        self.nodes.clear();
        self.free = NIL;
        self.blocks.clear();
        self.sessions.clear();
        self.session_stats
            .per_endpoint
            .iter_mut()
            .for_each(|c| *c = 0);
        self.session_stats.continuing = 0.0;
        self.session_stats.heads.clear();
        self.session_requests = 0;
        self.head_requests = 0;
    }

    /// Blocks held by one endpoint.
    pub fn endpoint_len(&self, endpoint: usize) -> usize {
        self.lists.get(endpoint).map_or(0, |l| l.len as usize)
    }

    /// Fine blocks one endpoint's blocks weigh (its length when every block is fine).
    pub fn endpoint_weight(&self, endpoint: usize) -> u64 {
        self.lists.get(endpoint).map_or(0, |l| l.weight)
    }

    /// Capacity of one endpoint, in blocks.
    pub fn endpoint_capacity(&self, endpoint: usize) -> usize {
        self.lists.get(endpoint).map_or(0, |l| l.cap as usize)
    }

    /// Distinct block hashes held by any endpoint.
    pub fn distinct_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Sessions remembered.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// (hash, holders mask) pairs in ascending hash order.
    pub fn entries(&self) -> Vec<(BlockHash, u64)> {
        let mut v: Vec<(BlockHash, u64)> = self.blocks.iter().map(|(h, x)| (*h, x.mask)).collect();
        sort_by_hash(&mut v, |(h, _)| h.0);
        v
    }

    /// (session, endpoint) pairs in no particular order.
    pub fn session_entries(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.sessions
            .iter()
            .map(|(s, e)| (*s, usize::from(e.endpoint)))
    }
}

impl PrefixIndex for Directory {
    fn holders(&self, h: BlockHash) -> u64 {
        self.blocks.get(&h).map_or(0, |x| x.mask)
    }
    fn session_endpoint(&self, s: u64) -> Option<usize> {
        self.sessions.peek(&s).map(|e| usize::from(e.endpoint))
    }
    fn session_stats(&self) -> Option<&SessionStats> {
        Some(&self.session_stats)
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
    fn coarse_blocks_weigh_their_factor_against_capacity() {
        let mut d = Directory::new(&[40, 40], 8);
        d.set_block_spec(&crate::prefix::BlockSpec {
            block_chars: 64,
            max_blocks: 20,
            coarse_after: 4,
            coarse_factor: 8,
        });
        // 4 fine blocks and 2 coarse ones: 4 + 16 = 20 of 40.
        d.record(0, &hs(&[1, 2, 3, 4, 5, 6]), None);
        assert_eq!((d.endpoint_len(0), d.endpoint_weight(0)), (6, 20));
        // Another such prompt fills it; a third evicts the first one's blocks, oldest first.
        d.record(0, &hs(&[11, 12, 13, 14, 15, 16]), None);
        assert_eq!(d.endpoint_weight(0), 40);
        d.record(0, &hs(&[21, 22, 23, 24, 25, 26]), None);
        assert!(d.endpoint_weight(0) <= 40);
        assert_eq!(d.holders(BlockHash(6)), 0);
        assert_ne!(d.holders(BlockHash(26)), 0);
        // Shrinking forgets by weight too.
        d.set_capacity(0, 10);
        assert!(d.endpoint_weight(0) <= 10);
    }

    #[test]
    fn conversations_are_counted_where_they_are_and_continuing_ones_measured() {
        let mut d = Directory::new(&[10, 10, 10], 2);
        let stats = |d: &Directory| d.session_stats().cloned().unwrap();
        d.record(0, &hs(&[1]), Some(1));
        d.record(0, &hs(&[2]), Some(2));
        assert_eq!(stats(&d).per_endpoint, vec![2, 0, 0]);
        assert_eq!(stats(&d).continuing, 0.0);
        // Session 1 continues on endpoint 1: it moves, and a third of the requests so far
        // continued a session.
        d.record(1, &hs(&[1, 3]), Some(1));
        assert_eq!(stats(&d).per_endpoint, vec![1, 1, 0]);
        assert!((stats(&d).continuing - 1.0 / 3.0).abs() < 1e-6);
        // A third session evicts the least recent one (session 2, on endpoint 0).
        d.record(2, &hs(&[4]), Some(3));
        assert_eq!(stats(&d).per_endpoint, vec![0, 1, 1]);
        // Requests without a session count for neither.
        d.record(2, &hs(&[5]), None);
        assert_eq!(stats(&d).per_endpoint, vec![0, 1, 1]);
        assert!((stats(&d).continuing - 0.25).abs() < 1e-6);
        d.clear();
        assert_eq!(
            stats(&d),
            SessionStats {
                per_endpoint: vec![0; 3],
                continuing: 0.0,
                heads: Vec::new(),
            }
        );
        // Questions over one document (head 50), each its own session on endpoint 2: counted
        // until the head has a share of its own and it shows that its requests do not continue;
        // then a question counts once it continues.
        let mut d = Directory::new(&[100, 100, 100], 100);
        for q in 0..12u64 {
            d.record(2, &hs(&[49, 50, 1_000 + q]), Some(q));
        }
        let n = SessionStats::HEAD_MIN_REQUESTS;
        assert_eq!(stats(&d).per_endpoint, vec![0, 0, n]);
        assert!(stats(&d).is_one_shot(Some(50)));
        d.record(1, &hs(&[49, 50, 1_011, 7]), Some(11));
        assert_eq!(stats(&d).per_endpoint, vec![0, 1, n]);
        // A conversation's head that is not followed, or has no share of its own, is not one-shot.
        assert!(!stats(&d).is_one_shot(Some(4_242)));
        assert!(!stats(&d).is_one_shot(None));
    }

    #[test]
    fn a_request_is_judged_by_the_requests_that_begin_as_it_does() {
        // Prompts of two blocks and more: the head is the second block (two cover 100 characters
        // of 64). Questions over one document (head 50) are each their own session; conversations
        // (a head each) continue over four requests.
        let mut d = Directory::new(&[1_000, 1_000], 10_000);
        let stats = |d: &Directory| d.session_stats().cloned().unwrap();
        let mut session = 0u64;
        for c in 0..40u64 {
            session += 1;
            d.record(0, &hs(&[49, 50, 1_000 + c]), Some(session));
            let conversation = 100 + c;
            session += 1;
            for turn in 0..4 {
                d.record(1, &hs(&[99, conversation, 5_000 + turn]), Some(session));
            }
        }
        let s = stats(&d);
        // Over all: 120 of 200 requests continued a session.
        assert!((s.continuing - 0.6).abs() < 0.05, "{}", s.continuing);
        // The document's questions never did, whatever the share of all requests.
        assert_eq!(s.continuing_for(Some(50)), 0.0);
        // A head counted on fewer than eight requests, or never seen, or none: the share of all.
        assert_eq!(s.continuing_for(Some(139)), f64::from(s.continuing));
        assert_eq!(s.continuing_for(Some(7)), f64::from(s.continuing));
        assert_eq!(s.continuing_for(None), f64::from(s.continuing));
        // The document's head began 40 of the 200 requests; a head without a share of its own
        // has none.
        assert!(
            (s.share_of(Some(50)) - 0.2).abs() < 1e-9,
            "{}",
            s.share_of(Some(50))
        );
        assert_eq!(s.share_of(Some(139)), 0.0);
        assert_eq!(s.share_of(Some(7)), 0.0);
        assert_eq!(s.share_of(None), 0.0);
        // The bound counts a head followed however few requests it has (139 began 4 of 200, and
        // its slot passed on the count of a head it replaced), and no head that is not followed.
        assert!((s.share_bound(Some(50)) - 0.2).abs() < 1e-9);
        let b = s.share_bound(Some(139));
        assert!((0.02..0.2).contains(&b), "{b}");
        assert_eq!(s.share_bound(Some(7)), 0.0);
        assert_eq!(s.share_bound(None), 0.0);
        // The document's questions are the requests of a head that does not continue: a fifth.
        assert!((s.one_shot_share(0.5) - 0.2).abs() < 1e-9);
        // A long conversation's own head, once counted enough, is its own share.
        session += 1;
        for turn in 0..12 {
            d.record(1, &hs(&[99, 777, 9_000 + turn]), Some(session));
        }
        let s = stats(&d);
        assert!((s.continuing_for(Some(777)) - 11.0 / 12.0).abs() < 1e-9);
        // Requests without a session are not counted.
        d.record(0, &hs(&[49, 50]), None);
        assert_eq!(stats(&d).heads, s.heads);
        d.clear();
        assert!(stats(&d).heads.is_empty());
    }

    #[test]
    fn frequent_heads_stay_followed_among_many_single_ones() {
        // One request in four begins with the shared head 1; the others with a head of their own.
        let mut d = Directory::new(&[100], 100);
        for i in 0..4_000u64 {
            let head = if i % 4 == 0 { 1 } else { 10_000 + i };
            d.record(0, &hs(&[head]), Some(i));
            let heads = &d.session_stats().unwrap().heads;
            assert!(heads.len() <= SessionStats::HEADS);
        }
        let s = d.session_stats().cloned().unwrap();
        let shared = s.heads.iter().find(|h| h.key == 1).copied().unwrap();
        // Counted since it came in, at most one window's worth (the counts halve), and followed.
        assert!(
            shared.seen() >= SessionStats::HEAD_MIN_REQUESTS,
            "{shared:?}"
        );
        assert!(shared.requests <= 2 * SessionStats::WINDOW);
        assert_eq!(s.continuing_for(Some(1)), 0.0);
        // One request in four (within what halving the counts rounds off).
        let share = s.share_of(Some(1));
        assert!((0.2..=0.3).contains(&share), "{share}");
        // The bound adds what the head's slot inherited: at least its own share, and no head
        // followed has more requests than the shared one.
        assert!(s.share_bound(Some(1)) >= share);
        assert!(s
            .heads
            .iter()
            .all(|h| s.share_bound(Some(h.key)) <= s.share_bound(Some(1))));
        // Only the shared head has a share of its own, and it never continues.
        assert_eq!(s.one_shot_share(0.5), share);
        assert_eq!(s.one_shot_share(0.0), 0.0);
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

        /// The directory answers as a plain model of per-endpoint LRU lists does (most recent
        /// first; a request's blocks recorded last to first; the least recent forgotten at
        /// capacity), through any mix of records, shrinks, grows and clears.
        #[test]
        fn equals_a_model_of_lru_lists(
            caps in prop::collection::vec(1u32..12, 1..5),
            ops in prop::collection::vec(
                (0usize..8, 0usize..5, prop::collection::vec(0u64..40, 0..16), 1u32..14),
                0..120,
            ),
        ) {
            let mut d = Directory::new(&caps, 4);
            let mut caps = caps;
            let mut model: Vec<Vec<u64>> = vec![Vec::new(); caps.len()];
            for (op, e, blocks, cap) in ops {
                let e = e % caps.len();
                match op {
                    0 => {
                        d.set_capacity(e, cap);
                        caps[e] = cap;
                        model[e].truncate(cap as usize);
                    }
                    1 => {
                        d.clear_endpoint(e);
                        model[e].clear();
                    }
                    _ => {
                        d.record(e, &hs(&blocks), None);
                        for b in blocks.iter().rev() {
                            model[e].retain(|x| x != b);
                            model[e].insert(0, *b);
                            model[e].truncate(caps[e] as usize);
                        }
                    }
                }
                for k in 0u64..40 {
                    let expected = model
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.contains(&k))
                        .fold(0u64, |m, (i, _)| m | 1 << i);
                    prop_assert_eq!(d.holders(BlockHash(k)), expected, "block {}", k);
                }
                for (i, l) in model.iter().enumerate() {
                    prop_assert_eq!(d.endpoint_len(i), l.len());
                    prop_assert_eq!(d.endpoint_capacity(i), caps[i] as usize);
                }
                let distinct: std::collections::HashSet<u64> =
                    model.iter().flatten().copied().collect();
                prop_assert_eq!(d.distinct_blocks(), distinct.len());
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
                // The per-endpoint counts are a recount of the remembered conversations.
                let mut recount = vec![0u32; caps.len()];
                for (_, e) in d.sessions.iter().filter(|(_, e)| e.conversation) {
                    recount[usize::from(e.endpoint)] += 1;
                }
                prop_assert_eq!(&d.session_stats().unwrap().per_endpoint, &recount);
                let total_bits: usize = d.entries().iter().map(|(_, m)| m.count_ones() as usize).sum();
                let total_len: usize = (0..caps.len()).map(|i| d.endpoint_len(i)).sum();
                prop_assert_eq!(total_bits, total_len);
                prop_assert!(d.entries().iter().all(|(_, m)| *m != 0));
            }
        }
    }
}
