//! Active-active Envoy replicas: what requests spread at random over G replicas cost in prefix
//! hits and TTFT, with the replicas sharing their decisions through the fleet log (Redis) and with
//! each keeping its own directory, against one replica.
//!
//! Two emulated engines (the study's profile and time scale), one Redis (`redis-server`), one
//! sidecar process serving snapshots and the fleet log, and 1, 2 or 4 Envoy replicas, each with
//! kvroute at its default policy. A plain L4 balancer is modelled by the client: each request goes
//! to a replica picked at random (a hash of its session and turn), with no affinity. Every run
//! starts cold (engine caches reset, a new directory epoch on every replica). Workloads: ShareGPT
//! conversations at full length (up to 10 turns) and the RAG mix, at the study's 1x rate.
//! `--pinned` adds G shared replicas with every request sent to the first: what G Envoys cost on
//! this host apart from spreading the requests.
//!
//! Run: `just bench-replicas` (builds the filter and the sidecar first).

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use kvroute_harness::emulated::EmulatedEngine;
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::procs::{self, Proc};
use kvroute_harness::scripted::snapshot;
use kvroute_harness::stack::{filter_wasm, Envoy};
use kvroute_loadgen::replay::{replay, MemorySink, ReplayOptions, RequestRecord};
use kvroute_study::plan::{rag_sessions, sharegpt_sessions, RagPlan, ShareGptPlan};
use kvroute_study::study::quantile;

#[derive(Parser, Debug)]
#[command(about = "Hit rate and TTFT of 1, 2 and 4 Envoy replicas, sharing their directory or not")]
struct Args {
    /// ShareGPT sessions per second (emulated time) at 1x: the reduced study's sustainable rate
    /// on two engines of this profile (results/study: 8).
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    /// Seconds (emulated) over which a run's conversations arrive.
    #[arg(long, default_value_t = 6.0)]
    window_s: f64,
    /// Turns per conversation at most (full length: 10).
    #[arg(long, default_value_t = 10)]
    max_turns: usize,
    /// Repeats of each configuration (seeds 1, 2, ...): a ShareGPT P95 over about 200 requests
    /// moves by tens of percent between seeds.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Replica counts compared with one replica.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    replicas: Vec<usize>,
    /// Workloads to run (`sharegpt`, `rag`).
    #[arg(long, value_delimiter = ',', default_value = "sharegpt,rag")]
    workloads: Vec<String>,
    /// Also run G shared replicas with every request sent to the first one: what G Envoys cost
    /// on this host, apart from spreading the requests (the diagnosis of a P95 gap).
    #[arg(long)]
    pinned: bool,
    /// The fleet's sync period, ms (wall time; the filter's default).
    #[arg(long, default_value_t = 10)]
    sync_ms: u32,
    /// Engine profile.
    #[arg(long, default_value = "rtx5080-llama3.2-3b")]
    profile: String,
    /// Emulated time per wall time. 2, not the study's 8: with up to 4 Envoys, a sidecar, Redis,
    /// two engines and the clients on two cores, each millisecond of host delay counts this many
    /// times in the emulated TTFT.
    #[arg(long, default_value_t = 2.0)]
    time_scale: f64,
    /// ShareGPT data.
    #[arg(long, default_value = "../shared/data/sharegpt_dev_3000.json")]
    sharegpt: std::path::PathBuf,
    /// Where the JSON results go.
    #[arg(long, default_value = "results/bench/replicas.json")]
    out: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    One,
    Shared(usize),
    Independent(usize),
    /// G shared replicas, every request to the first.
    Pinned(usize),
}

