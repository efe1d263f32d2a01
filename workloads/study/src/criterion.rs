//! The default policy against the best policy of every cell of the study: the table the report
//! opens with.
//!
//! A cell is one experiment's workload at one fleet size and one load, every policy run on the
//! same sessions and seeds. Per policy: P95 TTFT (the mean over repeats, and their spread), mean
//! TTFT, SLO attainment (share of requests with TTFT within the objective) and hit rate. The
//! default loses a cell when its P95 is more than 5% above the best one and outside the best one's
//! spread, when its hit rate is more than 2 points under the best, or, at N >= 8 and 1x, when
//! `round_robin`'s P95 is not at least 1.3x its own.

use std::collections::BTreeMap;

use kvroute_core::policy::PolicyKind;

use crate::study::RunResult;

/// Experiments whose runs compare policies (the sweeps, searches and validation runs do not).
pub const POLICY_EXPERIMENTS: [&str; 6] = [
    "exp1",
    "exp2",
    "exp5",
    "exp5-grid",
    "exp5-mooncake",
    "exp5-agentic",
];

/// One policy (or peer router) in one cell, over its repeats.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyCell {
    /// The policy, or the peer router's label (`RunSpec::label`).
    pub policy: String,
    /// Mean of the repeats' P95 TTFT, ms.
    pub p95: f64,
    /// Lowest and highest repeat P95, ms.
    pub p95_range: (f64, f64),
    /// Mean TTFT over all requests, ms.
    pub mean: f64,
    /// Share of requests with TTFT within the objective.
    pub slo: f64,
    /// Mean hit rate of the repeats.
    pub hit: f64,
    /// Lowest and highest repeat hit rate.
    pub hit_range: (f64, f64),
    /// Repeats.
    pub runs: usize,
    /// Each repeat's (seed, P95, hit rate), by seed: every policy of a cell runs the same
    /// sessions and arrivals under a seed, so two policies' repeats pair up.
    pub per_seed: Vec<(u64, f64, f64)>,
}

/// The default against another policy, seed by seed: what the same sessions and arrivals gave
/// each, which leaves out how much one realisation of the workload differs from the next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    /// Lowest and highest of the default's P95 over the other's, per seed.
    pub p95_ratio: (f64, f64),
    /// Seeds where the default's P95 was the lower (or equal).
    pub p95_lower: usize,
    /// Lowest and highest of the default's hit rate minus the other's, per seed.
    pub hit_diff: (f64, f64),
    /// Seeds where the default's hit rate was the higher (or equal).
    pub hit_higher: usize,
    /// Seeds both ran.
    pub seeds: usize,
}

/// `d` against `o` over the seeds both ran (None: fewer than two).
pub fn paired(d: &PolicyCell, o: &PolicyCell) -> Option<Paired> {
    let pairs: Vec<((f64, f64), (f64, f64))> = d
        .per_seed
        .iter()
        .filter_map(|(s, p, h)| {
            o.per_seed
                .iter()
                .find(|x| x.0 == *s)
                .map(|x| ((*p, *h), (x.1, x.2)))
        })
        .collect();
    if pairs.len() < 2 {
        return None;
    }
    let ratios: Vec<f64> = pairs.iter().map(|(a, b)| a.0 / b.0.max(1e-9)).collect();
    let diffs: Vec<f64> = pairs.iter().map(|(a, b)| a.1 - b.1).collect();
    let range = |xs: &[f64]| {
        (
            xs.iter().copied().fold(f64::INFINITY, f64::min),
            xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    };
    Some(Paired {
        p95_ratio: range(&ratios),
        p95_lower: ratios.iter().filter(|r| **r <= 1.0).count(),
        hit_diff: range(&diffs),
        hit_higher: diffs.iter().filter(|d| **d >= 0.0).count(),
        seeds: pairs.len(),
    })
}

/// One cell: which runs, and every policy's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Experiment.
    pub experiment: String,
    /// Workload.
    pub workload: String,
    /// Engines.
    pub engines: usize,
    /// Load label (0.5x, 1x, 2x, trace).
    pub rate: String,
    /// Every policy's figures, in the order first seen.
    pub policies: Vec<PolicyCell>,
}

