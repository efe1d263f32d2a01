//! The singleton role: owns the directory and the settings, publishes the state.

use std::time::Duration;

use kvroute_core::fleet::{self, FleetResponse};

use crate::fleet::FleetSync;
use crate::host::{Host, LogLevel};
use crate::metrics::{HostOp, StateMetrics};
use kvroute_core::config::{PolicySettings, PublishInterval};
use kvroute_core::directory::{Changes, Directory, PrefixIndex};
use kvroute_core::policy::PolicyKind;
use kvroute_core::snapshot::Snapshot;
use kvroute_core::state::{
    self, DecisionReport, DirectorySection, EndpointStatus, EngineLoad, OverlayBuilder, StateHeader,
};
use kvroute_core::tokens::CharsPerToken;
use kvroute_core::FilterConfig;

/// Most queued messages (report batches) applied per queue wake-up (the rest wait for the next one).
const MAX_MESSAGES_PER_WAKE: usize = 1024;
/// Tick period: the finest publish interval and runtime poll granularity.
pub const TICK_MS: u64 = 20;

/// The state service's tick period under `config`: [`TICK_MS`], or the fleet's sync period where
/// that is shorter (the exchange runs on the tick, and its period is the replicas' sync lag).
pub fn tick_ms(config: &FilterConfig) -> u64 {
    config
        .fleet
        .as_ref()
        .map_or(TICK_MS, |f| u64::from(f.sync_ms).clamp(1, TICK_MS))
}

/// Where the state service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The `kvroute_state` bootstrap service: it owns its root context's tick.
    Bootstrap,
    /// Inside a filter root context that took the lease from a dead service: that context's tick
    /// drives it (see `standby`).
    Takeover,
}

#[derive(Debug)]
pub struct StateService<H: Host> {
    host: H,
    config: FilterConfig,
    metrics: StateMetrics,
    directory: Directory,
    settings: PolicySettings,
    status: Vec<EndpointStatus>,
    queue: u32,
    version: u64,
    decisions_recorded: u64,
    published_dir: DirectorySection,
    published_dir_at_ms: u64,
    dir_dirty: bool,
    /// Decisions were recorded since the last publish, but they changed nothing it shows.
    dir_touched: bool,
    /// The version of the state that published the directory now under `state::DIRECTORY_KEY`
    /// (0: none yet), and that value's size.
    dir_version: u64,
    dir_bytes: usize,
    /// Directory changes per recorded decision (a moving mean), and the decisions recorded when
    /// the journal was last taken: they size the overlay's bound (`state::overlay_bound`).
    changes_per_decision: f64,
    decisions_at_take: u64,
    /// Sequence number of the overlay published on top of that directory (0: none).
    overlay_seq: u64,
    /// Its entries: the directory's changes since that state.
    overlay: OverlayBuilder,
    /// The directory's journal counts changes from the directory section last published (so an
    /// overlay of them makes the published view current).
    journal_from_published: bool,
    poll_token: Option<u32>,
    poll_sent_ms: u64,
    last_runtime_errors: Vec<String>,
    gauges_dirty: bool,
    snapshot_token: Option<u32>,
    snapshot_sent_ms: u64,
    snapshot_ok_ms: u64,
    stale: bool,
    /// This service's lease id (see `state::LEASE_KEY`), when it last renewed, and whether it still
    /// holds the lease: one that lost it stands down for good.
    lease_id: u64,
    lease_renewed_ms: u64,
    active: bool,
    /// The exchange with the fleet's other replicas, when configured.
    fleet: Option<FleetSync>,
    /// Characters per engine token as measured ([`CharsPerToken`]), the workers' sample totals as
    /// last read, and the ratio the directory's capacities are sized at now.
    chars: CharsPerToken,
    tokenizer_read: (u64, u64),
    chars_per_token: f64,
    /// Each engine's KV capacity in tokens, as the sidecar last reported it.
    capacity_tokens: Vec<Option<u64>>,
}

/// Test-only fault: traps the singleton's VM while `kvroute.test_crash_singleton_before_ms` (a
/// wall-clock deadline in ms) is in the future, so a test can crash it once and watch what follows.
#[cfg(feature = "test-faults")]
#[allow(clippy::panic)]
fn crash_if_asked(runtime_json: &[u8], now_ms: u64) {
    let deadline = serde_json::from_slice::<serde_json::Value>(runtime_json)
        .ok()
        .and_then(|v| {
            v.pointer("/entries/kvroute.test_crash_singleton_before_ms/final_value")?
                .as_str()?
                .parse::<u64>()
                .ok()
        });
    if deadline.is_some_and(|d| now_ms < d) {
        panic!("kvroute: test fault: the state singleton crashes on request");
    }
}

