//! kvroute-sim: a deterministic discrete-event simulation of N engines behind kvroute.
//!
//! It runs the same code as the live stack, not copies of it:
//! - the engines are the emulator's engine model ([`kvroute_engine::engine::Engine`]: vLLM's
//!   block pool, prefix cache, eviction and V1 scheduler, the profile's latency model), fed the
//!   token ids the emulator's server would compute for the same chat;
//! - the router is kvroute-core's: request features from the same canonical prompt text, the same
//!   policies through [`kvroute_core::router::decide`], the same bounded [`Directory`], published to
//!   the deciding side through the same state encoding ([`kvroute_core::state`]) at the configured
//!   publish interval;
//! - the workloads are kvroute-traces' [`Session`]s, as the replayer runs them: each turn resends
//!   the history, the next turn leaves a think time after the response ends.
//!
//! What it models besides: the freshness of the router's state (the sidecar polls the engines
//! every `sidecar_poll_us`; the router takes the sidecar's snapshot every `load_refresh_ms`; the
//! directory is republished every `publish_interval_ms`), gateway in-flight counts, the
//! gateway's per-request cost (a fixed delay on the request path and on the response path), and
//! the client's send delay: a real client sends a turn a little after it means to (timer
//! granularity, scheduling), by a random amount. That jitter reorders sends that are close, and a
//! policy whose outcome depends on the order of decisions (round_robin's parity) samples a
//! different interleaving in every realisation; the simulator draws it from a measured
//! distribution, so its router seeds sample interleavings as live repeats do.
//!
//! Time is integer microseconds. Events are ordered by (time, rank, sequence number) — step ends
//! first, then state refreshes, arrivals, engine admissions, and step starts last, so a request
//! admitted at the instant a step ends joins the next step as it would in the live engine loop.
//! Random draws come from one seeded generator. Same inputs and seed, same output, byte for byte.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use kvroute_core::config::PublishInterval;
use kvroute_core::directory::{Directory, EmptyIndex, PrefixIndex};
use kvroute_core::rates::{RateCounters, RateEstimator};
use kvroute_core::request::{Content, Message, ParsedRequest, Prompt};
use kvroute_core::router::{decide, features, Inputs, RequestFeatures};
use kvroute_core::state::{
    encode, DirectorySection, EndpointStatus, EngineLoad, PublishedState, StateHeader,
};
use kvroute_core::tokens::CharsPerToken;
use kvroute_core::{FilterConfig, PolicySettings};
use kvroute_engine::engine::{Engine, EngineConfig, Event, NewRequest, Observation};
use kvroute_engine::tokenizer::{encode_chat, filler_token, ChatMessage};
use kvroute_traces::rng::Rng;
use kvroute_traces::Session;
use serde::{Deserialize, Serialize};

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
            send_delay_us: Vec::new(),
            seed: 1,
            record_itl: true,
            gateways: 1,
            fleet_sync_us: None,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    StepEnd = 0,
    Poll = 1,
    Refresh = 2,
    Publish = 3,
    Arrive = 4,
    Admit = 5,
    StepStart = 6,
    /// A gateway's fleet exchange (`a`: the gateway).
    Sync = 7,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Ev {
    at: u64,
    kind: Kind,
    seq: u64,
    /// Session (Arrive), request (Admit) or engine (steps).
    a: u32,
    /// Turn (Arrive), engine (Admit).
    b: u32,
}

/// A request between its decision and its end.
#[derive(Debug)]
struct Open {
    gateway: u32,
    session: u32,
    turn: u32,
    endpoint: u32,
    sent_us: u64,
    first_us: Option<u64>,
    last_us: u64,
    itl: Vec<u64>,
    predicted_blocks: u32,
    blocks: u32,
    /// Prefill work (tokens, attention counted) the router counts as still to do, until the first
    /// token.
    prefill_tokens: i64,
}

/// A gateway's own in-flight counts plus the other gateways' (as of its last fleet exchange).
fn with_remote<'a>(local: &'a [i64], remote: Option<&Vec<i64>>) -> std::borrow::Cow<'a, [i64]> {
    match remote.filter(|r| !r.is_empty()) {
        Some(r) => local.iter().zip(r).map(|(a, b)| a + b).collect(),
        None => std::borrow::Cow::Borrowed(local),
    }
}

