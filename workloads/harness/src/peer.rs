//! Peer routers run beside kvroute on the same engines: SGLang's model gateway (PyPI `smg`,
//! installed by the bootstrap into `.tools/venv`), launched per run against the engines' URLs with
//! one of its policies at its defaults, so each run starts from the router's cold state as kvroute
//! does from a new directory epoch.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::stack::{free_port, installed};

/// SMG's policies the study runs, each at its defaults.
pub const SMG_POLICIES: [&str; 4] = ["cache_aware", "round_robin", "power_of_two", "prefix_hash"];

/// A peer router that routed a run: its rows stand beside kvroute's policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The router: `smg` (SGLang's model gateway).
    pub router: String,
    /// Its version, as installed.
    pub version: String,
    /// Its policy, at its defaults.
    pub policy: String,
}

impl Peer {
    /// The row name: router, version and policy (`smg-1.13.0/cache_aware`).
    pub fn label(&self) -> String {
        format!("{}-{}/{}", self.router, self.version, self.policy)
    }

    /// Parses `smg:POLICY` (a plan's spelling) with the installed version.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (router, policy) = s
            .split_once(':')
            .ok_or_else(|| format!("peer {s:?}: want ROUTER:POLICY (smg:cache_aware)"))?;
        if router != "smg" {
            return Err(format!("peer {s:?}: the only peer router is smg"));
        }
        if !SMG_POLICIES.contains(&policy) {
            return Err(format!(
                "peer {s:?}: smg policies are {}",
                SMG_POLICIES.join(", ")
            ));
        }
        Ok(Self {
            router: router.into(),
            version: String::new(),
            policy: policy.into(),
        })
    }
}

/// The `smg` executable: `$KVROUTE_SMG`, else the bootstrap's `.tools/venv/bin/smg`.
pub fn smg_binary() -> anyhow::Result<PathBuf> {
    installed("KVROUTE_SMG", ".tools/venv/bin/smg", "smg")
}

/// The installed `smg` package's version (from the virtualenv's package metadata).
pub fn smg_version() -> anyhow::Result<String> {
    let bin = smg_binary()?;
    let python = bin.with_file_name("python");
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('smg'))",
        ])
        .output()
        .with_context(|| format!("{} (smg's virtualenv)", python.display()))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if v.is_empty() {
        bail!("smg's version not found");
    }
    Ok(v)
}

/// A running SGLang model gateway; killed when dropped.
#[derive(Debug)]
pub struct Smg {
    child: Child,
    /// Where it serves the OpenAI API.
    pub addr: std::net::SocketAddr,
    /// Its log file.
    pub log_path: PathBuf,
}

impl Smg {
    /// `smg launch` on a free port in front of `worker_urls` with `policy` (at its defaults),
    /// vLLM backend, no tokenizer download; returns once `/health` answers 200.
    pub async fn start(policy: &str, worker_urls: &[String]) -> anyhow::Result<Self> {
        let bin = smg_binary()?;
        let port = free_port()?;
        // Its metrics server on a free loopback port too: the default (every interface, port
        // 29000) collides with any other SMG on the machine, one left behind by an interrupted
        // run included.
        let metrics_port = free_port()?;
        let log_path = std::env::temp_dir().join(format!("kvroute-smg-{port}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.args(["launch", "--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--worker-urls")
            .args(worker_urls)
            .args([
                "--policy",
                policy,
                "--backend",
                "vllm",
                "--disable-tokenizer-autoload",
                "--log-level",
                "warn",
                "--prometheus-host",
                "127.0.0.1",
                "--prometheus-port",
                &metrics_port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/health")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "smg exited with {status} at start; log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("smg not ready after 30 s; log in {}", log_path.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            child,
            addr,
            log_path,
        })
    }

    /// Its process id (None once it has exited).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// URL of `path` on the gateway.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops it and removes its log.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(&self.log_path);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_from_plans() {
        let p = Peer::parse("smg:cache_aware").unwrap();
        assert_eq!(p.policy, "cache_aware");
        assert!(Peer::parse("smg:nope").is_err());
        assert!(Peer::parse("dynamo:kv").is_err());
        assert!(Peer::parse("cache_aware").is_err());
        let p = Peer {
            version: "1.13.0".into(),
            ..p
        };
        assert_eq!(p.label(), "smg-1.13.0/cache_aware");
    }
}
