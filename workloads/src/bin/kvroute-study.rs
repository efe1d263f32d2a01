//! The routing study from one command: experiments 1-4 of the research plan on the live stack
//! (emulated engines by default), the oracle bounds, figures and an HTML report.
//!
//! Reduced (default, about 9 minutes on 2 cores) or `--full`. Every run is a row of
//! `<out>/runs.jsonl` with its spec and seed, queue-depth samples, engine TTFT quantiles and the
//! changes of Envoy's kvroute counters; every live run's requests are lines of
//! `<out>/requests/<run id>.jsonl`; `<out>/report.html` is self-contained.
//!
//! The sustainable rate: session arrival rates are probed with the plan's search policy
//! (`round_robin`), doubling from its start rate, then bisecting between the last rate within the
//! objective and the first over it; 1x is the highest probed rate at which P95 TTFT stays within
//! the objective and no request fails. Every run's conversations arrive over the plan's window at
//! its rate (rate x window of them), so 2x is twice the load, not the same conversations sooner.
//! Experiments then run at the plan's multiples of it (0.5x, 1x, 2x).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use kvroute_core::policy::PolicyKind;
use kvroute_core::PolicySettings;
use kvroute_emulator::engine::EngineConfig;
use kvroute_harness::emulated::EmulatedEngine;
use kvroute_harness::peer;
use kvroute_loadgen::analyze::{analyze, Analysis, BLOCK};
use kvroute_loadgen::calibrate::calibrate;
use kvroute_sim::{GatewayCost, SimConfig};
use kvroute_study::plan::{
    self, load_label, rag_sessions, sharegpt_sessions, GridLoad, SimulatedPlan, StudyPlan, Workload,
};
use kvroute_study::report;
use kvroute_study::search::{another_sample, verdict, RateSearch};
use kvroute_study::simulated;
use kvroute_study::study::{
    save, Lab, RunResult, RunSpec, SEND_DELAY_QUANTILES, VALIDATION_STALLED,
};
use kvroute_traces::{agentic, arrivals, mooncake, with_arrivals, words, Session, Turn};

#[derive(Parser, Debug)]
#[command(about = "Run the routing study (experiments 1-4) and write the report")]
struct Args {
    /// The full-size study (the embedded `plans/full.toml`: more sessions, finer sweeps).
    #[arg(long)]
    full: bool,
    /// A study plan file (TOML; see `workloads/study/plans/reduced.toml`) instead of the embedded one.
    #[arg(long, conflicts_with = "full")]
    plan: Option<PathBuf>,
    /// ShareGPT file.
    #[arg(long, default_value = "../shared/data/sharegpt_dev_3000.json")]
    sharegpt: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "results/study")]
    out: PathBuf,
    /// Engine profile.
    #[arg(long, default_value = "rtx5080-llama3.2-3b")]
    profile: String,
    /// Emulated time per wall time.
    #[arg(long, default_value_t = 8.0)]
    time_scale: f64,
    /// Repeats per configuration (overrides the plan's; seeds 1, 2, 3, ...).
    #[arg(long)]
    repeats: Option<usize>,
    /// Mooncake JSONL trace (experiment 5).
    #[arg(long, default_value = "../shared/data/mooncake_synthetic_trace.jsonl")]
    mooncake: PathBuf,
    /// Engine profile of the Mooncake runs (prompts up to 40k tokens need a large KV cache).
    #[arg(long, default_value = "h100-llama3.1-8b")]
    mooncake_profile: String,
    /// Skip the simulated part (validation and experiment 5).
    #[arg(long)]
    no_sim: bool,
    /// Run experiments 1-4 against these engines instead of emulated ones (repeat the flag, one
    /// per engine: `--engine-url http://gpu0:8000 --engine-url http://gpu1:8000`). Real time;
    /// calibration runs against the first engine; the simulated part is skipped (its validation
    /// needs emulated engines of a known profile).
    #[arg(long = "engine-url")]
    engine_urls: Vec<String>,
    /// The `model` of every request (what the engines serve; required by real vLLM).
    #[arg(long)]
    model: Option<String>,
}

