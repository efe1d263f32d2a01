//! Every policy in one cell of the study's grid, in the simulator: a workload, a fleet size and a
//! load, with repeats, as a table of P95, mean TTFT, SLO attainment and hit rate, the best of each
//! marked, and the default policy's ratio to it.
//!
//! The load: `--rate` sessions/s per engine, or the knee the study uses (the highest rate at which
//! `round_robin` keeps P95 TTFT within the objective at N = 2, doubling from 0.125/s then
//! bisecting), times each of `--loads`.
//!
//! ```sh
//! cargo run --release -p kvroute-workloads --bin kvroute-sim-grid -- \
//!   --workload sharegpt --max-turns 10 --engines 8,16 --loads 0.5,1,2 --repeats 3
//! ```

use std::path::PathBuf;

use clap::Parser;
use kvroute_core::policy::PolicyKind;
use kvroute_core::PolicySettings;
use kvroute_sim::SimConfig;
use kvroute_study::search::RateSearch;
use kvroute_study::simulated;
use kvroute_study::study::{RunResult, RunSpec};
use kvroute_traces::{agentic, arrivals, mooncake, rag, sharegpt, with_arrivals, Session};

#[derive(Parser, Debug)]
#[command(about = "Every policy in one cell of the grid, simulated, with repeats")]
struct Args {
    /// `sharegpt`, `rag`, `mix` (half each), `agentic` or `mooncake` (the trace's own times).
    #[arg(long, default_value = "sharegpt")]
    workload: String,
    /// Fleet sizes.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    engines: Vec<usize>,
    /// Multiples of the per-engine rate.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    loads: Vec<f64>,
    /// Sessions/s per engine at 1x (default: the knee search).
    #[arg(long)]
    rate: Option<f64>,
    /// Repeats (seeds 1, 2, ...).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Policies (default: every one).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Sessions per engine in a run.
    #[arg(long, default_value_t = 40)]
    sessions_per_engine: usize,
    /// ShareGPT turns at most per conversation.
    #[arg(long, default_value_t = 4)]
    max_turns: usize,
    /// Engine profile.
    #[arg(long, default_value = "rtx5080-llama3.2-3b")]
    profile: String,
    /// TTFT objective, ms (SLO attainment and the knee search).
    #[arg(long, default_value_t = 1000.0)]
    slo_ms: f64,
    /// ShareGPT file.
    #[arg(long, default_value = "../shared/data/sharegpt_dev_3000.json")]
    sharegpt: PathBuf,
    /// Mooncake trace.
    #[arg(long, default_value = "../shared/data/mooncake_synthetic_trace.jsonl")]
    mooncake: PathBuf,
    /// The policy whose ratios to the best are printed.
    #[arg(long, default_value = "predicted_ttft")]
    default_policy: String,
    /// Write every run's result here (JSON lines).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A runtime value for every run (`--set kvroute.ttft_work_weight=2`; repeat the flag).
    #[arg(long = "set")]
    sets: Vec<String>,
}

struct Workloads {
    sharegpt: Vec<Session>,
    mooncake: Vec<Session>,
}

fn sessions(a: &Args, w: &Workloads, n: usize, rate: f64, seed: u64) -> Vec<Session> {
    let count = a.sessions_per_engine * n;
    let pick = |all: &[Session], k: usize, offset: usize| -> Vec<Session> {
        let start = (offset + seed as usize * 97) % all.len().max(1);
        all.iter().cycle().skip(start).take(k).cloned().collect()
    };
    let picked = match a.workload.as_str() {
        "rag" => rag::generate(&rag::RagOptions {
            users: count,
            max_tokens: 32,
            seed,
            ..Default::default()
        }),
        "mix" => kvroute_traces::mix(
            &pick(&w.sharegpt, count, 0),
            &rag::generate(&rag::RagOptions {
                users: count,
                max_tokens: 32,
                seed,
                ..Default::default()
            }),
            0.5,
            count,
            seed,
        ),
        "agentic" => agentic::generate(&agentic::AgenticOptions {
            sessions: count,
            seed,
            ..Default::default()
        }),
        "mooncake" => return w.mooncake.clone(),
        _ => pick(&w.sharegpt, count, 0),
    };
    let starts = arrivals::poisson(picked.len(), rate * n as f64, seed);
    with_arrivals(picked, &starts)
}

/// One policy's figures in a cell, over its repeats.
struct Cell {
    /// Mean P95 TTFT, ms.
    p95: f64,
    /// Lowest and highest P95 of a repeat.
    lo: f64,
    hi: f64,
    /// Mean TTFT, ms.
    mean: f64,
    /// Share of requests with TTFT within the objective.
    slo: f64,
    /// Engine prefix-cache hit rate.
    hit: f64,
}