/// The default's standing in a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Best P95, mean TTFT and hit rate, each with the policy that reached it.
    pub best_p95: (String, f64),
    pub best_mean: (String, f64),
    pub best_hit: (String, f64),
    /// The default's P95 over the best, mean over the best, hit rate minus the best.
    pub p95_ratio: f64,
    pub mean_ratio: f64,
    pub hit_diff: f64,
    /// `round_robin`'s P95 over the default's, where both ran.
    pub over_round_robin: Option<f64>,
    /// Why the default loses the cell (empty: it does not).
    pub losses: Vec<&'static str>,
    /// Policies that beat the default on P95 or hit rate, as a loss counts it, and are not worse
    /// on the other (a lower mean P95 and a higher mean hit rate): where there are none, every
    /// loss on those two is a trade-off, the policy that beats the default on one being worse on
    /// the other.
    pub better_on_both: Vec<String>,
}

/// Whether the default (`d`) loses to `o` on P95: more than 5% above it and outside its spread.
fn loses_p95_to(d: &PolicyCell, o: &PolicyCell) -> bool {
    d.p95 > 1.05 * o.p95 && d.p95_range.0 > o.p95_range.1
}

/// Whether the default (`d`) loses to `o` on hit rate: more than 2 points under it.
fn loses_hit_to(d: &PolicyCell, o: &PolicyCell) -> bool {
    d.hit < o.hit - 0.02
}

fn quantile_free_mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// The cells of `runs`.
pub fn cells(runs: &[RunResult], slo_ms: f64) -> Vec<Cell> {
    let mut groups: BTreeMap<(usize, String, usize, String), Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        if let Some(i) = POLICY_EXPERIMENTS
            .iter()
            .position(|e| *e == r.spec.experiment)
        {
            if !r.spec.runtime.is_empty() {
                continue;
            }
            groups
                .entry((
                    i,
                    r.spec.workload.clone(),
                    r.per_endpoint.len(),
                    r.spec.rate_label.clone(),
                ))
                .or_default()
                .push(r);
        }
    }
    groups
        .into_iter()
        .map(|((i, workload, engines, rate), rs)| {
            let policies = policy_cells(&rs, slo_ms);
            Cell {
                experiment: POLICY_EXPERIMENTS
                    .get(i)
                    .copied()
                    .unwrap_or_default()
                    .to_string(),
                workload,
                engines,
                rate,
                policies,
            }
        })
        .collect()
}

/// Every policy's (or peer router's) figures over `rs`, the runs of one cell, in the order first
/// seen.
pub fn policy_cells(rs: &[&RunResult], slo_ms: f64) -> Vec<PolicyCell> {
    let mut order: Vec<String> = Vec::new();
    for r in rs {
        if !order.contains(&r.spec.label()) {
            order.push(r.spec.label());
        }
    }
    order
        .into_iter()
        .map(|p| {
            let mine: Vec<&&RunResult> = rs.iter().filter(|r| r.spec.label() == p).collect();
            let p95s: Vec<f64> = mine.iter().map(|r| r.ttft_ms[1]).collect();
            let hits: Vec<f64> = mine.iter().map(|r| r.hit_rate).collect();
            let range = |xs: &[f64]| {
                (
                    xs.iter().copied().fold(f64::INFINITY, f64::min),
                    xs.iter().copied().fold(0.0, f64::max),
                )
            };
            let all: Vec<f64> = mine.iter().flat_map(|r| r.ttfts.iter().copied()).collect();
            PolicyCell {
                policy: p,
                p95: quantile_free_mean(&p95s),
                p95_range: range(&p95s),
                mean: quantile_free_mean(&all),
                slo: all.iter().filter(|t| **t <= slo_ms).count() as f64 / all.len().max(1) as f64,
                hit: quantile_free_mean(&hits),
                hit_range: range(&hits),
                runs: mine.len(),
                per_seed: {
                    let mut v: Vec<(u64, f64, f64)> = mine
                        .iter()
                        .map(|r| (r.spec.seed, r.ttft_ms[1], r.hit_rate))
                        .collect();
                    v.sort_by_key(|x| x.0);
                    v
                },
            }
        })
        .collect()
}