impl Mode {
    fn replicas(self) -> usize {
        match self {
            Mode::One => 1,
            Mode::Shared(g) | Mode::Independent(g) | Mode::Pinned(g) => g,
        }
    }
    fn label(self) -> String {
        match self {
            Mode::One => "1 replica".into(),
            Mode::Shared(g) => format!("{g} shared"),
            Mode::Independent(g) => format!("{g} independent"),
            Mode::Pinned(g) => format!("{g} shared, 1 used"),
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    workload: String,
    mode: String,
    seed: u64,
    requests: usize,
    failed: usize,
    hit_rate: f64,
    p95_ttft_ms: f64,
    mean_ttft_ms: f64,
    /// Mean sync lag seen by the replicas (decision on one to arrival on another), wall ms.
    sync_lag_mean_ms: Option<f64>,
}

/// Sum and count of a histogram in Envoy's Prometheus page.
fn histogram_sum_count(page: &str, name: &str) -> Option<(f64, f64)> {
    let get = |suffix: &str| {
        page.lines().find_map(|l| {
            let rest = l.strip_prefix(&format!("{name}_{suffix}"))?;
            rest.rsplit(' ').next()?.parse::<f64>().ok()
        })
    };
    Some((get("sum")?, get("count")?))
}

async fn start_replicas(
    mode: Mode,
    engines: &[EmulatedEngine],
    sidecar: &Proc,
    sync_ms: u32,
) -> anyhow::Result<Vec<Envoy>> {
    let mut out = Vec::new();
    for _ in 0..mode.replicas() {
        let mut spec = EnvoySpec::new(
            engines
                .iter()
                .map(|e| Engine::local(&e.name, e.addr.port()))
                .collect(),
            filter_wasm()?.display().to_string(),
        );
        spec.set_sidecar(Engine::local("sidecar", sidecar.addr.port()));
        if matches!(mode, Mode::Shared(_) | Mode::Pinned(_)) {
            spec.share_fleet(sync_ms);
        }
        let envoy = Envoy::start(spec).await?;
        envoy
            .wait_stat("kvroute_state_stale", Duration::from_secs(10), |v| v == 0)
            .await?;
        out.push(envoy);
    }
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.sharegpt)?;
    // The reduced study's workload shapes, ShareGPT at full length.
    let sharegpt = ShareGptPlan {
        sessions: 0,
        window_s: args.window_s,
        max_turns: args.max_turns,
        max_tokens: 64,
        think_ms: 2000.0,
        warmup_sessions: 0,
        warmup_turns: 0,
    };
    let rag = RagPlan {
        users: 0,
        window_s: 5.0,
        max_tokens: 32,
    };
    let engines = EmulatedEngine::start_fleet(2, &args.profile, args.time_scale).await?;
    let redis = procs::redis(0).await?;
    let named: Vec<(String, String)> = engines.iter().map(|e| (e.name.clone(), e.url())).collect();
    let sidecar = procs::sidecar_with_fleet(
        &named,
        100,
        "127.0.0.1:0".parse()?,
        Some(&redis.redis_url()),
    )
    .await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut modes = vec![Mode::One];
    for g in &args.replicas {
        modes.push(Mode::Shared(*g));
        modes.push(Mode::Independent(*g));
        if args.pinned {
            modes.push(Mode::Pinned(*g));
        }
    }
    let sessions = sharegpt.sessions_at(args.rate);
    let rag_rate = 2.0 * args.rate;
    let rag_users = rag.users_at(rag_rate);
    println!(
        "kvroute-bench-replicas: 2 emulated engines ({}, {}x real time), Redis, one sidecar; requests spread at random over the replicas; default policy",
        args.profile, args.time_scale
    );
    println!(
        "  sharegpt: {sessions} conversations of up to {} turns at {} sessions/s; rag: {rag_users} users at {rag_rate}/s; {} repeats",
        args.max_turns, args.rate, args.repeats
    );
    let mut runs: Vec<Run> = Vec::new();
    let mut epoch = 0u64;
    for mode in &modes {
        let replicas = start_replicas(*mode, &engines, &sidecar, args.sync_ms).await?;
        let mut urls: Vec<String> = replicas
            .iter()
            .map(|r| r.url("/v1/chat/completions"))
            .collect();
        if matches!(mode, Mode::Pinned(_)) {
            urls.truncate(1);
        }
        for workload in args.workloads.iter().map(String::as_str) {
            for rep in 0..args.repeats {
                let seed = rep as u64 + 1;
                let mut measured = match workload {
                    "sharegpt" => {
                        sharegpt_sessions(&text, &sharegpt, sessions, seed, args.rate, 0)?
                    }
                    _ => rag_sessions(&rag, seed, rag_rate),
                };
                for s in &mut measured {
                    s.start_ms /= args.time_scale;
                    s.think_ms /= args.time_scale;
                }
                for e in &engines {
                    client
                        .post(format!("{}/reset_prefix_cache", e.url()))
                        .send()
                        .await?;
                }
                epoch += 1;
                let e = epoch.to_string();
                for r in &replicas {
                    r.runtime_modify(&[("kvroute.directory_epoch", &e)]).await?;
                }
                for r in &replicas {
                    r.wait_stat(
                        "kvroute_setting_directory_epoch",
                        Duration::from_secs(10),
                        |v| v == epoch,
                    )
                    .await?;
                }
                let mut lag_before = Vec::new();
                for r in &replicas {
                    let page = r.prometheus().await?;
                    lag_before.push(histogram_sum_count(&page, "kvroute_fleet_sync_lag_ms"));
                }
                let before = snapshot(&client, &engines).await?;
                let sink = MemorySink::default();
                let out: Arc<Mutex<dyn Write + Send>> = Arc::new(Mutex::new(sink.clone()));
                let summary = replay(
                    measured,
                    ReplayOptions {
                        urls: urls.clone(),
                        model: None,
                        max_in_flight: 256,
                        timeout: Duration::from_secs(120),
                        session_header: "x-session-id".into(),
                        fresh_connections: false,
                    },
                    out,
                    Arc::new(AtomicBool::new(false)),
                    Arc::new(|_, _| {}),
                )
                .await?;
                let after = snapshot(&client, &engines).await?;
                let mut lag = (0.0, 0.0);
                for (r, b) in replicas.iter().zip(&lag_before) {
                    let page = r.prometheus().await?;
                    if let Some((s1, c1)) = histogram_sum_count(&page, "kvroute_fleet_sync_lag_ms")
                    {
                        let (s0, c0) = b.unwrap_or((0.0, 0.0));
                        lag.0 += s1 - s0;
                        lag.1 += c1 - c0;
                    }
                }
                let records: Vec<RequestRecord> = sink
                    .text()
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                let mut ttfts: Vec<f64> = records
                    .iter()
                    .filter_map(|r| r.ttft_ms.map(|t| t * args.time_scale))
                    .collect();
                ttfts.sort_by(f64::total_cmp);
                let run = Run {
                    workload: workload.to_owned(),
                    mode: mode.label(),
                    seed,
                    requests: summary.finished,
                    failed: summary.failed,
                    hit_rate: after.hit_rate_since(&before),
                    p95_ttft_ms: quantile(&ttfts, 0.95),
                    mean_ttft_ms: ttfts.iter().sum::<f64>() / ttfts.len().max(1) as f64,
                    sync_lag_mean_ms: (lag.1 > 0.0).then(|| lag.0 / lag.1),
                };
                eprintln!(
                    "  {:<9} {:<15} seed {}: {} requests ({} failed), hit {:.3}, P95 {:.0} ms, mean {:.0} ms{}",
                    run.workload,
                    run.mode,
                    seed,
                    run.requests,
                    run.failed,
                    run.hit_rate,
                    run.p95_ttft_ms,
                    run.mean_ttft_ms,
                    run.sync_lag_mean_ms
                        .map(|l| format!(", sync lag mean {l:.1} ms"))
                        .unwrap_or_default()
                );
                runs.push(run);
            }
        }
        for r in replicas {
            r.stop(false).await;
        }
    }

    // The table: mean (min-max) over repeats, and the ratios to one replica.
    let stats = |w: &str, m: &str, f: &dyn Fn(&Run) -> f64| -> (f64, f64, f64) {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.workload == w && r.mode == m)
            .map(f)
            .collect();
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (mean, lo, hi)
    };
    println!();
    println!(
        "{:<9} {:<15} {:>22} {:>24} {:>10} {:>8} {:>8}",
        "workload",
        "replicas",
        "hit rate (min-max)",
        "P95 TTFT ms (min-max)",
        "mean TTFT",
        "hit x1",
        "P95 x1"
    );
    let mut verdicts = Vec::new();
    for w in args.workloads.iter().map(String::as_str) {
        let one_hit = stats(w, "1 replica", &|r| r.hit_rate).0;
        let one_p95 = stats(w, "1 replica", &|r| r.p95_ttft_ms).0;
        for m in &modes {
            let label = m.label();
            let h = stats(w, &label, &|r| r.hit_rate);
            let p = stats(w, &label, &|r| r.p95_ttft_ms);
            let mean = stats(w, &label, &|r| r.mean_ttft_ms).0;
            println!(
                "{:<9} {:<15} {:>8.3} ({:.3}-{:.3}) {:>10.0} ({:.0}-{:.0}) {:>10.0} {:>8.3} {:>8.3}",
                w,
                label,
                h.0,
                h.1,
                h.2,
                p.0,
                p.1,
                p.2,
                mean,
                h.0 / one_hit.max(1e-9),
                p.0 / one_p95.max(1e-9)
            );
            if *m == Mode::Shared(4) {
                let (hx, px) = (h.0 / one_hit.max(1e-9), p.0 / one_p95.max(1e-9));
                verdicts.push(format!(
                    "{w}: 4 shared replicas reach {hx:.3}x one replica's hit rate (goal >= 0.97: {}) and {px:.3}x its P95 TTFT (goal <= 1.05: {})",
                    if hx >= 0.97 { "met" } else { "missed" },
                    if px <= 1.05 { "met" } else { "missed" },
                ));
            }
        }
    }
    println!();
    for v in &verdicts {
        println!("{v}");
    }
    let lags: Vec<f64> = runs.iter().filter_map(|r| r.sync_lag_mean_ms).collect();
    let lo = lags.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = lags.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !lags.is_empty() {
        println!(
            "sync lag (a decision on one replica to its arrival on another, wall ms; mean per run): {lo:.1} to {hi:.1}, with sync every {} ms",
            args.sync_ms
        );
    }
    println!(
        "(hit rate: the engines' prefix_cache_hits / queries; TTFT from the clients, emulated ms)"
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&serde_json::json!({"runs": runs, "verdicts": verdicts}))?,
    )?;
    println!("wrote {}", args.out.display());
    drop(sidecar);
    drop(redis);
    Ok(())
}
