//! A bench probe, not the product: kvroute's per-request routing work run as a native Envoy
//! dynamic module (`envoy.filters.http.dynamic_modules`, a shared object Envoy loads with
//! `dlopen`) instead of a Wasm filter in V8.
//!
//! It measures what the Wasm runtime itself costs: `kvroute-bench-envoy` runs it in the same run
//! as the Wasm builds, in two modes chosen by the filter name:
//!
//! - `floor`: pause on the request headers, buffer the body, set the routing header: the same work
//!   as the Wasm `bench-floor` build.
//! - `kvroute`: the routing work of the Wasm filter's request path with the same core code: parse the
//!   body, hash its blocks, run the configured policy against the prefix directory and the gateway
//!   in-flight counts, record the decision in the directory, set the header; the in-flight count
//!   drops when the stream completes. The directory is one process-wide structure behind a mutex
//!   (a native module shares memory between Envoy's workers, so it needs no singleton and no
//!   published copy). What it leaves out of the Wasm filter's work: stats, the runtime-value poll
//!   and the sidecar pull (timers off the request path), and fallbacks' bookkeeping.
//!
//! The ABI declarations below are written from Envoy's dynamic-module ABI header
//! (`source/extensions/dynamic_modules/abi/abi.h`, ABI v0.1.0; Envoy 1.40 implements v0.2.0, which
//! keeps v0.1's calls): only the types and calls this module uses. A mismatch makes Envoy log a
//! warning at load and nothing else.

use std::ffi::c_char;
use std::sync::Arc;

use kvroute_core::config::FilterConfig;
use kvroute_core::local::{Counted, LocalRouter};
use kvroute_core::request::ApiKind;

mod abi {
    //! The subset of Envoy's dynamic-module C ABI this module uses.
    use std::ffi::c_void;

    /// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct EnvoyBuffer {
        pub ptr: *const u8,
        pub length: usize,
    }

    impl Default for EnvoyBuffer {
        fn default() -> Self {
            Self {
                ptr: std::ptr::null(),
                length: 0,
            }
        }
    }

    impl EnvoyBuffer {
        /// The bytes, valid until the end of the current event hook.
        ///
        /// # Safety
        /// `ptr` must point to `length` readable bytes for the returned lifetime (Envoy guarantees
        /// it for buffers it hands to a hook, until the hook returns).
        pub unsafe fn bytes<'a>(&self) -> &'a [u8] {
            if self.ptr.is_null() || self.length == 0 {
                return &[];
            }
            // SAFETY: the caller's contract.
            unsafe { std::slice::from_raw_parts(self.ptr, self.length) }
        }
    }

    /// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct ModuleBuffer {
        pub ptr: *const u8,
        pub length: usize,
    }

    impl ModuleBuffer {
        pub fn of(b: &[u8]) -> Self {
            Self {
                ptr: b.as_ptr(),
                length: b.len(),
            }
        }
    }

    pub type FilterEnvoyPtr = *mut c_void;
    pub type FilterModulePtr = *const c_void;
    pub type ConfigEnvoyPtr = *mut c_void;
    pub type ConfigModulePtr = *const c_void;

    /// `envoy_dynamic_module_type_http_header_type_RequestHeader`.
    pub const REQUEST_HEADER: u32 = 0;
    /// `envoy_dynamic_module_type_http_body_type_{Received,Buffered}RequestBody`.
    pub const RECEIVED_REQUEST_BODY: u32 = 0;
    pub const BUFFERED_REQUEST_BODY: u32 = 1;
    /// `..._request_headers_status_{Continue,StopIteration}`.
    pub const HEADERS_CONTINUE: u32 = 0;
    pub const HEADERS_STOP_ITERATION: u32 = 1;
    /// `..._request_body_status_{Continue,StopIterationAndBuffer}`; the same values for the other
    /// data and trailer statuses' `Continue`.
    pub const BODY_CONTINUE: u32 = 0;
    pub const BODY_STOP_AND_BUFFER: u32 = 1;

    extern "C" {
        pub fn envoy_dynamic_module_callback_http_get_header(
            filter: FilterEnvoyPtr,
            header_type: u32,
            key: ModuleBuffer,
            result: *mut EnvoyBuffer,
            index: usize,
            optional_size: *mut usize,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_set_header(
            filter: FilterEnvoyPtr,
            header_type: u32,
            key: ModuleBuffer,
            value: ModuleBuffer,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_clear_route_cache(filter: FilterEnvoyPtr);
        pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
            filter: FilterEnvoyPtr,
            body_type: u32,
        ) -> usize;
        pub fn envoy_dynamic_module_callback_http_get_body_chunks(
            filter: FilterEnvoyPtr,
            body_type: u32,
            result: *mut EnvoyBuffer,
        ) -> bool;
    }
}

