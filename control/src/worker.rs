//! The HTTP filter role: one [`Worker`] per worker VM, one [`Request`] per HTTP stream.

use std::cell::RefCell;
use std::rc::Rc;

use crate::host::{Host, LogLevel};
use crate::metrics::{self, Fallback, FilterMetrics, HostOp, StreamPhase};
use kvroute_core::config::PublishInterval;
use kvroute_core::directory::{EmptyIndex, PrefixIndex};
use kvroute_core::policy::{PickNote, PolicyKind};
use kvroute_core::request::{ApiKind, ParseError};
use kvroute_core::router::{self, Decision, Inputs, RequestFeatures};
use kvroute_core::state::{
    self, DecisionReport, EndpointStatus, Layered, PublishedOverlay, PublishedState,
};
use kvroute_core::FilterConfig;

/// Response header naming the endpoint the filter chose.
pub const RESPONSE_ENDPOINT_HEADER: &str = "x-kvroute-endpoint";
/// Envoy's request header for a per-try timeout, which ends at the response headers: set on
/// streamed requests (`FilterConfig::stream_start_timeout_ms`).
pub const PER_TRY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-per-try-timeout-ms";
/// Response header naming the policy that chose it.
pub const RESPONSE_POLICY_HEADER: &str = "x-kvroute-policy";
const CAS_RETRIES: usize = 16;
/// A decision report goes to the singleton at once unless one went less than this long ago; then it
/// waits in a batch that the worker's tick flushes, so under load the main thread wakes at most
/// once per interval per worker instead of once per request. With `publish_interval_ms=0` a report
/// that changes what the directory shows (blocks new to the endpoint, a session that moves) goes at
/// once, so the next decision can see it; one that only refreshes recency waits in the batch.
pub const REPORT_COALESCE_US: u64 = 2_000;
/// A batch larger than this is sent at once.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Per-VM state of the filter role.
#[derive(Debug)]
pub struct Worker<H: Host> {
    host: H,
    config: FilterConfig,
    metrics: FilterMetrics,
    state: RefCell<WorkerState>,
    /// Reports made within this long of the last one sent wait for the next batch (see
    /// [`Worker::report`]).
    coalesce_us: u64,
    /// The value of [`PER_TRY_TIMEOUT_HEADER`] for streamed requests (None: not set).
    stream_start_timeout: Option<String>,
}

/// The section of the in-flight value that holds each endpoint's down mark.
const DOWN_SECTION: usize = 3;

#[derive(Debug)]
struct WorkerState {
    version: Option<u64>,
    /// The version of the state that published the directory in `published`.
    dir_version: Option<u64>,
    published: Option<PublishedState>,
    /// The overlay published on top of that state, if any (see `state::OVERLAY_KEY`).
    overlay: Option<PublishedOverlay>,
    seq: u64,
    rng: u64,
    queue: Option<u32>,
    /// Gateway in-flight counters as last read: requests per endpoint, then blocks per endpoint,
    /// then prefill work (tokens, attention counted) still to do per endpoint.
    inflight: Vec<i64>,
    /// The compare-and-swap token of that read, so the routed request's increment can start
    /// from it instead of reading the counters again.
    inflight_cas: Option<u32>,
    /// The in-flight counts with the fleet's added, when a fleet is configured (reused).
    fleet_view: Vec<i64>,
    /// The decision-queue message being batched: its time (its first report's), then its reports
    /// (empty when none waits).
    batch: Vec<u8>,
    last_sent_us: u64,
}

impl WorkerState {
    /// The directory view decisions read: the published state with the overlay on top of it.
    fn view(&self) -> Option<Layered<'_>> {
        self.published.as_ref().map(|base| Layered {
            base,
            top: self.overlay.as_ref(),
        })
    }
}

impl<H: Host> Worker<H> {
    pub fn new(host: H, config: FilterConfig) -> Self {
        let metrics = FilterMetrics::define(&host, &config);
        let seed = host.now_us() ^ 0x9e37_79b9_7f4a_7c15;
        Self {
            host,
            metrics,
            state: RefCell::new(WorkerState {
                version: None,
                dir_version: None,
                published: None,
                overlay: None,
                seq: 0,
                rng: seed | 1,
                queue: None,
                inflight: Vec::new(),
                inflight_cas: None,
                fleet_view: Vec::new(),
                batch: Vec::new(),
                last_sent_us: 0,
            }),
            stream_start_timeout: (config.stream_start_timeout_ms > 0)
                .then(|| config.stream_start_timeout_ms.to_string()),
            config,
            coalesce_us: REPORT_COALESCE_US,
        }
    }

