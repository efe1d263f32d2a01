//! Every policy in one cell of the study's grid, in the simulator: a workload, a fleet size and a
//! load, with repeats, as a table of P95, mean TTFT, SLO attainment and hit rate, the best of each
//! marked, and the default policy's ratio to it.
//!
//! The load is the study's ([`GridLoad`]): `--rate` is experiment 5's ShareGPT sessions/s per
//! engine at 1x (by default half the simulated knee, as the study finds it), each grid workload's
//! 1x offers as many requests per second per engine, and a run's sessions arrive over experiment
//! 5's window (`--sessions-per-engine` / `--rate`). The study's simulated runs also add the live
//! gateway's cost and client send delay, measured in its live part, so its figures differ a
//! little. `agentic` takes `--rate` as its own sessions/s per engine; `mooncake` keeps the trace's
//! times (one cell per fleet, labelled `trace` as in the report, on `--mooncake-profile`, the
//! study's profile for it).
//!
//! ```sh
//! cargo run --release -p kvroute-workloads --bin kvroute-sim-grid -- \
//!   --workload sharegpt-full --engines 8,16 --loads 0.5,1,2 --repeats 3
//! ```

use std::path::PathBuf;

use clap::Parser;
use kvroute_core::policy::PolicyKind;
use kvroute_core::PolicySettings;
use kvroute_sim::SimConfig;
use kvroute_study::criterion::{self, Cell};
use kvroute_study::plan::{self, GridLoad, GridWorkload, StudyPlan};
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
    /// Experiment 5's ShareGPT sessions/s per engine at 1x (default: half the simulated knee);
    /// `agentic`: its own sessions/s per engine.
    #[arg(long)]
    rate: Option<f64>,
    /// Repeats (seeds 1, 2, ...).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Policies (default: every one).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Experiment 5's ShareGPT sessions per engine (its window: these over `--rate`; default: the
    /// plan's); `agentic`: its sessions per engine.
    #[arg(long)]
    sessions_per_engine: Option<usize>,
    /// The full plan's session shapes and run size (`plans/full.toml`) instead of the reduced one.
    #[arg(long)]
    full: bool,
    /// Every cell of the plan's `[[simulated.grid]]` (instead of `--workload`, `--engines` and
    /// `--loads`), then the cells the default loses.
    #[arg(long)]
    plan_grid: bool,
    /// Engine profile.
    #[arg(long, default_value = "rtx5080-llama3.2-3b")]
    profile: String,
    /// Engine profile of the `mooncake` cells, as the study runs them (prompts up to 40k tokens
    /// need a large KV cache).
    #[arg(long, default_value = "h100-llama3.1-8b")]
    mooncake_profile: String,
    /// The `--profile` engines' `--gpu-memory-utilization` (default: the profile's), which sets
    /// their KV capacity as vLLM does: what the cells look like with more or less KV cache per
    /// engine. The `mooncake` cells keep their own profile's.
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
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
    /// Write every run's result here (JSON lines; without the per-request TTFTs and hit timeline).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A runtime value for every run (`--set kvroute.ttft_work_weight=2`; repeat the flag).
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Also print, per policy, where the hits came from: the cached share of the prompt tokens of
    /// one-request sessions, of longer sessions' first requests, and of their follow-ups, split by
    /// whether a follow-up went to another endpoint than the session's previous request (and how
    /// often it did)
    #[arg(long)]
    moves: bool,
    /// Also print, per policy, how long the engines' KV blocks stay cached: vLLM's
    /// `kv_block_idle_before_evict_seconds` and `kv_block_lifetime_seconds` (`--kv-cache-metrics`)
    /// over this share of block allocations (0.01 as vLLM's default), against the think time
    /// between a conversation's turns.
    #[arg(long)]
    kv_residency: Option<f64>,
}

