//! kvroute-sim: a deterministic discrete-event simulation of N engines behind kvroute.
//!
//! It runs the same code as the live stack, not copies of it:
//! - the engines are the emulator's engine model ([`kvroute_engine::engine::Engine`]: vLLM's
//!   block pool, prefix cache, eviction and V1 scheduler, the profile's latency model), fed the
//!   token ids the emulator's server would compute for the same chat;
//! - each gateway replica is kvroute-control's control plane, as the filter runs it, on an
//!   in-memory host on the simulation's clock ([`gateway`]): per Envoy worker a `Worker`, per
//!   request a `Stream` whose callbacks run when Envoy's would, and the `StateService` with its
//!   directory, publishes and overlays, decision queue, sidecar pull, runtime poll and fleet
//!   exchange. The request features are kvroute-core's, from the same canonical prompt text;
//! - the workloads are kvroute-traces' [`Session`]s, as the replayer runs them: each turn resends
//!   the history, the next turn leaves a think time after the response ends.
//!
//! What it models besides: the sidecar (it polls the engines every `sidecar_poll_us`, measuring
//! their rates as the sidecar does, and serves its last poll as the snapshot), the host's own
//! latencies ([`HostLatency`]: a queued report's wake-up of the state service, a callout's answer),
//! the gateway's per-request cost (a fixed delay on the request path and on the response path),
//! the fleet's log when replicas share one ([`fleet_log`]), and the client's send delay: a real
//! client sends a turn a little after it means to (timer granularity, scheduling), by a random
//! amount. That jitter reorders sends that are close, and a policy whose outcome depends on the
//! order of decisions (round_robin's parity) samples a different interleaving in every
//! realisation; the simulator draws it from a measured distribution, so its router seeds sample
//! interleavings as live repeats do.
//!
//! Time is integer microseconds. Events are ordered by (time, rank, sequence number) — step ends
//! first, then the sidecar's polls, the replicas' ticks, callout answers and queue wake-ups,
//! arrivals, engine admissions, and step starts last, so a request admitted at the instant a step
//! ends joins the next step as it would in the live engine loop. Random draws come from seeded
//! generators (the workers seed theirs from their host's clock, which starts at a time drawn from
//! the seed). Same inputs and seed, same output, byte for byte.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use kvroute_control::in_memory::InMemoryHost;
use kvroute_control::worker::REPORT_COALESCE_US;
use kvroute_control::Stream;
use kvroute_core::rates::{RateCounters, RateEstimator};
use kvroute_core::request::{Content, Message, ParsedRequest, Prompt};
use kvroute_core::router::{features, RequestFeatures};
use kvroute_core::snapshot::{EngineSnapshot, Snapshot};
use kvroute_core::state::EngineLoad;
use kvroute_core::{FilterConfig, PolicySettings};
use kvroute_engine::engine::{Engine, EngineConfig, Event, NewRequest, Observation};
use kvroute_engine::tokenizer::{encode_chat, filler_token, ChatMessage};
use kvroute_traces::rng::Rng;
use kvroute_traces::Session;
use serde::{Deserialize, Serialize};

mod fleet_log;
pub mod gateway;

use fleet_log::FleetLog;
pub use gateway::HostLatency;
use gateway::{Ask, Gateway, WORKERS};

/// One turn, ready to send: the engine's prompt tokens and the router's features.
#[derive(Debug, Clone)]
pub struct PreparedTurn {
    /// Token ids of the templated chat (what the emulator's server computes).
    pub prompt: Vec<u32>,
    /// Blocks, session and keys (what the filter computes from the body).
    pub features: RequestFeatures,
    /// `max_tokens` (sent with `ignore_eos`).
    pub max_tokens: u32,
}

/// One session, ready to run.
#[derive(Debug, Clone)]
pub struct PreparedSession {
    /// Session id.
    pub id: String,
    /// First turn's send time, us.
    pub start_us: u64,
    /// Think time after a response, us.
    pub think_us: u64,
    /// The turns.
    pub turns: Vec<PreparedTurn>,
}

fn us(ms: f64) -> u64 {
    (ms.max(0.0) * 1000.0).round() as u64
}

