//! Calibration: measure an OpenAI-compatible engine (a real vLLM or the emulator) and write a
//! profile the emulator and the simulator load.
//!
//! - TTFT on a cache miss and on a hit, for prompt lengths 128 to 8192 tokens (prompts are token
//!   ids on `/v1/completions`, so lengths are exact): a fresh prompt, then the same one again; the
//!   median of three.
//! - Decode time per token against batch size: `b` concurrent streams, the median gap between
//!   their tokens.
//!
//! The profile's latency model is [`LatencyModel::Measured`]: prefill time over computed tokens
//! (the misses, plus the shortest hit as the low end) and decode step time over batch size.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kvroute_emulator::profile::{LatencyModel, Profile};
use serde::Serialize;
use serde_json::json;

use crate::sse;

/// One prompt length's measurements (emulated or real seconds).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrefillPoint {
    /// Prompt tokens.
    pub tokens: usize,
    /// TTFT of a fresh prompt, s.
    pub miss_s: f64,
    /// TTFT of the same prompt again, s.
    pub hit_s: f64,
    /// Cached tokens the engine reported for the hit.
    pub hit_cached: u64,
}

/// One batch size's measurement.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecodePoint {
    /// Concurrent streams.
    pub batch: usize,
    /// Median gap between tokens, s.
    pub step_s: f64,
}

/// A calibration.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Calibration {
    /// Prefill measurements.
    pub prefill: Vec<PrefillPoint>,
    /// Decode measurements.
    pub decode: Vec<DecodePoint>,
}

/// Samples per prompt length (the median is kept).
pub const REPEATS: usize = 3;

fn ids(n: usize, salt: u64) -> Vec<u32> {
    let mut rng = kvroute_traces::rng::Rng::new(salt);
    (0..n)
        .map(|_| 1000 + (rng.next_u64() % 100_000) as u32)
        .collect()
}

/// (time to first token, gaps between later tokens, cached tokens), in seconds x `scale`.
async fn stream(
    client: &reqwest::Client,
    base: &str,
    prompt: &[u32],
    max_tokens: u32,
    scale: f64,
) -> anyhow::Result<(f64, Vec<f64>, u64)> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let t0 = Instant::now();
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let (mut first, mut last, mut gaps, mut cached) = (None, None, Vec::new(), 0u64);
    let mut events = std::pin::pin!(sse::json_events(r));
    while let Some(v) = events.next().await {
        let v = v.map_err(anyhow::Error::msg)?;
        if sse::chunk_text(&v).is_some_and(|t| !t.is_empty()) {
            let now = Instant::now();
            match last {
                None => first = Some(now.duration_since(t0).as_secs_f64() * scale),
                Some(prev) => gaps.push(now.duration_since(prev).as_secs_f64() * scale),
            }
            last = Some(now);
        }
        if let Some((_, _, Some(c))) = sse::chunk_usage(&v) {
            cached = c;
        }
    }
    Ok((first.unwrap_or(f64::NAN), gaps, cached))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Measures `base` (`http://host:port`). `scale`: emulated time per wall time of the endpoint
/// (1 for a real engine).
pub async fn calibrate(
    base: &str,
    lengths: &[usize],
    batches: &[usize],
    scale: f64,
) -> anyhow::Result<Calibration> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let nonce = u64::from(std::process::id()) << 20;
    // Warm the connection and the engine.
    stream(&client, base, &ids(32, nonce), 2, scale).await?;
    let mut prefill = Vec::new();
    for (i, n) in lengths.iter().enumerate() {
        // The median of `REPEATS` fresh prompts (misses) and their repeats (hits).
        let (mut misses, mut hits, mut cached) = (Vec::new(), Vec::new(), 0);
        for r in 0..REPEATS {
            let p = ids(*n, nonce + 1 + (i * REPEATS + r) as u64);
            misses.push(stream(&client, base, &p, 1, scale).await?.0);
            let (hit, _, c) = stream(&client, base, &p, 1, scale).await?;
            hits.push(hit);
            cached = c;
        }
        prefill.push(PrefillPoint {
            tokens: *n,
            miss_s: median(misses),
            hit_s: median(hits),
            hit_cached: cached,
        });
    }
    let mut decode = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let prompts: Vec<Vec<u32>> = (0..*b)
            .map(|k| ids(64, nonce + 1000 + (i * 1000 + k) as u64))
            .collect();
        let runs = futures_util::future::join_all(
            prompts.iter().map(|p| stream(&client, base, p, 48, scale)),
        )
        .await;
        // Per request, the mean gap after the first few (while the batch forms): the span from the
        // 5th token to the last over the tokens in it. A median of single gaps would not do: when
        // the client reads late, or the engine streams several tokens per chunk, events arrive
        // together and most single gaps are near zero, but the span stays right.
        let mut steps = Vec::new();
        for r in runs {
            let gaps: Vec<f64> = r?.1.into_iter().skip(4).collect();
            if !gaps.is_empty() {
                steps.push(gaps.iter().sum::<f64>() / gaps.len() as f64);
            }
        }
        decode.push(DecodePoint {
            batch: *b,
            step_s: median(steps),
        });
    }
    Ok(Calibration { prefill, decode })
}

/// A profile from a calibration: `name`, the served `model`, the engine's KV blocks and context.
pub fn profile(
    c: &Calibration,
    name: &str,
    model: &str,
    num_gpu_blocks: u32,
    max_model_len: u32,
    source: &str,
) -> Profile {
    let mut prefill: Vec<(f64, f64)> = c
        .prefill
        .iter()
        .map(|p| (p.tokens as f64, p.miss_s))
        .collect();
    if let Some(p) = c.prefill.iter().min_by_key(|p| p.tokens) {
        let computed = p.tokens.saturating_sub(p.hit_cached as usize).max(1) as f64;
        prefill.push((computed, p.hit_s));
    }
    prefill.sort_by(|a, b| a.0.total_cmp(&b.0));
    let decode = c
        .decode
        .iter()
        .map(|d| (d.batch as f64, d.step_s))
        .collect();
    Profile {
        name: name.into(),
        model: model.into(),
        gpu: "measured".into(),
        gpu_memory_bytes: 0.0,
        weight_bytes: 0.0,
        kv_bytes_per_token: 0.0,
        reserved_bytes: 0.0,
        default_gpu_memory_utilization: 0.9,
        num_gpu_blocks: Some(num_gpu_blocks),
        max_model_len,
        latency: LatencyModel::Measured { prefill, decode },
        sources: vec![format!("kvroute-calibrate against {source}: TTFT of fresh and repeated prompts per length, median token gap per batch size")],
    }
}