impl<H: Host> StateService<H> {
    /// Starts the state service with lease id `lease_id`, taking the lease. Its version continues
    /// from the one published (so the workers see every publish as new after a takeover); the
    /// directory starts empty.
    pub fn start(host: H, config: FilterConfig, role: Role, lease_id: u64) -> Option<Self> {
        let Some(queue) = host.register_queue(state::DECISION_QUEUE) else {
            host.log(
                LogLevel::Critical,
                "kvroute: cannot register the decision queue",
            );
            return None;
        };
        let capacities: Vec<u32> = (0..config.endpoints.len())
            .map(|i| config.capacity_of(i))
            .collect();
        let n = config.endpoints.len();
        let now_ms = host.now_us() / 1000;
        let mut s = Self {
            metrics: StateMetrics::define(&host, &config),
            directory: Directory::with_spec(
                &capacities,
                config.session_capacity,
                &config.block_spec(),
            ),
            settings: config.defaults.clone(),
            status: vec![EndpointStatus::default(); n],
            queue,
            version: 0,
            decisions_recorded: 0,
            published_dir: DirectorySection::empty(),
            published_dir_at_ms: 0,
            dir_dirty: false,
            dir_touched: false,
            dir_version: 0,
            dir_bytes: 0,
            changes_per_decision: 0.0,
            decisions_at_take: 0,
            overlay_seq: 0,
            overlay: OverlayBuilder::default(),
            journal_from_published: false,
            poll_token: None,
            poll_sent_ms: 0,
            last_runtime_errors: Vec::new(),
            gauges_dirty: true,
            snapshot_token: None,
            snapshot_sent_ms: 0,
            snapshot_ok_ms: 0,
            // With a sidecar configured, the state is stale until its first snapshot arrives.
            stale: config.sidecar.is_some(),
            lease_id,
            lease_renewed_ms: now_ms,
            active: true,
            fleet: config.fleet.clone().map(|f| {
                let fp = fleet::fingerprint(&config.endpoints);
                FleetSync::new(f, lease_id, fp, config.defaults.directory_epoch)
            }),
            chars: CharsPerToken::default(),
            tokenizer_read: (0, 0),
            chars_per_token: config.chars_per_token,
            capacity_tokens: vec![None; n],
            config,
            host,
        };
        if s.host.shared_set(
            state::LEASE_KEY,
            &state::encode_lease(lease_id, s.lease_renewed_ms),
            None,
        ) != Ok(true)
        {
            s.metrics.host_error(&s.host, HostOp::Publish);
        }
        let (published, _) = s.host.shared_get(state::VERSION_KEY);
        s.version = published
            .as_deref()
            .and_then(state::decode_version)
            .map_or(0, |v| v.0);
        // Zeroed in-flight counters (kept if already there: a reloaded config keeps live counts).
        let (existing, _) = s.host.shared_get(state::INFLIGHT_KEY);
        if existing.is_none_or(|v| v.len() != 16 * n) {
            let _ = s.host.shared_set(
                state::INFLIGHT_KEY,
                &state::encode_inflight(&vec![0; state::INFLIGHT_SECTIONS * n]),
                None,
            );
        }
        let (sample, _) = s.host.shared_get(state::TOKENIZER_KEY);
        s.tokenizer_read = state::decode_tokenizer(sample.as_deref().unwrap_or_default());
        s.directory.set_journal_capacity(state::OVERLAY_CAP_CHANGES);
        s.publish(true);
        s.update_gauges();
        if role == Role::Bootstrap && !s.host.set_tick(Duration::from_millis(tick_ms(&s.config))) {
            s.host
                .log(LogLevel::Critical, "kvroute: cannot set the tick period");
            return None;
        }
        if role == Role::Takeover {
            s.host.increment(s.metrics.takeovers, 1);
        }
        s.host.log(
            LogLevel::Info,
            &format!(
                "kvroute: state service started ({}) with {n} endpoints, policy {}, from version {}",
                if role == Role::Bootstrap { "bootstrap" } else { "taken over by a filter VM" },
                s.settings.policy,
                s.version
            ),
        );
        Some(s)
    }

    /// Whether this service still holds the lease (one that lost it does nothing more).
    pub fn active(&self) -> bool {
        self.active
    }