/// The assistant's reply as the engine produces it (its filler, `max_tokens` long with
/// `ignore_eos`), or the file's reply.
fn reply(turn: &kvroute_traces::Turn) -> String {
    match &turn.assistant {
        Some(a) => a.clone(),
        None => (0..turn.max_tokens as usize)
            .map(|i| filler_token(i).1)
            .collect(),
    }
}

/// Calls `f` with each turn of `s` (its index and the turn) and the chat the replayer sends for
/// it: the system prompt, the user turns so far, and each earlier turn's reply (the file's, or the
/// engine's filler).
pub fn each_turn_chat(
    s: &Session,
    mut f: impl FnMut(usize, &kvroute_traces::Turn, &[ChatMessage<'_>]),
) {
    let mut history: Vec<(&'static str, String)> = Vec::new();
    if let Some(sys) = &s.system {
        history.push(("system", sys.clone()));
    }
    for (t, turn) in s.turns.iter().enumerate() {
        history.push(("user", turn.user.clone()));
        let msgs: Vec<ChatMessage<'_>> = history
            .iter()
            .map(|(r, c)| ChatMessage {
                role: r,
                content: c,
            })
            .collect();
        f(t, turn, &msgs);
        history.push(("assistant", reply(turn)));
    }
}

/// Prepares one session: every turn's prompt tokens and features, as the emulator and the filter
/// compute them from the chat the replayer would send.
pub fn prepare_session(s: &Session, filter: &FilterConfig) -> PreparedSession {
    let mut turns = Vec::with_capacity(s.turns.len());
    each_turn_chat(s, |_, turn, msgs| {
        let parsed = ParsedRequest {
            model: Cow::Borrowed(""),
            user: None,
            tools: None,
            prompt: Prompt::Chat(
                msgs.iter()
                    .map(|m| Message {
                        role: Cow::Borrowed(m.role),
                        content: Content::Text(Cow::Borrowed(m.content)),
                        name: None,
                        tool_calls: None,
                        tool_call_id: None,
                    })
                    .collect(),
            ),
            usage_expected: true,
            streamed: true,
        };
        turns.push(PreparedTurn {
            prompt: encode_chat(msgs),
            features: features(&parsed, Some(&s.id), filter.block_spec()),
            max_tokens: turn.max_tokens,
        });
    });
    PreparedSession {
        id: s.id.clone(),
        start_us: us(s.start_ms),
        think_us: us(s.think_ms),
        turns,
    }
}

/// Prepares a workload, on up to `threads` threads (the result does not depend on it).
pub fn prepare(
    sessions: &[Session],
    filter: &FilterConfig,
    threads: usize,
) -> Vec<PreparedSession> {
    let threads = threads.clamp(1, 64);
    if threads == 1 || sessions.len() < 64 {
        return sessions
            .iter()
            .map(|s| prepare_session(s, filter))
            .collect();
    }
    let chunk = sessions.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|s| prepare_session(s, filter))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The gateway's own cost per request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GatewayCost {
    /// From the client's send to the engine's admission, us.
    pub request_us: u64,
    /// From the engine's output to the client, us.
    pub response_us: u64,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Engines, all alike.
    pub engine: EngineConfig,
    /// The filter's configuration: endpoints (one per engine, in order), block spec, capacities.
    pub filter: FilterConfig,
    /// Policy and its parameters, publish interval, load refresh interval.
    pub settings: PolicySettings,
    /// How often the sidecar polls the engines' metrics, us.
    pub sidecar_poll_us: u64,
    /// The gateway's per-request cost.
    pub gateway: GatewayCost,
    /// The gateway host's own latencies (queue wake-up, callouts).
    pub host: HostLatency,
    /// The client's send delay, us: quantiles evenly spaced in probability (the first is the
    /// minimum, the last the maximum) of the time from when a client means to send a turn to when
    /// it does. Each send draws from it (linear between quantiles). Empty: sends are on time.
    pub send_delay_us: Vec<u64>,
    /// Seed of the router's random draws.
    pub seed: u64,
    /// Keep inter-token gaps per request (memory grows with output tokens).
    pub record_itl: bool,
    /// Gateway replicas (Envoys with kvroute), each with its own directory and in-flight counts;
    /// each request goes to one picked at random (no affinity).
    pub gateways: usize,
    /// With several gateways: how often each exchanges with the fleet log, us (the live
    /// `fleet.sync_ms`); None: the gateways share nothing.
    pub fleet_sync_us: Option<u64>,
    /// The engines follow the KV residency of this share of their block allocations, as vLLM's
    /// `--kv-cache-metrics-sample` ([`SimOutput::block_residency`]); None: not followed.
    pub kv_residency_sample: Option<f64>,
}

impl SimConfig {
    /// `n` engines named `engine0..` with `engine`'s settings, the filter's defaults, and the
    /// live lab's freshness (sidecar poll 100 ms, load refresh 100 ms).
    pub fn new(n: usize, engine: EngineConfig, settings: PolicySettings) -> Self {
        let filter = FilterConfig::with_endpoints(
            (0..n)
                .map(|i| kvroute_core::config::EndpointConfig {
                    name: format!("engine{i}"),
                    cluster: None,
                    capacity_blocks: None,
                    address: None,
                })
                .collect(),
        );
        Self {
            engine,
            filter,
            settings,
            sidecar_poll_us: 100_000,
            gateway: GatewayCost {
                request_us: 0,
                response_us: 0,
            },
            host: HostLatency::default(),
            send_delay_us: Vec::new(),
            seed: 1,
            record_itl: true,
            gateways: 1,
            fleet_sync_us: None,
            kv_residency_sample: None,
        }
    }
}

/// One request as the client would have seen it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimRecord {
    /// Index of the session in the workload.
    pub session: u32,
    /// Turn index.
    pub turn: u32,
    /// Endpoint index.
    pub endpoint: u32,
    /// Sent at, us.
    pub sent_us: u64,
    /// First token at the client, us after sending (None: rejected).
    pub ttft_us: Option<u64>,
    /// Response end at the client, us after sending.
    pub e2e_us: u64,
    /// Gaps between tokens, us.
    pub itl_us: Vec<u64>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Blocks the directory predicted on the chosen endpoint.
    pub predicted_blocks: u32,
    /// The engine's rejection, if any (HTTP 400 in the live stack).
    pub error: Option<String>,
}

pub use kvroute_engine::counters::EngineCounters;

/// What a simulation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOutput {
    /// One record per request, in completion order.
    pub records: Vec<SimRecord>,
    /// Engine counters at the end (they start at zero).
    pub counters: EngineCounters,
    /// Decisions per endpoint.
    pub per_endpoint: Vec<u64>,
    /// Events processed.
    pub events: u64,
    /// Simulated time at the last event, us.
    pub end_us: u64,
    /// Engine queue samples: (time us, waiting + running per engine), at every sidecar poll.
    pub queue_samples: Vec<(u64, Vec<u32>)>,
    /// The replicas' kvroute counters at the end (summed over replicas), as Envoy's admin
    /// `/stats` would show them: publishes, overlays, fallbacks, decisions recorded.
    pub gateway_counters: std::collections::BTreeMap<String, i64>,
    /// With [`SimConfig::kv_residency_sample`]: each sampled block's (lifetime, idle before
    /// eviction), seconds, as vLLM's `kv_block_lifetime_seconds` and
    /// `kv_block_idle_before_evict_seconds` observe them, over every engine.
    pub block_residency: Vec<(f64, f64)>,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    StepEnd = 0,
    Poll = 1,
    /// A replica's state service tick (`a`: the replica).
    ServiceTick = 2,
    /// A callout's answer (`a`: the pending callout's slot).
    Answer = 3,
    /// A replica's queue wake-up (`a`: the replica).
    QueueReady = 4,
    /// A worker's tick (`a`: the replica, `b`: the worker).
    WorkerTick = 5,
    Arrive = 6,
    Admit = 7,
    StepStart = 8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Ev {
    at: u64,
    kind: Kind,
    seq: u64,
    /// Session (Arrive), request (Admit), engine (steps), replica (its events), callout slot.
    a: u32,
    /// Turn (Arrive), engine (Admit), worker (WorkerTick).
    b: u32,
}

/// Where a stream went and the blocks the directory predicted there. A stream the filter left
/// unrouted takes Envoy's default route: the first engine.
fn routed_to(s: &Stream<InMemoryHost>) -> (usize, u32) {
    s.routed()
        .map_or((0, 0), |r| (r.endpoint, r.predicted_blocks))
}

/// A request between its decision and its end.
struct Open {
    gateway: u32,
    /// Its HTTP stream in the replica's control plane.
    stream: Stream<InMemoryHost>,
    session: u32,
    turn: u32,
    sent_us: u64,
    first_us: Option<u64>,
    last_us: u64,
    itl: Vec<u64>,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    work: &'a [PreparedSession],
    queue: BinaryHeap<Reverse<Ev>>,
    seq: u64,
    engines: Vec<Engine>,
    busy: Vec<bool>,
    start_pending: Vec<bool>,
    pending: Vec<Vec<Event>>,
    open: Vec<Option<Open>>,
    open_count: usize,
    free_slots: Vec<u32>,
    gateways: Vec<Gateway>,
    /// Callouts on their way: (replica, token, what it asks), by slot.
    callouts: Vec<Option<(u32, u32, Ask)>>,
    /// The fleet's log, when the replicas share one.
    fleet: FleetLog,
    /// The sidecar's last poll of each engine, and when (us; 0: never).
    sidecar: Vec<(EngineLoad, u64)>,
    sidecar_polls: u64,
    /// The sidecar's measured rates per engine, and the counters it measures them from.
    rates: Vec<(RateEstimator, RateCounters)>,
    /// The clients' send delays.
    jitter: Rng,
    out: SimOutput,
}

impl Sim<'_> {
    /// One draw of the client's send delay.
    fn send_delay(&mut self) -> u64 {
        let q = &self.cfg.send_delay_us;
        if q.len() < 2 {
            return q.first().copied().unwrap_or(0);
        }
        let x = self.jitter.uniform() * (q.len() - 1) as f64;
        let i = (x as usize).min(q.len() - 2);
        match (q.get(i), q.get(i + 1)) {
            (Some(&lo), Some(&hi)) => {
                (lo as f64 + (hi as f64 - lo as f64) * (x - i as f64)).round() as u64
            }
            _ => 0,
        }
    }

    fn push(&mut self, at: u64, kind: Kind, a: u32, b: u32) {
        self.seq += 1;
        self.queue.push(Reverse(Ev {
            at,
            kind,
            seq: self.seq,
            a,
            b,
        }));
    }

    /// The replica and worker a request goes to: at random (a hash of its session and turn, so
    /// the rest of the run's draws do not depend on the number of replicas). The worker (which
    /// Envoy thread holds the client's connection) does not depend on the router seed.
    fn route_of(&self, session: u32, turn: u32) -> (usize, usize) {
        let key = u64::from(session) << 32 | u64::from(turn);
        let g = kvroute_traces::rng::mix(key ^ self.cfg.seed.rotate_left(17))
            % self.gateways.len().max(1) as u64;
        let w = kvroute_traces::rng::mix(key ^ 0x776f_726b_6572) % WORKERS as u64;
        (g as usize, w as usize)
    }

    /// After a replica's control plane ran at `now`: schedules what it asked of the host (a
    /// queue wake-up, its callouts' answers, worker `w`'s tick for a batch it holds).
    fn after(&mut self, now: u64, g: usize, worker: Option<usize>) {
        let Some(gw) = self.gateways.get_mut(g) else {
            return;
        };
        let wake = !gw.wake_pending && gw.queued();
        if wake {
            gw.wake_pending = true;
        }
        // A tick only matters to a worker that holds a batch (it flushes it).
        let tick = worker.filter(|w| {
            gw.workers.get(*w).is_some_and(|x| x.holds_reports())
                && gw
                    .tick_pending
                    .get_mut(*w)
                    .is_some_and(|p| !std::mem::replace(p, true))
        });
        let callouts = gw.take_callouts();
        let lat = self.cfg.host;
        if wake {
            self.push(now + lat.queue_us, Kind::QueueReady, g as u32, 0);
        }
        if let Some(w) = tick {
            // The worker's next tick on its period's grid.
            let period = REPORT_COALESCE_US.max(1);
            self.push(
                (now / period + 1) * period,
                Kind::WorkerTick,
                g as u32,
                w as u32,
            );
        }
        for (token, ask) in callouts {
            let slot = self.callouts.len() as u32;
            self.callouts.push(Some((g as u32, token, ask)));
            self.push(now + lat.callout_us, Kind::Answer, slot, 0);
        }
    }

    /// The sidecar's snapshot at `now` on replica `g`'s clock.
    fn snapshot(&self, now: u64, g: &Gateway) -> Vec<u8> {
        let capacity =
            u64::from(self.cfg.engine.num_gpu_blocks) * u64::from(self.cfg.engine.block_size);
        let snap = Snapshot {
            schema: kvroute_core::snapshot::SCHEMA,
            version: self.sidecar_polls,
            generated_at_ms: g.clock_ms(now),
            poll_interval_ms: (self.poll_us() / 1000) as u32,
            engines: self
                .cfg
                .filter
                .endpoints
                .iter()
                .zip(&self.sidecar)
                .map(|(e, (l, at))| EngineSnapshot {
                    name: e.name.clone(),
                    healthy: true,
                    consecutive_failures: 0,
                    scraped_at_ms: if *at > 0 { g.clock_ms(*at) } else { 0 },
                    waiting: l.waiting,
                    running: l.running,
                    kv_usage: l.kv_usage,
                    hit_rate: None,
                    prompt_tokens_per_s: 0.0,
                    generation_tokens_per_s: 0.0,
                    capacity_tokens: Some(capacity),
                    prefill_tps: l.prefill_tps,
                    step_s: l.step_s,
                    restarts: 0,
                    last_error: None,
                })
                .collect(),
        };
        serde_json::to_vec(&snap).unwrap_or_default()
    }

    /// The sidecar's poll period, us: the runtime's `sidecar_poll_ms` where set.
    fn poll_us(&self) -> u64 {
        match self.cfg.settings.sidecar_poll_ms {
            0 => self.cfg.sidecar_poll_us.max(1_000),
            ms => u64::from(ms) * 1000,
        }
    }

    fn answer(&mut self, now: u64, slot: u32) {
        let Some((g, token, ask)) = self.callouts.get_mut(slot as usize).and_then(Option::take)
        else {
            return;
        };
        let g = g as usize;
        let Some(gw) = self.gateways.get(g) else {
            return;
        };
        gw.at(now);
        let (status, body) = match ask {
            Ask::Snapshot => (200, self.snapshot(now, gw)),
            Ask::Runtime => (200, b"{\"entries\":{}}".to_vec()),
            Ask::Fleet(req) => {
                // The log's clock: the simulation's, from the first replica's epoch.
                let log_ms = self.gateways.first().map_or(0, |f| f.clock_ms(now));
                match self.fleet.exchange(&req, log_ms) {
                    Some(b) => (200, b),
                    None => (400, Vec::new()),
                }
            }
            Ask::Other => (404, Vec::new()),
        };
        if let Some(gw) = self.gateways.get_mut(g) {
            gw.answer(token, status, &body);
        }
        self.after(now, g, None);
    }

    fn arrive(&mut self, now: u64, session: u32, turn: u32) {
        let Some(t) = self
            .work
            .get(session as usize)
            .and_then(|s| s.turns.get(turn as usize))
        else {
            return;
        };
        let (g, w) = self.route_of(session, turn);
        let Some(gw) = self.gateways.get(g) else {
            return;
        };
        gw.at(now);
        let Some(stream) = gw.request(w, t.features.clone()) else {
            return;
        };
        self.after(now, g, Some(w));
        let (endpoint, _) = routed_to(&stream);
        if let Some(c) = self.out.per_endpoint.get_mut(endpoint) {
            *c += 1;
        }
        let open = Open {
            gateway: g as u32,
            stream,
            session,
            turn,
            sent_us: now,
            first_us: None,
            last_us: now,
            itl: Vec::new(),
        };
        self.open_count += 1;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                if let Some(o) = self.open.get_mut(s as usize) {
                    *o = Some(open);
                }
                s
            }
            None => {
                self.open.push(Some(open));
                (self.open.len() - 1) as u32
            }
        };
        self.push(
            now + self.cfg.gateway.request_us,
            Kind::Admit,
            slot,
            endpoint as u32,
        );
    }

    fn admit(&mut self, now: u64, slot: u32, engine: u32) {
        let Some(o) = self.open.get(slot as usize).and_then(Option::as_ref) else {
            return;
        };
        let Some(t) = self
            .work
            .get(o.session as usize)
            .and_then(|s| s.turns.get(o.turn as usize))
        else {
            return;
        };
        let req = NewRequest {
            id: u64::from(slot),
            prompt: t.prompt.clone(),
            max_tokens: t.max_tokens,
            min_tokens: 0,
            ignore_eos: true,
        };
        let Some(e) = self.engines.get_mut(engine as usize) else {
            return;
        };
        if let Err(err) = e.add(req, now as f64 / 1e6) {
            self.finish(slot, now, 0, 0, 0, Some(err.to_string()));
            return;
        }
        self.kick(now, engine);
    }

    /// Starts a step on an idle engine with work (once per instant).
    fn kick(&mut self, now: u64, engine: u32) {
        let i = engine as usize;
        let idle = !self.busy.get(i).copied().unwrap_or(true);
        let pending = self.start_pending.get(i).copied().unwrap_or(true);
        if idle && !pending {
            if let Some(p) = self.start_pending.get_mut(i) {
                *p = true;
            }
            self.push(now, Kind::StepStart, engine, 0);
        }
    }

    fn step_start(&mut self, now: u64, engine: u32) {
        let i = engine as usize;
        if let Some(p) = self.start_pending.get_mut(i) {
            *p = false;
        }
        let Some(e) = self.engines.get_mut(i) else {
            return;
        };
        if !e.has_work() {
            return;
        }
        let out = e.step(now as f64 / 1e6);
        let rc = self.rates.get_mut(i).map(|(_, c)| c);
        let mut scratch = RateCounters::default();
        let rc = rc.unwrap_or(&mut scratch);
        let mut lifetime = None;
        for o in &out.observations {
            match o {
                Observation::BlockLifetime(s) => lifetime = Some(*s),
                Observation::BlockIdleBeforeEvict(s) => {
                    if let Some(l) = lifetime.take() {
                        self.out.block_residency.push((l, *s));
                    }
                }
                Observation::PrefillTime(s) => {
                    rc.prefill_seconds += s;
                    rc.prefill_requests += 1.0;
                }
                Observation::TimePerOutputToken(s) => {
                    rc.tpot_seconds += s;
                    rc.tpot_requests += 1.0;
                }
                Observation::Ttft(s) => {
                    self.out.counters.ttft_sum += s;
                    self.out.counters.ttft_count += 1.0;
                }
                Observation::PrefillKvComputed(n) => {
                    rc.prefill_tokens += f64::from(*n);
                    self.out.counters.prefill_computed += f64::from(*n)
                }
                _ => {}
            }
        }
        // A step that did nothing (everything waiting for blocks) still takes the fixed cost,
        // so time moves on.
        let dur = ((out.duration * 1e6).ceil() as u64).max(1);
        if let Some(b) = self.busy.get_mut(i) {
            *b = true;
        }
        if let Some(p) = self.pending.get_mut(i) {
            *p = out.events;
        }
        self.push(now + dur, Kind::StepEnd, engine, 0);
    }

    fn step_end(&mut self, now: u64, engine: u32) {
        let i = engine as usize;
        if let Some(b) = self.busy.get_mut(i) {
            *b = false;
        }
        let events = self
            .pending
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default();
        let at_client = now + self.cfg.gateway.response_us;
        for ev in events {
            match ev {
                Event::Token { id, .. } => {
                    if let Some(Some(o)) = self.open.get_mut(id as usize) {
                        match o.first_us {
                            None => {
                                o.first_us = Some(at_client);
                                // Envoy sees the response start: the request's prefill is done.
                                if let Some(gw) = self.gateways.get(o.gateway as usize) {
                                    gw.at(now);
                                    gw.first_bytes(&mut o.stream);
                                }
                            }
                            Some(_) if self.cfg.record_itl => {
                                o.itl.push(at_client - o.last_us);
                            }
                            Some(_) => {}
                        }
                        o.last_us = at_client;
                    }
                }
                Event::Finished { id, usage, .. } => {
                    self.finish(
                        id as u32,
                        now,
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        usage.cached_tokens,
                        None,
                    );
                }
            }
        }
        if self.engines.get(i).is_some_and(Engine::has_work) {
            self.kick(now, engine);
        }
    }

    /// A request's end at `now` (its last bytes leave the engine; the client has them
    /// `gateway.response_us` later).
    fn finish(
        &mut self,
        slot: u32,
        now: u64,
        prompt: u32,
        completion: u32,
        cached: u32,
        error: Option<String>,
    ) {
        let Some(mut o) = self.open.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.free_slots.push(slot);
        self.open_count -= 1;
        let at = now + self.cfg.gateway.response_us;
        // Read before the stream's end, which closes it.
        let (endpoint, predicted_blocks) = routed_to(&o.stream);
        if let Some(gw) = self.gateways.get(o.gateway as usize) {
            gw.at(now);
            let usage = error.is_none().then_some((prompt, completion, cached));
            gw.last_bytes(&mut o.stream, usage);
        }
        self.after(now, o.gateway as usize, None);
        self.out.records.push(SimRecord {
            session: o.session,
            turn: o.turn,
            endpoint: endpoint as u32,
            sent_us: o.sent_us,
            ttft_us: o.first_us.map(|f| f - o.sent_us),
            e2e_us: at - o.sent_us,
            itl_us: o.itl,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            predicted_blocks,
            error,
        });
        // The session's next turn, after the think time.
        let next = o.turn + 1;
        if let Some(s) = self.work.get(o.session as usize) {
            if (next as usize) < s.turns.len() {
                let delay = self.send_delay();
                self.push(at + s.think_us + delay, Kind::Arrive, o.session, next);
            }
        }
    }

    fn poll(&mut self, now: u64) {
        let mut sample = Vec::with_capacity(self.engines.len());
        self.sidecar_polls += 1;
        for (i, e) in self.engines.iter().enumerate() {
            let s = e.stats();
            let (prefill_tps, step_s) = match self.rates.get_mut(i) {
                Some((r, c)) => {
                    r.observe(*c);
                    (r.prefill_tps(), r.step_s())
                }
                None => (0.0, 0.0),
            };
            if let Some(l) = self.sidecar.get_mut(i) {
                *l = (
                    EngineLoad {
                        waiting: s.waiting as f64,
                        running: s.running as f64,
                        kv_usage: s.kv_usage,
                        prefill_tps,
                        step_s,
                        scraped_at_ms: 0,
                    },
                    now.max(1),
                );
            }
            sample.push((s.waiting + s.running) as u32);
        }
        self.out.queue_samples.push((now, sample));
    }

    fn busy_anywhere(&self) -> bool {
        self.open_count > 0
    }
}