struct Workloads {
    /// The ShareGPT file's text.
    sharegpt: String,
    /// The study's reduced plan: the shapes of the ShareGPT and RAG sessions.
    plan: StudyPlan,
    mooncake: Vec<Session>,
    /// Experiment 5's load and window.
    load: GridLoad,
    /// Experiment 5's sessions per engine.
    sessions_per_engine: usize,
}

/// The sessions of a run of `workload` on `n` engines at `rate` sessions/s per engine (the cell's
/// load times the workload's 1x).
fn sessions(
    workload: &str,
    w: &Workloads,
    n: usize,
    rate: f64,
    seed: u64,
) -> anyhow::Result<Vec<Session>> {
    match workload {
        "mooncake" => Ok(w.mooncake.clone()),
        "agentic" => {
            let picked = agentic::generate(&agentic::AgenticOptions {
                sessions: w.sessions_per_engine * n,
                seed,
                ..Default::default()
            });
            let starts = arrivals::poisson(picked.len(), rate * n as f64, seed);
            Ok(with_arrivals(picked, &starts))
        }
        name => {
            let g = GridWorkload::parse(name)
                .ok_or_else(|| anyhow::anyhow!("unknown workload {name}"))?;
            w.load.sessions(&w.sharegpt, &w.plan, g, n, rate, seed)
        }
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
    let plan = StudyPlan::parse(if a.full { plan::FULL } else { plan::REDUCED })
        .map_err(anyhow::Error::msg)?;
    let spe = a
        .sessions_per_engine
        .unwrap_or(plan.simulated.sessions_per_engine);
    let text = std::fs::read_to_string(&a.sharegpt)?;
    let mooncake = if a.workload == "mooncake" {
        let m = std::fs::read_to_string(&a.mooncake)?;
        let reqs = mooncake::parse(&m).map_err(|e| anyhow::anyhow!("{e}"))?;
        mooncake::sessions(&reqs, 1.0)
    } else {
        Vec::new()
    };
    let runtime: Vec<(String, String)> = a
        .sets
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(anyhow::anyhow!("--set {kv}: want KEY=VALUE")),
        })
        .collect::<anyhow::Result<_>>()?;
    let engine = simulated::engine_config_at(&a.profile, a.gpu_memory_utilization)?;
    let mooncake_engine = simulated::engine_config(&a.mooncake_profile)?;
    if let Some(r) = a.kv_residency {
        if !(r > 0.0 && r <= 1.0) {
            anyhow::bail!("--kv-residency {r}: want a share of block allocations in (0, 1]");
        }
    }
    let base_on = |n: usize, workload: &str| SimConfig {
        record_itl: false,
        kv_residency_sample: a.kv_residency,
        ..SimConfig::new(
            n,
            if keeps_own_times(workload) {
                mooncake_engine.clone()
            } else {
                engine.clone()
            },
            PolicySettings::default(),
        )
    };
    let base = |n: usize| base_on(n, "");
    let mut out = match &a.out {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    let per_engine = match a.rate {
        Some(r) => r,
        None => {
            let sharegpt = |rate: f64, seed: u64| {
                plan::sharegpt_sessions(&text, &plan.sharegpt, spe * 2, seed, rate * 2.0, 0)
            };
            simulated::knee(&base(2), sharegpt, a.slo_ms, |_| Ok(()))? / 2.0
        }
    };
    let w = Workloads {
        load: GridLoad::new(&text, &plan, per_engine, spe)?,
        sessions_per_engine: spe,
        sharegpt: text,
        plan,
        mooncake,
    };
    println!(
        "{} plan, profile {} ({} KV blocks of {} tokens an engine), experiment 5 at \
         {per_engine:.3} ShareGPT sessions/s per engine, {} repeats",
        w.plan.name, a.profile, engine.num_gpu_blocks, engine.block_size, a.repeats
    );
    let cells: Vec<(String, Vec<usize>, Vec<f64>)> = if a.plan_grid {
        w.plan
            .simulated
            .grid
            .iter()
            .map(|g| {
                (
                    g.workload.as_str().to_string(),
                    g.engines.clone(),
                    g.loads.clone(),
                )
            })
            .collect()
    } else {
        vec![(a.workload.clone(), a.engines.clone(), a.loads.clone())]
    };
    let mut lost = Vec::new();
    let mut judged = 0;
    for (workload, engines, loads) in &cells {
        let one_x = match GridWorkload::parse(workload) {
            Some(g) => w.load.one_x(&w.sharegpt, &w.plan, g)?,
            None => per_engine,
        };
        // The trace keeps its own times: one cell per fleet, labelled as the study labels it.
        let loads: &[f64] = if keeps_own_times(workload) {
            println!(
                "\nworkload mooncake: the trace's own times (--loads does not apply), profile {}",
                a.mooncake_profile
            );
            &[1.0]
        } else {
            println!("\nworkload {workload}: 1x = {one_x:.3} sessions/s per engine");
            loads
        };
        for &n in engines {
            for &x in loads {
                let cell = Run {
                    a: &a,
                    w: &w,
                    policies: &policies,
                    runtime: &runtime,
                    base: base_on(n, workload),
                    out: &mut out,
                }
                .cell(workload, n, x, one_x, default)?;
                if let Some(v) = criterion::verdict(&cell, default) {
                    judged += 1;
                    if !v.losses.is_empty() {
                        lost.push(format!(
                            "{workload} N = {n}, {}: {}{}",
                            cell.rate,
                            v.losses.join(", "),
                            v.better_on_both_suffix()
                        ));
                    }
                }
            }
        }
    }
    if a.plan_grid {
        println!(
            "\n{} loses {} of {judged} cells",
            default.as_str(),
            lost.len()
        );
        for l in &lost {
            println!("  {l}");
        }
    }
    Ok(())
}

