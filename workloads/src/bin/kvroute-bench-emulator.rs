//! The emulator under load: one process holding N concurrent streaming requests.
//!
//! Reports, for the emulator process alone (CPU and memory from /proc): whether every stream
//! completed, how closely steps kept to the latency model (wall time from step start to tokens
//! delivered, over the modelled step time), CPU seconds per 1,000 generated tokens, and memory per
//! cached KV block (RSS growth while the prefix cache fills, over the blocks cached).
//! Run: `cargo run --release -p kvroute-workloads --bin kvroute-bench-emulator` (after
//! `cargo build --release -p kvroute-emulator`).

// `serde_json::Value["key"]` yields Null for a missing key; it never panics.
#![allow(clippy::indexing_slicing)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::StreamExt;
use kvroute_harness::procs;

#[derive(Parser, Debug)]
#[command(about = "Load and footprint of one kvroute-emulator process")]
struct Args {
    /// Concurrent streaming requests.
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Profile for the load phase (needs room for every request's blocks at once).
    #[arg(long, default_value = "h100-llama3.1-8b")]
    profile: String,
    /// Distinct prompts sent in the memory phase (each 1,000 tokens = 62 blocks).
    #[arg(long, default_value_t = 2000)]
    fill_prompts: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "results/bench/emulator.json")]
    out: std::path::PathBuf,
}

async fn spawn(args: &[&str]) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut all = vec!["--port".to_string(), "0".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let (child, addr) = procs::spawn_listening("kvroute-emulator", &all).await?;
    Ok((child, format!("http://{addr}")))
}

fn usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    procs::cpu_rss(pid)
}

async fn stats(base: &str) -> anyhow::Result<serde_json::Value> {
    Ok(reqwest::get(format!("{base}/emulator/stats"))
        .await?
        .json()
        .await?)
}

