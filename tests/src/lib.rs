//! Shared fixtures of the end-to-end tests: a stack of echo endpoints behind a real Envoy running
//! the real kvroute filter (`--concurrency 2`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use kvroute_core::config::PolicySettings;
use kvroute_core::FilterConfig;
use kvroute_workloads::echo::EchoEngine;
use kvroute_workloads::envoy_config::{Engine, EnvoySpec, NativeModule};
use kvroute_workloads::stack::{filter_wasm, native_module, Envoy};

/// Engines behind one Envoy.
#[derive(Debug)]
pub struct Stack {
    /// The endpoints, in configuration order.
    pub engines: Vec<EchoEngine>,
    /// Envoy with kvroute.
    pub envoy: Envoy,
    /// One client (one connection pool) for requests through Envoy.
    pub client: reqwest::Client,
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

    /// `n` echo endpoints behind an Envoy that runs the native bench probe (`kvroute-bench-native`)
    /// in `mode` (`floor` or `kvroute`) with `policy`, instead of the Wasm filter.
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

    /// `n` echo endpoints and an Envoy whose whole spec is `tweak`ed from the defaults.
    async fn start_with(n: usize, tweak: impl FnOnce(&mut EnvoySpec)) -> Stack {
        let mut engines = Vec::new();
        for i in 0..n {
            engines.push(EchoEngine::start(&format!("engine{i}")).await.unwrap());
        }
        let spec_engines = engines
            .iter()
            .map(|e| Engine::local(&e.name, e.addr.port()))
            .collect();
        let mut spec = EnvoySpec::new(spec_engines, filter_wasm().unwrap().display().to_string());
        tweak(&mut spec);
        let envoy = Envoy::start(spec).await.unwrap();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Stack {
            engines,
            envoy,
            client,
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
        self.envoy
            .stats()
            .await
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
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