    /// Renews the lease when due; stands down for good if another service holds it now.
    fn renew_lease(&mut self, now: u64) {
        if now.saturating_sub(self.lease_renewed_ms) < state::LEASE_RENEW_MS {
            return;
        }
        let (value, cas) = self.host.shared_get(state::LEASE_KEY);
        if state::lease(value.as_deref(), self.lease_id, now) == state::Lease::Held {
            self.host.log(
                LogLevel::Warn,
                "kvroute: another state service holds the lease now; this one stands down",
            );
            self.active = false;
            return;
        }
        // A CAS mismatch (another VM wrote it meanwhile) is looked at again on the next tick.
        if self.host.shared_set(
            state::LEASE_KEY,
            &state::encode_lease(self.lease_id, now),
            cas,
        ) == Ok(true)
        {
            self.lease_renewed_ms = now;
        }
    }

    fn now_ms(&self) -> u64 {
        self.host.now_us() / 1000
    }

    pub fn on_tick(&mut self) {
        let now = self.now_ms();
        self.renew_lease(now);
        if !self.active {
            return;
        }
        let poll_due =
            now.saturating_sub(self.poll_sent_ms) >= u64::from(self.config.runtime_poll_ms);
        // A poll that got no answer in 5 periods is given up (Envoy also times it out).
        let stuck =
            now.saturating_sub(self.poll_sent_ms) >= 5 * u64::from(self.config.runtime_poll_ms);
        if poll_due && (self.poll_token.is_none() || stuck) {
            self.poll_sent_ms = now;
            let timeout = Duration::from_millis(u64::from(self.config.runtime_poll_ms).max(50) * 4);
            self.poll_token = self.host.http_get(
                &self.config.admin_cluster,
                &self.config.admin_authority,
                "/runtime",
                timeout,
            );
            if self.poll_token.is_none() {
                self.metrics.host_error(&self.host, HostOp::RuntimePoll);
            }
        }
        if let PublishInterval::Millis(ms) = self.settings.publish_interval {
            if now.saturating_sub(self.published_dir_at_ms) >= u64::from(ms) {
                self.publish_due(now);
            }
        }
        self.confirm_current(now);
        self.pull_snapshot(now);
        self.exchange(now);
        self.mirror_inflight();
        self.measure_chars_per_token();
        self.update_gauges();
    }

    /// Takes the workers' new tokenizer samples; when the measured chars per token moved far
    /// enough from the one in use, resizes the directory's capacities that follow an engine's
    /// reported KV capacity.
    fn measure_chars_per_token(&mut self) {
        let (value, _) = self.host.shared_get(state::TOKENIZER_KEY);
        let (bytes, tokens) = state::decode_tokenizer(value.as_deref().unwrap_or_default());
        let (b0, t0) = self.tokenizer_read;
        if bytes < b0 || tokens < t0 {
            // Totals that went back (the key was reset): start from these.
            self.tokenizer_read = (bytes, tokens);
            return;
        }
        if tokens == t0 {
            return;
        }
        self.chars.add(bytes - b0, tokens - t0);
        self.tokenizer_read = (bytes, tokens);
        let Some(r) = self.chars.update(self.chars_per_token) else {
            return;
        };
        self.chars_per_token = r;
        for i in 0..self.capacity_tokens.len() {
            self.follow_capacity(i);
        }
        self.gauges_dirty = true;
    }

    /// Sizes endpoint `i`'s directory at its engine's reported KV capacity, if known, at the
    /// characters per token in use: the directory forgets roughly what that engine forgets.
    fn follow_capacity(&mut self, i: usize) {
        let Some(tokens) = self.capacity_tokens.get(i).copied().flatten() else {
            return;
        };
        let blocks = self
            .config
            .blocks_for_tokens_at(tokens, self.chars_per_token);
        if blocks as usize != self.directory.endpoint_capacity(i) {
            self.directory.set_capacity(i, blocks);
        }
    }

    /// Pulls the sidecar's snapshot when due; marks the state stale when none arrived in time.
    fn pull_snapshot(&mut self, now: u64) {
        let Some(sc) = &self.config.sidecar else {
            return;
        };
        let period = u64::from(self.settings.load_refresh_ms);
        let since = now.saturating_sub(self.snapshot_sent_ms);
        if since >= period && (self.snapshot_token.is_none() || since >= 5 * period.max(100)) {
            self.snapshot_sent_ms = now;
            let timeout = Duration::from_millis(u64::from(sc.stale_after_ms).max(50));
            let path = match self.settings.sidecar_poll_ms {
                0 => sc.path.clone(),
                ms => format!("{}?poll_interval_ms={ms}", sc.path),
            };
            self.snapshot_token = self
                .host
                .http_get(&sc.cluster, &sc.authority, &path, timeout);
            if self.snapshot_token.is_none() {
                self.metrics.host_error(&self.host, HostOp::SidecarPull);
            }
        }
        let fresh = self.snapshot_ok_ms > 0
            && now.saturating_sub(self.snapshot_ok_ms) <= u64::from(sc.stale_after_ms);
        if !fresh && !self.stale {
            self.host.log(
                LogLevel::Warn,
                "kvroute: sidecar snapshot missing or stale; routing on gateway load",
            );
            self.stale = true;
            for s in &mut self.status {
                *s = EndpointStatus::default();
            }
            self.publish(false);
        }
    }

