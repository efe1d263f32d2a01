//! Peer routers run beside kvroute on the same engines, each launched per run so that it starts
//! from its cold state as kvroute does from a new directory epoch:
//! - SGLang's model gateway (PyPI `smg`, installed by the bootstrap into `.tools/venv`), against
//!   the engines' URLs with one of its policies at its defaults;
//! - NVIDIA Dynamo's frontend with its KV router (PyPI `ai-dynamo`, installed by the bootstrap into
//!   `.tools/dynamo`), at its defaults, in front of one Dynamo worker per engine
//!   (`scripts/dynamo_worker.py`: it registers the engine with Dynamo's runtime, relays the
//!   engine's KV cache events, vLLM's ZMQ feed, to the router, and forwards each request, which
//!   Dynamo has tokenized with Llama 3's tokenizer, to the engine as token ids). File discovery,
//!   TCP requests and ZMQ events: no etcd or NATS.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::stack::{free_port, installed};

/// SMG's policies the study runs, each at its defaults.
pub const SMG_POLICIES: [&str; 4] = ["cache_aware", "round_robin", "power_of_two", "prefix_hash"];

/// Dynamo's router modes the study runs, at their defaults: its KV router, and round robin (the same
/// deployment without KV routing: what Dynamo's stack itself costs).
pub const DYNAMO_MODES: [&str; 2] = ["kv", "round-robin"];

/// A peer router that routed a run: its rows stand beside kvroute's policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The router: `smg` (SGLang's model gateway) or `dynamo` (NVIDIA Dynamo's frontend).
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

    /// Parses `smg:POLICY` or `dynamo:MODE` (a plan's spelling), without the version.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (router, policy) = s.split_once(':').ok_or_else(|| {
            format!("peer {s:?}: want ROUTER:POLICY (smg:cache_aware, dynamo:kv)")
        })?;
        let known: &[&str] = match router {
            "smg" => &SMG_POLICIES,
            "dynamo" => &DYNAMO_MODES,
            _ => return Err(format!("peer {s:?}: the peer routers are smg and dynamo")),
        };
        if !known.contains(&policy) {
            return Err(format!(
                "peer {s:?}: {router} policies are {}",
                known.join(", ")
            ));
        }
        Ok(Self {
            router: router.into(),
            version: String::new(),
            policy: policy.into(),
        })
    }
}

/// The installed version of a peer router (`smg` or `dynamo`).
pub fn peer_version(router: &str) -> anyhow::Result<String> {
    match router {
        "dynamo" => dynamo_version(),
        _ => smg_version(),
    }
}

/// The `smg` executable: `$KVROUTE_SMG`, else the bootstrap's `.tools/venv/bin/smg`.
pub fn smg_binary() -> anyhow::Result<PathBuf> {
    installed("KVROUTE_SMG", ".tools/venv/bin/smg", "smg")
}

/// The version of `package` installed where `python` runs (its package metadata).
fn package_version(python: &std::path::Path, package: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(python)
        .args([
            "-c",
            &format!("import importlib.metadata as m; print(m.version({package:?}))"),
        ])
        .output()
        .with_context(|| format!("{} ({package}'s virtualenv)", python.display()))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if v.is_empty() {
        bail!("{package}'s version not found");
    }
    Ok(v)
}

