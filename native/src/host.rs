//! [`NativeHost`]: the control plane's [`Host`] in a native Envoy module.
//!
//! What proxy-wasm gives a Wasm VM, a native module has in process memory or in Envoy's
//! dynamic-module callbacks:
//! - shared data and the decision queue: the control plane's `SharedMemory` (Envoy's rules), one
//!   per filter configuration ([`Shared`]), behind a lock (Envoy's worker threads and its main
//!   thread all reach it); the queue is bounded;
//! - stats: defined on the filter configuration while Envoy creates it (afterwards Envoy refuses new
//!   ones), so [`Shared::defining`] is on only then; later definitions look the name up;
//! - HTTP callouts: the configuration's (`http_filter_config_http_callout`), made and answered on
//!   Envoy's main thread, where the state service runs;
//! - the stream's headers and bodies: the running hook's filter, which every hook records in a
//!   thread-local before it calls the control plane.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvroute_control::memory::SharedMemory;
use kvroute_control::{Host, LogLevel, MetricId, MetricKind, SharedSetError};

use crate::abi::{self, ConfigEnvoyPtr, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr, ModuleBuffer};

/// Messages the decision queue holds at most; an enqueue beyond fails (and the worker counts it)
/// rather than growing without bound while the main thread is busy.
pub const MAX_QUEUED: usize = 65_536;

/// What the control plane's VMs share, for one filter configuration.
#[derive(Debug, Default)]
pub struct Shared {
    /// The configuration Envoy created (its pointer, for stats and callouts).
    pub config: AtomicUsize,
    /// Shared data and the decision queue, with Envoy's rules for proxy-wasm.
    mem: Mutex<SharedMemory>,
    /// A message was queued since the main thread last drained.
    pub queued: AtomicBool,
    metrics: Mutex<HashMap<String, u32>>,
    /// Stats may be defined (Envoy is creating the configuration).
    pub defining: AtomicBool,
    /// The state service's tick, us (0: none).
    pub tick_us: AtomicU64,
    /// The configuration's scheduler (wakes the main thread), once created.
    pub scheduler: AtomicUsize,
}

/// Event id of a scheduler wake for the state service's tick.
pub const EVENT_TICK: u64 = 1;
/// Event id of a scheduler wake for a queued decision report.
pub const EVENT_QUEUE: u64 = 2;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; go on with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn config_ptr(&self) -> ConfigEnvoyPtr {
        self.config.load(Ordering::Acquire) as ConfigEnvoyPtr
    }

    /// Asks Envoy to run event `id` on the main thread.
    pub fn wake(&self, id: u64) {
        let s = self.scheduler.load(Ordering::Acquire);
        if s != 0 {
            // SAFETY: a scheduler Envoy created for this configuration; it is deleted only after
            // the tick thread stops and no filter of the configuration runs.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                    s as abi::SchedulerPtr,
                    id,
                )
            };
        }
    }

    /// The ids of the queues that hold messages.
    pub fn nonempty_queues(&self) -> Vec<u32> {
        lock(&self.mem).nonempty_queues()
    }
}

thread_local! {
    /// The filter whose hook is running on this thread (null outside a hook).
    static FILTER: Cell<usize> = const { Cell::new(0) };
    /// The callout response being delivered on this thread: `:status` and body.
    static RESPONSE: RefCell<Option<(Option<String>, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Puts the thread's running filter back when dropped (also when the work panicked).
struct Restore(usize);

impl Drop for Restore {
    fn drop(&mut self) {
        FILTER.with(|c| c.set(self.0));
    }
}

/// Runs `f` with `filter` as the running hook's filter.
pub fn with_filter<R>(filter: FilterEnvoyPtr, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(FILTER.with(|c| c.replace(filter as usize)));
    f()
}

/// Clears the callout response when dropped.
struct Clear;

impl Drop for Clear {
    fn drop(&mut self) {
        RESPONSE.with(|r| *r.borrow_mut() = None);
    }
}

/// Runs `f` with a callout response to read.
pub fn with_response<R>(status: Option<String>, body: Vec<u8>, f: impl FnOnce() -> R) -> R {
    RESPONSE.with(|r| *r.borrow_mut() = Some((status, body)));
    let _clear = Clear;
    f()
}

fn current_filter() -> Option<FilterEnvoyPtr> {
    let p = FILTER.with(Cell::get);
    (p != 0).then_some(p as FilterEnvoyPtr)
}

/// The chunks of one of the running stream's body buffers, joined.
pub fn body(filter: FilterEnvoyPtr, body_types: &[u32], limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for &t in body_types {
        // SAFETY: `filter` is the running hook's.
        let n = unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(filter, t) };
        if n == 0 {
            continue;
        }
        let mut chunks = vec![EnvoyBuffer::default(); n];
        // SAFETY: `chunks` has room for the `n` chunks Envoy reported.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks(filter, t, chunks.as_mut_ptr())
        };
        if !ok {
            continue;
        }
        for c in &chunks {
            // SAFETY: Envoy's chunk, valid until the hook returns; copied here.
            let b = unsafe { c.bytes() };
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(b.get(..room.min(b.len())).unwrap_or_default());
        }
    }
    out
}

