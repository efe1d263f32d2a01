//! Calibration closes the loop: an emulator calibrated into a profile file, loaded by another
//! emulator, reproduces the first one's prefill and decode times.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Instant;

use futures_util::StreamExt;
use kvroute_harness::emulated::EmulatedEngine;
use kvroute_loadgen::calibrate::{calibrate, profile};
use serde_json::json;

/// (TTFT, median token gap) of one streamed completion, s.
async fn timing(base: &str, prompt: Vec<u32>, batch: usize) -> (f64, f64) {
    let client = reqwest::Client::new();
    let one = |p: Vec<u32>| {
        let client = client.clone();
        async move {
            let t0 = Instant::now();
            let r = client
                .post(format!("{base}/v1/completions"))
                .json(&json!({"prompt": p, "max_tokens": 40, "ignore_eos": true, "stream": true}))
                .send()
                .await
                .unwrap();
            let mut s = r.bytes_stream();
            let mut times = Vec::new();
            while let Some(c) = s.next().await {
                // One time per event: several events may come in one read.
                let n = String::from_utf8_lossy(&c.unwrap())
                    .matches("\"text\"")
                    .count();
                let now = t0.elapsed().as_secs_f64();
                times.extend(std::iter::repeat_n(now, n));
            }
            times
        }
    };
    let runs = futures_util::future::join_all((0..batch).map(|k| {
        let mut p = prompt.clone();
        p.push(90_000 + k as u32);
        one(p)
    }))
    .await;
    let ttft = runs[0][0];
    // Per request the mean gap from the 5th token on (the span over its tokens: immune to events
    // the client reads together), then the median over requests.
    let mut steps: Vec<f64> = runs
        .iter()
        .filter(|t| t.len() > 6)
        .map(|t| (t[t.len() - 1] - t[5]) / (t.len() - 6) as f64)
        .collect();
    steps.sort_by(f64::total_cmp);
    (ttft, steps[steps.len() / 2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calibrated_profile_reproduces_the_engine() {
    let a = EmulatedEngine::start("a", "rtx5080-llama3.2-3b", 1.0)
        .await
        .unwrap();
    let c = calibrate(&a.url(), &[128, 512, 2048], &[1, 4, 16], 1.0)
        .await
        .unwrap();
    for p in &c.prefill {
        assert_eq!(p.hit_cached as usize, (p.tokens - 1) / 16 * 16);
        // Where the model's miss and hit differ by far more than host noise, a hit is faster.
        if p.tokens >= 512 {
            assert!(p.hit_s < p.miss_s, "a repeated prompt is faster: {p:?}");
        }
    }
    let file = std::env::temp_dir().join(format!("kvroute-calibrated-{}.json", std::process::id()));
    std::fs::write(
        &file,
        serde_json::to_string(&profile(&c, "calibrated", "m", 711, 32_768, "test")).unwrap(),
    )
    .unwrap();
    let b = EmulatedEngine::start("b", file.to_str().unwrap(), 1.0)
        .await
        .unwrap();
    let prompt: Vec<u32> = (0..1024).map(|i| 2000 + i * 7).collect();
    // Medians of three fresh prompts on each engine.
    let (mut ta, mut tb, mut sa, mut sb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..3u32 {
        let fresh: Vec<u32> = prompt.iter().map(|t| t + 20_000 * (r + 1)).collect();
        ta.push(timing(&a.url(), fresh.clone(), 1).await.0);
        tb.push(timing(&b.url(), fresh, 1).await.0);
        let other: Vec<u32> = (0..64).map(|i| 50_000 + i + 1000 * r).collect();
        sa.push(timing(&a.url(), other.clone(), 4).await.1);
        sb.push(timing(&b.url(), other, 4).await.1);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let (ttft_a, ttft_b, step_a, step_b) = (med(ta), med(tb), med(sa), med(sb));
    println!("1,024-token TTFT: engine {:.1} ms, calibrated {:.1} ms; decode at batch 4: {:.2} vs {:.2} ms", ttft_a * 1e3, ttft_b * 1e3, step_a * 1e3, step_b * 1e3);
    assert!(
        (ttft_b - ttft_a).abs() <= 0.1 * ttft_a,
        "TTFT {ttft_b} vs {ttft_a}"
    );
    assert!(
        (step_b - step_a).abs() <= 0.1 * step_a,
        "decode {step_b} vs {step_a}"
    );
    let _ = std::fs::remove_file(file);
}
