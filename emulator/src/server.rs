//! The OpenAI-compatible HTTP front end and the loop that drives the engine in (scaled) real time.
//!
//! Endpoints as `vllm serve` has them: `POST /v1/chat/completions`, `POST /v1/completions`
//! (streaming SSE and not, `stream_options.include_usage`), `GET /v1/models`, `GET /health`,
//! `GET /metrics`, `POST /reset_prefix_cache`. Bad input gets vLLM's answer: 400 (404 for an
//! unknown model) with `{"error": {"message", "type", "param", "code"}}`.
//!
//! Time: the engine runs on model time, which advances `time_scale` times faster than the wall
//! clock. Step durations, and every latency the engine reports in `/metrics`, are model time;
//! a client measuring wall time sees them divided by `time_scale`.

// Handlers return early with a ready `Response`; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::kv_events::KvEventSink;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{AddError, Engine, EngineConfig, Event, FinishReason, NewRequest, Usage};
use crate::metrics::Metrics;
use crate::tokenizer::{self, ChatMessage};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name clients use in `model` (`--served-model-name`, else the model).
    pub served_model_name: String,
    /// The engine.
    pub engine: EngineConfig,
    /// Model time per wall time (1 = real time).
    pub time_scale: f64,
    /// `--gpu-memory-utilization` (reported in `cache_config_info`).
    pub gpu_memory_utilization: f64,
    /// Where the engine's KV cache events go (`--kv-events-config`), if published.
    pub kv_events: Option<KvEventSink>,
    /// The share of KV block allocations whose residency is reported (`--kv-cache-metrics` with
    /// `--kv-cache-metrics-sample`), if reported.
    pub kv_cache_metrics_sample: Option<f64>,
}

enum Command {
    Add {
        req: NewRequest,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<(), AddError>>,
    },
    Abort(u64),
    Reset(oneshot::Sender<bool>),
}

/// Timing of the driver against the model, for the benchmark.
#[derive(Debug, Default)]
pub struct DriverTiming {
    /// Steps run.
    pub steps: AtomicU64,
    /// Sum of modelled step durations, in wall microseconds.
    pub modelled_us: AtomicU64,
    /// Sum of wall time from step start to events delivered, microseconds.
    pub actual_us: AtomicU64,
    /// Most any step ran late against its modelled end, microseconds.
    pub max_late_us: AtomicU64,
    /// Sum over steps of how late each one's tokens were delivered after its modelled end, microseconds.
    pub sum_late_us: AtomicU64,
    /// Blocks holding a cached prefix (after the last step).
    pub cached_blocks: AtomicU64,
    /// Requests the engine holds.
    pub requests: AtomicU64,
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    cfg: Arc<ServerConfig>,
    tx: mpsc::UnboundedSender<Command>,
    metrics: Arc<Metrics>,
    next_id: Arc<AtomicU64>,
    /// Driver timing.
    pub timing: Arc<DriverTiming>,
    created: u64,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("model", &self.cfg.served_model_name)
            .finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts the engine loop and returns the router.
pub fn start(cfg: ServerConfig) -> anyhow::Result<(Router, AppState)> {
    let mut metrics = Metrics::new(
        &cfg.served_model_name,
        &cfg.engine,
        cfg.gpu_memory_utilization,
    )?;
    let (tx, rx) = mpsc::unbounded_channel();
    let timing = Arc::new(DriverTiming::default());
    let mut engine = Engine::new(cfg.engine.clone());
    if let Some(sample) = cfg.kv_cache_metrics_sample {
        engine
            .track_block_residency(sample)
            .map_err(anyhow::Error::msg)?;
        metrics = metrics.with_kv_cache_metrics()?;
    }
    let metrics = Arc::new(metrics);
    let kv = cfg.kv_events.clone();
    if kv.is_some() {
        engine.record_kv_events();
    }
    // The engine loop has a thread of its own: its step timing must not depend on how busy the
    // async runtime is with streams, and an OS sleep is precise where the runtime's timer rounds
    // to milliseconds.
    let (m, t, scale) = (metrics.clone(), timing.clone(), cfg.time_scale.max(1e-6));
    std::thread::Builder::new()
        .name("kvroute-engine".into())
        .spawn(move || drive(engine, rx, m, t, scale, kv))?;
    let state = AppState {
        cfg: Arc::new(cfg),
        tx,
        metrics,
        next_id: Arc::new(AtomicU64::new(1)),
        timing,
        created: unix_now(),
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics_page))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/emulator/stats", get(emulator_stats))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Not Found", "NotFoundError", None) })
        .with_state(state.clone());
    Ok((app, state))
}

