//! Every kvroute stat, defined once per VM.
//!
//! Names are flat (`kvroute_decisions.policy.jsq.endpoint.engine0`) because the Wasm ABI has no
//! tags; the shipped bootstrap's `stats_config.stats_tags` turns `.policy.X`, `.endpoint.X`,
//! `.reason.X` and `.op.X` into Prometheus labels. Values are summed across VMs by Envoy.

use crate::host::{Host, MetricId, MetricKind};
use kvroute_core::policy::PolicyKind;
use kvroute_core::request::ParseError;
use kvroute_core::FilterConfig;

/// Why a request was routed by the load-only fallback or with degraded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The body could not be parsed (also counted by parse reason).
    ParseError,
    /// The body was larger than `max_body_bytes`.
    BodyTooLarge,
    /// The request had no body.
    NoBody,
    /// No published state yet (configured defaults and an empty directory were used).
    NoState,
    /// No endpoint was healthy; all were candidates.
    NoHealthy,
    /// Engine load signal configured but missing; gateway in-flight counts were used.
    EngineLoadMissing,
    /// `session_hash` without a session id: JSQ.
    NoSession,
    /// `prefix_key` without key text: JSQ.
    NoPrefixKey,
    /// The sidecar's snapshot is missing or too old: gateway in-flight load, health unknown.
    StaleState,
}

impl Fallback {
    pub const ALL: [Fallback; 9] = [
        Self::ParseError,
        Self::BodyTooLarge,
        Self::NoBody,
        Self::NoState,
        Self::NoHealthy,
        Self::EngineLoadMissing,
        Self::NoSession,
        Self::NoPrefixKey,
        Self::StaleState,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ParseError => "parse_error",
            Self::BodyTooLarge => "body_too_large",
            Self::NoBody => "no_body",
            Self::NoState => "no_state",
            Self::NoHealthy => "no_healthy",
            Self::EngineLoadMissing => "engine_load_missing",
            Self::NoSession => "no_session",
            Self::NoPrefixKey => "no_prefix_key",
            Self::StaleState => "stale_state",
        }
    }
}

/// Host operations whose failure is counted.
#[derive(Debug, Clone, Copy)]
pub enum HostOp {
    ReadHeaders,
    SetHeader,
    Inflight,
    Enqueue,
    StateRead,
    RuntimePoll,
    Publish,
    BadReport,
    SidecarPull,
}

impl HostOp {
    const ALL: [HostOp; 9] = [
        Self::ReadHeaders,
        Self::SetHeader,
        Self::Inflight,
        Self::Enqueue,
        Self::StateRead,
        Self::RuntimePoll,
        Self::Publish,
        Self::BadReport,
        Self::SidecarPull,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Self::ReadHeaders => "read_headers",
            Self::SetHeader => "set_header",
            Self::Inflight => "inflight",
            Self::Enqueue => "enqueue",
            Self::StateRead => "state_read",
            Self::RuntimePoll => "runtime_poll",
            Self::Publish => "publish",
            Self::BadReport => "bad_report",
            Self::SidecarPull => "sidecar_pull",
        }
    }
}

type Id = MetricId;

/// Defines stats on one host.
struct Definer<'h, H>(&'h H);

impl<H: Host> Definer<'_, H> {
    fn counter(&self, name: &str) -> Id {
        self.0.define_metric(MetricKind::Counter, name)
    }
    fn gauge(&self, name: &str) -> Id {
        self.0.define_metric(MetricKind::Gauge, name)
    }
    fn histogram(&self, name: &str) -> Id {
        self.0.define_metric(MetricKind::Histogram, name)
    }
    fn per_endpoint(&self, config: &FilterConfig, name: &str) -> Vec<Id> {
        config
            .endpoints
            .iter()
            .map(|e| self.gauge(&format!("{name}.endpoint.{}", e.name)))
            .collect()
    }
    fn host_errors(&self) -> Vec<Id> {
        HostOp::ALL
            .iter()
            .map(|o| self.counter(&format!("kvroute_host_errors_total.op.{}", o.as_str())))
            .collect()
    }
}

