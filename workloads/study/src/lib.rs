//! kvroute-study: the routing study, from a plan to a report.
//!
//! - [`plan`]: experiments as TOML files (the reduced and the full plan are embedded).
//! - [`study`]: a live run against Envoy and emulated (or real) engines, and its result.
//! - [`simulated`]: the same runs in the simulator, as the same results.
//! - [`search`]: the sustainable-rate search (doubling, then bisection), live and simulated.
//! - [`criterion`]: the default policy against the best of every cell.
//! - [`report`]: the figures and `report.html`.

pub mod criterion;
pub mod plan;
pub mod report;
pub mod search;
pub mod simulated;
pub mod study;