    fn on_snapshot(&mut self, body_size: usize) {
        let body = match (
            self.host.call_response_status().as_deref(),
            self.host.call_response_body(body_size),
        ) {
            (Some("200"), Some(b)) => b,
            _ => {
                self.metrics.host_error(&self.host, HostOp::SidecarPull);
                return;
            }
        };
        let snapshot = match Snapshot::from_json(&body) {
            Ok(s) => s,
            Err(e) => {
                self.host.log(
                    LogLevel::Warn,
                    &format!("kvroute: bad sidecar snapshot: {e}"),
                );
                self.metrics.host_error(&self.host, HostOp::SidecarPull);
                return;
            }
        };
        self.host.increment(self.metrics.sidecar_pulls, 1);
        self.host.record(
            self.metrics.sidecar_poll_interval_ms,
            u64::from(snapshot.poll_interval_ms),
        );
        for (i, ep) in self.config.endpoints.iter().enumerate() {
            let Some(status) = self.status.get_mut(i) else {
                continue;
            };
            match snapshot.engines.iter().find(|e| e.name == ep.name) {
                Some(e) => {
                    *status = EndpointStatus {
                        healthy: e.healthy,
                        engine: (e.scraped_at_ms > 0).then_some(EngineLoad {
                            waiting: e.waiting,
                            running: e.running,
                            kv_usage: e.kv_usage,
                            prefill_tps: sane_rate(e.prefill_tps),
                            step_s: sane_rate(e.step_s),
                            scraped_at_ms: e.scraped_at_ms,
                        }),
                    };
                    // An endpoint without a configured capacity follows its engine's.
                    if let (Some(tokens), None) = (e.capacity_tokens, ep.capacity_blocks) {
                        if let Some(c) = self.capacity_tokens.get_mut(i) {
                            *c = Some(tokens);
                        }
                    }
                }
                // An engine the sidecar does not know: no load, health unknown.
                None => *status = EndpointStatus::default(),
            }
        }
        for i in 0..self.capacity_tokens.len() {
            self.follow_capacity(i);
        }
        self.snapshot_ok_ms = self.now_ms();
        if self.stale {
            self.host
                .log(LogLevel::Info, "kvroute: sidecar snapshot fresh again");
        }
        self.stale = false;
        self.publish(false);
    }

    fn mirror_inflight(&self) {
        let (value, _) = self.host.shared_get(state::INFLIGHT_KEY);
        let n = self.config.endpoints.len();
        let mut counts = Vec::new();
        state::decode_inflight(
            value.as_deref().unwrap_or_default(),
            state::INFLIGHT_SECTIONS * n,
            &mut counts,
        );
        for (id, c) in self.metrics.inflight.iter().zip(&counts) {
            self.host.record(*id, (*c).max(0) as u64);
        }
        let prefill = counts.get(2 * n..).unwrap_or_default();
        for (id, c) in self.metrics.queued_prefill.iter().zip(prefill) {
            self.host.record(*id, (*c).max(0) as u64);
        }
    }