fn prompt(i: usize, words: usize) -> String {
    (0..words).map(|w| format!("w{}x{} ", i, w)).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut results = serde_json::Map::new();

    // Phase 1: N concurrent streams in real time.
    let (child, base) = spawn(&[
        "--profile",
        &args.profile,
        "--max-num-seqs",
        &(args.concurrency + 24).to_string(),
        "--max-num-batched-tokens",
        "8192",
    ])
    .await?;
    let pid = child.id().context("no pid")?;
    let (cpu0, rss0) = usage(pid)?;
    let tokens = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        let (client, base, tokens, completed) = (
            client.clone(),
            base.clone(),
            tokens.clone(),
            completed.clone(),
        );
        let max_tokens = args.max_tokens;
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({"messages": [{"role": "user", "content": prompt(i, 20)}],
                "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
            let Ok(r) = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
            else {
                return;
            };
            let mut s = r.bytes_stream();
            let mut done = false;
            while let Some(Ok(chunk)) = s.next().await {
                let text = String::from_utf8_lossy(&chunk);
                tokens.fetch_add(
                    text.matches("\"content\":\"").count() as u64,
                    Ordering::Relaxed,
                );
                done |= text.contains("[DONE]");
            }
            if done {
                completed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut peak_running = 0u64;
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let m = reqwest::get(format!("{base}/metrics"))
            .await?
            .text()
            .await?;
        let running = m
            .lines()
            .find(|l| l.starts_with("vllm:num_requests_running{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        peak_running = peak_running.max(running);
        eprint!(
            "\rbench: {} of {} streams done, {} running",
            completed.load(Ordering::Relaxed),
            args.concurrency,
            running
        );
    }
    eprintln!();
    for t in tasks {
        let _ = t.await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, rss1) = usage(pid)?;
    let st = stats(&base).await?;
    let generated = tokens.load(Ordering::Relaxed);
    let done = completed.load(Ordering::Relaxed);
    let ratio = st["actual_over_modelled"].as_f64().unwrap_or(0.0);
    let cpu_per_1k = (cpu1 - cpu0) / (generated.max(1) as f64) * 1000.0;
    println!(
        "emulator under {} concurrent streaming requests ({} profile, real time)",
        args.concurrency, args.profile
    );
    println!("  completed {done} of {}; peak running {peak_running}; {generated} tokens streamed in {wall:.1} s", args.concurrency);
    let steps = st["steps"].as_u64().unwrap_or(1).max(1) as f64;
    let mean_step_us = st["modelled_step_wall_us"].as_f64().unwrap_or(0.0) / steps;
    let mean_late_us = st["sum_late_us"].as_f64().unwrap_or(0.0) / steps;
    println!(
        "  step timing over {steps} steps: tokens delivered {mean_late_us:.0} us after the modelled step end on average \
         ({:.2}% of the mean modelled step of {:.1} ms), at most {} us; busy wall time / modelled = {ratio:.4}",
        100.0 * mean_late_us / mean_step_us.max(1.0),
        mean_step_us / 1000.0,
        st["max_late_us"]
    );
    println!(
        "  CPU: {:.3} s per 1,000 generated tokens ({:.1} s over the run); RSS {:.1} -> {:.1} MiB",
        cpu_per_1k,
        cpu1 - cpu0,
        rss0 as f64 / 1048576.0,
        rss1 as f64 / 1048576.0
    );
    results.insert(
        "load".into(),
        serde_json::json!({"concurrency": args.concurrency, "completed": done, "peak_running": peak_running,
            "tokens": generated, "wall_s": wall, "actual_over_modelled": ratio, "max_late_us": st["max_late_us"],
            "mean_late_us": mean_late_us, "mean_step_us": mean_step_us, "mean_late_pct_of_step": 100.0 * mean_late_us / mean_step_us.max(1.0),
            "steps": st["steps"], "cpu_s": cpu1 - cpu0, "cpu_s_per_1000_tokens": cpu_per_1k, "rss_bytes_after": rss1}),
    );
    drop(child);
    if done as usize != args.concurrency {
        bail!("only {done} of {} streams completed", args.concurrency);
    }

    // Phase 2: memory per cached block. A big pool, filled with distinct 1,000-token prompts.
    let blocks = (args.fill_prompts * 64 + 1000).to_string();
    let (child, base) = spawn(&[
        "--num-gpu-blocks-override",
        &blocks,
        "--time-scale",
        "10000",
        "--max-model-len",
        "4096",
    ])
    .await?;
    let pid = child.id().context("no pid")?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, before) = usage(pid)?;
    let ids: Vec<u32> = (0..1000).collect();
    let mut fill = futures_util::stream::iter(0..args.fill_prompts)
        .map(|i| {
            let (client, base) = (client.clone(), base.clone());
            let p: Vec<u32> = ids
                .iter()
                .map(|t| (t * 31 + i as u32 * 7919) % 120_000)
                .collect();
            async move {
                let body = serde_json::json!({"prompt": p, "max_tokens": 1});
                client
                    .post(format!("{base}/v1/completions"))
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
            }
        })
        .buffer_unordered(32);
    let mut ok = 0;
    while let Some(r) = fill.next().await {
        ok += usize::from(matches!(r, Ok(true)));
    }
    let st = stats(&base).await?;
    let (_, after) = usage(pid)?;
    let cached = st["cached_blocks"].as_u64().unwrap_or(0);
    let per_block = (after.saturating_sub(before)) as f64 / cached.max(1) as f64;
    println!("memory: {cached} cached blocks ({ok} prompts): RSS {:.1} -> {:.1} MiB = {per_block:.0} bytes per cached block", before as f64 / 1048576.0, after as f64 / 1048576.0);
    results.insert(
        "memory".into(),
        serde_json::json!({"pool_blocks": blocks, "cached_blocks": cached, "rss_before": before, "rss_after": after, "bytes_per_cached_block": per_block}),
    );
    drop(child);
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&serde_json::Value::Object(results))?,
    )?;
    eprintln!("bench: results in {}", args.out.display());
    Ok(())
}