/// One gateway replica's view: what the live filter keeps per Envoy.
struct Gateway {
    directory: Directory,
    published: Option<PublishedState>,
    inflight: Vec<i64>,
    inflight_blocks: Vec<i64>,
    inflight_prefill: Vec<i64>,
    /// The other gateways' in-flight counts as of this gateway's last exchange (requests, blocks,
    /// prefill per endpoint); empty without a fleet.
    remote: [Vec<i64>; 3],
    /// Decisions (session, turn, endpoint) made here since the last exchange.
    outbox: Vec<(u32, u32, u32)>,
    /// Entries of the fleet log read so far.
    cursor: usize,
    /// Characters per engine token measured from the responses, and the ratio the directory's
    /// capacities are sized at (the state service's rule, [`CharsPerToken`]).
    chars: CharsPerToken,
    chars_per_token: f64,
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
    /// The fleet's log: (gateway, session, turn, endpoint), in order.
    log: Vec<(u32, u32, u32, u32)>,
    sidecar: Vec<EngineLoad>,
    status: Vec<EndpointStatus>,
    /// The sidecar's measured rates per engine, and the counters it measures them from.
    rates: Vec<(RateEstimator, RateCounters)>,
    /// When the directory was last published, us.
    published_at_us: u64,
    rng: Rng,
    /// The send delays' draws, apart from the router's.
    jitter: Rng,
    decisions: u64,
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

    fn publish(&mut self) {
        for g in &mut self.gateways {
            let section = match self.cfg.settings.publish_interval {
                PublishInterval::Never => DirectorySection::empty(),
                _ => DirectorySection::of(&g.directory),
            };
            let header = StateHeader {
                version: self.seq,
                published_at_ms: 0,
                settings: self.cfg.settings.clone(),
                endpoints: self.status.clone(),
                directory_as_of_ms: 0,
                decisions_recorded: self.decisions,
                stale: false,
                sessions: g.directory.session_stats().cloned().unwrap_or_default(),
            };
            g.published = PublishedState::decode(encode(&header, &section)).ok();
        }
    }

    /// The gateway a request goes to: one of them at random (a hash of its session and turn, so
    /// the router's own draws stay as with one gateway).
    fn gateway_of(&self, session: u32, turn: u32) -> usize {
        let n = self.gateways.len();
        if n < 2 {
            return 0;
        }
        let key = (u64::from(session) << 32 | u64::from(turn)) ^ self.cfg.seed.rotate_left(17);
        (kvroute_traces::rng::mix(key) % n as u64) as usize
    }

    /// Gateway `g`'s fleet exchange: its decisions since the last one join the log; the other
    /// gateways' entries since its cursor are applied to its directory, in the log's order; it
    /// leaves its in-flight counts and takes the others'.
    fn sync(&mut self, g: usize) {
        let Some(gw) = self.gateways.get_mut(g) else {
            return;
        };
        let out = std::mem::take(&mut gw.outbox);
        self.log
            .extend(out.into_iter().map(|(s, t, e)| (g as u32, s, t, e)));
        let from = std::mem::replace(&mut gw.cursor, self.log.len());
        for &(src, s, t, e) in self.log.get(from..).unwrap_or_default() {
            if src as usize == g {
                continue;
            }
            if let Some(turn) = self
                .work
                .get(s as usize)
                .and_then(|w| w.turns.get(t as usize))
            {
                gw.directory
                    .record(e as usize, &turn.features.blocks, turn.features.session);
            }
        }
        let n = gw.inflight.len();
        let mut remote = [vec![0i64; n], vec![0i64; n], vec![0i64; n]];
        for (i, other) in self.gateways.iter().enumerate() {
            if i == g {
                continue;
            }
            for (k, local) in [
                &other.inflight,
                &other.inflight_blocks,
                &other.inflight_prefill,
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(r) = remote.get_mut(k) {
                    r.iter_mut().zip(local).for_each(|(a, b)| *a += b);
                }
            }
        }
        if let Some(gw) = self.gateways.get_mut(g) {
            gw.remote = remote;
        }
    }

