//! kvroute-sidecar: polls every engine's Prometheus `/metrics` and serves the snapshot that
//! kvroute's Envoy singleton pulls.
//!
//! - One polling task per engine, at `poll_interval` (the staleness knob), each scrape bounded by
//!   a timeout; after failures the task backs off (doubling, at most 8 intervals) and the engine is
//!   marked unhealthy after `unhealthy_after` consecutive failures.
//! - Per engine it derives waiting, running, KV usage, prefix hit rate and token rates over a
//!   window (counter deltas; a counter going down is an engine restart, not a negative rate),
//!   KV capacity from `cache_config_info`, health and scrape age.
//! - `GET /snapshot` serves [`kvroute_core::snapshot::Snapshot`] (JSON); `GET /metrics` the
//!   sidecar's own stats; `GET /health`. Any number of Envoy replicas may pull the same snapshot.
//!
//! It reads vLLM's metric names, so real vLLM and the emulator work alike.

pub mod fleet;
pub mod scrape;
pub mod tracker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvroute_core::snapshot::{Snapshot, SCHEMA};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::scrape::parse_vllm;
use crate::tracker::Tracker;

/// One engine to poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTarget {
    /// Endpoint name (as in the filter's configuration).
    pub name: String,
    /// Its metrics URL (`http://host:port/metrics`).
    pub metrics_url: String,
}

/// Sidecar settings.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The engines.
    pub engines: Vec<EngineTarget>,
    /// Poll period.
    pub poll_interval: Duration,
    /// Timeout of one scrape.
    pub timeout: Duration,
    /// Consecutive failures before an engine is unhealthy.
    pub unhealthy_after: u32,
    /// Window for hit rate and token rates.
    pub window: Duration,
    /// The fleet's shared decision log (Redis), for several Envoy replicas; None serves no `/fleet`.
    pub fleet: Option<fleet::FleetConfig>,
}

struct Metrics {
    registry: Registry,
    scrapes: IntCounterVec,
    duration: HistogramVec,
    healthy: IntGaugeVec,
    snapshots: prometheus::IntCounter,
    fleet: IntCounterVec,
    fleet_seconds: prometheus::Histogram,
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let scrapes = IntCounterVec::new(
            Opts::new(
                "kvroute_sidecar_scrapes_total",
                "Engine /metrics scrapes by result.",
            ),
            &["engine", "result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "kvroute_sidecar_scrape_duration_seconds",
                "Time to fetch and parse one engine's /metrics.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["engine"],
        )?;
        let healthy = IntGaugeVec::new(
            Opts::new(
                "kvroute_sidecar_engine_healthy",
                "1 if the engine is healthy.",
            ),
            &["engine"],
        )?;
        let snapshots = prometheus::IntCounter::new(
            "kvroute_sidecar_snapshots_served_total",
            "Snapshots served.",
        )?;
        registry.register(Box::new(scrapes.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(healthy.clone()))?;
        let fleet = IntCounterVec::new(
            Opts::new(
                "kvroute_sidecar_fleet_exchanges_total",
                "Fleet log exchanges by result (ok, refused: batch too large, bad_request, redis_error).",
            ),
            &["result"],
        )?;
        let fleet_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "kvroute_sidecar_fleet_seconds",
                "Time of one fleet exchange with Redis.",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
        )?;
        registry.register(Box::new(snapshots.clone()))?;
        registry.register(Box::new(fleet.clone()))?;
        registry.register(Box::new(fleet_seconds.clone()))?;
        Ok(Self {
            registry,
            scrapes,
            duration,
            healthy,
            snapshots,
            fleet,
            fleet_seconds,
        })
    }
}

/// How long a client's requested poll interval stays in force without being asked again.
const REQUEST_TTL_MS: u64 = 5_000;

