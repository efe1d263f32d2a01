//! Experiment 5 (simulated): every policy at N = 2..64 engines, several gateway replicas, the
//! sweeps at N = 8, the Mooncake trace and the agentic workload.

use std::fmt::Write as _;

use super::charts::*;
use super::*;

/// Experiment 5's figures.
pub(super) fn figures(figs: &Figures, runs: &[RunResult]) -> anyhow::Result<()> {
    let fig = |name: &str| figs.path(name);
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

    Ok(())
}

/// The simulator's validation and experiment 5 on the page.
pub(super) fn section(h: &mut String, figs: &Figures, runs: &[RunResult], sm: &SimMeta) {
    let svg = |name: &str| figs.svg(name);
    super::validation::section(h, runs, sm);
    let _ = write!(h, "<h2>Experiment 5: scaling the number of engines (simulated)</h2><p>The discrete-event simulator (the emulator's engine model; per gateway replica the filter's control plane itself, kvroute-control's workers and state service on an in-memory host on the simulation's clock; the same workloads) at N = {} engines, {:.3} ShareGPT sessions/s per engine, the sessions scaled with N: half the highest rate per engine at which round_robin kept P95 TTFT within the objective at N = 2 (searched by doubling, then bisection). The staleness and alpha/beta sweeps are repeated at N = {}, and the Mooncake trace runs at N = {} on the <code>{}</code> profile (its prompts, up to 40k tokens, need a large KV cache).</p><div class=fig>{}</div><div class=fig>{}</div>",
        engine_counts(runs, "exp5"), sm.per_instance_rate, engine_counts(runs, "exp5-ab"), engine_counts(runs, "exp5-mooncake"), sm.mooncake_profile, svg("exp5_p95_vs_n"), svg("exp5_hit_vs_n"));
    if runs
        .iter()
        .any(|r| r.spec.experiment.starts_with("exp5-gateways-"))
    {
        let _ = write!(h, "<h3>Several gateway replicas</h3><p>G Envoy replicas in front of N = {} engines, the default policy, the same ShareGPT sessions and load as experiment 5; each request goes to a replica at random (a plain L4 balancer, no affinity). <em>Shared</em>: the replicas exchange their decisions and in-flight counts through the fleet log every {} ms, as the filter's <code>fleet</code> section does live (docs/deployment.md); <em>independent</em>: each keeps its own directory and counts.</p><div class=fig>{}</div><div class=fig>{}</div>",
            engine_counts(runs, "exp5-gateways-shared"), sm.fleet_sync_ms, svg("exp5_gateways_hit"), svg("exp5_gateways_p95"));
        table(
            h,
            runs,
            "Gateway replicas: shared fleet log",
            &|r| r.spec.experiment == "exp5-gateways-shared",
            &|r| r.spec.rate_label.clone(),
        );
        table(
            h,
            runs,
            "Gateway replicas: independent directories",
            &|r| r.spec.experiment == "exp5-gateways-independent",
            &|r| r.spec.rate_label.clone(),
        );
    }
    table(
        h,
        runs,
        "Load search at N=2 (round_robin): sessions/s per engine",
        &|r| r.spec.experiment == "sim-search",
        &|r| format!("{:>8.3}", r.spec.rate / 2.0),
    );
    table(
        h,
        runs,
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
        h,
        runs,
        "Publish interval at N=8, by policy",
        &|r| r.spec.experiment == "exp5-staleness",
        &super::sweeps::staleness_row,
    );
    let _ = write!(
        h,
        "<div class=fig>{}</div><div class=fig>{}</div>",
        svg("n8_alpha_beta_p95"),
        svg("n8_pareto")
    );
    table(
        h,
        runs,
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
        h,
        runs,
        "Mooncake trace by engines and policy",
        &|r| r.spec.experiment == "exp5-mooncake",
        &|r| format!("N={:>2} {}", r.per_endpoint.len(), r.spec.policy.as_str()),
    );
    table(h, runs,
        "Agentic coding sessions by policy (a shared tool and system prefix, prompts growing to 120k tokens)",
        &|r| r.spec.experiment == "exp5-agentic",
        &|r| format!("N={:>2} {}", r.per_endpoint.len(), r.spec.policy.as_str()),
    );
    if runs.iter().any(|r| r.spec.experiment == "exp5-grid") {
        let _ = write!(h, "<h3>The rest of the criterion's grid</h3><p>ShareGPT cut to the plan's turns at 0.5x and 2x (1x is experiment 5 above), ShareGPT at full length (up to {} turns), RAG users and the mix (half each), at 0.5x, 1x and 2x. Each workload's 1x offers experiment 5's requests per second per engine (its session rate scaled by its requests per session), and a run's sessions arrive over experiment 5's window, so 2x is twice the sessions in the same time. The opening table judges the default in each cell.{}</p>",
            crate::plan::FULL_LENGTH_TURNS,
            runs.iter()
                .find(|r| r.spec.experiment == "exp5" && !r.per_endpoint.is_empty())
                .map_or(String::new(), |r| {
                    let rate = r.spec.rate / r.per_endpoint.len() as f64;
                    format!(" Experiment 5 ran at {rate:.4} sessions/s per engine: <code>kvroute-sim-grid --plan-grid --rate {rate:.4}</code> runs these cells again (with <code>--full</code> for the full plan), without the gateway cost and client send jitter that this study measured live and added, so its figures differ a little.")
                }));
        table(
            h,
            runs,
            "Criterion grid (simulated) by workload, engines, load and policy",
            &|r| r.spec.experiment == "exp5-grid",
            &|r| {
                format!(
                    "{} N={:>2} {} {}",
                    r.spec.workload,
                    r.per_endpoint.len(),
                    r.spec.rate_label,
                    r.spec.policy.as_str()
                )
            },
        );
    }
}
