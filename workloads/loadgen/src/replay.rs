//! The replayer: runs sessions against any OpenAI-compatible endpoint (Envoy with kvroute, a vLLM,
//! an emulator) with streaming requests, and records what each request saw.
//!
//! Sessions start at their arrival times; a session's turns go one after another (each resends the
//! history; the assistant turn is the file's reply or the engine's own answer), with the session's
//! think time between a response and the next turn. At most `max_in_flight` requests are open at
//! once. Every finished request is written at once as one JSON line, so an interrupted run keeps
//! everything it finished.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use kvroute_traces::Session;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::sse;

/// One request as the client saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Session id.
    pub session: String,
    /// Turn index in the session.
    pub turn: usize,
    /// When it was sent, ms since the run started.
    pub sent_ms: f64,
    /// When it was sent, ms since the epoch.
    pub sent_unix_ms: u64,
    /// When the client meant to send it, ms since the run started: the session's start, or the
    /// previous response's end plus the think time. `sent_ms` minus this is the client's send
    /// delay (timer granularity, scheduling, the in-flight limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_ms: Option<f64>,
    /// HTTP status (0: no response).
    pub status: u16,
    /// Time to the first content token, ms.
    pub ttft_ms: Option<f64>,
    /// Gaps between content chunks after the first, ms.
    pub itl_ms: Vec<f64>,
    /// Time to the end of the response, ms.
    pub e2e_ms: f64,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: Option<u64>,
    /// The endpoint that served it (kvroute's `x-kvroute-endpoint` response header).
    pub endpoint: Option<String>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// Records kept in memory: a `Write` into a shared buffer (the study and the tests read it back).
#[derive(Debug, Clone, Default)]
pub struct MemorySink(Arc<Mutex<Vec<u8>>>);

impl MemorySink {
    /// Everything written so far.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Write for MemorySink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// `.../v1/chat/completions` of each gateway: each request goes to one of them, picked at
    /// random (a hash of its session and turn, so a run repeats), as a plain L4 balancer in front
    /// of several gateway replicas would spread them.
    pub urls: Vec<String>,
    /// `model` to send (None: omitted).
    pub model: Option<String>,
    /// Most requests open at once.
    pub max_in_flight: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Session header name.
    pub session_header: String,
    /// A new connection for every request instead of a pool of kept-alive ones: for a server whose
    /// streamed responses stall on a reused connection (Dynamo 1.6.1's frontend: about 40 ms a
    /// request, its first write waiting for the client's delayed ACK), a stall the study's time
    /// scale would multiply.
    pub fresh_connections: bool,
}

