//! Envoy as a child process, with kvroute loaded, and its admin API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

use crate::envoy_config::{render, render_ecds, EnvoySpec};

/// The repository root (where `.tools/` and `target/` live): two above this crate's manifest.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The Envoy binary: `$KVROUTE_ENVOY`, else `.tools/bin/envoy` (installed by scripts/bootstrap.sh).
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    installed("KVROUTE_ENVOY", ".tools/bin/envoy", "Envoy")
}

/// A tool the bootstrap installs: the path in `$var`, else `default` under the repository; an
/// error naming the bootstrap when it is missing.
pub fn installed(var: &str, default: &str, what: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::var_os(var).map_or_else(|| repo_root().join(default), PathBuf::from);
    if !p.exists() {
        bail!(
            "no {what} at {} (run scripts/bootstrap.sh, or set {var})",
            p.display()
        );
    }
    Ok(p)
}

/// The filter: `$KVROUTE_WASM`, else the release build in `target/`.
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    built(
        "KVROUTE_WASM",
        "target/wasm32-wasip1/release/kvroute_filter.wasm",
        "filter",
        "wasm",
    )
}

/// The filter built with test-only fault triggers (`just wasm-faults`; the fault tests use it):
/// `$KVROUTE_FAULTS_WASM`, else its build in `target/test-faults/`.
pub fn faults_wasm() -> anyhow::Result<PathBuf> {
    built(
        "KVROUTE_FAULTS_WASM",
        "target/test-faults/wasm32-wasip1/release/kvroute_filter.wasm",
        "fault-injection filter",
        "wasm-faults",
    )
}

/// The native bench probe (`kvroute-bench-native`, a dynamic module): `$KVROUTE_NATIVE`, else the
/// release build in `target/` (`just native` builds it).
pub fn native_module() -> anyhow::Result<PathBuf> {
    built(
        "KVROUTE_NATIVE",
        "target/release/libkvroute_native.so",
        "native module",
        "native",
    )
}

/// A build output: the path in `$var`, else `default` under the repository; an error naming the
/// `just` recipe that builds it when it is missing.
fn built(var: &str, default: &str, what: &str, recipe: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::var_os(var).map_or_else(|| repo_root().join(default), PathBuf::from);
    if !p.exists() {
        bail!(
            "no {what} at {} (run `just {recipe}`, or set {var})",
            p.display()
        );
    }
    Ok(p)
}

/// A free TCP port on 127.0.0.1 (bound and released; Envoy binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running Envoy, killed when dropped.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    /// Where clients send requests.
    pub listener: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Where its log goes.
    pub log_path: PathBuf,
    dir: PathBuf,
    http: reqwest::Client,
    spec: EnvoySpec,
}

impl Envoy {
    /// Renders `spec` (with free ports filled in), starts Envoy with `--concurrency 2`, and waits until
    /// it is live and kvroute's singleton has published its first state.
    pub async fn start(spec: EnvoySpec) -> anyhow::Result<Self> {
        // Free ports are found by binding and releasing them, which can race with other processes;
        // an Envoy that exits at start is retried with fresh ports.
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(spec.clone()).await {
                Ok(e) => return Ok(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("Envoy did not start")))
    }

