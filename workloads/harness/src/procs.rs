//! Project binaries as child processes, and what they cost (for the benchmarks).

use std::process::Stdio;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts `target/release/<bin>` with `args` and waits for its `listening on ADDR` line.
pub async fn spawn_listening(bin: &str, args: &[String]) -> anyhow::Result<(Child, String)> {
    let path = crate::stack::repo_root().join("target/release").join(bin);
    let mut child = Command::new(&path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("{} (cargo build --release first)", path.display()))?;
    let out = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).await?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .context("no address line")?
        .to_string();
    Ok((child, addr))
}

/// (CPU seconds, resident bytes) of a process, from /proc.
pub fn cpu_rss(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .unwrap_or("")
        .split(' ')
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(((ticks(11) + ticks(12)) / 100.0, rss_kb * 1024))
}

/// A project binary running as a child process; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
}

impl Proc {
    /// Its process id (None once it has exited).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, then reap: the process gets no chance to finish what it holds.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    async fn start(bin: &str, args: &[String]) -> anyhow::Result<Self> {
        let (child, addr) = spawn_listening(bin, args).await?;
        let addr = addr
            .parse()
            .with_context(|| format!("{bin} printed {addr:?}"))?;
        Ok(Self { child, addr })
    }
}

/// `kvroute-emulator` (release build) with a built-in `profile`, `time_scale` times real time,
/// on 127.0.0.1:`port` (0: any free port).
pub async fn emulator(profile: &str, time_scale: f64, port: u16) -> anyhow::Result<Proc> {
    let args = [
        "--port".to_string(),
        port.to_string(),
        "--profile".into(),
        profile.into(),
        "--time-scale".into(),
        time_scale.to_string(),
    ];
    Proc::start("kvroute-emulator", &args).await
}

/// `kvroute-sidecar` (release build) polling `engines` (name, base URL) every `poll_ms`, serving on
/// `listen` (port 0: any).
pub async fn sidecar(
    engines: &[(String, String)],
    poll_ms: u64,
    listen: std::net::SocketAddr,
) -> anyhow::Result<Proc> {
    sidecar_with_fleet(engines, poll_ms, listen, None).await
}

/// [`sidecar`] that also serves the fleet's log from the Redis at `redis_url`.
pub async fn sidecar_with_fleet(
    engines: &[(String, String)],
    poll_ms: u64,
    listen: std::net::SocketAddr,
    redis_url: Option<&str>,
) -> anyhow::Result<Proc> {
    sidecar_with_args(engines, poll_ms, listen, redis_url, &[]).await
}

/// [`sidecar_with_fleet`] with more flags (`--redis-ca-file PATH`, ...).
pub async fn sidecar_with_args(
    engines: &[(String, String)],
    poll_ms: u64,
    listen: std::net::SocketAddr,
    redis_url: Option<&str>,
    extra: &[String],
) -> anyhow::Result<Proc> {
    let mut args = vec![
        "--listen".to_string(),
        listen.to_string(),
        "--poll-interval-ms".into(),
        poll_ms.to_string(),
    ];
    if let Some(url) = redis_url {
        args.push("--redis-url".into());
        args.push(url.into());
    }
    args.extend_from_slice(extra);
    for (name, url) in engines {
        args.push("--engine".into());
        args.push(format!("{name}={url}"));
    }
    Proc::start("kvroute-sidecar", &args).await
}

/// `kvroute-extproc` (release build) with the filter configuration `config_json`, on any free
/// port: kvroute's decision as an Envoy ext_proc processor.
pub async fn extproc(config_json: &str) -> anyhow::Result<Proc> {
    let path = std::env::temp_dir().join(format!(
        "kvroute-extproc-{}-{}.json",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::write(&path, config_json)?;
    let args = ["--config".to_string(), path.display().to_string()];
    // It reads the file before it says where it listens.
    let started = Proc::start("kvroute-extproc", &args).await;
    let _ = std::fs::remove_file(&path);
    started
}

/// A Redis server (Debian's `redis-server`, installed by the bootstrap; `KVROUTE_REDIS` overrides)
/// on 127.0.0.1:`port` (0: any free port), with no persistence: a restarted one starts empty.
pub async fn redis(port: u16) -> anyhow::Result<Proc> {
    let port = port_or_free(port)?;
    redis_with(port, &["--port".to_string(), port.to_string()]).await
}

/// A Redis server as [`redis`], serving only TLS on `port` with the certificate and key in the PEM
/// files `cert` and `key` (no client certificates), and asking clients for `password`.
pub async fn redis_tls(
    port: u16,
    cert: &std::path::Path,
    key: &std::path::Path,
    password: &str,
) -> anyhow::Result<Proc> {
    let port = port_or_free(port)?;
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    // The plain port is off; the TLS one is where clients connect.
    let args = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-auth-clients",
        "no",
        "--requirepass",
        password,
    ]
    .map(String::from);
    redis_with(port, &args).await
}

fn port_or_free(port: u16) -> anyhow::Result<u16> {
    match port {
        0 => crate::stack::free_port(),
        p => Ok(p),
    }
}

/// `redis-server` with `listen` (its port flags), waiting until clients reach it on `port`.
async fn redis_with(port: u16, listen: &[String]) -> anyhow::Result<Proc> {
    let bin = crate::stack::installed("KVROUTE_REDIS", "/usr/bin/redis-server", "redis-server")?;
    let child = Command::new(&bin)
        .args(listen)
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        // The slow-Redis test makes it sleep with DEBUG SLEEP (loopback clients only).
        .args(["--enable-debug-command", "local"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let start = std::time::Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "redis-server did not listen on {addr}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(Proc { child, addr })
}

impl Proc {
    /// `redis://ADDR` for a [`redis`] process.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}