    /// This worker with reports coalesced over `us` instead of [`REPORT_COALESCE_US`]; 0 sends
    /// each at once. A host whose queue is a lock in process memory and that gives each worker no
    /// tick (the native module) sends at once: a batch would wait for the worker's next request.
    pub fn with_report_coalesce_us(mut self, us: u64) -> Self {
        self.coalesce_us = us;
        self
    }

    /// Re-reads the published state if its version changed, and the published directory if that
    /// changed too.
    fn refresh(&self, st: &mut WorkerState) {
        let (v, _) = self.host.shared_get(state::VERSION_KEY);
        let Some((version, as_of)) = v.as_deref().and_then(state::decode_version) else {
            return;
        };
        if Some(version) != st.version {
            let (blob, _) = self.host.shared_get(state::STATE_KEY);
            let header = match blob.map(PublishedState::decode) {
                Some(Ok(p)) => p.header,
                _ => {
                    self.metrics.host_error(&self.host, HostOp::StateRead);
                    return;
                }
            };
            let dir_version = v.as_deref().and_then(state::decode_directory_version);
            match st.published.as_mut() {
                // The same directory: only the header is new.
                Some(p) if dir_version.is_some() && dir_version == st.dir_version => {
                    p.header = header;
                }
                _ => {
                    let (blob, _) = self.host.shared_get(state::DIRECTORY_KEY);
                    match blob.map(|b| PublishedState::with_directory(header, b)) {
                        Some(Ok((p, d))) => {
                            st.published = Some(p);
                            st.dir_version = Some(d);
                            st.overlay = None;
                        }
                        _ => {
                            self.metrics.host_error(&self.host, HostOp::StateRead);
                            return;
                        }
                    }
                }
            }
            st.version = Some(version);
        }
        // The overlay of the directory's changes since that state, when one is named: read again
        // only when its sequence number moves (it holds every change since the state, so the
        // newest one is all a worker needs).
        let seq = v.as_deref().map_or(0, state::decode_overlay_seq);
        if seq == 0 {
            st.overlay = None;
        } else if st.overlay.as_ref().is_none_or(|o| o.seq < seq) {
            let (blob, _) = self.host.shared_get(state::OVERLAY_KEY);
            match blob.map(PublishedOverlay::decode) {
                // One for another directory (the service published a new one since the version
                // read) is dropped; the next request reads that directory.
                Some(Ok(o)) => st.overlay = (Some(o.base) == st.dir_version).then_some(o),
                _ => {
                    st.overlay = None;
                    self.metrics.host_error(&self.host, HostOp::StateRead);
                }
            }
        }
        // The directory may be known current later than the state's publish (recency-only
        // decisions since then).
        if let (Some(t), Some(p)) = (as_of, st.published.as_mut()) {
            if p.header.version == version && p.header.directory_as_of_ms != 0 {
                p.header.directory_as_of_ms = p.header.directory_as_of_ms.max(t);
            }
        }
    }

