//! A simulated gateway replica: Envoy with kvroute, as the shipped control plane runs it.
//!
//! Each replica is one [`InMemoryHost`] (one Envoy: its shared data, queues and stats) on the
//! simulation's clock, with kvroute-control's [`StateService`] on the main thread and one
//! [`Worker`] per Envoy worker thread, each request a [`Stream`] whose callbacks the simulation
//! calls when Envoy would. So the simulator runs the live mechanism itself: the in-flight counts in
//! shared data, report coalescing on the workers' tick, the decision queue, the state service's
//! directory, publishes and overlays, its sidecar pull, runtime poll, fleet exchange and measured
//! characters per token.
//!
//! What the host does in time is modelled ([`HostLatency`]): a queued report wakes the service
//! after `queue_us`; a callout is answered after `callout_us`. The simulation schedules the ticks
//! (the service's every [`service::tick_ms`], each worker's every
//! [`kvroute_control::worker::REPORT_COALESCE_US`] while it
//! holds a batch) and answers the callouts: the sidecar's snapshot from the simulated sidecar's
//! last poll of the engines, Envoy's `/runtime` with no `kvroute.*` values (the settings are the
//! configuration's defaults), and the fleet exchange from the in-memory fleet log.

use std::rc::Rc;

use kvroute_control::in_memory::{Callout, InMemoryHost, InMemoryStream, START_NS};
use kvroute_control::service::{self, Role, StateService};
use kvroute_control::{Stream, Worker};
use kvroute_core::config::{FleetEndpoint, SidecarEndpoint};
use kvroute_core::state::DECISION_QUEUE;
use kvroute_core::FilterConfig;
use serde::{Deserialize, Serialize};

/// How long the host takes for what the control plane asks of it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HostLatency {
    /// From a worker's enqueue to the state service's `on_queue_ready` on the main thread, us.
    pub queue_us: u64,
    /// From a callout's send to its answer (sidecar, admin, fleet), us.
    pub callout_us: u64,
}

impl Default for HostLatency {
    /// Envoy 1.40 on this project's 2-core machines at a light load: a decision's wait until the
    /// main thread applied it, `kvroute_report_delay_us`'s median in three runs of
    /// `cargo test -p kvroute-e2e --test report_delay -- --ignored --nocapture` (147-168 us);
    /// and an HTTP round trip over loopback to the sidecar (modelled, not measured).
    fn default() -> Self {
        Self {
            queue_us: 160,
            callout_us: 500,
        }
    }
}

/// Envoy worker threads per replica (the live stack runs `--concurrency 2`).
pub const WORKERS: usize = 2;
/// Most histogram values each replica's host keeps.
const SAMPLES_CAP: usize = 4096;

/// What a callout asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ask {
    Snapshot,
    Runtime,
    Fleet(Vec<u8>),
    /// Something this simulation does not serve: answered 404.
    Other,
}

/// One replica.
pub(crate) struct Gateway {
    pub host: InMemoryHost,
    pub service: StateService<InMemoryHost>,
    pub workers: Vec<Rc<Worker<InMemoryHost>>>,
    /// A worker tick is scheduled (per worker).
    pub tick_pending: Vec<bool>,
    /// A queue wake-up is scheduled.
    pub wake_pending: bool,
    queue: Option<u32>,
    /// The host's clock at simulated time 0, ns since the epoch.
    epoch_ns: u64,
    /// The service's tick period, us.
    pub tick_us: u64,
}

/// The configuration a replica runs: `filter` with `settings` as its defaults, a sidecar, and
/// the fleet log when `fleet_sync_us` is set.
pub(crate) fn replica_config(
    filter: &FilterConfig,
    settings: &kvroute_core::PolicySettings,
    fleet_sync_us: Option<u64>,
) -> FilterConfig {
    let mut c = filter.clone();
    c.defaults = settings.clone();
    c.sidecar.get_or_insert(SidecarEndpoint {
        cluster: "kvroute_sidecar".into(),
        authority: "kvroute-sidecar".into(),
        path: "/snapshot".into(),
        stale_after_ms: 1000,
    });
    if let Some(us) = fleet_sync_us {
        c.fleet = Some(FleetEndpoint {
            cluster: "kvroute_sidecar".into(),
            authority: "kvroute-sidecar".into(),
            path: "/fleet".into(),
            sync_ms: (us / 1000).clamp(1, u64::from(u32::MAX)) as u32,
            max_batch_bytes: 256 * 1024,
        });
    }
    c
}

