//! kvroute-filter: the proxy-wasm glue between Envoy and kvroute-core.
//!
//! One wasm module, two roles, chosen by the plugin's `root_id`:
//! - `kvroute` (HTTP filter, one root context per worker VM): pauses POST `/v1/chat/completions` and
//!   `/v1/completions` on their headers, buffers the body up to `max_body_bytes`, asks the core for a
//!   decision against the published state, sets the routing header and continues. Everything else
//!   passes through. It never fails a request: any problem routes by load and is counted.
//! - `kvroute_state` (singleton `envoy.bootstrap.wasm` service, same `vm_id`): owns the prefix
//!   directory, applies the decisions the workers report over a shared queue, polls the admin
//!   `/runtime` for `kvroute.*` values, and publishes one versioned state value to shared data.
//!
//! Envoy never restarts a crashed bootstrap service, so every filter root context also stands by
//! for the state service (`kvroute_control::Standby`): when its lease lapses, one of them runs it.
//!
//! The request path reads only shared data and VM memory; it never waits on the network.
//!
//! All of that logic lives in `kvroute-control`, written against its `Host` trait; this crate is
//! the proxy-wasm callbacks, the root-id dispatch and [`host::WasmHost`].

mod host;

use std::rc::Rc;

use kvroute_control::{worker, Flow, Host, LogLevel, Role, Standby, StateService, Stream, Worker};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use host::WasmHost;

/// Root id of the HTTP filter role.
pub const FILTER_ROOT_ID: &str = "kvroute";
/// Root id of the singleton role.
pub const SINGLETON_ROOT_ID: &str = "kvroute_state";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        WasmHost.log(LogLevel::Critical, &format!("kvroute panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::Unconfigured) });
}}

/// A root context: unconfigured until `on_configure` tells which role it plays.
enum Root {
    Unconfigured,
    Filter(Rc<Worker<WasmHost>>, Box<Standby<WasmHost>>),
    Singleton(Box<StateService<WasmHost>>),
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        match self {
            Root::Singleton(s) => s.on_http_call_response(token, body_size),
            Root::Filter(_, standby) => standby.on_http_call_response(token, body_size),
            Root::Unconfigured => {}
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let h = WasmHost;
        let Some(bytes) = WasmHost::plugin_configuration(size) else {
            h.log(LogLevel::Error, "kvroute: no plugin configuration");
            return false;
        };
        let config = match kvroute_core::FilterConfig::from_json(&bytes) {
            Ok(c) => c,
            Err(e) => {
                h.log(
                    LogLevel::Error,
                    &format!("kvroute: rejected configuration: {e}"),
                );
                return false;
            }
        };
        let root_id = WasmHost::plugin_root_id().unwrap_or_default();
        *self = if root_id == SINGLETON_ROOT_ID {
            let lease_id = h.now_ns() | 1;
            match StateService::start(h, config, Role::Bootstrap, lease_id) {
                Some(s) => Root::Singleton(Box::new(s)),
                None => return false,
            }
        } else if root_id == FILTER_ROOT_ID || root_id.is_empty() {
            // The tick flushes coalesced decision reports.
            if !h.set_tick(std::time::Duration::from_micros(worker::REPORT_COALESCE_US)) {
                h.log(
                    LogLevel::Warn,
                    "kvroute: no tick; decision reports are sent one by one",
                );
            }
            let standby = Box::new(Standby::new(h, config.clone()));
            Root::Filter(Rc::new(Worker::new(h, config)), standby)
        } else {
            h.log(
                LogLevel::Error,
                &format!("kvroute: unknown root_id {root_id:?} (use {FILTER_ROOT_ID:?} or {SINGLETON_ROOT_ID:?})"),
            );
            return false;
        };
        true
    }

    fn on_tick(&mut self) {
        match self {
            Root::Singleton(s) => s.on_tick(),
            Root::Filter(w, standby) => {
                w.on_tick();
                standby.on_tick();
            }
            Root::Unconfigured => {}
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        match self {
            Root::Singleton(s) => s.on_queue_ready(queue_id),
            Root::Filter(_, standby) => standby.on_queue_ready(queue_id),
            Root::Unconfigured => {}
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match self {
            Root::Filter(w, _) => Some(Box::new(Request(Stream::new(w.clone())))),
            _ => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream: the proxy-wasm callbacks over the control plane's [`Stream`].
struct Request(Stream<WasmHost>);

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if cfg!(feature = "bench-passthrough") {
            return Action::Continue;
        }
        action(self.0.on_request_headers(end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_request_body(body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        action(self.0.on_request_trailers())
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        action(self.0.on_response_headers())
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        action(self.0.on_response_body(body_size))
    }

    fn on_log(&mut self) {
        self.0.on_end();
    }
}
