//! Prefix reuse in a workload, and the oracle hit rates that bound every routing policy.
//!
//! kvroute-analyze --workload sharegpt --data ../shared/data/sharegpt_dev_3000.json --engines 2 --capacity-blocks 711

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use kvroute_traces::{mooncake, rag, sharegpt};

// Turn t of a session is placed at start + t x think time (response times are not modelled).
use kvroute_loadgen::analyze::analyze;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Workload {
    Sharegpt,
    Rag,
    Mooncake,
}

#[derive(Parser, Debug)]
#[command(about = "Prefix reuse and oracle hit-rate bounds of a workload")]
struct Args {
    /// Workload.
    #[arg(long, value_enum, default_value = "sharegpt")]
    workload: Workload,
    /// Data file (ShareGPT JSON or Mooncake JSONL).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Sessions (conversations, users or trace requests).
    #[arg(long, default_value_t = 500)]
    sessions: usize,
    /// Engines of the capacity bound.
    #[arg(long, default_value_t = 2)]
    engines: usize,
    /// KV blocks (16 tokens) per engine (the seed rig: 711).
    #[arg(long, default_value_t = 711)]
    capacity_blocks: usize,
    /// Tokens generated per turn (for engine-answered turns).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Session arrivals per second (Poisson; sharegpt and rag). Mooncake keeps its timestamps.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seed of the arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Model name (root of the block hashes).
    #[arg(long, default_value = "meta-llama/Llama-3.2-3B-Instruct")]
    model: String,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let read = || -> anyhow::Result<String> {
        let p = a
            .data
            .as_ref()
            .context("--data is required for this workload")?;
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let sessions = match a.workload {
        Workload::Sharegpt => sharegpt::parse(
            &read()?,
            &sharegpt::ShareGptOptions {
                limit: a.sessions,
                max_tokens: a.max_tokens,
                ..Default::default()
            },
        )?,
        Workload::Rag => rag::generate(&rag::RagOptions {
            users: a.sessions,
            max_tokens: a.max_tokens,
            ..Default::default()
        }),
        Workload::Mooncake => {
            let mut reqs = mooncake::parse(&read()?)?;
            reqs.truncate(a.sessions);
            mooncake::sessions(&reqs, 1.0)
        }
    };
    let sessions = match a.workload {
        Workload::Mooncake => sessions,
        _ => {
            let starts = kvroute_traces::arrivals::poisson(sessions.len(), a.rate, a.seed);
            kvroute_traces::with_arrivals(sessions, &starts)
        }
    };
    let r = analyze(&sessions, &a.model, a.engines, a.capacity_blocks);
    println!(
        "{:?}: {} sessions, {} requests, {} prompt tokens",
        a.workload,
        sessions.len(),
        r.requests,
        r.prompt_tokens
    );
    println!(
        "  oracle hit rate, infinite cache:              {:.3}",
        r.oracle_infinite
    );
    println!(
        "  oracle hit rate, {} engines x {} blocks:      {:.3}",
        r.engines, r.capacity_blocks, r.oracle_capacity
    );
    println!(
        "  reusable within a session / across sessions: {:.3} / {:.3}",
        r.within_session, r.across_sessions
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
