//! A minimal OpenAI-shaped endpoint that says which endpoint served each request.
//!
//! The routing tests put it behind Envoy where they need control the emulator does not give: an
//! answer whatever the body holds, and a response held open on request. It answers `POST /v1/chat/completions` and `/v1/completions`
//! with a small completion naming itself (body field `served_by`, header `x-served-by`), whatever
//! the body holds, so routing can be observed for any input; `GET /v1/models` and `/health` answer
//! 200, anything else 404. A request header `x-echo-delay-ms` (at most 30 s) holds the response,
//! which keeps requests in flight for load-aware routing tests. It counts what it serves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Counters of one echo endpoint.
#[derive(Debug, Default)]
pub struct EchoStats {
    /// Completion requests received.
    pub completions: AtomicU64,
    /// Completion requests being held right now.
    pub active: AtomicU64,
    /// Other requests received (models, health, unknown paths).
    pub other: AtomicU64,
    /// Body bytes received on completion paths.
    pub body_bytes: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    name: String,
    stats: Arc<EchoStats>,
}

/// A running echo endpoint; stops when dropped.
#[derive(Debug)]
pub struct EchoEngine {
    /// Its name (what it reports as `served_by`).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<EchoStats>,
    stop: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

impl EchoEngine {
    /// Starts an endpoint named `name` on 127.0.0.1 and a free port.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_on(name, "127.0.0.1:0".parse()?).await
    }

    /// Starts an endpoint named `name` on `addr`.
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(EchoStats::default());
        let shared = Arc::new(Shared {
            name: name.to_string(),
            stats: stats.clone(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .route("/v1/completions", post(complete))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .fallback(not_found)
            .with_state(shared);
        let tx = crate::stack::serve_in_background(listener, app);
        Ok(Self {
            name: name.to_string(),
            addr,
            stats,
            stop: std::sync::Mutex::new(Some(tx)),
        })
    }

    /// Stops the server as a killed engine would look from outside: it accepts no connection from
    /// now on, finishes the requests it holds and closes its connections.
    pub fn shutdown(&self) {
        if let Some(tx) = self.stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = tx.send(());
        }
    }

    /// Completion requests served so far.
    pub fn completions(&self) -> u64 {
        self.stats.completions.load(Ordering::SeqCst)
    }

    /// Completion requests held right now.
    pub fn active(&self) -> u64 {
        self.stats.active.load(Ordering::SeqCst)
    }
}

impl Drop for EchoEngine {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.get_mut().ok().and_then(Option::take) {
            let _ = tx.send(());
        }
    }
}

struct ActiveGuard(Arc<EchoStats>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn complete(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    s.stats.completions.fetch_add(1, Ordering::SeqCst);
    s.stats
        .body_bytes
        .fetch_add(body.len() as u64, Ordering::SeqCst);
    s.stats.active.fetch_add(1, Ordering::SeqCst);
    let _guard = ActiveGuard(s.stats.clone());
    let delay = headers
        .get("x-echo-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .min(30_000);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let body = serde_json::json!({
        "id": "echo-1",
        "object": "chat.completion",
        "model": "echo",
        "served_by": s.name,
        "received_bytes": body.len(),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}
    });
    ([("x-served-by", s.name.clone())], Json(body)).into_response()
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    s.stats.other.fetch_add(1, Ordering::SeqCst);
    Json(serde_json::json!({"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": s.name}]}))
        .into_response()
}

async fn health(State(s): State<Arc<Shared>>) -> StatusCode {
    s.stats.other.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

async fn not_found(State(s): State<Arc<Shared>>) -> Response {
    s.stats.other.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::NOT_FOUND,
        [("x-served-by", s.name.clone())],
        "not found",
    )
        .into_response()
}