    fn next_rand(st: &mut WorkerState) -> u64 {
        // xorshift64*: seeded per VM; only p2c draws and ties read it.
        let mut x = st.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        st.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Decides for one request. `features` is None for the load-only fallback.
    fn decide(&self, features: Option<&RequestFeatures>, now_us: u64) -> Decision {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        self.refresh(st);
        let (value, cas) = self.host.shared_get(state::INFLIGHT_KEY);
        let n = self.config.endpoints.len();
        let mut counts = std::mem::take(&mut st.inflight);
        state::decode_inflight(
            value.as_deref().unwrap_or_default(),
            state::INFLIGHT_SECTIONS * n,
            &mut counts,
        );
        st.inflight_cas = cas;
        // With a fleet, the other replicas' requests count too (as of the last exchange), added
        // into a buffer the next decision reuses; `counts` stays this gateway's own for the swap.
        let mut fleet_view = std::mem::take(&mut st.fleet_view);
        let with_fleet = self.add_fleet_inflight(&counts, n, now_us / 1000, &mut fleet_view);
        let view = if with_fleet { &fleet_view } else { &counts };
        let (inflight, rest) = view.split_at(n.min(view.len()));
        let (inflight_blocks, rest) = rest.split_at(n.min(rest.len()));
        let (inflight_prefill, down) = rest.split_at(n.min(rest.len()));
        let rand = Self::next_rand(st);
        st.seq = st.seq.wrapping_add(1);
        let no_status: Vec<EndpointStatus> = Vec::new();
        let (settings, mut status) = match &st.published {
            Some(p) => (&p.header.settings, p.header.endpoints.as_slice()),
            None => (&self.config.defaults, no_status.as_slice()),
        };
        // An endpoint that refused a connection a moment ago is down for the policies until its
        // mark expires, whatever the sidecar last said.
        let now_ms = (now_us / 1000) as i64;
        let marked;
        if down.iter().any(|until| *until > now_ms) {
            marked = (0..n)
                .map(|i| {
                    let mut e = status.get(i).cloned().unwrap_or_default();
                    if down.get(i).is_some_and(|until| *until > now_ms) {
                        e.healthy = false;
                    }
                    e
                })
                .collect::<Vec<_>>();
            status = &marked;
        }
        // Round robin cycles across the whole gateway, not per worker.
        let seq = if settings.policy == PolicyKind::RoundRobin && features.is_some() {
            self.next_shared_seq().unwrap_or(st.seq)
        } else {
            st.seq
        };
        // The age of the directory view, which `predicted_ttft` weighs its matches by.
        // The age of the state this decision uses: of the directory snapshot when one was
        // published (the staleness knob), else of the state itself.
        let directory_age_ms = st.published.as_ref().map_or(0, |p| {
            let as_of = match p.header.directory_as_of_ms {
                0 => p.header.published_at_ms,
                t => t,
            };
            (now_us / 1000).saturating_sub(as_of)
        });
        let inputs = Inputs {
            endpoints: &self.config.endpoints,
            status,
            inflight,
            inflight_blocks,
            inflight_prefill,
            chars_per_token: self.config.chars_per_token,
            spec: self.config.block_spec(),
            directory_age_ms,
            settings,
            seq,
            rand,
        };
        let decision = match (features, st.view()) {
            (Some(f), Some(view)) => router::decide(f, &view, &inputs, None),
            (Some(f), None) => router::decide(f, &EmptyIndex, &inputs, None),
            (None, _) => router::decide_by_load(&inputs),
        };
        match &st.published {
            None => self.metrics.fallback(&self.host, Fallback::NoState),
            Some(p) => {
                let now_ms = now_us / 1000;
                self.host
                    .record(self.metrics.state_age_ms, directory_age_ms);
                // And the age of the engine load it used (the sidecar's scrape of that engine).
                if let Some(load) = p
                    .header
                    .endpoints
                    .get(decision.endpoint)
                    .and_then(|e| e.engine)
                {
                    self.host.record(
                        self.metrics.load_age_ms,
                        now_ms.saturating_sub(load.scraped_at_ms),
                    );
                }
                if p.header.stale {
                    self.metrics.fallback(&self.host, Fallback::StaleState);
                }
            }
        }
        st.inflight = counts;
        st.fleet_view = fleet_view;
        decision
    }

    /// `counts` with the other replicas' in-flight counts added (requests, blocks, prefill; as the
    /// state service last received them), into `out`. False, and `out` unused, without a fleet or
    /// without recent counts.
    fn add_fleet_inflight(
        &self,
        counts: &[i64],
        n: usize,
        now_ms: u64,
        out: &mut Vec<i64>,
    ) -> bool {
        if self.config.fleet.is_none() {
            return false;
        }
        let (value, _) = self.host.shared_get(state::FLEET_INFLIGHT_KEY);
        let sections = kvroute_core::fleet::INFLIGHT_SECTIONS * n;
        if !value.is_some_and(|v| state::decode_fleet_inflight(&v, sections, now_ms, out)) {
            return false;
        }
        for (r, c) in out.iter_mut().zip(counts) {
            *r = r.saturating_add(*c).max(0);
        }
        out.extend_from_slice(counts.get(sections..).unwrap_or_default());
        true
    }

    /// The next value of the gateway-wide round-robin sequence (compare-and-swap on shared data).
    fn next_shared_seq(&self) -> Option<u64> {
        for _ in 0..CAS_RETRIES {
            let (value, cas) = self.host.shared_get(state::RR_SEQ_KEY);
            let current = value
                .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
                .map_or(0, u64::from_le_bytes);
            let next = current.wrapping_add(1);
            match self
                .host
                .shared_set(state::RR_SEQ_KEY, &next.to_le_bytes(), cas)
            {
                Ok(true) => return Some(next),
                Ok(false) => continue,
                Err(_) => break,
            }
        }
        self.metrics.host_error(&self.host, HostOp::Inflight);
        None
    }

    /// Adds `delta` (requests, prefix blocks, prompt tokens to prefill) to an endpoint's gateway
    /// in-flight counts (compare-and-swap on shared data).
    fn add_inflight(&self, endpoint: usize, delta: [i64; state::INFLIGHT_SECTIONS]) {
        self.add_inflight_from(endpoint, delta, None);
    }

    /// Marks `endpoint` down until `until_ms` (it refused a connection: Envoy retried elsewhere).
    fn mark_down(&self, endpoint: usize, until_ms: u64) {
        let mut delta = [0i64; state::INFLIGHT_SECTIONS];
        if let Some(d) = delta.get_mut(DOWN_SECTION) {
            *d = i64::try_from(until_ms).unwrap_or(i64::MAX);
        }
        self.add_inflight(endpoint, delta);
    }

    /// Adds one response's prompt bytes and reported prompt tokens to the gateway's tokenizer
    /// sample ([`state::TOKENIZER_KEY`]), for the state service's measured chars per token.
    fn add_tokenizer_sample(&self, bytes: u64, tokens: u64) {
        for _ in 0..CAS_RETRIES {
            let (value, cas) = self.host.shared_get(state::TOKENIZER_KEY);
            let (b, t) = state::decode_tokenizer(value.as_deref().unwrap_or_default());
            let next = state::encode_tokenizer(b.saturating_add(bytes), t.saturating_add(tokens));
            match self.host.shared_set(state::TOKENIZER_KEY, &next, cas) {
                Ok(true) => return,
                Ok(false) => continue,
                Err(_) => break,
            }
        }
        self.metrics.host_error(&self.host, HostOp::Inflight);
    }

    /// [`Worker::add_inflight`] for the request just decided: its first attempt starts from the
    /// counters the decision read (one shared-data read fewer); if another worker changed them
    /// since, the swap fails and the loop reads them again.
    fn add_inflight_after_decision(&self, endpoint: usize, blocks: i64, prefill: i64) {
        let read = {
            let mut st = self.state.borrow_mut();
            st.inflight_cas.take().map(|cas| (st.inflight.clone(), cas))
        };
        self.add_inflight_from(endpoint, [1, blocks, prefill, 0], read);
    }

    fn add_inflight_from(
        &self,
        endpoint: usize,
        delta: [i64; state::INFLIGHT_SECTIONS],
        mut read: Option<(Vec<i64>, u32)>,
    ) {
        let n = self.config.endpoints.len();
        // Filled by the first attempt, from the decision's read or from shared data.
        let mut counts = Vec::new();
        for _ in 0..CAS_RETRIES {
            let cas = match read.take() {
                Some((last, cas)) => {
                    counts = last;
                    Some(cas)
                }
                None => {
                    let (value, cas) = self.host.shared_get(state::INFLIGHT_KEY);
                    state::decode_inflight(
                        value.as_deref().unwrap_or_default(),
                        state::INFLIGHT_SECTIONS * n,
                        &mut counts,
                    );
                    cas
                }
            };
            for (k, d) in delta.iter().enumerate() {
                if let Some(c) = counts.get_mut(k * n + endpoint) {
                    *c = if k == DOWN_SECTION {
                        (*c).max(*d)
                    } else {
                        (*c + d).max(0)
                    };
                }
            }
            match self
                .host
                .shared_set(state::INFLIGHT_KEY, &state::encode_inflight(&counts), cas)
            {
                Ok(true) => return,
                Ok(false) => continue,
                Err(_) => break,
            }
        }
        self.metrics.host_error(&self.host, HostOp::Inflight);
    }

    /// Sends a decision to the singleton, which records it in the directory: at once when every
    /// decision is published and this one changes what the published directory shows, else at
    /// once or in the next batch when one was sent less than [`REPORT_COALESCE_US`] ago.
    fn report(&self, report: &DecisionReport, predicted_blocks: u32, now_us: u64) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        // A report goes at once when every decision is published (or nothing is yet) and it
        // changes what the published directory shows; one that only refreshes recency (the
        // directory already places every block of the request on the chosen endpoint, and its
        // session there) waits for the batch like any report under an interval.
        let at_once = match st.view() {
            None => true,
            Some(view) => {
                view.base.header.settings.publish_interval == PublishInterval::EveryDecision
                    && (predicted_blocks as usize != report.blocks.len()
                        || report.session.is_some_and(|s| {
                            view.session_endpoint(s) != Some(usize::from(report.endpoint))
                        }))
            }
        };
        if st.batch.is_empty() {
            state::begin_report_message(&mut st.batch, now_us);
        }
        report.encode_into(&mut st.batch);
        if at_once
            || now_us.saturating_sub(st.last_sent_us) >= self.coalesce_us
            || st.batch.len() >= MAX_BATCH_BYTES + state::REPORT_MESSAGE_HEADER
        {
            self.flush(st, now_us);
        }
    }

