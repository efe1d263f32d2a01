//! Emulated vLLM engines (kvroute-emulator) run in-process on free ports.

use std::net::SocketAddr;

use kvroute_emulator::engine::EngineConfig;
use kvroute_emulator::profile::Profile;
use kvroute_emulator::server::{start, ServerConfig};
use tokio::sync::oneshot;

/// One emulated engine; stops when dropped.
#[derive(Debug)]
pub struct EmulatedEngine {
    /// Endpoint name.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl EmulatedEngine {
    /// Starts an engine with a built-in profile (or profile file), `time_scale` times real time.
    pub async fn start(name: &str, profile: &str, time_scale: f64) -> anyhow::Result<Self> {
        let p = Profile::load(profile).map_err(anyhow::Error::msg)?;
        let util = p.default_gpu_memory_utilization;
        let cfg = ServerConfig {
            served_model_name: p.model.clone(),
            engine: EngineConfig {
                model: p.model.clone(),
                block_size: 16,
                num_gpu_blocks: p.num_gpu_blocks(util, 16),
                max_num_seqs: 256,
                max_num_batched_tokens: 2048,
                max_model_len: p.max_model_len,
                enable_prefix_caching: true,
                latency: p.latency.clone(),
                gpu_share: 1.0,
            },
            time_scale,
            gpu_memory_utilization: util,
        };
        let (app, _) = start(cfg)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            name: name.to_string(),
            addr,
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