fn drive(
    mut engine: Engine,
    mut rx: mpsc::UnboundedReceiver<Command>,
    metrics: Arc<Metrics>,
    timing: Arc<DriverTiming>,
    scale: f64,
    kv: Option<KvEventSink>,
) {
    let publish = |engine: &mut Engine| {
        if let Some(k) = &kv {
            k.publish(engine.take_kv_events());
        }
    };
    let start = Instant::now();
    let model_now = |t: Instant| t.duration_since(start).as_secs_f64() * scale;
    let mut sinks: HashMap<u64, mpsc::UnboundedSender<Event>> = HashMap::new();
    let mut last_end = 0.0f64;
    let mut busy = false;
    loop {
        // Take every command that arrived; sleep on the channel when there is nothing to do.
        loop {
            let cmd = if engine.has_work() {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            } else {
                match rx.blocking_recv() {
                    Some(c) => c,
                    None => return,
                }
            };
            // Arrival in model time: while the engine is busy, no later than the next step's start
            // (the end of the step in flight); when idle, now.
            let wall_now = model_now(Instant::now());
            let now = if engine.has_work() {
                wall_now.min(last_end)
            } else {
                wall_now.max(last_end)
            };
            match cmd {
                Command::Add { req, events, reply } => {
                    let id = req.id;
                    let r = engine.add(req, now);
                    if r.is_ok() {
                        sinks.insert(id, events);
                    }
                    let _ = reply.send(r);
                }
                Command::Abort(id) => {
                    if sinks.remove(&id).is_some() {
                        engine.abort(id);
                    }
                }
                Command::Reset(reply) => {
                    let _ = reply.send(engine.reset_prefix_cache());
                    publish(&mut engine);
                }
            }
            metrics.update(engine.stats(), &[]);
        }
        let wall_start = Instant::now();
        // Steps run back to back in model time while the engine is busy, as vLLM's loop does, so a
        // late wake-up delays one step's delivery but never shifts the model's timeline.
        let now = if busy {
            last_end
        } else {
            model_now(wall_start).max(last_end)
        };
        let out = engine.step(now);
        last_end = now + out.duration;
        // The step's results exist when the modelled step ends.
        let end = start + Duration::from_secs_f64(last_end / scale);
        let wait = end.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let late_from = Instant::now();
        // The step's counters are on /metrics before its tokens reach a client, so a client that
        // has read its last token and then scrapes sees that token counted.
        metrics.update(engine.stats(), &out.observations);
        // The cache's changes are published when the step's results exist, as vLLM publishes them
        // after each scheduler step.
        publish(&mut engine);
        let mut gone = Vec::new();
        for ev in out.events {
            let (id, finished) = match &ev {
                Event::Token { id, .. } => (*id, false),
                Event::Finished { id, .. } => (*id, true),
            };
            if let Some(sink) = sinks.get(&id) {
                if sink.send(ev).is_err() && !finished {
                    gone.push(id);
                }
            }
            if finished {
                sinks.remove(&id);
            }
        }
        // A client that went away frees its blocks and batch slot now.
        if !gone.is_empty() {
            for id in gone {
                sinks.remove(&id);
                engine.abort(id);
            }
            metrics.update(engine.stats(), &[]);
        }
        if out.duration > 0.0 {
            // Lateness: from the step's modelled end to its tokens handed to the streams.
            let late = late_from.saturating_duration_since(end).as_micros() as u64
                + late_from.elapsed().as_micros() as u64;
            timing.max_late_us.fetch_max(late, Ordering::Relaxed);
            timing.sum_late_us.fetch_add(late, Ordering::Relaxed);
        }
        busy = engine.has_work();
        timing
            .cached_blocks
            .store(engine.pool().num_cached() as u64, Ordering::Relaxed);
        timing
            .requests
            .store(engine.len() as u64, Ordering::Relaxed);
        if out.duration > 0.0 {
            timing.steps.fetch_add(1, Ordering::Relaxed);
            timing
                .modelled_us
                .fetch_add((out.duration / scale * 1e6) as u64, Ordering::Relaxed);
            timing
                .actual_us
                .fetch_add(wall_start.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }
}

fn error(status: StatusCode, message: &str, kind: &str, param: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

fn bad_request(message: impl AsRef<str>, param: Option<&str>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        message.as_ref(),
        "BadRequestError",
        param,
    )
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    min_tokens: Option<i64>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<i64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: PromptIn,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    min_tokens: Option<i64>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<i64>,
}

/// What both endpoints hand to [`generate`].
struct Generation {
    prompt: Vec<u32>,
    max_tokens: Option<i64>,
    min_tokens: Option<i64>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    chat: bool,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = match e.classify() {
            serde_json::error::Category::Data => format!("Invalid request: {e}"),
            _ => format!("JSON decode error: {e}"),
        };
        bad_request(msg, None)
    })
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), Response> {
    match model {
        Some(m) if m != state.cfg.served_model_name => Err(error(
            StatusCode::NOT_FOUND,
            &format!("The model `{m}` does not exist."),
            "NotFoundError",
            Some("model"),
        )),
        _ => Ok(()),
    }
}

