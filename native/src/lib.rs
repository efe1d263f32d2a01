//! kvroute-native: kvroute as a native Envoy dynamic module (`envoy.filters.http.dynamic_modules`,
//! a shared object Envoy loads with `dlopen`), the second build of the control plane the `.wasm`
//! runs. Same configuration JSON, same stats, same runtime keys, same fallbacks; no Wasm VM.
//!
//! How the proxy-wasm roles map onto a native module:
//! - the request path: one [`Worker`] per Envoy worker thread (a thread-local, as a Wasm worker VM
//!   is one per thread), one [`Stream`] per HTTP stream;
//! - the state service: one [`StateService`] per filter configuration, run on Envoy's main thread.
//!   A thread of the module's sleeps its tick period and wakes it through the configuration's
//!   scheduler; a queued decision report wakes it too. Its runtime poll and sidecar pull are the
//!   configuration's HTTP callouts, answered on the main thread;
//! - shared data and the decision queue: process memory ([`host::Shared`]). A service in the
//!   main thread cannot die apart from Envoy, so there is no standby for it.
//!
//! Two filter names: `kvroute` (the router) and `floor` (a bench floor: buffer the body and route
//! every chat request to the first endpoint, the work of the Wasm `bench-floor` build).
//!
//! The ABI declarations (`abi.rs`) follow Envoy's dynamic-module ABI header; Envoy 1.38 and later
//! load a module built for the previous minor version as well as for their own, so this one loads
//! in Envoy 1.40 and 1.41.

mod abi;
mod host;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_char;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvroute_control::{Flow, Host, LogLevel, Role, StateService, Stream, Worker};
use kvroute_core::request::ApiKind;
use kvroute_core::FilterConfig;

use abi::{
    ConfigEnvoyPtr, ConfigModulePtr, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr, FilterModulePtr,
};
use host::{lock, NativeHost, Shared, EVENT_TICK};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Kvroute,
    Floor,
}

/// The thread that wakes the state service every tick.
#[derive(Debug)]
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// One filter configuration: what Envoy creates from a `DynamicModuleFilter`.
#[derive(Debug)]
struct Config {
    /// Unique in the process: keys this configuration's workers in each thread.
    id: usize,
    mode: Mode,
    filter: FilterConfig,
    host: NativeHost,
    service: Mutex<Option<StateService<NativeHost>>>,
    ticker: Mutex<Option<Ticker>>,
    /// `kvroute_native_panics_total`: hooks whose work panicked (see [`guarded`]).
    panics: kvroute_control::MetricId,
}

static NEXT_CONFIG: AtomicUsize = AtomicUsize::new(1);
/// Configurations not yet destroyed (their ids).
static LIVE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's worker for each live configuration.
    static WORKERS: RefCell<HashMap<usize, Rc<Worker<NativeHost>>>> = RefCell::new(HashMap::new());
}

impl Config {
    /// This thread's worker (made on its first stream; workers of destroyed configurations go).
    fn worker(&self) -> Rc<Worker<NativeHost>> {
        WORKERS.with(|w| {
            let mut w = w.borrow_mut();
            if let Some(x) = w.get(&self.id) {
                return x.clone();
            }
            let live = lock(&LIVE);
            w.retain(|id, _| live.contains(id));
            // Reports go at once: the queue is a lock in process memory, and a worker thread gets
            // no tick to send a batch by.
            let x = Rc::new(
                Worker::new(self.host.clone(), self.filter.clone()).with_report_coalesce_us(0),
            );
            w.insert(self.id, x.clone());
            x
        })
    }

    /// The state service's turn on the main thread: drain the decision queue, then tick.
    fn on_main(&self, event: u64) {
        let mut guard = lock(&self.service);
        let Some(s) = guard.as_mut() else { return };
        let shared = &self.host.shared;
        if shared.queued.swap(false, Ordering::AcqRel) {
            for q in shared.nonempty_queues() {
                s.on_queue_ready(q);
            }
            // The service takes a bounded number of messages per wake; come back for the rest.
            if !shared.nonempty_queues().is_empty() && !shared.queued.swap(true, Ordering::AcqRel) {
                shared.wake(host::EVENT_QUEUE);
            }
        }
        if event == EVENT_TICK {
            s.on_tick();
        }
    }