/// Simulates `work` under `cfg`.
pub fn simulate(cfg: &SimConfig, work: &[PreparedSession]) -> SimOutput {
    let n = cfg.filter.endpoints.len().max(1);
    let replicas = cfg.gateways.max(1);
    let fleet_sync_us = cfg.fleet_sync_us.filter(|_| replicas > 1);
    let config = gateway::replica_config(&cfg.filter, &cfg.settings, fleet_sync_us);
    let gateways: Vec<Gateway> = (0..replicas)
        .filter_map(|g| Gateway::start(&config, g, cfg.seed))
        .collect();
    let mut sim = Sim {
        cfg,
        work,
        queue: BinaryHeap::new(),
        seq: 0,
        engines: (0..n)
            .map(|_| {
                let mut e = Engine::new(cfg.engine.clone());
                if let Some(rate) = cfg.kv_residency_sample {
                    // A rate outside (0, 1] follows nothing, as vLLM disables the metrics.
                    let _ = e.track_block_residency(rate);
                }
                e
            })
            .collect(),
        busy: vec![false; n],
        start_pending: vec![false; n],
        pending: vec![Vec::new(); n],
        open: Vec::new(),
        open_count: 0,
        free_slots: Vec::new(),
        gateways,
        callouts: Vec::new(),
        fleet: FleetLog::default(),
        sidecar: vec![
            (
                EngineLoad {
                    waiting: 0.0,
                    running: 0.0,
                    kv_usage: 0.0,
                    prefill_tps: 0.0,
                    step_s: 0.0,
                    scraped_at_ms: 0,
                },
                0,
            );
            n
        ],
        sidecar_polls: 0,
        rates: vec![Default::default(); n],
        jitter: Rng::new(cfg.seed ^ 0x5eed_de1a_7c11_e4e7),
        out: SimOutput {
            records: Vec::with_capacity(kvroute_traces_requests(work)),
            counters: EngineCounters::default(),
            per_endpoint: vec![0; n],
            events: 0,
            end_us: 0,
            queue_samples: Vec::new(),
            gateway_counters: Default::default(),
            block_residency: Vec::new(),
        },
    };
    for (i, s) in work.iter().enumerate() {
        if !s.turns.is_empty() {
            let delay = sim.send_delay();
            sim.push(s.start_us + delay, Kind::Arrive, i as u32, 0);
        }
    }
    let poll_us = sim.poll_us();
    // The sidecar has polled once before the run starts.
    sim.poll(0);
    sim.out.queue_samples.clear();
    sim.push(poll_us, Kind::Poll, 0, 0);
    // Each replica's service ticks, their phases spread over one period.
    for g in 0..sim.gateways.len() {
        let tick = sim.gateways.get(g).map_or(1000, |gw| gw.tick_us.max(1));
        let phase = tick * (g as u64 + 1) / sim.gateways.len() as u64;
        sim.push(phase, Kind::ServiceTick, g as u32, 0);
        sim.after(0, g, None);
    }
    let mut remaining_arrivals = work.iter().filter(|s| !s.turns.is_empty()).count();
    while let Some(Reverse(ev)) = sim.queue.pop() {
        sim.out.events += 1;
        let now = ev.at;
        // Periodic events stop once nothing is left to do, so the run ends.
        let active = remaining_arrivals > 0 || sim.busy_anywhere();
        match ev.kind {
            Kind::Arrive => {
                if ev.b == 0 {
                    remaining_arrivals -= 1;
                }
                sim.arrive(now, ev.a, ev.b);
            }
            Kind::Admit => sim.admit(now, ev.a, ev.b),
            Kind::StepStart => sim.step_start(now, ev.a),
            Kind::StepEnd => sim.step_end(now, ev.a),
            Kind::Poll => {
                if !active {
                    continue;
                }
                sim.poll(now);
                sim.push(now + poll_us, Kind::Poll, 0, 0);
            }
            Kind::ServiceTick => {
                if !active {
                    continue;
                }
                let g = ev.a as usize;
                let Some(gw) = sim.gateways.get_mut(g) else {
                    continue;
                };
                gw.at(now);
                gw.service.on_tick();
                let next = now + gw.tick_us.max(1);
                sim.after(now, g, None);
                sim.push(next, Kind::ServiceTick, ev.a, 0);
            }
            Kind::Answer => sim.answer(now, ev.a),
            Kind::QueueReady => {
                let g = ev.a as usize;
                if let Some(gw) = sim.gateways.get_mut(g) {
                    gw.at(now);
                    gw.wake();
                }
                sim.after(now, g, None);
            }
            Kind::WorkerTick => {
                let (g, w) = (ev.a as usize, ev.b as usize);
                if let Some(gw) = sim.gateways.get_mut(g) {
                    if let Some(p) = gw.tick_pending.get_mut(w) {
                        *p = false;
                    }
                    gw.at(now);
                    if let Some(worker) = gw.workers.get(w) {
                        worker.on_tick();
                    }
                }
                sim.after(now, g, None);
            }
        }
        sim.out.end_us = now;
    }
    for gw in &sim.gateways {
        for m in gw.host.metrics() {
            if m.kind == kvroute_control::MetricKind::Counter {
                *sim.out.gateway_counters.entry(m.name).or_default() += m.value;
            }
        }
    }
    for e in &sim.engines {
        let s = e.stats();
        sim.out.counters.hits += s.prefix_cache_hits as f64;
        sim.out.counters.queries += s.prefix_cache_queries as f64;
        sim.out.counters.prompt_tokens += s.prompt_tokens as f64;
        sim.out.counters.preemptions += s.preemptions as f64;
    }
    sim.out
}

fn kvroute_traces_requests(work: &[PreparedSession]) -> usize {
    work.iter().map(|s| s.turns.len()).sum()
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests;