use abi::{ConfigEnvoyPtr, ConfigModulePtr, EnvoyBuffer, FilterEnvoyPtr, FilterModulePtr};

/// What a filter configuration does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Floor,
    Kvroute,
}

/// One filter configuration, shared by every stream on every worker.
#[derive(Debug)]
struct Config {
    mode: Mode,
    /// The directory and in-flight counts: every worker's decisions, recorded in place.
    router: LocalRouter,
}

/// One stream.
#[derive(Debug)]
struct Stream {
    config: Arc<Config>,
    kind: Option<ApiKind>,
    session: Option<String>,
    /// What is counted in flight, until the stream completes.
    counted: Option<Counted>,
}

/// A request header's first value.
fn header(filter: FilterEnvoyPtr, name: &str) -> Option<&'static [u8]> {
    let mut out = EnvoyBuffer::default();
    let mut count = 0usize;
    // SAFETY: `filter` is the pointer Envoy passed to the running hook; `out` and `count` are
    // valid for writes.
    let found = unsafe {
        abi::envoy_dynamic_module_callback_http_get_header(
            filter,
            abi::REQUEST_HEADER,
            abi::ModuleBuffer::of(name.as_bytes()),
            &mut out,
            0,
            &mut count,
        )
    };
    // SAFETY: Envoy's header value, valid until the hook returns; callers use it only within.
    found.then(|| unsafe { out.bytes() })
}

/// Sets the routing header and has Envoy pick the route again (unlike the Wasm host, the
/// dynamic-module host does not clear the route cache on a header write, and the route was already
/// looked up when the stream started).
fn set_route_header(filter: FilterEnvoyPtr, name: &str, value: &str) -> bool {
    // SAFETY: `filter` is the running hook's; both buffers are valid for the call.
    let set = unsafe {
        abi::envoy_dynamic_module_callback_http_set_header(
            filter,
            abi::REQUEST_HEADER,
            abi::ModuleBuffer::of(name.as_bytes()),
            abi::ModuleBuffer::of(value.as_bytes()),
        )
    };
    if set {
        // SAFETY: `filter` is the running hook's.
        unsafe { abi::envoy_dynamic_module_callback_http_clear_route_cache(filter) };
    }
    set
}

/// The chunks of one of the request's body buffers.
fn chunks(filter: FilterEnvoyPtr, body_type: u32) -> Vec<EnvoyBuffer> {
    // SAFETY: `filter` is the running hook's.
    let n =
        unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type) };
    if n == 0 {
        return Vec::new();
    }
    let mut out = vec![EnvoyBuffer::default(); n];
    // SAFETY: `out` has room for the `n` chunks Envoy reported.
    let ok = unsafe {
        abi::envoy_dynamic_module_callback_http_get_body_chunks(filter, body_type, out.as_mut_ptr())
    };
    if ok {
        out
    } else {
        Vec::new()
    }
}

impl Stream {
    /// The whole request body is in (end of stream): route it.
    fn route(&mut self, filter: FilterEnvoyPtr) {
        let c = &*self.config;
        let config = &c.router.config;
        let Some(kind) = self.kind else {
            return;
        };
        if c.mode == Mode::Floor {
            if let Some(e) = config.endpoints.first() {
                set_route_header(filter, &config.route_header, e.cluster());
            }
            return;
        }
        // Envoy holds what it buffered so far and the last chunk apart; a body in one chunk is
        // read in place, one in several is joined.
        let mut parts = chunks(filter, abi::BUFFERED_REQUEST_BODY);
        parts.extend(chunks(filter, abi::RECEIVED_REQUEST_BODY));
        let joined: Vec<u8>;
        let body: &[u8] = match parts.as_slice() {
            // SAFETY: Envoy's body chunk, valid until this hook returns; used only within it.
            [one] => unsafe { one.bytes() },
            _ => {
                let mut all = Vec::with_capacity(parts.iter().map(|p| p.length).sum());
                for p in &parts {
                    // SAFETY: as above, for each chunk.
                    all.extend_from_slice(unsafe { p.bytes() });
                }
                joined = all;
                &joined
            }
        };
        let Some((decision, counted)) = c.router.route(kind, body, self.session.as_deref()) else {
            return;
        };
        let Some(e) = config.endpoints.get(decision.endpoint) else {
            c.router.complete(counted);
            return;
        };
        if set_route_header(filter, &config.route_header, e.cluster()) {
            self.counted = Some(counted);
        } else {
            c.router.complete(counted);
        }
    }