impl Gateway {
    /// Replica `index` of a run seeded `seed`, started at simulated time 0. The host's clock
    /// starts at a time drawn from the seed (the workers seed their draws from it) and a
    /// millisecond apart per replica.
    pub(crate) fn start(config: &FilterConfig, index: usize, seed: u64) -> Option<Self> {
        let offset_us = kvroute_traces::rng::mix(seed) % 1_000_000 + index as u64 * 1000;
        let epoch_ns = START_NS + offset_us * 1000;
        let host = InMemoryHost::starting_at_ns(epoch_ns).with_samples_cap(SAMPLES_CAP);
        let lease = kvroute_traces::rng::mix(seed ^ index as u64) | 1;
        let service = StateService::start(host.clone(), config.clone(), Role::Bootstrap, lease)?;
        // Each worker VM starts a microsecond after the last, so each seeds its own draws.
        let workers = (0..WORKERS)
            .map(|w| {
                host.set_now_ns(epoch_ns + (w as u64 + 1) * 1000);
                Rc::new(Worker::new(host.clone(), config.clone()))
            })
            .collect();
        let queue = host.queue_id(DECISION_QUEUE);
        Some(Self {
            service,
            workers,
            tick_pending: vec![false; WORKERS],
            wake_pending: false,
            queue,
            epoch_ns,
            tick_us: service::tick_ms(config) * 1000,
            host,
        })
    }

    /// Moves this replica's clock to simulated time `t_us`.
    pub(crate) fn at(&self, t_us: u64) {
        self.host.set_now_ns(self.epoch_ns + t_us * 1000);
    }

    /// Simulated time `t_us` on this replica's clock, ms since the epoch.
    pub(crate) fn clock_ms(&self, t_us: u64) -> u64 {
        (self.epoch_ns / 1000 + t_us) / 1000
    }

    /// A new request on worker `w`: its headers (a streamed chat completion), then its body's
    /// features. The stream, routed.
    pub(crate) fn request(
        &self,
        w: usize,
        features: kvroute_core::router::RequestFeatures,
    ) -> Option<Stream<InMemoryHost>> {
        let worker = self.workers.get(w)?;
        self.host.set_stream(InMemoryStream {
            request_headers: vec![
                (":method".into(), b"POST".to_vec()),
                (":path".into(), b"/v1/chat/completions".to_vec()),
            ],
            ..InMemoryStream::default()
        });
        let mut s = Stream::new(worker.clone());
        s.on_request_headers(false);
        s.on_request_features(features);
        Some(s)
    }

    /// The response's first bytes reach Envoy: its headers and first chunk (no usage yet).
    pub(crate) fn first_bytes(&self, s: &mut Stream<InMemoryHost>) {
        self.host.set_stream(InMemoryStream::default());
        s.on_response_headers();
        s.on_response_body(0);
    }

    /// The response's last chunk (with the usage the engine reports, for a served request) and
    /// the stream's end.
    pub(crate) fn last_bytes(&self, s: &mut Stream<InMemoryHost>, usage: Option<(u32, u32, u32)>) {
        let body = match usage {
            Some((prompt, completion, cached)) => format!(
                "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\
                 \"prompt_tokens\":{prompt},\"total_tokens\":{},\"completion_tokens\":{completion},\
                 \"prompt_tokens_details\":{{\"cached_tokens\":{cached}}}}}}}\n\ndata: [DONE]\n\n",
                prompt + completion
            ),
            None => "{\"object\":\"error\",\"code\":400}".to_owned(),
        };
        let len = body.len();
        self.host.set_stream(InMemoryStream {
            response_body: body.into_bytes(),
            ..InMemoryStream::default()
        });
        s.on_response_body(len);
        s.on_end();
    }

    /// Reports queued for the service.
    pub(crate) fn queued(&self) -> bool {
        self.host.queued(DECISION_QUEUE) > 0
    }

    /// The service's queue wake-up.
    pub(crate) fn wake(&mut self) {
        self.wake_pending = false;
        if let Some(q) = self.queue {
            self.service.on_queue_ready(q);
        }
    }

    /// Callouts sent since the last call, each with what it asks.
    pub(crate) fn take_callouts(&self) -> Vec<(u32, Ask)> {
        self.host
            .take_callouts()
            .into_iter()
            .map(
                |Callout {
                     token,
                     path,
                     body,
                     method,
                     ..
                 }| {
                    let ask = if path.starts_with("/snapshot") {
                        Ask::Snapshot
                    } else if path == "/runtime" {
                        Ask::Runtime
                    } else if path == "/fleet" && method == "POST" {
                        Ask::Fleet(body)
                    } else {
                        Ask::Other
                    };
                    (token, ask)
                },
            )
            .collect()
    }

    /// Delivers a callout's answer.
    pub(crate) fn answer(&mut self, token: u32, status: u16, body: &[u8]) {
        let service = &mut self.service;
        self.host
            .answer(status, body, |n| service.on_http_call_response(token, n));
    }
}