/// What every cell's runs share.
struct Run<'a, W: std::io::Write> {
    a: &'a Args,
    w: &'a Workloads,
    policies: &'a [PolicyKind],
    runtime: &'a [(String, String)],
    base: SimConfig,
    out: &'a mut Option<W>,
}

impl<W: std::io::Write> Run<'_, W> {
    /// Every policy on `n` engines at `x` times `workload`'s 1x (`one_x` sessions/s per engine),
    /// each repeat; prints the cell (and the moves, when asked) and returns it.
    fn cell(
        &mut self,
        workload: &str,
        n: usize,
        x: f64,
        one_x: f64,
        default: PolicyKind,
    ) -> anyhow::Result<Cell> {
        let b = &self.base;
        let mut results: Vec<RunResult> = Vec::new();
        // Per policy: where its hits came from, over the repeats.
        let mut moved: std::collections::BTreeMap<&str, simulated::Moves> = Default::default();
        // Per policy: its sampled blocks' (lifetime, idle before eviction), over the repeats.
        let mut residency: std::collections::BTreeMap<&str, Vec<(f64, f64)>> = Default::default();
        let mut think_s: Vec<f64> = Vec::new();
        let reps = if keeps_own_times(workload) {
            1
        } else {
            self.a.repeats
        };
        for rep in 0..reps {
            let seed = rep as u64 + 1;
            let work = simulated::prepare_for(b, &sessions(workload, self.w, n, one_x * x, seed)?);
            think_s.extend(
                work.iter()
                    .filter(|s| s.turns.len() > 1)
                    .map(|s| s.think_us as f64 / 1e6),
            );
            for p in self.policies {
                let spec = RunSpec::new(
                    "grid",
                    workload,
                    *p,
                    one_x * x * n as f64,
                    &load_label(workload, x),
                    rep,
                )
                .with_runtime(self.runtime.to_vec());
                let (r, sim_out) = simulated::run_with_output(&spec, b, &work)?;
                *moved.entry(p.as_str()).or_default() += simulated::moves(&sim_out);
                residency
                    .entry(p.as_str())
                    .or_default()
                    .extend(&sim_out.block_residency);
                if let Some(o) = self.out.as_mut() {
                    let mut slim = r.clone();
                    slim.ttfts.clear();
                    slim.hit_timeline.clear();
                    writeln!(o, "{}", serde_json::to_string(&slim)?)?;
                }
                results.push(r);
            }
        }
        let refs: Vec<&RunResult> = results.iter().collect();
        let cell = Cell {
            experiment: "grid".into(),
            workload: workload.to_string(),
            engines: n,
            rate: load_label(workload, x),
            policies: criterion::policy_cells(&refs, self.a.slo_ms),
        };
        print_cell(&cell, default, results.first().map_or(0, |r| r.requests));
        if self.a.moves {
            println!(
                "{:<20} {:>10} {:>10} {:>10} {:>8} {:>10} {:>11}",
                "policy",
                "single hit",
                "first hit",
                "follow-ups",
                "moved",
                "moved hit",
                "stayed hit"
            );
            for p in self.policies {
                let m = moved.get(p.as_str()).copied().unwrap_or_default();
                println!(
                    "{:<20} {:>10.3} {:>10.3} {:>10} {:>7.1}% {:>10.3} {:>11.3}",
                    p.as_str(),
                    m.single.hit(),
                    m.opening.hit(),
                    m.follow_ups(),
                    100.0 * m.moved.requests as f64 / m.follow_ups().max(1) as f64,
                    m.moved.hit(),
                    m.stayed.hit()
                );
            }
        }
        if self.a.kv_residency.is_some() {
            print_residency(self.policies, &mut residency, &mut think_s);
        }
        Ok(cell)
    }
}