/// A simulated sweep's run: its experiment, its policy and its runtime values.
type SweepRun = (&'static str, PolicyKind, Vec<(String, String)>);

/// The simulated sweeps' runs: `load_cache_aware` at every (alpha, beta) of the plan under
/// experiment `ab`, then every directory publish interval under experiment `staleness`, for the
/// default policy and for `load_cache_aware`.
fn sweeps(plan: &SimulatedPlan, ab: &'static str, staleness: &'static str) -> Vec<SweepRun> {
    let mut out = Vec::new();
    for alpha in &plan.ab {
        for beta in &plan.ab {
            out.push((
                ab,
                PolicyKind::LoadCacheAware,
                vec![
                    ("kvroute.alpha".to_string(), alpha.clone()),
                    ("kvroute.beta".to_string(), beta.clone()),
                ],
            ));
        }
    }
    let default = kvroute_core::PolicySettings::default().policy;
    let mut policies = vec![default];
    if default != PolicyKind::LoadCacheAware {
        policies.push(PolicyKind::LoadCacheAware);
    }
    for policy in policies {
        for iv in &plan.intervals {
            out.push((
                staleness,
                policy,
                vec![("kvroute.publish_interval_ms".to_string(), iv.clone())],
            ));
        }
    }
    out
}

/// Runs one spec, logs a line, appends it to `out/runs.jsonl`.
async fn run(
    lab: &mut Lab,
    out: &std::path::Path,
    n: &mut usize,
    spec: RunSpec,
    warm: Vec<Session>,
    meas: Vec<Session>,
) -> anyhow::Result<RunResult> {
    *n += 1;
    let r = lab.run(&spec, warm, meas).await?;
    eprintln!("study: run {:>3} {}", n, summary(&r));
    save(out, &r)?;
    Ok(r)
}

/// One log line's worth of a run: experiment, engines, policy, rate, runtime values, results.
fn summary(r: &RunResult) -> String {
    format!(
        "{:<14} N={:<2} {:<24} {:<5} {:<34} hit {:.3} p95 TTFT {:>7.0} ms",
        r.spec.experiment,
        r.per_endpoint.len(),
        r.spec.label(),
        r.spec.rate_label,
        r.spec
            .runtime
            .iter()
            .map(|(k, v)| format!("{}={v}", k.trim_start_matches("kvroute.")))
            .collect::<Vec<_>>()
            .join(","),
        r.hit_rate,
        r.ttft_ms[1]
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let t0 = Instant::now();
    let (source, plan_text) = match (&a.plan, a.full) {
        (Some(path), _) => (
            path.display().to_string(),
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("plan {}: {e}", path.display()))?,
        ),
        (None, true) => ("embedded plans/full.toml".into(), plan::FULL.to_string()),
        (None, false) => (
            "embedded plans/reduced.toml".into(),
            plan::REDUCED.to_string(),
        ),
    };
    let mut plan =
        StudyPlan::parse(&plan_text).map_err(|e| anyhow::anyhow!("plan {source}: {e}"))?;
    if let Some(r) = a.repeats {
        plan.repeats = r.max(1);
        for e in &mut plan.experiments {
            e.repeats = None;
            e.peer_repeats = None;
        }
        plan.simulated.validation_repeats = None;
    }
    eprintln!(
        "study: plan {:?} ({source}): {} live experiments, {} repeats",
        plan.name,
        plan.experiments.len(),
        plan.repeats
    );
    let text = std::fs::read_to_string(&a.sharegpt)?;
    if a.out.exists() {
        std::fs::remove_dir_all(&a.out)?;
    }
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("plan.toml"), plan.to_toml())?;
    let remote = !a.engine_urls.is_empty();
    let mut lab = if remote {
        eprintln!(
            "study: {} engines by URL ({}), the sidecar and Envoy with kvroute, real time",
            a.engine_urls.len(),
            a.engine_urls.join(", ")
        );
        Lab::remote(&a.engine_urls, a.model.clone()).await?
    } else {
        eprintln!(
            "study: starting 2 emulated engines ({}, x{}), the sidecar and Envoy with kvroute",
            a.profile, a.time_scale
        );
        let mut lab = Lab::emulated(2, &a.profile, a.time_scale).await?;
        lab.model = a.model.clone();
        lab
    };
    let engines = lab.engine_urls.len();
    // The smallest KV cache the engines report, tokens: the report states it and sizes the
    // capacity bound by it.
    let kv_tokens = lab
        .kv_capacity_tokens()
        .await?
        .into_iter()
        .min()
        .unwrap_or(0);
    lab.records_dir = Some(a.out.join("requests"));
    let mut results: Vec<RunResult> = Vec::new();
    let mut n = 0usize;
    // Sustainable rate: doubling, then bisection, each probe sized by its rate.
    let search = plan.search.clone();
    let mut probes = RateSearch::new(search.start_rate, search.max_steps, search.bisect_steps);
    while let Some(rate) = probes.next() {
        // A probe too close to the objective to call is repeated with the next seed, and the
        // mean of the two decides.
        let count = plan.search_sessions_at(rate);
        let mut samples: Vec<(f64, usize)> = Vec::new();
        for rep in 0..2 {
            let spec = RunSpec::new(
                "search",
                "sharegpt",
                search.policy,
                rate,
                &format!("{rate}/s"),
                rep,
            );
            let seed = rep as u64 + 1;
            let sessions = sharegpt_sessions(&text, &plan.sharegpt, count, seed, rate, 0)?;
            let r = run(&mut lab, &a.out, &mut n, spec, vec![], sessions).await?;
            samples.push((r.ttft_ms[1], r.failed));
            results.push(r);
            if !another_sample(&samples, search.slo_ms) {
                break;
            }
        }
        probes.record(verdict(&samples, search.slo_ms));
    }
    let capped = probes.capped();
    let sustainable = probes.knee().unwrap_or_else(|| {
        eprintln!(
            "study: warning: even {} sessions/s missed the objective; the experiments run at it",
            search.start_rate
        );
        search.start_rate
    });
    eprintln!(
        "study: sustainable rate {sustainable} sessions/s (P95 TTFT <= {} ms with {}{}); {} conversations per run at 1x",
        search.slo_ms,
        search.policy,
        if capped { ", capped: no probe missed" } else { "" },
        plan.sharegpt.sessions_at(sustainable)
    );
    // The live experiments of the plan: every rate x policy x grid point, each repeated.
    let warm = |seed: u64, rate: f64| -> anyhow::Result<Vec<Session>> {
        let mut v = sharegpt_sessions(
            &text,
            &plan.sharegpt,
            plan.sharegpt.warmup_sessions,
            seed + 1000,
            rate,
            1500,
        )?;
        if plan.sharegpt.warmup_turns > 0 {
            for s in &mut v {
                s.turns.truncate(plan.sharegpt.warmup_turns);
            }
        }
        Ok(v)
    };
    // Peer routers named by the plan, at their installed versions.
    let mut peer_versions: std::collections::BTreeMap<String, String> = Default::default();
    for p in plan.experiments.iter().flat_map(|e| &e.peers) {
        let router = peer::Peer::parse(p).map_err(|e| anyhow::anyhow!(e))?.router;
        if let std::collections::btree_map::Entry::Vacant(e) = peer_versions.entry(router) {
            let v = peer::peer_version(e.key())?;
            e.insert(v);
        }
    }
    for exp in &plan.experiments {
        let policies = exp.policies.resolve().map_err(|e| anyhow::anyhow!(e))?;
        let peers = exp
            .peers
            .iter()
            .map(|p| {
                peer::Peer::parse(p).map(|p| peer::Peer {
                    version: peer_versions.get(&p.router).cloned().unwrap_or_default(),
                    ..p
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!(e))?;
        for rate in &exp.rates {
            let r_ = sustainable * rate.x;
            // The same sessions and seeds for every policy and peer.
            let sessions = |rep: usize| -> anyhow::Result<(Vec<Session>, Vec<Session>)> {
                let seed = rep as u64 + 1;
                Ok(match exp.workload {
                    Workload::Sharegpt => (
                        if exp.warmup {
                            warm(seed, r_)?
                        } else {
                            Vec::new()
                        },
                        sharegpt_sessions(
                            &text,
                            &plan.sharegpt,
                            plan.sharegpt.sessions_at(r_),
                            seed,
                            r_,
                            0,
                        )?,
                    ),
                    Workload::Rag => (Vec::new(), rag_sessions(&plan.rag, seed, r_)),
                })
            };
            // Repeat by repeat, every peer and policy in each: a slow spell of the host then
            // touches one repeat of the few runs it overlaps, not every repeat of one policy.
            let policy_repeats = exp.repeats.unwrap_or(plan.repeats);
            let peer_repeats = exp.peer_repeats.or(exp.repeats).unwrap_or(plan.repeats);
            for rep in 0..policy_repeats.max(peer_repeats) {
                if rep < peer_repeats {
                    for peer in &peers {
                        let spec = RunSpec::new(
                            &exp.name,
                            exp.workload.as_str(),
                            PolicyKind::default(),
                            r_,
                            &rate.label,
                            rep,
                        )
                        .with_peer(peer.clone());
                        let (warm_up, measured) = sessions(rep)?;
                        results.push(run(&mut lab, &a.out, &mut n, spec, warm_up, measured).await?);
                    }
                }
                if rep >= policy_repeats {
                    continue;
                }
                for p in &policies {
                    for point in exp.points() {
                        let spec = RunSpec::new(
                            &exp.name,
                            exp.workload.as_str(),
                            *p,
                            r_,
                            &rate.label,
                            rep,
                        )
                        .with_runtime(point.clone());
                        let (warm_up, measured) = sessions(rep)?;
                        results.push(run(&mut lab, &a.out, &mut n, spec, warm_up, measured).await?);
                    }
                }
            }
            // Runtime values of a grid do not carry over to the next experiment.
            if let (false, Some(p)) = (exp.grid.is_empty(), policies.last()) {
                let defaults: Vec<(String, String)> = exp
                    .grid
                    .keys()
                    .map(|k| {
                        let v = PolicySettings::default()
                            .runtime_value(k)
                            .unwrap_or_default();
                        (k.clone(), v)
                    })
                    .collect();
                lab.configure(*p, &defaults).await?;
            }
        }
    }
    lab.envoy
        .runtime_modify(&[("kvroute.publish_interval_ms", "0")])
        .await?;

    drop(lab);
    let simulator = if a.no_sim || remote {
        if remote {
            eprintln!("study: engines by URL: the simulated part is skipped");
        }
        None
    } else {
        let gateway_ms =
            validation_live(&a, &plan, &text, &mut results, &mut n, sustainable).await?;
        Some(simulated_part(&a, &plan, &text, &mut results, gateway_ms)?)
    };

    // Calibration of the profile, on a separate engine at real time (the lab's engines run faster,
    // which would multiply the host's timing noise).
    let first_url = a.engine_urls.first().cloned().unwrap_or_default();
    let calib_engine = if remote {
        eprintln!("study: calibrating against {first_url}");
        None
    } else {
        eprintln!("study: calibrating the {} profile", a.profile);
        Some(EmulatedEngine::start("calibration", &a.profile, 1.0).await?)
    };
    let calib_url = calib_engine
        .as_ref()
        .map_or_else(|| first_url.clone(), EmulatedEngine::url);
    let calibration = calibrate(
        &calib_url,
        &[128, 256, 512, 1024, 2048, 4096, 8192],
        &[1, 2, 4, 8, 16, 32],
        1.0,
    )
    .await?;
    drop(calib_engine);

    // The oracle bounds of the measured workloads (seed 1), for engines of the KV capacity they
    // report (the smallest, in blocks of the bound's 16 tokens).
    let model = "meta-llama/Llama-3.2-3B-Instruct";
    let kv_blocks = usize::try_from(kv_tokens / BLOCK as u64).unwrap_or(usize::MAX);
    // ShareGPT at every rate of experiment 1 (the capacity bound falls as more conversations are
    // in flight), RAG at experiment 2's.
    let mut bounds: Vec<(String, Analysis)> = Vec::new();
    let exp_rates = |name: &str| -> Vec<plan::Rate> {
        plan.experiments
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.rates.clone())
            .unwrap_or_default()
    };
    for rate in exp_rates("exp1") {
        let r_ = sustainable * rate.x;
        let sessions = sharegpt_sessions(
            &text,
            &plan.sharegpt,
            plan.sharegpt.sessions_at(r_),
            1,
            r_,
            0,
        )?;
        bounds.push((
            format!("sharegpt {}", rate.label),
            analyze(&sessions, model, engines, kv_blocks),
        ));
    }
    for rate in exp_rates("exp2") {
        let sessions = rag_sessions(&plan.rag, 1, sustainable * rate.x);
        bounds.push(("rag".into(), analyze(&sessions, model, engines, kv_blocks)));
    }
    let meta = report::Meta {
        mode: plan.name.clone(),
        profile: if remote {
            format!("engines at {}", a.engine_urls.join(", "))
        } else {
            a.profile.clone()
        },
        kv_tokens_per_engine: kv_tokens,
        time_scale: if remote { 1.0 } else { a.time_scale },
        engines,
        sustainable_rate: sustainable,
        slo_ms: plan.search.slo_ms,
        search_capped: capped,
        repeats: plan.repeats,
        sessions: plan.sharegpt.sessions_at(sustainable),
        window_s: plan.sharegpt.window_s,
        search_window_s: plan.search_window_s(),
        wall_s: t0.elapsed().as_secs_f64(),
        envoy: "1.40.0".into(),
        kvroute: env!("CARGO_PKG_VERSION").into(),
        simulator,
    };
    let path = report::write(&a.out, &results, &bounds, Some(&calibration), &meta)?;
    println!(
        "study: {} runs in {:.0} s; report: {}",
        results.len(),
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

/// The gateway's per-request cost (ms of emulated time): the clients' mean TTFT minus the engines'
/// mean TTFT over short requests sent one at a time, so no queue forms.
async fn gateway_probe(lab: &mut Lab, out: &std::path::Path, n: &mut usize) -> anyhow::Result<f64> {
    let sessions: Vec<Session> = (0..12u64)
        .map(|i| Session {
            id: format!("probe-{i}"),
            start_ms: i as f64 * 400.0,
            system: None,
            turns: vec![Turn {
                user: words(90_000 + i, 64),
                assistant: None,
                max_tokens: 8,
            }],
            think_ms: 0.0,
        })
        .collect();
    let spec = RunSpec::new("probe", "probe", PolicyKind::RoundRobin, 2.5, "idle", 0);
    let r = run(lab, out, n, spec, vec![], sessions).await?;
    let client = r.ttfts.iter().sum::<f64>() / r.ttfts.len().max(1) as f64;
    let cost = (client - r.engine_ttft_mean_ms).max(0.0);
    eprintln!(
        "study: gateway cost {cost:.2} ms (client TTFT {client:.2} ms, engine TTFT {:.2} ms)",
        r.engine_ttft_mean_ms
    );
    Ok(cost)
}

/// The client's send delay over the live validation runs: the mean of their quantiles, quantile
/// by quantile (empty if none says).
fn pooled_send_delay(results: &[RunResult]) -> Vec<f64> {
    let runs: Vec<&[f64]> = results
        .iter()
        .filter(|r| r.spec.experiment == "val-live")
        .map(|r| r.send_delay_ms.as_slice())
        .filter(|q| q.len() == SEND_DELAY_QUANTILES)
        .collect();
    if runs.is_empty() {
        return Vec::new();
    }
    (0..SEND_DELAY_QUANTILES)
        .map(|i| runs.iter().filter_map(|q| q.get(i)).sum::<f64>() / runs.len() as f64)
        .collect()
}

/// Logs and saves one simulated run.
fn keep(out: &std::path::Path, results: &mut Vec<RunResult>, r: RunResult) -> anyhow::Result<()> {
    eprintln!("study: sim {}", summary(&r));
    save(out, &r)?;
    results.push(r);
    Ok(())
}

/// [`keep`] for each of `runs`, in order.
fn keep_all(
    out: &std::path::Path,
    results: &mut Vec<RunResult>,
    runs: Vec<RunResult>,
) -> anyhow::Result<()> {
    runs.into_iter().try_for_each(|r| keep(out, results, r))
}

/// The live half of the simulator's validation, on a lab of its own at the plan's validation time
/// scale, real time or close to it (at the study's x8 every millisecond of host overhead is eight
/// emulated ones, and on a small machine that noise, not the model, would dominate the
/// comparison): the gateway's per-request cost from idle probes, then experiment 1's workload at
/// 1x (the plan's validation conversations) for the validation policies, every validation repeat,
/// no warm-up.
/// Returns the gateway cost in emulated ms.
async fn validation_live(
    a: &Args,
    plan: &StudyPlan,
    text: &str,
    results: &mut Vec<RunResult>,
    n: &mut usize,
    rate: f64,
) -> anyhow::Result<f64> {
    let scale = plan.simulated.validation_time_scale;
    eprintln!("study: validation lab: 2 emulated engines at x{scale}");
    let mut lab = Lab::emulated(2, &a.profile, scale).await?;
    lab.records_dir = Some(a.out.join("requests"));
    let gateway_ms = gateway_probe(&mut lab, &a.out, n).await?;
    let policies = plan
        .simulated
        .validation_policies
        .resolve()
        .map_err(|e| anyhow::anyhow!(e))?;
    let (bound, attempts) = (
        plan.simulated.validation_max_send_delay_ms,
        plan.simulated.validation_attempts,
    );
    for p in policies {
        for rep in 0..plan.validation_repeats() {
            let seed = rep as u64 + 1;
            let spec = RunSpec::new("val-live", "sharegpt", p, rate, "1x", rep);
            for attempt in 1..=attempts {
                let meas = sharegpt_sessions(
                    text,
                    &plan.sharegpt,
                    plan.simulated.validation_sessions,
                    seed,
                    rate,
                    0,
                )?;
                *n += 1;
                let mut r = lab.run(&spec, vec![], meas).await?;
                let late = r.max_send_delay_ms().unwrap_or(0.0);
                let stalled = late > bound && attempt < attempts;
                if stalled {
                    eprintln!(
                        "study: run {:>3} {}: a turn went {late:.0} ms late (bound {bound} ms), a host stall; set aside as {VALIDATION_STALLED}, attempt {attempt} of {attempts}",
                        n,
                        summary(&r)
                    );
                    set_aside(&mut r, attempt)?;
                } else {
                    eprintln!("study: run {:>3} {}", n, summary(&r));
                }
                save(&a.out, &r)?;
                results.push(r);
                if !stalled {
                    break;
                }
            }
        }
    }
    Ok(gateway_ms)
}

/// Marks a live validation run as set aside, and moves its request records to a file of their
/// own (the next attempt writes the run's usual one).
fn set_aside(r: &mut RunResult, attempt: usize) -> anyhow::Result<()> {
    r.spec.experiment = VALIDATION_STALLED.into();
    if let Some(file) = r.requests_file.take() {
        let to = file.replace(".jsonl", &format!("-stalled-{attempt}.jsonl"));
        std::fs::rename(&file, &to)?;
        r.requests_file = Some(to);
    }
    Ok(())
}

/// The simulated part: every validation run again in the simulator, then
/// experiment 5 (N = 2 to 64; staleness and alpha/beta at N = 8; Mooncake at N = 8 and 16).
fn simulated_part(
    a: &Args,
    plan: &StudyPlan,
    text: &str,
    results: &mut Vec<RunResult>,
    gateway_ms: f64,
) -> anyhow::Result<report::SimMeta> {
    let t0 = Instant::now();
    let half = (gateway_ms * 500.0).round() as u64;
    let engine = simulated::engine_config(&a.profile)?;
    // The live client's send delay, pooled over the live validation runs: the simulated clients
    // draw theirs from it, so close sends reorder as they do live.
    let send_delay_ms = pooled_send_delay(results);
    if let Some((p50, max)) = report::median_and_max(&send_delay_ms) {
        eprintln!(
            "study: client send delay p50 {p50:.2} ms, max {max:.2} ms (live validation runs)"
        );
    }
    let send_delay_us: Vec<u64> = send_delay_ms
        .iter()
        .map(|ms| (ms * 1000.0).round() as u64)
        .collect();
    let base = |n: usize, engine: &EngineConfig| SimConfig {
        gateway: GatewayCost {
            request_us: half,
            response_us: half,
        },
        send_delay_us: send_delay_us.clone(),
        // The same share of blocks as the live engines follow (`KV_CACHE_METRICS_SAMPLE`).
        kv_residency_sample: Some(kvroute_harness::emulated::KV_CACHE_METRICS_SAMPLE),
        ..SimConfig::new(n, engine.clone(), PolicySettings::default())
    };

    // Validation: the live validation runs, simulated, each under the plan's router seeds (the
    // report pools them).
    let live: Vec<RunResult> = results
        .iter()
        .filter(|r| r.spec.experiment == "val-live")
        .cloned()
        .collect();
    let b2 = base(2, &engine);
    for r in &live {
        let spec = RunSpec {
            experiment: "val-sim".into(),
            ..r.spec.clone()
        };
        let m = simulated::prepare_for(
            &b2,
            &sharegpt_sessions(
                text,
                &plan.sharegpt,
                plan.simulated.validation_sessions,
                spec.seed,
                spec.rate,
                0,
            )?,
        );
        let specs: Vec<RunSpec> = (0..plan.simulated.validation_router_seeds as u64)
            .map(|k| RunSpec {
                router_seed: (k > 0).then(|| spec.seed + 1000 * k),
                ..spec.clone()
            })
            .collect();
        keep_all(&a.out, results, simulated::run_each(&specs, &b2, &m)?)?;
    }

    // Experiment 5. The load per engine: the highest session rate per engine (doubling from
    // 0.125/s) at which round_robin keeps P95 TTFT within the objective at N = 2. Runs are long
    // enough (sessions per engine) for queues to reach a steady state, which the live runs' size
    // does not allow.
    let sim = &plan.simulated;
    let sim_policies = sim.policies.resolve().map_err(|e| anyhow::anyhow!(e))?;
    let sessions_at = |n: usize, rate: f64, seed: u64| -> anyhow::Result<Vec<Session>> {
        sharegpt_sessions(
            text,
            &plan.sharegpt,
            sim.sessions_per_engine * n,
            seed,
            rate * n as f64,
            0,
        )
    };
    let knee = simulated::knee(
        &b2,
        |rate, seed| sessions_at(2, rate, seed),
        plan.search.slo_ms,
        |r| keep(&a.out, results, r),
    )?;
    // Experiment 5 runs at half the knee: loaded, but short of saturation at N = 2, where
    // placement rather than overload decides.
    let per_engine = knee / 2.0;
    eprintln!(
        "study: simulated knee {knee:.3} sessions/s per engine; experiment 5 at {per_engine:.3}"
    );
    for &n in &sim.engines {
        let b = base(n, &engine);
        for rep in 0..plan.repeats {
            let seed = rep as u64 + 1;
            let work = simulated::prepare_for(&b, &sessions_at(n, per_engine, seed)?);
            let specs: Vec<RunSpec> = sim_policies
                .iter()
                .map(|p| RunSpec::new("exp5", "sharegpt", *p, per_engine * n as f64, "1x", rep))
                .collect();
            keep_all(&a.out, results, simulated::run_each(&specs, &b, &work)?)?;
        }
    }
    // The rest of the default policy's criterion grid (`exp5-grid`), at experiment 5's load.
    let grid = GridLoad::new(text, plan, per_engine, sim.sessions_per_engine)?;
    for g in &sim.grid {
        let one = grid.one_x(text, plan, g.workload)?;
        eprintln!(
            "study: grid {} at 1x: {one:.3} sessions/s per engine",
            g.workload.as_str()
        );
        for &n in &g.engines {
            let b = SimConfig {
                record_itl: false,
                ..base(n, &engine)
            };
            for &x in &g.loads {
                for rep in 0..plan.repeats {
                    let seed = rep as u64 + 1;
                    let work = simulated::prepare_for(
                        &b,
                        &grid.sessions(text, plan, g.workload, n, one * x, seed)?,
                    );
                    let specs: Vec<RunSpec> = sim_policies
                        .iter()
                        .map(|p| {
                            RunSpec::new(
                                "exp5-grid",
                                g.workload.as_str(),
                                *p,
                                one * x * n as f64,
                                &load_label(x),
                                rep,
                            )
                        })
                        .collect();
                    keep_all(&a.out, results, simulated::run_each(&specs, &b, &work)?)?;
                }
            }
        }
    }
    // Several gateway replicas at N = gateway_engines, each request to one at random: sharing a
    // fleet log (the live `fleet` section) or each with its own directory. One gateway is the same
    // either way and is run once.
    let ng = sim.gateway_engines;
    let bg = base(ng, &engine);
    let default_policy = kvroute_core::PolicySettings::default().policy;
    for rep in 0..plan.repeats {
        let seed = rep as u64 + 1;
        let work = simulated::prepare_for(&bg, &sessions_at(ng, per_engine, seed)?);
        for &g in &sim.gateways {
            for shared in [true, false] {
                if g == 1 && !shared {
                    continue;
                }
                let cfg = SimConfig {
                    gateways: g,
                    fleet_sync_us: shared.then_some(sim.fleet_sync_ms * 1000),
                    ..bg.clone()
                };
                let experiment = if shared {
                    "exp5-gateways-shared"
                } else {
                    "exp5-gateways-independent"
                };
                let spec = RunSpec::new(
                    experiment,
                    "sharegpt",
                    default_policy,
                    per_engine * ng as f64,
                    &format!("G={g}"),
                    rep,
                );
                keep(&a.out, results, simulated::run(&spec, &cfg, &work)?)?;
            }
        }
    }
    // Staleness and alpha / beta at N = 8.
    let ns = sim.sweep_engines;
    let b8 = base(ns, &engine);
    let sweeps = sweeps(sim, "exp5-ab", "exp5-staleness");
    for rep in 0..plan.repeats {
        let seed = rep as u64 + 1;
        let work = simulated::prepare_for(&b8, &sessions_at(ns, per_engine, seed)?);
        let specs: Vec<RunSpec> = sweeps
            .iter()
            .map(|(experiment, policy, runtime)| {
                RunSpec::new(
                    experiment,
                    "sharegpt",
                    *policy,
                    per_engine * ns as f64,
                    "1x",
                    rep,
                )
                .with_runtime(runtime.clone())
            })
            .collect();
        keep_all(&a.out, results, simulated::run_each(&specs, &b8, &work)?)?;
    }
    // Mooncake at N = 8 and 16, at the trace's own arrival times.
    let big = simulated::engine_config(&a.mooncake_profile)?;
    let mtext = std::fs::read_to_string(&a.mooncake)?;
    let reqs =
        mooncake::parse(&mtext).map_err(|e| anyhow::anyhow!("{}: {e}", a.mooncake.display()))?;
    let biggest = sim.mooncake_engines.iter().copied().max().unwrap_or(1);
    let work = simulated::prepare_for(&base(biggest, &big), &mooncake::sessions(&reqs, 1.0));
    for &n in &sim.mooncake_engines {
        let b = SimConfig {
            record_itl: false,
            ..base(n, &big)
        };
        let specs: Vec<RunSpec> = sim_policies
            .iter()
            .map(|p| RunSpec::new("exp5-mooncake", "mooncake", *p, 0.0, "trace", 0))
            .collect();
        keep_all(&a.out, results, simulated::run_each(&specs, &b, &work)?)?;
    }
    // The agentic workload (coding-agent sessions: a shared 7k-token tool and system prefix,
    // prompts growing to 120k tokens) on 16 engines of the Mooncake profile, every policy.
    let agentic_sessions = {
        let s = agentic::generate(&agentic::AgenticOptions {
            sessions: sim.agentic_sessions,
            seed: 1,
            ..Default::default()
        });
        let starts = arrivals::poisson(s.len(), sim.agentic_rate, 1);
        with_arrivals(s, &starts)
    };
    if sim.agentic_sessions > 0 {
        let b = SimConfig {
            record_itl: false,
            ..base(sim.agentic_engines, &big)
        };
        let work = simulated::prepare_for(&b, &agentic_sessions);
        let specs: Vec<RunSpec> = sim_policies
            .iter()
            .map(|p| RunSpec::new("exp5-agentic", "agentic", *p, sim.agentic_rate, "1x", 0))
            .collect();
        keep_all(&a.out, results, simulated::run_each(&specs, &b, &work)?)?;
    }
    Ok(report::SimMeta {
        gateway_ms,
        send_delay_ms,
        per_instance_rate: per_engine,
        mooncake_profile: a.mooncake_profile.clone(),
        wall_s: t0.elapsed().as_secs_f64(),
        validation_sessions: plan.simulated.validation_sessions,
        validation_time_scale: plan.simulated.validation_time_scale,
        validation_repeats: plan.validation_repeats(),
        fleet_sync_ms: sim.fleet_sync_ms,
        validation_router_seeds: plan.simulated.validation_router_seeds,
        validation_max_send_delay_ms: plan.simulated.validation_max_send_delay_ms,
    })
}