    fn stop_ticker(&self) {
        if let Some(t) = lock(&self.ticker).take() {
            t.stop.store(true, Ordering::Release);
            t.thread.thread().unpark();
            let _ = t.thread.join();
        }
        let s = self.host.shared.scheduler.swap(0, Ordering::AcqRel);
        if s != 0 {
            // SAFETY: the scheduler Envoy created for this configuration; the ticker, its only
            // other user, has stopped.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
                    s as abi::SchedulerPtr,
                )
            };
        }
    }
}

/// Starts the thread that wakes the main thread every `shared.tick_us` (100 ms until set).
fn start_ticker(shared: Arc<Shared>) -> Option<Ticker> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name("kvroute-tick".into())
        .spawn(move || loop {
            let us = match shared.tick_us.load(Ordering::Acquire) {
                0 => 100_000,
                us => us,
            };
            std::thread::park_timeout(Duration::from_micros(us));
            if s.load(Ordering::Acquire) {
                break;
            }
            shared.wake(EVENT_TICK);
        })
        .ok()?;
    Some(Ticker { stop, thread })
}

/// One HTTP stream.
struct Filter {
    config: Arc<Config>,
    stream: Option<Stream<NativeHost>>,
    /// The floor's request, between its headers and its body.
    floor: Option<ApiKind>,
    ended: bool,
}

impl Filter {
    fn end(&mut self) {
        if !std::mem::replace(&mut self.ended, true) {
            if let Some(s) = self.stream.as_mut() {
                s.on_end();
            }
        }
    }
}

fn headers_status(f: Flow) -> u32 {
    match f {
        Flow::Continue => abi::HEADERS_CONTINUE,
        Flow::Pause => abi::HEADERS_STOP_ITERATION,
    }
}

fn body_status(f: Flow) -> u32 {
    match f {
        Flow::Continue => abi::BODY_CONTINUE,
        Flow::Pause => abi::BODY_STOP_AND_BUFFER,
    }
}

fn body_size(envoy: FilterEnvoyPtr, types: &[u32]) -> usize {
    types
        .iter()
        // SAFETY: the running hook's filter.
        .map(|&t| unsafe { abi::envoy_dynamic_module_callback_http_get_body_size(envoy, t) })
        .sum()
}

/// The module's view of a filter pointer Envoy hands back.
///
/// # Safety
/// `ptr` must be a pointer this module returned from `on_http_filter_new` and not yet destroyed.
unsafe fn filter<'a>(ptr: FilterModulePtr) -> Option<&'a mut Filter> {
    // SAFETY: the caller's contract; Envoy runs one stream's hooks on one thread, one at a time.
    unsafe { (ptr as *mut Filter).as_mut() }
}

/// The module's view of a configuration pointer Envoy hands back.
///
/// # Safety
/// `ptr` must be a pointer `on_http_filter_config_new` returned and not yet destroyed.
unsafe fn config<'a>(ptr: ConfigModulePtr) -> Option<&'a Config> {
    // SAFETY: the caller's contract (an `Arc<Config>` this module leaked).
    unsafe { ptr.cast::<Config>().as_ref() }
}

/// Runs a hook's work. The control plane is written not to panic; if it does all the same (a bug),
/// the panic stops here, where unwinding into Envoy would abort the process: it is logged (the
/// panic hook) and counted, and the hook answers `fallback`, which lets the stream go on as if the
/// filter were not there (the route without the header: the pool's own balancing).
fn guarded<R>(config: Option<&Config>, fallback: R, work: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(r) => r,
        Err(_) => {
            if let Some(c) = config {
                c.host.increment(c.panics, 1);
            }
            fallback
        }
    }
}