    async fn start_once(mut spec: EnvoySpec) -> anyhow::Result<Self> {
        let envoy = envoy_binary()?;
        spec.listen_address = "127.0.0.1".into();
        spec.listen_port = free_port()?;
        spec.admin_port = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "kvroute-envoy-{}-{}",
            std::process::id(),
            spec.listen_port
        ));
        std::fs::create_dir_all(&dir)?;
        if spec.ecds_path.is_some() {
            let ecds = dir.join("kvroute-filter.yaml");
            let json = serde_json::to_string(&spec.filter)?;
            std::fs::write(&ecds, render_ecds(&spec, &json))?;
            spec.ecds_path = Some(ecds.display().to_string());
        }
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, render(&spec))?;
        let log_path = dir.join("envoy.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&envoy)
            .arg("-c")
            .arg(&config_path)
            .args([
                "--concurrency",
                "2",
                "--use-dynamic-base-id",
                "--log-level",
                "info",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", envoy.display()))?;
        let mut me = Self {
            child,
            spec: spec.clone(),
            listener: SocketAddr::from(([127, 0, 0, 1], spec.listen_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], spec.admin_port)),
            log_path,
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        // kvroute publishes its state, as the Wasm filter or the native module; the native floor
        // and the ext_proc processor publish none: they are ready when Envoy is live.
        let publishes = spec.with_filter
            && spec.ext_proc.is_none()
            && spec
                .native_module
                .as_ref()
                .is_none_or(|m| m.filter_name == "kvroute");
        me.wait_ready(publishes, Duration::from_secs(30)).await?;
        Ok(me)
    }

    async fn wait_ready(&mut self, with_filter: bool, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(stats) = self.stats().await {
                let published =
                    !with_filter || stats.get("kvroute_state_version").copied().unwrap_or(0) >= 1;
                if published && self.is_live().await {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "Envoy exited with {status} at start; log:\n{}",
                    self.log_tail(40)
                );
            }
            if start.elapsed() > limit {
                bail!(
                    "Envoy not ready after {limit:?}; log:\n{}",
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn is_live(&self) -> bool {
        match self
            .http
            .get(format!("http://{}/ready", self.admin))
            .send()
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }

    /// The last `n` lines of Envoy's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines
            .get(lines.len().saturating_sub(n)..)
            .unwrap_or_default()
            .join("\n")
    }

    /// Serves the HTTP filter a new configuration JSON by ECDS (an Envoy started with
    /// `ecds_path`): the resource file is replaced by a rename, as Envoy's watched directory wants.
    pub fn push_filter_config(&self, filter_json: &str) -> anyhow::Result<()> {
        let path = self
            .spec
            .ecds_path
            .as_ref()
            .context("this Envoy takes its filter configuration inline, not by ECDS")?;
        let tmp = self.dir.join("kvroute-filter.yaml.tmp");
        std::fs::write(&tmp, render_ecds(&self.spec, filter_json))?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Base URL for requests through Envoy.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listener)
    }

    /// Counters and gauges from `/stats` whose name contains `kvroute`, keyed by name without the
    /// `wasmcustom.` prefix (e.g. `kvroute_decisions_total.policy.jsq.endpoint.engine0`).
    pub async fn stats(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let text = self
            .http
            .get(format!("http://{}/stats?filter=kvroute", self.admin))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(parse_stats(&text))
    }

    /// Envoy's process id (None once it has exited).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// One stat's value, 0 if absent.
    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.stats().await?.get(name).copied().unwrap_or(0))
    }

    /// CPU time Envoy has used so far, all threads, user and system, in seconds (None where
    /// `/proc` cannot tell: not Linux, or the process is gone). From `/proc/PID/stat`, in Linux's
    /// USER_HZ ticks (100 per second on every Linux ABI that has /proc's stat in ticks).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.id()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command (which may hold spaces) start after the last ')'.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }

    /// The raw `/stats/prometheus` page.
    pub async fn prometheus(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("http://{}/stats/prometheus", self.admin))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Sets runtime values through `POST /runtime_modify`.
    pub async fn runtime_modify(&self, values: &[(&str, &str)]) -> anyhow::Result<()> {
        let r = self
            .http
            .post(format!("http://{}/runtime_modify", self.admin))
            .query(values)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("runtime_modify {values:?}: {}", r.status());
        }
        Ok(())
    }

    /// Waits until stat `name` satisfies `pred`, or fails after `limit`.
    pub async fn wait_stat(
        &self,
        name: &str,
        limit: Duration,
        pred: impl Fn(u64) -> bool,
    ) -> anyhow::Result<u64> {
        let start = Instant::now();
        loop {
            let v = self.stats().await?.get(name).copied().unwrap_or(0);
            if pred(v) {
                return Ok(v);
            }
            if start.elapsed() > limit {
                bail!("stat {name} = {v} after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets `kvroute.policy` and waits until the singleton has published it.
    pub async fn set_policy(&self, policy: &str) -> anyhow::Result<Duration> {
        let start = Instant::now();
        self.runtime_modify(&[("kvroute.policy", policy)]).await?;
        self.wait_stat(
            &format!("kvroute_policy_active.policy.{policy}"),
            Duration::from_secs(5),
            |v| v == 1,
        )
        .await?;
        // The workers read the new state on their next request (version check).
        Ok(start.elapsed())
    }

    /// Stops Envoy and removes its scratch directory (keeps it if `keep`).
    pub async fn stop(mut self, keep: bool) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        if !keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Serves `app` on `listener` in a background task until the returned sender is used or dropped.
pub fn serve_in_background(
    listener: tokio::net::TcpListener,
    app: axum::Router,
) -> tokio::sync::oneshot::Sender<()> {
    use axum::serve::ListenerExt;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // TCP_NODELAY, as vLLM's server has: small responses are not held for the peer's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    tx
}

/// Parses Envoy's `/stats` text (`name: value` lines; histograms are skipped).
pub fn parse_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            let v = v.trim().parse::<u64>().ok()?;
            Some((k.strip_prefix("wasmcustom.").unwrap_or(k).to_string(), v))
        })
        .collect()
}
