//! The filter's stand-by for the state service. Envoy never restarts a bootstrap Wasm service whose
//! VM crashed: without this, a crashed `kvroute_state` would leave the directory frozen and the
//! decision queue filling with reports nobody reads. Every filter root context watches the
//! service's lease (`state::LEASE_KEY`); when it expires, the first to swap it runs the state
//! service itself, in its own VM, driven by its own tick, until its lease is lost in turn.

use kvroute_core::state::{self, Lease};
use kvroute_core::FilterConfig;

use crate::host::{Host, LogLevel};
use crate::service::{tick_ms, Role, StateService};

/// How often a stand-by looks at the lease, ms.
const CHECK_MS: u64 = 250;

#[derive(Debug)]
pub struct Standby<H: Host + Clone> {
    host: H,
    config: FilterConfig,
    id: u64,
    started_ms: u64,
    next_check_ms: u64,
    last_tick_ms: u64,
    service: Option<Box<StateService<H>>>,
}

impl<H: Host + Clone> Standby<H> {
    pub fn new(host: H, config: FilterConfig) -> Self {
        let now_ns = host.now_ns();
        let now = now_ns / 1_000_000;
        Self {
            host,
            config,
            // Unique enough among a few VMs: the clock's nanoseconds, scrambled.
            id: (now_ns ^ 0x5bd1_e995_0f1d_3a7b).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            started_ms: now,
            next_check_ms: now + CHECK_MS,
            last_tick_ms: 0,
            service: None,
        }
    }

    /// Called on every tick of the filter's root context.
    pub fn on_tick(&mut self) {
        let now = self.host.now_us() / 1000;
        if let Some(s) = self.service.as_mut() {
            if now.saturating_sub(self.last_tick_ms) >= tick_ms(&self.config) {
                self.last_tick_ms = now;
                s.on_tick();
                if !s.active() {
                    self.service = None;
                }
            }
            return;
        }
        if now < self.next_check_ms {
            return;
        }
        self.next_check_ms = now + CHECK_MS;
        let (value, cas) = self.host.shared_get(state::LEASE_KEY);
        let take = match state::lease(value.as_deref(), self.id, now) {
            Lease::Expired => true,
            Lease::Absent => now.saturating_sub(self.started_ms) >= state::LEASE_ABSENT_MS,
            Lease::Held | Lease::Mine => false,
        };
        if !take
            || self
                .host
                .shared_set(state::LEASE_KEY, &state::encode_lease(self.id, now), cas)
                != Ok(true)
        {
            return;
        }
        self.host.log(
            LogLevel::Warn,
            "kvroute: the state service's lease expired; this filter VM takes it over",
        );
        self.last_tick_ms = now;
        self.service = StateService::start(
            self.host.clone(),
            self.config.clone(),
            Role::Takeover,
            self.id,
        )
        .map(Box::new);
    }

    pub fn on_queue_ready(&mut self, queue: u32) {
        if let Some(s) = self.service.as_mut() {
            s.on_queue_ready(queue);
        }
    }

    pub fn on_http_call_response(&mut self, token: u32, body_size: usize) {
        if let Some(s) = self.service.as_mut() {
            s.on_http_call_response(token, body_size);
        }
    }
}