fn check_n(n: Option<i64>) -> Result<(), Response> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(bad_request(
            format!("n={n} is not supported by this emulator; use n=1."),
            Some("n"),
        )),
    }
}

async fn chat(State(state): State<AppState>, body: Bytes) -> Response {
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Err(e) = check_model(&state, req.model.as_deref()).and(check_n(req.n)) {
        return e;
    }
    if req.messages.is_empty() {
        return bad_request(
            "messages must contain at least one message.",
            Some("messages"),
        );
    }
    let mut texts = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let text = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(x)) => t.push_str(x),
                        ("text", None) => {
                            return bad_request(
                                "a text content part needs `text`.",
                                Some("messages"),
                            )
                        }
                        (other, _) => {
                            return bad_request(
                                format!(
                                    "content part type {other:?} is not supported by this model."
                                ),
                                Some("messages"),
                            )
                        }
                    }
                }
                t
            }
        };
        texts.push(text);
    }
    let messages: Vec<ChatMessage<'_>> = req
        .messages
        .iter()
        .zip(&texts)
        .map(|(m, t)| ChatMessage {
            role: &m.role,
            content: t,
        })
        .collect();
    let prompt = tokenizer::encode_chat(&messages);
    let g = Generation {
        prompt,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        min_tokens: req.min_tokens,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        chat: true,
    };
    generate(state, g).await
}

async fn completions(State(state): State<AppState>, body: Bytes) -> Response {
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Err(e) = check_model(&state, req.model.as_deref()).and(check_n(req.n)) {
        return e;
    }
    let empty = match &req.prompt {
        PromptIn::Text(t) => t.is_empty(),
        PromptIn::Texts(v) => v.iter().all(String::is_empty),
        PromptIn::Tokens(t) => t.is_empty(),
        PromptIn::TokenLists(v) => v.iter().all(Vec::is_empty),
    };
    if empty {
        return bad_request("The prompt cannot be empty.", Some("prompt"));
    }
    let prompt =
        match req.prompt {
            PromptIn::Text(t) => {
                let mut ids = vec![tokenizer::BEGIN_OF_TEXT];
                tokenizer::encode(&t, &mut ids);
                ids
            }
            PromptIn::Tokens(t) => t,
            PromptIn::Texts(v) if v.len() == 1 => {
                let mut ids = vec![tokenizer::BEGIN_OF_TEXT];
                tokenizer::encode(v.first().map_or("", String::as_str), &mut ids);
                ids
            }
            PromptIn::TokenLists(v) if v.len() == 1 => v.into_iter().next().unwrap_or_default(),
            _ => return bad_request(
                "batched prompts are not supported by this emulator; send one prompt per request.",
                Some("prompt"),
            ),
        };
    if prompt.is_empty() {
        return bad_request("The prompt cannot be empty.", Some("prompt"));
    }
    let g = Generation {
        prompt,
        // OpenAI's (and vLLM's) default for completions.
        max_tokens: Some(req.max_tokens.unwrap_or(16)),
        min_tokens: req.min_tokens,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        chat: false,
    };
    generate(state, g).await
}

/// Aborts the request in the engine if dropped before it finished (client disconnect).
struct AbortOnDrop {
    tx: mpsc::UnboundedSender<Command>,
    id: u64,
    done: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Command::Abort(self.id));
        }
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "completion_tokens": u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

