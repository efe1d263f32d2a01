//! The short demo (the main job until the study runner lands): two endpoints behind the real Envoy
//! with the real filter; every policy in turn is switched on live through `runtime_modify`, the same
//! scripted multi-turn conversations are sent, and a report shows where each turn went and what the
//! filter's stats say.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use kvroute_core::policy::PolicyKind;
use kvroute_workloads::echo::EchoEngine;
use kvroute_workloads::envoy_config::{Engine, EnvoySpec};
use kvroute_workloads::stack::{filter_wasm, Envoy};

#[derive(Parser, Debug)]
#[command(about = "Route scripted conversations with every kvroute policy through a real Envoy")]
struct Args {
    /// Where the report goes.
    #[arg(long, default_value = "results/demo")]
    out: PathBuf,
    /// Conversations per policy.
    #[arg(long, default_value_t = 4)]
    conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 3)]
    turns: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let e0 = EchoEngine::start("engine0").await?;
    let e1 = EchoEngine::start("engine1").await?;
    let engines = [&e0, &e1]
        .iter()
        .map(|e| Engine {
            name: e.name.clone(),
            host: "127.0.0.1".into(),
            port: e.addr.port(),
        })
        .collect();
    let spec = EnvoySpec::new(engines, filter_wasm()?.display().to_string());
    eprintln!("demo: starting Envoy (--concurrency 2) with the kvroute filter");
    let envoy = Envoy::start(spec).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut report = String::new();
    let _ = writeln!(report, "# kvroute demo\n");
    let _ = writeln!(
        report,
        "Two endpoints behind Envoy 1.40 (`--concurrency 2`) with the kvroute filter. For each policy, \
         set live with `POST /runtime_modify?kvroute.policy=...`, the same {} conversations of {} turns \
         are sent (each turn resends the history; conversation c has session id `user-c`). Cells show \
         the endpoint that served each turn.\n",
        args.conversations, args.turns
    );
    for policy in PolicyKind::ALL {
        let took = envoy.set_policy(policy.as_str()).await?;
        eprintln!("demo: policy {policy} (live after {} ms)", took.as_millis());
        let _ = writeln!(
            report,
            "## {policy}\n\nswitched live in {} ms\n",
            took.as_millis()
        );
        let _ = writeln!(
            report,
            "| conversation | {} |",
            (1..=args.turns)
                .map(|t| format!("turn {t}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(report, "|---|{}", "---|".repeat(args.turns));
        for c in 0..args.conversations {
            let mut messages = vec![
                serde_json::json!({"role": "system", "content": format!("[team {}] You are a meticulous assistant for team {}. ", c % 2, c % 2).repeat(12)}),
            ];
            let mut row = Vec::new();
            for t in 0..args.turns {
                messages.push(serde_json::json!({"role": "user", "content": format!("Conversation {c}, turn {t}: please continue the analysis.")}));
                let body =
                    serde_json::json!({"model": "demo", "messages": messages, "max_tokens": 16});
                let t0 = Instant::now();
                let r = client
                    .post(format!("http://{}/v1/chat/completions", envoy.listener))
                    .header("x-session-id", format!("user-{c}"))
                    .json(&body)
                    .send()
                    .await?;
                let served = r
                    .headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string();
                let status = r.status();
                let _ = r.bytes().await;
                if !status.is_success() {
                    anyhow::bail!("request failed with {status}");
                }
                row.push(format!("{served} ({} ms)", t0.elapsed().as_millis()));
                messages.push(
                    serde_json::json!({"role": "assistant", "content": "Certainly. Here is more."}),
                );
            }
            let _ = writeln!(report, "| {c} | {} |", row.join(" | "));
        }
        let stats = envoy.stats().await?;
        let get = |k: &str| stats.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            report,
            "\nstats: decisions engine0={} engine1={}, predicted cached blocks {} of {}, fallbacks no_session={}\n",
            get(&format!("kvroute_decisions_total.policy.{policy}.endpoint.engine0")),
            get(&format!("kvroute_decisions_total.policy.{policy}.endpoint.engine1")),
            get("kvroute_predicted_cached_blocks_total"),
            get("kvroute_request_blocks_total"),
            get("kvroute_fallbacks_total.reason.no_session"),
        );
    }
    let prom = envoy.prometheus().await?;
    let _ = writeln!(
        report,
        "## Envoy `/stats/prometheus` (kvroute lines)\n\n```"
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