/// The first of `policies` with the lowest `key` (the highest unless `lower`).
fn best_by<'a>(
    policies: impl Iterator<Item = &'a PolicyCell>,
    key: &dyn Fn(&PolicyCell) -> f64,
    lower: bool,
) -> Option<&'a PolicyCell> {
    policies.min_by(|a, b| {
        let o = key(a).total_cmp(&key(b));
        if lower {
            o
        } else {
            o.reverse()
        }
    })
}

/// The default's standing in `cell` against every policy and peer router there; None when the
/// default did not run there.
pub fn verdict(cell: &Cell, default: PolicyKind) -> Option<Verdict> {
    let d = cell
        .policies
        .iter()
        .find(|p| p.policy == default.as_str())?;
    let best = |key: &dyn Fn(&PolicyCell) -> f64, lower: bool| {
        best_by(cell.policies.iter(), key, lower).map(|p| (p.policy.clone(), key(p), p))
    };
    let (bp, bp95, bcell) = best(&|p| p.p95, true)?;
    let (bm, bmean, _) = best(&|p| p.mean, true)?;
    let (bh, bhit, hcell) = best(&|p| p.hit, false)?;
    let rr = cell
        .policies
        .iter()
        .find(|p| p.policy == PolicyKind::RoundRobin.as_str())
        .map(|r| r.p95 / d.p95.max(1e-9));
    let mut losses = Vec::new();
    if loses_p95_to(d, bcell) {
        losses.push("P95");
    }
    if loses_hit_to(d, hcell) {
        losses.push("hit rate");
    }
    let better_on_both = cell
        .policies
        .iter()
        .filter(|o| {
            o.policy != d.policy
                && o.p95 < d.p95
                && o.hit > d.hit
                && (loses_p95_to(d, o) || loses_hit_to(d, o))
        })
        .map(|o| o.policy.clone())
        .collect();
    if cell.engines >= 8 && cell.rate == "1x" && rr.is_some_and(|x| x < 1.3) {
        losses.push("under 1.3x round_robin");
    }
    Some(Verdict {
        best_p95: (bp, bp95),
        best_mean: (bm, bmean),
        best_hit: (bh, bhit),
        p95_ratio: d.p95 / bp95.max(1e-9),
        mean_ratio: d.mean / bmean.max(1e-9),
        hit_diff: d.hit - bhit,
        over_round_robin: rr,
        losses,
        better_on_both,
    })
}

impl Verdict {
    /// ` (better on both: a, b)`, or nothing where no policy beats the default on both.
    pub fn better_on_both_suffix(&self) -> String {
        if self.better_on_both.is_empty() {
            String::new()
        } else {
            format!(" (better on both: {})", self.better_on_both.join(", "))
        }
    }
}

/// For a lost cell: whether a policy beats the default on both P95 and hit rate, or the loss is a
/// trade-off (nothing to add where it is lost only on the round_robin line).
fn trade_off_note(v: &Verdict) -> String {
    if !v.better_on_both.is_empty() {
        format!(
            "<br><small>better on both: {}</small>",
            v.better_on_both.join(", ")
        )
    } else if v.losses.iter().any(|l| *l == "P95" || *l == "hit rate") {
        "<br><small>a trade-off: none better on both</small>".to_string()
    } else {
        String::new()
    }
}

