//! What the control plane needs from the proxy: the [`Host`] trait.
//!
//! The filter implements it over `proxy_wasm::hostcalls` (one zero-sized type, so every call is
//! static); [`crate::in_memory::InMemoryHost`] implements it in memory for the unit tests. Every method
//! turns a host failure into `None`/`false`/`Err`, so the callers decide what a failure means
//! (count it, fall back) instead of unwrapping.

use std::time::Duration;

/// Log levels, as proxy-wasm has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

/// The kinds of stat a host defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A defined stat (None where the host refused to define it: recording to it does nothing).
pub type MetricId = Option<u32>;

/// A shared-data write that the host refused for another reason than a CAS mismatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedSetError;

/// The proxy as the control plane sees it: one VM's view of shared data, shared queues, its clock,
/// its stats, HTTP callouts, and the HTTP stream whose callback is running.
pub trait Host {
    /// Wall-clock time in nanoseconds since the epoch (0 if the host cannot tell).
    fn now_ns(&self) -> u64;
    /// Wall-clock time in microseconds since the epoch.
    fn now_us(&self) -> u64 {
        self.now_ns() / 1000
    }
    fn log(&self, level: LogLevel, msg: &str);

    /// A shared-data value and its compare-and-swap token.
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Ok(true) stored, Ok(false) CAS mismatch (`cas` was not the value's token any more).
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>)
        -> Result<bool, SharedSetError>;

    /// Registers this VM's queue `name` (the state service's decision queue).
    fn register_queue(&self, name: &str) -> Option<u32>;
    /// Finds the queue `name` registered by a VM of this VM's `vm_id`.
    fn resolve_queue(&self, name: &str) -> Option<u32>;
    fn enqueue(&self, queue: u32, msg: &[u8]) -> bool;
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>>;

    /// Sets the root context's tick period.
    fn set_tick(&self, period: Duration) -> bool;

    /// Sends `method path` with `body` to `cluster`; the answer arrives as a call response with
    /// this token.
    fn http_call(
        &self,
        cluster: &str,
        authority: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Option<u32>;
    /// [`Host::http_call`] with `GET` and no body.
    fn http_get(
        &self,
        cluster: &str,
        authority: &str,
        path: &str,
        timeout: Duration,
    ) -> Option<u32> {
        self.http_call(cluster, authority, "GET", path, None, timeout)
    }
    /// The `:status` of the call response being delivered.
    fn call_response_status(&self) -> Option<String>;
    /// The body of the call response being delivered.
    fn call_response_body(&self, size: usize) -> Option<Vec<u8>>;

    fn define_metric(&self, kind: MetricKind, name: &str) -> MetricId;
    fn increment(&self, id: MetricId, by: i64);
    fn record(&self, id: MetricId, value: u64);

    /// The current stream's request headers, all in one call.
    fn request_headers(&self) -> Option<Vec<(String, Vec<u8>)>>;
    /// Sets (Some) or removes (None) a request header of the current stream.
    fn set_request_header(&self, name: &str, value: Option<&str>) -> bool;
    fn add_response_header(&self, name: &str, value: &str) -> bool;
    /// The current stream's buffered request body, up to `size` bytes.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// The current response body chunk, up to `size` bytes.
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// The address (`IP:port`) of the upstream host that served the stream, after any retry.
    fn upstream_address(&self) -> Option<String>;
}
