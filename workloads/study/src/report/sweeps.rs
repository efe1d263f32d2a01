//! Experiments 3 and 4: `load_cache_aware`'s alpha / beta sweep and the directory's publish
//! interval, live at N = 2 and simulated at N = 8.

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

        // 6. Staleness: one point per publish interval the runs used, in interval order.
        let st_hit = agg(
            runs,
            |r| r.spec.experiment == exp_st,
            |r| runtime_value(r, "kvroute.publish_interval_ms"),
            |r| r.hit_rate,
        );
        let st_p95 = agg(
            runs,
            |r| r.spec.experiment == exp_st,
            |r| runtime_value(r, "kvroute.publish_interval_ms"),
            |r| r.ttft_ms[1],
        );
        let mut order: Vec<&str> = st_hit.keys().map(String::as_str).collect();
        order.sort_by(|a, b| {
            let ms = |k: &str| k.trim().parse::<f64>().unwrap_or(f64::INFINITY);
            ms(a).total_cmp(&ms(b))
        });
        let axis = order.join(", ");
        for (name, metric, values) in [
            ("staleness_hit", "hit rate", &st_hit),
            ("staleness_ttft", "P95 TTFT (ms)", &st_p95),
        ] {
            let line = vec![(
                metric.to_string(),
                order
                    .iter()
                    .enumerate()
                    .filter_map(|(i, k)| Some((i as f64, values.get(*k)?.0)))
                    .collect(),
            )];
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
    let _ = write!(h, "<h2>Experiment 4: directory publish interval (load_cache_aware, ShareGPT {})</h2><div class=fig>{}</div><div class=fig>{}</div>", rate_of("exp4"), svg("staleness_hit"), svg("staleness_ttft"));
    table(
        h,
        runs,
        "publish interval (ms)",
        &|r| r.spec.experiment == "exp4",
        &|r| format!("{:>6}", runtime_value(r, "kvroute.publish_interval_ms")),
    );
}
