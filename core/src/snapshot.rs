//! The sidecar's snapshot: what it knows about every engine, as the filter's singleton pulls it.
//!
//! JSON, versioned by `schema`. The sidecar builds it from each engine's Prometheus `/metrics`;
//! the singleton merges it into the published state (health, engine load, KV capacity).

use serde::{Deserialize, Serialize};

/// Current schema version.
pub const SCHEMA: u32 = 1;

/// One snapshot of every engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Schema version ([`SCHEMA`]).
    pub schema: u32,
    /// Increases with every snapshot the sidecar builds.
    pub version: u64,
    /// When it was built, ms since the epoch.
    pub generated_at_ms: u64,
    /// The sidecar's poll interval, ms.
    pub poll_interval_ms: u32,
    /// One entry per configured engine.
    pub engines: Vec<EngineSnapshot>,
}

/// What the sidecar knows about one engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineSnapshot {
    /// Engine name (the router's endpoint name).
    pub name: String,
    /// False after `unhealthy_after` consecutive failed scrapes.
    pub healthy: bool,
    /// Consecutive failed scrapes.
    pub consecutive_failures: u32,
    /// When the last successful scrape finished, ms since the epoch (0: never).
    pub scraped_at_ms: u64,
    /// `vllm:num_requests_waiting`
    pub waiting: f64,
    /// `vllm:num_requests_running`
    pub running: f64,
    /// `vllm:kv_cache_usage_perc` (0..=1)
    pub kv_usage: f64,
    /// Prefix-cache hit rate over the recent window (hits / queries deltas); None without queries.
    pub hit_rate: Option<f64>,
    /// Prompt tokens per second over the recent window.
    pub prompt_tokens_per_s: f64,
    /// Generated tokens per second over the recent window.
    pub generation_tokens_per_s: f64,
    /// KV capacity in tokens (`cache_config_info`: `num_gpu_blocks * block_size`).
    pub capacity_tokens: Option<u64>,
    /// Measured prefill throughput, tokens/s ([`crate::rates`]; 0: not measured yet).
    #[serde(default)]
    pub prefill_tps: f64,
    /// Measured time per output token, seconds ([`crate::rates`]; 0: not measured yet).
    #[serde(default)]
    pub step_s: f64,
    /// Counter resets seen (engine restarts).
    pub restarts: u32,
    /// Why the last failed scrape failed (cleared by a successful one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Snapshot {
    /// Parses a snapshot, refusing other schema versions.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let s: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if s.schema != SCHEMA {
            return Err(format!(
                "snapshot schema {} (this build reads {SCHEMA})",
                s.schema
            ));
        }
        Ok(s)
    }
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
    fn round_trip_and_schema_check() {
        let s = Snapshot {
            schema: SCHEMA,
            version: 3,
            generated_at_ms: 10,
            poll_interval_ms: 100,
            engines: vec![EngineSnapshot {
                name: "e0".into(),
                healthy: true,
                consecutive_failures: 0,
                scraped_at_ms: 9,
                waiting: 1.0,
                running: 2.0,
                kv_usage: 0.5,
                hit_rate: Some(0.25),
                prompt_tokens_per_s: 100.0,
                generation_tokens_per_s: 20.0,
                capacity_tokens: Some(11_376),
                prefill_tps: 12_000.0,
                step_s: 0.012,
                restarts: 0,
                last_error: None,
            }],
        };
        let bytes = serde_json::to_vec(&s).unwrap();
        assert_eq!(Snapshot::from_json(&bytes).unwrap(), s);
        let mut other = s;
        other.schema = 2;
        assert!(Snapshot::from_json(&serde_json::to_vec(&other).unwrap()).is_err());
        assert!(Snapshot::from_json(b"{}").is_err());
    }
}
