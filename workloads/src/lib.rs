//! kvroute-workloads: running kvroute for real.
//!
//! - [`analyze`]: how much prefix reuse a workload offers, and the oracle hit rates (infinite
//!   cache; the fleet's capacity) that bound every policy.
//! - [`envoy_config`]: renders a complete Envoy bootstrap (filter, singleton, routes, clusters, runtime
//!   layers, stats tags) for any set of engines; `envoy/envoy.yaml` is its default output.
//! - [`stack`]: owns an Envoy process as a child, waits until kvroute has published its state, and
//!   talks to the admin API (stats, runtime values).
//! - [`echo`]: a minimal OpenAI-shaped HTTP endpoint that says which endpoint served each request
//!   and can hold requests open: the routing tests use it where they need that control.
//! - [`emulated`]: emulated vLLM engines (kvroute-emulator) run in-process, for the demo and the
//!   end-to-end tests of caching behind Envoy.
//! - [`replay`]: the replayer: sessions with streaming requests against any OpenAI endpoint, one
//!   JSON line per request (TTFT, inter-token gaps, tokens, cached tokens, endpoint, status).
//! - [`search`]: the sustainable-rate search (doubling, then bisection), live and simulated.
//! - [`scripted`]: a small scripted multi-turn workload and the engine-side numbers it is judged
//!   by (the demo's and the benchmarks').

pub mod analyze;
pub mod calibrate;
pub mod criterion;
pub mod echo;
pub mod emulated;
pub mod engine_api;
pub mod envoy_config;
pub mod peer;
pub mod plan;
pub mod procs;
pub mod replay;
pub mod report;
pub mod scripted;
pub mod search;
pub mod simulated;
pub mod sse;
pub mod stack;
pub mod study;
