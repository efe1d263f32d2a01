//! Experiments 3 and 4: `load_cache_aware`'s alpha / beta sweep and the directory's publish
//! interval (the default policy and `load_cache_aware`), live at N = 2 and simulated at N = 8.

use std::fmt::Write as _;

use super::charts::*;
use super::*;

/// The sweeps' figures, live and simulated.
pub(super) fn figures(figs: &Figures, runs: &[RunResult]) -> anyhow::Result<()> {
    let fig = |name: &str| figs.path(name);
    // 4-6. alpha / beta and staleness: live at N=2 (experiments 3, 4), simulated at N=8 (5).
    for (exp_ab, exp_st, pre, what) in [
        ("exp3", "exp4", "", ""),
        ("exp5-ab", "exp5-staleness", "n8_", ", N=8 simulated"),
    ] {
        // 4-5. alpha / beta.
        let ab = agg(
            runs,
            |r| r.spec.experiment == exp_ab,
            |r| {
                (
                    runtime_value(r, "kvroute.alpha"),
                    runtime_value(r, "kvroute.beta"),
                )
            },
            |r| r.ttft_ms[1],
        );
        let mut alphas: Vec<f64> = ab.keys().filter_map(|k| k.0.parse().ok()).collect();
        alphas.sort_by(f64::total_cmp);
        alphas.dedup();
        let mut betas: Vec<f64> = ab.keys().filter_map(|k| k.1.parse().ok()).collect();
        betas.sort_by(f64::total_cmp);
        betas.dedup();
        let cells: BTreeMap<(usize, usize), f64> = ab
            .iter()
            .filter_map(|((a_, b_), v)| {
                let i = alphas
                    .iter()
                    .position(|x| a_.parse::<f64>().ok() == Some(*x))?;
                let j = betas
                    .iter()
                    .position(|x| b_.parse::<f64>().ok() == Some(*x))?;
                Some(((i, j), v.0))
            })
            .collect();
        if !cells.is_empty() {
            e(heatmap(
                &fig(&format!("{pre}alpha_beta_p95")),
                &format!("load_cache_aware: P95 TTFT (ms) by alpha and beta{what}"),
                &alphas,
                &betas,
                &cells,
            ))?;
        }
        let hit_ab = agg(
            runs,
            |r| r.spec.experiment == exp_ab,
            |r| {
                (
                    runtime_value(r, "kvroute.alpha"),
                    runtime_value(r, "kvroute.beta"),
                )
            },
            |r| r.hit_rate,
        );
        let imb_ab = agg(
            runs,
            |r| r.spec.experiment == exp_ab,
            |r| {
                (
                    runtime_value(r, "kvroute.alpha"),
                    runtime_value(r, "kvroute.beta"),
                )
            },
            |r| r.imbalance,
        );
        let pareto: Vec<(String, f64, f64)> = hit_ab
            .iter()
            .filter_map(|(k, h)| Some((format!(" a{} b{}", k.0, k.1), imb_ab.get(k)?.0, h.0)))
            .collect();
        if !pareto.is_empty() {
            e(scatter(
                &fig(&format!("{pre}pareto")),
                &format!("Hit rate vs load imbalance (alpha, beta){what}"),
                "imbalance (max/mean requests)",
                "hit rate",
                &pareto,
            ))?;
        }

        // 6. Staleness: a line per policy, one point per publish interval the runs used, in
        // interval order.
        let key = |r: &RunResult| {
            (
                r.spec.label(),
                runtime_value(r, "kvroute.publish_interval_ms"),
            )
        };
        let st_hit = agg(runs, |r| r.spec.experiment == exp_st, key, |r| r.hit_rate);
        let st_p95 = agg(runs, |r| r.spec.experiment == exp_st, key, |r| r.ttft_ms[1]);
        let mut order: Vec<&str> = st_hit.keys().map(|k| k.1.as_str()).collect();
        order.sort_by(|a, b| {
            let ms = |k: &str| k.trim().parse::<f64>().unwrap_or(f64::INFINITY);
            ms(a).total_cmp(&ms(b))
        });
        order.dedup();
        let axis = order.join(", ");
        let swept = policies(runs, exp_st);
        for (name, metric, values) in [
            ("staleness_hit", "hit rate", &st_hit),
            ("staleness_ttft", "P95 TTFT (ms)", &st_p95),
        ] {
            let line: Vec<(String, Vec<(f64, f64)>)> = swept
                .iter()
                .map(|p| {
                    (
                        p.clone(),
                        order
                            .iter()
                            .enumerate()
                            .filter_map(|(i, k)| {
                                Some((i as f64, values.get(&(p.clone(), k.to_string()))?.0))
                            })
                            .collect(),
                    )
                })
                .collect();
            e(lines(
                &fig(&format!("{pre}{name}")),
                &format!(
                    "Publish interval: {}{what} (x, ms: {axis})",
                    metric.trim_end_matches(" (ms)")
                ),
                "interval (index)",
                metric,
                &line,
                true,
            ))?;
        }
    }

    Ok(())
}

/// Experiments 3 and 4 on the page.
pub(super) fn section(h: &mut String, figs: &Figures, runs: &[RunResult]) {
    let svg = |name: &str| figs.svg(name);
    // The rate of a sweep, as its runs name it.
    let rate_of = |exp: &str| {
        runs.iter()
            .find(|r| r.spec.experiment == exp)
            .map_or_else(String::new, |r| r.spec.rate_label.clone())
    };
    let _ = write!(h, "<h2>Experiment 3: alpha / beta sweep (load_cache_aware, ShareGPT {})</h2><div class=fig>{}</div><div class=fig>{}</div>", rate_of("exp3"), svg("alpha_beta_p95"), svg("pareto"));
    table(
        h,
        runs,
        "alpha, beta",
        &|r| r.spec.experiment == "exp3",
        &|r| {
            format!(
                "alpha {} beta {}",
                runtime_value(r, "kvroute.alpha"),
                runtime_value(r, "kvroute.beta")
            )
        },
    );
    let _ = write!(h, "<h2>Experiment 4: directory publish interval ({}, ShareGPT {})</h2><div class=fig>{}</div><div class=fig>{}</div>", policies(runs, "exp4").join(", "), rate_of("exp4"), svg("staleness_hit"), svg("staleness_ttft"));
    table(
        h,
        runs,
        "policy, publish interval (ms)",
        &|r| r.spec.experiment == "exp4",
        &staleness_row,
    );
}

/// A staleness sweep's table row: the policy, then the publish interval (right-aligned, so that
/// the rows of a policy sort by interval up to `never`).
pub(super) fn staleness_row(r: &RunResult) -> String {
    format!(
        "{} {:>6}",
        r.spec.label(),
        runtime_value(r, "kvroute.publish_interval_ms")
    )
}
