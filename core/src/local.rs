//! A router that keeps its whole state in one process: the directory behind a lock and the
//! gateway in-flight counts in atomics, shared by every thread. The request paths that run
//! outside Envoy's Wasm VMs use it: the native dynamic-module probe and the ext_proc processor.
//! The same decision as the filter's (`router::decide` on the directory), without a state service
//! or published state: every decision records into the one directory at once.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::directory::Directory;
use crate::request::ApiKind;
use crate::router::{self, Decision, Inputs};
use crate::FilterConfig;

/// The shared state of one in-process router.
#[derive(Debug)]
pub struct LocalRouter {
    /// The configuration (endpoints, block spec, policy settings).
    pub config: FilterConfig,
    directory: Mutex<Directory>,
    inflight: Vec<AtomicI64>,
    inflight_blocks: Vec<AtomicI64>,
    seq: AtomicU64,
}

/// A routed request's share of the in-flight counts, given back by [`LocalRouter::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// The endpoint.
    pub endpoint: usize,
    /// Its prefix blocks.
    pub blocks: i64,
}

impl LocalRouter {
    /// A router for `config` with an empty directory sized by each endpoint's capacity.
    pub fn new(config: FilterConfig) -> Self {
        let capacities: Vec<u32> = (0..config.endpoints.len())
            .map(|i| config.capacity_of(i))
            .collect();
        let directory = Mutex::new(Directory::with_spec(
            &capacities,
            config.session_capacity,
            &config.block_spec(),
        ));
        let n = config.endpoints.len();
        Self {
            directory,
            inflight: (0..n).map(|_| AtomicI64::new(0)).collect(),
            inflight_blocks: (0..n).map(|_| AtomicI64::new(0)).collect(),
            seq: AtomicU64::new(0),
            config,
        }
    }

    /// Decides for one request body of `kind` (a body that does not parse is routed by load),
    /// records it in the directory and counts it in flight. None only if the lock is poisoned.
    pub fn route(
        &self,
        kind: ApiKind,
        body: &[u8],
        session: Option<&str>,
    ) -> Option<(Decision, Counted)> {
        let c = &self.config;
        let features = router::body_features(kind, body, session, c.block_spec()).ok();
        let inflight: Vec<i64> = self
            .inflight
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let blocks: Vec<i64> = self
            .inflight_blocks
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let inputs = Inputs {
            endpoints: &c.endpoints,
            status: &[],
            inflight: &inflight,
            inflight_blocks: &blocks,
            inflight_prefill: &[],
            chars_per_token: c.chars_per_token,
            spec: c.block_spec(),
            directory_age_ms: 0,
            settings: &c.defaults,
            seq,
            // splitmix64 of the sequence: only p2c draws and ties read it.
            rand: splitmix(seq),
        };
        let decision = {
            let mut dir = self.directory.lock().ok()?;
            let d = match &features {
                Some(f) => router::decide(f, &*dir, &inputs, None),
                None => router::decide_by_load(&inputs),
            };
            if let Some(f) = &features {
                dir.record(d.endpoint, &f.blocks, f.session);
            }
            d
        };
        let counted = Counted {
            endpoint: decision.endpoint,
            blocks: i64::from(decision.total_blocks),
        };
        if let (Some(i), Some(ib)) = (
            self.inflight.get(counted.endpoint),
            self.inflight_blocks.get(counted.endpoint),
        ) {
            i.fetch_add(1, Ordering::Relaxed);
            ib.fetch_add(counted.blocks, Ordering::Relaxed);
        }
        Some((decision, counted))
    }

    /// The routed request is done: its in-flight share is given back.
    pub fn complete(&self, counted: Counted) {
        if let (Some(i), Some(ib)) = (
            self.inflight.get(counted.endpoint),
            self.inflight_blocks.get(counted.endpoint),
        ) {
            i.fetch_sub(1, Ordering::Relaxed);
            ib.fetch_sub(counted.blocks, Ordering::Relaxed);
        }
    }

    /// Requests in flight per endpoint.
    pub fn inflight(&self) -> Vec<i64> {
        self.inflight
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }
}

fn splitmix(seq: u64) -> u64 {
    let mut z = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    use crate::config::{EndpointConfig, PolicySettings};
    use crate::policy::PolicyKind;

    fn router(policy: PolicyKind) -> LocalRouter {
        let mut c = FilterConfig::with_endpoints(
            (0..2)
                .map(|i| EndpointConfig {
                    name: format!("engine{i}"),
                    cluster: None,
                    capacity_blocks: None,
                    address: None,
                })
                .collect(),
        );
        c.defaults = PolicySettings {
            policy,
            ..PolicySettings::default()
        };
        LocalRouter::new(c)
    }

    fn chat(text: &str) -> Vec<u8> {
        serde_json::json!({"messages": [{"role": "user", "content": text}]})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_repeated_prompt_goes_home_and_counts_come_back() {
        let r = router(PolicyKind::PredictedTtft);
        let long = "a long shared history ".repeat(200);
        let (first, c1) = r.route(ApiKind::Chat, &chat(&long), None).unwrap();
        assert_eq!(r.inflight()[first.endpoint], 1);
        r.complete(c1);
        // Nothing in flight, the prefix recorded: the same prompt goes to the same endpoint.
        let (again, c2) = r.route(ApiKind::Chat, &chat(&long), None).unwrap();
        assert_eq!(again.endpoint, first.endpoint);
        assert!(again.predicted_blocks > 0, "{again:?}");
        r.complete(c2);
        assert_eq!(r.inflight(), vec![0, 0]);
    }

    #[test]
    fn jsq_spreads_what_is_in_flight_and_bad_bodies_are_routed_by_load() {
        let r = router(PolicyKind::Jsq);
        let (a, _ca) = r.route(ApiKind::Chat, &chat("one"), None).unwrap();
        let (b, _cb) = r.route(ApiKind::Chat, b"{not json", None).unwrap();
        assert_ne!(
            a.endpoint, b.endpoint,
            "the second goes to the idle endpoint"
        );
        assert_eq!(r.inflight(), vec![1, 1]);
    }
}
