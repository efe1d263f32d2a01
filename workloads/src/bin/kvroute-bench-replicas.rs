//! What two Envoy replicas cost in prefix hits. Two Envoys with kvroute (`load_cache_aware`) share
//! one sidecar in front of two emulated engines. The replicas share the sidecar's view (engine
//! load, health, capacity) but not their prefix directories, sessions or gateway in-flight
//! counts. The same multi-turn workload runs from a cold start with every turn through one
//! replica, with each conversation pinned to a replica (a session-affine balancer), and with each
//! turn on a pseudo-random replica (a plain L4 balancer); the engines' own hit rates are compared.
//! Run: `cargo run --release -p kvroute-workloads --bin kvroute-bench-replicas` (after `just wasm`).

use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use kvroute_workloads::emulated::{EmulatedEngine, RunningSidecar};
use kvroute_workloads::envoy_config::{Engine, EnvoySpec};
use kvroute_workloads::scripted::{conversation, snapshot, Spread};
use kvroute_workloads::stack::{filter_wasm, Envoy};

#[derive(Parser, Debug)]
#[command(about = "Hit-rate cost of two Envoy replicas with separate directories")]
struct Args {
    /// Conversations per run.
    #[arg(long, default_value_t = 24)]
    conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 5)]
    turns: usize,
    /// Conversations in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Repeats of each configuration.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "results/bench/replicas.json")]
    out: std::path::PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut engines = Vec::new();
    for i in 0..2 {
        engines
            .push(EmulatedEngine::start(&format!("engine{i}"), "rtx5080-llama3.2-3b", 5.0).await?);
    }
    let refs: Vec<&EmulatedEngine> = engines.iter().collect();
    let sidecar =
        RunningSidecar::start_at(&refs, Duration::from_millis(100), "127.0.0.1:0".parse()?).await?;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let spec_engines = engines
            .iter()
            .map(|e| Engine::local(&e.name, e.addr.port()))
            .collect();
        let mut spec = EnvoySpec::new(spec_engines, filter_wasm()?.display().to_string());
        spec.set_sidecar(Engine::local("sidecar", sidecar.addr.port()));
        replicas.push(Envoy::start(spec).await?);
    }
    let urls: Vec<String> = replicas
        .iter()
        .map(|e| e.url("/v1/chat/completions"))
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut epoch = 0u64;
    let mut rows = Vec::new();
    println!(
        "two Envoy replicas, one sidecar, two emulated engines; load_cache_aware; {} conversations x {} turns, {} at a time",
        args.conversations, args.turns, args.concurrency
    );
    println!(
        "{:<18} {:>10} {:>10} {:>14}",
        "spread", "hit rate", "range", "mean TTFT ms"
    );
    for spread in [Spread::Single, Spread::PerConversation, Spread::PerTurn] {
        let mut hits = Vec::new();
        let mut ttfts = Vec::new();
        for _ in 0..args.repeats {
            for e in &engines {
                client
                    .post(format!("{}/reset_prefix_cache", e.url()))
                    .send()
                    .await?;
            }
            epoch += 1;
            for r in &replicas {
                r.runtime_modify(&[("kvroute.directory_epoch", &epoch.to_string())])
                    .await?;
                r.wait_stat(
                    "kvroute_setting_directory_epoch",
                    Duration::from_secs(5),
                    |v| v == epoch,
                )
                .await?;
            }
            let before = snapshot(&client, &engines).await?;
            let results: Vec<anyhow::Result<()>> =
                futures_util::stream::iter(0..args.conversations)
                    .map(|c| conversation(client.clone(), urls.clone(), spread, c, args.turns))
                    .buffer_unordered(args.concurrency)
                    .collect()
                    .await;
            for r in results {
                r?;
            }
            let after = snapshot(&client, &engines).await?;
            hits.push(after.hit_rate_since(&before));
            ttfts.push(after.mean_ttft_since(&before) * 1e3);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let range = |v: &[f64]| {
            v.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
                - v.iter().cloned().fold(f64::INFINITY, f64::min)
        };
        println!(
            "{:<18} {:>10.3} {:>10.3} {:>14.1}",
            format!("{spread:?}"),
            mean(&hits),
            range(&hits),
            mean(&ttfts)
        );
        rows.push(serde_json::json!({"spread": format!("{spread:?}"), "hit_rates": hits, "mean_ttft_ms": ttfts}));
    }
    println!(
        "(hit rate: engines' prefix_cache_hits / queries; range: max - min over {} repeats)",
        args.repeats
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&rows)?)?;
    for r in replicas {
        r.stop(false).await;
    }
    Ok(())
}