    fn arrive(&mut self, now: u64, session: u32, turn: u32) {
        let Some(t) = self
            .work
            .get(session as usize)
            .and_then(|s| s.turns.get(turn as usize))
        else {
            return;
        };
        let g = self.gateway_of(session, turn);
        let Some(gw) = self.gateways.get(g) else {
            return;
        };
        let live: &dyn PrefixIndex = match (&self.cfg.settings.publish_interval, &gw.published) {
            (PublishInterval::EveryDecision, _) => &gw.directory,
            (_, Some(p)) => p,
            (_, None) => &EmptyIndex,
        };
        // With a fleet, the other gateways' requests (as of the last exchange) count too.
        let (inflight, inflight_blocks, inflight_prefill) = (
            with_remote(&gw.inflight, gw.remote.first()),
            with_remote(&gw.inflight_blocks, gw.remote.get(1)),
            with_remote(&gw.inflight_prefill, gw.remote.get(2)),
        );
        let directory_age_ms = match self.cfg.settings.publish_interval {
            PublishInterval::Millis(_) => now.saturating_sub(self.published_at_us) / 1000,
            _ => 0,
        };
        let inputs = Inputs {
            endpoints: &self.cfg.filter.endpoints,
            status: &self.status,
            inflight: &inflight,
            inflight_blocks: &inflight_blocks,
            inflight_prefill: &inflight_prefill,
            chars_per_token: self.cfg.filter.chars_per_token,
            spec: self.cfg.filter.block_spec(),
            directory_age_ms,
            settings: &self.cfg.settings,
            seq: self.decisions,
            rand: self.rng.next_u64(),
        };
        let d = decide(&t.features, live, &inputs, None);
        let prefill_tokens = i64::from(d.prefill_work);
        let fleet = self.cfg.fleet_sync_us.is_some() && self.gateways.len() > 1;
        let Some(gw) = self.gateways.get_mut(g) else {
            return;
        };
        if let Some(c) = gw.inflight_prefill.get_mut(d.endpoint) {
            *c += prefill_tokens;
        }
        self.decisions += 1;
        gw.directory
            .record(d.endpoint, &t.features.blocks, t.features.session);
        if fleet {
            gw.outbox.push((session, turn, d.endpoint as u32));
        }
        if let Some(c) = gw.inflight.get_mut(d.endpoint) {
            *c += 1;
        }
        if let Some(c) = gw.inflight_blocks.get_mut(d.endpoint) {
            *c += i64::from(d.total_blocks);
        }
        if let Some(c) = self.out.per_endpoint.get_mut(d.endpoint) {
            *c += 1;
        }
        let open = Open {
            gateway: g as u32,
            session,
            turn,
            endpoint: d.endpoint as u32,
            sent_us: now,
            first_us: None,
            last_us: now,
            itl: Vec::new(),
            predicted_blocks: d.predicted_blocks,
            blocks: d.total_blocks,
            prefill_tokens,
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
            d.endpoint as u32,
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
            let done = now + self.cfg.gateway.response_us;
            self.finish(slot, done, 0, 0, 0, Some(err.to_string()));
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
        for o in &out.observations {
            match o {
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
                                if let Some(c) = self
                                    .gateways
                                    .get_mut(o.gateway as usize)
                                    .and_then(|g| g.inflight_prefill.get_mut(o.endpoint as usize))
                                {
                                    *c -= std::mem::take(&mut o.prefill_tokens);
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
                        at_client,
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

    fn finish(
        &mut self,
        slot: u32,
        at: u64,
        prompt: u32,
        completion: u32,
        cached: u32,
        error: Option<String>,
    ) {
        let Some(o) = self.open.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.free_slots.push(slot);
        self.open_count -= 1;
        if let Some(gw) = self.gateways.get_mut(o.gateway as usize) {
            // The engine's reported prompt tokens against the prompt's bytes, where the response
            // carries usage.
            if let Some(f) = self
                .work
                .get(o.session as usize)
                .and_then(|s| s.turns.get(o.turn as usize))
                .map(|t| &t.features)
                .filter(|f| f.usage_expected && error.is_none())
            {
                gw.chars.add(f.prompt_bytes, u64::from(prompt));
            }
            let e = o.endpoint as usize;
            if let Some(c) = gw.inflight.get_mut(e) {
                *c -= 1;
            }
            if let Some(c) = gw.inflight_blocks.get_mut(e) {
                *c -= i64::from(o.blocks);
            }
            if let Some(c) = gw.inflight_prefill.get_mut(e) {
                *c -= o.prefill_tokens;
            }
        }
        self.out.records.push(SimRecord {
            session: o.session,
            turn: o.turn,
            endpoint: o.endpoint,
            sent_us: o.sent_us,
            ttft_us: o.first_us.map(|f| f - o.sent_us),
            e2e_us: at - o.sent_us,
            itl_us: o.itl,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            predicted_blocks: o.predicted_blocks,
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
                *l = EngineLoad {
                    waiting: s.waiting as f64,
                    running: s.running as f64,
                    kv_usage: s.kv_usage,
                    prefill_tps,
                    step_s,
                    scraped_at_ms: now / 1000 + 1,
                };
            }
            sample.push((s.waiting + s.running) as u32);
        }
        self.out.queue_samples.push((now, sample));
    }

    fn refresh(&mut self) {
        // The state service's tick: capacities follow the measured chars per token.
        let kv_tokens = u64::from(self.cfg.engine.num_gpu_blocks * self.cfg.engine.block_size);
        for gw in &mut self.gateways {
            if let Some(r) = gw.chars.update(gw.chars_per_token) {
                gw.chars_per_token = r;
                let blocks = self.cfg.filter.blocks_for_tokens_at(kv_tokens, r);
                for i in 0..self.cfg.filter.endpoints.len() {
                    gw.directory.set_capacity(i, blocks);
                }
            }
        }
        for (st, l) in self.status.iter_mut().zip(&self.sidecar) {
            *st = EndpointStatus {
                healthy: true,
                engine: Some(*l),
            };
        }
    }

    fn busy_anywhere(&self) -> bool {
        self.open_count > 0
    }
}

/// Simulates `work` under `cfg`.
pub fn simulate(cfg: &SimConfig, work: &[PreparedSession]) -> SimOutput {
    let n = cfg.filter.endpoints.len().max(1);
    let capacity = cfg
        .filter
        .blocks_for_tokens(u64::from(cfg.engine.num_gpu_blocks * cfg.engine.block_size));
    let mut sim = Sim {
        cfg,
        work,
        queue: BinaryHeap::new(),
        seq: 0,
        engines: (0..n).map(|_| Engine::new(cfg.engine.clone())).collect(),
        busy: vec![false; n],
        start_pending: vec![false; n],
        pending: vec![Vec::new(); n],
        open: Vec::new(),
        open_count: 0,
        free_slots: Vec::new(),
        gateways: (0..cfg.gateways.max(1))
            .map(|_| Gateway {
                directory: Directory::with_spec(
                    &vec![capacity; n],
                    cfg.filter.session_capacity,
                    &cfg.filter.block_spec(),
                ),
                published: None,
                inflight: vec![0; n],
                inflight_blocks: vec![0; n],
                inflight_prefill: vec![0; n],
                remote: Default::default(),
                outbox: Vec::new(),
                cursor: 0,
                chars: CharsPerToken::default(),
                chars_per_token: cfg.filter.chars_per_token,
            })
            .collect(),
        log: Vec::new(),
        sidecar: vec![
            EngineLoad {
                waiting: 0.0,
                running: 0.0,
                kv_usage: 0.0,
                prefill_tps: 0.0,
                step_s: 0.0,
                scraped_at_ms: 1,
            };
            n
        ],
        status: vec![EndpointStatus::default(); n],
        rates: vec![Default::default(); n],
        published_at_us: 0,
        rng: Rng::new(cfg.seed),
        jitter: Rng::new(cfg.seed ^ 0x5eed_de1a_7c11_e4e7),
        decisions: 0,
        out: SimOutput {
            records: Vec::with_capacity(kvroute_traces_requests(work)),
            counters: EngineCounters::default(),
            per_endpoint: vec![0; n],
            events: 0,
            end_us: 0,
            queue_samples: Vec::new(),
        },
    };
    for (i, s) in work.iter().enumerate() {
        if !s.turns.is_empty() {
            let delay = sim.send_delay();
            sim.push(s.start_us + delay, Kind::Arrive, i as u32, 0);
        }
    }
    let poll_us = cfg.sidecar_poll_us.max(1_000);
    let refresh_us = u64::from(cfg.settings.load_refresh_ms.max(10)) * 1000;
    let publish_us = match cfg.settings.publish_interval {
        PublishInterval::Millis(ms) => Some(u64::from(ms.max(1)) * 1000),
        _ => None,
    };
    sim.refresh();
    sim.publish();
    sim.push(poll_us, Kind::Poll, 0, 0);
    sim.push(refresh_us, Kind::Refresh, 0, 0);
    if let Some(p) = publish_us {
        sim.push(p, Kind::Publish, 0, 0);
    }
    // Each gateway's exchanges, their phases spread over one period.
    let sync_us = cfg
        .fleet_sync_us
        .filter(|_| cfg.gateways > 1)
        .map(|s| s.max(1));
    if let Some(s) = sync_us {
        for g in 0..cfg.gateways {
            sim.push(
                s * (g as u64 + 1) / cfg.gateways as u64,
                Kind::Sync,
                g as u32,
                0,
            );
        }
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
            Kind::Refresh => {
                if !active {
                    continue;
                }
                sim.refresh();
                sim.push(now + refresh_us, Kind::Refresh, 0, 0);
            }
            Kind::Sync => {
                if !active {
                    continue;
                }
                sim.sync(ev.a as usize);
                if let Some(s) = sync_us {
                    sim.push(now + s, Kind::Sync, ev.a, 0);
                }
            }
            Kind::Publish => {
                if !active {
                    continue;
                }
                sim.publish();
                sim.published_at_us = now;
                if let Some(p) = publish_us {
                    sim.push(now + p, Kind::Publish, 0, 0);
                }
            }
        }
        sim.out.end_us = now;
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