/// The report's opening table: per cell, the best policy on P95, mean TTFT and hit rate, and the
/// default's ratio to each, marked where it loses.
pub fn html(runs: &[RunResult], default: PolicyKind, slo_ms: f64) -> String {
    let cells = cells(runs, slo_ms);
    let judged: Vec<(&Cell, Verdict)> = cells
        .iter()
        .filter_map(|c| verdict(c, default).map(|v| (c, v)))
        .collect();
    let mut h = String::new();
    let lost = judged.iter().filter(|(_, v)| !v.losses.is_empty()).count();
    let plain = judged
        .iter()
        .filter(|(_, v)| !v.better_on_both.is_empty())
        .count();
    let judged_n = judged.len();
    h.push_str(&format!(
        "<h2>The default policy in every cell</h2><p>The default policy is <code>{default}</code>. \
         Per cell (one workload, fleet and load, every policy on the same sessions and seeds): the \
         best policy on P95 TTFT, mean TTFT and hit rate, and the default's ratio to each. The \
         default loses a cell when its P95 is over 1.05x the best and outside the best's spread \
         over repeats, when its hit rate is over 2 points below the best, or at N &ge; 8 and 1x \
         when round_robin's P95 is not 1.3x its own. It loses <b>{lost} of {judged_n}</b> cells, \
         in {plain} of them to a policy better on both P95 and hit rate (named under the loss; \
         in the others the policy that beats the default on one is worse on the other, or no \
         policy meets the round_robin line). \
         A spread is the lowest and highest of the repeats; where the default's hit rates and the \
         best's overlap, the difference is within what repeats move it by. Every policy of a cell \
         runs the same sessions and arrivals under each seed, so the small print pairs the \
         default with the best (or, where the default is the best, the runner-up) seed by seed: \
         the range of the per-seed ratios or differences, and in how many seeds the default was \
         as good. That leaves out how much one realisation of the workload differs from the \
         next.</p>\
         <table><tr><th>experiment</th><th>workload</th><th>N</th><th>load</th><th>repeats</th>\
         <th>best P95 (ms, spread)</th><th>default / best</th><th>best mean TTFT</th>\
         <th>default / best</th><th>best hit (spread)</th><th>default &minus; best</th>\
         <th>round_robin / default P95</th><th>default SLO attainment</th><th>loses on</th></tr>"
    ));
    for (c, v) in &judged {
        let d = c.policies.iter().find(|p| p.policy == default.as_str());
        let b = c.policies.iter().find(|p| p.policy == v.best_p95.0);
        let spread = b.map_or(String::new(), |b| {
            format!(" ({:.0}-{:.0})", b.p95_range.0, b.p95_range.1)
        });
        let bh = c.policies.iter().find(|p| p.policy == v.best_hit.0);
        let hit_spread = match (bh, d) {
            (Some(b), Some(d)) if b.runs > 1 => {
                let overlap = d.hit_range.1 >= b.hit_range.0 && d.policy != b.policy;
                (
                    format!(" ({:.3}-{:.3})", b.hit_range.0, b.hit_range.1),
                    if overlap { ", spreads overlap" } else { "" },
                )
            }
            _ => (String::new(), ""),
        };
        // Seed by seed, against the best (or, where the default is the best, the runner-up).
        let by_seed = |best: &str,
                       key: &dyn Fn(&PolicyCell) -> f64,
                       lower: bool,
                       show: &dyn Fn(&PolicyCell, Paired) -> String| {
            let rival = if best == default.as_str() {
                best_by(c.policies.iter().filter(|p| p.policy != best), key, lower)
            } else {
                c.policies.iter().find(|p| p.policy == best)
            };
            d.zip(rival)
                .and_then(|(d, o)| paired(d, o).map(|x| show(o, x)))
                .unwrap_or_default()
        };
        let by_seed_p95 = by_seed(&v.best_p95.0, &|p| p.p95, true, &|o, x| {
            format!(
                "<br><small>per seed vs {}: {:.2}-{:.2}, lower in {} of {}</small>",
                o.policy, x.p95_ratio.0, x.p95_ratio.1, x.p95_lower, x.seeds
            )
        });
        let by_seed_hit = by_seed(&v.best_hit.0, &|p| p.hit, false, &|o, x| {
            format!(
                "<br><small>per seed vs {}: {:+.3} to {:+.3}, as high in {} of {}</small>",
                o.policy, x.hit_diff.0, x.hit_diff.1, x.hit_higher, x.seeds
            )
        });
        let mark = if v.losses.is_empty() {
            String::new()
        } else {
            format!("<b>{}</b>{}", v.losses.join(", "), trade_off_note(v))
        };
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} {:.0}{}</td>\
             <td>{:.2}{}</td><td>{} {:.0}</td><td>{:.2}</td><td>{} {:.3}{}</td><td>{:+.3}{}{}</td>\
             <td>{}</td><td>{:.3}</td><td>{}</td></tr>",
            c.experiment,
            c.workload,
            c.engines,
            c.rate,
            d.map_or(0, |d| d.runs),
            v.best_p95.0,
            v.best_p95.1,
            spread,
            v.p95_ratio,
            by_seed_p95,
            v.best_mean.0,
            v.best_mean.1,
            v.mean_ratio,
            v.best_hit.0,
            v.best_hit.1,
            hit_spread.0,
            v.hit_diff,
            hit_spread.1,
            by_seed_hit,
            v.over_round_robin
                .map_or("-".to_string(), |x| format!("{x:.2}")),
            d.map_or(0.0, |d| d.slo),
            mark
        ));
    }
    h.push_str("</table>");
    h
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
    use crate::study::RunSpec;

    fn run(policy: PolicyKind, rep: usize, ttfts: &[f64], hit: f64) -> RunResult {
        let spec = RunSpec::new("exp5", "sharegpt", policy, 8.0, "1x", rep);
        let mut r = RunResult::new(&spec, &[], Default::default(), vec![0; 8], 0.0, 1.0);
        let mut t = ttfts.to_vec();
        t.sort_by(f64::total_cmp);
        r.ttft_ms = [t[t.len() / 2], t[t.len() * 95 / 100], t[t.len() - 1]];
        r.ttfts = t;
        r.hit_rate = hit;
        r
    }

    fn ramp(scale: f64) -> Vec<f64> {
        (0..100).map(|i| f64::from(i) * scale).collect()
    }

    /// Two repeats of the default (TTFTs 0..99 ms) with hit rates `d_hits`, and two of
    /// round_robin with TTFTs `rr_scale` times those and hit rates `rr_hits`.
    fn against_round_robin(d_hits: [f64; 2], rr_scale: f64, rr_hits: [f64; 2]) -> Vec<RunResult> {
        let (d, rr) = (PolicyKind::PredictedTtft, PolicyKind::RoundRobin);
        vec![
            run(d, 0, &ramp(1.0), d_hits[0]),
            run(d, 1, &ramp(1.0), d_hits[1]),
            run(rr, 0, &ramp(rr_scale), rr_hits[0]),
            run(rr, 1, &ramp(rr_scale), rr_hits[1]),
        ]
    }

    #[test]
    fn the_default_loses_on_tail_hit_and_round_robin_and_wins_otherwise() {
        let d = PolicyKind::PredictedTtft;
        let rr = PolicyKind::RoundRobin;
        // The default: P95 95 ms; round_robin: 190 ms (2x), lower hit rate.
        let runs = against_round_robin([0.5, 0.5], 2.0, [0.1, 0.1]);
        let c = cells(&runs, 50.0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].policies.len(), 2);
        let v = verdict(&c[0], d).unwrap();
        assert!(v.losses.is_empty(), "{v:?}");
        assert_eq!(v.best_p95.0, d.as_str());
        assert!((v.over_round_robin.unwrap() - 2.0).abs() < 1e-9);
        assert!((c[0].policies[0].slo - 0.51).abs() < 1e-9);
        // round_robin now better on the tail by 20% in both repeats, and on hit rate.
        let runs = against_round_robin([0.5, 0.5], 0.8, [0.6, 0.6]);
        let v = verdict(&cells(&runs, 50.0)[0], d).unwrap();
        assert_eq!(v.losses, vec!["P95", "hit rate", "under 1.3x round_robin"]);
        assert_eq!(v.better_on_both, vec![rr.as_str().to_string()]);
        let h = html(&runs, d, 50.0);
        assert!(h.contains("1 of 1</b> cells, in 1 of them"), "{h}");
        assert!(h.contains("better on both: round_robin"), "{h}");
        // Better on the tail, worse on hit rate: a trade-off.
        let runs = against_round_robin([0.5, 0.5], 0.8, [0.4, 0.4]);
        let v = verdict(&cells(&runs, 50.0)[0], d).unwrap();
        assert_eq!(v.losses, vec!["P95", "under 1.3x round_robin"]);
        assert!(v.better_on_both.is_empty());
        let h = html(&runs, d, 50.0);
        assert!(h.contains("1 of 1</b> cells, in 0 of them"), "{h}");
        assert!(h.contains("a trade-off: none better on both"), "{h}");
        // A policy better on both, but by less than a loss on either, does not count.
        let runs = against_round_robin([0.5, 0.5], 0.98, [0.51, 0.51]);
        assert!(verdict(&cells(&runs, 50.0)[0], d)
            .unwrap()
            .better_on_both
            .is_empty());
        // Hit rates that move between repeats: the best's spread, and whether the default's
        // overlaps it.
        let runs = against_round_robin([0.40, 0.44], 2.0, [0.43, 0.49]);
        let c = cells(&runs, 50.0);
        assert_eq!(c[0].policies[1].hit_range, (0.43, 0.49));
        let h = html(&runs, d, 50.0);
        assert!(h.contains("round_robin 0.460 (0.430-0.490)"), "{h}");
        assert!(h.contains("-0.040, spreads overlap"), "{h}");
        let runs = against_round_robin([0.40, 0.42], 2.0, [0.45, 0.49]);
        let h = html(&runs, d, 50.0);
        assert!(h.contains("(0.450-0.490)</td><td>-0.060<br>"), "{h}");
        // Seed by seed: the default's hit rate 0.05 and 0.07 under round_robin's, its P95 half.
        assert!(
            h.contains("per seed vs round_robin: -0.070 to -0.050, as high in 0 of 2"),
            "{h}"
        );
        assert!(
            h.contains("per seed vs round_robin: 0.50-0.50, lower in 2 of 2"),
            "{h}"
        );
        let c = cells(&runs, 50.0);
        let p = paired(&c[0].policies[0], &c[0].policies[1]).unwrap();
        assert_eq!((p.seeds, p.p95_lower, p.hit_higher), (2, 2, 0));
        // Seeds one side lacks do not pair; one pair is not a comparison.
        let mut lone = c[0].policies[1].clone();
        lone.per_seed.truncate(1);
        assert!(paired(&c[0].policies[0], &lone).is_none());
        // A default that did not run is not judged.
        assert!(verdict(&cells(&runs, 50.0)[0], PolicyKind::Jsq).is_none());
        // The simulated grid's runs are cells of their own, one per workload, fleet and load;
        // the sweeps' runs (runtime values) are not.
        let grid = |policy, rep, workload: &str, load: &str| {
            let mut r = run(policy, rep, &ramp(1.0), 0.5);
            r.spec = RunSpec::new("exp5-grid", workload, policy, 8.0, load, rep);
            r
        };
        let mut runs = vec![
            grid(d, 0, "mix", "2x"),
            grid(rr, 0, "mix", "2x"),
            grid(d, 0, "rag", "2x"),
            grid(d, 0, "mix", "0.5x"),
        ];
        let mut swept = grid(d, 0, "mix", "2x");
        swept.spec = swept
            .spec
            .with_runtime(vec![("kvroute.alpha".into(), "1".into())]);
        runs.push(swept);
        let c = cells(&runs, 50.0);
        let keys: Vec<(&str, &str, &str, usize)> = c
            .iter()
            .map(|c| {
                (
                    c.experiment.as_str(),
                    c.workload.as_str(),
                    c.rate.as_str(),
                    c.policies.len(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("exp5-grid", "mix", "0.5x", 1),
                ("exp5-grid", "mix", "2x", 2),
                ("exp5-grid", "rag", "2x", 1)
            ]
        );
    }
}
