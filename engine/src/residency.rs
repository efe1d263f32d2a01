//! vLLM's KV cache residency metrics (`--kv-cache-metrics`, vLLM's `KVCacheMetricsCollector`).
//!
//! A sample of KV block allocations (`--kv-cache-metrics-sample`, 1% by default) is followed until
//! the block is allocated again, which vLLM counts as its eviction whether or not it still held a
//! cached prefix. At that point the block's lifetime (allocation to eviction), its idle time (last
//! access to eviction) and the gaps between its last accesses (up to four, a ring as vLLM keeps)
//! are observed. An access is a cache hit that takes a reference on the block (vLLM's `touch`).
//!
//! These show how long a prefix stays cached on an engine: an idle time before eviction shorter
//! than the time between a conversation's turns means its history is recomputed.

use crate::block_pool::BlockId;

/// Accesses a tracked block remembers, as vLLM's `deque(maxlen=4)`.
const HISTORY: usize = 4;

/// What one sampled block's eviction observed.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockEviction {
    /// `kv_block_lifetime_seconds`: from its allocation to its eviction.
    pub lifetime_s: f64,
    /// `kv_block_idle_before_evict_seconds`: from its last access (or allocation) to its eviction.
    pub idle_s: f64,
    /// `kv_block_reuse_gap_seconds`: between consecutive accesses of its last few.
    pub reuse_gaps_s: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    birth: f64,
    last_access: f64,
    /// The last accesses, oldest first from `next` (a ring of [`HISTORY`]).
    accesses: [f64; HISTORY],
    len: u8,
    next: u8,
}

impl Tracked {
    fn new(now: f64) -> Self {
        Self {
            birth: now,
            last_access: now,
            accesses: [0.0; HISTORY],
            len: 0,
            next: 0,
        }
    }

    fn access(&mut self, now: f64) {
        self.last_access = now;
        if let Some(slot) = self.accesses.get_mut(usize::from(self.next)) {
            *slot = now;
        }
        self.next = (self.next + 1) % HISTORY as u8;
        self.len = (self.len + 1).min(HISTORY as u8);
    }

    /// The gaps between the remembered accesses, in order.
    fn gaps(&self) -> Vec<f64> {
        let n = usize::from(self.len);
        let first = (usize::from(self.next) + HISTORY - n) % HISTORY;
        let at = |i: usize| {
            self.accesses
                .get((first + i) % HISTORY)
                .copied()
                .unwrap_or(0.0)
        };
        (1..n).map(|i| at(i) - at(i - 1)).collect()
    }
}

/// The sampled blocks and the evictions not yet taken. Bounded: one slot a block of the pool, and
/// the engine takes the evictions every step.
#[derive(Debug, Clone)]
pub struct Residency {
    rate: f64,
    rng: u64,
    /// By block id: the sampled blocks' times (a dense table: every allocation and hit looks
    /// its block up).
    tracked: Vec<Option<Tracked>>,
    /// Allocations to pass over before the next sampled one (a geometric draw: the same sample
    /// as one draw per allocation, with one draw per sampled block).
    skip: u64,
    evictions: Vec<BlockEviction>,
}