/// The running sidecar's state.
#[derive(Clone)]
pub struct Sidecar {
    cfg: Arc<SidecarConfig>,
    /// (requested interval ms, when asked ms): the smallest request seen recently wins.
    requested: Arc<Mutex<Option<(u64, u64)>>>,
    trackers: Arc<Vec<Mutex<Tracker>>>,
    version: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    pollers: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    fleet: Option<fleet::FleetLog>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("engines", &self.cfg.engines)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Sidecar {
    /// Starts one polling task per engine and returns the HTTP app.
    pub fn start(cfg: SidecarConfig) -> anyhow::Result<(Router, Sidecar)> {
        let window_ms = cfg.window.as_millis() as u64;
        let trackers = cfg
            .engines
            .iter()
            .map(|e| Mutex::new(Tracker::new(&e.name, window_ms, cfg.unhealthy_after)))
            .collect();
        let fleet = cfg.fleet.clone().map(fleet::FleetLog::new).transpose()?;
        let me = Sidecar {
            fleet,
            cfg: Arc::new(cfg),
            requested: Arc::new(Mutex::new(None)),
            trackers: Arc::new(trackers),
            version: Arc::new(AtomicU64::new(0)),
            metrics: Arc::new(Metrics::new()?),
            pollers: Arc::new(Mutex::new(Vec::new())),
        };
        let client = reqwest::Client::builder()
            .timeout(me.cfg.timeout)
            .pool_max_idle_per_host(1)
            .build()?;
        let handles: Vec<tokio::task::AbortHandle> = (0..me.cfg.engines.len())
            .map(|i| tokio::spawn(poll(me.clone(), client.clone(), i)).abort_handle())
            .collect();
        if let Ok(mut p) = me.pollers.lock() {
            *p = handles;
        }
        let app = Router::new()
            .route("/snapshot", get(snapshot))
            .route("/metrics", get(own_metrics))
            .route("/health", get(|| async { StatusCode::OK }))
            .route(
                "/fleet",
                post(exchange).layer(DefaultBodyLimit::max(64 << 20)),
            )
            .with_state(me.clone());
        Ok((app, me))
    }

    /// Stops the polling tasks (an in-process sidecar that outlives its use would otherwise poll
    /// its engines for as long as the runtime runs). The snapshot stays as it was.
    pub fn stop(&self) {
        if let Ok(mut p) = self.pollers.lock() {
            for h in p.drain(..) {
                h.abort();
            }
        }
    }

    /// The poll interval in force: the smallest one a client asked for in the last 5 s, else the
    /// configured one.
    pub fn poll_interval(&self) -> Duration {
        let now = now_ms();
        match self.requested.lock().ok().and_then(|r| *r) {
            Some((ms, at)) if now.saturating_sub(at) <= REQUEST_TTL_MS => Duration::from_millis(ms),
            _ => self.cfg.poll_interval,
        }
    }

    fn request_interval(&self, ms: u64) {
        let now = now_ms();
        if let Ok(mut r) = self.requested.lock() {
            // A smaller request still in force stays; its own requester keeps it fresh.
            let smaller_in_force = matches!(*r, Some((cur, at)) if cur < ms && now.saturating_sub(at) <= REQUEST_TTL_MS);
            if !smaller_in_force {
                *r = Some((ms, now));
            }
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let engines = self
            .trackers
            .iter()
            .map(|t| t.lock().map(|t| t.snapshot()))
            .collect::<Result<Vec<_>, _>>();
        Snapshot {
            schema: SCHEMA,
            version: self.version.load(Ordering::Relaxed),
            generated_at_ms: now_ms(),
            poll_interval_ms: self.poll_interval().as_millis() as u32,
            engines: engines.unwrap_or_default(),
        }
    }
}

async fn poll(sc: Sidecar, client: reqwest::Client, i: usize) {
    let Some(target) = sc.cfg.engines.get(i).cloned() else {
        return;
    };
    let Some(tracker) = sc.trackers.get(i) else {
        return;
    };
    let mut next = tokio::time::Instant::now();
    loop {
        let t0 = Instant::now();
        let result = match client.get(&target.metrics_url).send().await {
            Ok(r) if r.status().is_success() => match r.text().await {
                Ok(text) => parse_vllm(&text).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Ok(r) => Err(format!("status {}", r.status())),
            Err(e) => Err(format!("{e:?}")),
        };
        sc.metrics
            .duration
            .with_label_values(&[&target.name])
            .observe(t0.elapsed().as_secs_f64());
        let failures = {
            let Ok(mut t) = tracker.lock() else { return };
            let was_healthy = t.healthy();
            match result {
                Ok(sample) => {
                    t.ok(now_ms(), sample);
                    sc.metrics
                        .scrapes
                        .with_label_values(&[&target.name, "ok"])
                        .inc();
                }
                Err(why) => {
                    t.failed(why);
                    sc.metrics
                        .scrapes
                        .with_label_values(&[&target.name, "error"])
                        .inc();
                }
            }
            if t.healthy() != was_healthy {
                let why = t.snapshot().last_error.unwrap_or_default();
                eprintln!(
                    "kvroute-sidecar: {} is now {} {why}",
                    target.name,
                    if t.healthy() { "healthy" } else { "unhealthy:" }
                );
            }
            sc.metrics
                .healthy
                .with_label_values(&[&target.name])
                .set(i64::from(t.healthy()));
            t.consecutive_failures()
        };
        sc.version.fetch_add(1, Ordering::Relaxed);
        // Back off while failing: 1, 2, 4, 8 intervals.
        let factor = 1u32 << failures.min(3);
        next += sc.poll_interval() * factor;
        let now = tokio::time::Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next).await;
    }
}

#[derive(serde::Deserialize)]
struct SnapshotQuery {
    /// The engine poll interval the caller wants (10 ms to 10 min).
    poll_interval_ms: Option<u64>,
}

async fn snapshot(State(sc): State<Sidecar>, Query(q): Query<SnapshotQuery>) -> Response {
    sc.metrics.snapshots.inc();
    if let Some(ms) = q.poll_interval_ms.filter(|ms| (10..=600_000).contains(ms)) {
        sc.request_interval(ms);
    }
    Json(sc.snapshot()).into_response()
}

async fn exchange(State(sc): State<Sidecar>, body: axum::body::Bytes) -> Response {
    let Some(log) = &sc.fleet else {
        return (
            StatusCode::NOT_FOUND,
            "no fleet log: start the sidecar with --redis-url\n",
        )
            .into_response();
    };
    let t0 = Instant::now();
    let result = log.exchange(&body).await;
    sc.metrics.fleet_seconds.observe(t0.elapsed().as_secs_f64());
    let (label, resp) = match result {
        Ok((bytes, outcome)) => (
            if outcome == fleet::Outcome::Refused {
                "refused"
            } else {
                "ok"
            },
            bytes.into_response(),
        ),
        Err(fleet::FleetFailure::BadRequest(e)) => (
            "bad_request",
            (StatusCode::BAD_REQUEST, format!("bad fleet request: {e}\n")).into_response(),
        ),
        Err(e) => (
            "redis_error",
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        ),
    };
    sc.metrics.fleet.with_label_values(&[label]).inc();
    resp
}

async fn own_metrics(State(sc): State<Sidecar>) -> Response {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&sc.metrics.registry.gather(), &mut buf);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        buf,
    )
        .into_response()
}
