//! The sidecar's cost: N emulated engines (separate processes) polled every interval by one
//! sidecar process; reports the sidecar's CPU per engine per poll (from /proc) and its scrape
//! latency (its own histogram), plus the snapshot's size and serving time.
//! Run: `cargo run --release -p kvroute-workloads --bin kvroute-bench-sidecar` (after
//! `cargo build --release -p kvroute-emulator -p kvroute-sidecar`).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use kvroute_harness::procs;

#[derive(Parser, Debug)]
#[command(about = "CPU and latency of the sidecar polling N engines")]
struct Args {
    /// Engines.
    #[arg(long, default_value_t = 16)]
    engines: usize,
    /// Poll interval, ms.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Where the JSON results go.
    #[arg(long, default_value = "results/bench/sidecar.json")]
    out: std::path::PathBuf,
}

async fn spawn(bin: &str, args: &[String]) -> anyhow::Result<(tokio::process::Child, String)> {
    procs::spawn_listening(bin, args).await
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(procs::cpu_rss(pid)?.0)
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut engines = Vec::new();
    for _ in 0..args.engines {
        engines.push(spawn("kvroute-emulator", &["--port".into(), "0".into()]).await?);
    }
    let mut sc_args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--poll-interval-ms".into(),
        args.interval_ms.to_string(),
    ];
    for (i, (_, addr)) in engines.iter().enumerate() {
        sc_args.push("--engine".into());
        sc_args.push(format!("engine{i}=http://{addr}"));
    }
    let (sidecar, sc_addr) = spawn("kvroute-sidecar", &sc_args).await?;
    let pid = sidecar.id().context("no pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let page0 = reqwest::get(format!("http://{sc_addr}/metrics"))
        .await?
        .text()
        .await?;
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let cpu1 = cpu_seconds(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let page1 = reqwest::get(format!("http://{sc_addr}/metrics"))
        .await?
        .text()
        .await?;
    let d = |name: &str| metric(&page1, name) - metric(&page0, name);
    let scrapes = d("kvroute_sidecar_scrapes_total");
    let errors: f64 = page1
        .lines()
        .filter(|l| {
            l.starts_with("kvroute_sidecar_scrapes_total{") && l.contains("result=\"error\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        .max(0.0);
    let latency_ms = d("kvroute_sidecar_scrape_duration_seconds_sum")
        / d("kvroute_sidecar_scrape_duration_seconds_count")
        * 1e3;
    let cpu_us_per_scrape = (cpu1 - cpu0) / scrapes * 1e6;
    // Serving the snapshot.
    let client = reqwest::Client::new();
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..200 {
        let t = Instant::now();
        let body = client
            .get(format!("http://{sc_addr}/snapshot"))
            .send()
            .await?
            .bytes()
            .await?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        size = body.len();
    }
    times.sort_by(f64::total_cmp);
    let p50 = times.get(times.len() / 2).copied().unwrap_or(0.0);
    println!(
        "sidecar polling {} engines every {} ms for {:.0} s",
        args.engines, args.interval_ms, wall
    );
    println!(
        "  scrapes: {scrapes:.0} ({:.1}/s per engine), errors {errors:.0}",
        scrapes / wall / args.engines as f64
    );
    println!("  scrape latency (fetch + parse one engine's /metrics): mean {latency_ms:.2} ms");
    println!(
        "  sidecar CPU: {:.1}% of one core = {cpu_us_per_scrape:.0} us per engine per poll",
        (cpu1 - cpu0) / wall * 100.0
    );
    println!("  /snapshot: {size} bytes, served in {p50:.0} us (p50, client-side)");
    let results = serde_json::json!({"engines": args.engines, "interval_ms": args.interval_ms, "seconds": wall,
        "scrapes": scrapes, "errors": errors, "scrape_latency_ms_mean": latency_ms,
        "cpu_fraction_of_core": (cpu1 - cpu0) / wall, "cpu_us_per_engine_per_poll": cpu_us_per_scrape,
        "snapshot_bytes": size, "snapshot_p50_us": p50});
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    drop(sidecar);
    drop(engines);
    Ok(())
}