    pub fn on_http_call_response(&mut self, token: u32, body_size: usize) {
        if !self.active {
            return;
        }
        if self.snapshot_token == Some(token) {
            self.snapshot_token = None;
            self.on_snapshot(body_size);
            return;
        }
        if self.fleet.as_ref().is_some_and(|f| f.token == Some(token)) {
            self.on_exchange(body_size);
            return;
        }
        if self.poll_token != Some(token) {
            return;
        }
        self.poll_token = None;
        self.host.increment(self.metrics.runtime_polls, 1);
        let body = match (
            self.host.call_response_status().as_deref(),
            self.host.call_response_body(body_size),
        ) {
            (Some("200"), Some(b)) => b,
            _ => {
                self.metrics.host_error(&self.host, HostOp::RuntimePoll);
                return;
            }
        };
        #[cfg(feature = "test-faults")]
        crash_if_asked(&body, self.now_ms());
        let Ok((settings, errors)) = self.config.defaults.with_runtime_json(&body) else {
            self.metrics.host_error(&self.host, HostOp::RuntimePoll);
            return;
        };
        self.host
            .record(self.metrics.runtime_invalid, errors.len() as u64);
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        if messages != self.last_runtime_errors {
            for m in &messages {
                self.host.log(
                    LogLevel::Warn,
                    &format!("kvroute: ignoring runtime value: {m}"),
                );
            }
            self.last_runtime_errors = messages;
        }
        if settings != self.settings {
            self.host.log(
                LogLevel::Info,
                &format!(
                    "kvroute: settings now policy={} alpha={} beta={} publish={:?}",
                    settings.policy, settings.alpha, settings.beta, settings.publish_interval
                ),
            );
            let mut dir_now = match settings.publish_interval {
                PublishInterval::Never => false,
                _ => self.settings.publish_interval == PublishInterval::Never,
            };
            if settings.directory_epoch != self.settings.directory_epoch {
                self.host.log(
                    LogLevel::Info,
                    &format!(
                        "kvroute: directory epoch {}: forgetting the directory",
                        settings.directory_epoch
                    ),
                );
                self.directory.clear();
                if let Some(f) = self.fleet.as_mut() {
                    f.new_epoch(settings.directory_epoch);
                }
                dir_now = true;
            }
            self.settings = settings;
            self.publish(dir_now);
        }
    }

    pub fn on_queue_ready(&mut self, queue: u32) {
        if queue != self.queue || !self.active {
            return;
        }
        let mut applied = 0usize;
        let mut changed = false;
        let mut messages = 0usize;
        while messages < MAX_MESSAGES_PER_WAKE {
            let Some(msg) = self.host.dequeue(queue) else {
                break;
            };
            messages += 1;
            let Some((from_us, batch)) = state::decode_report_message(&msg) else {
                self.metrics.host_error(&self.host, HostOp::BadReport);
                continue;
            };
            let (reports, leftover) = DecisionReport::decode_batch(batch);
            if leftover > 0 {
                self.metrics.host_error(&self.host, HostOp::BadReport);
            }
            if !reports.is_empty() {
                // How long the batch's oldest report waited to be applied: the worker's coalescing,
                // the queue's wake-up and this thread's other work.
                self.host.record(
                    self.metrics.report_delay_us,
                    self.host.now_us().saturating_sub(from_us),
                );
            }
            if let Some(f) = self.fleet.as_mut() {
                let well_formed = batch.get(..batch.len() - leftover).unwrap_or_default();
                let blocks = reports.iter().map(|r| r.blocks.len()).sum();
                let n = reports.len() as i64;
                if f.share(well_formed, blocks, self.host.now_us() / 1000) {
                    self.host.increment(self.metrics.fleet.reports_shared, n);
                } else {
                    self.host.increment(self.metrics.fleet.dropped_reports, n);
                }
            }
            for r in reports {
                changed |= self
                    .directory
                    .record(usize::from(r.endpoint), &r.blocks, r.session);
                self.decisions_recorded += 1;
                applied += 1;
            }
        }
        if applied == 0 {
            return;
        }
        self.host
            .increment(self.metrics.decisions_recorded, applied as i64);
        // Decisions that only refreshed recency leave the published view as it is: no publish
        // (the workers keep their copy), only the time it is current as of moves on.
        if changed {
            self.dir_dirty = true;
        } else {
            self.dir_touched = true;
        }
        if self.settings.publish_interval == PublishInterval::EveryDecision {
            self.publish_due(self.now_ms());
        }
    }

    /// Sends the fleet exchange when due: this replica's new reports, its cursor and its in-flight
    /// counts, to the sidecar, which keeps the fleet's log.
    fn exchange(&mut self, now: u64) {
        let Some(f) = self.fleet.as_ref() else {
            return;
        };
        if !f.due(now) {
            return;
        }
        let n = self.config.endpoints.len();
        let (value, _) = self.host.shared_get(state::INFLIGHT_KEY);
        let mut counts = Vec::new();
        state::decode_inflight(
            value.as_deref().unwrap_or_default(),
            fleet::INFLIGHT_SECTIONS * n,
            &mut counts,
        );
        let capacity: u64 = (0..n)
            .map(|i| self.directory.endpoint_capacity(i) as u64)
            .sum();
        let Some(f) = self.fleet.as_mut() else {
            return;
        };
        let body = f.request(now, capacity, counts);
        let timeout = Duration::from_millis(u64::from(f.config.sync_ms).max(100) * 10);
        f.token = self.host.http_call(
            &f.config.cluster,
            &f.config.authority,
            "POST",
            &f.config.path,
            Some(&body),
            timeout,
        );
        if f.token.is_none() {
            let kept = f.failed();
            self.fleet_failed(kept);
        }
    }

