//! Shared fixtures of the end-to-end tests: a stack of echo endpoints behind a real Envoy running
//! the real kvroute filter (`--concurrency 2`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use kvroute_core::config::PolicySettings;
use kvroute_core::FilterConfig;
use kvroute_harness::echo::EchoEngine;
use kvroute_harness::envoy_config::{Engine, EnvoySpec, NativeModule};
use kvroute_harness::stack::{filter_wasm, native_module, Envoy};

/// Engines behind one Envoy.
#[derive(Debug)]
pub struct Stack {
    /// The endpoints, in configuration order.
    pub engines: Vec<EchoEngine>,
    /// Envoy with kvroute.
    pub envoy: Envoy,
    /// One client (one connection pool) for requests through Envoy.
    pub client: reqwest::Client,
    filter: FilterConfig,
}

/// Whether the tests run the native module (`KVROUTE_FILTER=native`) instead of the `.wasm`.
pub fn native_build() -> bool {
    std::env::var("KVROUTE_FILTER").is_ok_and(|v| v == "native")
}

/// Puts the build under test in `spec`: the `.wasm` filter (the spec's default) or, with
/// `KVROUTE_FILTER=native`, the native module (`kvroute-native`) with the same configuration. The
/// suites that run under both (`just e2e-native`) reach Envoy only through this.
pub fn under_test(spec: &mut EnvoySpec) {
    if native_build() {
        spec.native_module = Some(NativeModule {
            path: native_module().unwrap().display().to_string(),
            filter_name: "kvroute".into(),
        });
    }
}

/// A response through Envoy.
#[derive(Debug)]
pub struct Routed {
    /// HTTP status.
    pub status: u16,
    /// Which echo endpoint served it (None if none did).
    pub served_by: Option<String>,
    /// The filter's `x-kvroute-endpoint` response header.
    pub kvroute_endpoint: Option<String>,
}

impl Stack {
    /// `n` echo endpoints and an Envoy whose filter config is `tweak`ed from the defaults.
    pub async fn start(n: usize, tweak: impl FnOnce(&mut FilterConfig)) -> Stack {
        Self::start_with(n, |spec| tweak(&mut spec.filter)).await
    }

    /// `n` echo endpoints behind an Envoy that runs the native module (`kvroute-native`) in `mode`
    /// (`kvroute`, or the bench's `floor`) with `policy`, instead of the Wasm filter.
    pub async fn native(n: usize, mode: &str, policy: &str) -> Stack {
        Self::start_with(n, |spec| {
            spec.filter.defaults.policy = policy.parse().unwrap();
            spec.native_module = Some(NativeModule {
                path: native_module().unwrap().display().to_string(),
                filter_name: mode.into(),
            });
        })
        .await
    }

    /// `n` echo endpoints and an Envoy whose whole spec is `tweak`ed from the defaults (the Wasm
    /// filter by default).
    pub async fn start_with(n: usize, tweak: impl FnOnce(&mut EnvoySpec)) -> Stack {
        let mut engines = Vec::new();
        for i in 0..n {
            engines.push(EchoEngine::start(&format!("engine{i}")).await.unwrap());
        }
        let spec_engines = engines
            .iter()
            .map(|e| Engine::local(&e.name, e.addr.port()))
            .collect();
        let mut spec = EnvoySpec::new(spec_engines, filter_wasm().unwrap().display().to_string());
        under_test(&mut spec);
        tweak(&mut spec);
        let filter = spec.filter.clone();
        let envoy = Envoy::start(spec).await.unwrap();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Stack {
            engines,
            envoy,
            client,
            filter,
        }
    }

    /// A stack whose default policy is `policy`.
    pub async fn with_policy(n: usize, policy: &str) -> Stack {
        let p = policy.parse().unwrap();
        Self::start(n, |c| {
            c.defaults = PolicySettings {
                policy: p,
                ..PolicySettings::default()
            }
        })
        .await
    }

