//! A soak: the whole stack (Envoy with kvroute, the sidecar, emulated engines, each its own
//! process) at a steady open-loop load in which every prompt is new, for a long time (30 minutes by
//! default). Every prompt starts with its own id, so each of its prefix blocks is one the directory
//! has never seen: the directory, the engines' caches and every table keyed by prefix are filled and
//! evicted all run long.
//!
//! Records every `--sample-secs`: the resident memory of Envoy, the sidecar and each engine, and
//! the directory's entries; and every minute the requests, errors and latency percentiles. Writes
//! `soak.json`, `soak-memory.svg` and `soak-latency.svg` under `--out`, and prints one verdict line
//! per process: flat (bounded) or growing, judged on the samples after the warm-up.
//! Not in CI. Run: `just soak` (or `cargo run --release -p kvroute-workloads --bin kvroute-soak --
//! --minutes 30`, after `just wasm` and `cargo build --release -p kvroute-emulator -p
//! kvroute-sidecar`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::procs::{self, Proc};
use kvroute_harness::stack::{filter_wasm, Envoy};
use kvroute_loadgen::engine_api::served_model;
use kvroute_study::report::{lines, Series};
use kvroute_study::study::quantile;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    about = "Hold the stack at a steady load of new prompts; is every process's memory bounded?"
)]
struct Args {
    /// Length of the run, minutes.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Requests per second (open loop: sent on schedule, whatever the answers' pace).
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Emulated engines.
    #[arg(long, default_value_t = 2)]
    engines: usize,
    /// The engines' hardware profile (the H100's 28k KV blocks an engine make the directory large).
    #[arg(long, default_value = "h100-llama3.1-8b")]
    profile: String,
    /// Engine speed: N times real time.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Characters of each prompt (about 4 per token).
    #[arg(long, default_value_t = 1500)]
    prompt_chars: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Sidecar poll interval, ms.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// Seconds between memory samples.
    #[arg(long, default_value_t = 5)]
    sample_secs: u64,
    /// Share of the run treated as warm-up (the verdicts use the samples after it).
    #[arg(long, default_value_t = 0.25)]
    warmup: f64,
    /// Requests in flight at most; a request due while this many are out is counted as shed.
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
    /// Where the results go.
    #[arg(long, default_value = "results/soak")]
    out: PathBuf,
}

/// One memory sample.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Seconds since the load started.
    t: f64,
    /// Resident bytes per process.
    rss: BTreeMap<String, u64>,
    /// `kvroute_directory_blocks`: prefix blocks the directory holds.
    directory_blocks: u64,
    /// `kvroute_directory_sessions`.
    directory_sessions: u64,
    /// `kvroute_state_bytes`: the published state's size.
    state_bytes: u64,
}

/// One minute of load.
#[derive(Debug, Clone, Serialize)]
struct Minute {
    minute: usize,
    requests: u64,
    errors: u64,
    shed: u64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
}

/// A process's memory, judged after the warm-up.
#[derive(Debug, Clone, Serialize)]
struct Verdict {
    process: String,
    flat: bool,
    /// Mean resident MiB after the warm-up.
    mean_mib: f64,
    max_mib: f64,
    /// Least-squares growth after the warm-up, MiB per hour.
    slope_mib_per_hour: f64,
    /// What bounds it (by design; the samples say whether it held).
    bounded_by: String,
}

#[derive(Default)]
struct Window {
    latencies_ms: Vec<f64>,
    requests: u64,
    errors: u64,
    shed: u64,
}

#[derive(Debug, Serialize)]
struct Results {
    args: String,
    requests: u64,
    errors: u64,
    shed: u64,
    distinct_prompts: u64,
    distinct_prefix_blocks: u64,
    directory_capacity_blocks: u64,
    minutes: Vec<Minute>,
    samples: Vec<Sample>,
    verdicts: Vec<Verdict>,
}

fn prompt(n: u64, chars: usize) -> String {
    // The id leads, so every block of the prompt (a chained hash) is new.
    let mut p = format!("soak prompt {n:012}: ");
    let filler = "Summarise the following notes on cache-aware routing and name the risks. ";
    while p.len() < chars {
        p.push_str(filler);
    }
    p.truncate(chars);
    p
}

fn rss(pid: Option<u32>) -> u64 {
    pid.and_then(|p| procs::cpu_rss(p).ok()).map_or(0, |c| c.1)
}

