//! The replayer through Envoy with kvroute to emulated engines: every request is recorded, the
//! counts add up across client, Envoy and engines, and the engines' cache hits are what the client
//! records.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvroute_harness::emulated::EmulatedEngine;
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::stack::{filter_wasm, Envoy};
use kvroute_loadgen::replay::{replay, MemorySink, ReplayOptions, RequestRecord};
use kvroute_traces::{arrivals, rag, with_arrivals};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_counts_add_up_and_hits_are_recorded() {
    let engines = EmulatedEngine::start_fleet(2, "rtx5080-llama3.2-3b", 20.0)
        .await
        .unwrap();
    let spec_engines = engines
        .iter()
        .map(|e| Engine::local(&e.name, e.addr.port()))
        .collect();
    let envoy = Envoy::start(EnvoySpec::new(
        spec_engines,
        filter_wasm().unwrap().display().to_string(),
    ))
    .await
    .unwrap();
    let sessions = rag::generate(&rag::RagOptions {
        users: 30,
        questions_per_user: 2,
        max_tokens: 8,
        think_ms: 10.0,
        ..Default::default()
    });
    let starts = arrivals::poisson(sessions.len(), 40.0, 3);
    let sessions = with_arrivals(sessions, &starts);
    let sink = MemorySink::default();
    let opts = ReplayOptions {
        urls: vec![envoy.url("/v1/chat/completions")],
        model: None,
        max_in_flight: 8,
        timeout: Duration::from_secs(60),
        session_header: "x-session-id".into(),
        fresh_connections: false,
    };
    let summary = replay(
        sessions,
        opts,
        Arc::new(Mutex::new(sink.clone())),
        Arc::new(AtomicBool::new(false)),
        Arc::new(|_, _| {}),
    )
    .await
    .unwrap();
    let text = sink.text();
    let records: Vec<RequestRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!((summary.finished, summary.failed), (60, 0));
    assert_eq!(records.len(), 60);
    assert!(records
        .iter()
        .all(|r| r.status == 200 && r.ttft_ms.is_some() && r.completion_tokens == Some(8)));
    assert!(records
        .iter()
        .all(|r| r.itl_ms.len() == 7 && r.endpoint.is_some()));
    // Each record says when it was meant to go: the session's start, then the previous response's
    // end plus the think time; it went at that time or a little after.
    let by: std::collections::BTreeMap<(&str, usize), &RequestRecord> = records
        .iter()
        .map(|r| ((r.session.as_str(), r.turn), r))
        .collect();
    for r in &records {
        let meant = r.scheduled_ms.unwrap();
        if r.turn > 0 {
            let prev = by[&(r.session.as_str(), r.turn - 1)];
            assert!((meant - (prev.sent_ms + prev.e2e_ms + 10.0)).abs() < 1e-6);
        }
        assert!(r.sent_ms >= meant - 0.5, "{r:?}");
    }
    let first_delays: Vec<f64> = records
        .iter()
        .filter(|r| r.turn == 0)
        .map(|r| r.sent_ms - r.scheduled_ms.unwrap())
        .collect();
    assert!(
        first_delays.iter().all(|d| *d < 1_000.0),
        "{first_delays:?}"
    );
    // Client, Envoy and the engines count the same requests.
    let routed = envoy
        .stats()
        .await
        .unwrap()
        .get("kvroute_requests_total")
        .copied()
        .unwrap_or(0);
    let mut engine_done = 0.0;
    let mut hits = 0.0;
    for e in &engines {
        let page = reqwest::get(format!("{}/metrics", e.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for l in page.lines().filter(|l| !l.starts_with('#')) {
            let v: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
            if l.starts_with("vllm:request_success_total{") {
                engine_done += v;
            }
            if l.starts_with("vllm:prefix_cache_hits_total{") {
                hits += v;
            }
        }
    }
    assert_eq!(routed, 60);
    assert_eq!(engine_done, 60.0);
    // The hits the engines count are the cached tokens the client recorded.
    let recorded: u64 = records.iter().map(|r| r.cached_tokens.unwrap()).sum();
    assert_eq!(recorded as f64, hits);
    assert!(recorded > 0, "users of the same document share its prefix");
    envoy.stop(false).await;
}

/// The analysis reproduces what an engine sees: conversations replayed one after another through
/// one engine that never evicts get exactly the oracle's hits (with an infinite cache), and the
/// same prompt token counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_matches_an_engine_that_never_evicts() {
    use kvroute_traces::sharegpt;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/sharegpt_dev_3000.json"
    ))
    .unwrap();
    let sessions = sharegpt::parse(
        &text,
        &sharegpt::ShareGptOptions {
            limit: 8,
            max_turns: 4,
            max_tokens: 8,
            think_ms: 1.0,
            ..Default::default()
        },
    )
    .unwrap();
    let engine = EmulatedEngine::start("engine0", "h100-llama3.1-8b", 50.0)
        .await
        .unwrap();
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let analysis = kvroute_loadgen::analyze::analyze(&sessions, model, 1, 1_000_000);
    let (mut cached, mut prompt) = (0u64, 0u64);
    for s in sessions {
        let sink = MemorySink::default();
        let opts = ReplayOptions {
            urls: vec![format!("{}/v1/chat/completions", engine.url())],
            model: Some(model.into()),
            max_in_flight: 1,
            timeout: Duration::from_secs(60),
            session_header: "x-session-id".into(),
            fresh_connections: false,
        };
        replay(
            vec![s],
            opts,
            Arc::new(Mutex::new(sink.clone())),
            Arc::new(AtomicBool::new(false)),
            Arc::new(|_, _| {}),
        )
        .await
        .unwrap();
        for line in sink.text().lines() {
            let r: RequestRecord = serde_json::from_str(line).unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            cached += r.cached_tokens.unwrap();
            prompt += r.prompt_tokens.unwrap();
        }
    }
    println!(
        "prompt tokens {prompt}, engine cached {cached}, oracle {:.4} of {}",
        analysis.oracle_infinite, analysis.prompt_tokens
    );
    assert_eq!(prompt, analysis.prompt_tokens);
    assert_eq!(
        cached,
        (analysis.oracle_infinite * analysis.prompt_tokens as f64).round() as u64
    );
    // The reuse splits exactly into within and across sessions; conversations reuse their own.
    assert!(
        (analysis.within_session + analysis.across_sessions - analysis.oracle_infinite).abs()
            < 1e-9
    );
    assert!(
        analysis.within_session > 5.0 * analysis.across_sessions,
        "{analysis:?}"
    );
}
