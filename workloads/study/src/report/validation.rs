//! The simulator against the live stack at N = 2.

use std::fmt::Write as _;

use super::*;

/// The simulator against the live stack: every validation run (`val-live`, N = 2)
/// re-run in the simulator with the same sessions and seeds (`val-sim`), compared over repeats.
pub(super) fn section(h: &mut String, runs: &[RunResult], sm: &SimMeta) {
    let key = |r: &RunResult| (r.spec.rate_label.clone(), r.spec.label());
    // TTFT quantiles over the requests of all repeats pooled (more stable than a mean of
    // per-run quantiles); hit rate as the mean over repeats.
    let pooled = |exp: &str| -> BTreeMap<(String, String), (f64, f64)> {
        let mut m: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
        for r in runs.iter().filter(|r| r.spec.experiment == exp) {
            m.entry(key(r)).or_default().extend(r.ttfts.iter().copied());
        }
        m.into_iter()
            .map(|(k, mut v)| {
                v.sort_by(f64::total_cmp);
                (k, (quantile(&v, 0.5), quantile(&v, 0.95)))
            })
            .collect()
    };
    let (live_t, sim_t) = (pooled("val-live"), pooled("val-sim"));
    let hits = |exp: &'static str| agg(runs, |r| r.spec.experiment == exp, key, |r| r.hit_rate);
    let (lhit, shit) = (hits("val-live"), hits("val-sim"));
    let send_delay = match median_and_max(&sm.send_delay_ms) {
        Some((p50, max)) => format!(" and the live client's send delay, drawn for every send from its distribution over the live runs (median {p50:.1} ms, max {max:.1} ms from when a turn was meant to go to when it went: timers and scheduling). Sends a few milliseconds apart swap live, and round_robin's hits are a lottery over the order of sends (a turn hits when it lands on its previous turn's engine), so without that jitter every simulated realisation would draw the same order"),
        _ => String::new(),
    };
    let _ = write!(h, "<h2>Simulator validation: live stack against simulator at N = 2</h2><p>Experiment 1's ShareGPT workload at 1x ({} conversations per run) through a live stack of its own {} (at the study's x8 every millisecond of host overhead would count eight times over), {} repeats, then the same runs in the simulator: same sessions, seeds, policy and settings; the simulator adds the gateway's per-request cost measured on idle probes through that stack ({:.1} ms, client TTFT minus engine TTFT){}. The live filter's random draws (ties, p2c) are its own, and a run's tail depends on them, so the simulator runs each live run under {} router seeds and pools them: its figures are the model's expectation, the live ones one realisation. Tolerances: TTFT P50 and P95 within {:.0}%, hit rate within {:.0} points. TTFT quantiles over the requests of all runs together; hit rate the mean over runs.</p><table><tr><th>rate, policy</th><th>P50 live</th><th>P50 sim</th><th>diff</th><th>P95 live</th><th>P95 sim</th><th>diff</th><th>hit live</th><th>hit sim</th><th>diff (pts)</th><th>within</th></tr>",
        sm.validation_sessions, if sm.validation_time_scale == 1.0 { "at real time".to_string() } else { format!("at x{}", sm.validation_time_scale) }, sm.validation_repeats, sm.gateway_ms, send_delay, sm.validation_router_seeds, VALIDATION_TTFT * 100.0, VALIDATION_HIT * 100.0);
    let (mut ok, mut all) = (0usize, 0usize);
    for (k, (l50, l95)) in &live_t {
        let (Some((s50, s95)), Some(lh), Some(sh)) = (sim_t.get(k), lhit.get(k), shit.get(k))
        else {
            continue;
        };
        let rel = |a: f64, b: f64| (b - a) / a.max(1e-9);
        let (d50, d95, dh) = (rel(*l50, *s50), rel(*l95, *s95), sh.0 - lh.0);
        let within = d50.abs() <= VALIDATION_TTFT
            && d95.abs() <= VALIDATION_TTFT
            && dh.abs() <= VALIDATION_HIT;
        all += 1;
        ok += usize::from(within);
        let _ = write!(h, "<tr><td>{} {}</td><td>{:.0}</td><td>{:.0}</td><td>{:+.1}%</td><td>{:.0}</td><td>{:.0}</td><td>{:+.1}%</td><td>{:.3}</td><td>{:.3}</td><td>{:+.1}</td><td>{}</td></tr>",
            k.0, k.1, l50, s50, d50 * 100.0, l95, s95, d95 * 100.0, lh.0, sh.0, dh * 100.0, if within { "yes" } else { "<b>no</b>" });
    }
    let _ = write!(
        h,
        "</table><p>{ok} of {all} configurations within every tolerance.</p>"
    );
    let stalled: Vec<String> = runs
        .iter()
        .filter(|r| r.spec.experiment == VALIDATION_STALLED)
        .map(|r| {
            format!(
                "{} repeat {} (a send {:.0} ms late)",
                r.spec.policy.as_str(),
                r.spec.repeat,
                r.max_send_delay_ms().unwrap_or(f64::NAN)
            )
        })
        .collect();
    if !stalled.is_empty() {
        let _ = write!(
            h,
            "<p>Set aside and run again: {} live run(s) in which the client sent a turn more than {:.0} ms after it was due, a host stall rather than the model (on a quiet machine the latest send is a few ms late): {}. They are in runs.jsonl as {VALIDATION_STALLED}.</p>",
            stalled.len(),
            sm.validation_max_send_delay_ms,
            stalled.join("; ")
        );
    }
}
