//! The real filter in front of emulated vLLM engines: cache affinity shows up as prefix-cache hits
//! the engines themselves report (`usage.prompt_tokens_details.cached_tokens`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use kvroute_core::config::PolicySettings;
use kvroute_harness::emulated::EmulatedEngine;
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::stack::{filter_wasm, Envoy};
use serde_json::{json, Value};

/// One turn's token accounting from the engine.
#[derive(Debug, Clone, Copy)]
struct Turn {
    prompt: u64,
    cached: u64,
}

/// Sends 6 conversations of 4 turns, turn by turn; returns each conversation's turns and the
/// filter's predicted cached blocks.
async fn converse(policy: &str) -> (Vec<Vec<Turn>>, u64) {
    let engines = EmulatedEngine::start_fleet(2, "rtx5080-llama3.2-3b", 50.0)
        .await
        .unwrap();
    let spec_engines = engines
        .iter()
        .map(|e| Engine::local(&e.name, e.addr.port()))
        .collect();
    let mut spec = EnvoySpec::new(spec_engines, filter_wasm().unwrap().display().to_string());
    spec.filter.defaults = PolicySettings {
        policy: policy.parse().unwrap(),
        ..PolicySettings::default()
    };
    let envoy = Envoy::start(spec).await.unwrap();
    let client = reqwest::Client::new();
    let mut sent = 0u64;
    let mut all = Vec::new();
    for c in 0..6 {
        let mut turns = Vec::new();
        let mut messages = vec![
            json!({"role": "system", "content": format!("[conversation {c}] You are a careful analyst. ").repeat(15)}),
        ];
        for t in 0..4 {
            messages.push(json!({"role": "user", "content": format!("Turn {t}: continue the analysis of case {c}.")}));
            let r: Value = client
                .post(envoy.url("/v1/chat/completions"))
                .json(&json!({"messages": messages, "max_tokens": 8, "ignore_eos": true}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let answer = r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string();
            turns.push(Turn {
                prompt: r["usage"]["prompt_tokens"].as_u64().unwrap(),
                cached: r["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap(),
            });
            sent += 1;
            envoy
                .wait_stat(
                    "kvroute_decisions_recorded_total",
                    Duration::from_secs(2),
                    |v| v >= sent,
                )
                .await
                .unwrap();
            messages.push(json!({"role": "assistant", "content": answer}));
        }
        all.push(turns);
    }
    let stats = envoy.stats().await.unwrap();
    let get = |k: &str| stats.get(k).copied().unwrap_or(0);
    let predicted = get("kvroute_predicted_cached_blocks_total");
    // The filter read the engine's cached_tokens from every response, exactly as the client did.
    let reported: u64 = all.iter().flatten().map(|t| t.cached).sum();
    assert_eq!(get("kvroute_prediction_reports_total"), sent, "{policy}");
    assert_eq!(
        get("kvroute_prediction_reported_tokens_total"),
        reported,
        "{policy}"
    );
    println!(
        "{policy}: directory predicted {} cached tokens, engines reported {reported}",
        get("kvroute_prediction_predicted_tokens_total")
    );
    envoy.stop(false).await;
    (all, predicted)
}

fn hit_rate(convs: &[Vec<Turn>]) -> f64 {
    let (c, p) = convs
        .iter()
        .flatten()
        .fold((0, 0), |(c, p), t| (c + t.cached, p + t.prompt));
    c as f64 / p as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_routing_produces_engine_reported_hits() {
    let (aware, predicted) = converse("load_cache_aware").await;
    let (timed, timed_predicted) = converse("predicted_ttft").await;
    let (rr, _) = converse("round_robin").await;
    println!(
        "engine-reported prefix hit rate: load_cache_aware {:.3}, round_robin {:.3}",
        hit_rate(&aware),
        hit_rate(&rr)
    );
    // load_cache_aware and predicted_ttft: every follow-up turn goes where its history is cached
    // (nothing else is queued anywhere), and the engine finds at least every full block of the
    // previous turn's prompt.
    for turns in aware.iter().chain(&timed) {
        for w in turns.windows(2) {
            assert!(w[1].cached >= (w[0].prompt - 1) / 16 * 16, "{turns:?}");
        }
    }
    assert!(predicted > 0 && timed_predicted > 0);
    assert!(hit_rate(&timed) > hit_rate(&rr));
    // round_robin: a conversation's second turn lands on the other engine, which holds none of
    // that conversation (only the chat template's first block, shared by every request).
    for turns in &rr {
        assert!(turns[1].cached <= 16, "{turns:?}");
    }
    assert!(hit_rate(&aware) > hit_rate(&rr));
}

/// Streams: the filter compares its prediction with the `cached_tokens` of the final usage event
/// when the client asked for usage (`stream_options.include_usage`), and reads no chunk of a
/// stream that carries none; either way every event reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_responses_report_cached_tokens_only_with_usage() {
    let engine = EmulatedEngine::start("engine0", "rtx5080-llama3.2-3b", 50.0)
        .await
        .unwrap();
    let spec = EnvoySpec::new(
        vec![Engine::local(&engine.name, engine.addr.port())],
        filter_wasm().unwrap().display().to_string(),
    );
    let envoy = Envoy::start(spec).await.unwrap();
    let client = reqwest::Client::new();
    let system = "You are a careful analyst who explains each step. ".repeat(12);
    let reports = || async {
        let stats = envoy.stats().await.unwrap();
        let get = |k: &str| stats.get(k).copied().unwrap_or(0);
        (
            get("kvroute_prediction_reports_total"),
            get("kvroute_prediction_reported_tokens_total"),
        )
    };
    // Returns the SSE data payloads of one streamed request.
    let stream = |usage: bool, turn: usize| {
        let mut body = json!({
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": format!("Question {turn}.")}],
            "max_tokens": 12, "ignore_eos": true, "stream": true,
        });
        if usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let req = client.post(envoy.url("/v1/chat/completions")).json(&body);
        async move {
            let text = req.send().await.unwrap().text().await.unwrap();
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        }
    };
    let mut cached_total = 0;
    for turn in 0..3 {
        let events = stream(true, turn).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        cached_total += usage["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        let (reports, reported) = reports().await;
        assert_eq!(reports, turn as u64 + 1, "one report per stream with usage");
        assert_eq!(reported, cached_total, "what the client saw");
    }
    assert!(cached_total > 0, "the shared system prompt was cached");
    for turn in 3..6 {
        let events = stream(false, turn).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        // Whole (the last token's event, then [DONE]), with no usage event.
        let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length", "{events:?}");
        assert!(events.iter().all(|e| !e.contains("\"usage\":{")));
    }
    assert_eq!(
        reports().await,
        (3, cached_total),
        "no report without usage"
    );
    envoy.stop(false).await;
}
