//! How much prefix reuse a workload offers, and the hit rate no router can beat.
//!
//! Each request is rebuilt exactly as an engine sees it: the emulator's tokenizer and Llama 3 chat
//! template over the history (assistant turns from the file, or the emulator's deterministic
//! answer of `max_tokens` tokens), cut into 16-token blocks with chained hashes. Requests are taken
//! in arrival order (a session's turn `t` at `start + t * think`). For each request:
//! - the **oracle with an infinite cache** hits the longest run of its leading blocks any earlier
//!   request computed (at most `prompt - 1` tokens, as vLLM caps it);
//! - the **oracle with the fleet's capacity** does the same over one LRU of `engines x blocks`
//!   blocks: perfect placement across engines, which no real router can exceed;
//! - reuse is split into **within the session** (the blocks were last computed by the same
//!   session) and **across sessions**.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use kvroute_emulator::block_pool::{block_hashes, chain_root};
use kvroute_emulator::tokenizer::encode_chat;
use kvroute_traces::Session;
use serde::Serialize;

/// Tokens per KV block.
pub const BLOCK: usize = 16;

/// The bounds for one workload.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Analysis {
    /// Requests analysed.
    pub requests: usize,
    /// Prompt tokens in all.
    pub prompt_tokens: u64,
    /// Hit rate of the oracle with an infinite cache.
    pub oracle_infinite: f64,
    /// Hit rate of perfect placement with `engines x capacity_blocks` blocks: one LRU over all
    /// of them, requests in arrival order. An estimate, not a bound: engines serve queued requests
    /// later than they arrive, and LRU is not the best replacement.
    pub oracle_capacity: f64,
    /// Share of prompt tokens reusable from the same session (infinite cache).
    pub within_session: f64,
    /// Share of prompt tokens reusable from other sessions (infinite cache).
    pub across_sessions: f64,
    /// Engines and blocks per engine of the capacity bound.
    pub engines: usize,
    /// Blocks per engine.
    pub capacity_blocks: usize,
}

/// The prompt token ids of every request, in arrival order, with their session index.
pub fn requests(sessions: &[Session], model: &str) -> Vec<(usize, Vec<u32>)> {
    let mut timed: Vec<(f64, usize, Vec<u32>)> = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        kvroute_sim::each_turn_chat(s, |t, _, msgs| {
            timed.push((
                s.start_ms + t as f64 * s.think_ms.max(1.0),
                si,
                encode_chat(msgs),
            ));
        });
    }
    let _ = model;
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    timed.into_iter().map(|(_, s, p)| (s, p)).collect()
}

/// Analyses `sessions` for a fleet of `engines` engines of `capacity_blocks` blocks each.
pub fn analyze(
    sessions: &[Session],
    model: &str,
    engines: usize,
    capacity_blocks: usize,
) -> Analysis {
    let reqs = requests(sessions, model);
    let root = chain_root(model);
    // Infinite cache: who last computed each block.
    let mut owner: HashMap<u64, usize> = HashMap::new();
    let cap = NonZeroUsize::new(engines.saturating_mul(capacity_blocks).max(1))
        .unwrap_or(NonZeroUsize::MIN);
    let mut lru: lru::LruCache<u64, ()> = lru::LruCache::new(cap);
    let (mut total, mut inf_hits, mut cap_hits, mut within, mut across) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for (session, prompt) in &reqs {
        let hashes = block_hashes(root, prompt, BLOCK);
        let max_blocks = (prompt.len().saturating_sub(1)) / BLOCK;
        total += prompt.len() as u64;
        let mut hit = 0usize;
        for h in hashes.iter().take(max_blocks) {
            match owner.get(h) {
                Some(o) => {
                    if o == session {
                        within += BLOCK as u64;
                    } else {
                        across += BLOCK as u64;
                    }
                    hit += 1;
                }
                None => break,
            }
        }
        inf_hits += (hit * BLOCK) as u64;
        let cap_hit = hashes
            .iter()
            .take(max_blocks)
            .take_while(|h| lru.contains(*h))
            .count();
        cap_hits += (cap_hit * BLOCK) as u64;
        // The request's blocks are now computed (its own session owns them); tail first into the
        // LRU so a prefix's first blocks are the most recently used, as vLLM frees them.
        for h in &hashes {
            owner.insert(*h, *session);
        }
        for h in hashes.iter().rev() {
            lru.put(*h, ());
        }
    }
    let share = |x: u64| {
        if total == 0 {
            0.0
        } else {
            x as f64 / total as f64
        }
    };
    Analysis {
        requests: reqs.len(),
        prompt_tokens: total,
        oracle_infinite: share(inf_hits),
        oracle_capacity: share(cap_hits),
        within_session: share(within),
        across_sessions: share(across),
        engines,
        capacity_blocks,
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
    use kvroute_traces::Turn;

    fn session(id: &str, system: &str, turns: usize, start: f64) -> Session {
        Session {
            id: id.into(),
            start_ms: start,
            system: Some(system.into()),
            turns: (0..turns)
                .map(|t| Turn {
                    user: format!("question {t} from {id}"),
                    assistant: Some(format!("answer {t}")),
                    max_tokens: 4,
                })
                .collect(),
            think_ms: 1000.0,
        }
    }

    #[test]
    fn no_reuse_means_no_hits_and_repeats_hit_almost_everything() {
        let a = analyze(&[session("a", "alpha system prompt", 1, 0.0)], "m", 2, 100);
        assert_eq!((a.oracle_infinite, a.oracle_capacity), (0.0, 0.0));
        let long = "shared context ".repeat(200);
        let twice = [session("a", &long, 1, 0.0), session("b", &long, 1, 10.0)];
        let b = analyze(&twice, "m", 2, 10_000);
        // The second request reuses the whole shared system prompt.
        assert!(b.oracle_infinite > 0.45 && b.oracle_infinite < 0.5, "{b:?}");
        assert_eq!(b.oracle_infinite, b.oracle_capacity);
        assert_eq!(b.within_session, 0.0);
        assert!((b.across_sessions - b.oracle_infinite).abs() < 1e-12);
    }

    #[test]
    fn multi_turn_reuse_is_within_the_session_and_capacity_bounds_it() {
        let s = [session("a", &"context ".repeat(300), 6, 0.0)];
        let inf = analyze(&s, "m", 1, 1_000_000);
        assert!(inf.within_session > 0.7, "{inf:?}");
        assert_eq!(inf.across_sessions, 0.0);
        let tiny = analyze(&s, "m", 1, 8);
        assert!(tiny.oracle_capacity < inf.oracle_capacity);
        assert!(tiny.oracle_capacity <= tiny.oracle_infinite);
    }
}