    fn fleet_failed(&mut self, kept: bool) {
        let m = &self.metrics.fleet;
        self.host.increment(m.errors, 1);
        self.host.record(m.connected, 0);
        if !kept {
            self.host.increment(m.dropped_reports, 1);
        }
    }

    /// The fleet's answer: the other replicas' decisions since the cursor, applied in the log's
    /// order, and their in-flight counts, for the workers.
    fn on_exchange(&mut self, body_size: usize) {
        let now = self.now_ms();
        let resp = match (
            self.host.call_response_status().as_deref(),
            self.host.call_response_body(body_size),
        ) {
            (Some("200"), Some(b)) => FleetResponse::decode(&b).ok(),
            _ => None,
        };
        let Some(f) = self.fleet.as_mut() else {
            return;
        };
        let Some(resp) = resp else {
            let was_connected = f.connected;
            let kept = f.failed();
            if was_connected {
                self.host.log(
                    LogLevel::Warn,
                    "kvroute: fleet log unreachable; routing on this replica's directory",
                );
            }
            self.fleet_failed(kept);
            return;
        };
        let was_connected = f.connected;
        f.answered(&resp);
        let m = &self.metrics.fleet;
        self.host.increment(m.exchanges, 1);
        self.host.record(m.connected, 1);
        self.host.record(m.pending_bytes, f.pending() as u64);
        if !was_connected {
            self.host.log(
                LogLevel::Info,
                &format!("kvroute: fleet log reachable (cursor {})", f.cursor()),
            );
        }
        let n = self.config.endpoints.len();
        let mut changed = false;
        let (mut reports, mut bad) = (0i64, 0i64);
        for e in &resp.entries {
            let (batch, leftover) = DecisionReport::decode_batch(&e.batch);
            bad += i64::from(leftover > 0);
            for r in batch {
                if usize::from(r.endpoint) >= n {
                    bad += 1;
                    continue;
                }
                changed |= self
                    .directory
                    .record(usize::from(r.endpoint), &r.blocks, r.session);
                reports += 1;
            }
            if e.from_ms > 0 {
                self.host
                    .record(m.sync_lag_ms, now.saturating_sub(e.from_ms));
            }
        }
        self.host
            .increment(m.entries_applied, resp.entries.len() as i64);
        self.host.increment(m.reports_applied, reports);
        self.host.increment(m.bad_entries, bad);
        if resp.inflight.len() == fleet::INFLIGHT_SECTIONS * n || resp.inflight.is_empty() {
            let blob = state::encode_fleet_inflight(now, &resp.inflight);
            if self.host.shared_set(state::FLEET_INFLIGHT_KEY, &blob, None) != Ok(true) {
                self.metrics.host_error(&self.host, HostOp::Publish);
            }
        }
        if reports > 0 {
            self.decisions_recorded += reports as u64;
            if changed {
                self.dir_dirty = true;
            } else {
                self.dir_touched = true;
            }
            if self.settings.publish_interval == PublishInterval::EveryDecision {
                self.publish_due(now);
            }
        }
    }

    /// Takes `n` directory changes made by the decisions recorded since the last take into the
    /// mean changes per decision (an exponentially weighted mean, weight 1/8).
    fn learn_changes(&mut self, n: usize) {
        let decisions = self
            .decisions_recorded
            .saturating_sub(self.decisions_at_take);
        self.decisions_at_take = self.decisions_recorded;
        if decisions == 0 {
            return;
        }
        let per = n as f64 / decisions as f64;
        self.changes_per_decision = if self.changes_per_decision == 0.0 {
            per
        } else {
            self.changes_per_decision + (per - self.changes_per_decision) / 8.0
        };
    }