/// What a replay produced.
#[derive(Debug, Clone, Default)]
pub struct ReplaySummary {
    /// Requests finished (any status).
    pub finished: usize,
    /// Requests that failed (non-200 or transport error).
    pub failed: usize,
    /// Whether the run was interrupted.
    pub interrupted: bool,
    /// Wall time, s.
    pub wall_s: f64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `sessions`, writing one record per request to `out`; `progress` is called after each
/// request with (finished, total); `stop` interrupts (no new request is sent; open ones finish).
pub async fn replay(
    sessions: Vec<Session>,
    opts: ReplayOptions,
    out: Arc<Mutex<dyn Write + Send>>,
    stop: Arc<AtomicBool>,
    progress: Arc<dyn Fn(usize, usize) + Send + Sync>,
) -> anyhow::Result<ReplaySummary> {
    let total = kvroute_traces::requests(&sessions);
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .pool_max_idle_per_host(if opts.fresh_connections {
            0
        } else {
            opts.max_in_flight
        })
        .build()?;
    let gate = Arc::new(Semaphore::new(opts.max_in_flight.max(1)));
    let start = Instant::now();
    let done = Arc::new(Mutex::new((0usize, 0usize)));
    let opts = Arc::new(opts);
    let mut tasks = Vec::new();
    for s in sessions {
        let (client, gate, out, stop, progress, done, opts) = (
            client.clone(),
            gate.clone(),
            out.clone(),
            stop.clone(),
            progress.clone(),
            done.clone(),
            opts.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let at = start + Duration::from_secs_f64(s.start_ms.max(0.0) / 1000.0);
            tokio::time::sleep_until(at.into()).await;
            let mut scheduled = s.start_ms.max(0.0);
            let mut messages: Vec<Value> = Vec::new();
            if let Some(sys) = &s.system {
                messages.push(json!({"role": "system", "content": sys}));
            }
            for (t, turn) in s.turns.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if t > 0 && s.think_ms > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(s.think_ms / 1000.0)).await;
                }
                messages.push(json!({"role": "user", "content": turn.user}));
                let Ok(permit) = gate.acquire().await else {
                    return;
                };
                let (mut record, answer) =
                    one(&client, &opts, &s.id, t, &messages, turn.max_tokens, start).await;
                drop(permit);
                record.scheduled_ms = Some(scheduled);
                scheduled = record.sent_ms + record.e2e_ms + s.think_ms.max(0.0);
                let failed = record.status != 200 || record.error.is_some();
                if let Ok(mut w) = out.lock() {
                    if let Ok(line) = serde_json::to_string(&record) {
                        let _ = writeln!(w, "{line}");
                        let _ = w.flush();
                    }
                }
                let (n, _) = {
                    let Ok(mut d) = done.lock() else { return };
                    d.0 += 1;
                    d.1 += usize::from(failed);
                    *d
                };
                progress(n, total);
                if failed {
                    return; // a conversation cannot go on without its answer
                }
                let reply = turn.assistant.clone().unwrap_or(answer);
                messages.push(json!({"role": "assistant", "content": reply}));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let (finished, failed) = done.lock().map(|d| *d).unwrap_or_default();
    Ok(ReplaySummary {
        finished,
        failed,
        interrupted: stop.load(Ordering::Relaxed),
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// The gateway a request goes to (see [`ReplayOptions::urls`]).
fn pick_url<'a>(urls: &'a [String], session: &str, turn: usize) -> &'a str {
    if urls.len() < 2 {
        return urls.first().map_or("", String::as_str);
    }
    // A stable hash of (session, turn): the same replay spreads the same way on every machine.
    let key = xxhash_rust::xxh3::xxh3_64(session.as_bytes()) ^ turn as u64;
    let i = (kvroute_traces::rng::mix(key) % urls.len() as u64) as usize;
    urls.get(i).map_or("", String::as_str)
}

async fn one(
    client: &reqwest::Client,
    opts: &ReplayOptions,
    session: &str,
    turn: usize,
    messages: &[Value],
    max_tokens: u32,
    run_start: Instant,
) -> (RequestRecord, String) {
    let mut body = json!({"messages": messages, "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
                          "stream_options": {"include_usage": true}});
    if let (Some(m), Some(obj)) = (&opts.model, body.as_object_mut()) {
        obj.insert("model".into(), json!(m));
    }
    let t0 = Instant::now();
    let mut rec = RequestRecord {
        session: session.to_string(),
        turn,
        sent_ms: t0.duration_since(run_start).as_secs_f64() * 1e3,
        sent_unix_ms: unix_ms(),
        scheduled_ms: None,
        status: 0,
        ttft_ms: None,
        itl_ms: Vec::new(),
        e2e_ms: 0.0,
        prompt_tokens: None,
        completion_tokens: None,
        cached_tokens: None,
        endpoint: None,
        error: None,
    };
    let mut answer = String::new();
    let resp = client
        .post(pick_url(&opts.urls, session, turn))
        .header(opts.session_header.as_str(), session)
        .json(&body)
        .send()
        .await;
    match resp {
        Err(e) => rec.error = Some(e.to_string()),
        Ok(r) => {
            rec.status = r.status().as_u16();
            rec.endpoint = r
                .headers()
                .get("x-kvroute-endpoint")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if rec.status != 200 {
                let body = r.text().await.unwrap_or_default();
                rec.error = Some(format!(
                    "HTTP {}: {}",
                    rec.status,
                    body.chars().take(200).collect::<String>()
                ));
            } else {
                let mut last: Option<Instant> = None;
                let mut events = std::pin::pin!(sse::json_events(r));
                while let Some(v) = events.next().await {
                    let v = match v {
                        Ok(v) => v,
                        Err(e) => {
                            rec.error = Some(e);
                            break;
                        }
                    };
                    if let Some(text) = sse::chunk_text(&v).filter(|t| !t.is_empty()) {
                        let now = Instant::now();
                        match last {
                            None => rec.ttft_ms = Some(now.duration_since(t0).as_secs_f64() * 1e3),
                            Some(prev) => rec
                                .itl_ms
                                .push(now.duration_since(prev).as_secs_f64() * 1e3),
                        }
                        last = Some(now);
                        answer.push_str(text);
                    }
                    if let Some((prompt, completion, cached)) = sse::chunk_usage(&v) {
                        rec.prompt_tokens = prompt;
                        rec.completion_tokens = completion;
                        rec.cached_tokens = cached;
                    }
                    if let Some(e) = v.get("error") {
                        rec.error = Some(e.to_string());
                    }
                }
            }
        }
    }
    rec.e2e_ms = t0.elapsed().as_secs_f64() * 1e3;
    (rec, answer)
}
