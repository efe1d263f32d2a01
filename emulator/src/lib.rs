//! kvroute-emulator: a vLLM-compatible engine that runs without a GPU.
//!
//! The engine model lives in `kvroute-engine` (re-exported here as [`engine`], [`block_pool`],
//! [`profile`], [`tokenizer`]): it has no I/O and no clock, and this crate's server drives it in
//! real (optionally scaled) time, as the simulator drives it in virtual time. [`server`] is the
//! OpenAI-compatible HTTP front end, [`metrics`] renders vLLM's metric families and [`kv_events`]
//! publishes vLLM's KV cache events.

pub use kvroute_engine::{block_pool, engine, profile, tokenizer};

pub mod kv_events;
pub mod metrics;
pub mod server;