    /// A directory publish that is due: the whole state when the directory changed, else (only
    /// recency refreshed) just the time the published directory is current as of.
    fn publish_due(&mut self, now: u64) {
        if self.dir_dirty {
            // On every decision, the changes since the last full state, while they are fewer
            // than the overlay's bound.
            let taken = self.directory.take_changes();
            let n = taken
                .as_ref()
                .map_or(0, |c| c.blocks.len() + c.sessions.len());
            if taken.is_some() {
                self.learn_changes(n);
            }
            let bound =
                state::overlay_bound(self.directory.distinct_blocks(), self.changes_per_decision);
            match taken {
                Some(c)
                    if self.journal_from_published
                        && self.settings.publish_interval == PublishInterval::EveryDecision
                        && self.overlay.len() + n <= bound =>
                {
                    self.overlay.add(&self.directory, &c);
                    self.publish_overlay(now);
                }
                taken => {
                    self.absorb_changes(taken);
                    self.publish(true);
                }
            }
        } else if self.dir_touched {
            self.dir_touched = false;
            if self.published_dir_at_ms != 0 {
                self.mark_current(now);
            }
        }
    }

    /// Says that the published directory, with its overlay, is current as of `now` (the version
    /// key's `as_of`), without publishing anything else.
    fn mark_current(&mut self, now: u64) {
        self.published_dir_at_ms = now;
        let v = state::encode_version_with_directory(
            self.version,
            now,
            self.overlay_seq,
            self.dir_version,
        );
        if self.host.shared_set(state::VERSION_KEY, &v, None) != Ok(true) {
            self.metrics.host_error(&self.host, HostOp::Publish);
        }
    }

    /// When every decision is published and none came since the last publish, the published
    /// directory is still the whole of what this gateway decided: the version key says so (its
    /// time `as_of` moves to now, once a tick). The view's age is what `predicted_ttft` weighs the
    /// directory's matches by; without this, a decision after a quiet spell (a trace with requests
    /// seconds apart) would take a complete view for an old one. Not with a fleet, whose view lacks
    /// the other replicas' decisions since the last exchange, nor with an interval, whose age is
    /// the staleness it is set to.
    fn confirm_current(&mut self, now: u64) {
        if self.fleet.is_some()
            || self.settings.publish_interval != PublishInterval::EveryDecision
            || self.dir_dirty
            || self.dir_touched
            || self.published_dir_at_ms == 0
            || now <= self.published_dir_at_ms
        {
            return;
        }
        self.mark_current(now);
    }

    /// Publishes the state; `with_directory` takes a fresh directory snapshot and publishes it
    /// (else the last published one is kept, with the overlay on top of it, so a settings or engine
    /// status change neither shortens the directory interval nor copies the directory).
    fn publish(&mut self, with_directory: bool) {
        let now = self.now_ms();
        let mut with_directory = with_directory;
        if self.settings.publish_interval == PublishInterval::Never {
            // The workers route without a directory: an empty one replaces any published before.
            with_directory |= self.dir_version == 0 || !self.published_dir.is_empty();
            self.published_dir = DirectorySection::empty();
            self.published_dir_at_ms = 0;
            // The journal counts from the directory published, and none is.
            self.journal_from_published = false;
        } else if with_directory {
            // The last full section with every change since merged in: a linear merge instead of
            // collecting and sorting the whole directory. Without a complete journal, a snapshot.
            if self.journal_from_published {
                let taken = self.directory.take_changes();
                self.absorb_changes(taken);
            }
            self.published_dir = if self.journal_from_published {
                self.published_dir.merged(&self.overlay)
            } else {
                DirectorySection::of(&self.directory)
            };
            self.directory.reset_journal();
            self.journal_from_published = true;
            self.published_dir_at_ms = now;
            self.dir_dirty = false;
            self.dir_touched = false;
        }
        self.version += 1;
        if with_directory {
            // The overlay's changes are in the directory published now.
            self.overlay_seq = 0;
            self.overlay.clear();
            let blob = state::encode_directory(self.version, &self.published_dir);
            if self.host.shared_set(state::DIRECTORY_KEY, &blob, None) != Ok(true) {
                self.metrics.host_error(&self.host, HostOp::Publish);
                // The workers may not have this directory: the next publish must be a full one.
                self.journal_from_published = false;
                return;
            }
            self.dir_version = self.version;
            self.dir_bytes = blob.len();
            self.host.increment(self.metrics.directory_publishes, 1);
        }
        let header = StateHeader {
            version: self.version,
            published_at_ms: now,
            settings: self.settings.clone(),
            endpoints: self.status.clone(),
            directory_as_of_ms: self.published_dir_at_ms,
            decisions_recorded: self.decisions_recorded,
            stale: self.stale,
            sessions: self.directory.session_stats().cloned().unwrap_or_default(),
        };
        let blob = state::encode(&header, &DirectorySection::empty());
        let ok = self.host.shared_set(state::STATE_KEY, &blob, None) == Ok(true)
            && self.host.shared_set(
                state::VERSION_KEY,
                &state::encode_version_with_directory(
                    self.version,
                    self.published_dir_at_ms,
                    self.overlay_seq,
                    self.dir_version,
                ),
                None,
            ) == Ok(true);
        if !ok {
            self.metrics.host_error(&self.host, HostOp::Publish);
            self.journal_from_published = false;
            return;
        }
        self.host.increment(self.metrics.publishes, 1);
        self.host.record(self.metrics.state_version, self.version);
        self.host.record(
            self.metrics.state_bytes,
            (blob.len() + self.dir_bytes) as u64,
        );
        self.gauges_dirty = true;
    }

