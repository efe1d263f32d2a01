//! Figures (SVG) and the self-contained HTML report of a study.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::analyze::Analysis;
use crate::calibrate::Calibration;
use crate::study::{quantile, RunResult, VALIDATION_STALLED};

/// What the report says about how it was made.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// reduced or full.
    pub mode: String,
    /// Engine profile.
    pub profile: String,
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

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;
/// A named line: (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);
/// A bar series: name, one value per category, one (low, high) range per category.
type BarSeries = (String, Vec<f64>, Vec<(f64, f64)>);
/// Mean, min and max over repeats, per key.
type Spread = BTreeMap<String, (f64, f64, f64)>;

fn color(i: usize) -> RGBColor {
    let p = Palette99::pick(i).to_rgba();
    RGBColor(p.0, p.1, p.2)
}

fn range(vals: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    (lo - (hi - lo) * pad, hi + (hi - lo) * pad)
}

/// How figures are rendered to PNG: the system's fonts, with `sans-serif` mapped to one of them.
pub fn png_options() -> resvg::usvg::Options<'static> {
    let mut fonts = resvg::usvg::fontdb::Database::new();
    fonts.load_system_fonts();
    // The figures ask for the generic `sans-serif`, which fontdb maps to Arial unless told
    // otherwise: without Arial every label vanished from the PNGs. Map it to a sans face this
    // machine has (the bootstrap installs DejaVu where none is).
    if let Some(family) = sans_family(&fonts) {
        fonts.set_sans_serif_family(family);
    }
    resvg::usvg::Options {
        fontdb: std::sync::Arc::new(fonts),
        ..Default::default()
    }
}

/// An SVG figure as PNG bytes, at twice its size.
pub fn svg_to_png(svg: &[u8], opts: &resvg::usvg::Options<'_>) -> anyhow::Result<Vec<u8>> {
    let tree = resvg::usvg::Tree::from_data(svg, opts)?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width() * 2, size.height() * 2)
        .ok_or_else(|| anyhow::anyhow!("empty figure"))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(2.0, 2.0),
        &mut pixmap.as_mut(),
    );
    Ok(pixmap.encode_png()?)
}

/// The family to draw `sans-serif` text with: DejaVu Sans, Liberation Sans or Noto Sans where
/// installed, else any family whose name says sans, else the first face's.
fn sans_family(fonts: &resvg::usvg::fontdb::Database) -> Option<String> {
    let names: Vec<String> = fonts
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .collect();
    ["DejaVu Sans", "Liberation Sans", "Noto Sans"]
        .iter()
        .find(|want| names.iter().any(|n| n == *want))
        .map(|s| (*s).to_string())
        .or_else(|| names.iter().find(|n| n.contains("Sans")).cloned())
        .or_else(|| names.first().cloned())
}

/// A tick label for `v` on an axis spanning `span`: no decimals past 10 ("900", not "900.0"),
/// then as many as the span needs.
fn tick(v: f64, span: f64) -> String {
    let decimals = if span >= 10.0 {
        0
    } else if span >= 1.0 {
        1
    } else {
        2
    };
    format!("{v:.decimals$}")
}

/// A line chart of `series` (name, points) as SVG at `path`; `y0` starts the y axis at 0.
pub fn lines(path: &Path, title: &str, xl: &str, yl: &str, series: &[Series], y0: bool) -> Res<()> {
    lines_with(path, title, xl, yl, series, y0, false)
}

/// [`lines`] whose x values are log2 of the quantity: ticks at whole powers, labelled 2, 4, ... .
pub fn lines_log2x(
    path: &Path,
    title: &str,
    xl: &str,
    yl: &str,
    series: &[Series],
    y0: bool,
) -> Res<()> {
    lines_with(path, title, xl, yl, series, y0, true)
}