fn stats(results: &[&RunResult], slo_ms: f64) -> Cell {
    let k = results.len().max(1) as f64;
    let p95: Vec<f64> = results.iter().map(|r| r.ttft_ms[1]).collect();
    let mean_ttft = results
        .iter()
        .map(|r| r.ttfts.iter().sum::<f64>() / r.ttfts.len().max(1) as f64)
        .sum::<f64>()
        / k;
    let slo = results
        .iter()
        .map(|r| {
            r.ttfts.iter().filter(|t| **t <= slo_ms).count() as f64 / r.ttfts.len().max(1) as f64
        })
        .sum::<f64>()
        / k;
    let hit = results.iter().map(|r| r.hit_rate).sum::<f64>() / k;
    let lo = p95.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = p95.iter().copied().fold(0.0, f64::max);
    Cell {
        p95: p95.iter().sum::<f64>() / k,
        lo,
        hi,
        mean: mean_ttft,
        slo,
        hit,
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let policies: Vec<PolicyKind> = if a.policies.is_empty() {
        PolicyKind::ALL.to_vec()
    } else {
        a.policies
            .iter()
            .map(|p| {
                p.parse()
                    .map_err(|()| anyhow::anyhow!("unknown policy {p}"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let default: PolicyKind = a
        .default_policy
        .parse()
        .map_err(|()| anyhow::anyhow!("unknown policy {}", a.default_policy))?;
    let text = std::fs::read_to_string(&a.sharegpt)?;
    let mut w = Workloads {
        sharegpt: sharegpt::parse(
            &text,
            &sharegpt::ShareGptOptions {
                max_turns: a.max_turns,
                max_tokens: 64,
                think_ms: 2000.0,
                ..Default::default()
            },
        )?,
        mooncake: Vec::new(),
    };
    if a.workload == "mooncake" {
        let m = std::fs::read_to_string(&a.mooncake)?;
        let reqs = mooncake::parse(&m).map_err(|e| anyhow::anyhow!("{e}"))?;
        w.mooncake = mooncake::sessions(&reqs, 1.0);
    }
    let runtime: Vec<(String, String)> = a
        .sets
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(anyhow::anyhow!("--set {kv}: want KEY=VALUE")),
        })
        .collect::<anyhow::Result<_>>()?;
    let engine = simulated::engine_config(&a.profile)?;
    let base = |n: usize| SimConfig {
        record_itl: false,
        ..SimConfig::new(n, engine.clone(), PolicySettings::default())
    };
    let mut out = match &a.out {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    let rate = match (a.rate, a.workload.as_str()) {
        (_, "mooncake") => 0.0,
        (Some(r), _) => r,
        (None, _) => {
            let mut search = RateSearch::new(0.125, 12, 4);
            while let Some(r) = search.next() {
                let spec = RunSpec::new("knee", &a.workload, PolicyKind::RoundRobin, r, "knee", 0);
                let b = base(2);
                let work = simulated::prepare_for(&b, &sessions(&a, &w, 2, r, 1));
                let res = simulated::run(&spec, &b, &work)?;
                search.record(res.failed == 0 && res.ttft_ms[1] <= a.slo_ms);
            }
            search.knee().unwrap_or(0.125)
        }
    };
    println!(
        "workload {} ({} turns at most), profile {}, 1x = {rate:.3} sessions/s per engine, {} repeats",
        a.workload, a.max_turns, a.profile, a.repeats
    );
    for &n in &a.engines {
        for &x in &a.loads {
            let b = base(n);
            let mut results: Vec<RunResult> = Vec::new();
            let reps = if a.workload == "mooncake" {
                1
            } else {
                a.repeats
            };
            for rep in 0..reps {
                let seed = rep as u64 + 1;
                let work = simulated::prepare_for(&b, &sessions(&a, &w, n, rate * x, seed));
                for p in &policies {
                    let spec = RunSpec::new(
                        "grid",
                        &a.workload,
                        *p,
                        rate * x * n as f64,
                        &format!("{x}x"),
                        rep,
                    )
                    .with_runtime(runtime.clone());
                    let r = simulated::run(&spec, &b, &work)?;
                    if let Some(o) = out.as_mut() {
                        use std::io::Write;
                        let mut slim = r.clone();
                        slim.ttfts.clear();
                        writeln!(o, "{}", serde_json::to_string(&slim)?)?;
                    }
                    results.push(r);
                }
            }
            let rows: Vec<(PolicyKind, Cell)> = policies
                .iter()
                .map(|p| {
                    let rs: Vec<&RunResult> =
                        results.iter().filter(|r| r.spec.policy == *p).collect();
                    (*p, stats(&rs, a.slo_ms))
                })
                .collect();
            let best_p95 = rows.iter().map(|r| r.1.p95).fold(f64::INFINITY, f64::min);
            let best_mean = rows.iter().map(|r| r.1.mean).fold(f64::INFINITY, f64::min);
            let best_hit = rows.iter().map(|r| r.1.hit).fold(0.0, f64::max);
            println!(
                "\nN = {n}, {x}x ({} requests a run)",
                results.first().map_or(0, |r| r.requests)
            );
            println!(
                "{:<20} {:>10} {:>19} {:>10} {:>7} {:>6}",
                "policy", "P95 ms", "P95 spread", "mean ms", "SLO", "hit"
            );
            for (p, c) in &rows {
                let Cell {
                    p95,
                    lo,
                    hi,
                    mean,
                    slo,
                    hit,
                } = c;
                let mark = |v: f64, b: f64| if (v - b).abs() < 1e-9 { "*" } else { " " };
                println!(
                    "{:<20} {:>9.0}{} {:>9.0}-{:<9.0} {:>9.0}{} {:>7.3} {:>5.3}{}",
                    p.as_str(),
                    p95,
                    mark(*p95, best_p95),
                    lo,
                    hi,
                    mean,
                    mark(*mean, best_mean),
                    slo,
                    hit,
                    mark(*hit, best_hit)
                );
            }
            if let Some((_, Cell { p95, mean, hit, .. })) = rows.iter().find(|r| r.0 == default) {
                let rr = rows.iter().find(|r| r.0 == PolicyKind::RoundRobin);
                println!(
                    "{}: P95 {:.2}x the best, mean {:.2}x the best, hit {:+.3} against the best{}",
                    default.as_str(),
                    p95 / best_p95.max(1e-9),
                    mean / best_mean.max(1e-9),
                    hit - best_hit,
                    rr.map_or(String::new(), |r| format!(
                        "; round_robin's P95 / its P95 = {:.2}",
                        r.1.p95 / p95.max(1e-9)
                    ))
                );
            }
        }
    }
    Ok(())
}
