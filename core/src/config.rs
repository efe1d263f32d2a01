//! Typed, validated configuration: the plugin JSON (fixed for the life of a filter config) and the
//! policy settings that Envoy runtime values (`kvroute.*`) change live.
//!
//! Parsing is strict (`deny_unknown_fields`) and validation reports every bad field at once, by
//! path, so `on_configure` can log them all and reject the config.

use serde::{Deserialize, Serialize};

use crate::policy::{HashMode, LoadSignal, PolicyKind, RateScope};
use crate::prefix::BlockSpec;
use crate::MAX_ENDPOINTS;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field (`endpoints[1].name`, `kvroute.alpha`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a plugin configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON for the schema (unknown field, wrong type).
    #[error("invalid configuration JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Valid JSON, invalid values.
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

/// An engine endpoint the router can pick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Name used in stats and logs: `[A-Za-z0-9_-]{1,48}`.
    pub name: String,
    /// Envoy cluster that reaches it; the value of the routing header. Defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Prefix directory capacity for this endpoint, in blocks (what the engine's KV cache holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_blocks: Option<u32>,
    /// The engine's address as the Envoy cluster of all engines knows it (`IP:port`): with it the
    /// filter also names the chosen host, then a fallback host, in `host_header`, for Envoy's
    /// `override_host` load balancing policy, so a retry goes to another engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl EndpointConfig {
    /// The Envoy cluster name.
    pub fn cluster(&self) -> &str {
        self.cluster.as_deref().unwrap_or(&self.name)
    }
}

/// Where the singleton pulls engine state from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarEndpoint {
    /// Envoy cluster that reaches the sidecar.
    pub cluster: String,
    /// Authority sent to it.
    #[serde(default = "d_sidecar_authority")]
    pub authority: String,
    /// Path of the snapshot.
    #[serde(default = "d_sidecar_path")]
    pub path: String,
    /// A snapshot older than this (no successful pull since) marks the state stale: engine load is
    /// dropped (policies use gateway in-flight counts) and every engine counts as healthy.
    #[serde(default = "d_stale_after")]
    pub stale_after_ms: u32,
}

/// Where the state service exchanges decisions with the fleet's other Envoy replicas
/// ([`crate::fleet`]): the sidecar, which keeps the fleet's log in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetEndpoint {
    /// Envoy cluster that reaches the sidecar.
    pub cluster: String,
    /// Authority sent to it.
    #[serde(default = "d_sidecar_authority")]
    pub authority: String,
    /// Path of the exchange.
    #[serde(default = "d_fleet_path")]
    pub path: String,
    /// How often the state service exchanges, ms: the sync lag between replicas is about this
    /// plus one Redis round trip.
    #[serde(default = "d_fleet_sync")]
    pub sync_ms: u32,
    /// Most bytes of decision reports held for one exchange; reports beyond it are applied here
    /// but not shared, and counted (`kvroute_fleet_dropped_reports_total`).
    #[serde(default = "d_fleet_batch")]
    pub max_batch_bytes: u32,
}

fn d_fleet_path() -> String {
    "/fleet".into()
}
fn d_fleet_sync() -> u32 {
    10
}
fn d_fleet_batch() -> u32 {
    256 * 1024
}

fn d_sidecar_authority() -> String {
    "kvroute-sidecar".into()
}
fn d_sidecar_path() -> String {
    "/snapshot".into()
}
fn d_stale_after() -> u32 {
    1000
}
fn d_chars_per_token() -> f64 {
    4.0
}