impl Residency {
    /// Follows a `rate` share of allocations; vLLM accepts a rate in (0, 1].
    pub fn new(rate: f64) -> Result<Self, String> {
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(format!(
                "--kv-cache-metrics-sample {rate}: want a share of blocks in (0, 1]"
            ));
        }
        let mut r = Self {
            rate,
            // A fixed seed: the emulator's runs repeat (vLLM draws from Python's `random`).
            rng: 0x9e37_79b9_7f4a_7c15,
            tracked: Vec::new(),
            skip: 0,
            evictions: Vec::new(),
        };
        r.skip = r.next_skip();
        Ok(r)
    }

    /// Allocations before the next sampled one: each is sampled with probability `rate`.
    fn next_skip(&mut self) -> u64 {
        if self.rate >= 1.0 {
            return 0;
        }
        let u = 1.0 - self.draw(); // in (0, 1]
        (u.ln() / (1.0 - self.rate).ln()).floor().min(1e18) as u64
    }

    /// A uniform draw in [0, 1) (SplitMix64).
    fn draw(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Block `id` taken from the free queue at `now`: the end of what it held before (vLLM calls
    /// this its eviction, for every block it reallocates), then, if sampled, a new life.
    pub fn reallocated(&mut self, id: BlockId, now: f64) {
        let i = id as usize;
        if let Some(t) = self.tracked.get_mut(i).and_then(Option::take) {
            self.evictions.push(BlockEviction {
                lifetime_s: (now - t.birth).max(0.0),
                idle_s: (now - t.last_access).max(0.0),
                reuse_gaps_s: t.gaps(),
            });
        }
        if self.skip > 0 {
            self.skip -= 1;
        } else {
            self.skip = self.next_skip();
            if self.tracked.len() <= i {
                self.tracked.resize(i + 1, None);
            }
            if let Some(slot) = self.tracked.get_mut(i) {
                *slot = Some(Tracked::new(now));
            }
        }
    }

    /// Block `id` hit by a request at `now`.
    pub fn accessed(&mut self, id: BlockId, now: f64) {
        if let Some(Some(t)) = self.tracked.get_mut(id as usize) {
            t.access(now);
        }
    }

    /// The prefix cache was reset: nothing is followed any more (vLLM's `reset`).
    pub fn reset(&mut self) {
        self.tracked.clear();
    }

    /// The evictions since the last call.
    pub fn take(&mut self) -> Vec<BlockEviction> {
        std::mem::take(&mut self.evictions)
    }

    /// Blocks followed now.
    pub fn tracked(&self) -> usize {
        self.tracked.iter().filter(|t| t.is_some()).count()
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

    #[test]
    fn a_followed_block_reports_its_life_at_its_next_allocation() {
        let mut r = Residency::new(1.0).unwrap();
        r.reallocated(7, 1.0);
        for t in [2.0, 2.5, 4.0, 4.5, 6.0] {
            r.accessed(7, t);
        }
        assert!(r.take().is_empty(), "nothing evicted yet");
        r.reallocated(7, 10.0);
        let e = r.take();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].lifetime_s, 9.0);
        assert_eq!(e[0].idle_s, 4.0);
        // The last four accesses (2.5, 4, 4.5, 6): three gaps.
        assert_eq!(e[0].reuse_gaps_s, vec![1.5, 0.5, 1.5]);
        // Reallocated, it is followed again from 10.
        r.reallocated(7, 11.0);
        assert_eq!(r.take()[0].lifetime_s, 1.0);
    }

    #[test]
    fn a_block_never_accessed_is_idle_since_its_allocation() {
        let mut r = Residency::new(1.0).unwrap();
        r.reallocated(1, 3.0);
        r.reallocated(1, 5.0);
        let e = r.take();
        assert_eq!((e[0].lifetime_s, e[0].idle_s), (2.0, 2.0));
        assert!(e[0].reuse_gaps_s.is_empty());
    }

    #[test]
    fn the_sample_follows_about_its_share_of_allocations() {
        let mut r = Residency::new(0.01).unwrap();
        for id in 0..100_000u32 {
            r.reallocated(id, 0.0);
        }
        let n = r.tracked();
        assert!((700..=1300).contains(&n), "{n} of 100,000 followed at 1%");
    }

    #[test]
    fn a_reset_forgets_every_block() {
        let mut r = Residency::new(1.0).unwrap();
        r.reallocated(1, 0.0);
        r.reset();
        r.reallocated(1, 1.0);
        assert!(r.take().is_empty());
    }

    #[test]
    fn rates_outside_vllms_range_are_refused() {
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(Residency::new(bad).is_err(), "{bad}");
        }
        assert!(Residency::new(1.0).is_ok());
    }
}
