//! Per-engine state over time: windowed rates, counter resets, health.

use std::collections::VecDeque;

use kvroute_core::rates::RateEstimator;
use kvroute_core::snapshot::EngineSnapshot;

use crate::scrape::EngineSample;

/// Everything the sidecar remembers about one engine (bounded: the window keeps at most
/// `MAX_WINDOW` samples).
#[derive(Debug, Clone)]
pub struct Tracker {
    name: String,
    window_ms: u64,
    unhealthy_after: u32,
    window: VecDeque<(u64, EngineSample)>,
    last: Option<EngineSample>,
    scraped_at_ms: u64,
    consecutive_failures: u32,
    restarts: u32,
    last_error: Option<String>,
    rates: RateEstimator,
}

/// Most samples kept per engine.
pub const MAX_WINDOW: usize = 1024;

impl Tracker {
    /// A tracker for engine `name`: rates over `window_ms`, unhealthy after `unhealthy_after`
    /// consecutive failures.
    pub fn new(name: &str, window_ms: u64, unhealthy_after: u32) -> Self {
        Self {
            name: name.to_string(),
            window_ms,
            unhealthy_after: unhealthy_after.max(1),
            window: VecDeque::new(),
            last: None,
            scraped_at_ms: 0,
            consecutive_failures: 0,
            restarts: 0,
            last_error: None,
            rates: RateEstimator::default(),
        }
    }

    /// Records a successful scrape at `now_ms`.
    pub fn ok(&mut self, now_ms: u64, s: EngineSample) {
        // A counter that went down means the engine restarted: deltas across it are meaningless.
        if let Some(prev) = self.last {
            let down =
                |a: Option<f64>, b: Option<f64>| matches!((a, b), (Some(x), Some(y)) if y < x);
            if down(prev.queries, s.queries)
                || down(prev.prompt_tokens, s.prompt_tokens)
                || down(prev.generation_tokens, s.generation_tokens)
            {
                self.restarts += 1;
                self.window.clear();
            }
        }
        if let Some(r) = s.rates {
            self.rates.observe(r);
        }
        self.window.push_back((now_ms, s));
        while self.window.len() > MAX_WINDOW
            || self.window.front().is_some_and(|(t, _)| {
                now_ms.saturating_sub(*t) > self.window_ms && self.window.len() > 2
            })
        {
            self.window.pop_front();
        }
        self.last = Some(s);
        self.scraped_at_ms = now_ms;
        self.consecutive_failures = 0;
        self.last_error = None;
    }

    /// Records a failed scrape and why.
    pub fn failed(&mut self, why: String) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_error = Some(why);
    }

    /// Whether the engine counts as healthy.
    pub fn healthy(&self) -> bool {
        self.last.is_some() && self.consecutive_failures < self.unhealthy_after
    }

    /// Consecutive failures so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    fn delta(&self, f: impl Fn(&EngineSample) -> Option<f64>) -> Option<(f64, f64)> {
        let (t0, a) = self.window.front()?;
        let (t1, b) = self.window.back()?;
        let d = f(b)? - f(a)?;
        let dt = (t1.saturating_sub(*t0)) as f64 / 1000.0;
        Some((d, dt))
    }

    /// The snapshot entry.
    pub fn snapshot(&self) -> EngineSnapshot {
        let last = self.last.unwrap_or_default();
        let hit_rate = match (self.delta(|s| s.hits), self.delta(|s| s.queries)) {
            (Some((h, _)), Some((q, _))) if q > 0.0 => Some(h / q),
            _ => None,
        };
        let rate = |f: fn(&EngineSample) -> Option<f64>| match self.delta(f) {
            Some((d, dt)) if dt > 0.0 => d / dt,
            _ => 0.0,
        };
        EngineSnapshot {
            name: self.name.clone(),
            healthy: self.healthy(),
            consecutive_failures: self.consecutive_failures,
            scraped_at_ms: self.scraped_at_ms,
            waiting: last.waiting,
            running: last.running,
            kv_usage: last.kv_usage,
            hit_rate,
            prompt_tokens_per_s: rate(|s| s.prompt_tokens),
            generation_tokens_per_s: rate(|s| s.generation_tokens),
            capacity_tokens: last.capacity_tokens,
            prefill_tps: self.rates.prefill_tps(),
            step_s: self.rates.step_s(),
            restarts: self.restarts,
            last_error: self.last_error.clone(),
        }
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

    fn sample(hits: f64, queries: f64, prompt: f64) -> EngineSample {
        EngineSample {
            hits: Some(hits),
            queries: Some(queries),
            prompt_tokens: Some(prompt),
            ..Default::default()
        }
    }

    #[test]
    fn hit_rate_over_the_window_and_rates() {
        let mut t = Tracker::new("e", 10_000, 3);
        t.ok(0, sample(100.0, 1000.0, 1000.0));
        t.ok(1000, sample(150.0, 1100.0, 1100.0));
        let s = t.snapshot();
        assert_eq!(s.hit_rate, Some(0.5));
        assert_eq!(s.prompt_tokens_per_s, 100.0);
        assert!(s.healthy);
    }

    #[test]
    fn counter_reset_is_a_restart_not_a_negative_rate() {
        let mut t = Tracker::new("e", 10_000, 3);
        t.ok(0, sample(100.0, 1000.0, 1000.0));
        t.ok(1000, sample(5.0, 10.0, 10.0));
        t.ok(2000, sample(10.0, 30.0, 40.0));
        let s = t.snapshot();
        assert_eq!(s.restarts, 1);
        assert_eq!(s.hit_rate, Some(0.25));
        assert_eq!(s.prompt_tokens_per_s, 30.0);
    }

    #[test]
    fn unhealthy_after_consecutive_failures_and_back() {
        let mut t = Tracker::new("e", 10_000, 3);
        assert!(!t.healthy(), "never scraped");
        t.ok(0, sample(0.0, 0.0, 0.0));
        t.failed("x".into());
        t.failed("x".into());
        assert!(t.healthy());
        t.failed("refused".into());
        assert_eq!(t.snapshot().last_error.as_deref(), Some("refused"));
        assert!(!t.healthy());
        t.ok(10, sample(0.0, 0.0, 0.0));
        assert!(t.healthy());
    }

    #[test]
    fn window_is_bounded() {
        let mut t = Tracker::new("e", u64::MAX, 3);
        for i in 0..5000u64 {
            t.ok(i, sample(0.0, i as f64, i as f64));
        }
        assert!(t.window.len() <= MAX_WINDOW);
        let mut t = Tracker::new("e", 100, 3);
        for i in 0..5000u64 {
            t.ok(i * 10, sample(0.0, i as f64, i as f64));
        }
        assert!(t.window.len() <= 12);
    }
}