    /// Posts `body` to `path` through Envoy with extra headers.
    pub async fn post(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> Routed {
        let mut rb = self.client.post(self.envoy.url(path)).body(body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        Self::routed(rb.send().await.unwrap()).await
    }

    /// Posts a chat request.
    pub async fn chat(&self, body: &serde_json::Value, headers: &[(&str, &str)]) -> Routed {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        self.post("/v1/chat/completions", body.to_string(), &h)
            .await
    }

    /// Reads a response.
    pub async fn routed(r: reqwest::Response) -> Routed {
        let status = r.status().as_u16();
        let hdr = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let served_by = hdr("x-served-by");
        let kvroute_endpoint = hdr("x-kvroute-endpoint");
        let _ = r.bytes().await;
        Routed {
            status,
            served_by,
            kvroute_endpoint,
        }
    }

    /// A stat, 0 if absent.
    pub async fn stat(&self, name: &str) -> u64 {
        self.envoy.stat(name).await.unwrap()
    }

    /// The filter configuration Envoy was started with.
    pub fn envoy_spec_filter(&self) -> &FilterConfig {
        &self.filter
    }

    /// Index of the endpoint named `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.engines.iter().position(|e| e.name == name).unwrap()
    }

    /// Waits until endpoint `i` holds `n` requests.
    pub async fn wait_active(&self, i: usize, n: u64) {
        for _ in 0..500 {
            if self.engines[i].active() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("engine{i} active = {}, want {n}", self.engines[i].active());
    }

    /// Wasm VMs Envoy replaced after a crash (the stats whose names say `vm_reload`), summed.
    pub async fn vm_reloads(&self) -> u64 {
        self.envoy
            .stats()
            .await
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains("vm_reload"))
            .map(|(_, v)| *v)
            .sum()
    }

    /// Stops Envoy (its log is kept and printed if the test panicked).
    pub async fn stop(self) {
        self.envoy.stop(false).await;
    }
}

/// P-quantiles of an Envoy histogram from `/stats` (cumulative values).
pub async fn histogram_quantiles(envoy: &Envoy, name: &str) -> Vec<(String, f64)> {
    let text = reqwest::get(format!("http://{}/stats?filter={name}", envoy.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("P50"))
        .unwrap_or_default()
        .to_string();
    line.split_whitespace()
        .filter_map(|tok| {
            let (q, rest) = tok.split_once('(')?;
            let cumulative = rest
                .trim_end_matches(')')
                .split(',')
                .nth(1)?
                .parse::<f64>()
                .ok()?;
            Some((q.to_string(), cumulative))
        })
        .collect()
}

/// A chat body.
pub fn chat(messages: &[(&str, &str)]) -> serde_json::Value {
    let msgs: Vec<serde_json::Value> = messages
        .iter()
        .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
        .collect();
    serde_json::json!({"model": "m", "messages": msgs, "max_tokens": 8})
}

/// A system prompt long enough to span many prefix blocks.
pub fn system_prompt(tag: &str) -> String {
    format!("[{tag}] You are a careful assistant. ").repeat(20)
}

/// Requests sent, failed, and served per endpoint (engine0, engine1), counted by clients under
/// load; `in_flight` is how many are out right now.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests sent (and answered, one way or another).
    pub sent: AtomicU64,
    /// Requests that did not complete: not a 200 from an engine, or a stream cut short.
    pub failed: AtomicU64,
    /// Completed per endpoint.
    pub by: [AtomicU64; 2],
    /// Requests out now.
    pub in_flight: AtomicU64,
}

impl Tally {
    /// (sent, failed, served by engine0, served by engine1).
    pub fn get(&self) -> (u64, u64, u64, u64) {
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        (
            l(&self.sent),
            l(&self.failed),
            l(&self.by[0]),
            l(&self.by[1]),
        )
    }

    fn count(&self, ok: bool, endpoint: Option<&str>) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        match (ok, endpoint) {
            (true, Some("engine0")) => self.by[0].fetch_add(1, Ordering::SeqCst),
            (true, Some("engine1")) => self.by[1].fetch_add(1, Ordering::SeqCst),
            _ => self.failed.fetch_add(1, Ordering::SeqCst),
        };
    }
}

