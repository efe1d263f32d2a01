//! vLLM's KV block pool with automatic prefix caching (V1 `BlockPool` / `FreeKVCacheBlockQueue`).
//!
//! - Blocks hold `block_size` tokens. A full block gets a hash chained to its parent's, over its
//!   token ids, and is entered in the cache map.
//! - Reference counts: a block in use by any request has `ref_cnt > 0` and is never evicted.
//! - Free blocks (`ref_cnt == 0`) sit in an LRU queue and keep their hash, so a later request can
//!   still hit them; allocation takes the queue's head and, if that block is cached, evicts it
//!   (drops its hash) first.
//! - Requests free their blocks tail first, so a prefix's last blocks are evicted before its first.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::residency::{BlockEviction, Residency};

/// Index of a block.
pub type BlockId = u32;

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    ref_cnt: u32,
    hash: Option<u64>,
    prev: u32,
    next: u32,
    in_queue: bool,
}

/// Hash of a full block, chained to its parent (vLLM's `hash_block_tokens`).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes, parent)
}

/// Root of a request's hash chain (vLLM's `NONE_HASH`; per model).
pub fn chain_root(model: &str) -> u64 {
    xxh3_64_with_seed(model.as_bytes(), 0x6b76_726f_7574_6531)
}

/// Chained hashes of every full block of `tokens`.
pub fn block_hashes(root: u64, tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = root;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|c| {
            parent = block_hash(parent, c);
            parent
        })
        .collect()
}

/// Hasher for block hashes, which are already uniform 64-bit values: hashing them again would
/// only cost time (the map is looked up for every block of every scheduled prompt).
#[derive(Debug, Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The pool.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<u64, BlockId, BuildHasherDefault<IdentityHasher>>,
    caching: bool,
    /// Cached blocks evicted so far.
    pub evictions: u64,
    /// Hashes of the cached blocks evicted since the last [`BlockPool::take_evicted`], when
    /// recorded ([`BlockPool::record_evictions`]: for vLLM's KV cache events).
    evicted: Option<Vec<u64>>,
    /// The residency of a sample of blocks, when followed ([`BlockPool::track_residency`]).
    residency: Option<Residency>,
    /// The engine's time, for residency ([`BlockPool::set_clock`]).
    clock: f64,
}

impl BlockPool {
    /// `n` blocks, all free, none cached.
    pub fn new(n: u32, enable_caching: bool) -> Self {
        let mut p = Self {
            blocks: Vec::with_capacity(n as usize),
            head: NONE,
            tail: NONE,
            num_free: 0,
            cached: HashMap::default(),
            caching: enable_caching,
            evictions: 0,
            evicted: None,
            residency: None,
            clock: 0.0,
        };
        for i in 0..n {
            p.blocks.push(Block {
                ref_cnt: 0,
                hash: None,
                prev: NONE,
                next: NONE,
                in_queue: false,
            });
            p.push_tail(i);
        }
        p
    }

    /// Records the hash of every cached block evicted from now on, for [`BlockPool::take_evicted`].
    pub fn record_evictions(&mut self) {
        self.evicted.get_or_insert_with(Vec::new);
    }

    /// Follows the residency of a `sample` share of block allocations from now on, as vLLM's
    /// `--kv-cache-metrics` ([`crate::residency`]); an error for a share outside (0, 1].
    pub fn track_residency(&mut self, sample: f64) -> Result<(), String> {
        self.residency = Some(Residency::new(sample)?);
        Ok(())
    }

    /// The time of the allocations and hits that follow (the engine's step start), seconds.
    pub fn set_clock(&mut self, now: f64) {
        self.clock = now;
    }

    /// The sampled blocks evicted since the last call (empty unless followed).
    pub fn take_residency(&mut self) -> Vec<BlockEviction> {
        self.residency
            .as_mut()
            .map(Residency::take)
            .unwrap_or_default()
    }

