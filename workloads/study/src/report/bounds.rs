//! The trace analysis: how much of each workload's prompt tokens could ever be reused, and from
//! where (the bounds every policy is measured against).

use std::fmt::Write as _;

use super::charts::*;
use super::*;

/// The prefix-overlap figure.
pub(super) fn figures(figs: &Figures, bounds: &[(String, Analysis)]) -> anyhow::Result<()> {
    let fig = |name: &str| figs.path(name);
    let wl: Vec<String> = bounds.iter().map(|(n, _)| n.clone()).collect();
    let pick = |f: fn(&Analysis) -> f64| -> Vec<f64> { bounds.iter().map(|(_, a)| f(a)).collect() };
    let overlap: Vec<BarSeries> = vec![
        (
            "oracle, infinite cache".into(),
            pick(|a| a.oracle_infinite),
            Vec::new(),
        ),
        (
            format!(
                "oracle, {} x {} blocks",
                bounds.first().map_or(0, |b| b.1.engines),
                bounds.first().map_or(0, |b| b.1.capacity_blocks)
            ),
            pick(|a| a.oracle_capacity),
            Vec::new(),
        ),
        (
            "reusable within the session".into(),
            pick(|a| a.within_session),
            Vec::new(),
        ),
        (
            "reusable across sessions".into(),
            pick(|a| a.across_sessions),
            Vec::new(),
        ),
    ];
    e(bars(
        &fig("prefix_overlap"),
        "Prefix overlap by workload (share of prompt tokens)",
        "share of prompt tokens",
        &wl,
        &overlap,
        &[],
    ))?;

    Ok(())
}

/// The analysis on the page.
pub(super) fn section(h: &mut String, figs: &Figures, bounds: &[(String, Analysis)]) {
    let svg = |name: &str| figs.svg(name);
    let _ = write!(h, "<h2>Trace analysis and oracle bounds</h2><p>For each measured workload (seed 1), rebuilt as the engines tokenize it: the hit rate no router can beat with an infinite cache (each request hits the longest run of leading blocks any earlier request computed), the same with the fleet's capacity (one LRU of all engines' blocks in arrival order: perfect placement; an estimate rather than a bound, since engines serve queued requests later and LRU is not the best replacement), and the share of prompt tokens reusable from the same session and from other sessions (infinite cache).</p><div class=fig>{}</div><table>", svg("prefix_overlap"));
    let _ = write!(h, "<tr><th>workload</th><th>requests</th><th>prompt tokens</th><th>oracle, infinite cache</th><th>fleet capacity (2 x 711 blocks), estimate</th><th>within session</th><th>across sessions</th></tr>");
    for (name, a) in bounds {
        let _ = write!(h, "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>", a.requests, a.prompt_tokens, a.oracle_infinite, a.oracle_capacity, a.within_session, a.across_sessions);
    }
    let _ = write!(h, "</table>");
}