async fn generate(state: AppState, g: Generation) -> Response {
    let max_len = state.cfg.engine.max_model_len as i64;
    let prompt_len = g.prompt.len() as i64;
    if prompt_len >= max_len {
        return bad_request(
            AddError::TooLong {
                max: state.cfg.engine.max_model_len,
                prompt: g.prompt.len(),
            }
            .to_string(),
            Some("messages"),
        );
    }
    let max_tokens = match g.max_tokens {
        None => max_len - prompt_len,
        Some(m) if m < 1 => return bad_request(format!("max_tokens must be at least 1, got {m}."), Some("max_tokens")),
        Some(m) if m + prompt_len > max_len => {
            return bad_request(
                format!(
                    "This model's maximum context length is {max_len} tokens. However, you requested {} tokens \
                     ({prompt_len} in the messages, {m} in the completion). Please reduce the length of the \
                     messages or completion.",
                    m + prompt_len
                ),
                Some("max_tokens"),
            )
        }
        Some(m) => m,
    };
    let min_tokens = match g.min_tokens {
        None => 0,
        Some(m) if m < 0 || m > max_tokens => {
            return bad_request(
                format!("min_tokens must be between 0 and max_tokens ({max_tokens}), got {m}."),
                Some("min_tokens"),
            )
        }
        Some(m) => m,
    };
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (reply_tx, reply_rx) = oneshot::channel();
    let req = NewRequest {
        id,
        prompt: g.prompt,
        max_tokens: max_tokens as u32,
        min_tokens: min_tokens as u32,
        ignore_eos: g.ignore_eos,
    };
    if state
        .tx
        .send(Command::Add {
            req,
            events: ev_tx,
            reply: reply_tx,
        })
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine is not running",
            "ServiceUnavailableError",
            None,
        );
    }
    match reply_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return bad_request(e.to_string(), Some("messages")),
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "engine is not running",
                "ServiceUnavailableError",
                None,
            )
        }
    }
    let guard = AbortOnDrop {
        tx: state.tx.clone(),
        id,
        done: false,
    };
    let rid = if g.chat {
        format!("chatcmpl-{id:016x}")
    } else {
        format!("cmpl-{id:016x}")
    };
    let model = state.cfg.served_model_name.clone();
    let created = unix_now();
    if g.stream {
        let stream = sse_stream(ev_rx, guard, rid, model, created, g.chat, g.include_usage);
        return Sse::new(stream).into_response();
    }
    collect(ev_rx, guard, rid, model, created, g.chat).await
}

async fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut guard: AbortOnDrop,
    rid: String,
    model: String,
    created: u64,
    chat: bool,
) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { text: t, .. } => text.push_str(t),
            Event::Finished { reason, usage, .. } => {
                guard.done = true;
                let choice = if chat {
                    json!({"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                           "logprobs": null, "finish_reason": finish(reason), "stop_reason": null})
                } else {
                    json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish(reason), "stop_reason": null})
                };
                let object = if chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Json(
                    json!({"id": rid, "object": object, "created": created, "model": model,
                                   "choices": [choice], "usage": usage_json(&usage)}),
                )
                .into_response();
            }
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine dropped the request",
        "InternalServerError",
        None,
    )
}

fn finish(r: FinishReason) -> &'static str {
    r.as_str()
}

