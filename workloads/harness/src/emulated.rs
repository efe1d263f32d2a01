//! Emulated vLLM engines (kvroute-emulator) and the sidecar, run in-process.

use std::net::SocketAddr;
use std::time::Duration;

use kvroute_emulator::engine::EngineConfig;
use kvroute_emulator::kv_events::KvEventsConfig;
use kvroute_emulator::profile::Profile;
use kvroute_emulator::server::{start, ServerConfig};
use kvroute_sidecar::{EngineTarget, Sidecar, SidecarConfig};
use tokio::sync::oneshot;

/// The share of KV block allocations whose residency the emulated engines report (vLLM's
/// `--kv-cache-metrics --kv-cache-metrics-sample 0.05`): enough sampled evictions in a study run
/// for a median of their idle time.
pub const KV_CACHE_METRICS_SAMPLE: f64 = 0.05;

/// One emulated engine; stops when dropped.
#[derive(Debug)]
pub struct EmulatedEngine {
    /// Endpoint name.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it publishes its KV cache events (vLLM's ZMQ feed, integer block hashes), for peer
    /// routers that follow the engines' caches from the engines (Dynamo's KV router).
    pub kv_events: String,
    stop: Option<oneshot::Sender<()>>,
}

impl EmulatedEngine {
    /// Starts an engine with a built-in profile (or profile file), `time_scale` times real time.
    pub async fn start(name: &str, profile: &str, time_scale: f64) -> anyhow::Result<Self> {
        Self::start_at(name, profile, time_scale, "127.0.0.1:0".parse()?).await
    }

    /// Starts `n` engines named `engine0`, `engine1`, ... with the same profile and time scale.
    pub async fn start_fleet(
        n: usize,
        profile: &str,
        time_scale: f64,
    ) -> anyhow::Result<Vec<Self>> {
        let mut engines = Vec::with_capacity(n);
        for i in 0..n {
            engines.push(Self::start(&format!("engine{i}"), profile, time_scale).await?);
        }
        Ok(engines)
    }

    /// Starts an engine on a given address (to bring a stopped engine back on the same port).
    pub async fn start_at(
        name: &str,
        profile: &str,
        time_scale: f64,
        at: SocketAddr,
    ) -> anyhow::Result<Self> {
        let p = Profile::load(profile).map_err(anyhow::Error::msg)?;
        let util = p.default_gpu_memory_utilization;
        // Integer block hashes: the form llm-d's guides set and the one Dynamo 1.6 decodes.
        let (sink, kv_events) = kvroute_emulator::kv_events::start(&KvEventsConfig {
            enable_kv_cache_events: true,
            publisher: "zmq".into(),
            endpoint: "tcp://127.0.0.1:0".into(),
            int_block_hashes: true,
            ..KvEventsConfig::default()
        })
        .await?;
        let cfg = ServerConfig {
            served_model_name: p.model.clone(),
            engine: EngineConfig::vllm_defaults(&p),
            time_scale,
            gpu_memory_utilization: util,
            kv_events: Some(sink),
            kv_cache_metrics_sample: Some(KV_CACHE_METRICS_SAMPLE),
        };
        let (app, _) = start(cfg)?;
        let listener = tokio::net::TcpListener::bind(at).await?;
        let addr = listener.local_addr()?;
        let tx = crate::stack::serve_in_background(listener, app);
        Ok(Self {
            name: name.to_string(),
            addr,
            kv_events,
            stop: Some(tx),
        })
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for EmulatedEngine {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A sidecar polling engines; stops serving and polling when dropped.
#[derive(Debug)]
pub struct RunningSidecar {
    /// Where it serves.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    sidecar: Sidecar,
}

impl RunningSidecar {
    /// Starts a sidecar at `at` (port 0: any) polling `engines` every `interval`.
    pub async fn start_at(
        engines: &[&EmulatedEngine],
        interval: Duration,
        at: SocketAddr,
    ) -> anyhow::Result<Self> {
        let named: Vec<(String, String)> =
            engines.iter().map(|e| (e.name.clone(), e.url())).collect();
        Self::start_for(&named, interval, at).await
    }

    /// Starts a sidecar at `at` polling engines given as (name, base URL), every `interval`.
    pub async fn start_for(
        engines: &[(String, String)],
        interval: Duration,
        at: SocketAddr,
    ) -> anyhow::Result<Self> {
        let cfg = SidecarConfig {
            engines: engines
                .iter()
                .map(|(name, url)| EngineTarget {
                    name: name.clone(),
                    metrics_url: format!("{}/metrics", url.trim_end_matches('/')),
                })
                .collect(),
            poll_interval: interval,
            timeout: Duration::from_millis(500),
            unhealthy_after: 3,
            window: Duration::from_secs(10),
            fleet: None,
        };
        let listener = tokio::net::TcpListener::bind(at).await?;
        let addr = listener.local_addr()?;
        let (app, sidecar) = Sidecar::start(cfg)?;
        let tx = crate::stack::serve_in_background(listener, app);
        Ok(Self {
            addr,
            stop: Some(tx),
            sidecar,
        })
    }
}

impl Drop for RunningSidecar {
    fn drop(&mut self) {
        self.sidecar.stop();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
