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