/// Clients under load until [`Load::stop`]; [`Load::tally`] counts what they saw.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    /// What the clients counted so far.
    pub tally: Arc<Tally>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `n` [`echo_client`]s through `s`.
    pub fn echo(s: &Arc<Stack>, n: usize) -> Load {
        Self::spawn(n, |c, stop, tally| {
            tokio::spawn(echo_client(s.clone(), stop, tally, c))
        })
    }

    /// `n` [`chat_client`]s streaming their answers; client `c` sends to `urls[c % urls.len()]`.
    pub fn streaming(urls: &[String], model: &str, max_tokens: u32, n: usize) -> Load {
        Self::chats(urls, model, max_tokens, n, true)
    }

    /// `n` [`chat_client`]s asking for whole (not streamed) answers; client `c` sends to
    /// `urls[c % urls.len()]`.
    pub fn whole(urls: &[String], model: &str, max_tokens: u32, n: usize) -> Load {
        Self::chats(urls, model, max_tokens, n, false)
    }

    fn chats(urls: &[String], model: &str, max_tokens: u32, n: usize, stream: bool) -> Load {
        Self::spawn(n, |c, stop, tally| {
            let url = urls[c % urls.len()].clone();
            let chat = ChatLoad {
                url,
                model: model.to_owned(),
                max_tokens,
                stream,
            };
            tokio::spawn(chat_client(chat, stop, tally, c))
        })
    }

    fn spawn(
        n: usize,
        start: impl Fn(usize, Arc<AtomicBool>, Arc<Tally>) -> tokio::task::JoinHandle<()>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let clients = (0..n)
            .map(|c| start(c, stop.clone(), tally.clone()))
            .collect();
        Load {
            stop,
            tally,
            clients,
        }
    }

    /// Stops the clients, waits for their last requests, and returns (sent, failed, served by
    /// engine0, served by engine1).
    pub async fn stop(self) -> (u64, u64, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.clients {
            c.await.unwrap();
        }
        self.tally.get()
    }
}

/// One client sending requests to echo engines one after another (each held 20 ms by the
/// engine) until `stop`; an endpoint is the echo engine that served it.
pub async fn echo_client(s: Arc<Stack>, stop: Arc<AtomicBool>, tally: Arc<Tally>, c: usize) {
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) && i < 20_000 {
        i += 1;
        let body = chat(&[("user", &format!("client {c} request {i}: a new prompt"))]);
        tally.in_flight.fetch_add(1, Ordering::SeqCst);
        let r = s.chat(&body, &[("x-echo-delay-ms", "20")]).await;
        tally.in_flight.fetch_sub(1, Ordering::SeqCst);
        tally.count(r.status == 200, r.served_by.as_deref());
    }
}

/// What a [`chat_client`] sends: chats of `max_tokens` to `url` (Envoy), streamed or not.
#[derive(Debug, Clone)]
pub struct ChatLoad {
    /// Envoy's chat completions URL.
    pub url: String,
    /// The served model.
    pub model: String,
    /// Tokens each answer generates.
    pub max_tokens: u32,
    /// Stream the answers (SSE) or ask for them whole.
    pub stream: bool,
}

/// One client sending chats through Envoy to emulated engines one after another until `stop`. A
/// request completes when it gets a 200 and, streamed, its stream ends with `data: [DONE]`, or,
/// whole, its body is a completion with a choice; its endpoint is the filter's
/// `x-kvroute-endpoint`.
pub async fn chat_client(chat: ChatLoad, stop: Arc<AtomicBool>, tally: Arc<Tally>, c: usize) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) && i < 20_000 {
        i += 1;
        let body = serde_json::json!({
            "model": chat.model,
            "messages": [{"role": "user", "content": format!("client {c} request {i}: a new prompt")}],
            "max_tokens": chat.max_tokens,
            "stream": chat.stream,
        });
        tally.in_flight.fetch_add(1, Ordering::SeqCst);
        let (ok, endpoint) = match http.post(&chat.url).json(&body).send().await {
            Ok(r) => {
                let endpoint = r
                    .headers()
                    .get("x-kvroute-endpoint")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let status = r.status().as_u16();
                let complete = if chat.stream {
                    stream_ends_done(r).await
                } else {
                    r.json::<serde_json::Value>()
                        .await
                        .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string())
                };
                (status == 200 && complete, endpoint)
            }
            Err(_) => (false, None),
        };
        tally.in_flight.fetch_sub(1, Ordering::SeqCst);
        tally.count(ok, endpoint.as_deref());
    }
}

/// Reads an SSE response to its end: true when it was not cut and ends with `data: [DONE]`.
async fn stream_ends_done(r: reqwest::Response) -> bool {
    let mut stream = r.bytes_stream();
    let mut tail = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => {
                tail.extend_from_slice(&b);
                let keep = tail.len().saturating_sub(64);
                tail.drain(..keep);
            }
            Err(_) => return false,
        }
    }
    String::from_utf8_lossy(&tail).contains("data: [DONE]")
}

/// The model an engine serves, as a client reads it from `/v1/models`.
pub async fn served_model(base_url: &str) -> String {
    kvroute_loadgen::engine_api::served_model(&reqwest::Client::new(), base_url)
        .await
        .unwrap()
}
