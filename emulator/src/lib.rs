//! kvroute-emulator: a vLLM-compatible engine that runs without a GPU.
//!
//! The engine model ([`engine`], [`block_pool`], [`profile`], [`tokenizer`]) has no I/O and no
//! clock: the server drives it in real (optionally scaled) time, the simulator in virtual time.
//! [`server`] is the OpenAI-compatible HTTP front end and [`metrics`] renders vLLM's metric
//! families.

pub mod block_pool;
pub mod engine;
pub mod metrics;
pub mod profile;
pub mod server;
pub mod tokenizer;