/// Stats of the HTTP filter role.
#[derive(Debug)]
pub struct FilterMetrics {
    pub requests: Id,
    pub passthrough: Id,
    decisions: Vec<Vec<Id>>,
    fallbacks: Vec<Id>,
    parse_errors: Vec<Id>,
    host_errors: Vec<Id>,
    pub prefix_key_overflows: Id,
    /// `kvroute_session_spread_total`: new sessions `predicted_ttft` placed away from their
    /// fastest endpoint because it served more than its share of the conversations.
    pub session_spread: Id,
    /// `kvroute_idle_copies_total`: questions over a shared prefix `predicted_ttft` sent to an idle
    /// endpoint that did not hold it, because every holder was busy and too few held it.
    pub idle_copies: Id,
    /// `kvroute_reference_rule_total.reason.{imbalanced,low_match,spill}`: picks a reference
    /// policy made by its secondary rule.
    pub reference_rules: [Id; 3],
    pub predicted_blocks: Id,
    pub request_blocks: Id,
    pub predicted_hits: Id,
    pub decision_time_us: Id,
    pub state_age_ms: Id,
    pub load_age_ms: Id,
    pub prediction_reports: Id,
    pub predicted_tokens: Id,
    pub reported_tokens: Id,
    pub prediction_abs_error: Id,
    /// `kvroute_retried_total.endpoint.X`: requests Envoy retried on another engine after X
    /// refused the connection or reset before responding (X is then marked down for a while).
    pub retried: Vec<Id>,
    /// Feature `bench-phases` only: body, parse, decide, route (see [`Phase`]).
    phases: Vec<Id>,
    /// Feature `bench-phases` only: the stream's other callbacks (see [`StreamPhase`]).
    stream_phases: Vec<Id>,
}

/// The phases of the filter's work on a routed request (feature `bench-phases`).
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// Copying the buffered body out of Envoy.
    Body = 0,
    /// Parsing it and hashing its blocks.
    Parse = 1,
    /// Reading the shared state and the in-flight counts and deciding.
    Decide = 2,
    /// Setting the header, counting in flight, reporting to the singleton, recording stats.
    Route = 3,
}

