//! The sustainable-rate search, shared by the live study and the simulator: rates double from a
//! start until a probe misses the objective, then bisection narrows the knee between the last rate
//! that met it and the first that did not. The caller runs each probe; this only says which rate
//! comes next, whether a probe needs a second sample, and what was found.

/// A probe whose P95 is within this fraction of the objective is too close to call from one
/// sample: a P95 over about a hundred requests moves by tens of percent between seeds, and one
/// probe at 998 ms against 1,000 (another run's: 1,087) moved a whole study's 1x by 14%.
pub const CLOSE_CALL: f64 = 0.10;

/// Whether a probe with P95 `p95` needs a second sample (another seed) before it decides.
pub fn close_call(p95: f64, objective: f64) -> bool {
    (p95 - objective).abs() <= CLOSE_CALL * objective
}

/// Whether a rate with these samples' (P95, failed requests) takes another: the first one is a
/// close call without a failure, and it is the only one.
pub fn another_sample(samples: &[(f64, usize)], objective: f64) -> bool {
    matches!(samples, [(p95, 0)] if close_call(*p95, objective))
}

/// The verdict on a rate from its samples' (P95, failed requests): every sample without a failure,
/// and their mean P95 within the objective.
pub fn verdict(samples: &[(f64, usize)], objective: f64) -> bool {
    !samples.is_empty()
        && samples.iter().all(|(_, failed)| *failed == 0)
        && samples.iter().map(|(p, _)| p).sum::<f64>() / samples.len() as f64 <= objective
}

/// A search in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct RateSearch {
    /// The highest rate that met the objective so far.
    ok: Option<f64>,
    /// The lowest rate that missed it so far.
    failed: Option<f64>,
    next: Option<f64>,
    doublings_left: usize,
    bisections_left: usize,
}

impl RateSearch {
    /// Probes `start`, then up to `doublings` doublings, then `bisections` bisection steps.
    pub fn new(start: f64, doublings: usize, bisections: usize) -> RateSearch {
        RateSearch {
            ok: None,
            failed: None,
            next: (start.is_finite() && start > 0.0).then_some(start),
            doublings_left: doublings,
            bisections_left: bisections,
        }
    }

    /// The rate to probe next; `None` when the search is over.
    pub fn next(&self) -> Option<f64> {
        self.next
    }

    /// Records whether the probe of [`RateSearch::next`] met the objective.
    pub fn record(&mut self, met: bool) {
        let Some(rate) = self.next else { return };
        if met {
            self.ok = Some(rate);
        } else {
            self.failed = Some(rate);
        }
        self.next = match (self.ok, self.failed) {
            // Still doubling.
            (Some(ok), None) if self.doublings_left > 0 => {
                self.doublings_left -= 1;
                Some(ok * 2.0)
            }
            (Some(ok), Some(failed)) if self.bisections_left > 0 => {
                self.bisections_left -= 1;
                Some((ok + failed) / 2.0)
            }
            _ => None,
        };
    }

    /// The highest rate that met the objective (`None` if even the first did not).
    pub fn knee(&self) -> Option<f64> {
        self.ok
    }

    /// True when no probed rate missed the objective: the knee is at least the last rate probed,
    /// a lower bound only.
    pub fn capped(&self) -> bool {
        self.failed.is_none()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_close_probe_gets_a_second_sample_and_the_mean_decides() {
        assert!(close_call(998.0, 1000.0) && close_call(1087.0, 1000.0));
        assert!(!close_call(850.0, 1000.0) && !close_call(1200.0, 1000.0));
        assert!(verdict(&[(998.0, 0)], 1000.0));
        // 998 then 1,087: over on the mean.
        assert!(!verdict(&[(998.0, 0), (1087.0, 0)], 1000.0));
        assert!(verdict(&[(1010.0, 0), (950.0, 0)], 1000.0));
        // A failed request fails the rate, and no sample decides nothing.
        assert!(!verdict(&[(500.0, 1)], 1000.0));
        assert!(!verdict(&[], 1000.0));
        assert!(another_sample(&[(998.0, 0)], 1000.0));
        assert!(!another_sample(&[(998.0, 1)], 1000.0));
        assert!(!another_sample(&[(800.0, 0)], 1000.0));
        assert!(!another_sample(&[(998.0, 0), (1087.0, 0)], 1000.0));
    }

    fn run(start: f64, doublings: usize, bisections: usize, limit: f64) -> (RateSearch, Vec<f64>) {
        let mut s = RateSearch::new(start, doublings, bisections);
        let mut probed = Vec::new();
        while let Some(r) = s.next() {
            probed.push(r);
            s.record(r <= limit);
        }
        (s, probed)
    }

    #[test]
    fn doubles_then_bisects_to_the_knee() {
        let (s, probed) = run(0.5, 7, 3, 5.0);
        // 0.5 1 2 4 ok, 8 missed; then 6 (missed), 5 (ok), 5.5 (missed).
        assert_eq!(probed, [0.5, 1.0, 2.0, 4.0, 8.0, 6.0, 5.0, 5.5]);
        assert_eq!(s.knee(), Some(5.0));
        assert!(!s.capped());
    }

    #[test]
    fn the_knee_is_within_the_resolution_for_any_limit() {
        for i in 1..200 {
            let limit = 0.3 + i as f64 * 0.173;
            let (s, _) = run(0.25, 12, 4, limit);
            let knee = s.knee().unwrap();
            assert!(knee <= limit, "{knee} > {limit}");
            // After k bisections the bracket is (hi - lo) / 2^k of a doubling: 1/16 of the knee.
            assert!(limit - knee <= knee / 16.0 + 1e-9, "{knee} vs {limit}");
        }
    }

    #[test]
    fn capped_when_nothing_fails_and_empty_when_the_start_fails() {
        let (s, probed) = run(0.5, 3, 2, 100.0);
        assert_eq!(probed, [0.5, 1.0, 2.0, 4.0]);
        assert_eq!(s.knee(), Some(4.0));
        assert!(s.capped());
        let (s, probed) = run(0.5, 3, 2, 0.1);
        assert_eq!(probed, [0.5]);
        assert_eq!(s.knee(), None);
        assert!(!s.capped());
        assert_eq!(RateSearch::new(f64::NAN, 3, 2).next(), None);
    }
}
