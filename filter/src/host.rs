//! [`WasmHost`]: the control plane's [`Host`] over `proxy_wasm::hostcalls`. A zero-sized type, so
//! the control plane's calls compile to direct host calls.

use std::time::{Duration, UNIX_EPOCH};

use kvroute_control::{Host, LogLevel, MetricId, MetricKind, SharedSetError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

#[derive(Debug, Clone, Copy, Default)]
pub struct WasmHost;

fn level(l: LogLevel) -> proxy_wasm::types::LogLevel {
    use proxy_wasm::types::LogLevel as L;
    match l {
        LogLevel::Trace => L::Trace,
        LogLevel::Debug => L::Debug,
        LogLevel::Info => L::Info,
        LogLevel::Warn => L::Warn,
        LogLevel::Error => L::Error,
        LogLevel::Critical => L::Critical,
    }
}

fn utf8(b: Option<Vec<u8>>) -> Option<String> {
    b.and_then(|b| String::from_utf8(b).ok())
}

impl WasmHost {
    pub fn plugin_configuration(size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
    }

    pub fn plugin_root_id() -> Option<String> {
        utf8(
            hostcalls::get_property(vec!["plugin_root_id"])
                .ok()
                .flatten(),
        )
    }

    fn vm_id() -> String {
        utf8(hostcalls::get_property(vec!["plugin_vm_id"]).ok().flatten())
            .unwrap_or_else(|| "kvroute".into())
    }
}

impl Host for WasmHost {
    fn now_ns(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }

    fn log(&self, l: LogLevel, msg: &str) {
        let _ = hostcalls::log(level(l), msg);
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn shared_set(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<bool, SharedSetError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(_) => Err(SharedSetError),
        }
    }

    fn register_queue(&self, name: &str) -> Option<u32> {
        hostcalls::register_shared_queue(name).ok()
    }

    fn resolve_queue(&self, name: &str) -> Option<u32> {
        hostcalls::resolve_shared_queue(&Self::vm_id(), name)
            .ok()
            .flatten()
    }

    fn enqueue(&self, queue: u32, msg: &[u8]) -> bool {
        hostcalls::enqueue_shared_queue(queue, Some(msg)).is_ok()
    }

    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        hostcalls::dequeue_shared_queue(queue).ok().flatten()
    }

    fn set_tick(&self, period: Duration) -> bool {
        hostcalls::set_tick_period(period).is_ok()
    }

    fn http_call(
        &self,
        cluster: &str,
        authority: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Option<u32> {
        hostcalls::dispatch_http_call(
            cluster,
            vec![
                (":method", method),
                (":path", path),
                (":authority", authority),
            ],
            body,
            vec![],
            timeout,
        )
        .ok()
    }

    fn call_response_status(&self) -> Option<String> {
        utf8(
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten(),
        )
    }

    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
            .ok()
            .flatten()
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> MetricId {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(kind, name).ok()
    }

    fn increment(&self, id: MetricId, by: i64) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, by);
        }
    }

    fn record(&self, id: MetricId, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    fn request_headers(&self) -> Option<Vec<(String, Vec<u8>)>> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok()
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> bool {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).is_ok()
    }

    fn add_response_header(&self, name: &str, value: &str) -> bool {
        hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).is_ok()
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .ok()
            .flatten()
    }

    fn upstream_address(&self) -> Option<String> {
        utf8(
            hostcalls::get_property(vec!["upstream", "address"])
                .ok()
                .flatten(),
        )
    }
}