impl Phase {
    const NAMES: [&'static str; 4] = ["body", "parse", "decide", "route"];
}

/// The filter's other callbacks on a stream, timed whole in nanoseconds (feature `bench-phases`):
/// most take a few microseconds, below what a microsecond histogram resolves.
#[derive(Debug, Clone, Copy)]
pub enum StreamPhase {
    /// `on_http_request_headers`: which request it is, the session header, the declared length.
    Headers = 0,
    /// `on_http_response_headers`: the endpoint and policy response headers.
    ResponseHeaders = 1,
    /// `on_http_response_body`, each call: looking for the engine's `cached_tokens`.
    ResponseBody = 2,
    /// `on_log`: the in-flight decrement.
    End = 3,
}

impl StreamPhase {
    const NAMES: [&'static str; 4] = ["headers", "response_headers", "response_body", "end"];
}

impl FilterMetrics {
    pub fn define<H: Host>(host: &H, config: &FilterConfig) -> Self {
        let d = Definer(host);
        Self {
            requests: d.counter("kvroute_requests_total"),
            passthrough: d.counter("kvroute_passthrough_total"),
            decisions: PolicyKind::ALL
                .iter()
                .map(|p| {
                    config
                        .endpoints
                        .iter()
                        .map(|e| {
                            d.counter(&format!(
                                "kvroute_decisions_total.policy.{p}.endpoint.{}",
                                e.name
                            ))
                        })
                        .collect()
                })
                .collect(),
            fallbacks: Fallback::ALL
                .iter()
                .map(|f| d.counter(&format!("kvroute_fallbacks_total.reason.{}", f.as_str())))
                .collect(),
            parse_errors: ParseError::ALL
                .iter()
                .map(|r| d.counter(&format!("kvroute_parse_errors_total.reason.{}", r.reason())))
                .collect(),
            host_errors: d.host_errors(),
            prefix_key_overflows: d.counter("kvroute_prefix_key_overflows_total"),
            session_spread: d.counter("kvroute_session_spread_total"),
            idle_copies: d.counter("kvroute_idle_copies_total"),
            reference_rules: ["imbalanced", "low_match", "spill"]
                .map(|r| d.counter(&format!("kvroute_reference_rule_total.reason.{r}"))),
            predicted_blocks: d.counter("kvroute_predicted_cached_blocks_total"),
            request_blocks: d.counter("kvroute_request_blocks_total"),
            predicted_hits: d.counter("kvroute_predicted_hits_total"),
            decision_time_us: d.histogram("kvroute_decision_time_us"),
            state_age_ms: d.histogram("kvroute_state_age_ms"),
            load_age_ms: d.histogram("kvroute_load_age_ms"),
            prediction_reports: d.counter("kvroute_prediction_reports_total"),
            predicted_tokens: d.counter("kvroute_prediction_predicted_tokens_total"),
            reported_tokens: d.counter("kvroute_prediction_reported_tokens_total"),
            prediction_abs_error: d.histogram("kvroute_prediction_abs_error_tokens"),
            retried: config
                .endpoints
                .iter()
                .map(|e| d.counter(&format!("kvroute_retried_total.endpoint.{}", e.name)))
                .collect(),
            phases: if cfg!(feature = "bench-phases") {
                Phase::NAMES
                    .iter()
                    .map(|p| d.histogram(&format!("kvroute_phase_us.phase.{p}")))
                    .collect()
            } else {
                Vec::new()
            },
            stream_phases: if cfg!(feature = "bench-phases") {
                StreamPhase::NAMES
                    .iter()
                    .map(|p| d.histogram(&format!("kvroute_phase_ns.phase.{p}")))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Records how long a stream callback took, from `start_ns` (feature `bench-phases`, where
    /// `start_ns` is nonzero; nothing otherwise).
    pub fn stream_phase<H: Host>(&self, host: &H, phase: StreamPhase, start_ns: u64) {
        if start_ns == 0 {
            return;
        }
        if let Some(id) = self.stream_phases.get(phase as usize) {
            host.record(*id, host.now_ns().saturating_sub(start_ns));
        }
    }

    /// Records how long a phase took (feature `bench-phases`; nothing otherwise).
    pub fn phase<H: Host>(&self, host: &H, phase: Phase, us: u64) {
        if let Some(id) = self.phases.get(phase as usize) {
            host.record(*id, us);
        }
    }

    pub fn decision<H: Host>(&self, host: &H, policy: PolicyKind, endpoint: usize) {
        let p = PolicyKind::ALL.iter().position(|k| *k == policy);
        let id = p
            .and_then(|p| self.decisions.get(p))
            .and_then(|v| v.get(endpoint))
            .copied()
            .flatten();
        host.increment(id, 1);
    }

    pub fn fallback<H: Host>(&self, host: &H, f: Fallback) {
        let i = Fallback::ALL.iter().position(|x| *x == f);
        host.increment(i.and_then(|i| self.fallbacks.get(i)).copied().flatten(), 1);
    }

    pub fn parse_error<H: Host>(&self, host: &H, e: ParseError) {
        let i = ParseError::ALL.iter().position(|x| *x == e);
        host.increment(
            i.and_then(|i| self.parse_errors.get(i)).copied().flatten(),
            1,
        );
    }

    pub fn host_error<H: Host>(&self, host: &H, op: HostOp) {
        host.increment(self.host_errors.get(op as usize).copied().flatten(), 1);
    }
}

/// Stats of the singleton role.
#[derive(Debug)]
pub struct StateMetrics {
    pub state_version: Id,
    pub state_bytes: Id,
    pub publishes: Id,
    pub directory_publishes: Id,
    pub overlay_publishes: Id,
    pub report_delay_us: Id,
    pub overlay_entries: Id,
    pub directory_blocks: Id,
    pub directory_endpoint_blocks: Vec<Id>,
    pub inflight: Vec<Id>,
    pub queued_prefill: Vec<Id>,
    pub sessions: Id,
    /// `kvroute_session_continuing_milli`: the share of recent requests with a session that
    /// continued a known one, x1000 (what `kvroute.ttft_session_spread` compares with).
    pub session_continuing_milli: Id,
    /// `kvroute_session_heads`: prompt heads counted on enough requests that their own continuing
    /// share decides for the requests that begin with them.
    pub session_heads: Id,
    pub decisions_recorded: Id,
    pub runtime_polls: Id,
    pub runtime_invalid: Id,
    pub policy_active: Vec<Id>,
    pub alpha_milli: Id,
    pub beta_milli: Id,
    pub publish_interval_ms: Id,
    pub directory_epoch: Id,
    pub stale: Id,
    /// The characters per engine token the directory's capacities are sized at (x1000).
    pub chars_per_token_milli: Id,
    pub sidecar_pulls: Id,
    pub sidecar_poll_interval_ms: Id,
    pub endpoint_healthy: Vec<Id>,
    pub engine_queue: Vec<Id>,
    pub directory_capacity: Vec<Id>,
    pub takeovers: Id,
    pub fleet: FleetMetrics,
    host_errors: Vec<Id>,
}

/// Stats of the fleet exchange (`kvroute_fleet_*`), defined only when a fleet is configured.
#[derive(Debug, Default)]
pub struct FleetMetrics {
    pub exchanges: Id,
    pub errors: Id,
    pub connected: Id,
    pub entries_applied: Id,
    pub reports_applied: Id,
    pub reports_shared: Id,
    pub dropped_reports: Id,
    pub bad_entries: Id,
    pub pending_bytes: Id,
    /// From a decision on another replica to its arrival here, ms.
    pub sync_lag_ms: Id,
}

impl StateMetrics {
    pub fn define<H: Host>(host: &H, config: &FilterConfig) -> Self {
        let d = Definer(host);
        Self {
            state_version: d.gauge("kvroute_state_version"),
            takeovers: d.counter("kvroute_state_takeovers_total"),
            state_bytes: d.gauge("kvroute_state_bytes"),
            publishes: d.counter("kvroute_state_publishes_total"),
            directory_publishes: d.counter("kvroute_state_directory_publishes_total"),
            overlay_publishes: d.counter("kvroute_state_overlay_publishes_total"),
            report_delay_us: d.histogram("kvroute_report_delay_us"),
            overlay_entries: d.gauge("kvroute_state_overlay_entries"),
            directory_blocks: d.gauge("kvroute_directory_blocks"),
            directory_endpoint_blocks: config
                .endpoints
                .iter()
                .map(|e| {
                    d.gauge(&format!(
                        "kvroute_directory_endpoint_blocks.endpoint.{}",
                        e.name
                    ))
                })
                .collect(),
            inflight: config
                .endpoints
                .iter()
                .map(|e| d.gauge(&format!("kvroute_inflight.endpoint.{}", e.name)))
                .collect(),
            queued_prefill: config
                .endpoints
                .iter()
                .map(|e| {
                    d.gauge(&format!(
                        "kvroute_queued_prefill_tokens.endpoint.{}",
                        e.name
                    ))
                })
                .collect(),
            sessions: d.gauge("kvroute_directory_sessions"),
            session_continuing_milli: d.gauge("kvroute_session_continuing_milli"),
            session_heads: d.gauge("kvroute_session_heads"),
            decisions_recorded: d.counter("kvroute_decisions_recorded_total"),
            runtime_polls: d.counter("kvroute_runtime_polls_total"),
            runtime_invalid: d.gauge("kvroute_runtime_invalid_values"),
            policy_active: PolicyKind::ALL
                .iter()
                .map(|p| d.gauge(&format!("kvroute_policy_active.policy.{p}")))
                .collect(),
            alpha_milli: d.gauge("kvroute_setting_alpha_milli"),
            beta_milli: d.gauge("kvroute_setting_beta_milli"),
            publish_interval_ms: d.gauge("kvroute_setting_publish_interval_ms"),
            directory_epoch: d.gauge("kvroute_setting_directory_epoch"),
            stale: d.gauge("kvroute_state_stale"),
            chars_per_token_milli: d.gauge("kvroute_chars_per_token_milli"),
            sidecar_pulls: d.counter("kvroute_sidecar_pulls_total"),
            sidecar_poll_interval_ms: d.gauge("kvroute_sidecar_poll_interval_ms"),
            endpoint_healthy: d.per_endpoint(config, "kvroute_endpoint_healthy"),
            engine_queue: d.per_endpoint(config, "kvroute_engine_queue"),
            directory_capacity: d.per_endpoint(config, "kvroute_directory_endpoint_capacity"),
            fleet: if config.fleet.is_some() {
                FleetMetrics {
                    exchanges: d.counter("kvroute_fleet_exchanges_total"),
                    errors: d.counter("kvroute_fleet_errors_total"),
                    connected: d.gauge("kvroute_fleet_connected"),
                    entries_applied: d.counter("kvroute_fleet_entries_applied_total"),
                    reports_applied: d.counter("kvroute_fleet_reports_applied_total"),
                    reports_shared: d.counter("kvroute_fleet_reports_shared_total"),
                    dropped_reports: d.counter("kvroute_fleet_dropped_reports_total"),
                    bad_entries: d.counter("kvroute_fleet_bad_entries_total"),
                    pending_bytes: d.gauge("kvroute_fleet_pending_bytes"),
                    sync_lag_ms: d.histogram("kvroute_fleet_sync_lag_ms"),
                }
            } else {
                FleetMetrics::default()
            },
            host_errors: d.host_errors(),
        }
    }

    pub fn host_error<H: Host>(&self, host: &H, op: HostOp) {
        host.increment(self.host_errors.get(op as usize).copied().flatten(), 1);
    }
}