    /// Sends the pending batch, if any.
    fn flush(&self, st: &mut WorkerState, now_us: u64) {
        if st.batch.is_empty() {
            return;
        }
        if st.queue.is_none() {
            st.queue = self.host.resolve_queue(state::DECISION_QUEUE);
        }
        let ok = st.queue.is_some_and(|q| self.host.enqueue(q, &st.batch));
        if !ok {
            st.queue = None;
            self.metrics.host_error(&self.host, HostOp::Enqueue);
        }
        st.batch.clear();
        st.last_sent_us = now_us;
    }

    /// Whether reports wait in a batch for the worker's tick.
    pub fn holds_reports(&self) -> bool {
        !self.state.borrow().batch.is_empty()
    }

    /// The worker's tick: sends what waited for the coalescing interval.
    pub fn on_tick(&self) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        if !st.batch.is_empty() {
            self.flush(st, self.host.now_us());
        }
    }
}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not a request the router handles.
    Passthrough,
    /// Waiting for the body.
    Buffering(ApiKind),
    /// Routed to this endpoint.
    Routed {
        endpoint: usize,
        /// Prefix blocks counted in flight for this request.
        blocks: u32,
        /// Prefill work (tokens) counted as still to do, until the response starts.
        prefill: i64,
        policy: PolicyKind,
        /// Blocks of the prompt the directory placed on the chosen endpoint.
        predicted_blocks: u32,
        counted: bool,
        /// Tokens the directory predicted the engine holds; None once compared (or unknown).
        predicted_tokens: Option<u64>,
        /// The prompt's canonical text bytes, until the engine's `usage.prompt_tokens` is read
        /// (None where the response carries no usage).
        prompt_bytes: Option<u64>,
    },
}

