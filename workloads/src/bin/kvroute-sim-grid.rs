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
use kvroute_study::criterion::{self, Cell};
use kvroute_study::plan::{self, GridWorkload, StudyPlan};
use kvroute_study::search::RateSearch;
use kvroute_study::simulated;
use kvroute_study::study::{RunResult, RunSpec};
use kvroute_traces::{agentic, arrivals, mooncake, with_arrivals, Session};

#[derive(Parser, Debug)]
#[command(about = "Every policy in one cell of the grid, simulated, with repeats")]
struct Args {
    /// `sharegpt` (cut to `--max-turns`), `sharegpt-full` (up to 10 turns), `rag`, `mix` (half
    /// each), `agentic` or `mooncake` (the trace's own times).
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
    /// Also print, per policy, how often a session's next turn went to another endpoint than its
    /// previous one, and the cached share of the moved and the staying turns' prompt tokens.
    #[arg(long)]
    moves: bool,
}

struct Workloads {
    /// The ShareGPT file's text.
    sharegpt: String,
    /// The study's reduced plan, with `--max-turns`: the shapes of the ShareGPT and RAG sessions.
    plan: StudyPlan,
    mooncake: Vec<Session>,
}

fn sessions(
    a: &Args,
    w: &Workloads,
    n: usize,
    rate: f64,
    seed: u64,
) -> anyhow::Result<Vec<Session>> {
    let count = a.sessions_per_engine * n;
    let picked = match a.workload.as_str() {
        "agentic" => agentic::generate(&agentic::AgenticOptions {
            sessions: count,
            seed,
            ..Default::default()
        }),
        "mooncake" => return Ok(w.mooncake.clone()),
        name => {
            let g = GridWorkload::parse(name)
                .ok_or_else(|| anyhow::anyhow!("unknown workload {name}"))?;
            return plan::grid_sessions(&w.sharegpt, &w.plan, g, count, seed, rate * n as f64);
        }
    };
    let starts = arrivals::poisson(picked.len(), rate * n as f64, seed);
    Ok(with_arrivals(picked, &starts))
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
    let mut plan = StudyPlan::parse(plan::REDUCED).map_err(anyhow::Error::msg)?;
    plan.sharegpt.max_turns = a.max_turns;
    let mut w = Workloads {
        sharegpt: std::fs::read_to_string(&a.sharegpt)?,
        plan,
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
                let work = simulated::prepare_for(&b, &sessions(&a, &w, 2, r, 1)?);
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
            // Per policy: follow-ups, moved, and the moved and staying turns' hit shares
            // weighted by their counts.
            let mut moved: std::collections::BTreeMap<&str, (usize, usize, f64, f64)> =
                Default::default();
            let reps = if a.workload == "mooncake" {
                1
            } else {
                a.repeats
            };
            for rep in 0..reps {
                let seed = rep as u64 + 1;
                let work = simulated::prepare_for(&b, &sessions(&a, &w, n, rate * x, seed)?);
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
                    let (r, sim_out) = simulated::run_with_output(&spec, &b, &work)?;
                    let m = simulated::moves(&sim_out);
                    let total = moved.entry(p.as_str()).or_default();
                    total.0 += m.follow_ups;
                    total.1 += m.moved;
                    total.2 += m.moved_hit * m.moved as f64;
                    total.3 += m.stayed_hit * (m.follow_ups - m.moved) as f64;
                    if let Some(o) = out.as_mut() {
                        use std::io::Write;
                        let mut slim = r.clone();
                        slim.ttfts.clear();
                        writeln!(o, "{}", serde_json::to_string(&slim)?)?;
                    }
                    results.push(r);
                }
            }
            let refs: Vec<&RunResult> = results.iter().collect();
            let cell = Cell {
                experiment: "grid".into(),
                workload: a.workload.clone(),
                engines: n,
                rate: plan::load_label(x),
                policies: criterion::policy_cells(&refs, a.slo_ms),
            };
            print_cell(&cell, default, results.first().map_or(0, |r| r.requests));
            if a.moves {
                println!(
                    "{:<20} {:>10} {:>8} {:>10} {:>11}",
                    "policy", "follow-ups", "moved", "moved hit", "stayed hit"
                );
                for p in &policies {
                    let (f, m, mh, sh) = moved.get(p.as_str()).copied().unwrap_or_default();
                    println!(
                        "{:<20} {:>10} {:>7.1}% {:>10.3} {:>11.3}",
                        p.as_str(),
                        f,
                        100.0 * m as f64 / f.max(1) as f64,
                        mh / m.max(1) as f64,
                        sh / (f - m).max(1) as f64
                    );
                }
            }
        }
    }
    Ok(())
}

/// A cell as a table: every policy's P95 (mean over repeats, and their spread), mean TTFT, SLO
/// attainment and hit rate, the best of each marked; then the default's standing, as the study's
/// opening table judges it ([`criterion::verdict`]).
fn print_cell(cell: &Cell, default: PolicyKind, requests: usize) {
    println!(
        "\nN = {}, {} ({requests} requests a run)",
        cell.engines, cell.rate
    );
    println!(
        "{:<20} {:>10} {:>19} {:>10} {:>7} {:>6}",
        "policy", "P95 ms", "P95 spread", "mean ms", "SLO", "hit"
    );
    // The bests do not depend on whose standing is judged: without the default in the cell,
    // take them from a verdict on its first policy, and print no standing.
    let judged = criterion::verdict(cell, default);
    let Some(v) = judged.clone().or_else(|| {
        let first: PolicyKind = cell.policies.first()?.policy.parse().ok()?;
        criterion::verdict(cell, first)
    }) else {
        return;
    };
    let mark = |p: &str, best: &(String, f64)| if p == best.0 { "*" } else { " " };
    for c in &cell.policies {
        println!(
            "{:<20} {:>9.0}{} {:>9.0}-{:<9.0} {:>9.0}{} {:>7.3} {:>5.3}{}",
            c.policy,
            c.p95,
            mark(&c.policy, &v.best_p95),
            c.p95_range.0,
            c.p95_range.1,
            c.mean,
            mark(&c.policy, &v.best_mean),
            c.slo,
            c.hit,
            mark(&c.policy, &v.best_hit)
        );
    }
    let Some(v) = judged else {
        return;
    };
    println!(
        "{}: P95 {:.2}x the best, mean {:.2}x the best, hit {:+.3} against the best{}{}",
        default.as_str(),
        v.p95_ratio,
        v.mean_ratio,
        v.hit_diff,
        v.over_round_robin.map_or(String::new(), |x| format!(
            "; round_robin's P95 / its P95 = {x:.2}"
        )),
        if v.losses.is_empty() {
            String::new()
        } else {
            format!("; loses on {}", v.losses.join(", "))
        }
    );
}
