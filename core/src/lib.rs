//! kvroute-core: everything kvroute decides, with no I/O.
//!
//! This crate is the pure part of the router. It parses OpenAI request bodies, turns the prompt into
//! canonical, turn-aware text and chained block hashes, keeps the bounded prefix directory, defines
//! the routing policies and the state the Envoy singleton publishes to the workers. It never reads a
//! clock, never draws a global random number and never calls a host function: time (`now_ms`) and
//! randomness (`rand`) are arguments. The wasm filter, the simulator and the tests run this same code.
//!
//! Invariants:
//! - no panic is reachable from input (clippy denies unwrap/expect/panic/indexing outside tests);
//! - every structure is bounded by configuration (blocks per request, directory entries per endpoint,
//!   sessions, endpoints <= [`MAX_ENDPOINTS`]).

pub mod config;
pub mod directory;
pub mod fleet;
pub mod hash;
pub mod local;
pub mod policy;
pub mod prefix;
pub mod rates;
pub mod reference;
pub mod request;
pub mod router;
pub mod snapshot;
pub mod state;
pub mod tokens;
pub mod ttft;

/// Most endpoints one router can address (one bit each in a 64-bit mask).
pub const MAX_ENDPOINTS: usize = 64;

pub use config::{ConfigError, FilterConfig, PolicySettings};
pub use hash::BlockHash;
pub use policy::PolicyKind;
