//! The short demo (`just demo`, a few minutes; the study is the main job): two emulated vLLM engines (the seed
//! rig's profile, 5x real time) behind the real Envoy with the real filter. For every policy in
//! turn: both engines' prefix caches are reset, the policy is switched on live through
//! `runtime_modify`, and the same multi-turn workload runs (conversations resend their history;
//! they share one of three system prompts; four run at a time). The report gives, per policy, the
//! engines' own prefix-cache hit rate and mean TTFT (deltas of their `/metrics`), the routing split
//! from Envoy's stats, and the filter's predicted cached blocks.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use kvroute_core::policy::PolicyKind;
use kvroute_harness::emulated::EmulatedEngine;
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::scripted::{conversation, snapshot, Spread};
use kvroute_harness::stack::{filter_wasm, Envoy};

#[derive(Parser, Debug)]
#[command(
    about = "Every kvroute policy on the same workload through a real Envoy and emulated vLLM engines"
)]
struct Args {
    /// Where the report goes.
    #[arg(long, default_value = "results/demo")]
    out: PathBuf,
    /// Conversations per policy.
    #[arg(long, default_value_t = 16)]
    conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 5)]
    turns: usize,
    /// Conversations in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Emulated time runs this many times faster than real time. Higher is quicker but multiplies
    /// the host's scheduling jitter into emulated time.
    #[arg(long, default_value_t = 5.0)]
    time_scale: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let engines = EmulatedEngine::start_fleet(2, "rtx5080-llama3.2-3b", args.time_scale).await?;
    let spec_engines = engines
        .iter()
        .map(|e| Engine::local(&e.name, e.addr.port()))
        .collect();
    let spec = EnvoySpec::new(spec_engines, filter_wasm()?.display().to_string());
    eprintln!("demo: two emulated Llama-3.2-3B engines (RTX 5080 profile, 711 KV blocks each, x{}), Envoy with kvroute", args.time_scale);
    let envoy = Envoy::start(spec).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut report = String::new();
    let _ = writeln!(report, "# kvroute demo\n");
    let _ = writeln!(
        report,
        "Two emulated vLLM engines (Llama-3.2-3B on an RTX 5080 at 0.45 memory: 711 KV blocks of 16 \
         tokens each; emulated time x{}) behind Envoy 1.40 (`--concurrency 2`) with the kvroute filter. \
         For each policy, switched live with `POST /runtime_modify?kvroute.policy=...` after both \
         engines' prefix caches were reset (and the router's directory, with a new \
         `kvroute.directory_epoch`): {} conversations of {} turns (each turn resends the \
         history; three system prompts shared across conversations; session id per conversation; \
         {} conversations at a time). Hit rate and TTFT are the engines' own metrics \
         (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, \
         `vllm:time_to_first_token_seconds`, in emulated time). This is a demo, not the study: one \
         run, no repeats.\n",
        args.time_scale, args.conversations, args.turns, args.concurrency
    );
    let _ = writeln!(report, "| policy | requests engine0 / engine1 | engine prefix hit rate | mean TTFT (ms) | filter: predicted cached blocks / request blocks |");
    let _ = writeln!(report, "|---|---|---|---|---|");
    let mut prev_pred = (0u64, 0u64);
    for (run, policy) in PolicyKind::ALL.iter().enumerate() {
        // Cold start for every policy: the engines' prefix caches and the router's directory.
        for e in &engines {
            client
                .post(format!("{}/reset_prefix_cache", e.url()))
                .send()
                .await?;
        }
        let epoch = (run + 1).to_string();
        envoy
            .runtime_modify(&[("kvroute.directory_epoch", epoch.as_str())])
            .await?;
        envoy
            .wait_stat(
                "kvroute_setting_directory_epoch",
                Duration::from_secs(5),
                |v| v == run as u64 + 1,
            )
            .await?;
        let took = envoy.set_policy(policy.as_str()).await?;
        let before = snapshot(&client, &engines).await?;
        let url = envoy.url("/v1/chat/completions");
        let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(0..args.conversations)
            .map(|c| {
                conversation(
                    client.clone(),
                    vec![url.clone()],
                    Spread::Single,
                    c,
                    args.turns,
                )
            })
            .buffer_unordered(args.concurrency)
            .collect()
            .await;
        for r in results {
            r?;
        }
        let after = snapshot(&client, &engines).await?;
        let stats = envoy.stats().await?;
        let get = |k: &str| stats.get(k).copied().unwrap_or(0);
        let split = (
            get(&format!(
                "kvroute_decisions_total.policy.{policy}.endpoint.engine0"
            )),
            get(&format!(
                "kvroute_decisions_total.policy.{policy}.endpoint.engine1"
            )),
        );
        let pred = (
            get("kvroute_predicted_cached_blocks_total"),
            get("kvroute_request_blocks_total"),
        );
        let hit = (after.hits - before.hits) / (after.queries - before.queries).max(1.0);
        let ttft =
            (after.ttft_sum - before.ttft_sum) / (after.ttft_count - before.ttft_count).max(1.0);
        eprintln!(
            "demo: {policy:<16} live after {:>4} ms; hit rate {hit:.3}, mean TTFT {:.1} ms",
            took.as_millis(),
            ttft * 1e3
        );
        let _ = writeln!(
            report,
            "| {policy} | {} / {} | {:.3} | {:.1} | {} / {} |",
            split.0,
            split.1,
            hit,
            ttft * 1e3,
            pred.0 - prev_pred.0,
            pred.1 - prev_pred.1
        );
        prev_pred = pred;
    }
    let prom = envoy.prometheus().await?;
    let _ = writeln!(
        report,
        "\n## Envoy `/stats/prometheus`, kvroute lines\n\n```"
    );
    for l in prom
        .lines()
        .filter(|l| l.starts_with("kvroute_") && !l.contains("_bucket"))
    {
        let _ = writeln!(report, "{l}");
    }
    let _ = writeln!(report, "```");
    envoy.stop(false).await;
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("report.md");
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("demo: report written to {}", path.display());
    Ok(())
}