/// The plugin configuration (JSON in the Wasm `configuration` StringValue). The singleton and the
/// HTTP filter read the same document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The engines, in a fixed order (their index is their identity in the published state).
    pub endpoints: Vec<EndpointConfig>,
    /// Request header that carries the chosen cluster to the route (`cluster_header`).
    #[serde(default = "d_route_header")]
    pub route_header: String,
    /// Request header whose value is the session id (else the OpenAI `user` field).
    #[serde(default = "d_session_header")]
    pub session_header: String,
    /// Request header that names the chosen engine's address, then a fallback engine's
    /// (`IP:port,IP:port`), for Envoy's `override_host` load balancing policy (set only for
    /// endpoints with an `address`).
    #[serde(default = "d_host_header")]
    pub host_header: String,
    /// How long an engine has to answer a streamed request's headers before Envoy retries it on
    /// the fallback engine named in `host_header`, in ms (0: never). vLLM answers a stream's
    /// headers before its prefill, so a stream without headers after this long is on an engine
    /// that has stopped (a hung process or GPU). The filter sets Envoy's
    /// `x-envoy-upstream-rq-per-try-timeout-ms` on streamed requests to endpoints with an
    /// `address` (the route's retry policy must retry `reset`); a per-try timeout ends at the
    /// response headers, so it never cuts a stream. A response that is not streamed answers its
    /// headers only when it is complete, so it gets no such bound.
    #[serde(default = "d_stream_start_timeout")]
    pub stream_start_timeout_ms: u32,
    /// Largest body buffered for parsing; larger bodies are routed by load and counted.
    #[serde(default = "d_max_body")]
    pub max_body_bytes: u32,
    /// Characters per prefix block (~4 per token).
    #[serde(default = "d_block_chars")]
    pub block_chars: u32,
    /// Most blocks hashed per request.
    #[serde(default = "d_max_blocks")]
    pub max_blocks: u32,
    /// Blocks of `block_chars` characters before the blocks grow coarser ([`BlockSpec`]).
    #[serde(default = "d_coarse_after")]
    pub coarse_after_blocks: u32,
    /// How many times longer the blocks after `coarse_after_blocks` are (1: all alike).
    #[serde(default = "d_coarse_factor")]
    pub coarse_factor: u32,
    /// Directory capacity per endpoint when the endpoint does not set one, in blocks.
    #[serde(default = "d_capacity")]
    pub default_capacity_blocks: u32,
    /// Most sessions remembered for session continuity (LRU).
    #[serde(default = "d_sessions")]
    pub session_capacity: u32,
    /// Envoy cluster that reaches the admin interface (for `GET /runtime`).
    #[serde(default = "d_admin_cluster")]
    pub admin_cluster: String,
    /// Authority sent to the admin cluster.
    #[serde(default = "d_admin_authority")]
    pub admin_authority: String,
    /// How often the singleton polls runtime values, in ms.
    #[serde(default = "d_runtime_poll")]
    pub runtime_poll_ms: u32,
    /// The sidecar serving engine state, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarEndpoint>,
    /// The fleet's shared decision log, when several Envoy replicas route as one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetEndpoint>,
    /// Characters of prompt text per engine token, to turn an engine's KV capacity (tokens) into
    /// directory blocks (`block_chars` characters each).
    #[serde(default = "d_chars_per_token")]
    pub chars_per_token: f64,
    /// Policy settings used until (and where) runtime values say otherwise.
    #[serde(default)]
    pub defaults: PolicySettings,
}

