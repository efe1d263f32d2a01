//! The routing study from one command: experiments 1-4 of the research plan on the live stack
//! (emulated engines by default), the oracle bounds, figures and an HTML report.
//!
//! Reduced (default, about 10 minutes on 2 cores) or `--full`. Every run is a row of
//! `<out>/runs.jsonl` with its spec and seed; `<out>/report.html` is self-contained.
//!
//! The sustainable rate: session arrival rates are probed with `round_robin`, doubling from
//! `--start-rate`; 1x is the highest probed rate at which P95 TTFT stays under `--slo-ms` and no
//! request fails. Experiments then run at 0.5x, 1x and 2x of it.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use kvroute_core::policy::PolicyKind;
use kvroute_traces::{arrivals, rag, sharegpt, with_arrivals, Session};
use kvroute_workloads::analyze::{analyze, Analysis};
use kvroute_workloads::calibrate::calibrate;
use kvroute_workloads::emulated::EmulatedEngine;
use kvroute_workloads::report;
use kvroute_workloads::study::{save, Lab, RunResult, RunSpec};

#[derive(Parser, Debug)]
#[command(about = "Run the routing study (experiments 1-4) and write the report")]
struct Args {
    /// The full-size study (more sessions, finer sweeps).
    #[arg(long)]
    full: bool,
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
    /// TTFT objective of the sustainable-rate search, ms (P95).
    #[arg(long, default_value_t = 1000.0)]
    slo_ms: f64,
    /// First probed rate, sessions/s.
    #[arg(long, default_value_t = 0.5)]
    start_rate: f64,
    /// Repeats per configuration (fixed seeds 1, 2, 3, ...).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

struct Plan {
    sessions: usize,
    max_turns: usize,
    rag_users: usize,
    ab: Vec<f64>,
    intervals: Vec<&'static str>,
}

fn sharegpt_sessions(
    text: &str,
    p: &Plan,
    seed: u64,
    rate: f64,
    offset: usize,
) -> anyhow::Result<Vec<Session>> {
    let all = sharegpt::parse(
        text,
        &sharegpt::ShareGptOptions {
            max_turns: p.max_turns,
            max_tokens: 64,
            think_ms: 2000.0,
            ..Default::default()
        },
    )?;
    // Different seeds take different conversations.
    let start = (offset + seed as usize * 97) % all.len().max(1);
    let picked: Vec<Session> = all
        .iter()
        .cycle()
        .skip(start)
        .take(p.sessions)
        .cloned()
        .collect();
    let starts = arrivals::poisson(picked.len(), rate, seed);
    Ok(with_arrivals(picked, &starts))
}

fn rag_sessions(p: &Plan, seed: u64, rate: f64) -> Vec<Session> {
    let s = rag::generate(&rag::RagOptions {
        users: p.rag_users,
        max_tokens: 32,
        seed,
        ..Default::default()
    });
    let starts = arrivals::poisson(s.len(), rate, seed);
    with_arrivals(s, &starts)
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
    eprintln!(
        "study: run {:>3} {:<6} {:<16} {:<5} {:<34} hit {:.3} p95 TTFT {:>7.0} ms",
        n,
        spec.experiment,
        spec.policy.as_str(),
        spec.rate_label,
        spec.runtime
            .iter()
            .map(|(k, v)| format!("{}={v}", k.trim_start_matches("kvroute.")))
            .collect::<Vec<_>>()
            .join(","),
        r.hit_rate,
        r.ttft_ms[1]
    );
    save(out, &r)?;
    Ok(r)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let t0 = Instant::now();
    let plan = if a.full {
        Plan {
            sessions: 120,
            max_turns: 6,
            rag_users: 200,
            ab: vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            intervals: vec!["0", "100", "500", "1000", "5000", "30000", "never"],
        }
    } else {
        Plan {
            sessions: 24,
            max_turns: 4,
            rag_users: 48,
            ab: vec![0.0, 0.5, 1.0],
            intervals: vec!["0", "100", "500", "1000", "5000", "30000", "never"],
        }
    };
    let text = std::fs::read_to_string(&a.sharegpt)?;
    if a.out.exists() {
        std::fs::remove_dir_all(&a.out)?;
    }
    std::fs::create_dir_all(&a.out)?;
    eprintln!(
        "study: starting 2 emulated engines ({}, x{}), the sidecar and Envoy with kvroute",
        a.profile, a.time_scale
    );
    let mut lab = Lab::emulated(2, &a.profile, a.time_scale).await?;
    let mut results: Vec<RunResult> = Vec::new();
    let mut n = 0usize;
    // Sustainable rate.
    let mut rate = a.start_rate;
    let mut sustainable = a.start_rate;
    let mut capped = true;
    for _ in 0..7 {
        let spec = RunSpec {
            experiment: "search".into(),
            workload: "sharegpt".into(),
            policy: PolicyKind::RoundRobin,
            runtime: vec![],
            rate,
            rate_label: format!("{rate}/s"),
            seed: 1,
            repeat: 0,
        };
        let r = run(
            &mut lab,
            &a.out,
            &mut n,
            spec,
            vec![],
            sharegpt_sessions(&text, &plan, 1, rate, 0)?,
        )
        .await?;
        let ok = r.failed == 0 && r.ttft_ms[1] <= a.slo_ms;
        results.push(r);
        if !ok {
            capped = false;
            break;
        }
        sustainable = rate;
        rate *= 2.0;
    }
    eprintln!(
        "study: sustainable rate {sustainable} sessions/s (P95 TTFT <= {} ms with round_robin)",
        a.slo_ms
    );
    let policies = PolicyKind::ALL;
    let warm = |seed: u64, rate: f64| {
        sharegpt_sessions(&text, &plan, seed + 1000, rate, 1500).map(|mut v| {
            v.truncate(plan.sessions / 4);
            v
        })
    };

    // Experiment 1: policies x rates on ShareGPT.
    for (label, k) in [("0.5x", 0.5), ("1x", 1.0), ("2x", 2.0)] {
        for p in policies {
            for rep in 0..a.repeats {
                let seed = rep as u64 + 1;
                let r_ = sustainable * k;
                let spec = RunSpec {
                    experiment: "exp1".into(),
                    workload: "sharegpt".into(),
                    policy: *p,
                    runtime: vec![],
                    rate: r_,
                    rate_label: label.into(),
                    seed,
                    repeat: rep,
                };
                results.push(
                    run(
                        &mut lab,
                        &a.out,
                        &mut n,
                        spec,
                        warm(seed, r_)?,
                        sharegpt_sessions(&text, &plan, seed, r_, 0)?,
                    )
                    .await?,
                );
            }
        }
    }
    // Experiment 2: RAG, hit rate by policy.
    for p in policies {
        for rep in 0..a.repeats {
            let seed = rep as u64 + 1;
            let r_ = sustainable * 2.0;
            let spec = RunSpec {
                experiment: "exp2".into(),
                workload: "rag".into(),
                policy: *p,
                runtime: vec![],
                rate: r_,
                rate_label: "1x".into(),
                seed,
                repeat: rep,
            };
            results.push(
                run(
                    &mut lab,
                    &a.out,
                    &mut n,
                    spec,
                    vec![],
                    rag_sessions(&plan, seed, r_),
                )
                .await?,
            );
        }
    }
    // Experiments 3 (alpha / beta sweep) and 4 (directory publish interval): load_cache_aware on
    // ShareGPT at 1x, one configuration of runtime values each.
    let kv = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    let mut sweeps: Vec<(&str, Vec<(String, String)>)> = Vec::new();
    for alpha in &plan.ab {
        for beta in &plan.ab {
            sweeps.push((
                "exp3",
                kv(&[
                    ("kvroute.alpha", alpha.to_string()),
                    ("kvroute.beta", beta.to_string()),
                ]),
            ));
        }
    }
    for iv in &plan.intervals {
        sweeps.push((
            "exp4",
            kv(&[("kvroute.publish_interval_ms", iv.to_string())]),
        ));
    }
    for (experiment, runtime) in sweeps {
        for rep in 0..a.repeats {
            let seed = rep as u64 + 1;
            let spec = RunSpec {
                experiment: experiment.into(),
                workload: "sharegpt".into(),
                policy: PolicyKind::LoadCacheAware,
                runtime: runtime.clone(),
                rate: sustainable,
                rate_label: "1x".into(),
                seed,
                repeat: rep,
            };
            let (warm_up, measured) = (
                warm(seed, sustainable)?,
                sharegpt_sessions(&text, &plan, seed, sustainable, 0)?,
            );
            results.push(run(&mut lab, &a.out, &mut n, spec, warm_up, measured).await?);
        }
    }
    lab.envoy
        .runtime_modify(&[("kvroute.publish_interval_ms", "0")])
        .await?;

    // Calibration of the profile, on a separate engine at real time (the lab's engines run faster,
    // which would multiply the host's timing noise).
    eprintln!("study: calibrating the {} profile", a.profile);
    let calib_engine = EmulatedEngine::start("calibration", &a.profile, 1.0).await?;
    let calibration = calibrate(
        &calib_engine.url(),
        &[128, 256, 512, 1024, 2048, 4096, 8192],
        &[1, 2, 4, 8, 16, 32],
        1.0,
    )
    .await?;
    drop(calib_engine);

    // The oracle bounds of the measured workloads (seed 1).
    let model = "meta-llama/Llama-3.2-3B-Instruct";
    let bounds: Vec<(String, Analysis)> = vec![
        (
            "sharegpt".into(),
            analyze(
                &sharegpt_sessions(&text, &plan, 1, sustainable, 0)?,
                model,
                2,
                711,
            ),
        ),
        (
            "rag".into(),
            analyze(&rag_sessions(&plan, 1, sustainable * 2.0), model, 2, 711),
        ),
    ];
    let meta = report::Meta {
        mode: if a.full {
            "full".into()
        } else {
            "reduced".into()
        },
        profile: a.profile.clone(),
        time_scale: a.time_scale,
        engines: 2,
        sustainable_rate: sustainable,
        slo_ms: a.slo_ms,
        search_capped: capped,
        repeats: a.repeats,
        sessions: plan.sessions,
        wall_s: t0.elapsed().as_secs_f64(),
        envoy: "1.40.0".into(),
        kvroute: env!("CARGO_PKG_VERSION").into(),
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