fn lines_with(
    path: &Path,
    title: &str,
    xl: &str,
    yl: &str,
    series: &[Series],
    y0: bool,
    log2x: bool,
) -> Res<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x0, x1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)), 0.02);
    let (ya, yb) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)), 0.05);
    let ya = if y0 { 0f64.min(ya) } else { ya };
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, ya..yb)?;
    let (xspan, yspan) = (x1 - x0, yb - ya);
    let xfmt = move |x: &f64| {
        if log2x {
            format!("{:.0}", x.exp2())
        } else {
            tick(*x, xspan)
        }
    };
    let yfmt = move |y: &f64| tick(*y, yspan);
    let mut mesh = c.configure_mesh();
    mesh.x_desc(xl)
        .y_desc(yl)
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt);
    if log2x {
        // One tick per power of two in range.
        mesh.x_labels((xspan.round() as usize).saturating_add(1).max(2));
    }
    mesh.draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let col = color(i);
        c.draw_series(LineSeries::new(pts.iter().copied(), col.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2)));
        if pts.len() < 12 {
            c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, col.filled())))?;
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Grouped bars: one group per category, one bar per series; optional (lo, hi) ranges and
/// horizontal reference lines per category.
fn bars(
    path: &Path,
    title: &str,
    yl: &str,
    categories: &[String],
    series: &[BarSeries],
    refs: &[(usize, f64)],
) -> Res<()> {
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = series.len().max(1) as f64;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().copied().chain(s.2.iter().map(|r| r.1)))
        .chain(refs.iter().map(|r| r.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..categories.len() as f64, 0f64..ymax.max(1e-9))?;
    let cats = categories.to_vec();
    let yspan = ymax.max(1e-9);
    c.configure_mesh()
        .disable_x_mesh()
        .y_label_formatter(&move |y| tick(*y, yspan))
        .x_labels(categories.len().max(1) * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                cats.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(yl)
        .draw()?;
    for (si, (name, vals, errs)) in series.iter().enumerate() {
        let col = color(si);
        let w = 0.8 / n;
        c.draw_series(vals.iter().enumerate().map(|(ci, v)| {
            let x0 = ci as f64 + 0.1 + w * si as f64;
            Rectangle::new([(x0, 0.0), (x0 + w * 0.9, *v)], col.filled())
        }))?
        .label(name.as_str())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled()));
        c.draw_series(
            errs.iter()
                .enumerate()
                .filter(|(_, e)| e.0.is_finite())
                .map(|(ci, e)| {
                    let x = ci as f64 + 0.1 + w * si as f64 + w * 0.45;
                    PathElement::new(vec![(x, e.0), (x, e.1)], BLACK.stroke_width(1))
                }),
        )?;
    }
    for (ci, v) in refs {
        let x = *ci as f64;
        c.draw_series(std::iter::once(PathElement::new(
            vec![(x + 0.05, *v), (x + 0.95, *v)],
            BLACK.stroke_width(2),
        )))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn heatmap(
    path: &Path,
    title: &str,
    xs: &[f64],
    ys: &[f64],
    v: &BTreeMap<(usize, usize), f64>,
) -> Res<()> {
    let root = SVGBackend::new(path, (560, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) = range(v.values().copied(), 0.0);
    let xl: Vec<f64> = xs.to_vec();
    let yl: Vec<f64> = ys.to_vec();
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xs.len() as f64, 0f64..ys.len() as f64)?;
    c.configure_mesh()
        .disable_mesh()
        .x_labels(xs.len() * 2 + 1)
        .y_labels(ys.len() * 2 + 1)
        .x_label_formatter(&move |x| label_at(&xl, *x))
        .y_label_formatter(&move |y| label_at(&yl, *y))
        .x_desc("alpha (cache affinity)")
        .y_desc("beta (load)")
        .draw()?;
    for ((i, j), val) in v {
        let t = if hi > lo { (val - lo) / (hi - lo) } else { 0.0 };
        let col = RGBColor(
            (40.0 + 215.0 * t) as u8,
            (90.0 + 60.0 * (1.0 - t)) as u8,
            (230.0 * (1.0 - t)) as u8,
        );
        let (x, y) = (*i as f64, *j as f64);
        c.draw_series(std::iter::once(Rectangle::new(
            [(x, y), (x + 1.0, y + 1.0)],
            col.filled(),
        )))?;
        c.draw_series(std::iter::once(Text::new(
            format!("{val:.0}"),
            (x + 0.3, y + 0.55),
            ("sans-serif", 14).into_font().color(&WHITE),
        )))?;
    }
    root.present()?;
    Ok(())
}

fn label_at(vals: &[f64], x: f64) -> String {
    if (x - x.floor() - 0.5).abs() < 0.01 {
        vals.get(x.floor() as usize)
            .map(|v| format!("{v}"))
            .unwrap_or_default()
    } else {
        String::new()
    }
}

fn scatter(path: &Path, title: &str, xl: &str, yl: &str, pts: &[(String, f64, f64)]) -> Res<()> {
    let root = SVGBackend::new(path, (640, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x0, x1) = range(pts.iter().map(|p| p.1), 0.1);
    let (y0, y1) = range(pts.iter().map(|p| p.2), 0.1);
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let (xspan, yspan) = (x1 - x0, y1 - y0);
    c.configure_mesh()
        .x_desc(xl)
        .y_desc(yl)
        .x_label_formatter(&move |x| tick(*x, xspan))
        .y_label_formatter(&move |y| tick(*y, yspan))
        .draw()?;
    c.draw_series(
        pts.iter()
            .map(|p| Circle::new((p.1, p.2), 4, color(0).filled())),
    )?;
    c.draw_series(
        pts.iter()
            .map(|p| Text::new(p.0.clone(), (p.1, p.2), ("sans-serif", 11).into_font())),
    )?;
    root.present()?;
    Ok(())
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

/// The rate labels of experiment 1's runs, in rate order.
fn exp1_rates(runs: &[RunResult]) -> Vec<String> {
    let mut v: Vec<(f64, String)> = Vec::new();
    for r in runs.iter().filter(|r| r.spec.experiment == "exp1") {
        if !v.iter().any(|(_, l)| *l == r.spec.rate_label) {
            v.push((r.spec.rate, r.spec.rate_label.clone()));
        }
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v.into_iter().map(|(_, l)| l).collect()
}

/// A lead in hit rate this small (2 points) is within the spread of the repeats: neither holds
/// nor fails the plan's expectation.
const LEAD_NOISE: f64 = 0.02;

/// What experiment 1 shows against the research plan's expectation (session_hash and
/// load_cache_aware above round_robin and jsq), per rate, with each rate's oracle bound and
/// fleet-capacity estimate: measured figures only, and the reading that follows from them.
fn exp1_observations(h: &mut String, runs: &[RunResult], bounds: &[(String, Analysis)]) {
    let hit = agg(
        runs,
        |r| r.spec.experiment == "exp1",
        |r| (r.spec.rate_label.clone(), r.spec.label()),
        |r| r.hit_rate,
    );
    let mean = |rate: &str, p: &str| {
        hit.get(&(rate.to_string(), p.to_string()))
            .map_or(f64::NAN, |v| v.0)
    };
    let _ = write!(h, "<p><b>Against the plan's expectation</b> (session_hash and load_cache_aware reach a higher hit rate than round_robin and jsq):</p><table><tr><th>rate</th><th>session_hash</th><th>load_cache_aware</th><th>round_robin</th><th>jsq</th><th>lead (points)</th><th>fleet-capacity estimate</th><th>oracle, infinite cache</th><th>holds</th></tr>");
    for rate in exp1_rates(runs) {
        let (sh, lca) = (mean(&rate, "session_hash"), mean(&rate, "load_cache_aware"));
        let (rr, jsq) = (mean(&rate, "round_robin"), mean(&rate, "jsq"));
        let lead = sh.min(lca) - rr.max(jsq);
        let b = bound(bounds, &format!("sharegpt {rate}"));
        let (capacity, infinite) = b.map_or((f64::NAN, f64::NAN), |a| {
            (a.oracle_capacity, a.oracle_infinite)
        });
        let _ = write!(h, "<tr><td>{rate}</td><td>{sh:.3}</td><td>{lca:.3}</td><td>{rr:.3}</td><td>{jsq:.3}</td><td>{:+.1}</td><td>{capacity:.3}</td><td>{infinite:.3}</td><td>{}</td></tr>",
            lead * 100.0, if lead > LEAD_NOISE { "yes" } else if lead >= -LEAD_NOISE { "within noise" } else { "no" });
    }
    let _ = write!(h, "</table><p>The oracle with an infinite cache bounds every policy. The fleet-capacity estimate (trace analysis: one LRU over all engines' blocks, requests in arrival order) is what perfect placement would keep with these engines' KV caches if every request were served as it arrives; it is an estimate, not a bound (queued requests are served later, and LRU is not the best replacement), so policies can land slightly above it where it is lowest. Where it is low, the conversations in flight do not fit in the caches: prefixes are evicted during the think time between turns whatever the placement, every policy's hit rate falls toward it and the policies' differences shrink with the headroom. A lead of two points or less is within the spread of the repeats (tables below): \"within noise\".</p>");
}

/// The trace analysis of the workload `name`, if it was analysed.
fn bound<'a>(bounds: &'a [(String, Analysis)], name: &str) -> Option<&'a Analysis> {
    bounds.iter().find(|(n, _)| n == name).map(|(_, a)| a)
}

/// Writes the figures and `report.html` into `dir`; returns the report's path.
pub fn write(
    dir: &Path,
    runs: &[RunResult],
    bounds: &[(String, Analysis)],
    calibration: Option<&Calibration>,
    meta: &Meta,
) -> anyhow::Result<PathBuf> {
    let figs = dir.join("figures");
    std::fs::create_dir_all(&figs)?;
    let fig = |name: &str| figs.join(format!("{name}.svg"));
    let e = |r: Res<()>| r.map_err(|e| anyhow::anyhow!("figure: {e}"));
    let pols = policies(runs, "exp1");
    let is = |exp: &'static str, rate: &'static str| {
        move |r: &RunResult| r.spec.experiment == exp && r.spec.rate_label == rate
    };

    // 1. TTFT CDF per policy, ShareGPT at 1x.
    let cdf: Vec<Series> = pols
        .iter()
        .map(|p| {
            let mut t: Vec<f64> = runs
                .iter()
                .filter(|r| is("exp1", "1x")(r) && r.spec.label() == *p)
                .flat_map(|r| r.ttfts.clone())
                .collect();
            t.sort_by(f64::total_cmp);
            let n = t.len().max(1) as f64;
            (
                p.clone(),
                t.iter()
                    .enumerate()
                    .map(|(i, v)| (*v, (i + 1) as f64 / n))
                    .collect(),
            )
        })
        .collect();
    e(lines(
        &fig("ttft_cdf"),
        "TTFT CDF, ShareGPT at 1x (all repeats)",
        "TTFT (ms, emulated)",
        "fraction of requests",
        &cdf,
        true,
    ))?;

    // 2. Hit rate by policy, workload and rate, with the capacity estimate of each.
    let groups: Vec<(String, Spread)> = exp1_rates(runs)
        .into_iter()
        .map(|rate| {
            let m = agg(
                runs,
                |r| r.spec.experiment == "exp1" && r.spec.rate_label == rate,
                |r| r.spec.label(),
                |r| r.hit_rate,
            );
            (format!("sharegpt {rate}"), m)
        })
        .chain(std::iter::once((
            "rag".to_string(),
            agg(
                runs,
                |r| r.spec.experiment == "exp2",
                |r| r.spec.label(),
                |r| r.hit_rate,
            ),
        )))
        .collect();
    let cats: Vec<String> = groups
        .iter()
        .map(|(n, _)| n.replace("sharegpt", "ShareGPT").replace("rag", "RAG"))
        .collect();
    let series: Vec<BarSeries> = pols
        .iter()
        .map(|p| {
            let v: Vec<(f64, f64, f64)> = groups
                .iter()
                .map(|(_, m)| m.get(p).copied().unwrap_or((f64::NAN, f64::NAN, f64::NAN)))
                .collect();
            (
                p.clone(),
                v.iter().map(|x| x.0).collect(),
                v.iter().map(|x| (x.1, x.2)).collect(),
            )
        })
        .collect();
    let lines_at: Vec<(usize, f64)> = groups
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (i, bound(bounds, n).map_or(f64::NAN, |a| a.oracle_capacity)))
        .collect();
    e(bars(
        &fig("hit_rate"),
        "Engine prefix hit rate by policy (line: fleet-capacity estimate, perfect placement)",
        "hit rate",
        &cats,
        &series,
        &lines_at,
    ))?;

    // 2b. Trace analysis: how much of each workload's prompt tokens could ever be reused, and from
    // where (the bounds every policy is measured against).
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

    // 3. Throughput vs latency.
    let tl: Vec<Series> = pols
        .iter()
        .map(|p| {
            let pts = exp1_rates(runs)
                .iter()
                .filter_map(|rate| {
                    let sel: Vec<&RunResult> = runs
                        .iter()
                        .filter(|r| {
                            r.spec.experiment == "exp1"
                                && r.spec.rate_label == *rate
                                && r.spec.label() == *p
                        })
                        .collect();
                    if sel.is_empty() {
                        return None;
                    }
                    let k = sel.len() as f64;
                    Some((
                        sel.iter().map(|r| r.throughput_rps).sum::<f64>() / k,
                        sel.iter().map(|r| r.ttft_ms[1]).sum::<f64>() / k,
                    ))
                })
                .collect();
            (p.clone(), pts)
        })
        .collect();
    e(lines(
        &fig("throughput_latency"),
        "Throughput vs P95 TTFT, ShareGPT at 0.5x / 1x / 2x",
        "requests/s (emulated)",
        "P95 TTFT (ms)",
        &tl,
        true,
    ))?;

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

    // Experiment 5: P95 TTFT and hit rate against N, per policy (simulated).
    let e5 = |f: &dyn Fn(&RunResult) -> f64| {
        agg(
            runs,
            |r| r.spec.experiment == "exp5",
            |r| (r.spec.label(), r.per_endpoint.len()),
            f,
        )
    };
    let (e5_p95, e5_hit) = (e5(&|r| r.ttft_ms[1]), e5(&|r| r.hit_rate));
    if !e5_p95.is_empty() {
        let pols5 = policies(runs, "exp5");
        let by_n = |m: &BTreeMap<(String, usize), (f64, f64, f64)>| -> Vec<Series> {
            pols5
                .iter()
                .map(|p| {
                    (
                        p.clone(),
                        m.iter()
                            .filter(|((q, _), _)| q == p)
                            .map(|((_, n), v)| ((*n as f64).log2(), v.0))
                            .collect(),
                    )
                })
                .collect()
        };
        e(lines_log2x(
            &fig("exp5_p95_vs_n"),
            "Experiment 5 (simulated): P95 TTFT by engines, fixed load per engine",
            "engines (log scale)",
            "P95 TTFT (ms)",
            &by_n(&e5_p95),
            true,
        ))?;
        e(lines_log2x(
            &fig("exp5_hit_vs_n"),
            "Experiment 5 (simulated): prefix hit rate by engines",
            "engines (log scale)",
            "hit rate",
            &by_n(&e5_hit),
            true,
        ))?;
    }

    // Experiment 5, several gateways: hit rate and P95 TTFT against G, shared log or independent.
    let gw = |f: &dyn Fn(&RunResult) -> f64| {
        agg(
            runs,
            |r| r.spec.experiment.starts_with("exp5-gateways-"),
            |r| {
                let g: usize = r
                    .spec
                    .rate_label
                    .trim_start_matches("G=")
                    .parse()
                    .unwrap_or(1);
                (r.spec.experiment.clone(), g)
            },
            f,
        )
    };
    let (gw_p95, gw_hit) = (gw(&|r| r.ttft_ms[1]), gw(&|r| r.hit_rate));
    if !gw_p95.is_empty() {
        // One gateway (run once, as shared) starts both lines.
        let series = |m: &BTreeMap<(String, usize), (f64, f64, f64)>| -> Vec<Series> {
            let one = m.get(&("exp5-gateways-shared".to_string(), 1)).map(|v| v.0);
            [
                ("exp5-gateways-shared", "shared fleet log (Redis)"),
                ("exp5-gateways-independent", "independent directories"),
            ]
            .iter()
            .map(|(e, name)| {
                let mut pts: Vec<(f64, f64)> = one.map(|v| (0.0, v)).into_iter().collect();
                pts.extend(
                    m.iter()
                        .filter(|((x, g), _)| x == e && *g > 1)
                        .map(|((_, g), v)| ((*g as f64).log2(), v.0)),
                );
                (name.to_string(), pts)
            })
            .collect()
        };
        e(lines_log2x(
            &fig("exp5_gateways_p95"),
            "Several gateways (simulated): P95 TTFT by gateway replicas",
            "gateway replicas (log scale)",
            "P95 TTFT (ms)",
            &series(&gw_p95),
            true,
        ))?;
        e(lines_log2x(
            &fig("exp5_gateways_hit"),
            "Several gateways (simulated): prefix hit rate by gateway replicas",
            "gateway replicas (log scale)",
            "hit rate",
            &series(&gw_hit),
            true,
        ))?;
    }

    // 7. Load imbalance per policy (median and range over repeats).
    let imb = agg(runs, is("exp1", "1x"), |r| r.spec.label(), |r| r.imbalance);
    let imb_series = vec![(
        "imbalance".to_string(),
        pols.iter()
            .map(|p| imb.get(p).map_or(f64::NAN, |v| v.0))
            .collect(),
        pols.iter()
            .map(|p| imb.get(p).map_or((f64::NAN, f64::NAN), |v| (v.1, v.2)))
            .collect(),
    )];
    e(bars(
        &fig("imbalance"),
        "Load imbalance (max/mean requests per engine), ShareGPT 1x: mean and range",
        "max / mean",
        &pols,
        &imb_series,
        &[],
    ))?;

    // 8. Hit rate over time (repeat 0, rolling mean of 10 requests).
    let over: Vec<Series> = pols
        .iter()
        .filter_map(|p| {
            let r = runs
                .iter()
                .find(|r| is("exp1", "1x")(r) && r.spec.label() == *p && r.spec.repeat == 0)?;
            let w = 10usize;
            let pts = r
                .hit_timeline
                .windows(w.min(r.hit_timeline.len()).max(1))
                .map(|win| {
                    (
                        win.last().map_or(0.0, |x| x.0) / 1000.0,
                        win.iter().map(|x| x.1).sum::<f64>() / win.len() as f64,
                    )
                })
                .collect();
            Some((p.clone(), pts))
        })
        .collect();
    e(lines(
        &fig("hit_over_time"),
        "Cached share of each prompt over time (ShareGPT 1x, rolling mean of 10)",
        "time (s, emulated)",
        "cached / prompt tokens",
        &over,
        true,
    ))?;

    // 9. TTFT of hits vs misses.
    let hm_series: Vec<BarSeries> = ["hit (cached > half)", "miss"]
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let m = agg(
                runs,
                is("exp1", "1x"),
                |r| r.spec.label(),
                |r| r.ttft_hit_miss_ms.get(k).copied().unwrap_or(f64::NAN),
            );
            (
                name.to_string(),
                pols.iter()
                    .map(|p| m.get(p).map_or(f64::NAN, |v| v.0))
                    .collect(),
                vec![],
            )
        })
        .collect();
    e(bars(
        &fig("ttft_hit_miss"),
        "Mean TTFT of cache hits and misses, ShareGPT 1x",
        "TTFT (ms)",
        &pols,
        &hm_series,
        &[],
    ))?;

    // 10. Prefix-match length distribution.
    let dist: Vec<Series> = pols
        .iter()
        .map(|p| {
            let mut bins = [0f64; 10];
            let mut n = 0.0f64;
            for r in runs
                .iter()
                .filter(|r| is("exp1", "1x")(r) && r.spec.label() == *p)
            {
                for (_, f) in &r.hit_timeline {
                    let b = ((f * 10.0).floor() as usize).min(9);
                    if let Some(x) = bins.get_mut(b) {
                        *x += 1.0;
                    }
                    n += 1.0;
                }
            }
            (
                p.clone(),
                bins.iter()
                    .enumerate()
                    .map(|(i, c)| (i as f64 / 10.0 + 0.05, c / n.max(1.0)))
                    .collect(),
            )
        })
        .collect();
    e(lines(
        &fig("match_distribution"),
        "Distribution of the cached share of each prompt, ShareGPT 1x",
        "cached / prompt tokens (bin centre)",
        "fraction of requests",
        &dist,
        true,
    ))?;

    // 11. Requests per engine.
    let per: Vec<BarSeries> = (0..meta.engines)
        .map(|ei| {
            let m = agg(
                runs,
                is("exp1", "1x"),
                |r| r.spec.label(),
                |r| r.per_endpoint.get(ei).copied().unwrap_or(0) as f64,
            );
            (
                format!("engine{ei}"),
                pols.iter()
                    .map(|p| m.get(p).map_or(f64::NAN, |v| v.0))
                    .collect(),
                pols.iter()
                    .map(|p| m.get(p).map_or((f64::NAN, f64::NAN), |v| (v.1, v.2)))
                    .collect(),
            )
        })
        .collect();
    e(bars(
        &fig("requests_per_engine"),
        "Requests per engine, ShareGPT 1x: mean and range over repeats",
        "requests",
        &pols,
        &per,
        &[],
    ))?;

    // Calibration of the engine profile.
    if let Some(c) = calibration {
        let ttft = vec![
            (
                "miss".to_string(),
                c.prefill
                    .iter()
                    .map(|p| (p.tokens as f64, p.miss_s * 1e3))
                    .collect(),
            ),
            (
                "hit (repeat)".to_string(),
                c.prefill
                    .iter()
                    .map(|p| (p.tokens as f64, p.hit_s * 1e3))
                    .collect(),
            ),
        ];
        e(lines(
            &fig("calibration_ttft"),
            "Calibration: TTFT of a miss and of a hit by prompt length",
            "prompt tokens",
            "TTFT (ms)",
            &ttft,
            true,
        ))?;
        let dec = vec![(
            "decode".to_string(),
            c.decode
                .iter()
                .map(|d| (d.batch as f64, d.step_s * 1e3))
                .collect(),
        )];
        e(lines(
            &fig("calibration_decode"),
            "Calibration: decode time per token by batch size",
            "concurrent sequences",
            "ms per token",
            &dec,
            true,
        ))?;
    }

    // PNG beside every SVG.
    let opts = png_options();
    for entry in std::fs::read_dir(&figs)?.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("svg") {
            continue;
        }
        let png = svg_to_png(&std::fs::read(&path)?, &opts)?;
        std::fs::write(path.with_extension("png"), png)?;
    }

    // The page.
    let svg = |name: &str| std::fs::read_to_string(fig(name)).unwrap_or_default();
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
    let engine_counts = |exp: &str| -> String {
        let ns: std::collections::BTreeSet<usize> = runs
            .iter()
            .filter(|r| r.spec.experiment == exp)
            .map(|r| r.per_endpoint.len())
            .collect();
        ns.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
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
        "<p>{} emulated engines (profile <code>{}</code>, emulated time x{}) behind Envoy {} with kvroute {} and the sidecar. \
         Each run starts cold (engine caches reset, directory forgotten), sets its policy through Envoy runtime values, warms up where the plan asks, \
         and measures; {} repeats with seeds 1..{}{fewer}; values are mean <small>[min, max]</small>. Hit rate: the engines' \
         <code>prefix_cache_hits / prefix_cache_queries</code> deltas. Times are emulated ms. Sustainable rate (1x): {:.2} sessions/s, \
         the highest probed rate with P95 TTFT &le; {} ms under {search_policy} (doubling, then bisection).{probes} {sizing} Study wall time {:.0} s.</p>",
        meta.engines, meta.profile, meta.time_scale, meta.envoy, meta.kvroute, meta.repeats, meta.repeats, meta.sustainable_rate, meta.slo_ms, meta.wall_s
    );
    if let Some(c) = calibration {
        let _ = write!(h, "<h2>Calibration of the engine profile</h2><p>Measured with <code>kvroute-calibrate</code>'s method on an engine of the same profile at real time (medians of three; hit = the same prompt again).</p><div class=fig>{}</div><div class=fig>{}</div><table><tr><th>prompt tokens</th><th>miss TTFT ms</th><th>hit TTFT ms</th><th>cached tokens</th></tr>", svg("calibration_ttft"), svg("calibration_decode"));
        for p in &c.prefill {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
                p.tokens,
                p.miss_s * 1e3,
                p.hit_s * 1e3,
                p.hit_cached
            );
        }
        let _ = write!(
            h,
            "</table><table><tr><th>batch</th><th>decode ms per token</th></tr>"
        );
        for d in &c.decode {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.2}</td></tr>",
                d.batch,
                d.step_s * 1e3
            );
        }
        let _ = write!(h, "</table>");
    }
    let _ = write!(h, "<h2>Trace analysis and oracle bounds</h2><p>For each measured workload (seed 1), rebuilt as the engines tokenize it: the hit rate no router can beat with an infinite cache (each request hits the longest run of leading blocks any earlier request computed), the same with the fleet's capacity (one LRU of all engines' blocks in arrival order: perfect placement; an estimate rather than a bound, since engines serve queued requests later and LRU is not the best replacement), and the share of prompt tokens reusable from the same session and from other sessions (infinite cache).</p><div class=fig>{}</div><table>", svg("prefix_overlap"));
    let _ = write!(h, "<tr><th>workload</th><th>requests</th><th>prompt tokens</th><th>oracle, infinite cache</th><th>fleet capacity (2 x 711 blocks), estimate</th><th>within session</th><th>across sessions</th></tr>");
    for (name, a) in bounds {
        let _ = write!(h, "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>", a.requests, a.prompt_tokens, a.oracle_infinite, a.oracle_capacity, a.within_session, a.across_sessions);
    }
    let _ = write!(h, "</table>");
    let table = |h: &mut String,
                 title: &str,
                 keep: &dyn Fn(&RunResult) -> bool,
                 key: &dyn Fn(&RunResult) -> String| {
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
        let (ep95, queue) = (
            f(&|r| r.engine_ttft_ms[1]),
            f(&|r| r.queue_mean.iter().sum::<f64>() / r.queue_mean.len().max(1) as f64),
        );
        let _ = write!(h, "<h3>{title}</h3><table><tr><th>configuration</th><th>hit rate (engines)</th><th>hit rate (clients)</th><th>TTFT p50</th><th>p95</th><th>p99</th><th>engine TTFT p95</th><th>mean queue</th><th>req/s</th><th>imbalance</th><th>failed</th></tr>");
        for (k, v) in &hit {
            let g = |m: &BTreeMap<String, (f64, f64, f64)>| {
                m.get(k).copied().unwrap_or((f64::NAN, f64::NAN, f64::NAN))
            };
            let _ = write!(h, "<tr><td>{k}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.0}</td></tr>", fmt3(*v), fmt3(g(&hc)), fmt0(g(&p50)), fmt0(g(&p95)), fmt0(g(&p99)), fmt0(g(&ep95)), g(&queue).0, g(&thr).0, g(&imb).0, g(&fail).2);
        }
        let _ = write!(h, "</table>");
    };
    let _ = write!(h, "<h2>Experiment 1: policies on ShareGPT multi-turn</h2><div class=fig>{}</div><div class=fig>{}</div><div class=fig>{}</div><div class=fig>{}</div><div class=fig>{}</div><div class=fig>{}</div><div class=fig>{}</div><div class=fig>{}</div>",
        svg("ttft_cdf"), svg("hit_rate"), svg("throughput_latency"), svg("imbalance"), svg("hit_over_time"), svg("ttft_hit_miss"), svg("match_distribution"), svg("requests_per_engine"));
    exp1_observations(&mut h, runs, bounds);
    for rate in exp1_rates(runs) {
        table(
            &mut h,
            &format!("ShareGPT at {rate}"),
            &|r| r.spec.experiment == "exp1" && r.spec.rate_label == rate,
            &|r| r.spec.label(),
        );
    }
    let _ = write!(h, "<h2>Experiment 2: RAG, shared system prompts</h2>");
    table(
        &mut h,
        "RAG by policy",
        &|r| r.spec.experiment == "exp2",
        &|r| r.spec.label(),
    );
    // The rate of a sweep, as its runs name it.
    let rate_of = |exp: &str| {
        runs.iter()
            .find(|r| r.spec.experiment == exp)
            .map_or_else(String::new, |r| r.spec.rate_label.clone())
    };
    let _ = write!(h, "<h2>Experiment 3: alpha / beta sweep (load_cache_aware, ShareGPT {})</h2><div class=fig>{}</div><div class=fig>{}</div>", rate_of("exp3"), svg("alpha_beta_p95"), svg("pareto"));
    table(
        &mut h,
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
        &mut h,
        "publish interval (ms)",
        &|r| r.spec.experiment == "exp4",
        &|r| format!("{:>6}", runtime_value(r, "kvroute.publish_interval_ms")),
    );
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
        validation_section(&mut h, runs, sm);
        let _ = write!(h, "<h2>Experiment 5: scaling the number of engines (simulated)</h2><p>The discrete-event simulator (the emulator's engine model, kvroute-core's policies and directory, the same workloads) at N = {} engines, {:.3} ShareGPT sessions/s per engine, the sessions scaled with N: half the highest rate per engine at which round_robin kept P95 TTFT within the objective at N = 2 (searched by doubling, then bisection). The staleness and alpha/beta sweeps are repeated at N = {}, and the Mooncake trace runs at N = {} on the <code>{}</code> profile (its prompts, up to 40k tokens, need a large KV cache).</p><div class=fig>{}</div><div class=fig>{}</div>",
            engine_counts("exp5"), sm.per_instance_rate, engine_counts("exp5-ab"), engine_counts("exp5-mooncake"), sm.mooncake_profile, svg("exp5_p95_vs_n"), svg("exp5_hit_vs_n"));
        if runs
            .iter()
            .any(|r| r.spec.experiment.starts_with("exp5-gateways-"))
        {
            let _ = write!(h, "<h3>Several gateway replicas</h3><p>G Envoy replicas in front of N = {} engines, the default policy, the same ShareGPT sessions and load as experiment 5; each request goes to a replica at random (a plain L4 balancer, no affinity). <em>Shared</em>: the replicas exchange their decisions and in-flight counts through the fleet log every {} ms, as the filter's <code>fleet</code> section does live (docs/deployment.md); <em>independent</em>: each keeps its own directory and counts.</p><div class=fig>{}</div><div class=fig>{}</div>",
                engine_counts("exp5-gateways-shared"), sm.fleet_sync_ms, svg("exp5_gateways_hit"), svg("exp5_gateways_p95"));
            table(
                &mut h,
                "Gateway replicas: shared fleet log",
                &|r| r.spec.experiment == "exp5-gateways-shared",
                &|r| r.spec.rate_label.clone(),
            );
            table(
                &mut h,
                "Gateway replicas: independent directories",
                &|r| r.spec.experiment == "exp5-gateways-independent",
                &|r| r.spec.rate_label.clone(),
            );
        }
        table(
            &mut h,
            "Load search at N=2 (round_robin): sessions/s per engine",
            &|r| r.spec.experiment == "sim-search",
            &|r| format!("{:>8.3}", r.spec.rate / 2.0),
        );
        table(
            &mut h,
            "ShareGPT by engines and policy",
            &|r| r.spec.experiment == "exp5",
            &|r| format!("N={:>2} {}", r.per_endpoint.len(), r.spec.policy.as_str()),
        );
        let _ = write!(
            h,
            "<div class=fig>{}</div><div class=fig>{}</div>",
            svg("n8_staleness_hit"),
            svg("n8_staleness_ttft")
        );
        table(
            &mut h,
            "Publish interval at N=8 (load_cache_aware)",
            &|r| r.spec.experiment == "exp5-staleness",
            &|r| format!("{:>6}", runtime_value(r, "kvroute.publish_interval_ms")),
        );
        let _ = write!(
            h,
            "<div class=fig>{}</div><div class=fig>{}</div>",
            svg("n8_alpha_beta_p95"),
            svg("n8_pareto")
        );
        table(
            &mut h,
            "alpha, beta at N=8",
            &|r| r.spec.experiment == "exp5-ab",
            &|r| {
                format!(
                    "alpha {} beta {}",
                    runtime_value(r, "kvroute.alpha"),
                    runtime_value(r, "kvroute.beta")
                )
            },
        );
        table(
            &mut h,
            "Mooncake trace by engines and policy",
            &|r| r.spec.experiment == "exp5-mooncake",
            &|r| format!("N={:>2} {}", r.per_endpoint.len(), r.spec.policy.as_str()),
        );
        table(
            &mut h,
            "Agentic coding sessions by policy (a shared tool and system prefix, prompts growing to 120k tokens)",
            &|r| r.spec.experiment == "exp5-agentic",
            &|r| format!("N={:>2} {}", r.per_endpoint.len(), r.spec.policy.as_str()),
        );
    }
    table(
        &mut h,
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

/// The simulator against the live stack: every validation run (`val-live`, N = 2)
/// re-run in the simulator with the same sessions and seeds (`val-sim`), compared over repeats.
fn validation_section(h: &mut String, runs: &[RunResult], sm: &SimMeta) {
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    #[test]
    fn ticks_carry_only_the_decimals_their_axis_needs() {
        assert_eq!(tick(900.0, 1000.0), "900");
        assert_eq!(tick(2.5, 5.0), "2.5");
        assert_eq!(tick(0.35, 0.5), "0.35");
    }

    /// The PNG of a figure carries its text: the same chart with its text elements removed renders
    /// to different pixels (before the sans-serif mapping, every label vanished from the PNGs).
    #[test]
    fn png_figures_draw_their_labels() {
        let dir = std::env::temp_dir().join(format!("kvroute-fig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.svg");
        let series: Vec<Series> = vec![("policy".into(), vec![(1.0, 2.0), (2.0, 3.0)])];
        lines(&path, "A title", "x label", "y label", &series, true).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("A title"));
        let mut bare = String::new();
        let mut rest = svg.as_str();
        while let Some(at) = rest.find("<text") {
            bare.push_str(&rest[..at]);
            let end = rest[at..].find("</text>").unwrap() + at + "</text>".len();
            rest = &rest[end..];
        }
        bare.push_str(rest);
        let opts = png_options();
        let with = svg_to_png(svg.as_bytes(), &opts).unwrap();
        let without = svg_to_png(bare.as_bytes(), &opts).unwrap();
        let px = |png: &[u8]| {
            resvg::tiny_skia::Pixmap::decode_png(png)
                .unwrap()
                .data()
                .to_vec()
        };
        assert_ne!(px(&with), px(&without), "the PNG has no text: no font");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
