//! kvroute-control: the gateway's control plane, written once against the [`Host`] trait.
//!
//! - [`worker`]: the request path. One [`Worker`] per VM (it reads the published state and the
//!   gateway's in-flight counts, decides, reports decisions to the state service) and one
//!   [`Stream`] per HTTP stream (its callbacks: headers, body, response, end).
//! - [`service`]: the state service. It owns the prefix directory, applies the decisions that the
//!   workers report over a shared queue, polls runtime values and the sidecar's snapshot, and
//!   publishes one versioned state (with overlays of the directory's changes between states).
//! - [`fleet`]: the state service's exchange with the other Envoy replicas' (a shared decision log
//!   in Redis, through the sidecar).
//! - [`standby`]: every filter VM stands by for the state service and takes its lease over when
//!   the service's VM dies.
//! - [`memory`]: shared data and queues in process memory with Envoy's rules (the native module's,
//!   and the in-memory host's).
//! - [`in_memory`]: a [`Host`] in memory on a virtual clock (shared data with CAS, queues, stats,
//!   callouts and one stream at a time): the unit tests drive several VMs at once on it, and the
//!   simulator runs each gateway replica's control plane on it.
//!
//! The proxy-wasm filter (`filter/`) is the callbacks, the root-id dispatch and `impl Host` over
//! `proxy_wasm::hostcalls`; everything else lives here, where it is unit tested.

pub mod fleet;
pub mod host;
pub mod in_memory;
pub mod memory;
pub mod metrics;
pub mod service;
pub mod standby;
pub mod worker;

pub use host::{Host, LogLevel, MetricId, MetricKind, SharedSetError};
pub use service::{Role, StateService};
pub use standby::Standby;
pub use worker::{Flow, Routed, Stream, Worker};

#[cfg(test)]
mod tests;