/// Per policy, the sampled blocks' idle time before eviction and lifetime (seconds: P10, median,
/// P90), against the median think time between a conversation's turns.
fn print_residency(
    policies: &[PolicyKind],
    residency: &mut std::collections::BTreeMap<&str, Vec<(f64, f64)>>,
    think_s: &mut [f64],
) {
    let q = |v: &[f64], p: f64| -> f64 {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    think_s.sort_by(f64::total_cmp);
    println!(
        "KV blocks evicted (sampled), seconds: idle before eviction and lifetime, P10 / median / \
         P90; median think time between turns {:.1} s",
        q(think_s, 0.5)
    );
    println!(
        "{:<20} {:>8} {:>22} {:>22}",
        "policy", "blocks", "idle before eviction", "lifetime"
    );
    for p in policies {
        let v = residency.entry(p.as_str()).or_default();
        let mut idle: Vec<f64> = v.iter().map(|(_, i)| *i).collect();
        let mut life: Vec<f64> = v.iter().map(|(l, _)| *l).collect();
        idle.sort_by(f64::total_cmp);
        life.sort_by(f64::total_cmp);
        let three = |x: &[f64]| format!("{:.1} / {:.1} / {:.1}", q(x, 0.1), q(x, 0.5), q(x, 0.9));
        println!(
            "{:<20} {:>8} {:>22} {:>22}",
            p.as_str(),
            idle.len(),
            three(&idle),
            three(&life)
        );
    }
}

/// Whether `workload` is a trace that keeps its own times (Mooncake): one run per fleet, on the
/// Mooncake profile, whatever the loads and repeats.
fn keeps_own_times(workload: &str) -> bool {
    workload == "mooncake"
}

/// A cell's load as the report labels it: `trace` for the Mooncake trace, which keeps its own
/// times (and so is not judged against the 1x line), else the multiple of 1x.
fn load_label(workload: &str, x: f64) -> String {
    if keeps_own_times(workload) {
        "trace".into()
    } else {
        plan::load_label(x)
    }
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
            format!(
                "; loses on {}{}",
                v.losses.join(", "),
                v.better_on_both_suffix()
            )
        }
    );
}