/// One value of a header of the running stream (the first).
pub fn header(filter: FilterEnvoyPtr, header_type: u32, name: &str) -> Option<Vec<u8>> {
    let mut out = EnvoyBuffer::default();
    let mut count = 0usize;
    // SAFETY: `filter` is the running hook's; `out` and `count` are valid for writes.
    let found = unsafe {
        abi::envoy_dynamic_module_callback_http_get_header(
            filter,
            header_type,
            ModuleBuffer::of(name.as_bytes()),
            &mut out,
            0,
            &mut count,
        )
    };
    // SAFETY: Envoy's header value, valid until the hook returns; copied here.
    (found && count > 0).then(|| unsafe { out.bytes() }.to_vec())
}

/// The control plane's host in a native module: cheap to clone (one pointer).
#[derive(Debug, Clone)]
pub struct NativeHost {
    pub shared: Arc<Shared>,
}

fn level(l: LogLevel) -> u32 {
    match l {
        LogLevel::Trace => 0,
        LogLevel::Debug => 1,
        LogLevel::Info => 2,
        LogLevel::Warn => 3,
        LogLevel::Error => 4,
        LogLevel::Critical => 5,
    }
}

const KIND_BITS: u32 = 2;

fn kind_code(k: MetricKind) -> u32 {
    match k {
        MetricKind::Counter => 0,
        MetricKind::Gauge => 1,
        MetricKind::Histogram => 2,
    }
}

impl Host for NativeHost {
    fn now_ns(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }

    fn log(&self, l: LogLevel, msg: &str) {
        // SAFETY: a buffer valid for the call.
        unsafe {
            abi::envoy_dynamic_module_callback_log(level(l), ModuleBuffer::of(msg.as_bytes()))
        };
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        lock(&self.shared.mem).get(key)
    }

    fn shared_set(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<bool, SharedSetError> {
        Ok(lock(&self.shared.mem).set(key, value, cas))
    }

    fn register_queue(&self, name: &str) -> Option<u32> {
        Some(lock(&self.shared.mem).register_queue(name))
    }

    fn resolve_queue(&self, name: &str) -> Option<u32> {
        lock(&self.shared.mem).resolve_queue(name)
    }

    fn enqueue(&self, queue: u32, msg: &[u8]) -> bool {
        if !lock(&self.shared.mem).enqueue(queue, msg, MAX_QUEUED) {
            return false;
        }
        // One wake for a run of messages: the main thread drains them all.
        if !self.shared.queued.swap(true, Ordering::AcqRel) {
            self.shared.wake(EVENT_QUEUE);
        }
        true
    }

    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        lock(&self.shared.mem).dequeue(queue)
    }