/// Runs a stream callback of the control plane, guarded, with `envoy` as the running filter (None:
/// not a stream of the router, the floor's).
fn on_stream(
    f: &mut Filter,
    envoy: FilterEnvoyPtr,
    work: impl FnOnce(&mut Stream<NativeHost>) -> Flow,
) -> Option<Flow> {
    let s = f.stream.as_mut()?;
    Some(guarded(Some(&f.config), Flow::Continue, || {
        host::with_filter(envoy, || work(s))
    }))
}

// ------------------------------- event hooks -------------------------------

/// ABI version this module is written against: Envoy 1.40's (it loads in 1.40 and, by Envoy's
/// rule since 1.38, in 1.41).
static ABI_VERSION: &[u8] = b"v0.2.0\0";

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("kvroute panicked: {info}");
        // SAFETY: a buffer valid for the call; Envoy's logger may be called from any thread.
        unsafe { abi::envoy_dynamic_module_callback_log(5, abi::ModuleBuffer::of(msg.as_bytes())) };
    }));
    ABI_VERSION.as_ptr().cast()
}

/// # Safety
/// Called by Envoy with buffers valid for the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ConfigModulePtr {
    // SAFETY: Envoy's buffers, valid for this call.
    let (name, json) = unsafe { (name.bytes(), config.bytes()) };
    guarded(None, std::ptr::null(), || new_config(envoy, name, json))
}

/// A filter configuration from its name and JSON (null: rejected, and Envoy says so).
fn new_config(envoy: ConfigEnvoyPtr, name: &[u8], json: &[u8]) -> ConfigModulePtr {
    let shared = Arc::new(Shared::default());
    shared.config.store(envoy as usize, Ordering::Release);
    let host = NativeHost {
        shared: shared.clone(),
    };
    let mode = match name {
        b"kvroute" => Mode::Kvroute,
        b"floor" => Mode::Floor,
        other => {
            host.log(
                LogLevel::Error,
                &format!(
                    "kvroute: unknown filter_name {:?} (use \"kvroute\")",
                    String::from_utf8_lossy(other)
                ),
            );
            return std::ptr::null();
        }
    };
    let filter = match FilterConfig::from_json(json) {
        Ok(c) => c,
        Err(e) => {
            host.log(
                LogLevel::Error,
                &format!("kvroute: rejected configuration: {e}"),
            );
            return std::ptr::null();
        }
    };
    // Every stat is defined now, while Envoy lets the configuration define them: the service's
    // and a worker's (the workers that Envoy's threads make later find theirs by name).
    shared.defining.store(true, Ordering::Release);
    let service = match mode {
        Mode::Kvroute => {
            let lease = host.now_ns() | 1;
            match StateService::start(host.clone(), filter.clone(), Role::Bootstrap, lease) {
                Some(s) => Some(s),
                None => return std::ptr::null(),
            }
        }
        Mode::Floor => None,
    };
    drop(Worker::new(host.clone(), filter.clone()));
    let panics = host.define_metric(
        kvroute_control::MetricKind::Counter,
        "kvroute_native_panics_total",
    );
    shared.defining.store(false, Ordering::Release);

    let ticker = if service.is_some() {
        // SAFETY: the configuration Envoy is creating.
        let s =
            unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy) };
        shared.scheduler.store(s as usize, Ordering::Release);
        start_ticker(shared.clone())
    } else {
        None
    };
    let id = NEXT_CONFIG.fetch_add(1, Ordering::Relaxed);
    lock(&LIVE).push(id);
    let c = Config {
        id,
        mode,
        filter,
        host,
        service: Mutex::new(service),
        ticker: Mutex::new(ticker),
        panics,
    };
    Arc::into_raw(Arc::new(c)).cast()
}

/// # Safety
/// `config` is a pointer `on_http_filter_config_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    config: ConfigModulePtr,
) {
    if config.is_null() {
        return;
    }
    // SAFETY: the pointer came from `Arc::into_raw` and Envoy destroys it once.
    let c = unsafe { Arc::from_raw(config.cast::<Config>()) };
    c.stop_ticker();
    lock(&LIVE).retain(|id| *id != c.id);
    // Envoy's stats and callouts of this configuration are gone with it.
    c.host.shared.config.store(0, Ordering::Release);
    drop(lock(&c.service).take());
}