/// Least-squares slope of y over x.
fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Flat when the fitted growth over the judged window is under 5% of the mean or under 2 MiB.
fn verdict(process: &str, samples: &[Sample], from_t: f64, bounded_by: &str) -> Verdict {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t >= from_t)
        .filter_map(|s| Some((s.t, *s.rss.get(process)? as f64 / MIB)))
        .collect();
    let mean = pts.iter().map(|p| p.1).sum::<f64>() / pts.len().max(1) as f64;
    let max = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let per_s = slope(&pts);
    let span = pts.last().map_or(0.0, |l| l.0) - pts.first().map_or(0.0, |f| f.0);
    let growth = per_s * span;
    Verdict {
        process: process.to_string(),
        flat: pts.len() >= 3 && (growth < 0.05 * mean || growth < 2.0),
        mean_mib: mean,
        max_mib: max,
        slope_mib_per_hour: per_s * 3600.0,
        bounded_by: bounded_by.to_string(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;

    let mut engines: Vec<(String, Proc)> = Vec::new();
    for i in 0..args.engines {
        let e = procs::emulator(&args.profile, args.time_scale, 0).await?;
        engines.push((format!("engine{i}"), e));
    }
    // The served model's name, as a client reads it from /v1/models.
    let first = engines.first().map(|e| e.1.url()).unwrap_or_default();
    let model = served_model(&reqwest::Client::new(), &first).await?;
    let named: Vec<(String, String)> = engines.iter().map(|(n, p)| (n.clone(), p.url())).collect();
    let sidecar = procs::sidecar(&named, args.poll_ms, "127.0.0.1:0".parse()?).await?;
    let spec_engines = engines
        .iter()
        .map(|(n, p)| Engine::local(n, p.addr.port()))
        .collect();
    let mut spec = EnvoySpec::new(spec_engines, filter_wasm()?.display().to_string());
    spec.set_sidecar(Engine::local("sidecar", sidecar.addr.port()));
    let envoy = Arc::new(Envoy::start(spec).await?);
    envoy
        .wait_stat("kvroute_state_stale", Duration::from_secs(10), |v| v == 0)
        .await?;
    let capacity: u64 = envoy
        .stats()
        .await?
        .iter()
        .filter(|(k, _)| k.starts_with("kvroute_directory_endpoint_capacity"))
        .map(|(_, v)| *v)
        .sum();
    eprintln!(
        "soak: {} engines, {} req/s of new {}-char prompts for {} min; directory capacity {capacity} \
         blocks; results in {}",
        args.engines,
        args.rate,
        args.prompt_chars,
        args.minutes,
        args.out.display()
    );

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(args.max_in_flight)
        .build()?;
    let window = Arc::new(Mutex::new(Window::default()));
    let in_flight = Arc::new(AtomicU64::new(0));
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let mut next_send = start;
    let mut next_sample = start;
    let mut next_minute = start + Duration::from_secs(60);
    let (mut samples, mut minutes) = (Vec::new(), Vec::new());
    let (mut sent, mut errors, mut shed) = (0u64, 0u64, 0u64);
    let url = envoy.url("/v1/chat/completions");
    let blocks_per_prompt = (args.prompt_chars
        / kvroute_core::prefix::BlockSpec::default()
            .block_chars
            .max(1)) as u64;
    loop {
        let now = Instant::now();
        if now >= next_sample {
            let st = envoy.stats().await.unwrap_or_default();
            let g = |k: &str| st.get(k).copied().unwrap_or(0);
            let mut rss_now = BTreeMap::new();
            rss_now.insert("envoy".to_string(), rss(envoy.pid()));
            rss_now.insert("sidecar".to_string(), rss(sidecar.pid()));
            for (n, p) in &engines {
                rss_now.insert(n.clone(), rss(p.pid()));
            }
            samples.push(Sample {
                t: start.elapsed().as_secs_f64(),
                rss: rss_now,
                directory_blocks: g("kvroute_directory_blocks"),
                directory_sessions: g("kvroute_directory_sessions"),
                state_bytes: g("kvroute_state_bytes"),
            });
            next_sample += Duration::from_secs(args.sample_secs.max(1));
        }
        if now >= next_minute || now >= start + total {
            let w = std::mem::take(&mut *window.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
            let mut l = w.latencies_ms;
            l.sort_by(f64::total_cmp);
            let m = Minute {
                minute: minutes.len() + 1,
                requests: w.requests,
                errors: w.errors,
                shed: w.shed,
                p50_ms: quantile(&l, 0.50),
                p95_ms: quantile(&l, 0.95),
                p99_ms: quantile(&l, 0.99),
            };
            errors += m.errors;
            shed += m.shed;
            let last = samples.last();
            eprintln!(
                "soak: minute {:>3}: {:>5} requests, {} errors, {} shed, latency P50 {:.0} / P95 {:.0} / P99 {:.0} ms; \
                 RSS envoy {:.1} MiB, sidecar {:.1} MiB, engine0 {:.1} MiB; directory {} blocks",
                m.minute,
                m.requests,
                m.errors,
                m.shed,
                m.p50_ms,
                m.p95_ms,
                m.p99_ms,
                last.and_then(|s| s.rss.get("envoy")).copied().unwrap_or(0) as f64 / MIB,
                last.and_then(|s| s.rss.get("sidecar")).copied().unwrap_or(0) as f64 / MIB,
                last.and_then(|s| s.rss.get("engine0")).copied().unwrap_or(0) as f64 / MIB,
                last.map_or(0, |s| s.directory_blocks)
            );
            minutes.push(m);
            next_minute += Duration::from_secs(60);
            if now >= start + total {
                break;
            }
        }
        if now >= next_send {
            next_send += period;
            sent += 1;
            if in_flight.load(Ordering::SeqCst) >= args.max_in_flight as u64 {
                if let Ok(mut w) = window.lock() {
                    w.shed += 1;
                }
                continue;
            }
            in_flight.fetch_add(1, Ordering::SeqCst);
            let body = serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": prompt(sent, args.prompt_chars)}],
                "max_tokens": args.max_tokens,
            });
            let (client, url, window, in_flight) = (
                client.clone(),
                url.clone(),
                window.clone(),
                in_flight.clone(),
            );
            tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = match client.post(&url).json(&body).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                if let Ok(mut w) = window.lock() {
                    w.requests += 1;
                    if ok {
                        w.latencies_ms.push(ms);
                    } else {
                        w.errors += 1;
                    }
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
            continue;
        }
        let wake = next_send.min(next_sample).min(next_minute);
        tokio::time::sleep_until(wake.into()).await;
    }
    // Let the last requests finish; count what never came back.
    let drain = Instant::now();
    while in_flight.load(Ordering::SeqCst) > 0 && drain.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late = std::mem::take(&mut *window.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    errors += late.errors + in_flight.load(Ordering::SeqCst);

    let from_t = total.as_secs_f64() * args.warmup.clamp(0.0, 0.9);
    let mut names = vec!["envoy".to_string(), "sidecar".to_string()];
    names.extend(engines.iter().map(|(n, _)| n.clone()));
    let verdicts: Vec<Verdict> = names
        .iter()
        .map(|n| {
            let by = match n.as_str() {
                "envoy" => format!(
                    "the directory's capacity ({capacity} blocks), the body buffer, bounded queues"
                ),
                "sidecar" => "one parsed page per engine and a fixed rate window".to_string(),
                _ => "its KV block pool (num_gpu_blocks) and max_num_seqs".to_string(),
            };
            verdict(n, &samples, from_t, &by)
        })
        .collect();

    let mem: Vec<Series> = names
        .iter()
        .map(|n| {
            let pts = samples
                .iter()
                .filter_map(|s| Some((s.t / 60.0, *s.rss.get(n)? as f64 / MIB)))
                .collect();
            (n.clone(), pts)
        })
        .collect();
    let fig_err = |e: Box<dyn std::error::Error>| anyhow::anyhow!("figure: {e}");
    lines(
        &args.out.join("soak-memory.svg"),
        "Resident memory per process, every prompt new",
        "minutes",
        "MiB",
        &mem,
        true,
    )
    .map_err(fig_err)?;
    let lat: Vec<Series> = [("P50", 0usize), ("P95", 1), ("P99", 2)]
        .iter()
        .map(|(name, k)| {
            let pts = minutes
                .iter()
                .map(|m| {
                    let v = [m.p50_ms, m.p95_ms, m.p99_ms];
                    (m.minute as f64, v.get(*k).copied().unwrap_or(0.0))
                })
                .collect();
            (format!("latency {name}"), pts)
        })
        .collect();
    lines(
        &args.out.join("soak-latency.svg"),
        "End-to-end latency per minute",
        "minute",
        "ms",
        &lat,
        true,
    )
    .map_err(fig_err)?;

    let requests: u64 = minutes.iter().map(|m| m.requests).sum::<u64>() + late.requests;
    let results = Results {
        args: format!("{args:?}"),
        requests,
        errors,
        shed,
        distinct_prompts: sent,
        distinct_prefix_blocks: sent * blocks_per_prompt,
        directory_capacity_blocks: capacity,
        minutes,
        samples,
        verdicts: verdicts.clone(),
    };
    std::fs::write(
        args.out.join("soak.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!(
        "soak: {} requests ({} distinct prompts, {} distinct prefix blocks), {} errors, {} shed",
        results.requests,
        results.distinct_prompts,
        results.distinct_prefix_blocks,
        results.errors,
        results.shed
    );
    for v in &verdicts {
        println!(
            "verdict {:<8} {}: mean {:.1} MiB, max {:.1} MiB, {:+.2} MiB/hour after the warm-up; bounded by {}",
            v.process,
            if v.flat { "flat" } else { "GROWING" },
            v.mean_mib,
            v.max_mib,
            v.slope_mib_per_hour,
            v.bounded_by
        );
    }
    println!(
        "soak: figures {}/soak-memory.svg, soak-latency.svg",
        args.out.display()
    );
    drop(sidecar);
    drop(engines);
    if let Ok(e) = Arc::try_unwrap(envoy) {
        e.stop(false).await;
    }
    let all_flat = verdicts.iter().all(|v| v.flat);
    if errors > 0 || !all_flat {
        anyhow::bail!("soak failed: {errors} errors, flat = {all_flat}");
    }
    Ok(())
}
