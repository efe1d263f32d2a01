//! Bad input never gets a 5xx caused by the filter, loses nothing, and is counted by reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kvroute_e2e::*;

/// Sends `body` as a chat request, checks it was served by an engine (not failed by Envoy or the
/// filter) with every byte, and returns the stack for the reason checks.
async fn served_anyway(body: Vec<u8>) -> Stack {
    let s = Stack::with_policy(2, "load_cache_aware").await;
    let len = body.len() as u64;
    let r = s
        .post(
            "/v1/chat/completions",
            body,
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.served_by.is_some(), "an engine served it");
    assert_eq!(
        r.served_by, r.kvroute_endpoint,
        "routed by the filter's fallback"
    );
    let received: u64 = s
        .engines
        .iter()
        .map(|e| e.stats.body_bytes.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(received, len, "the engine got the whole body");
    s
}

async fn assert_counted(s: &Stack, parse_reason: Option<&str>, fallback: &str) {
    if let Some(p) = parse_reason {
        assert_eq!(
            s.stat(&format!("kvroute_parse_errors_total.reason.{p}"))
                .await,
            1,
            "parse reason {p}"
        );
    }
    assert_eq!(
        s.stat(&format!("kvroute_fallbacks_total.reason.{fallback}"))
            .await,
        1,
        "fallback {fallback}"
    );
    assert_eq!(s.stat("kvroute_requests_total").await, 1);
    assert_eq!(s.vm_reloads().await, 0, "no VM crashed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_body() {
    let s = served_anyway(b"this is not json".to_vec()).await;
    assert_counted(&s, Some("not_json"), "parse_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_json_body() {
    let s = served_anyway(br#"{"messages":[{"role":"user","content":"cut"#.to_vec()).await;
    assert_counted(&s, Some("not_json"), "parse_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body() {
    let s = served_anyway(Vec::new()).await;
    assert_counted(&s, Some("empty_body"), "parse_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_without_messages_or_prompt() {
    let s = served_anyway(br#"{"model":"m","max_tokens":4}"#.to_vec()).await;
    assert_counted(&s, Some("no_prompt"), "parse_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_field_types() {
    let s =
        served_anyway(br#"{"model":"m","messages":[{"role":"user","content":42}]}"#.to_vec()).await;
    assert_counted(&s, Some("wrong_type"), "parse_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8() {
    let s = served_anyway(b"{\"messages\":[{\"role\":\"user\",\"content\":\"caf\xe9\"}]}".to_vec())
        .await;
    assert_counted(&s, Some("invalid_utf8"), "parse_error").await;
}

/// A 2 MB prompt is under the 4 MiB default limit: parsed and routed normally, hashing capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_megabyte_prompt() {
    let prompt = "All work and no play makes Jack a dull boy. ".repeat(2_000_000 / 44);
    let body = serde_json::to_vec(&chat(&[("user", &prompt)])).unwrap();
    assert!(body.len() >= 2_000_000);
    let s = served_anyway(body).await;
    assert_eq!(s.stat("kvroute_requests_total").await, 1);
    assert_eq!(
        s.stat("kvroute_fallbacks_total.reason.parse_error").await,
        0
    );
    assert_eq!(
        s.stat("kvroute_fallbacks_total.reason.body_too_large")
            .await,
        0
    );
    // Hashing stops at max_blocks (2,048 by default: 1,024 of 64 characters, then 1,024 of
    // 1,024, which a 2M-character prompt fills).
    assert_eq!(s.stat("kvroute_request_blocks_total").await, 2048);
}

/// Over the limit (declared by content-length): routed by load, never buffered, never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit() {
    let s = Stack::start(2, |c| c.max_body_bytes = 256 * 1024).await;
    let body = serde_json::to_vec(&chat(&[("user", &"x".repeat(600_000))])).unwrap();
    let len = body.len() as u64;
    let r = s.post("/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.served_by, r.kvroute_endpoint);
    let received: u64 = s
        .engines
        .iter()
        .map(|e| e.stats.body_bytes.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(received, len);
    assert_counted(&s, None, "body_too_large").await;
}

fn chunked(body: Vec<u8>, chunk: usize) -> reqwest::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(chunk).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

/// Chunked upload without content-length: buffered to the end, parsed and routed normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_without_content_length() {
    let s = Stack::with_policy(2, "load_cache_aware").await;
    let body = serde_json::to_vec(&chat(&[
        ("system", &system_prompt("chunked")),
        ("user", "hi"),
    ]))
    .unwrap();
    let len = body.len() as u64;
    let r = s.post("/v1/chat/completions", chunked(body, 97), &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.served_by, r.kvroute_endpoint);
    let received: u64 = s
        .engines
        .iter()
        .map(|e| e.stats.body_bytes.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(received, len);
    assert_eq!(s.stat("kvroute_requests_total").await, 1);
    assert_eq!(
        s.stat("kvroute_fallbacks_total.reason.parse_error").await,
        0
    );
    assert!(s.stat("kvroute_request_blocks_total").await > 5);
}

/// Chunked and over the limit: the filter stops buffering at the limit and lets the rest stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_over_the_limit() {
    let s = Stack::start(2, |c| c.max_body_bytes = 64 * 1024).await;
    let body = serde_json::to_vec(&chat(&[("user", &"y".repeat(300_000))])).unwrap();
    let len = body.len() as u64;
    let r = s
        .post("/v1/chat/completions", chunked(body, 16 * 1024), &[])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let received: u64 = s
        .engines
        .iter()
        .map(|e| e.stats.body_bytes.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(received, len);
    assert_counted(&s, None, "body_too_large").await;
}

/// GET requests and unknown paths pass through untouched (to all engines, least request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_unknown_paths_pass_through() {
    let s = Stack::with_policy(2, "round_robin").await;
    let models = Stack::routed(
        s.client
            .get(s.envoy.url("/v1/models"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(models.status, 200);
    assert_eq!(models.kvroute_endpoint, None);
    let get_chat = Stack::routed(
        s.client
            .get(s.envoy.url("/v1/chat/completions"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(get_chat.status < 500, "{get_chat:?}");
    assert_eq!(get_chat.kvroute_endpoint, None);
    let unknown = s.post("/v1/embeddings", "{}", &[]).await;
    assert_eq!(unknown.status, 404, "the engine's own answer");
    assert_eq!(unknown.kvroute_endpoint, None);
    assert_eq!(s.stat("kvroute_passthrough_total").await, 3);
    assert_eq!(s.stat("kvroute_requests_total").await, 0);
    s.stop().await;
}

/// A client cannot pick a cluster with the routing header, on any path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_routing_header_is_ignored() {
    let s = Stack::with_policy(2, "round_robin").await;
    let h = [("x-kvroute-endpoint", "kvroute_admin")];
    let r = s.chat(&chat(&[("user", "x")]), &h).await;
    assert_eq!(r.status, 200);
    assert!(
        r.served_by.is_some(),
        "an engine, not the admin interface, served it"
    );
    let r = s
        .client
        .get(s.envoy.url("/stats"))
        .header(h[0].0, h[0].1)
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(
        !body.contains("kvroute_requests_total"),
        "admin stats leaked through the listener"
    );
    s.stop().await;
}

/// The request shapes people send (OpenAI's and vLLM's): every one reaches an engine, and every
/// one is routed by the policy (its prompt parsed and hashed), never by a fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_shapes_people_send_are_routed() {
    let s = Stack::with_policy(2, "predicted_ttft").await;
    let image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
    let chat_cases = [
        // Content as parts: text and an image.
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": image, "detail": "low"}}]}]}),
        // Only an image; then audio.
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}]}]}),
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]}),
        // Tools, an assistant tool call with null content, the tool's answer.
        serde_json::json!({"model": "m",
            "tools": [{"type": "function", "function": {"name": "weather", "description": "d",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "auto",
            "messages": [
                {"role": "system", "content": "You are a tool user."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                    "type": "function", "function": {"name": "weather",
                    "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]}),
        // The developer role, a name, streaming with usage, and fields the filter does not read.
        serde_json::json!({"model": "m", "stream": true,
            "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object", "properties": {"a": {"type": "array",
                "items": {"type": "number"}}}}}},
            "messages": [{"role": "developer", "content": "Be brief."},
                {"role": "user", "name": "alice", "content": "héllo ✓ 🙂"}]}),
        // Empty text content.
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": ""}]}),
    ];
    let completion_cases = [
        serde_json::json!({"model": "m", "prompt": "Once upon a time"}),
        serde_json::json!({"model": "m", "prompt": [128000, 9906, 1917, 0]}),
        serde_json::json!({"model": "m", "prompt": ["first prompt", "second prompt"]}),
        serde_json::json!({"model": "m", "prompt": [[1, 2, 3], [4, 5]]}),
        serde_json::json!({"model": "m", "prompt": "echo me", "echo": true, "logprobs": 1,
            "suffix": null, "stream": false}),
    ];
    let mut sent = 0u64;
    for (path, cases) in [
        ("/v1/chat/completions", &chat_cases[..]),
        ("/v1/completions", &completion_cases[..]),
    ] {
        for body in cases {
            let r = s
                .post(
                    path,
                    serde_json::to_vec(body).unwrap(),
                    &[("content-type", "application/json")],
                )
                .await;
            sent += 1;
            assert_eq!(r.status, 200, "{body}: {r:?}");
            assert!(r.served_by.is_some(), "{body}");
            assert_eq!(r.served_by, r.kvroute_endpoint, "{body}");
            let parse_errors: u64 = s
                .envoy
                .stats()
                .await
                .unwrap()
                .iter()
                .filter(|(k, _)| k.contains("kvroute_parse_errors_total"))
                .map(|(_, v)| *v)
                .sum();
            assert_eq!(parse_errors, 0, "{body} was not parsed");
        }
    }
    assert_eq!(s.stat("kvroute_requests_total").await, sent);
    let decided: u64 = s
        .envoy
        .stats()
        .await
        .unwrap()
        .iter()
        .filter(|(k, _)| k.contains("kvroute_decisions_total.policy.predicted_ttft"))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(decided, sent, "every one routed by the policy");
}