/// # Safety
/// `module` is a live configuration pointer of this module.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _envoy: ConfigEnvoyPtr,
    module: ConfigModulePtr,
    event: u64,
) {
    // SAFETY: Envoy passes the configuration's pointer.
    if let Some(c) = unsafe { config(module) } {
        guarded(Some(c), (), || c.on_main(event));
    }
}

/// # Safety
/// Envoy's pointers and buffers, valid for the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _envoy: ConfigEnvoyPtr,
    module: ConfigModulePtr,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    // SAFETY: Envoy passes the configuration's pointer.
    let Some(c) = (unsafe { config(module) }) else {
        return;
    };
    let (mut status, mut body) = (None, Vec::new());
    if result == abi::CALLOUT_SUCCESS {
        if !headers.is_null() {
            // SAFETY: Envoy's `headers_size` headers, valid for this call.
            let hs = unsafe { std::slice::from_raw_parts(headers, headers_size) };
            status = hs.iter().find_map(|h| {
                // SAFETY: as above.
                let (k, v) = unsafe { h.parts() };
                (k == b":status").then(|| String::from_utf8_lossy(v).into_owned())
            });
        }
        if !chunks.is_null() {
            // SAFETY: Envoy's `chunks_size` chunks, valid for this call.
            for ch in unsafe { std::slice::from_raw_parts(chunks, chunks_size) } {
                // SAFETY: as above; copied here.
                body.extend_from_slice(unsafe { ch.bytes() });
            }
        }
    }
    let size = body.len();
    guarded(Some(c), (), || {
        host::with_response(status, body, || {
            if let Some(s) = lock(&c.service).as_mut() {
                s.on_http_call_response(callout_id as u32, size);
            }
        });
    });
}

/// # Safety
/// `config` is a pointer `on_http_filter_config_new` returned and not yet destroyed.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ConfigModulePtr,
    _envoy: FilterEnvoyPtr,
) -> FilterModulePtr {
    if config.is_null() {
        return std::ptr::null();
    }
    let config = config.cast::<Config>();
    // SAFETY: a live `Arc<Config>` pointer: take one more reference for the stream.
    let config = unsafe {
        Arc::increment_strong_count(config);
        Arc::from_raw(config)
    };
    let stream = (config.mode == Mode::Kvroute).then(|| Stream::new(config.worker()));
    let f = Filter {
        config,
        stream,
        floor: None,
        ended: false,
    };
    Box::into_raw(Box::new(f)).cast_const().cast()
}

/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: Envoy passes this stream's pointer.
    let Some(f) = (unsafe { filter(module) }) else {
        return abi::HEADERS_CONTINUE;
    };
    if let Some(flow) = on_stream(f, envoy, |s| s.on_request_headers(end_of_stream)) {
        return headers_status(flow);
    }
    // The floor: chat and completion POSTs wait for their body.
    let method = host::header(envoy, abi::REQUEST_HEADER, ":method");
    let path = host::header(envoy, abi::REQUEST_HEADER, ":path");
    f.floor = match (method.as_deref(), path) {
        (Some(b"POST"), Some(p)) => std::str::from_utf8(&p).ok().and_then(ApiKind::from_path),
        _ => None,
    };
    if f.floor.is_none() || end_of_stream {
        return abi::HEADERS_CONTINUE;
    }
    abi::HEADERS_STOP_ITERATION
}

