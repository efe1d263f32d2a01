//! Figures (SVG) and the self-contained HTML report of a study: one module per experiment, each with
//! its figures and its part of the page, over the chart kinds in [`charts`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::study::{quantile, RunResult, VALIDATION_STALLED};
use kvroute_loadgen::analyze::Analysis;
use kvroute_loadgen::calibrate::Calibration;

mod bounds;
mod calibration;
mod charts;
mod exp1;
mod scaling;
mod sweeps;
mod validation;

pub use charts::{lines, lines_log2x, png_options, svg_to_png, Res, Series};

/// What the report says about how it was made.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// reduced or full.
    pub mode: String,
    /// Engine profile.
    pub profile: String,
    /// The smallest KV cache of the live engines, tokens (`vllm:cache_config_info`).
    pub kv_tokens_per_engine: u64,
    /// Emulated time per wall time.
    pub time_scale: f64,
    /// Engines.
    pub engines: usize,
    /// 1x, sessions/s.
    pub sustainable_rate: f64,
    /// The search's P95 TTFT objective, ms.
    pub slo_ms: f64,
    /// The search ended at its highest probe without exceeding the objective.
    pub search_capped: bool,
    /// Repeats per configuration.
    pub repeats: usize,
    /// ShareGPT conversations per run at 1x.
    pub sessions: usize,
    /// Seconds (emulated) over which a run's conversations arrive (0: a fixed count per run).
    pub window_s: f64,
    /// The same for the search's probes.
    pub search_window_s: f64,
    /// Wall time of the study, s.
    pub wall_s: f64,
    /// Envoy version.
    pub envoy: String,
    /// kvroute version.
    pub kvroute: String,
    /// The simulated part of the study, if it ran.
    pub simulator: Option<SimMeta>,
}

/// How the simulated runs were set up.
#[derive(Debug, Clone, Serialize)]
pub struct SimMeta {
    /// The gateway's per-request cost the simulator adds (request path + response path), ms:
    /// client TTFT minus engine TTFT, measured on idle probes through the live stack.
    pub gateway_ms: f64,
    /// The client's send delay the simulated clients draw from, ms: quantiles at 0, 5, ..., 100%
    /// pooled over the live validation runs (empty: sends on time).
    #[serde(default)]
    pub send_delay_ms: Vec<f64>,
    /// Session arrival rate per engine in experiment 5, sessions/s.
    pub per_instance_rate: f64,
    /// Engine profile of the Mooncake runs (its prompts need a large KV cache).
    pub mooncake_profile: String,
    /// Wall time of all simulated runs, s.
    pub wall_s: f64,
    /// ShareGPT conversations per validation run.
    pub validation_sessions: usize,
    /// Emulated time per wall time of the validation's live stack.
    pub validation_time_scale: f64,
    /// Repeats of each validation run (live and simulated).
    pub validation_repeats: usize,
    /// Router seeds per simulated validation run (pooled).
    pub validation_router_seeds: usize,
    /// A live validation run with a send later than this (emulated ms) was set aside for a host
    /// stall and run again.
    #[serde(default)]
    pub validation_max_send_delay_ms: f64,
    /// The fleet log's sync period of the simulated gateway replicas, ms.
    #[serde(default)]
    pub fleet_sync_ms: u64,
}

/// Median and maximum of quantiles evenly spaced from 0 to 100% (None if there are none).
pub fn median_and_max(quantiles: &[f64]) -> Option<(f64, f64)> {
    Some((*quantiles.get(quantiles.len() / 2)?, *quantiles.last()?))
}

/// The tolerances of the simulator's validation: TTFT P50 and P95 within this fraction ...
pub const VALIDATION_TTFT: f64 = 0.10;
/// ... and hit rate within this many points.
pub const VALIDATION_HIT: f64 = 0.02;

/// Where the figures go, and how the page embeds them.
pub(super) struct Figures {
    dir: PathBuf,
}