/// The installed `smg` package's version.
pub fn smg_version() -> anyhow::Result<String> {
    package_version(&smg_binary()?.with_file_name("python"), "smg")
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
        let ready = wait_ready(
            &format!("http://{addr}/health"),
            Some(&mut child),
            Duration::from_secs(30),
            |_| true,
        )
        .await;
        if let Err(why) = ready {
            bail!(
                "smg {why}; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
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

/// Polls `url` every 100 ms until it answers 2xx with a body `ready` accepts. Err (what went
/// wrong, as the end of a sentence naming the process) when `child` exits or `limit` passes first.
async fn wait_ready(
    url: &str,
    mut child: Option<&mut Child>,
    limit: Duration,
    ready: impl Fn(&str) -> bool,
) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| format!("not polled: {e}"))?;
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() && r.text().await.is_ok_and(|t| ready(&t)) {
                return Ok(());
            }
        }
        if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
            return Err(format!("exited with {status} at start"));
        }
        if start.elapsed() > limit {
            return Err(format!("not ready after {} s", limit.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Dynamo's Python: `$KVROUTE_DYNAMO_PYTHON`, else the bootstrap's `.tools/dynamo/bin/python`.
pub fn dynamo_python() -> anyhow::Result<PathBuf> {
    installed(
        "KVROUTE_DYNAMO_PYTHON",
        ".tools/dynamo/bin/python",
        "Dynamo (ai-dynamo)",
    )
}

/// The model directory Dynamo's frontend loads its tokenizer and chat template from (the
/// bootstrap builds it: Llama 3's tokenizer, Llama 3.2's template as the emulator renders it).
pub fn dynamo_model_dir() -> anyhow::Result<PathBuf> {
    installed(
        "KVROUTE_DYNAMO_MODEL",
        ".tools/dynamo/model",
        "Dynamo's model directory",
    )
}

/// The installed `ai-dynamo` package's version.
pub fn dynamo_version() -> anyhow::Result<String> {
    package_version(&dynamo_python()?, "ai-dynamo")
}

/// A running Dynamo deployment (frontend with its KV router, one worker per engine); every process
/// is killed when dropped.
#[derive(Debug)]
pub struct Dynamo {
    children: Vec<Child>,
    /// Where the frontend serves the OpenAI API.
    pub addr: std::net::SocketAddr,
    /// Its discovery directory and logs.
    pub dir: PathBuf,
}

impl Dynamo {
    /// One worker per engine (`engines`: base URL and KV events endpoint), then the frontend with
    /// `--router-mode MODE` at its defaults, serving `model`; returns once the frontend lists the
    /// model with every worker registered.
    pub async fn start(
        mode: &str,
        engines: &[(String, String)],
        model: &str,
    ) -> anyhow::Result<Self> {
        let python = dynamo_python()?;
        let model_dir = dynamo_model_dir()?;
        let worker = crate::stack::repo_root().join("scripts/dynamo_worker.py");
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("kvroute-dynamo-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("kv"))?;
        let env = |cmd: &mut Command| {
            cmd.env("DYN_FILE_KV", dir.join("kv"))
                .env("DYN_SELF_HOST_METADATA", "0")
                .env("DYN_LOG", "warn")
                .stdin(Stdio::null())
                .kill_on_drop(true);
        };
        let mut children = Vec::new();
        for (i, (url, events)) in engines.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("worker{i}.log")))?;
            let mut cmd = Command::new(&python);
            cmd.arg(&worker)
                .args(["--engine", url, "--kv-events", events, "--model", model])
                .arg("--model-path")
                .arg(&model_dir)
                .stdout(Stdio::piped())
                .stderr(log);
            env(&mut cmd);
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting {}", worker.display()))?;
            // The worker prints one line once it is registered.
            let stdout = child.stdout.take().context("worker stdout")?;
            let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
            let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
            children.push(child);
            match ready {
                Ok(Ok(Some(l))) if l.starts_with("worker ready") => {}
                other => bail!(
                    "Dynamo worker {i} not ready ({other:?}); log in {}",
                    dir.display()
                ),
            }
        }
        let log = std::fs::File::create(dir.join("frontend.log"))?;
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "dynamo.frontend", "--http-host", "127.0.0.1"])
            .args(["--http-port", &port.to_string()])
            .args(["--router-mode", mode, "--discovery-backend", "file"])
            .args(["--kv-cache-block-size", "16"])
            .stdout(log.try_clone()?)
            .stderr(log);
        env(&mut cmd);
        children.push(cmd.spawn().context("starting dynamo.frontend")?);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // Ready once it lists the model, which it does when a worker has registered it.
        let ready = wait_ready(
            &format!("http://{addr}/v1/models"),
            children.last_mut(),
            Duration::from_secs(60),
            |body| body.contains(model),
        )
        .await;
        if let Err(why) = ready {
            bail!("Dynamo's frontend {why}; logs in {}", dir.display());
        }
        Ok(Self {
            children,
            addr,
            dir,
        })
    }

    /// URL of `path` on the frontend.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process ids of the frontend and of every worker (those still running).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// The frontend's process id (None once it has exited): it is started last.
    pub fn frontend_pid(&self) -> Option<u32> {
        self.children.last().and_then(Child::id)
    }

    /// Stops every process and removes its directory.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
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
        assert_eq!(Peer::parse("dynamo:kv").unwrap().router, "dynamo");
        assert!(Peer::parse("dynamo:random").is_err());
        assert!(Peer::parse("llmd:precise").is_err());
        assert!(Peer::parse("cache_aware").is_err());
        let p = Peer {
            version: "1.13.0".into(),
            ..p
        };
        assert_eq!(p.label(), "smg-1.13.0/cache_aware");
    }
}