fn d_route_header() -> String {
    "x-kvroute-endpoint".into()
}
fn d_session_header() -> String {
    "x-session-id".into()
}
fn d_host_header() -> String {
    "x-kvroute-host".into()
}
fn d_stream_start_timeout() -> u32 {
    10_000
}
fn d_max_body() -> u32 {
    4 << 20
}
fn d_block_chars() -> u32 {
    64
}
fn d_max_blocks() -> u32 {
    2048
}
fn d_coarse_after() -> u32 {
    1024
}
fn d_coarse_factor() -> u32 {
    16
}
fn d_capacity() -> u32 {
    4096
}
fn d_sessions() -> u32 {
    4096
}
fn d_admin_cluster() -> String {
    "kvroute_admin".into()
}
fn d_admin_authority() -> String {
    "kvroute-admin".into()
}
fn d_runtime_poll() -> u32 {
    100
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_header(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl FilterConfig {
    /// A configuration with these endpoints and every default.
    pub fn with_endpoints(endpoints: Vec<EndpointConfig>) -> Self {
        Self {
            endpoints,
            route_header: d_route_header(),
            session_header: d_session_header(),
            host_header: d_host_header(),
            stream_start_timeout_ms: d_stream_start_timeout(),
            max_body_bytes: d_max_body(),
            block_chars: d_block_chars(),
            max_blocks: d_max_blocks(),
            coarse_after_blocks: d_coarse_after(),
            coarse_factor: d_coarse_factor(),
            default_capacity_blocks: d_capacity(),
            session_capacity: d_sessions(),
            admin_cluster: d_admin_cluster(),
            admin_authority: d_admin_authority(),
            runtime_poll_ms: d_runtime_poll(),
            sidecar: None,
            fleet: None,
            chars_per_token: d_chars_per_token(),
            defaults: PolicySettings::default(),
        }
    }

    /// Parses and validates a configuration document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let c: Self = serde_json::from_slice(bytes)?;
        c.validate().map_err(ConfigError::Invalid)?;
        Ok(c)
    }

    /// Every invalid field, or Ok.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut e = Vec::new();
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            e.push(FieldError::new(
                "endpoints",
                format!("need 1 to {MAX_ENDPOINTS} endpoints"),
            ));
        }
        for (i, ep) in self.endpoints.iter().enumerate() {
            if !valid_name(&ep.name) {
                e.push(FieldError::new(
                    format!("endpoints[{i}].name"),
                    "must match [A-Za-z0-9_-]{1,48}",
                ));
            }
            if ep
                .cluster
                .as_deref()
                .is_some_and(|c| c.is_empty() || c.len() > 200)
            {
                e.push(FieldError::new(
                    format!("endpoints[{i}].cluster"),
                    "must be 1 to 200 characters",
                ));
            }
            if ep.capacity_blocks == Some(0) {
                e.push(FieldError::new(
                    format!("endpoints[{i}].capacity_blocks"),
                    "must be positive",
                ));
            }
            if self.endpoints.iter().take(i).any(|o| o.name == ep.name) {
                e.push(FieldError::new(
                    format!("endpoints[{i}].name"),
                    "duplicate endpoint name",
                ));
            }
        }
        if !valid_header(&self.route_header) {
            e.push(FieldError::new(
                "route_header",
                "must be a lower-case header name",
            ));
        }
        if !valid_header(&self.session_header) {
            e.push(FieldError::new(
                "session_header",
                "must be a lower-case header name",
            ));
        }
        if !valid_header(&self.host_header) {
            e.push(FieldError::new(
                "host_header",
                "must be a lower-case header name",
            ));
        }
        for (i, ep) in self.endpoints.iter().enumerate() {
            if let Some(a) = &ep.address {
                if a.parse::<std::net::SocketAddr>().is_err() {
                    e.push(FieldError::new(
                        format!("endpoints[{i}].address"),
                        "must be IP:port (an IPv6 address in brackets)",
                    ));
                }
            }
        }
        if self.stream_start_timeout_ms != 0
            && !(50..=3_600_000).contains(&self.stream_start_timeout_ms)
        {
            e.push(FieldError::new(
                "stream_start_timeout_ms",
                "must be 0 (never) or 50 to 3600000",
            ));
        }
        if !(1..=(64 << 20)).contains(&self.max_body_bytes) {
            e.push(FieldError::new("max_body_bytes", "must be 1 to 67108864"));
        }
        if !(1..=4096).contains(&self.block_chars) {
            e.push(FieldError::new("block_chars", "must be 1 to 4096"));
        }
        if !(1..=65536).contains(&self.max_blocks) {
            e.push(FieldError::new("max_blocks", "must be 1 to 65536"));
        }
        if !(1..=256).contains(&self.coarse_factor) {
            e.push(FieldError::new("coarse_factor", "must be 1 to 256"));
        }
        if !(1..=1 << 20).contains(&self.default_capacity_blocks) {
            e.push(FieldError::new(
                "default_capacity_blocks",
                "must be 1 to 1048576",
            ));
        }
        if !(1..=1 << 20).contains(&self.session_capacity) {
            e.push(FieldError::new("session_capacity", "must be 1 to 1048576"));
        }
        if self.admin_cluster.is_empty() {
            e.push(FieldError::new("admin_cluster", "must not be empty"));
        }
        if !(10..=60_000).contains(&self.runtime_poll_ms) {
            e.push(FieldError::new("runtime_poll_ms", "must be 10 to 60000"));
        }
        if let Some(sc) = &self.sidecar {
            if sc.cluster.is_empty() {
                e.push(FieldError::new("sidecar.cluster", "must not be empty"));
            }
            if !sc.path.starts_with('/') {
                e.push(FieldError::new("sidecar.path", "must start with /"));
            }
            if !(10..=600_000).contains(&sc.stale_after_ms) {
                e.push(FieldError::new(
                    "sidecar.stale_after_ms",
                    "must be 10 to 600000",
                ));
            }
        }
        if let Some(f) = &self.fleet {
            if f.cluster.is_empty() {
                e.push(FieldError::new("fleet.cluster", "must not be empty"));
            }
            if !f.path.starts_with('/') {
                e.push(FieldError::new("fleet.path", "must start with /"));
            }
            if !(5..=60_000).contains(&f.sync_ms) {
                e.push(FieldError::new("fleet.sync_ms", "must be 5 to 60000"));
            }
            if !(1024..=(16 << 20)).contains(&f.max_batch_bytes) {
                e.push(FieldError::new(
                    "fleet.max_batch_bytes",
                    "must be 1024 to 16777216",
                ));
            }
        }
        if !(self.chars_per_token.is_finite() && (0.5..=32.0).contains(&self.chars_per_token)) {
            e.push(FieldError::new("chars_per_token", "must be 0.5 to 32"));
        }
        e.extend(self.defaults.validate("defaults."));
        if e.is_empty() {
            Ok(())
        } else {
            Err(e)
        }
    }

    /// How prompts are cut into blocks.
    pub fn block_spec(&self) -> BlockSpec {
        BlockSpec {
            block_chars: self.block_chars as usize,
            max_blocks: self.max_blocks as usize,
            coarse_after: self.coarse_after_blocks as usize,
            coarse_factor: self.coarse_factor.max(1) as usize,
        }
    }

    /// Directory blocks that hold what an engine's KV cache of `tokens` tokens holds.
    pub fn blocks_for_tokens(&self, tokens: u64) -> u32 {
        self.blocks_for_tokens_at(tokens, self.chars_per_token)
    }

    /// [`FilterConfig::blocks_for_tokens`] at `chars_per_token` characters a token (a measured
    /// ratio, [`crate::tokens::CharsPerToken`]) instead of the configured one.
    pub fn blocks_for_tokens_at(&self, tokens: u64, chars_per_token: f64) -> u32 {
        let blocks = tokens as f64 * chars_per_token / f64::from(self.block_chars.max(1));
        blocks.clamp(1.0, f64::from(1u32 << 20)) as u32
    }

    /// Directory capacity of endpoint `i`, in blocks.
    pub fn capacity_of(&self, i: usize) -> u32 {
        self.endpoints
            .get(i)
            .and_then(|e| e.capacity_blocks)
            .unwrap_or(self.default_capacity_blocks)
    }
}

