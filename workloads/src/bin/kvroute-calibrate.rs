//! Measures an engine (a real vLLM or the emulator) and writes a profile the emulator loads
//! (`kvroute-emulator --profile FILE`).
//!
//! kvroute-calibrate --url http://127.0.0.1:8000 --out my-gpu.json

use clap::Parser;
use kvroute_loadgen::calibrate::{calibrate, profile};

#[derive(Parser, Debug)]
#[command(about = "Calibrate an engine's prefill and decode times into an emulator profile")]
struct Args {
    /// Engine base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Prompt lengths (tokens).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128,256,512,1024,2048,4096,8192"
    )]
    lengths: Vec<usize>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    batches: Vec<usize>,
    /// Emulated time per wall time of the endpoint (1 for a real engine).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// KV blocks of the engine (default: its vllm:cache_config_info).
    #[arg(long)]
    num_gpu_blocks: Option<u32>,
    /// Profile name.
    #[arg(long, default_value = "calibrated")]
    name: String,
    /// Output profile JSON.
    #[arg(long, default_value = "results/calibration/profile.json")]
    out: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let models: serde_json::Value = reqwest::get(format!("{}/v1/models", a.url))
        .await?
        .json()
        .await?;
    let model = models
        .pointer("/data/0/id")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_string();
    let max_len = models
        .pointer("/data/0/max_model_len")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(32_768) as u32;
    let blocks = match a.num_gpu_blocks {
        Some(b) => b,
        None => {
            let page = reqwest::get(format!("{}/metrics", a.url))
                .await?
                .text()
                .await?;
            page.lines()
                .find(|l| l.starts_with("vllm:cache_config_info{"))
                .and_then(|l| {
                    l.split("num_gpu_blocks=\"")
                        .nth(1)?
                        .split('"')
                        .next()?
                        .parse()
                        .ok()
                })
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "no vllm:cache_config_info on {}/metrics: pass --num-gpu-blocks",
                        a.url
                    )
                })?
        }
    };
    let lengths: Vec<usize> = a
        .lengths
        .iter()
        .copied()
        .filter(|l| (*l as u32) < max_len)
        .collect();
    eprintln!(
        "kvroute-calibrate: {model} at {}: lengths {lengths:?}, batches {:?}",
        a.url, a.batches
    );
    let c = calibrate(&a.url, &lengths, &a.batches, a.time_scale).await?;
    println!(
        "{:>7} {:>12} {:>12} {:>8}",
        "tokens", "miss TTFT ms", "hit TTFT ms", "cached"
    );
    for p in &c.prefill {
        println!(
            "{:>7} {:>12.1} {:>12.1} {:>8}",
            p.tokens,
            p.miss_s * 1e3,
            p.hit_s * 1e3,
            p.hit_cached
        );
    }
    println!("{:>7} {:>12}", "batch", "decode ms/token");
    for d in &c.decode {
        println!("{:>7} {:>12.2}", d.batch, d.step_s * 1e3);
    }
    let p = profile(&c, &a.name, &model, blocks, max_len, &a.url);
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&p)?)?;
    std::fs::write(
        a.out.with_extension("measurements.json"),
        serde_json::to_string_pretty(&c)?,
    )?;
    eprintln!(
        "kvroute-calibrate: profile written to {} (kvroute-emulator --profile {})",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