/// What a stream callback tells the proxy to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

/// One HTTP stream.
#[derive(Debug)]
pub struct Stream<H: Host> {
    worker: Rc<Worker<H>>,
    phase: Phase,
    session: Option<String>,
    /// Feature `bench-phases`: when the body was read and when it was parsed (0: not timed).
    marks: [u64; 2],
}

impl<H: Host> Stream<H> {
    pub fn new(worker: Rc<Worker<H>>) -> Self {
        Self {
            worker,
            phase: Phase::Passthrough,
            session: None,
            marks: [0; 2],
        }
    }

    /// Decides, sets the routing header and records everything. Called at most once per request,
    /// always while the request headers are still paused.
    fn route(&mut self, parsed: Result<RequestFeatures, Fallback>, t0: u64) {
        let w = self.worker.clone();
        let decision = match &parsed {
            Ok(f) => w.decide(Some(f), t0),
            Err(reason) => {
                w.metrics.fallback(&w.host, *reason);
                w.decide(None, t0)
            }
        };
        let decided = self.phase_clock();
        let Some(endpoint) = w.config.endpoints.get(decision.endpoint) else {
            return;
        };
        if !w
            .host
            .set_request_header(&w.config.route_header, Some(endpoint.cluster()))
        {
            // The request continues without the header and takes the fallback route.
            w.metrics.host_error(&w.host, HostOp::SetHeader);
            return;
        }
        // The chosen host, then the one a retry goes to, for Envoy's override_host policy.
        if let Some(addr) = &endpoint.address {
            let next = decision
                .fallback
                .and_then(|f| w.config.endpoints.get(f))
                .and_then(|e| e.address.as_deref());
            let value = match next {
                Some(n) => format!("{addr},{n}"),
                None => addr.clone(),
            };
            if !w
                .host
                .set_request_header(&w.config.host_header, Some(&value))
            {
                w.metrics.host_error(&w.host, HostOp::SetHeader);
            }
            // A stream whose headers do not come in time is on a stopped engine: Envoy retries it
            // on the fallback host (see `FilterConfig::stream_start_timeout_ms`).
            let streamed = parsed.as_ref().is_ok_and(|f| f.streamed);
            if let Some(timeout) = w
                .stream_start_timeout
                .as_deref()
                .filter(|_| next.is_some() && streamed)
            {
                if !w
                    .host
                    .set_request_header(PER_TRY_TIMEOUT_HEADER, Some(timeout))
                {
                    w.metrics.host_error(&w.host, HostOp::SetHeader);
                }
            }
        }
        // A fallback decision has no prompt, so it leaves nothing to prefill.
        let prefill = i64::from(decision.prefill_work);
        w.add_inflight_after_decision(decision.endpoint, i64::from(decision.total_blocks), prefill);
        // The prediction is compared with the engine's report only where the response will carry
        // one: a stream without `include_usage` has none, and its chunks are then never read.
        let usage_expected = parsed.as_ref().is_ok_and(|f| f.usage_expected);
        let predicted_tokens = usage_expected.then(|| {
            let per_block = f64::from(w.config.block_chars) / w.config.chars_per_token;
            let units = w.config.block_spec().units(decision.predicted_blocks);
            (units as f64 * per_block).round() as u64
        });
        let prompt_bytes = parsed
            .as_ref()
            .ok()
            .filter(|f| f.usage_expected)
            .map(|f| f.prompt_bytes);
        self.phase = Phase::Routed {
            endpoint: decision.endpoint,
            blocks: decision.total_blocks,
            prefill,
            policy: decision.policy,
            predicted_blocks: decision.predicted_blocks,
            counted: true,
            predicted_tokens,
            prompt_bytes,
        };
        if let Ok(f) = parsed {
            w.report(
                &DecisionReport {
                    endpoint: decision.endpoint as u16,
                    session: f.session,
                    blocks: f.blocks,
                },
                decision.predicted_blocks,
                t0,
            );
        }
        let m = &w.metrics;
        m.decision(&w.host, decision.policy, decision.endpoint);
        w.host
            .increment(m.predicted_blocks, i64::from(decision.predicted_blocks));
        w.host
            .increment(m.request_blocks, i64::from(decision.total_blocks));
        if decision.predicted_blocks > 0 {
            w.host.increment(m.predicted_hits, 1);
        }
        match decision.note {
            PickNote::Primary => {}
            PickNote::Overflow => w.host.increment(m.prefix_key_overflows, 1),
            PickNote::NoSession => m.fallback(&w.host, Fallback::NoSession),
            PickNote::NoPrefixKey => m.fallback(&w.host, Fallback::NoPrefixKey),
            PickNote::Imbalanced => w.host.increment(m.reference_rules[0], 1),
            PickNote::LowMatch => w.host.increment(m.reference_rules[1], 1),
            PickNote::Spill => w.host.increment(m.reference_rules[2], 1),
            PickNote::SessionSpread => w.host.increment(m.session_spread, 1),
            PickNote::IdleCopy => w.host.increment(m.idle_copies, 1),
        }
        if decision.no_healthy {
            m.fallback(&w.host, Fallback::NoHealthy);
        }
        if decision.engine_load_missing {
            m.fallback(&w.host, Fallback::EngineLoadMissing);
        }
        let end = w.host.now_us();
        w.host.record(m.decision_time_us, end.saturating_sub(t0));
        let [body, parsed] = self.marks;
        if body > 0 && parsed > 0 {
            m.phase(&w.host, metrics::Phase::Body, body.saturating_sub(t0));
            m.phase(&w.host, metrics::Phase::Parse, parsed.saturating_sub(body));
            m.phase(
                &w.host,
                metrics::Phase::Decide,
                decided.saturating_sub(parsed),
            );
            m.phase(&w.host, metrics::Phase::Route, end.saturating_sub(decided));
        }
    }