/// When the directory is republished to the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishInterval {
    /// After every decision (interval 0).
    EveryDecision,
    /// At most once per this many milliseconds.
    Millis(u32),
    /// Never: workers route on load and sessions only, with an empty directory.
    Never,
}

impl PublishInterval {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("never") || s == "-1" {
            return Some(Self::Never);
        }
        match s.parse::<u32>().ok()? {
            0 => Some(Self::EveryDecision),
            ms => Some(Self::Millis(ms)),
        }
    }
}

/// Settings of the active policy. Runtime keys (`kvroute.<key>`) override the configured defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySettings {
    /// `kvroute.policy`
    pub policy: PolicyKind,
    /// `kvroute.alpha`: weight of cache affinity in `load_cache_aware` (0..=1 typical, 0..=100 allowed).
    pub alpha: f64,
    /// `kvroute.beta`: weight of load pressure in `load_cache_aware`.
    pub beta: f64,
    /// `kvroute.prefix_key_threshold`: queue length above which `prefix_key` overflows to JSQ.
    pub prefix_key_threshold: u32,
    /// `kvroute.hash_mode`: `modular` (the seed's choice) or `rendezvous`.
    pub hash_mode: HashMode,
    /// `kvroute.session_affinity`: affinity an endpoint gets for holding the request's session.
    pub session_affinity: f64,
    /// `kvroute.load_signal`: which load the policies read.
    pub load_signal: LoadSignal,
    /// `kvroute.publish_interval_ms`: 0 (every decision), N ms, or `never`.
    pub publish_interval: PublishInterval,
    /// `kvroute.directory_epoch`: any change of this value makes the singleton forget the whole
    /// directory (set it after resetting the engines' prefix caches).
    pub directory_epoch: u64,
    /// `kvroute.load_refresh_ms`: how often the singleton pulls the sidecar's snapshot.
    pub load_refresh_ms: u32,
    /// `kvroute.sidecar_poll_ms`: the engine poll interval asked of the sidecar (0: the sidecar's
    /// own setting).
    pub sidecar_poll_ms: u32,
    /// `kvroute.cache_threshold`: `sglang_cache_aware` follows the longest match only above this
    /// match ratio (SGLang's `--cache-threshold`, 0.3).
    pub cache_threshold: f64,
    /// `kvroute.balance_abs_threshold`: `sglang_cache_aware` is imbalanced when max - min in-flight
    /// exceeds this (SGLang's `--balance-abs-threshold`, 64) ...
    pub balance_abs_threshold: f64,
    /// `kvroute.balance_rel_threshold`: ... and max exceeds this times min (SGLang's
    /// `--balance-rel-threshold`, 1.5).
    pub balance_rel_threshold: f64,
    /// `kvroute.chwbl_load_factor`: `chwbl`'s bound on an endpoint's load over the mean (KubeAI's
    /// `meanLoadPercentage` 125 = 1.25).
    pub chwbl_load_factor: f64,
    /// `kvroute.dynamo_overlap_weight`: weight of prefill blocks in `dynamo_cost` (Dynamo's
    /// `overlap_score_weight`, 1.0).
    pub dynamo_overlap_weight: f64,
    /// `kvroute.dynamo_temperature`: softmax temperature of `dynamo_cost` (0: argmin, Dynamo's
    /// default).
    pub dynamo_temperature: f64,
    /// `kvroute.ttft_prefill_tps`: `predicted_ttft`'s prefill throughput (tokens/s) for an engine
    /// the sidecar has not measured, when no engine is measured either (cold start, no sidecar).
    pub ttft_prefill_tps: f64,
    /// `kvroute.ttft_cache_halflife_ms`: `predicted_ttft` credits the directory's matches at
    /// half their value when its view is this old (an older view weighs predicted differences
    /// less).
    pub ttft_cache_halflife_ms: u32,
    /// `kvroute.ttft_work_weight`: `predicted_ttft`'s weight of the prefill a request adds to an
    /// endpoint (the wait of the requests behind it) beside its own predicted wait (0..=100).
    pub ttft_work_weight: f64,
    /// `kvroute.ttft_attention_tokens`: the context length at which a prompt token's attention
    /// costs as much as its linear layers (the model's parameters / (2 x layers x hidden size);
    /// Llama-3.1-8B 26,624, Llama-3.2-3B 16,384). `predicted_ttft` counts a prefill of `u` tokens
    /// after `c` cached ones as `u + (u*c + u*u/2) / ttft_attention_tokens` tokens of work (0: as
    /// `u`, attention not counted).
    pub ttft_attention_tokens: u32,
    /// `kvroute.ttft_session_spread`: when at least this share of the recent requests continue a
    /// session the directory knows (of those that begin with the request's prompt head, where the
    /// directory has counted enough of them: [`crate::directory::SessionStats::continuing_for`]),
    /// `predicted_ttft` places a new session only on an endpoint that serves no more than the mean
    /// number of conversations ([`crate::directory::SessionStats::per_endpoint`]: a session's
    /// later requests follow its cache, so where it starts decides their load too); 1: never.
    pub ttft_session_spread: f64,
    /// `kvroute.ttft_idle_copies`: `predicted_ttft` sends a question over a shared prefix (a
    /// request that opens a session, of a prompt head whose requests do not continue one) to an
    /// idle endpoint when every endpoint that holds the head is busy, while fewer than this many
    /// times the head's share of the recent requests x the endpoints hold it, where such questions
    /// are most of the recent requests ([`crate::ttft::PredictedTtft`]); 0: never (0..=64).
    pub ttft_idle_copies: f64,
    /// `kvroute.ttft_rates`: `pooled` (the fleet's measured prefill rate for every endpoint) or
    /// `per_endpoint` (each engine's own, for fleets of unlike engines).
    pub ttft_rates: RateScope,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            policy: PolicyKind::PredictedTtft,
            alpha: 0.7,
            beta: 0.3,
            prefix_key_threshold: 8,
            hash_mode: HashMode::Modular,
            session_affinity: 0.5,
            load_signal: LoadSignal::GatewayInflight,
            publish_interval: PublishInterval::EveryDecision,
            directory_epoch: 0,
            load_refresh_ms: 100,
            sidecar_poll_ms: 0,
            cache_threshold: 0.3,
            balance_abs_threshold: 64.0,
            balance_rel_threshold: 1.5,
            chwbl_load_factor: 1.25,
            dynamo_overlap_weight: 1.0,
            dynamo_temperature: 0.0,
            ttft_prefill_tps: 10_000.0,
            ttft_cache_halflife_ms: 10_000,
            ttft_work_weight: 1.0,
            ttft_attention_tokens: 26_624,
            ttft_session_spread: 0.5,
            ttft_idle_copies: 2.0,
            ttft_rates: RateScope::Pooled,
        }
    }
}

