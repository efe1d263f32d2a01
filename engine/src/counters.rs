//! The engine counters a routing study reads: vLLM's own, summed over a fleet's engines. The
//! live study reads them from the engines' `/metrics` pages, the simulator keeps them as its engine
//! model runs; both come out as this one type.

use serde::{Deserialize, Serialize};

/// vLLM's counters, summed over engines (a run's are the difference of two).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineCounters {
    /// `vllm:prefix_cache_hits_total`
    pub hits: f64,
    /// `vllm:prefix_cache_queries_total`
    pub queries: f64,
    /// `vllm:prompt_tokens_total`
    pub prompt_tokens: f64,
    /// `vllm:request_prefill_kv_computed_tokens_sum`
    pub prefill_computed: f64,
    /// `vllm:time_to_first_token_seconds_sum`
    pub ttft_sum: f64,
    /// `vllm:time_to_first_token_seconds_count`
    pub ttft_count: f64,
    /// `vllm:num_preemptions_total`
    pub preemptions: f64,
    /// `vllm:time_to_first_token_seconds_bucket`: (upper bound s, cumulative count), summed over
    /// engines, in bound order.
    #[serde(default)]
    pub ttft_buckets: Vec<(f64, f64)>,
    /// `vllm:kv_block_idle_before_evict_seconds_bucket`, summed over engines as
    /// [`EngineCounters::ttft_buckets`]; empty where the engines do not export it (vLLM without
    /// `--kv-cache-metrics`).
    #[serde(default)]
    pub idle_before_evict_buckets: Vec<(f64, f64)>,
}

impl EngineCounters {
    /// The q-quantile of TTFT (ms) between `before` and `self`, from the histogram's bucket deltas
    /// (linear inside a bucket, as Prometheus' `histogram_quantile` does); NaN without buckets.
    pub fn ttft_quantile_ms(&self, before: &EngineCounters, q: f64) -> f64 {
        bucket_quantile(&self.ttft_buckets, &before.ttft_buckets, q) * 1e3
    }

    /// The q-quantile of the sampled KV blocks' idle time before eviction (s) between `before`
    /// and `self`; None where no sampled block was evicted or the engines do not report it.
    pub fn idle_before_evict_quantile_s(&self, before: &EngineCounters, q: f64) -> Option<f64> {
        let v = bucket_quantile(
            &self.idle_before_evict_buckets,
            &before.idle_before_evict_buckets,
            q,
        );
        v.is_finite().then_some(v)
    }
}

/// The q-quantile of a histogram between two readings of its cumulative buckets (upper bound,
/// count), linear inside a bucket as Prometheus' `histogram_quantile` is; NaN without
/// observations in between.
fn bucket_quantile(after: &[(f64, f64)], before: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
            (*le, c - b)
        })
        .collect();
    let Some(&(_, total)) = delta.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, cum) in delta {
        if cum >= rank {
            if le.is_infinite() {
                return lo;
            }
            let inside = (cum - below).max(1e-12);
            return lo + (le - lo) * (rank - below) / inside;
        }
        (lo, below) = (le, cum);
    }
    f64::NAN
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn ttft_quantile_from_bucket_deltas() {
        let before = EngineCounters {
            ttft_buckets: vec![(0.1, 5.0), (0.5, 5.0), (1.0, 5.0), (f64::INFINITY, 5.0)],
            ..Default::default()
        };
        // 10 new requests: 4 under 100 ms, 4 in (100, 500], 2 in (500, 1000].
        let after = EngineCounters {
            ttft_buckets: vec![(0.1, 9.0), (0.5, 13.0), (1.0, 15.0), (f64::INFINITY, 15.0)],
            ..Default::default()
        };
        // The 5th of 10 is a quarter into the (100, 500] bucket; the 9.5th three quarters into
        // (500, 1000].
        assert!((after.ttft_quantile_ms(&before, 0.5) - 200.0).abs() < 1e-6);
        assert!((after.ttft_quantile_ms(&before, 0.95) - 875.0).abs() < 1e-6);
        assert!(before.ttft_quantile_ms(&before, 0.5).is_nan());
        assert!(EngineCounters::default()
            .ttft_quantile_ms(&before, 0.5)
            .is_nan());
    }

    #[test]
    fn the_kv_idle_time_is_a_quantile_in_seconds_and_none_unreported() {
        let before = EngineCounters::default();
        // 4 sampled evictions: 2 after under 1 s idle, 2 in (1, 2].
        let after = EngineCounters {
            idle_before_evict_buckets: vec![(1.0, 2.0), (2.0, 4.0), (f64::INFINITY, 4.0)],
            ..Default::default()
        };
        assert_eq!(after.idle_before_evict_quantile_s(&before, 0.5), Some(1.0));
        assert_eq!(after.idle_before_evict_quantile_s(&before, 0.75), Some(1.5));
        // Engines without `--kv-cache-metrics`, or no sampled block evicted.
        assert_eq!(before.idle_before_evict_quantile_s(&before, 0.5), None);
        assert_eq!(after.idle_before_evict_quantile_s(&after, 0.5), None);
    }
}
