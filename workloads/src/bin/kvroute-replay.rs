//! Replays a workload against an OpenAI-compatible endpoint and writes one JSON line per request.
//!
//! kvroute-replay --url http://127.0.0.1:10000/v1/chat/completions --workload sharegpt \
//!   --data ../shared/data/sharegpt_dev_3000.json --sessions 50 --rate 1 --out results/replay.jsonl

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kvroute_loadgen::replay::{replay, ReplayOptions};
use kvroute_traces::{arrivals, mooncake, rag, sharegpt, with_arrivals};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Workload {
    /// ShareGPT multi-turn conversations (--data: a ShareGPT V3 JSON file).
    Sharegpt,
    /// Synthetic RAG over shared system prompts.
    Rag,
    /// Half ShareGPT, half RAG (--mix sets the ShareGPT fraction).
    Mixed,
    /// A Mooncake JSONL trace (--data), at its own timestamps divided by --speedup.
    Mooncake,
}

#[derive(Parser, Debug)]
#[command(about = "Replay a workload with streaming requests; one JSON line per request")]
struct Args {
    /// Chat completions URL.
    #[arg(long, default_value = "http://127.0.0.1:10000/v1/chat/completions")]
    url: String,
    /// Workload.
    #[arg(long, value_enum, default_value = "sharegpt")]
    workload: Workload,
    /// Data file (ShareGPT JSON or Mooncake JSONL).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Sessions (conversations, users or trace requests).
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Session arrivals per second (Poisson), for sharegpt, rag and mixed.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Arrivals from an Azure LLM trace CSV instead of Poisson (its timestamps / --speedup).
    #[arg(long)]
    azure_arrivals: Option<PathBuf>,
    /// Time compression of trace timestamps.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// ShareGPT fraction of the mixed workload.
    #[arg(long, default_value_t = 0.5)]
    mix: f64,
    /// Tokens generated per turn (sharegpt, rag).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Think time between turns, ms.
    #[arg(long, default_value_t = 1000.0)]
    think_ms: f64,
    /// Use the engine's answers as history instead of the file's.
    #[arg(long)]
    engine_answers: bool,
    /// Most requests open at once.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// `model` to send.
    #[arg(long)]
    model: Option<String>,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output JSONL.
    #[arg(long, default_value = "results/replay.jsonl")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let read = |p: &Option<PathBuf>| -> anyhow::Result<String> {
        let p = p.as_ref().context("--data is required for this workload")?;
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let share = |text: &str| {
        sharegpt::parse(
            text,
            &sharegpt::ShareGptOptions {
                limit: a.sessions,
                assistant_from_file: !a.engine_answers,
                max_tokens: a.max_tokens,
                think_ms: a.think_ms,
                ..Default::default()
            },
        )
    };
    let rag_sessions = || {
        rag::generate(&rag::RagOptions {
            users: a.sessions,
            max_tokens: a.max_tokens,
            think_ms: a.think_ms,
            seed: a.seed,
            ..Default::default()
        })
    };
    let mut sessions = match a.workload {
        Workload::Sharegpt => share(&read(&a.data)?)?,
        Workload::Rag => rag_sessions(),
        Workload::Mixed => kvroute_traces::mix(
            &share(&read(&a.data)?)?,
            &rag_sessions(),
            a.mix,
            a.sessions,
            a.seed,
        ),
        Workload::Mooncake => {
            let mut reqs = mooncake::parse(&read(&a.data)?)?;
            reqs.truncate(a.sessions);
            mooncake::sessions(&reqs, a.speedup)
        }
    };
    if !matches!(a.workload, Workload::Mooncake) {
        let starts = match &a.azure_arrivals {
            Some(p) => {
                let rows = arrivals::azure_csv(&std::fs::read_to_string(p)?)?;
                let ts: Vec<f64> = rows.iter().map(|r| r.0).collect();
                arrivals::scaled(&ts, a.speedup)
            }
            None => arrivals::poisson(sessions.len(), a.rate, a.seed),
        };
        sessions = with_arrivals(sessions, &starts);
    }
    let total = kvroute_traces::requests(&sessions);
    eprintln!(
        "kvroute-replay: {} sessions, {total} requests -> {}",
        sessions.len(),
        a.url
    );
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file =
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let out = Arc::new(Mutex::new(std::io::BufWriter::new(file)));
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!(
                "\nkvroute-replay: interrupted; finishing open requests, keeping what is done"
            );
            s2.store(true, Ordering::Relaxed);
        }
    });
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b2 = bar.clone();
    let opts = ReplayOptions {
        urls: vec![a.url.clone()],
        model: a.model.clone(),
        max_in_flight: a.max_in_flight,
        timeout: Duration::from_secs(600),
        session_header: "x-session-id".into(),
        fresh_connections: false,
    };
    let summary = replay(
        sessions,
        opts,
        out,
        stop,
        Arc::new(move |n, _| b2.set_position(n as u64)),
    )
    .await?;
    bar.finish();
    eprintln!(
        "kvroute-replay: {} requests finished ({} failed){} in {:.1} s; records in {}",
        summary.finished,
        summary.failed,
        if summary.interrupted {
            ", interrupted"
        } else {
            ""
        },
        summary.wall_s,
        a.out.display()
    );
    Ok(())
}
