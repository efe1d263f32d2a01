//! kvroute-loadgen: load against any OpenAI endpoint, and what a workload offers.
//!
//! - [`replay`]: the replayer: sessions with streaming requests against any OpenAI endpoint (Envoy
//!   with kvroute, vLLM, the emulator), one JSON line per request (TTFT, inter-token gaps, tokens,
//!   cached tokens, endpoint, status).
//! - [`calibrate`]: measures an engine (a real vLLM, or the emulator) into a latency profile the
//!   emulator loads.
//! - [`analyze`]: how much prefix reuse a workload offers, and the oracle hit rates (infinite
//!   cache; the fleet's capacity) that bound every policy.
//! - [`sse`]: the one reader of streamed responses every client here uses.
//! - [`engine_api`]: an engine's `/metrics` page and served model.

pub mod analyze;
pub mod calibrate;
pub mod engine_api;
pub mod replay;
pub mod sse;
