//! Simulator benchmark: simulated requests per second on one core.
//!
//! 1. The Mooncake synthetic trace (3,993 requests, mean 15k input tokens) at its own arrival
//!    times on N = 16 engines with the H100 profile, every policy: simulation time per policy
//!    (the workload's preparation, shared by all policies, is timed apart).
//! 2. A million requests: synthetic RAG (single-question users over shared documents) on N = 64
//!    engines, the default policy.
//!
//! Preparation (tokenizing prompts, hashing blocks: once per workload) uses every core; each
//! simulation runs on one thread.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use kvroute_core::{PolicyKind, PolicySettings};
use kvroute_sim::{simulate, SimConfig};
use kvroute_study::simulated;
use kvroute_traces::{arrivals, mooncake, rag, with_arrivals};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the simulator: Mooncake at N=16 per policy, and a million requests")]
struct Args {
    /// Mooncake JSONL trace.
    #[arg(long, default_value = "../shared/data/mooncake_synthetic_trace.jsonl")]
    mooncake: PathBuf,
    /// Requests of the large run.
    #[arg(long, default_value_t = 1_000_000)]
    requests: usize,
    /// Engines of the large run.
    #[arg(long, default_value_t = 64)]
    engines: usize,
    /// Engine profile.
    #[arg(long, default_value = "h100-llama3.1-8b")]
    profile: String,
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let engine = simulated::engine_config(&a.profile)?;
    let base = |n: usize, policy: PolicyKind| SimConfig {
        record_itl: false,
        ..SimConfig::new(
            n,
            engine.clone(),
            PolicySettings {
                policy,
                ..PolicySettings::default()
            },
        )
    };

    // 1. Mooncake at N = 16.
    let text = std::fs::read_to_string(&a.mooncake)?;
    let reqs =
        mooncake::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.mooncake.display()))?;
    let sessions = mooncake::sessions(&reqs, 1.0);
    let t = Instant::now();
    let work = simulated::prepare_for(&base(16, PolicyKind::Jsq), &sessions);
    let prep_s = t.elapsed().as_secs_f64();
    let tokens: usize = work
        .iter()
        .flat_map(|s| &s.turns)
        .map(|t| t.prompt.len())
        .sum();
    println!(
        "mooncake: {} requests, {:.1}M prompt tokens; prepared in {prep_s:.2} s on {} threads",
        reqs.len(),
        tokens as f64 / 1e6,
        threads()
    );
    println!(
        "{:<20} {:>8} {:>10} {:>9} {:>10} {:>12}",
        "policy (N=16)", "sim s", "req/s", "hit rate", "P95 TTFT", "events"
    );
    let mut worst: f64 = 0.0;
    for p in PolicyKind::ALL {
        let t = Instant::now();
        let out = simulate(&base(16, *p), &work);
        let s = t.elapsed().as_secs_f64();
        worst = worst.max(s);
        let mut ttft: Vec<u64> = out.records.iter().filter_map(|r| r.ttft_us).collect();
        ttft.sort_unstable();
        let p95 = ttft.get(ttft.len() * 95 / 100).copied().unwrap_or(0) as f64 / 1000.0;
        println!(
            "{:<20} {:>8.3} {:>10.0} {:>9.3} {:>8.0}ms {:>12}",
            p.as_str(),
            s,
            out.records.len() as f64 / s,
            out.counters.hits / out.counters.queries.max(1.0),
            p95,
            out.events
        );
    }
    println!("mooncake N=16: slowest policy {worst:.3} s (target <= 2 s)");

    // 2. A million requests.
    let docs = rag::generate(&rag::RagOptions {
        users: a.requests,
        documents: 64,
        document_tokens: 500,
        question_tokens: 24,
        max_tokens: 32,
        seed: 7,
        ..Default::default()
    });
    // Each engine at about 60% of its prefill-bound rate for these prompts.
    let rate = 6.0 * a.engines as f64;
    let starts = arrivals::poisson(docs.len(), rate, 7);
    let sessions = with_arrivals(docs, &starts);
    let t = Instant::now();
    let work = simulated::prepare_for(&base(a.engines, PolicyKind::Jsq), &sessions);
    let prep_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = simulate(&base(a.engines, PolicyKind::LoadCacheAware), &work);
    let s = t.elapsed().as_secs_f64();
    println!(
        "large: {} requests on {} engines (load_cache_aware): prepared in {prep_s:.1} s on {} \
         threads; simulated in {s:.1} s on one thread = {:.0} requests/s; {:.0} s of simulated \
         time, {} events, hit rate {:.3} (target: 1M requests <= 120 s)",
        out.records.len(),
        a.engines,
        threads(),
        out.records.len() as f64 / s,
        out.end_us as f64 / 1e6,
        out.events,
        out.counters.hits / out.counters.queries.max(1.0)
    );
    Ok(())
}