/// Prefix of every runtime key kvroute reads.
pub const RUNTIME_PREFIX: &str = "kvroute.";

/// Every runtime key, without the prefix.
pub const RUNTIME_KEYS: [&str; 24] = [
    "policy",
    "alpha",
    "beta",
    "prefix_key_threshold",
    "hash_mode",
    "session_affinity",
    "load_signal",
    "publish_interval_ms",
    "directory_epoch",
    "load_refresh_ms",
    "sidecar_poll_ms",
    "cache_threshold",
    "balance_abs_threshold",
    "balance_rel_threshold",
    "chwbl_load_factor",
    "dynamo_overlap_weight",
    "dynamo_temperature",
    "ttft_prefill_tps",
    "ttft_cache_halflife_ms",
    "ttft_work_weight",
    "ttft_attention_tokens",
    "ttft_session_spread",
    "ttft_idle_copies",
    "ttft_rates",
];

impl PolicySettings {
    fn validate(&self, prefix: &str) -> Vec<FieldError> {
        let mut e = Vec::new();
        for (name, v) in [("alpha", self.alpha), ("beta", self.beta)] {
            if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                e.push(FieldError::new(
                    format!("{prefix}{name}"),
                    "must be a number in 0..=100",
                ));
            }
        }
        if !(10..=600_000).contains(&self.load_refresh_ms) {
            e.push(FieldError::new(
                format!("{prefix}load_refresh_ms"),
                "must be 10 to 600000",
            ));
        }
        for (name, v, lo, hi) in [
            ("cache_threshold", self.cache_threshold, 0.0, 1.0),
            (
                "balance_abs_threshold",
                self.balance_abs_threshold,
                0.0,
                1e9,
            ),
            (
                "balance_rel_threshold",
                self.balance_rel_threshold,
                1.0,
                1e9,
            ),
            ("chwbl_load_factor", self.chwbl_load_factor, 1.0, 100.0),
            (
                "dynamo_overlap_weight",
                self.dynamo_overlap_weight,
                0.0,
                100.0,
            ),
            ("dynamo_temperature", self.dynamo_temperature, 0.0, 100.0),
            ("ttft_prefill_tps", self.ttft_prefill_tps, 1.0, 1e9),
            ("ttft_work_weight", self.ttft_work_weight, 0.0, 100.0),
            ("ttft_session_spread", self.ttft_session_spread, 0.0, 1.0),
            ("ttft_idle_copies", self.ttft_idle_copies, 0.0, 64.0),
        ] {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                e.push(FieldError::new(
                    format!("{prefix}{name}"),
                    format!("must be a number in {lo}..={hi}"),
                ));
            }
        }
        if self.ttft_attention_tokens > 100_000_000 {
            e.push(FieldError::new(
                format!("{prefix}ttft_attention_tokens"),
                "must be 0 to 100000000",
            ));
        }
        if !(1..=3_600_000).contains(&self.ttft_cache_halflife_ms) {
            e.push(FieldError::new(
                format!("{prefix}ttft_cache_halflife_ms"),
                "must be 1 to 3600000",
            ));
        }
        if !(self.session_affinity.is_finite() && (0.0..=1.0).contains(&self.session_affinity)) {
            e.push(FieldError::new(
                format!("{prefix}session_affinity"),
                "must be a number in 0..=1",
            ));
        }
        e
    }

    /// The runtime value of `key` (`kvroute.alpha`, ...) that gives these settings: the inverse of
    /// [`PolicySettings::with_runtime`]. None for a key kvroute does not read.
    pub fn runtime_value(&self, key: &str) -> Option<String> {
        let k = key.strip_prefix(RUNTIME_PREFIX)?;
        Some(match k {
            "policy" => self.policy.as_str().to_string(),
            "alpha" => self.alpha.to_string(),
            "beta" => self.beta.to_string(),
            "prefix_key_threshold" => self.prefix_key_threshold.to_string(),
            "hash_mode" => self.hash_mode.as_str().to_string(),
            "session_affinity" => self.session_affinity.to_string(),
            "load_signal" => self.load_signal.as_str().to_string(),
            "publish_interval_ms" => match self.publish_interval {
                PublishInterval::EveryDecision => "0".to_string(),
                PublishInterval::Millis(ms) => ms.to_string(),
                PublishInterval::Never => "never".to_string(),
            },
            "directory_epoch" => self.directory_epoch.to_string(),
            "load_refresh_ms" => self.load_refresh_ms.to_string(),
            "sidecar_poll_ms" => self.sidecar_poll_ms.to_string(),
            "cache_threshold" => self.cache_threshold.to_string(),
            "balance_abs_threshold" => self.balance_abs_threshold.to_string(),
            "balance_rel_threshold" => self.balance_rel_threshold.to_string(),
            "chwbl_load_factor" => self.chwbl_load_factor.to_string(),
            "dynamo_overlap_weight" => self.dynamo_overlap_weight.to_string(),
            "dynamo_temperature" => self.dynamo_temperature.to_string(),
            "ttft_prefill_tps" => self.ttft_prefill_tps.to_string(),
            "ttft_cache_halflife_ms" => self.ttft_cache_halflife_ms.to_string(),
            "ttft_work_weight" => self.ttft_work_weight.to_string(),
            "ttft_attention_tokens" => self.ttft_attention_tokens.to_string(),
            "ttft_session_spread" => self.ttft_session_spread.to_string(),
            "ttft_idle_copies" => self.ttft_idle_copies.to_string(),
            "ttft_rates" => self.ttft_rates.as_str().to_string(),
            _ => return None,
        })
    }

    /// These settings with runtime values applied. `entries` are (key, value) pairs of the runtime;
    /// keys without the `kvroute.` prefix are ignored. Each invalid or unknown `kvroute.*` entry is
    /// reported and leaves the field as it was.
    pub fn with_runtime<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> (PolicySettings, Vec<FieldError>) {
        let mut s = self.clone();
        let mut errors = Vec::new();
        for (key, value) in entries {
            let Some(k) = key.strip_prefix(RUNTIME_PREFIX) else {
                continue;
            };
            let v = value.trim();
            let ok = match k {
                "policy" => v.parse().map(|p| s.policy = p).is_ok(),
                "alpha" => parse_weight(v, 100.0).map(|x| s.alpha = x).is_some(),
                "beta" => parse_weight(v, 100.0).map(|x| s.beta = x).is_some(),
                "prefix_key_threshold" => v.parse().map(|x| s.prefix_key_threshold = x).is_ok(),
                "hash_mode" => v.parse().map(|x| s.hash_mode = x).is_ok(),
                "session_affinity" => parse_weight(v, 1.0)
                    .map(|x| s.session_affinity = x)
                    .is_some(),
                "load_signal" => v.parse().map(|x| s.load_signal = x).is_ok(),
                "publish_interval_ms" => PublishInterval::parse(v)
                    .map(|x| s.publish_interval = x)
                    .is_some(),
                "directory_epoch" => v.parse().map(|x| s.directory_epoch = x).is_ok(),
                "sidecar_poll_ms" => v
                    .parse::<u32>()
                    .ok()
                    .filter(|x| *x == 0 || (10..=600_000).contains(x))
                    .map(|x| s.sidecar_poll_ms = x)
                    .is_some(),
                "load_refresh_ms" => v
                    .parse::<u32>()
                    .ok()
                    .filter(|x| (10..=600_000).contains(x))
                    .map(|x| s.load_refresh_ms = x)
                    .is_some(),
                "cache_threshold" => parse_range(v, 0.0, 1.0)
                    .map(|x| s.cache_threshold = x)
                    .is_some(),
                "balance_abs_threshold" => parse_range(v, 0.0, 1e9)
                    .map(|x| s.balance_abs_threshold = x)
                    .is_some(),
                "balance_rel_threshold" => parse_range(v, 1.0, 1e9)
                    .map(|x| s.balance_rel_threshold = x)
                    .is_some(),
                "chwbl_load_factor" => parse_range(v, 1.0, 100.0)
                    .map(|x| s.chwbl_load_factor = x)
                    .is_some(),
                "dynamo_overlap_weight" => parse_weight(v, 100.0)
                    .map(|x| s.dynamo_overlap_weight = x)
                    .is_some(),
                "dynamo_temperature" => parse_weight(v, 100.0)
                    .map(|x| s.dynamo_temperature = x)
                    .is_some(),
                "ttft_prefill_tps" => parse_range(v, 1.0, 1e9)
                    .map(|x| s.ttft_prefill_tps = x)
                    .is_some(),
                "ttft_cache_halflife_ms" => v
                    .parse::<u32>()
                    .ok()
                    .filter(|x| (1..=3_600_000).contains(x))
                    .map(|x| s.ttft_cache_halflife_ms = x)
                    .is_some(),
                "ttft_work_weight" => parse_weight(v, 100.0)
                    .map(|x| s.ttft_work_weight = x)
                    .is_some(),
                "ttft_session_spread" => parse_range(v, 0.0, 1.0)
                    .map(|x| s.ttft_session_spread = x)
                    .is_some(),
                "ttft_idle_copies" => parse_range(v, 0.0, 64.0)
                    .map(|x| s.ttft_idle_copies = x)
                    .is_some(),
                "ttft_attention_tokens" => v
                    .parse::<u32>()
                    .ok()
                    .filter(|x| *x <= 100_000_000)
                    .map(|x| s.ttft_attention_tokens = x)
                    .is_some(),
                "ttft_rates" => v.parse().map(|x| s.ttft_rates = x).is_ok(),
                _ => {
                    errors.push(FieldError::new(key, "unknown kvroute runtime key"));
                    continue;
                }
            };
            if !ok {
                errors.push(FieldError::new(key, format!("invalid value {v:?}")));
            }
        }
        (s, errors)
    }
}

