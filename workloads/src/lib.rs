//! kvroute-workloads: running kvroute for real.
//!
//! - [`envoy_config`]: renders a complete Envoy bootstrap (filter, singleton, routes, clusters, runtime
//!   layers, stats tags) for any set of engines; `envoy/envoy.yaml` is its default output.
//! - [`stack`]: owns an Envoy process as a child, waits until kvroute has published its state, and
//!   talks to the admin API (stats, runtime values).
//! - [`echo`]: a minimal OpenAI-shaped HTTP endpoint that says which endpoint served each request.
//!   It stands in for engines in the end-to-end tests and the demo until the emulator exists.

pub mod echo;
pub mod envoy_config;
pub mod stack;
