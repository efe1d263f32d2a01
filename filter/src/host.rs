//! Small wrappers over `proxy_wasm::hostcalls` that turn host failures into `None`/`false`, so the
//! callers decide what a failure means (count it, fall back) instead of unwrapping.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

/// Wall-clock time in microseconds since the epoch (0 if the host cannot tell).
pub fn now_us() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as u64)
}

/// Wall-clock time in nanoseconds since the epoch (0 if the host cannot tell).
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

pub fn plugin_configuration(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
        .ok()
        .flatten()
}

pub fn plugin_root_id() -> Option<String> {
    let b = hostcalls::get_property(vec!["plugin_root_id"])
        .ok()
        .flatten()?;
    String::from_utf8(b).ok()
}

/// All request headers in one host call (each single-header read that finds a value costs a call
/// back into the module's allocator; this costs one for the lot).
pub fn request_headers() -> Option<Vec<(String, Vec<u8>)>> {
    hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok()
}

/// The address of the upstream host that served the request (after any retry), `IP:port`.
pub fn upstream_address() -> Option<String> {
    hostcalls::get_property(vec!["upstream", "address"])
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
}

pub fn set_request_header(name: &str, value: Option<&str>) -> bool {
    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).is_ok()
}

pub fn add_response_header(name: &str, value: &str) -> bool {
    hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).is_ok()
}

pub fn request_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
        .ok()
        .flatten()
}

pub fn response_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
        .ok()
        .flatten()
}

pub fn call_response_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
        .ok()
        .flatten()
}

pub fn call_response_status() -> Option<String> {
    let b = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()?;
    String::from_utf8(b).ok()
}

pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

/// Ok(true) stored, Ok(false) CAS mismatch, Err other failure.
pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, ()> {
    match hostcalls::set_shared_data(key, Some(value), cas) {
        Ok(()) => Ok(true),
        Err(proxy_wasm::types::Status::CasMismatch) => Ok(false),
        Err(_) => Err(()),
    }
}

pub fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

pub fn increment(id: Option<u32>, by: i64) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, by);
    }
}

pub fn record(id: Option<u32>, value: u64) {
    if let Some(id) = id {
        let _ = hostcalls::record_metric(id, value);
    }
}

pub fn register_queue(name: &str) -> Option<u32> {
    hostcalls::register_shared_queue(name).ok()
}

pub fn resolve_queue(vm_id: &str, name: &str) -> Option<u32> {
    hostcalls::resolve_shared_queue(vm_id, name).ok().flatten()
}

pub fn enqueue(queue: u32, msg: &[u8]) -> bool {
    hostcalls::enqueue_shared_queue(queue, Some(msg)).is_ok()
}

pub fn dequeue(queue: u32) -> Option<Vec<u8>> {
    hostcalls::dequeue_shared_queue(queue).ok().flatten()
}

pub fn set_tick(period: Duration) -> bool {
    hostcalls::set_tick_period(period).is_ok()
}

pub fn http_get(cluster: &str, authority: &str, path: &str, timeout: Duration) -> Option<u32> {
    hostcalls::dispatch_http_call(
        cluster,
        vec![
            (":method", "GET"),
            (":path", path),
            (":authority", authority),
        ],
        None,
        vec![],
        timeout,
    )
    .ok()
}

pub fn vm_id() -> Option<String> {
    let b = hostcalls::get_property(vec!["plugin_vm_id"])
        .ok()
        .flatten()?;
    String::from_utf8(b).ok()
}