/// Envoy's `GET /runtime` answer (`{"entries":{"KEY":{"final_value":"..."}},...}`).
#[derive(Deserialize)]
struct RuntimeDump<'a> {
    #[serde(borrow, default)]
    entries: std::collections::BTreeMap<&'a str, RuntimeEntry<'a>>,
}

#[derive(Deserialize)]
struct RuntimeEntry<'a> {
    #[serde(borrow, default)]
    final_value: Option<std::borrow::Cow<'a, str>>,
}

impl PolicySettings {
    /// These settings with the `kvroute.*` values of Envoy's `GET /runtime` answer applied
    /// ([`PolicySettings::with_runtime`]); an answer that is not that JSON is an error and changes
    /// nothing.
    pub fn with_runtime_json(
        &self,
        body: &[u8],
    ) -> Result<(PolicySettings, Vec<FieldError>), String> {
        let dump: RuntimeDump<'_> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let entries = dump
            .entries
            .iter()
            .filter_map(|(k, v)| v.final_value.as_deref().map(|v| (*k, v)));
        Ok(self.with_runtime(entries))
    }
}

fn parse_weight(v: &str, max: f64) -> Option<f64> {
    parse_range(v, 0.0, max)
}

fn parse_range(v: &str, lo: f64, hi: f64) -> Option<f64> {
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && (lo..=hi).contains(x))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    #[test]
    fn runtime_json_applies_kvroute_values_and_refuses_other_bodies() {
        let body =
            br#"{"entries":{"kvroute.policy":{"final_value":"jsq","layer_values":["","jsq"]},
            "kvroute.alpha":{"final_value":"2x"},"upstream.x":{"final_value":"1"}},"layers":[]}"#;
        let (s, errors) = PolicySettings::default().with_runtime_json(body).unwrap();
        assert_eq!(s.policy, PolicyKind::Jsq);
        assert_eq!(s.alpha, 0.7, "an invalid value leaves the field");
        assert_eq!(errors.len(), 1);
        assert!(PolicySettings::default()
            .with_runtime_json(b"<html>")
            .is_err());
        assert!(PolicySettings::default()
            .with_runtime_json(br#"{"entries":{"kvroute.policy":{}}}"#)
            .is_ok_and(|(s, e)| s == PolicySettings::default() && e.is_empty()));
    }

    #[test]
    fn runtime_values_round_trip() {
        let mut odd = PolicySettings {
            policy: PolicyKind::Chwbl,
            alpha: 0.25,
            publish_interval: PublishInterval::Millis(750),
            load_signal: LoadSignal::EngineQueue,
            hash_mode: HashMode::Rendezvous,
            dynamo_temperature: 1.5,
            ..PolicySettings::default()
        };
        for settings in [PolicySettings::default(), odd.clone()] {
            let entries: Vec<(String, String)> = RUNTIME_KEYS
                .iter()
                .map(|k| {
                    let key = format!("{RUNTIME_PREFIX}{k}");
                    let v = settings.runtime_value(&key).unwrap();
                    (key, v)
                })
                .collect();
            let (back, errors) = PolicySettings::default()
                .with_runtime(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(back, settings);
        }
        odd.publish_interval = PublishInterval::Never;
        assert_eq!(
            odd.runtime_value("kvroute.publish_interval_ms").unwrap(),
            "never"
        );
        assert_eq!(odd.runtime_value("kvroute.nope"), None);
        assert_eq!(odd.runtime_value("alpha"), None);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = FilterConfig::from_json(
            br#"{"endpoints":[{"name":"e0"},{"name":"e1","cluster":"c1"}]}"#,
        )
        .unwrap();
        assert_eq!(c.endpoints[0].cluster(), "e0");
        assert_eq!(c.endpoints[1].cluster(), "c1");
        assert_eq!(c.route_header, "x-kvroute-endpoint");
        assert_eq!(c.defaults.policy, PolicyKind::PredictedTtft);
        assert_eq!(c.defaults.alpha, 0.7);
        assert_eq!(c.capacity_of(1), 4096);
    }

    #[test]
    fn with_endpoints_equals_parsed_defaults() {
        let parsed = FilterConfig::from_json(br#"{"endpoints":[{"name":"e0"}]}"#).unwrap();
        let built = FilterConfig::with_endpoints(parsed.endpoints.clone());
        assert_eq!(parsed, built);
    }

    #[test]
    fn unknown_fields_rejected() {
        assert!(matches!(
            FilterConfig::from_json(br#"{"endpoints":[{"name":"e0"}],"bogus":1}"#),
            Err(ConfigError::Json(_))
        ));
        assert!(matches!(
            FilterConfig::from_json(
                br#"{"endpoints":[{"name":"e0"}],"defaults":{"policy":"nope"}}"#
            ),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn every_bad_field_reported() {
        let err = FilterConfig::from_json(
            br#"{"endpoints":[{"name":"a.b"},{"name":"x"},{"name":"x","capacity_blocks":0}],
                "route_header":"X-Up","max_body_bytes":0,"block_chars":0,"runtime_poll_ms":1,
                "stream_start_timeout_ms":10,"defaults":{"alpha":-1}}"#,
        )
        .unwrap_err();
        let ConfigError::Invalid(fields) = err else {
            panic!("{err}")
        };
        let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            names,
            [
                "endpoints[0].name",
                "endpoints[2].capacity_blocks",
                "endpoints[2].name",
                "route_header",
                "stream_start_timeout_ms",
                "max_body_bytes",
                "block_chars",
                "runtime_poll_ms",
                "defaults.alpha"
            ]
        );
        assert!(FilterConfig::from_json(br#"{"endpoints":[]}"#).is_err());
    }

    #[test]
    fn runtime_overrides_and_errors() {
        let base = PolicySettings::default();
        let (s, e) = base.with_runtime([
            ("kvroute.policy", "jsq"),
            ("kvroute.alpha", "0.4"),
            ("kvroute.beta", "nan"),
            ("kvroute.publish_interval_ms", "never"),
            ("kvroute.hash_mode", "rendezvous"),
            ("kvroute.directory_epoch", "7"),
            ("kvroute.load_refresh_ms", "250"),
            ("kvroute.frobnicate", "1"),
            ("other.key", "x"),
        ]);
        assert_eq!(s.policy, PolicyKind::Jsq);
        assert_eq!(s.alpha, 0.4);
        assert_eq!(s.beta, 0.3);
        assert_eq!(s.publish_interval, PublishInterval::Never);
        assert_eq!(s.hash_mode, HashMode::Rendezvous);
        assert_eq!(s.directory_epoch, 7);
        assert_eq!(s.load_refresh_ms, 250);
        let fields: Vec<&str> = e.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["kvroute.beta", "kvroute.frobnicate"]);
        let (s, _) = base.with_runtime([("kvroute.publish_interval_ms", "0")]);
        assert_eq!(s.publish_interval, PublishInterval::EveryDecision);
        let (s, _) = base.with_runtime([("kvroute.publish_interval_ms", "500")]);
        assert_eq!(s.publish_interval, PublishInterval::Millis(500));
    }
}