/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: Envoy passes this stream's pointer.
    let Some(f) = (unsafe { filter(module) }) else {
        return abi::BODY_CONTINUE;
    };
    let size = || {
        body_size(
            envoy,
            &[abi::BUFFERED_REQUEST_BODY, abi::RECEIVED_REQUEST_BODY],
        )
    };
    if let Some(flow) = on_stream(f, envoy, |s| s.on_request_body(size(), end_of_stream)) {
        return body_status(flow);
    }
    if f.floor.is_none() {
        return abi::BODY_CONTINUE;
    }
    if !end_of_stream {
        return abi::BODY_STOP_AND_BUFFER;
    }
    f.floor = None;
    let _ = host::body(
        envoy,
        &[abi::BUFFERED_REQUEST_BODY, abi::RECEIVED_REQUEST_BODY],
        f.config.filter.max_body_bytes as usize,
    );
    if let Some(e) = f.config.filter.endpoints.first() {
        let route = &f.config.filter.route_header;
        host::with_filter(envoy, || {
            f.config.host.set_request_header(route, Some(e.cluster()))
        });
    }
    abi::BODY_CONTINUE
}

/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
) -> u32 {
    // SAFETY: Envoy passes this stream's pointer.
    let Some(f) = (unsafe { filter(module) }) else {
        return abi::BODY_CONTINUE;
    };
    // Trailers statuses: Continue 0, StopIteration 1, as the headers'.
    on_stream(f, envoy, |s| s.on_request_trailers()).map_or(abi::HEADERS_CONTINUE, headers_status)
}

/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: Envoy passes this stream's pointer.
    unsafe { filter(module) }
        .and_then(|f| on_stream(f, envoy, |s| s.on_response_headers()))
        .map_or(abi::HEADERS_CONTINUE, headers_status)
}

/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: Envoy passes this stream's pointer.
    unsafe { filter(module) }
        .and_then(|f| {
            on_stream(f, envoy, |s| {
                s.on_response_body(body_size(envoy, &[abi::RECEIVED_RESPONSE_BODY]))
            })
        })
        .map_or(abi::BODY_CONTINUE, body_status)
}

/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
) {
    // SAFETY: Envoy passes this stream's pointer.
    if let Some(f) = unsafe { filter(module) } {
        let config = f.config.clone();
        guarded(Some(&config), (), || host::with_filter(envoy, || f.end()));
    }
}

/// # Safety
/// `module` is a pointer `on_http_filter_new` returned; Envoy destroys it once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: FilterModulePtr) {
    if !module.is_null() {
        // SAFETY: the pointer came from `Box::into_raw`.
        let mut f = unsafe { Box::from_raw(module as *mut Filter) };
        // A stream Envoy destroys without completing it still leaves the in-flight counts.
        let config = f.config.clone();
        guarded(Some(&config), (), || f.end());
    }
}

// Hooks Envoy resolves for every HTTP filter module; this one does nothing in them.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) -> u32 {
    abi::BODY_CONTINUE
}

/// `envoy_dynamic_module_type_on_http_filter_local_reply_status_Continue`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: u32,
    _: EnvoyBuffer,
    _: bool,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _: EnvoyBuffer,
    _: EnvoyBuffer,
) -> ConfigModulePtr {
    std::ptr::null()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_: ConfigModulePtr) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: u64,
    _: u32,
    _: *const EnvoyHeader,
    _: usize,
    _: *const EnvoyBuffer,
    _: usize,
) {
}

macro_rules! no_op_hooks {
    ($($name:ident),* $(,)?) => {
        $(
            #[no_mangle]
            pub extern "C" fn $name() {}
        )*
    };
}

// Stream callouts and watermarks: this module starts no callout stream and does no flow control,
// so Envoy never calls these; they exist because Envoy resolves them when it loads the filter.
no_op_hooks!(
    envoy_dynamic_module_on_http_filter_http_stream_headers,
    envoy_dynamic_module_on_http_filter_http_stream_data,
    envoy_dynamic_module_on_http_filter_http_stream_trailers,
    envoy_dynamic_module_on_http_filter_http_stream_complete,
    envoy_dynamic_module_on_http_filter_http_stream_reset,
    envoy_dynamic_module_on_http_filter_config_http_stream_headers,
    envoy_dynamic_module_on_http_filter_config_http_stream_data,
    envoy_dynamic_module_on_http_filter_config_http_stream_trailers,
    envoy_dynamic_module_on_http_filter_config_http_stream_complete,
    envoy_dynamic_module_on_http_filter_config_http_stream_reset,
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark,
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark,
);