    fn route_body(&mut self, kind: ApiKind, size: usize) {
        let w = self.worker.clone();
        // The decision time covers all of the filter's work on the request: reading the body,
        // parsing, hashing, deciding, recording.
        let t0 = w.host.now_us();
        if cfg!(feature = "bench-floor") {
            if let Some(e) = w.config.endpoints.first() {
                w.host
                    .set_request_header(&w.config.route_header, Some(e.cluster()));
            }
            self.phase = Phase::Passthrough;
            return;
        }
        let body = if size == 0 {
            Some(Vec::new())
        } else {
            w.host.request_body(size)
        };
        self.marks[0] = self.phase_clock();
        let parsed = match body {
            None => Err(Fallback::NoBody),
            Some(b) => {
                router::body_features(kind, &b, self.session.as_deref(), w.config.block_spec())
                    .map_err(|e: ParseError| {
                        w.metrics.parse_error(&w.host, e);
                        Fallback::ParseError
                    })
            }
        };
        self.marks[1] = self.phase_clock();
        self.route(parsed, t0);
    }
}

/// Where a stream was routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// The endpoint's index (the one that served it, after a retry).
    pub endpoint: usize,
    /// Blocks of the prompt the directory placed on the endpoint chosen.
    pub predicted_blocks: u32,
}