    /// Folds changes taken from the journal into the overlay, so that the last full state with the
    /// overlay stays the directory; None (the journal overflowed) means it no longer is.
    fn absorb_changes(&mut self, taken: Option<Changes>) {
        match taken {
            Some(c) if self.journal_from_published => self.overlay.add(&self.directory, &c),
            _ => self.journal_from_published = false,
        }
    }

    /// Publishes the directory's changes since the last full state as an overlay on top of it.
    fn publish_overlay(&mut self, now: u64) {
        let seq = self.overlay_seq + 1;
        let section = DirectorySection::of_overlay(&self.overlay);
        let sessions = self.directory.session_stats().cloned().unwrap_or_default();
        let blob = state::encode_overlay(self.dir_version, seq, &sessions, &section);
        let ok = self.host.shared_set(state::OVERLAY_KEY, &blob, None) == Ok(true)
            && self.host.shared_set(
                state::VERSION_KEY,
                &state::encode_version_with_directory(self.version, now, seq, self.dir_version),
                None,
            ) == Ok(true);
        if !ok {
            // The version key still names the previous overlay; the builder keeps these changes,
            // and the next publish sends them.
            self.metrics.host_error(&self.host, HostOp::Publish);
            return;
        }
        self.overlay_seq = seq;
        self.published_dir_at_ms = now;
        self.dir_dirty = false;
        self.dir_touched = false;
        self.host.increment(self.metrics.overlay_publishes, 1);
        self.host
            .record(self.metrics.overlay_entries, self.overlay.len() as u64);
        self.gauges_dirty = true;
    }

    /// Gauges that describe the state, refreshed at most once per tick (not on every publish).
    fn update_gauges(&mut self) {
        if !self.gauges_dirty {
            return;
        }
        self.gauges_dirty = false;
        let m = &self.metrics;
        self.host
            .record(m.directory_blocks, self.directory.distinct_blocks() as u64);
        self.host
            .record(m.sessions, self.directory.sessions() as u64);
        if let Some(st) = self.directory.session_stats() {
            let share = (f64::from(st.continuing) * 1000.0).round() as u64;
            self.host.record(m.session_continuing_milli, share);
            let own = st.heads.iter().filter(|h| h.has_own_share()).count();
            self.host.record(m.session_heads, own as u64);
        }
        for (i, id) in m.directory_endpoint_blocks.iter().enumerate() {
            self.host.record(*id, self.directory.endpoint_len(i) as u64);
        }
        for (k, id) in PolicyKind::ALL.iter().zip(&m.policy_active) {
            self.host.record(*id, u64::from(*k == self.settings.policy));
        }
        self.host
            .record(m.alpha_milli, (self.settings.alpha * 1000.0).round() as u64);
        self.host
            .record(m.beta_milli, (self.settings.beta * 1000.0).round() as u64);
        self.host
            .record(m.directory_epoch, self.settings.directory_epoch);
        self.host.record(m.stale, u64::from(self.stale));
        self.host.record(
            m.chars_per_token_milli,
            (self.chars_per_token * 1000.0).round() as u64,
        );
        for (i, st) in self.status.iter().enumerate() {
            self.host.record(
                m.endpoint_healthy.get(i).copied().flatten(),
                u64::from(st.healthy),
            );
            let queue = st.engine.map_or(0.0, |e| e.waiting + e.running);
            self.host.record(
                m.engine_queue.get(i).copied().flatten(),
                queue.max(0.0).round() as u64,
            );
            self.host.record(
                m.directory_capacity.get(i).copied().flatten(),
                self.directory.endpoint_capacity(i) as u64,
            );
        }
        self.host.record(
            m.publish_interval_ms,
            match self.settings.publish_interval {
                PublishInterval::EveryDecision => 0,
                PublishInterval::Millis(ms) => u64::from(ms),
                PublishInterval::Never => u64::from(u32::MAX),
            },
        );
    }
}

/// A rate from the sidecar as the policies read it: finite and positive, else 0 (not measured).
fn sane_rate(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}