    fn set_tick(&self, period: Duration) -> bool {
        self.shared
            .tick_us
            .store(period.as_micros().max(1) as u64, Ordering::Release);
        true
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
        let mut headers = [
            abi::ModuleHeader::of(":method", method),
            abi::ModuleHeader::of(":path", path),
            abi::ModuleHeader::of("host", authority),
        ];
        let mut id = 0u64;
        // SAFETY: the configuration's pointer, on the main thread (the state service's); every
        // buffer is valid for the call.
        let r = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.shared.config_ptr(),
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                headers.as_mut_ptr(),
                headers.len(),
                body.map_or(ModuleBuffer::null(), ModuleBuffer::of),
                timeout.as_millis() as u64,
            )
        };
        (r == abi::CALLOUT_INIT_SUCCESS).then_some(id as u32)
    }

    fn call_response_status(&self) -> Option<String> {
        RESPONSE.with(|r| r.borrow().as_ref().and_then(|(s, _)| s.clone()))
    }

    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        RESPONSE.with(|r| {
            r.borrow()
                .as_ref()
                .map(|(_, b)| b.get(..size.min(b.len())).unwrap_or_default().to_vec())
        })
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> MetricId {
        let mut known = lock(&self.shared.metrics);
        if let Some(id) = known.get(name) {
            return Some(*id);
        }
        if !self.shared.defining.load(Ordering::Acquire) {
            return None;
        }
        let config = self.shared.config_ptr();
        let mut id = 0usize;
        let n = ModuleBuffer::of(name.as_bytes());
        let null = std::ptr::null_mut();
        // SAFETY: the configuration's pointer while Envoy creates it; `id` is valid for writes.
        let r = unsafe {
            match kind {
                MetricKind::Counter => {
                    abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                        config, n, null, 0, &mut id,
                    )
                }
                MetricKind::Gauge => {
                    abi::envoy_dynamic_module_callback_http_filter_config_define_gauge(
                        config, n, null, 0, &mut id,
                    )
                }
                MetricKind::Histogram => {
                    abi::envoy_dynamic_module_callback_http_filter_config_define_histogram(
                        config, n, null, 0, &mut id,
                    )
                }
            }
        };
        if r != abi::METRICS_SUCCESS || id >= (1 << (32 - KIND_BITS)) {
            return None;
        }
        let code = (id as u32) << KIND_BITS | kind_code(kind);
        known.insert(name.to_owned(), code);
        Some(code)
    }

    fn increment(&self, id: MetricId, by: i64) {
        let Some(code) = id else { return };
        let (i, kind) = ((code >> KIND_BITS) as usize, code & 3);
        let config = self.shared.config_ptr();
        let null = std::ptr::null_mut();
        // SAFETY: an id this configuration defined; Envoy's stats are safe to update from any
        // thread.
        unsafe {
            match (kind, by >= 0) {
                (0, true) => {
                    abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                        config, i, null, 0, by as u64,
                    );
                }
                (1, true) => {
                    abi::envoy_dynamic_module_callback_http_filter_config_increment_gauge(
                        config, i, null, 0, by as u64,
                    );
                }
                (1, false) => {
                    abi::envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
                        config,
                        i,
                        null,
                        0,
                        by.unsigned_abs(),
                    );
                }
                _ => {}
            }
        }
    }

    fn record(&self, id: MetricId, value: u64) {
        let Some(code) = id else { return };
        let (i, kind) = ((code >> KIND_BITS) as usize, code & 3);
        let config = self.shared.config_ptr();
        let null = std::ptr::null_mut();
        // SAFETY: as in `increment`.
        unsafe {
            match kind {
                1 => {
                    abi::envoy_dynamic_module_callback_http_filter_config_set_gauge(
                        config, i, null, 0, value,
                    );
                }
                2 => {
                    abi::envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
                        config, i, null, 0, value,
                    );
                }
                _ => {}
            }
        }
    }

    fn request_headers(&self) -> Option<Vec<(String, Vec<u8>)>> {
        let filter = current_filter()?;
        // SAFETY: the running hook's filter.
        let n = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers_size(filter, abi::REQUEST_HEADER)
        };
        let mut hs = vec![EnvoyHeader::default(); n];
        // SAFETY: `hs` has room for the `n` headers Envoy reported.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers(
                filter,
                abi::REQUEST_HEADER,
                hs.as_mut_ptr(),
            )
        };
        if !ok {
            return None;
        }
        Some(
            hs.iter()
                .map(|h| {
                    // SAFETY: Envoy's header, valid until the hook returns; copied here.
                    let (k, v) = unsafe { h.parts() };
                    (String::from_utf8_lossy(k).into_owned(), v.to_vec())
                })
                .collect(),
        )
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> bool {
        let Some(filter) = current_filter() else {
            return false;
        };
        let v = value.map_or(ModuleBuffer::null(), |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: the running hook's filter; both buffers are valid for the call.
        let set = unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                filter,
                abi::REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                v,
            )
        };
        if set {
            // The Wasm host clears the route cache on a header write and this one does not; the
            // route was looked up when the stream started, so have Envoy pick it again.
            // SAFETY: the running hook's filter.
            unsafe { abi::envoy_dynamic_module_callback_http_clear_route_cache(filter) };
        }
        set
    }

    fn add_response_header(&self, name: &str, value: &str) -> bool {
        let Some(filter) = current_filter() else {
            return false;
        };
        // SAFETY: the running hook's filter; both buffers are valid for the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_add_header(
                filter,
                abi::RESPONSE_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        }
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        let filter = current_filter()?;
        // Envoy holds what it buffered so far and the last chunk apart.
        Some(body(
            filter,
            &[abi::BUFFERED_REQUEST_BODY, abi::RECEIVED_REQUEST_BODY],
            size,
        ))
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        let filter = current_filter()?;
        Some(body(filter, &[abi::RECEIVED_RESPONSE_BODY], size))
    }

    fn upstream_address(&self) -> Option<String> {
        let filter = current_filter()?;
        let mut out = EnvoyBuffer::default();
        // SAFETY: the running hook's filter; `out` is valid for writes.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                filter,
                abi::ATTRIBUTE_UPSTREAM_ADDRESS,
                &mut out,
            )
        };
        // SAFETY: Envoy's value, valid until the hook returns; copied here.
        ok.then(|| String::from_utf8_lossy(unsafe { out.bytes() }).into_owned())
            .filter(|s| !s.is_empty())
    }
}