/// The stream callbacks, one method each.
impl<H: Host> Stream<H> {
    /// Where this stream was routed, once it was.
    pub fn routed(&self) -> Option<Routed> {
        match self.phase {
            Phase::Routed {
                endpoint,
                predicted_blocks,
                ..
            } => Some(Routed {
                endpoint,
                predicted_blocks,
            }),
            _ => None,
        }
    }

    /// The request body's end, for a host that computed the body's features itself: what
    /// [`Stream::on_request_body`] does at the end of the stream once it has parsed the body. The
    /// simulator computes each turn's features once per workload, with the same
    /// [`router::features`] that the body parser ends in, and hands them here.
    pub fn on_request_features(&mut self, features: RequestFeatures) -> Flow {
        if let Phase::Buffering(_) = self.phase {
            let t0 = self.worker.host.now_us();
            self.route(Ok(features), t0);
        }
        Flow::Continue
    }

    /// The clock, read only in a `bench-phases` build (0 otherwise).
    fn phase_clock(&self) -> u64 {
        if cfg!(feature = "bench-phases") {
            self.worker.host.now_us()
        } else {
            0
        }
    }

    /// The clock in nanoseconds, read only in a `bench-phases` build (0 otherwise).
    fn stream_clock(&self) -> u64 {
        if cfg!(feature = "bench-phases") {
            self.worker.host.now_ns()
        } else {
            0
        }
    }

    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Flow {
        let t = self.stream_clock();
        let flow = self.request_headers(end_of_stream);
        let w = &self.worker;
        w.metrics.stream_phase(&w.host, StreamPhase::Headers, t);
        flow
    }

    pub fn on_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Flow {
        self.request_body(body_size, end_of_stream)
    }

    pub fn on_request_trailers(&mut self) -> Flow {
        if let Phase::Buffering(kind) = self.phase {
            let w = &self.worker;
            let size = w
                .host
                .request_body(w.config.max_body_bytes as usize)
                .map_or(0, |b| b.len());
            self.route_body(kind, size);
        }
        Flow::Continue
    }

    pub fn on_response_headers(&mut self) -> Flow {
        let t = self.stream_clock();
        self.response_headers();
        let w = &self.worker;
        w.metrics
            .stream_phase(&w.host, StreamPhase::ResponseHeaders, t);
        Flow::Continue
    }

    pub fn on_response_body(&mut self, body_size: usize) -> Flow {
        let t = self.stream_clock();
        self.response_body(body_size);
        let w = &self.worker;
        w.metrics
            .stream_phase(&w.host, StreamPhase::ResponseBody, t);
        Flow::Continue
    }

    /// The stream's end (Envoy's `on_log`), whether it completed or was reset.
    pub fn on_end(&mut self) {
        let t = self.stream_clock();
        self.end();
        let w = &self.worker;
        w.metrics.stream_phase(&w.host, StreamPhase::End, t);
    }