    fn complete(&mut self) {
        if let Some(counted) = self.counted.take() {
            self.config.router.complete(counted);
        }
    }
}

/// The module's view of a filter pointer Envoy hands back.
///
/// # Safety
/// `ptr` must be a pointer this module returned from `on_http_filter_new` and not yet destroyed.
unsafe fn stream<'a>(ptr: FilterModulePtr) -> Option<&'a mut Stream> {
    // SAFETY: the caller's contract; Envoy runs one stream's hooks on one thread, one at a time.
    unsafe { (ptr as *mut Stream).as_mut() }
}

// ------------------------------- event hooks -------------------------------

/// ABI version this module is written against.
static ABI_VERSION: &[u8] = b"v0.1.0\0";

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// # Safety
/// Called by Envoy with buffers valid for the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ConfigModulePtr {
    // SAFETY: Envoy's buffers, valid for this call.
    let (name, config) = unsafe { (name.bytes(), config.bytes()) };
    let mode = match name {
        b"floor" => Mode::Floor,
        b"kvroute" => Mode::Kvroute,
        _ => return std::ptr::null(),
    };
    let Ok(config) = FilterConfig::from_json(config) else {
        return std::ptr::null();
    };
    let c = Config {
        mode,
        router: LocalRouter::new(config),
    };
    Arc::into_raw(Arc::new(c)).cast()
}

/// # Safety
/// `config` is a pointer `on_http_filter_config_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    config: ConfigModulePtr,
) {
    if !config.is_null() {
        // SAFETY: the pointer came from `Arc::into_raw` and Envoy destroys it once.
        drop(unsafe { Arc::from_raw(config.cast::<Config>()) });
    }
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
    let s = Stream {
        config,
        kind: None,
        session: None,
        counted: None,
    };
    Box::into_raw(Box::new(s)).cast_const().cast()
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
    let Some(s) = (unsafe { stream(module) }) else {
        return abi::HEADERS_CONTINUE;
    };
    let kind = match (header(envoy, ":method"), header(envoy, ":path")) {
        (Some(b"POST"), Some(p)) => std::str::from_utf8(p).ok().and_then(ApiKind::from_path),
        _ => None,
    };
    if kind.is_none() || end_of_stream {
        return abi::HEADERS_CONTINUE;
    }
    s.kind = kind;
    if s.config.mode == Mode::Kvroute {
        s.session = header(envoy, &s.config.router.config.session_header)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_string);
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
    let Some(s) = (unsafe { stream(module) }) else {
        return abi::BODY_CONTINUE;
    };
    if s.kind.is_none() {
        return abi::BODY_CONTINUE;
    }
    if !end_of_stream {
        return abi::BODY_STOP_AND_BUFFER;
    }
    s.route(envoy);
    s.kind = None;
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
    if let Some(s) = unsafe { stream(module) } {
        if s.kind.is_some() {
            s.route(envoy);
            s.kind = None;
        }
    }
    abi::BODY_CONTINUE
}

/// # Safety
/// Envoy's pointers for this stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
) {
    // SAFETY: Envoy passes this stream's pointer.
    if let Some(s) = unsafe { stream(module) } {
        s.complete();
    }
}

/// # Safety
/// `module` is a pointer `on_http_filter_new` returned; Envoy destroys it once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: FilterModulePtr) {
    if !module.is_null() {
        // SAFETY: the pointer came from `Box::into_raw`.
        let mut s = unsafe { Box::from_raw(module as *mut Stream) };
        s.complete();
    }
}

// Hooks Envoy resolves for every HTTP filter module; this one does nothing in them.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: bool,
) -> u32 {
    abi::HEADERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: bool,
) -> u32 {
    abi::BODY_CONTINUE
}

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
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _: ConfigEnvoyPtr,
    _: ConfigModulePtr,
    _: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: u64,
    _: u32,
    _: *mut EnvoyBuffer,
    _: usize,
    _: *mut EnvoyBuffer,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _: ConfigEnvoyPtr,
    _: ConfigModulePtr,
    _: u64,
    _: u32,
    _: *mut EnvoyBuffer,
    _: usize,
    _: *mut EnvoyBuffer,
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
