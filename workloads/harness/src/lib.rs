//! kvroute-harness: the real stack, started and driven from Rust.
//!
//! - [`envoy_config`]: renders a complete Envoy bootstrap (filter, singleton, routes, clusters,
//!   runtime layers, stats tags) for any set of engines; `envoy/envoy.yaml` is its default output.
//! - [`stack`]: owns an Envoy process as a child, waits until kvroute has published its state, and
//!   talks to the admin API (stats, runtime values).
//! - [`procs`]: the sidecar, Redis and other processes as children.
//! - [`emulated`]: emulated vLLM engines (kvroute-emulator) and the sidecar, run in-process.
//! - [`peer`]: peer routers (SGLang's model gateway) in front of the same engines.
//! - [`echo`]: a minimal OpenAI-shaped endpoint that says which endpoint served each request and
//!   can hold requests open: the routing tests use it where they need that control.
//! - [`scripted`]: a small scripted multi-turn workload and the engine-side numbers it is judged
//!   by (the demo's and the benchmarks').

pub mod echo;
pub mod emulated;
pub mod envoy_config;
pub mod peer;
pub mod procs;
pub mod scripted;
pub mod stack;
