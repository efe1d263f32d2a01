//! kvroute-engine: the model of a vLLM engine, without I/O or a clock.
//!
//! - [`engine`]: vLLM V1's scheduler (chunked prefill, a token budget per step, preemption) over
//!   [`block_pool`], vLLM's KV block pool with its prefix cache and LRU eviction;
//! - [`profile`]: the calibrated step-time model of a GPU and model;
//! - [`residency`]: vLLM's KV cache residency metrics (`--kv-cache-metrics`): how long sampled
//!   blocks live and idle before eviction;
//! - [`counters`]: vLLM's counters a study reads, summed over engines;
//! - [`tokenizer`]: a deterministic tokenizer with a chat template, so prompts have token counts
//!   and prefix blocks as a real engine's would.
//!
//! The emulator (`kvroute-emulator`) drives it in real time behind an OpenAI-compatible server; the
//! simulator (`kvroute-sim`) drives it in virtual time. Both see the same engine.

pub mod block_pool;
pub mod counters;
pub mod engine;
pub mod profile;
pub mod residency;
pub mod tokenizer;
