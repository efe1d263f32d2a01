//! An engine's prefill throughput and time per output token, measured from vLLM's own counters.
//!
//! The sidecar (from each scrape of `/metrics`) and the simulator (from the engine model's
//! observations) feed the same cumulative sums in; both read the same rates out:
//!
//! ```text
//! prefill_tps = d(request_prefill_kv_computed_tokens_sum) / d(request_prefill_time_seconds_sum)
//! step_s      = d(request_time_per_output_token_seconds_sum) / d(..._count)
//! ```
//!
//! over windows of at least [`RateEstimator::MIN_REQUESTS`] finished requests, smoothed across
//! windows (each new window weighs [`RateEstimator::SMOOTHING`]). Until the first window closes a
//! rate reads 0 ("not measured"), and the policy falls back (see [`crate::ttft`]). A counter that
//! goes backwards (the engine restarted) starts a new window.
//!
//! `prefill_tps` is tokens computed per second of a request's prefill phase (scheduled to first
//! token): with several prefills sharing steps it reads lower than the engine's peak, which is
//! the rate a queued request sees.

/// Cumulative sums, as the engine's histograms expose them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateCounters {
    /// `vllm:request_prefill_kv_computed_tokens_sum`
    pub prefill_tokens: f64,
    /// `vllm:request_prefill_time_seconds_sum`
    pub prefill_seconds: f64,
    /// `vllm:request_prefill_time_seconds_count`
    pub prefill_requests: f64,
    /// `vllm:request_time_per_output_token_seconds_sum`
    pub tpot_seconds: f64,
    /// `vllm:request_time_per_output_token_seconds_count`
    pub tpot_requests: f64,
}

/// Measured rates of one engine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateEstimator {
    base: Option<RateCounters>,
    prefill_tps: f64,
    step_s: f64,
}

impl RateEstimator {
    /// Finished requests a window needs before it counts.
    pub const MIN_REQUESTS: f64 = 8.0;
    /// Weight of a new window against the rates so far.
    pub const SMOOTHING: f64 = 0.5;

    /// Feeds the engine's current cumulative sums.
    pub fn observe(&mut self, now: RateCounters) {
        let Some(base) = self.base else {
            self.base = Some(now);
            return;
        };
        let d = |a: f64, b: f64| a - b;
        let dn = d(now.prefill_requests, base.prefill_requests);
        let (dtok, dsec) = (
            d(now.prefill_tokens, base.prefill_tokens),
            d(now.prefill_seconds, base.prefill_seconds),
        );
        let (dts, dtn) = (
            d(now.tpot_seconds, base.tpot_seconds),
            d(now.tpot_requests, base.tpot_requests),
        );
        if [dn, dtok, dsec, dts, dtn]
            .iter()
            .any(|x| *x < 0.0 || !x.is_finite())
        {
            // The engine restarted: its counters began again.
            self.base = Some(now);
            return;
        }
        if dn < Self::MIN_REQUESTS {
            return;
        }
        let blend = |old: f64, new: f64| {
            if old > 0.0 {
                old + Self::SMOOTHING * (new - old)
            } else {
                new
            }
        };
        if dsec > 0.0 && dtok > 0.0 {
            self.prefill_tps = blend(self.prefill_tps, dtok / dsec);
        }
        if dtn > 0.0 && dts > 0.0 {
            self.step_s = blend(self.step_s, dts / dtn);
        }
        self.base = Some(now);
    }

    /// Prefill tokens per second (0: not measured).
    pub fn prefill_tps(&self) -> f64 {
        self.prefill_tps
    }

    /// Seconds per output token (0: not measured).
    pub fn step_s(&self) -> f64 {
        self.step_s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn at(requests: f64, tokens: f64, seconds: f64) -> RateCounters {
        RateCounters {
            prefill_tokens: tokens,
            prefill_seconds: seconds,
            prefill_requests: requests,
            tpot_seconds: requests * 0.02,
            tpot_requests: requests,
        }
    }

    #[test]
    fn measures_windows_of_enough_requests_and_smooths() {
        let mut r = RateEstimator::default();
        r.observe(at(0.0, 0.0, 0.0));
        r.observe(at(4.0, 40_000.0, 4.0));
        assert_eq!(r.prefill_tps(), 0.0, "a window of 4 requests is not enough");
        r.observe(at(8.0, 80_000.0, 8.0));
        assert!((r.prefill_tps() - 10_000.0).abs() < 1e-6);
        assert!((r.step_s() - 0.02).abs() < 1e-12);
        // The next window runs at 20,000 tokens/s: half way there.
        r.observe(at(16.0, 240_000.0, 16.0));
        assert!((r.prefill_tps() - 15_000.0).abs() < 1e-6);
    }

    #[test]
    fn a_restart_begins_a_new_window() {
        let mut r = RateEstimator::default();
        r.observe(at(100.0, 1e6, 100.0));
        r.observe(at(120.0, 1.2e6, 120.0));
        let before = r.prefill_tps();
        r.observe(at(3.0, 30.0, 1.0));
        assert_eq!(r.prefill_tps(), before);
        r.observe(at(11.0, 30.0 + 8.0 * 5_000.0, 9.0));
        assert!(r.prefill_tps() < before);
        r.observe(RateCounters {
            prefill_tokens: f64::NAN,
            ..at(40.0, 0.0, 0.0)
        });
        assert!(r.prefill_tps().is_finite());
    }
}
