//! `kvroute-emulator`: a vLLM-compatible engine without a GPU. Flags mirror `vllm serve` where they
//! mean the same thing.

use axum::serve::ListenerExt;
use clap::Parser;
use kvroute_emulator::engine::EngineConfig;
use kvroute_emulator::kv_events::KvEventsConfig;
use kvroute_emulator::profile::Profile;
use kvroute_emulator::server::{start, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    about = "vLLM-compatible engine emulator (OpenAI API, prefix cache, V1 scheduling, vLLM metrics)"
)]
struct Args {
    /// Model name (as `vllm serve MODEL`); defaults to the profile's model.
    model: Option<String>,
    /// Host to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Name clients send as `model` (default: the model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Hardware profile: a built-in name or a profile JSON file (`--list-profiles`).
    #[arg(long, default_value = "rtx5080-llama3.2-3b")]
    profile: String,
    /// Print the built-in profiles and exit.
    #[arg(long)]
    list_profiles: bool,
    /// Most running requests.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: u32,
    /// Token budget of one step.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: u32,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Longest prompt + output (default: the profile's).
    #[arg(long)]
    max_model_len: Option<u32>,
    /// Automatic prefix caching (vLLM V1 enables it by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    enable_prefix_caching: bool,
    /// Disable prefix caching.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Fraction of GPU memory for weights and KV cache (default: the profile's).
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// Use exactly this many KV blocks.
    #[arg(long)]
    num_gpu_blocks_override: Option<u32>,
    /// Share of the GPU this instance gets (two instances on one GPU, both busy: 0.5).
    #[arg(long, default_value_t = 1.0)]
    gpu_share: f64,
    /// Run this many times faster than real time (latencies in /metrics stay in model time).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Publish KV cache events, as vLLM's flag of the same name (JSON: `{"enable_kv_cache_events":
    /// true, "publisher": "zmq", "endpoint": "tcp://*:5557", "topic": ""}`).
    #[arg(long)]
    kv_events_config: Option<String>,
    /// Export vLLM's KV cache residency histograms (`vllm:kv_block_lifetime_seconds`,
    /// `kv_block_idle_before_evict_seconds`, `kv_block_reuse_gap_seconds`) for a sample of blocks.
    #[arg(long)]
    kv_cache_metrics: bool,
    /// Share of KV block allocations followed for `--kv-cache-metrics`, in (0, 1].
    #[arg(long, default_value_t = 0.01)]
    kv_cache_metrics_sample: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.list_profiles {
        for p in Profile::builtin() {
            println!(
                "{}: {} on {}, {} KV blocks of 16 at utilization {}",
                p.name,
                p.model,
                p.gpu,
                p.num_gpu_blocks(p.default_gpu_memory_utilization, 16),
                p.default_gpu_memory_utilization
            );
            for s in &p.sources {
                println!("  - {s}");
            }
        }
        return Ok(());
    }
    let profile = Profile::load(&args.profile).map_err(anyhow::Error::msg)?;
    let util = args
        .gpu_memory_utilization
        .unwrap_or(profile.default_gpu_memory_utilization);
    if args.time_scale <= 0.0 || !args.time_scale.is_finite() {
        anyhow::bail!("--time-scale must be positive");
    }
    let blocks = match args.num_gpu_blocks_override {
        Some(0) => anyhow::bail!("--num-gpu-blocks-override 0: want at least one block"),
        Some(n) => {
            Profile::check_utilization(util).map_err(anyhow::Error::msg)?;
            n
        }
        None => profile
            .kv_blocks_at(util, args.block_size)
            .map_err(anyhow::Error::msg)?,
    };
    let model = args.model.clone().unwrap_or_else(|| profile.model.clone());
    let cfg = ServerConfig {
        served_model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| model.clone()),
        engine: EngineConfig {
            model,
            block_size: args.block_size,
            num_gpu_blocks: blocks,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_model_len: args.max_model_len.unwrap_or(profile.max_model_len),
            enable_prefix_caching: args.enable_prefix_caching && !args.no_enable_prefix_caching,
            latency: profile.latency.clone(),
            gpu_share: args.gpu_share,
        },
        time_scale: args.time_scale,
        gpu_memory_utilization: util,
        kv_events: None,
        kv_cache_metrics_sample: args
            .kv_cache_metrics
            .then_some(args.kv_cache_metrics_sample),
    };
    let mut cfg = cfg;
    if let Some(k) = args
        .kv_events_config
        .as_deref()
        .map(KvEventsConfig::parse)
        .transpose()?
        .flatten()
    {
        let (sink, endpoint) = kvroute_emulator::kv_events::start(&k).await?;
        // Before "listening on", which tells a supervisor the server is up.
        println!("kv events on {endpoint}");
        cfg.kv_events = Some(sink);
    }
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    let addr = listener.local_addr()?;
    eprintln!(
        "kvroute-emulator: {} ({} profile, {} KV blocks of {}, time x{}) on http://{addr}",
        cfg.served_model_name, profile.name, blocks, args.block_size, args.time_scale
    );
    println!("listening on {addr}");
    let (app, _state) = start(cfg)?;
    // As vLLM's server does (asyncio sets TCP_NODELAY): without it a short response waits for the
    // client's delayed ACK of the headers, ~40 ms, and short TTFTs are off by that much.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