fn sse_stream(
    rx: mpsc::UnboundedReceiver<Event>,
    guard: AbortOnDrop,
    rid: String,
    model: String,
    created: u64,
    chat: bool,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value, usage: Option<Value>| {
        let mut c = json!({"id": rid, "object": object, "created": created, "model": model, "choices": [choice]});
        if let (Some(u), Some(obj)) = (usage, c.as_object_mut()) {
            obj.insert("choices".into(), json!([]));
            obj.insert("usage".into(), u);
        }
        SseEvent::default().data(c.to_string())
    };
    struct St {
        rx: mpsc::UnboundedReceiver<Event>,
        guard: AbortOnDrop,
        started: bool,
        pending: std::collections::VecDeque<SseEvent>,
        ended: bool,
    }
    impl St {
        fn finish(
            &mut self,
            chunk: &impl Fn(Value, Option<Value>) -> SseEvent,
            usage: Usage,
            include_usage: bool,
        ) {
            self.guard.done = true;
            if include_usage {
                self.pending
                    .push_back(chunk(Value::Null, Some(usage_json(&usage))));
            }
            self.pending.push_back(SseEvent::default().data("[DONE]"));
            self.ended = true;
        }
    }
    let st = St {
        rx,
        guard,
        started: !chat,
        pending: Default::default(),
        ended: false,
    };
    futures_util::stream::unfold((st, chunk), move |(mut st, chunk)| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), (st, chunk)));
            }
            if st.ended {
                return None;
            }
            let mut next = st.rx.recv().await;
            // vLLM's first chat chunk (the role) goes out with the first output, not before it:
            // a client's time to first chunk is the time to first token.
            if !st.started {
                st.started = true;
                let role = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                st.pending.push_back(chunk(role, None));
            }
            loop {
                match next.take() {
                    Some(Event::Token { text, .. }) => {
                        let mut c = if chat {
                            json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
                        } else {
                            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null, "stop_reason": null})
                        };
                        // A request's last token and its end come in the same engine step: as vLLM
                        // does, the last content chunk carries the finish reason.
                        match st.rx.try_recv() {
                            Ok(Event::Finished { reason, usage, .. }) => {
                                if let Some(obj) = c.as_object_mut() {
                                    obj.insert("finish_reason".into(), json!(finish(reason)));
                                    obj.insert("stop_reason".into(), Value::Null);
                                }
                                st.pending.push_back(chunk(c, None));
                                st.finish(&chunk, usage, include_usage);
                            }
                            Ok(other) => {
                                st.pending.push_back(chunk(c, None));
                                next = Some(other);
                                continue;
                            }
                            Err(_) => st.pending.push_back(chunk(c, None)),
                        }
                    }
                    Some(Event::Finished { reason, usage, .. }) => {
                        let c = if chat {
                            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish(reason), "stop_reason": null})
                        } else {
                            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish(reason), "stop_reason": null})
                        };
                        st.pending.push_back(chunk(c, None));
                        st.finish(&chunk, usage, include_usage);
                    }
                    None => st.ended = true,
                }
                break;
            }
        }
    })
}

async fn models(State(state): State<AppState>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": state.cfg.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "vllm",
        "root": state.cfg.engine.model,
        "parent": null,
        "max_model_len": state.cfg.engine.max_model_len,
    }]}))
    .into_response()
}

async fn metrics_page(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn reset_prefix_cache(State(state): State<AppState>) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.tx.send(Command::Reset(tx)).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine is not running",
            "ServiceUnavailableError",
            None,
        );
    }
    match rx.await {
        Ok(true) => StatusCode::OK.into_response(),
        // vLLM answers 200 and logs when blocks are still in use; say so in the body.
        Ok(false) => (
            StatusCode::OK,
            "prefix cache not reset: blocks are still in use",
        )
            .into_response(),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine is not running",
            "ServiceUnavailableError",
            None,
        ),
    }
}

/// Not in vLLM: how closely the driver keeps to the model, and the pool's state.
async fn emulator_stats(State(state): State<AppState>) -> Response {
    let t = &state.timing;
    let (modelled, actual) = (
        t.modelled_us.load(Ordering::Relaxed),
        t.actual_us.load(Ordering::Relaxed),
    );
    Json(json!({
        "steps": t.steps.load(Ordering::Relaxed),
        "modelled_step_wall_us": modelled,
        "actual_step_wall_us": actual,
        "actual_over_modelled": if modelled > 0 { actual as f64 / modelled as f64 } else { 0.0 },
        "max_late_us": t.max_late_us.load(Ordering::Relaxed),
        "sum_late_us": t.sum_late_us.load(Ordering::Relaxed),
        "cached_blocks": t.cached_blocks.load(Ordering::Relaxed),
        "num_gpu_blocks": state.cfg.engine.num_gpu_blocks,
        "requests": t.requests.load(Ordering::Relaxed),
        "time_scale": state.cfg.time_scale,
        "kv_events_dropped": state.cfg.kv_events.as_ref().map(KvEventSink::dropped),
    }))
    .into_response()
}

/// The timing counters, for benchmarks.
pub fn timing(state: &AppState) -> Arc<DriverTiming> {
    state.timing.clone()
}

/// Mutex-free helper for tests: the rendered metrics of a state.
pub fn render_metrics(state: &AppState) -> String {
    state.metrics.render()
}