    fn request_headers(&mut self, end_of_stream: bool) -> Flow {
        let w = self.worker.clone();
        // One read of the whole map instead of one per header.
        let Some(headers) = w.host.request_headers() else {
            // A client must never pick the cluster itself.
            w.host.set_request_header(&w.config.route_header, None);
            w.metrics.host_error(&w.host, HostOp::ReadHeaders);
            w.host.increment(w.metrics.passthrough, 1);
            return Flow::Continue;
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_slice())
        };
        // A client must never pick the engine itself.
        for name in [&w.config.route_header, &w.config.host_header] {
            if header(name).is_some() {
                w.host.set_request_header(name, None);
            }
        }
        let kind = match (
            header(":method"),
            header(":path").and_then(|p| std::str::from_utf8(p).ok()),
        ) {
            (Some(b"POST"), Some(p)) => ApiKind::from_path(p),
            _ => None,
        };
        let Some(kind) = kind else {
            w.host.increment(w.metrics.passthrough, 1);
            return Flow::Continue;
        };
        w.host.increment(w.metrics.requests, 1);
        self.session = header(&w.config.session_header)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned);
        let declared = header("content-length").and_then(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        });
        drop(headers);
        if end_of_stream {
            w.metrics.parse_error(&w.host, ParseError::EmptyBody);
            self.route(Err(Fallback::ParseError), w.host.now_us());
            return Flow::Continue;
        }
        if declared.is_some_and(|n| n > u64::from(w.config.max_body_bytes)) {
            self.route(Err(Fallback::BodyTooLarge), w.host.now_us());
            return Flow::Continue;
        }
        self.phase = Phase::Buffering(kind);
        Flow::Pause
    }

    fn request_body(&mut self, body_size: usize, end_of_stream: bool) -> Flow {
        let Phase::Buffering(kind) = self.phase else {
            return Flow::Continue;
        };
        if body_size > self.worker.config.max_body_bytes as usize {
            let now = self.worker.host.now_us();
            self.route(Err(Fallback::BodyTooLarge), now);
            return Flow::Continue;
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        self.route_body(kind, body_size);
        Flow::Continue
    }

    fn response_headers(&mut self) {
        self.follow_retry();
        if let Phase::Routed {
            endpoint, policy, ..
        } = self.phase
        {
            let w = &self.worker;
            if let Some(e) = w.config.endpoints.get(endpoint) {
                w.host
                    .add_response_header(RESPONSE_ENDPOINT_HEADER, &e.name);
                w.host
                    .add_response_header(RESPONSE_POLICY_HEADER, policy.as_str());
            }
        }
    }

    /// When Envoy retried the request on another engine (the chosen one refused the connection,
    /// reset before responding, or left a stream's headers unanswered past
    /// `stream_start_timeout_ms`), counts it there from now on, marks the chosen one down for
    /// the policies ([`state::PASSIVE_DOWN_MS`]) and counts the retry.
    fn follow_retry(&mut self) {
        let Phase::Routed {
            endpoint,
            blocks,
            prefill,
            counted: true,
            ..
        } = self.phase
        else {
            return;
        };
        let w = self.worker.clone();
        let Some(chosen) = w
            .config
            .endpoints
            .get(endpoint)
            .and_then(|e| e.address.as_deref())
        else {
            return;
        };
        let Some(served) = w.host.upstream_address() else {
            return;
        };
        if served == chosen {
            return;
        }
        let Some(actual) = w
            .config
            .endpoints
            .iter()
            .position(|e| e.address.as_deref() == Some(served.as_str()))
        else {
            return;
        };
        let b = i64::from(blocks);
        w.add_inflight(endpoint, [-1, -b, -prefill, 0]);
        w.add_inflight(actual, [1, b, prefill, 0]);
        w.mark_down(endpoint, w.host.now_us() / 1000 + state::PASSIVE_DOWN_MS);
        if let Some(id) = w.metrics.retried.get(endpoint) {
            w.host.increment(*id, 1);
        }
        if let Phase::Routed { endpoint: e, .. } = &mut self.phase {
            *e = actual;
        }
    }

    /// Compares the prediction with what the engine reports (`cached_tokens` in the usage of a JSON
    /// response or of the last SSE event). Chunks are read, never held: the response streams on.
    fn response_body(&mut self, body_size: usize) {
        let w = self.worker.clone();
        // The response has started: the engine has prefilled this request.
        if let Phase::Routed {
            endpoint,
            prefill,
            counted: true,
            ..
        } = &mut self.phase
        {
            if *prefill > 0 {
                let p = std::mem::take(prefill);
                w.add_inflight(*endpoint, [0, 0, -p, 0]);
            }
        }
        let Phase::Routed {
            predicted_tokens,
            prompt_bytes,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if predicted_tokens.is_none() && prompt_bytes.is_none() {
            return;
        }
        let Some(chunk) = w.host.response_body(body_size) else {
            return;
        };
        if let Some(predicted) = *predicted_tokens {
            if let Some(reported) = router::find_cached_tokens(&chunk) {
                let m = &w.metrics;
                w.host.increment(m.prediction_reports, 1);
                w.host.increment(m.predicted_tokens, predicted as i64);
                w.host.increment(m.reported_tokens, reported as i64);
                w.host
                    .record(m.prediction_abs_error, predicted.abs_diff(reported));
                *predicted_tokens = None;
            }
        }
        if let Some(bytes) = *prompt_bytes {
            if let Some(tokens) = router::find_prompt_tokens(&chunk) {
                w.add_tokenizer_sample(bytes, tokens);
                *prompt_bytes = None;
            }
        }
    }

    fn end(&mut self) {
        if let Phase::Routed {
            endpoint,
            blocks,
            prefill,
            counted: true,
            ..
        } = self.phase
        {
            self.worker
                .add_inflight(endpoint, [-1, -i64::from(blocks), -prefill, 0]);
            self.phase = Phase::Passthrough;
        }
        if let Phase::Buffering(_) = self.phase {
            self.worker.host.log(
                LogLevel::Debug,
                "kvroute: stream ended before its body was complete",
            );
        }
    }
}