    /// The hashes of the cached blocks evicted since the last call, in eviction order (empty unless
    /// recorded).
    pub fn take_evicted(&mut self) -> Vec<u64> {
        self.evicted
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Total blocks.
    pub fn capacity(&self) -> usize {
        self.blocks.len()
    }

    /// Free blocks (cached or not).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks in use, as vLLM's `kv_cache_usage_perc` reports them (0..=1).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            0.0
        } else {
            1.0 - self.num_free as f64 / self.blocks.len() as f64
        }
    }

    /// Blocks with a hash in the cache map.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    fn push_tail(&mut self, id: BlockId) {
        let tail = self.tail;
        if let Some(b) = self.blocks.get_mut(id as usize) {
            b.prev = tail;
            b.next = NONE;
            b.in_queue = true;
        }
        match self.blocks.get_mut(tail as usize) {
            Some(t) => t.next = id,
            None => self.head = id,
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let Some(b) = self.blocks.get(id as usize) else {
            return;
        };
        if !b.in_queue {
            return;
        }
        let (prev, next) = (b.prev, b.next);
        match self.blocks.get_mut(prev as usize) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.blocks.get_mut(next as usize) {
            Some(n) => n.prev = prev,
            None => self.tail = prev,
        }
        if let Some(b) = self.blocks.get_mut(id as usize) {
            b.in_queue = false;
            b.prev = NONE;
            b.next = NONE;
        }
        self.num_free -= 1;
    }

    /// The cached blocks of the longest prefix of `hashes` (at most `max_blocks`).
    pub fn longest_cached(&self, hashes: &[u64], max_blocks: usize) -> Vec<BlockId> {
        if !self.caching {
            return Vec::new();
        }
        hashes
            .iter()
            .take(max_blocks)
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// Free blocks among `ids` (they would leave the free queue if touched).
    pub fn free_among(&self, ids: &[BlockId]) -> usize {
        ids.iter()
            .filter(|id| {
                self.blocks
                    .get(**id as usize)
                    .is_some_and(|b| b.ref_cnt == 0)
            })
            .count()
    }

    /// Takes a reference on cached blocks a request reuses.
    pub fn touch(&mut self, ids: &[BlockId]) {
        for id in ids {
            if self
                .blocks
                .get(*id as usize)
                .is_some_and(|b| b.ref_cnt == 0)
            {
                self.unlink(*id);
            }
            if let Some(b) = self.blocks.get_mut(*id as usize) {
                b.ref_cnt += 1;
            }
            if let Some(r) = self.residency.as_mut() {
                r.accessed(*id, self.clock);
            }
        }
    }

    /// Allocates `n` new blocks from the head of the free queue, evicting cached ones; None (and
    /// nothing taken) if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.head;
            self.unlink(id);
            if let Some(h) = self.blocks.get_mut(id as usize).and_then(|b| b.hash.take()) {
                if self.cached.get(&h) == Some(&id) {
                    self.cached.remove(&h);
                }
                self.evictions += 1;
                if let Some(e) = self.evicted.as_mut() {
                    e.push(h);
                }
            }
            if let Some(b) = self.blocks.get_mut(id as usize) {
                b.ref_cnt = 1;
            }
            if let Some(r) = self.residency.as_mut() {
                r.reallocated(id, self.clock);
            }
            out.push(id);
        }
        Some(out)
    }

    /// Releases a request's blocks, given in the order to free them (the request's tail first).
    pub fn free(&mut self, ids_in_order: impl IntoIterator<Item = BlockId>) {
        for id in ids_in_order {
            let Some(b) = self.blocks.get_mut(id as usize) else {
                continue;
            };
            b.ref_cnt = b.ref_cnt.saturating_sub(1);
            if b.ref_cnt == 0 {
                self.push_tail(id);
            }
        }
    }

    /// Marks a full block as holding the content with this hash; whether it newly does (a block
    /// already hashed keeps its hash).
    pub fn cache(&mut self, id: BlockId, hash: u64) -> bool {
        if !self.caching {
            return false;
        }
        let Some(b) = self.blocks.get_mut(id as usize) else {
            return false;
        };
        if b.hash.is_some() {
            return false;
        }
        b.hash = Some(hash);
        self.cached.entry(hash).or_insert(id);
        true
    }

    /// Every block's hash, for the blocks that have one (several blocks may hold one content).
    pub fn block_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.iter().filter_map(|b| b.hash)
    }

    /// Drops every hash, if no block is in use (vLLM refuses to reset while blocks are in use).
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_free != self.blocks.len() {
            return false;
        }
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
        if let Some(r) = self.residency.as_mut() {
            r.reset();
        }
        true
    }

    /// Reference count of a block (tests, invariants).
    pub fn ref_cnt(&self, id: BlockId) -> u32 {
        self.blocks.get(id as usize).map_or(0, |b| b.ref_cnt)
    }

    /// Whether `hash` is cached.
    pub fn is_cached(&self, hash: u64) -> bool {
        self.cached.contains_key(&hash)
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

    #[test]
    fn lru_eviction_order_and_tail_first_free() {
        let mut p = BlockPool::new(4, true);
        let a = p.allocate(2).unwrap();
        p.cache(a[0], 10);
        p.cache(a[1], 11);
        // Free tail first: a[1] goes to the queue before a[0].
        p.free(a.iter().rev().copied());
        let b = p.allocate(2).unwrap();
        // The two never-used blocks come first (they were ahead in the queue).
        assert!(p.is_cached(10) && p.is_cached(11));
        p.free(b.iter().rev().copied());
        let c = p.allocate(1).unwrap();
        // Now the head is the tail block of the first request: 11 is evicted before 10.
        assert_eq!(c[0], a[1]);
        assert!(!p.is_cached(11) && p.is_cached(10));
        assert_eq!(p.evictions, 1);
    }

    #[test]
    fn blocks_in_use_are_never_evicted() {
        let mut p = BlockPool::new(3, true);
        let a = p.allocate(1).unwrap();
        p.cache(a[0], 7);
        assert_eq!(p.allocate(3), None, "only 2 free");
        let b = p.allocate(2).unwrap();
        assert!(!b.contains(&a[0]));
        assert!(p.is_cached(7));
        assert_eq!(p.num_free(), 0);
    }

    #[test]
    fn touch_takes_cached_free_blocks_out_of_the_queue() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate(1).unwrap();
        p.cache(a[0], 5);
        p.free(a.clone());
        assert_eq!(p.num_free(), 2);
        let hit = p.longest_cached(&[5, 6], 10);
        assert_eq!(hit, a);
        p.touch(&hit);
        assert_eq!(p.num_free(), 1);
        assert_eq!(p.ref_cnt(a[0]), 1);
        let b = p.allocate(1).unwrap();
        assert_ne!(b[0], a[0]);
        assert!(p.is_cached(5));
    }

    proptest! {
        /// Free count, queue and reference counts stay consistent under any sequence of operations.
        #[test]
        fn invariants(ops in prop::collection::vec((0u8..3, 1usize..4, any::<u64>()), 1..200)) {
            let mut p = BlockPool::new(8, true);
            let mut held: Vec<Vec<BlockId>> = Vec::new();
            for (op, n, h) in ops {
                match op {
                    0 => if let Some(b) = p.allocate(n) {
                        for (i, id) in b.iter().enumerate() { p.cache(*id, h.wrapping_add(i as u64)); }
                        held.push(b);
                    },
                    1 => if !held.is_empty() { let b = held.remove(h as usize % held.len()); p.free(b.into_iter().rev()); },
                    _ => { let hit = p.longest_cached(&[h, h.wrapping_add(1)], 2); p.touch(&hit); held.push(hit); }
                }
                let in_use: std::collections::HashSet<BlockId> = held.iter().flatten().copied().collect();
                prop_assert_eq!(p.num_free(), 8 - in_use.len());
                for id in &in_use { prop_assert!(p.ref_cnt(*id) > 0); }
            }
        }
    }
}