impl Figures {
    /// The SVG file of figure `name`.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.svg"))
    }

    /// Figure `name`'s SVG, inline (empty if it was not drawn).
    fn svg(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

/// A chart's error as the report's.
fn e(r: Res<()>) -> anyhow::Result<()> {
    r.map_err(|e| anyhow::anyhow!("figure: {e}"))
}

/// Runs of experiment `exp` at rate label `rate`.
fn is(exp: &'static str, rate: &'static str) -> impl Fn(&RunResult) -> bool {
    move |r: &RunResult| r.spec.experiment == exp && r.spec.rate_label == rate
}

/// Mean and (min, max) over repeats of `f` for runs matching `keep`, grouped by `key`.
fn agg<K: Ord + Clone>(
    runs: &[RunResult],
    keep: impl Fn(&RunResult) -> bool,
    key: impl Fn(&RunResult) -> K,
    f: impl Fn(&RunResult) -> f64,
) -> BTreeMap<K, (f64, f64, f64)> {
    let mut groups: BTreeMap<K, Vec<f64>> = BTreeMap::new();
    for r in runs.iter().filter(|r| keep(r)) {
        groups.entry(key(r)).or_default().push(f(r));
    }
    groups
        .into_iter()
        .map(|(k, v)| {
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            (k, (mean, lo, hi))
        })
        .collect()
}

/// The rows of an experiment: kvroute's policies in the order they ran, then the peer routers.
fn policies(runs: &[RunResult], exp: &str) -> Vec<String> {
    let mut seen: Vec<(bool, String)> = Vec::new();
    for r in runs.iter().filter(|r| r.spec.experiment == exp) {
        let p = (r.spec.peer.is_some(), r.spec.label());
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen.sort_by_key(|p| p.0);
    seen.into_iter().map(|p| p.1).collect()
}

fn runtime_value(r: &RunResult, key: &str) -> String {
    r.spec
        .runtime
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

fn fmt3(t: (f64, f64, f64)) -> String {
    format!("{:.3} <small>[{:.3}, {:.3}]</small>", t.0, t.1, t.2)
}

fn fmt0(t: (f64, f64, f64)) -> String {
    format!("{:.0} <small>[{:.0}, {:.0}]</small>", t.0, t.1, t.2)
}
/// The trace analysis of the workload `name`, if it was analysed.
fn bound<'a>(bounds: &'a [(String, Analysis)], name: &str) -> Option<&'a Analysis> {
    bounds.iter().find(|(n, _)| n == name).map(|(_, a)| a)
}

/// The engine counts of experiment `exp`'s runs, as a list.
fn engine_counts(runs: &[RunResult], exp: &str) -> String {
    let ns: std::collections::BTreeSet<usize> = runs
        .iter()
        .filter(|r| r.spec.experiment == exp)
        .map(|r| r.per_endpoint.len())
        .collect();
    ns.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A table of the runs matching `keep`, one row per `key`: means and [min, max] over repeats.
fn table(
    h: &mut String,
    runs: &[RunResult],
    title: &str,
    keep: &dyn Fn(&RunResult) -> bool,
    key: &dyn Fn(&RunResult) -> String,
) {
    let f = |g: &dyn Fn(&RunResult) -> f64| agg(runs, keep, key, g);
    let (hit, hc, p50, p95, p99, thr, imb, fail) = (
        f(&|r| r.hit_rate),
        f(&|r| r.hit_rate_client),
        f(&|r| r.ttft_ms[0]),
        f(&|r| r.ttft_ms[1]),
        f(&|r| r.ttft_ms[2]),
        f(&|r| r.throughput_rps),
        f(&|r| r.imbalance),
        f(&|r| r.failed as f64),
    );
    let (ep95, queue, idle) = (
        f(&|r| r.engine_ttft_ms[1]),
        f(&|r| r.queue_mean.iter().sum::<f64>() / r.queue_mean.len().max(1) as f64),
        f(&|r| r.kv_idle_before_evict_s.unwrap_or(f64::NAN)),
    );
    let _ = write!(h, "<h3>{title}</h3><table><tr><th>configuration</th><th>hit rate (engines)</th><th>hit rate (clients)</th><th>TTFT p50</th><th>p95</th><th>p99</th><th>engine TTFT p95</th><th>mean queue</th><th title=\"median over the sampled KV blocks evicted in the run of vLLM's kv_block_idle_before_evict_seconds: how long a block stayed cached after its last use\">KV kept (s)</th><th>req/s</th><th>imbalance</th><th>failed</th></tr>");
    for (k, v) in &hit {
        let g = |m: &BTreeMap<String, (f64, f64, f64)>| {
            m.get(k).copied().unwrap_or((f64::NAN, f64::NAN, f64::NAN))
        };
        let kept = match g(&idle).0 {
            x if x.is_finite() => format!("{x:.1}"),
            _ => "-".into(),
        };
        let _ = write!(h, "<tr><td>{k}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{kept}</td><td>{:.2}</td><td>{:.2}</td><td>{:.0}</td></tr>", fmt3(*v), fmt3(g(&hc)), fmt0(g(&p50)), fmt0(g(&p95)), fmt0(g(&p99)), fmt0(g(&ep95)), g(&queue).0, g(&thr).0, g(&imb).0, g(&fail).2);
    }
    let _ = write!(h, "</table>");
}

/// Writes the figures and `report.html` into `dir`; returns the report's path.
pub fn write(
    dir: &Path,
    runs: &[RunResult],
    bounds: &[(String, Analysis)],
    calibration: Option<&Calibration>,
    meta: &Meta,
) -> anyhow::Result<PathBuf> {
    let figs = Figures {
        dir: dir.join("figures"),
    };
    std::fs::create_dir_all(&figs.dir)?;
    exp1::figures(&figs, runs, bounds, meta.engines)?;
    bounds::figures(&figs, bounds)?;
    sweeps::figures(&figs, runs)?;
    scaling::figures(&figs, runs)?;
    if let Some(c) = calibration {
        calibration::figures(&figs, c)?;
    }

    // PNG beside every SVG.
    let opts = png_options();
    for entry in std::fs::read_dir(&figs.dir)?.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("svg") {
            continue;
        }
        let png = svg_to_png(&std::fs::read(&path)?, &opts)?;
        std::fs::write(path.with_extension("png"), png)?;
    }

    // The page.
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>kvroute study</title><style>\
         body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{background:#f3f3f3}} td:first-child,th:first-child{{text-align:left}}\
         small{{color:#777}} .fig{{display:inline-block;margin:6px}}</style></head><body>"
    );
    let _ = write!(h, "<h1>kvroute routing study ({})</h1>", meta.mode);
    h.push_str(&crate::criterion::html(
        runs,
        kvroute_core::PolicySettings::default().policy,
        meta.slo_ms,
    ));
    if meta.search_capped {
        let _ = write!(h, "<p><b>Note:</b> the sustainable-rate search reached its highest probe without exceeding the TTFT objective, so 1x is that probe, not a measured limit; at this run size the engines never saturated.</p>");
    }
    // The plan names the search's policy and the simulated engine counts; the runs say which.
    let search_policy = runs
        .iter()
        .find(|r| r.spec.experiment == "search")
        .map_or("round_robin", |r| r.spec.policy.as_str());
    // Experiments a plan repeats fewer times than the rest, as their runs show.
    let mut reps: BTreeMap<&str, usize> = BTreeMap::new();
    for r in runs {
        let e = reps.entry(r.spec.experiment.as_str()).or_default();
        *e = (*e).max(r.spec.repeat + 1);
    }
    let fewer: Vec<String> = reps
        .iter()
        .filter(|(e, n)| e.starts_with("exp") && !e.starts_with("exp5") && **n < meta.repeats)
        .map(|(e, n)| format!("{e} {n}"))
        .collect();
    let fewer = if fewer.is_empty() {
        String::new()
    } else {
        format!(" (fewer where the plan says: {})", fewer.join(", "))
    };
    let sizing = if meta.window_s > 0.0 {
        format!("A run's conversations arrive over {} s at its rate (rate x window of them), so a higher rate is more load: {} conversations per run at 1x.", meta.window_s, meta.sessions)
    } else {
        format!("{} conversations per run.", meta.sessions)
    };
    let probes = if meta.search_window_s > meta.window_s {
        format!(" The search's probes are longer, {} s of arrivals: queues build for about a conversation's lifetime, and a shorter probe would measure a ramp and overstate the rate the fleet sustains.", meta.search_window_s)
    } else {
        String::new()
    };
    let _ = write!(
        h,
        "<p>{} emulated engines (profile <code>{}</code>, a KV cache of {} tokens each, emulated time x{}) behind Envoy {} with kvroute {} and the sidecar. \
         Each run starts cold (engine caches reset, directory forgotten), sets its policy through Envoy runtime values, warms up where the plan asks, \
         and measures; {} repeats with seeds 1..{}{fewer}; values are mean <small>[min, max]</small>. Hit rate: the engines' \
         <code>prefix_cache_hits / prefix_cache_queries</code> deltas. KV kept: the median over the run of vLLM's <code>kv_block_idle_before_evict_seconds</code> \
         (the engines run with <code>--kv-cache-metrics</code>, 5% of block allocations sampled), how long a block stayed cached after its last use; \
         where it is shorter than the time between a conversation's turns, their histories are recomputed under any policy. Times are emulated ms. Sustainable rate (1x): {:.2} sessions/s, \
         the highest probed rate with P95 TTFT &le; {} ms under {search_policy} (doubling, then bisection; a probe within 10% of the objective is repeated with a second seed, and the mean of the two decides).{probes} {sizing} Study wall time {:.0} s.</p>",
        meta.engines, meta.profile, meta.kv_tokens_per_engine, meta.time_scale, meta.envoy, meta.kvroute, meta.repeats, meta.repeats, meta.sustainable_rate, meta.slo_ms, meta.wall_s
    );
    if let Some(c) = calibration {
        calibration::section(&mut h, &figs, c);
    }
    bounds::section(&mut h, &figs, bounds);
    exp1::section(&mut h, &figs, runs, bounds);
    sweeps::section(&mut h, &figs, runs);
    // Experiments of a user's plan beyond the four of the research plan: a table each.
    let known = |e: &str| {
        matches!(
            e,
            "search" | "exp1" | "exp2" | "exp3" | "exp4" | "probe" | "sim-search"
        ) || e.starts_with("exp5")
            || e.starts_with("val-")
    };
    let others: std::collections::BTreeSet<&str> = runs
        .iter()
        .map(|r| r.spec.experiment.as_str())
        .filter(|e| !known(e))
        .collect();
    for exp in others {
        let _ = write!(h, "<h2>Experiment {exp} (from the plan)</h2>");
        table(
            &mut h,
            runs,
            "by rate, policy and runtime values",
            &|r| r.spec.experiment == exp,
            &|r| {
                let rt: Vec<String> = r
                    .spec
                    .runtime
                    .iter()
                    .map(|(k, v)| format!("{}={v}", k.trim_start_matches("kvroute.")))
                    .collect();
                format!(
                    "{} {} {} {}",
                    r.spec.workload,
                    r.spec.rate_label,
                    r.spec.label(),
                    rt.join(",")
                )
            },
        );
    }
    if let Some(sm) = &meta.simulator {
        scaling::section(&mut h, &figs, runs, sm);
    }
    table(
        &mut h,
        runs,
        &format!("Sustainable-rate search ({search_policy})"),
        &|r| r.spec.experiment == "search",
        &|r| format!("{:>8.3} sessions/s", r.spec.rate),
    );
    // Consistency: engine counters against the clients' usage.
    let worst = runs
        .iter()
        .map(|r| (r.hit_rate - r.hit_rate_client).abs())
        .fold(0.0f64, f64::max);
    let _ = write!(h, "<h2>Consistency</h2><p>Largest difference between the engines' hit rate and the clients' <code>cached_tokens</code> share over all {} runs: {:.4}. Failed requests in all: {}.</p>", runs.len(), worst, runs.iter().map(|r| r.failed).sum::<usize>());
    let _ = write!(
        h,
        "<h2>Run metadata</h2><pre>{}</pre></body></html>",
        serde_json::to_string_pretty(meta).unwrap_or_default()
    );
    let path = dir.join("report.html");
    std::fs::write(&path, h)?;
    let _ = quantile(&[], 0.5);
    Ok(path)
}
