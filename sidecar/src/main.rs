//! `kvroute-sidecar --engine engine0=http://127.0.0.1:8001 --engine engine1=http://127.0.0.1:8002`

use std::time::Duration;

use axum::serve::ListenerExt;
use clap::Parser;
use kvroute_sidecar::{EngineTarget, Sidecar, SidecarConfig};

#[derive(Parser, Debug)]
#[command(about = "Poll vLLM engines' /metrics and serve kvroute's snapshot")]
struct Args {
    /// An engine as NAME=BASE_URL (its /metrics is polled); repeat.
    #[arg(long = "engine", required = true)]
    engines: Vec<String>,
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: String,
    /// Poll period, ms.
    #[arg(long, default_value_t = 100)]
    poll_interval_ms: u64,
    /// Timeout of one scrape, ms.
    #[arg(long, default_value_t = 500)]
    timeout_ms: u64,
    /// Consecutive failed scrapes before an engine is unhealthy.
    #[arg(long, default_value_t = 3)]
    unhealthy_after: u32,
    /// Window for hit rate and token rates, ms.
    #[arg(long, default_value_t = 10_000)]
    window_ms: u64,
    /// Serve `/fleet`, the shared decision log of several Envoy replicas, from this Redis
    /// (`redis://[user:password@]host:port/db`; `rediss://` for TLS).
    #[arg(long)]
    redis_url: Option<String>,
    /// PEM file of the CA of the Redis server's certificate (for `rediss://`; default: the
    /// system's roots).
    #[arg(long)]
    redis_ca_file: Option<std::path::PathBuf>,
    /// Prefix of the fleet log's Redis keys.
    #[arg(long, default_value = "kvroute")]
    redis_prefix: String,
    /// Timeout of one Redis round trip, ms.
    #[arg(long, default_value_t = 250)]
    redis_timeout_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let engines = args
        .engines
        .iter()
        .map(|e| {
            let (name, url) = e
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--engine {e}: want NAME=BASE_URL"))?;
            Ok(EngineTarget {
                name: name.into(),
                metrics_url: format!("{}/metrics", url.trim_end_matches('/')),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = SidecarConfig {
        engines,
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(1)),
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        unhealthy_after: args.unhealthy_after,
        window: Duration::from_millis(args.window_ms),
        fleet: args.redis_url.as_deref().map(|url| {
            let mut f = kvroute_sidecar::fleet::FleetConfig::new(url);
            f.prefix.clone_from(&args.redis_prefix);
            f.ca_file.clone_from(&args.redis_ca_file);
            f.timeout = Duration::from_millis(args.redis_timeout_ms.max(1));
            f
        }),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    eprintln!(
        "kvroute-sidecar: {} engines every {} ms, serving http://{addr}/snapshot",
        cfg.engines.len(),
        args.poll_interval_ms
    );
    println!("listening on {addr}");
    let (app, _) = Sidecar::start(cfg)?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
