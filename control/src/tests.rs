//! The control plane on the fake host: several VMs of one proxy (workers, the state service, a
//! stand-by) sharing its shared data, queues and stats, with time moved by the test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::rc::Rc;

use kvroute_core::directory::PrefixIndex;
use kvroute_core::hash::BlockHash;
use kvroute_core::state::{self, DecisionReport, PublishedState};
use kvroute_core::FilterConfig;

use crate::host::Host;
use crate::in_memory::{InMemoryHost, InMemoryStream};
use crate::service::{Role, StateService, TICK_MS};
use crate::standby::Standby;
use crate::worker::{Flow, Stream, Worker, PER_TRY_TIMEOUT_HEADER, REPORT_COALESCE_US};

const CHAT: &str = "/v1/chat/completions";

fn config(extra: &str) -> FilterConfig {
    let json = format!(
        r#"{{"endpoints":[{{"name":"e0","address":"10.0.0.1:8000"}},{{"name":"e1","address":"10.0.0.2:8000"}}]{extra}}}"#
    );
    FilterConfig::from_json(json.as_bytes()).unwrap()
}

/// One proxy: the state service's VM and a worker VM.
struct Proxy {
    host: InMemoryHost,
    service: StateService<InMemoryHost>,
    worker: Rc<Worker<InMemoryHost>>,
}

impl Proxy {
    fn new(extra: &str) -> Self {
        let host = InMemoryHost::new();
        let cfg = config(extra);
        // Each proxy's service has its own lease id (its replica id in a fleet).
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let service = StateService::start(host.clone(), cfg.clone(), Role::Bootstrap, id).unwrap();
        let worker = Rc::new(Worker::new(host.clone(), cfg));
        Self {
            host,
            service,
            worker,
        }
    }

    /// Another worker VM of the same proxy.
    fn worker(&self, extra: &str) -> Rc<Worker<InMemoryHost>> {
        Rc::new(Worker::new(self.host.clone(), config(extra)))
    }

    /// Sends one chat request through `worker`'s stream callbacks up to the routing decision and
    /// returns the stream (still open) and the endpoint it was routed to.
    fn route_on(
        &self,
        worker: &Rc<Worker<InMemoryHost>>,
        session: &str,
        text: &str,
    ) -> (Stream<InMemoryHost>, usize) {
        let body = serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": text}],
        })
        .to_string();
        let mut req = InMemoryStream::post(CHAT, &body);
        req.request_headers
            .push(("x-session-id".into(), session.as_bytes().to_vec()));
        self.host.set_stream(req);
        let mut s = Stream::new(worker.clone());
        assert_eq!(s.on_request_headers(false), Flow::Pause);
        assert_eq!(s.on_request_body(body.len(), true), Flow::Continue);
        let routed = self
            .host
            .stream()
            .request_header("x-kvroute-endpoint")
            .unwrap();
        let endpoint = ["e0", "e1"].iter().position(|e| *e == routed).unwrap();
        (s, endpoint)
    }

    fn route(&self, session: &str, text: &str) -> (Stream<InMemoryHost>, usize) {
        self.route_on(&self.worker, session, text)
    }

    /// The state service reads its decision queue.
    fn apply_reports(&mut self) {
        let q = self.host.queue_id(state::DECISION_QUEUE).unwrap();
        self.service.on_queue_ready(q);
    }

    fn tick(&mut self, ms: u64) {
        self.host.advance_ms(ms);
        self.service.on_tick();
    }

    /// Answers the runtime poll (the service's `GET /runtime`) with these `kvroute.*` values.
    fn runtime(&mut self, values: &[(&str, &str)]) {
        self.tick(200);
        let entries: serde_json::Map<String, serde_json::Value> = values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::json!({ "final_value": v })))
            .collect();
        let body = serde_json::json!({ "entries": entries, "layers": [] }).to_string();
        self.answer("/runtime", 200, body.as_bytes());
    }

    /// Answers the newest callout to `path` with `status` and `body`.
    fn answer(&mut self, path: &str, status: u16, body: &[u8]) {
        let call = self
            .host
            .take_callout(path)
            .unwrap_or_else(|| panic!("no callout to {path}"));
        let service = &mut self.service;
        self.host.answer(status, body, |n| {
            service.on_http_call_response(call.token, n)
        });
    }

    /// Whether the current stream got a routing header.
    fn routed(&self) -> bool {
        self.host
            .stream()
            .request_header("x-kvroute-endpoint")
            .is_some()
    }

    /// The published state's header with the published directory.
    fn published(&self) -> PublishedState {
        let header = PublishedState::decode(self.host.shared(state::STATE_KEY).unwrap())
            .unwrap()
            .header;
        PublishedState::with_directory(header, self.host.shared(state::DIRECTORY_KEY).unwrap())
            .unwrap()
            .0
    }

    /// Runs `f` on what the workers route on: the published state with its overlay, where the
    /// version key names it.
    fn with_view<R>(&self, f: impl FnOnce(&state::Layered<'_>) -> R) -> R {
        let published = self.published();
        let overlay =
            state::PublishedOverlay::decode(self.host.shared(state::OVERLAY_KEY).unwrap()).ok();
        let seq = self
            .host
            .shared(state::VERSION_KEY)
            .map(|v| state::decode_overlay_seq(&v));
        f(&state::Layered {
            base: &published,
            top: overlay.as_ref().filter(|o| Some(o.seq) == seq),
        })
    }

    /// Gateway in-flight counts: requests, blocks, prompt tokens to prefill, down marks.
    fn inflight(&self) -> [Vec<i64>; 4] {
        let mut all = Vec::new();
        state::decode_inflight(
            &self.host.shared(state::INFLIGHT_KEY).unwrap(),
            4 * 2,
            &mut all,
        );
        [0, 1, 2, 3].map(|k| all[2 * k..2 * k + 2].to_vec())
    }
}

fn text(seed: usize) -> String {
    (0..40)
        .map(|i| format!("conversation {seed} sentence {i} about routing prefix caches. "))
        .collect()
}

#[test]
fn a_routed_request_counts_in_flight_until_its_stream_ends_and_its_prefill_until_the_response_starts(
) {
    let p = Proxy::new("");
    let (mut s, e) = p.route("a", &text(1));
    let [req, blocks, prefill, _] = p.inflight();
    assert_eq!(req[e], 1);
    assert!(blocks[e] > 0 && prefill[e] > 0, "{blocks:?} {prefill:?}");
    assert_eq!(req[1 - e], 0);

    p.host
        .edit_stream(|s| s.response_body = b"data: {}".to_vec());
    s.on_response_headers();
    s.on_response_body(8);
    let [req, blocks, prefill, _] = p.inflight();
    assert_eq!(
        (req[e], prefill[e]),
        (1, 0),
        "the prefill is done once the response starts"
    );
    assert!(blocks[e] > 0);

    s.on_end();
    assert_eq!(p.inflight()[..3], [vec![0, 0], vec![0, 0], vec![0, 0]]);
    // The response named the endpoint and the policy.
    let headers = p.host.stream().response_headers;
    assert_eq!(
        headers[0],
        ("x-kvroute-endpoint".into(), ["e0", "e1"][e].into())
    );
    assert_eq!(headers[1].0, "x-kvroute-policy");
}

#[test]
fn a_stream_reset_before_its_response_gives_back_everything_it_counted() {
    let p = Proxy::new("");
    let (mut a, _) = p.route("a", &text(1));
    let (mut b, _) = p.route("b", &text(2));
    assert_eq!(p.inflight()[0].iter().sum::<i64>(), 2);
    // Reset: Envoy calls on_log with no response at all.
    a.on_end();
    b.on_end();
    assert_eq!(p.inflight()[..3], [vec![0, 0], vec![0, 0], vec![0, 0]]);
    // A second on_log (or one after the end) takes nothing more.
    a.on_end();
    assert_eq!(p.inflight()[0], vec![0, 0]);
}

#[test]
fn an_in_flight_increment_that_loses_the_swap_to_another_vm_is_retried_and_both_land() {
    let p = Proxy::new("");
    // Between this worker's read of the counters and its swap, another VM counts 5 requests on e1.
    p.host.interleave(state::INFLIGHT_KEY, |current| {
        let mut c = Vec::new();
        state::decode_inflight(&current.unwrap_or_default(), 8, &mut c);
        c[1] += 5;
        state::encode_inflight(&c)
    });
    let (_s, e) = p.route("a", &text(1));
    let req = &p.inflight()[0];
    assert_eq!(req[e] + req[1 - e], 6, "{req:?}");
    assert_eq!(req[1], if e == 1 { 6 } else { 5 });
    assert_eq!(p.host.value("kvroute_host_errors_total.op.inflight"), 0);
}

#[test]
fn an_in_flight_increment_that_never_wins_the_swap_gives_up_and_is_counted() {
    let p = Proxy::new("");
    for _ in 0..64 {
        p.host
            .interleave(state::INFLIGHT_KEY, |c| c.unwrap_or_default());
    }
    let (_s, _) = p.route("a", &text(1));
    assert_eq!(p.host.value("kvroute_host_errors_total.op.inflight"), 1);
    // The request was still routed.
    assert!(p.routed());
}

#[test]
fn round_robin_cycles_across_the_workers_of_the_gateway_not_per_worker() {
    let p = Proxy::new(r#","defaults":{"policy":"round_robin"}"#);
    let other = p.worker(r#","defaults":{"policy":"round_robin"}"#);
    let picks: Vec<usize> = (0..6)
        .map(|i| {
            let w = if i % 2 == 0 { &p.worker } else { &other };
            p.route_on(w, &format!("s{i}"), &text(i)).1
        })
        .collect();
    // Each worker alone would have sent all its requests to one endpoint.
    assert_eq!(picks.iter().filter(|e| **e == 0).count(), 3, "{picks:?}");
    assert!(picks.windows(2).all(|w| w[0] != w[1]), "{picks:?}");
}

#[test]
fn decisions_reach_the_directory_and_the_next_request_of_the_conversation_sees_its_prefix() {
    let mut p = Proxy::new("");
    let (_s, e) = p.route("a", &text(1));
    p.apply_reports();
    assert_eq!(p.host.value("kvroute_decisions_recorded_total"), 1);
    // Every decision is published (the default): as an overlay on the state.
    assert_eq!(p.host.value("kvroute_state_overlay_publishes_total"), 1);
    let (_s2, e2) = p.route("a", &format!("{}and a follow-up.", text(1)));
    assert_eq!(e2, e, "the follow-up goes where its prefix is");
    assert_eq!(p.host.value("kvroute_predicted_hits_total"), 1);
}

#[test]
fn an_overlay_published_for_an_older_state_is_not_read_on_top_of_a_newer_one() {
    let mut p = Proxy::new("");
    let (_s, _) = p.route("a", &text(1));
    p.apply_reports();
    let overlay = p.host.shared(state::OVERLAY_KEY).unwrap();
    let old = p.published().header.version;
    // A new state without the directory (the epoch changed: the directory is forgotten) ...
    p.runtime(&[("kvroute.directory_epoch", "1")]);
    let new = p.published().header.version;
    assert!(new > old);
    assert_eq!(p.published().directory_entries(), 0);
    // ... while the version key names overlay 1 again, and the overlay still holds the old
    // state's changes (a publish racing the read).
    p.host.put_shared(
        state::VERSION_KEY,
        &state::encode_version_with_overlay(new, p.host.now_ms(), 1),
    );
    p.host.put_shared(state::OVERLAY_KEY, &overlay);
    let fresh = p.worker("");
    p.route_on(&fresh, "b", &text(1));
    assert_eq!(
        p.host.value("kvroute_predicted_hits_total"),
        0,
        "the stale overlay was read"
    );

    // The same overlay rebased on the new state is read (the check that the test can fail).
    let mut rebased = overlay.clone();
    rebased[4..12].copy_from_slice(&new.to_le_bytes());
    p.host.put_shared(state::OVERLAY_KEY, &rebased);
    let fresh = p.worker("");
    p.route_on(&fresh, "c", &text(1));
    assert_eq!(p.host.value("kvroute_predicted_hits_total"), 1);
}

#[test]
fn more_changes_than_an_overlay_holds_publish_the_whole_directory() {
    let mut p = Proxy::new("");
    let q = p.host.queue_id(state::DECISION_QUEUE).unwrap();
    let report = |from: u64, n: u64| DecisionReport {
        endpoint: 1,
        session: None,
        blocks: (from..from + n)
            .map(|i| BlockHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1))
            .collect(),
    };
    // A few changes: an overlay.
    p.host
        .enqueue(q, &state::encode_report_message(0, &report(0, 10).encode()));
    p.apply_reports();
    assert_eq!(p.host.value("kvroute_state_overlay_publishes_total"), 1);
    let publishes = p.host.value("kvroute_state_publishes_total");
    // More than the overlay's bound in one wake-up (reports of at most 1,000 blocks, all of
    // weight one, on a small directory: the bound is 2,048): a full state, which holds every
    // block.
    let big = state::OVERLAY_MAX_CHANGES as u64 + 452;
    let mut batch = Vec::new();
    for from in (10..10 + big).step_by(1000) {
        report(from, 1000.min(10 + big - from)).encode_into(&mut batch);
    }
    p.host.enqueue(q, &state::encode_report_message(0, &batch));
    p.apply_reports();
    assert_eq!(p.host.value("kvroute_state_overlay_publishes_total"), 1);
    assert_eq!(p.host.value("kvroute_state_publishes_total"), publishes + 1);
    let published = p.published();
    assert_eq!(published.directory_entries() as u64, 10 + big);
    for b in report(0, 10 + big).blocks {
        assert_eq!(published.holders(b), 0b10);
    }
    assert_eq!(
        p.host
            .shared(state::VERSION_KEY)
            .map(|v| state::decode_overlay_seq(&v)),
        Some(0)
    );
}

#[test]
fn runtime_values_change_the_settings_once_and_invalid_ones_are_counted_and_logged_once() {
    let mut p = Proxy::new("");
    let v0 = p.published().header.version;
    p.runtime(&[("kvroute.policy", "jsq"), ("kvroute.alpha", "lots")]);
    let s = p.published();
    assert_eq!(s.header.settings.policy.as_str(), "jsq");
    assert_eq!(s.header.version, v0 + 1);
    assert_eq!(p.host.value("kvroute_runtime_invalid_values"), 1);
    assert_eq!(p.host.logged("ignoring runtime value"), 1);
    assert_eq!(
        p.host.value("kvroute_policy_active.policy.jsq"),
        0,
        "gauges wait for the tick"
    );
    p.tick(TICK_MS);
    assert_eq!(p.host.value("kvroute_policy_active.policy.jsq"), 1);
    // The same values again: no publish, no new log line.
    p.runtime(&[("kvroute.policy", "jsq"), ("kvroute.alpha", "lots")]);
    assert_eq!(p.published().header.version, v0 + 1);
    assert_eq!(p.host.logged("ignoring runtime value"), 1);
    // The invalid value fixed, the policy switched back: one publish.
    p.runtime(&[("kvroute.policy", "predicted_ttft")]);
    assert_eq!(p.published().header.version, v0 + 2);
    assert_eq!(p.host.value("kvroute_runtime_invalid_values"), 0);
    // A runtime answer that is not Envoy's JSON changes nothing and is counted.
    p.tick(200);
    p.answer("/runtime", 200, b"<html>");
    assert_eq!(p.host.value("kvroute_host_errors_total.op.runtime_poll"), 1);
    assert_eq!(p.published().header.version, v0 + 2);
}

#[test]
fn reports_within_the_coalescing_interval_travel_in_one_message() {
    // Under an interval (not every decision), reports wait for the batch.
    let mut p = Proxy::new(r#","defaults":{"publish_interval":{"millis":100}}"#);
    for i in 0..5 {
        p.host.advance_us(100);
        p.route(&format!("s{i}"), &text(i));
    }
    // The first goes at once (none went before); the other four wait.
    assert_eq!(p.host.queued(state::DECISION_QUEUE), 1);
    p.host.advance_us(REPORT_COALESCE_US);
    p.worker.on_tick();
    assert_eq!(p.host.queued(state::DECISION_QUEUE), 2);
    p.host.advance_us(50);
    p.apply_reports();
    assert_eq!(p.host.value("kvroute_decisions_recorded_total"), 5);
    // Each message's wait is its oldest report's: the first report, sent at once, and the first
    // of the four that waited for the tick.
    assert_eq!(
        p.host.samples("kvroute_report_delay_us"),
        vec![400 + REPORT_COALESCE_US + 50, 300 + REPORT_COALESCE_US + 50]
    );

    // Every decision published: a report that changes the directory goes at once.
    let mut p = Proxy::new("");
    for i in 0..5 {
        p.route(&format!("s{i}"), &text(i));
    }
    assert_eq!(p.host.queued(state::DECISION_QUEUE), 5);
    p.apply_reports();
    // ... and one that only refreshes recency waits.
    let (_s, _) = p.route("s0", &text(0));
    assert_eq!(p.host.queued(state::DECISION_QUEUE), 0);
    p.host.advance_us(REPORT_COALESCE_US);
    p.worker.on_tick();
    assert_eq!(p.host.queued(state::DECISION_QUEUE), 1);
}

#[test]
fn a_worker_without_coalescing_sends_every_report_at_once() {
    // The native module's workers: no tick, so no batch waits for one.
    let mut p = Proxy::new(r#","defaults":{"publish_interval":{"millis":100}}"#);
    p.worker = Rc::new(
        Worker::new(
            p.host.clone(),
            config(r#","defaults":{"publish_interval":{"millis":100}}"#),
        )
        .with_report_coalesce_us(0),
    );
    for i in 0..5 {
        p.route(&format!("s{i}"), &text(i));
    }
    assert_eq!(p.host.queued(state::DECISION_QUEUE), 5);
    p.apply_reports();
    assert_eq!(p.host.value("kvroute_decisions_recorded_total"), 5);
}

#[test]
fn a_report_that_cannot_be_queued_is_counted_and_the_request_still_routed() {
    let p = Proxy::new("");
    p.host.fail_enqueue(true);
    let (_s, _) = p.route("a", &text(1));
    assert_eq!(p.host.value("kvroute_host_errors_total.op.enqueue"), 1);
    assert!(p.routed());
}

#[test]
fn an_interval_publishes_the_directory_at_most_once_per_interval_and_never_publishes_none() {
    let mut p = Proxy::new(r#","defaults":{"publish_interval":{"millis":100}}"#);
    let publishes = p.host.value("kvroute_state_publishes_total");
    p.route("a", &text(1));
    p.apply_reports();
    p.tick(TICK_MS);
    assert_eq!(
        p.host.value("kvroute_state_publishes_total"),
        publishes,
        "before the interval"
    );
    assert_eq!(p.published().directory_entries(), 0);
    p.tick(100);
    assert_eq!(p.host.value("kvroute_state_publishes_total"), publishes + 1);
    assert!(p.published().directory_entries() > 0);
    assert_eq!(p.host.value("kvroute_state_overlay_publishes_total"), 0);
    // Nothing new: no publish.
    p.tick(200);
    assert_eq!(p.host.value("kvroute_state_publishes_total"), publishes + 1);

    let mut p = Proxy::new(r#","defaults":{"publish_interval":"never"}"#);
    p.route("a", &text(1));
    p.apply_reports();
    p.tick(1000);
    assert_eq!(p.host.value("kvroute_decisions_recorded_total"), 1);
    assert_eq!(p.published().directory_entries(), 0);
    assert_eq!(p.published().header.directory_as_of_ms, 0);
    p.route("a", &text(1));
    assert_eq!(p.host.value("kvroute_predicted_hits_total"), 0);
}

#[test]
fn a_quiet_spell_does_not_age_a_directory_that_every_decision_is_published_to() {
    let mut p = Proxy::new("");
    p.route("a", &text(1));
    p.apply_reports();
    // Five seconds without a request: the service's ticks confirm the view is still complete.
    p.tick(5_000);
    p.host.advance_ms(3);
    p.route("b", &text(2));
    let ages = p.host.samples("kvroute_state_age_ms");
    assert_eq!(ages.last().copied(), Some(3), "ages {ages:?}");

    // Published on an interval, the view's age is the time since its publish.
    let mut p = Proxy::new(r#","defaults":{"publish_interval":{"millis":1000}}"#);
    p.route("a", &text(1));
    p.apply_reports();
    p.tick(1_000);
    p.tick(4_000);
    p.host.advance_ms(3);
    p.route("b", &text(2));
    let ages = p.host.samples("kvroute_state_age_ms");
    assert_eq!(ages.last().copied(), Some(4_003), "ages {ages:?}");
}

fn snapshot(now_ms: u64, waiting: [f64; 2], healthy: [bool; 2]) -> String {
    let engines: Vec<_> = (0..2)
        .map(|i| {
            serde_json::json!({
                "name": format!("e{i}"), "healthy": healthy[i], "consecutive_failures": 0,
                "scraped_at_ms": now_ms, "waiting": waiting[i], "running": 1.0, "kv_usage": 0.1,
                "hit_rate": null, "prompt_tokens_per_s": 0.0, "generation_tokens_per_s": 0.0,
                "capacity_tokens": null, "restarts": 0,
            })
        })
        .collect();
    serde_json::json!({
        "schema": 1, "version": 1, "generated_at_ms": now_ms, "poll_interval_ms": 50,
        "engines": engines,
    })
    .to_string()
}

#[test]
fn a_missing_or_late_sidecar_marks_the_state_stale_and_a_fresh_snapshot_clears_it() {
    let mut p = Proxy::new(r#","sidecar":{"cluster":"sidecar","stale_after_ms":500}"#);
    // Stale until the first snapshot arrives.
    assert!(p.published().header.stale);
    p.route("a", &text(1));
    assert_eq!(
        p.host.value("kvroute_fallbacks_total.reason.stale_state"),
        1
    );

    p.tick(100);
    p.answer(
        "/snapshot",
        200,
        snapshot(p.host.now_ms(), [3.0, 0.0], [true, false]).as_bytes(),
    );
    let h = p.published().header;
    assert!(!h.stale);
    assert_eq!(h.endpoints[0].engine.unwrap().waiting, 3.0);
    assert!(!h.endpoints[1].healthy);
    assert_eq!(p.host.value("kvroute_sidecar_pulls_total"), 1);
    assert_eq!(p.host.value("kvroute_sidecar_poll_interval_ms"), 50);

    // An error answer is counted and changes nothing.
    p.tick(100);
    p.answer("/snapshot", 503, b"");
    assert_eq!(p.host.value("kvroute_host_errors_total.op.sidecar_pull"), 1);
    assert!(!p.published().header.stale);

    // No answer for longer than stale_after_ms: stale, engine load dropped, health unknown.
    for _ in 0..6 {
        p.tick(100);
    }
    let h = p.published().header;
    assert!(h.stale);
    assert!(h.endpoints.iter().all(|e| e.healthy && e.engine.is_none()));
    assert_eq!(p.host.logged("sidecar snapshot missing or stale"), 1);
    p.route("b", &text(2));
    assert_eq!(
        p.host.value("kvroute_fallbacks_total.reason.stale_state"),
        2
    );

    // A snapshot again: fresh.
    p.answer(
        "/snapshot",
        200,
        snapshot(p.host.now_ms(), [0.0, 0.0], [true, true]).as_bytes(),
    );
    assert!(!p.published().header.stale);
    assert_eq!(p.host.logged("sidecar snapshot fresh again"), 2);
}

#[test]
fn an_unhealthy_endpoint_gets_no_requests() {
    let mut p = Proxy::new(r#","sidecar":{"cluster":"sidecar"}"#);
    p.tick(100);
    p.answer(
        "/snapshot",
        200,
        snapshot(p.host.now_ms(), [0.0, 0.0], [false, true]).as_bytes(),
    );
    for i in 0..8 {
        assert_eq!(p.route(&format!("s{i}"), &text(i)).1, 1);
    }
}

#[test]
fn a_retry_on_another_engine_moves_the_counts_there_and_marks_the_first_down() {
    let p = Proxy::new("");
    let (mut s, e) = p.route("a", &text(1));
    assert_eq!(
        p.host.stream().request_header("x-kvroute-host").unwrap(),
        format!("10.0.0.{}:8000,10.0.0.{}:8000", e + 1, 2 - e)
    );
    let served = format!("10.0.0.{}:8000", 2 - e);
    p.host.edit_stream(|s| s.upstream_address = Some(served));
    s.on_response_headers();
    let [req, _, _, down] = p.inflight();
    assert_eq!((req[e], req[1 - e]), (0, 1));
    assert_eq!(down[e] as u64, p.host.now_ms() + state::PASSIVE_DOWN_MS);
    assert_eq!(
        p.host
            .value(&format!("kvroute_retried_total.endpoint.e{e}")),
        1
    );
    // While it is down, the policies route around it.
    for i in 0..4 {
        assert_eq!(p.route(&format!("s{i}"), &text(10 + i)).1, 1 - e);
    }
    s.on_end();
    assert_eq!(p.inflight()[0][1 - e], 4);
}

/// The per-try timeout header a request leaves the filter with, for a body with `stream` as given
/// (absent for `None`).
fn per_try_timeout(p: &Proxy, stream: Option<bool>) -> Option<String> {
    let mut body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": text(3)}],
    });
    if let Some(st) = stream {
        body["stream"] = st.into();
    }
    let body = body.to_string();
    p.host.set_stream(InMemoryStream::post(CHAT, &body));
    let mut s = Stream::new(p.worker.clone());
    assert_eq!(s.on_request_headers(false), Flow::Pause);
    assert_eq!(s.on_request_body(body.len(), true), Flow::Continue);
    assert!(p.routed());
    let header = p.host.stream().request_header(PER_TRY_TIMEOUT_HEADER);
    s.on_end();
    header
}

#[test]
fn a_streamed_request_gets_a_time_limit_on_its_headers_and_no_other_does() {
    let p = Proxy::new("");
    assert_eq!(per_try_timeout(&p, Some(true)).as_deref(), Some("10000"));
    assert_eq!(per_try_timeout(&p, Some(false)), None);
    assert_eq!(per_try_timeout(&p, None), None);
    let p = Proxy::new(r#","stream_start_timeout_ms":750"#);
    assert_eq!(per_try_timeout(&p, Some(true)).as_deref(), Some("750"));
    // Off, or with no fallback host for Envoy to retry on (endpoints without an address).
    let p = Proxy::new(r#","stream_start_timeout_ms":0"#);
    assert_eq!(per_try_timeout(&p, Some(true)), None);
}

#[test]
fn bad_bodies_fall_back_to_load_routing_and_are_counted_by_reason() {
    let p = Proxy::new(r#","max_body_bytes":1000"#);
    for (body, reason) in [
        ("not json", "kvroute_parse_errors_total.reason.not_json"),
        (
            "{\"model\":\"m\"}",
            "kvroute_parse_errors_total.reason.no_prompt",
        ),
    ] {
        p.host.set_stream(InMemoryStream::post(CHAT, body));
        let mut s = Stream::new(p.worker.clone());
        assert_eq!(s.on_request_headers(false), Flow::Pause);
        assert_eq!(s.on_request_body(body.len(), true), Flow::Continue);
        assert!(p.routed());
        assert_eq!(p.host.value(reason), 1, "{reason}");
        s.on_end();
    }
    assert_eq!(
        p.host.value("kvroute_fallbacks_total.reason.parse_error"),
        2
    );
    // Declared too large: routed on its headers, never buffered.
    let mut big = InMemoryStream::post(CHAT, "{}");
    big.request_headers[2].1 = b"5000".to_vec();
    p.host.set_stream(big);
    let mut s = Stream::new(p.worker.clone());
    assert_eq!(s.on_request_headers(false), Flow::Continue);
    assert_eq!(
        p.host
            .value("kvroute_fallbacks_total.reason.body_too_large"),
        1
    );
    // A client's own routing header is removed; other paths pass through untouched.
    let mut get = InMemoryStream::post("/v1/models", "");
    get.request_headers[0].1 = b"GET".to_vec();
    get.request_headers
        .push(("x-kvroute-endpoint".into(), b"e1".to_vec()));
    p.host.set_stream(get);
    let mut s = Stream::new(p.worker.clone());
    assert_eq!(s.on_request_headers(true), Flow::Continue);
    assert_eq!(p.host.stream().request_header("x-kvroute-endpoint"), None);
    assert_eq!(p.host.value("kvroute_passthrough_total"), 1);
}

#[test]
fn a_stand_by_takes_the_state_service_over_when_its_lease_lapses_and_the_old_one_stands_down() {
    let mut p = Proxy::new("");
    let mut standby = Standby::new(p.host.clone(), config(""));
    // While the service renews its lease, the stand-by waits.
    for _ in 0..100 {
        p.tick(TICK_MS);
        standby.on_tick();
    }
    assert_eq!(p.host.value("kvroute_state_takeovers_total"), 0);
    let version = p.published().header.version;
    // The service's VM dies: nothing renews the lease.
    let mut dead_for = 0;
    while p.host.value("kvroute_state_takeovers_total") == 0 {
        p.host.advance_ms(TICK_MS);
        dead_for += TICK_MS;
        standby.on_tick();
        assert!(dead_for < 3 * state::LEASE_TTL_MS, "no takeover");
    }
    assert!(
        dead_for >= state::LEASE_TTL_MS - state::LEASE_RENEW_MS,
        "{dead_for}"
    );
    // The new service continues the version, so workers see its publishes as new.
    assert!(p.published().header.version > version);
    // It applies the reports.
    p.route("a", &text(1));
    let q = p.host.queue_id(state::DECISION_QUEUE).unwrap();
    standby.on_queue_ready(q);
    assert_eq!(p.host.value("kvroute_decisions_recorded_total"), 1);
    // The old one, if it comes back, finds the lease held and stands down for good.
    p.service.on_tick();
    p.host.advance_ms(state::LEASE_RENEW_MS);
    p.service.on_tick();
    assert!(!p.service.active());
}

/// The fleet's log as the sidecar keeps it in Redis (append, read after a cursor, the other
/// replicas' in-flight counts), for the control plane's side of the exchange.
#[derive(Default)]
struct Log {
    entries: Vec<(u64, kvroute_core::fleet::FleetEntry)>,
    inflight: std::collections::HashMap<u64, Vec<i64>>,
}

impl Log {
    fn answer(&mut self, body: &[u8]) -> Vec<u8> {
        use kvroute_core::fleet::{FleetEntry, FleetRequest, FleetResponse};
        let req = FleetRequest::decode(body).unwrap();
        if !req.batch.is_empty() {
            self.entries.push((
                req.replica,
                FleetEntry {
                    from_ms: req.batch_from_ms,
                    batch: req.batch,
                },
            ));
        }
        self.inflight.insert(req.replica, req.inflight.clone());
        let from: usize = req.cursor.parse().unwrap_or(0);
        let mut sum = vec![0; req.inflight.len()];
        for (r, v) in &self.inflight {
            if *r != req.replica {
                sum.iter_mut().zip(v).for_each(|(s, x)| *s += x);
            }
        }
        FleetResponse {
            cursor: self.entries.len().to_string(),
            inflight: sum,
            entries: self
                .entries
                .iter()
                .skip(from)
                .filter(|(r, _)| *r != req.replica)
                .map(|(_, e)| e.clone())
                .collect(),
        }
        .encode()
    }
}

const FLEET: &str = r#","fleet":{"cluster":"sidecar","sync_ms":50}"#;

impl Proxy {
    /// Lets the fleet exchange come due, and answers it from `log` (or with `status`).
    fn exchange(&mut self, log: &mut Log, status: u16) {
        self.tick(50);
        let call = self.host.take_callout("/fleet").expect("an exchange");
        assert_eq!(call.method, "POST");
        let body = if status == 200 {
            log.answer(&call.body)
        } else {
            Vec::new()
        };
        let service = &mut self.service;
        self.host.answer(status, &body, |n| {
            service.on_http_call_response(call.token, n)
        });
    }
}

#[test]
fn a_decision_on_one_replica_reaches_the_directory_of_another_through_the_log() {
    let mut log = Log::default();
    let mut a = Proxy::new(FLEET);
    let mut b = Proxy::new(FLEET);
    let (_s, e) = a.route("conv", &text(1));
    a.apply_reports();
    a.exchange(&mut log, 200);
    let follow_up = format!("{}and a follow-up.", text(1));
    // A replica that does not read the log knows nothing of the conversation.
    let c = Proxy::new(FLEET);
    c.route("conv", &follow_up);
    assert_eq!(c.host.value("kvroute_predicted_hits_total"), 0);
    b.exchange(&mut log, 200);
    assert_eq!(b.host.value("kvroute_fleet_reports_applied_total"), 1);
    assert_eq!(b.host.value("kvroute_fleet_connected"), 1);
    assert_eq!(b.host.samples("kvroute_fleet_sync_lag_ms").len(), 1);
    let (_s, e2) = b.route("conv", &follow_up);
    assert_eq!(
        e2, e,
        "the follow-up goes where the other replica sent the conversation"
    );
    assert_eq!(b.host.value("kvroute_predicted_hits_total"), 1);
    // A does not apply its own entry again.
    a.exchange(&mut log, 200);
    assert_eq!(a.host.value("kvroute_fleet_reports_applied_total"), 0);
    assert_eq!(a.host.value("kvroute_fleet_reports_shared_total"), 1);
}

#[test]
fn an_unreachable_log_keeps_the_batch_for_later_and_routing_goes_on() {
    let mut log = Log::default();
    let mut a = Proxy::new(FLEET);
    let mut b = Proxy::new(FLEET);
    a.route("conv", &text(1));
    a.apply_reports();
    a.exchange(&mut log, 503);
    assert_eq!(a.host.value("kvroute_fleet_errors_total"), 1);
    assert_eq!(a.host.value("kvroute_fleet_connected"), 0);
    assert!(log.entries.is_empty());
    // Routing goes on meanwhile.
    a.route("other", &text(2));
    a.apply_reports();
    // The log is back: both decisions travel in the next exchange.
    a.exchange(&mut log, 200);
    assert_eq!(log.entries.len(), 1);
    b.exchange(&mut log, 200);
    assert_eq!(b.host.value("kvroute_fleet_reports_applied_total"), 2);
}

#[test]
fn a_replica_that_starts_late_rebuilds_its_directory_from_the_log() {
    let mut log = Log::default();
    let mut a = Proxy::new(FLEET);
    for i in 0..3 {
        a.route(&format!("s{i}"), &text(i));
        a.apply_reports();
        a.exchange(&mut log, 200);
    }
    let mut late = Proxy::new(FLEET);
    late.exchange(&mut log, 200);
    assert_eq!(late.host.value("kvroute_fleet_entries_applied_total"), 3);
    // Every conversation's next turn finds its prefix.
    for i in 0..3 {
        late.route(&format!("s{i}"), &format!("{}and then?", text(i)));
    }
    assert_eq!(late.host.value("kvroute_predicted_hits_total"), 3);
}

#[test]
fn the_other_replicas_requests_in_flight_count_in_this_replicas_decisions() {
    let mut log = Log::default();
    // A keeps one session on one engine: three requests open there.
    let mut a =
        Proxy::new(r#","fleet":{"cluster":"sidecar"},"defaults":{"policy":"session_hash"}"#);
    let mut b = Proxy::new(r#","fleet":{"cluster":"sidecar"},"defaults":{"policy":"jsq"}"#);
    let _open: Vec<_> = (0..3).map(|i| a.route("one", &text(i))).collect();
    let counts = a.inflight()[0].clone();
    let idle = usize::from(counts[1] == 0);
    assert_eq!(counts[1 - idle], 3, "{counts:?}");
    a.exchange(&mut log, 200);
    b.exchange(&mut log, 200);
    // B's jsq sees A's queue: its next two requests both go to the idle engine.
    let held: Vec<_> = (0..2)
        .map(|i| {
            let (s, e) = b.route(&format!("x{i}"), &text(9 + i));
            assert_eq!(e, idle, "{counts:?}");
            s
        })
        .collect();
    // Once the fleet's counts expire, B sees only its own two: the next goes to the other engine.
    b.host.advance_ms(state::FLEET_INFLIGHT_TTL_MS + 1);
    assert_eq!(b.route("y", &text(20)).1, 1 - idle);
    drop(held);
}

#[test]
fn reports_beyond_the_batch_bound_are_applied_here_but_not_shared_and_are_counted() {
    let mut a = Proxy::new(r#","fleet":{"cluster":"sidecar","max_batch_bytes":1024}"#);
    for i in 0..6 {
        a.route(&format!("s{i}"), &text(i));
    }
    a.apply_reports();
    assert_eq!(a.host.value("kvroute_decisions_recorded_total"), 6);
    let shared = a.host.value("kvroute_fleet_reports_shared_total");
    let dropped = a.host.value("kvroute_fleet_dropped_reports_total");
    assert!(dropped > 0 && shared + dropped == 6, "{shared} {dropped}");
}

#[test]
fn a_new_directory_epoch_starts_reading_the_new_epochs_log_from_its_start() {
    let mut log = Log::default();
    let mut a = Proxy::new(FLEET);
    a.route("s", &text(1));
    a.apply_reports();
    a.exchange(&mut log, 200);
    a.exchange(&mut log, 200);
    let req = |p: &Proxy| {
        let c = p.host.callouts();
        kvroute_core::fleet::FleetRequest::decode(&c.last().unwrap().body).unwrap()
    };
    a.tick(50);
    assert_eq!(req(&a).cursor, "1");
    a.runtime(&[("kvroute.directory_epoch", "3")]);
    a.tick(1000);
    let r = req(&a);
    assert_eq!((r.cursor.as_str(), r.epoch), ("0", 3));
}

#[test]
fn a_fleet_sync_period_shorter_than_the_tick_sets_the_state_services_tick() {
    let p = Proxy::new(r#","fleet":{"cluster":"sidecar","sync_ms":8}"#);
    assert_eq!(p.host.tick(), Some(std::time::Duration::from_millis(8)));
    let p = Proxy::new(r#","fleet":{"cluster":"sidecar","sync_ms":500}"#);
    assert_eq!(
        p.host.tick(),
        Some(std::time::Duration::from_millis(TICK_MS))
    );
    let p = Proxy::new("");
    assert_eq!(
        p.host.tick(),
        Some(std::time::Duration::from_millis(TICK_MS))
    );
}

#[test]
fn responses_measure_chars_per_token_and_the_directory_is_sized_at_it() {
    let mut p = Proxy::new(r#","sidecar":{"cluster":"sidecar","stale_after_ms":60000}"#);
    p.tick(100);
    let snap = snapshot(p.host.now_ms(), [0.0, 0.0], [true, true])
        .replace("\"capacity_tokens\":null", "\"capacity_tokens\":64000");
    p.answer("/snapshot", 200, snap.as_bytes());
    p.tick(20);
    let capacity = |p: &Proxy| {
        p.host
            .value("kvroute_directory_endpoint_capacity.endpoint.e0")
    };
    // The configured 4 characters a token: 64,000 tokens are 4,000 blocks of 64 characters.
    assert_eq!(capacity(&p), 4000);
    assert_eq!(p.host.value("kvroute_chars_per_token_milli"), 4000);

    // Responses that report usage: each prompt's bytes against 400 tokens.
    for i in 0..60 {
        let (mut s, _) = p.route(&format!("s{i}"), &text(i));
        p.host.edit_stream(|s| {
            s.response_body =
                br#"{"usage":{"prompt_tokens":400,"prompt_tokens_details":{"cached_tokens":0}}}"#
                    .to_vec()
        });
        s.on_response_headers();
        s.on_response_body(100);
        s.on_end();
    }
    let (bytes, tokens) = state::decode_tokenizer(&p.host.shared(state::TOKENIZER_KEY).unwrap());
    assert_eq!(tokens, 24_000);
    let ratio = bytes as f64 / tokens as f64;
    assert!(ratio > 4.5, "{ratio}");
    p.tick(20);
    assert_eq!(
        p.host.value("kvroute_chars_per_token_milli"),
        (ratio * 1000.0).round() as i64
    );
    assert_eq!(capacity(&p), (64_000.0 * ratio / 64.0) as i64);

    // A response without usage adds nothing.
    let (mut s, _) = p.route("t", &text(99));
    p.host.edit_stream(|s| s.response_body = b"{}".to_vec());
    s.on_response_body(2);
    s.on_end();
    assert_eq!(
        state::decode_tokenizer(&p.host.shared(state::TOKENIZER_KEY).unwrap()).1,
        24_000
    );
}

#[test]
fn a_snapshot_republishes_the_header_only_and_the_overlay_still_applies() {
    let mut p = Proxy::new(r#","sidecar":{"cluster":"sidecar"}"#);
    p.tick(100);
    p.answer(
        "/snapshot",
        200,
        snapshot(p.host.now_ms(), [0.0, 0.0], [true, true]).as_bytes(),
    );
    let (_s, e) = p.route("a", &text(1));
    p.apply_reports();
    // The decision is published as an overlay on the directory.
    assert_eq!(p.host.value("kvroute_state_overlay_publishes_total"), 1);
    let directory = p.host.shared(state::DIRECTORY_KEY).unwrap();
    let overlay = p.host.shared(state::OVERLAY_KEY).unwrap();
    let version = p.published().header.version;
    let directories = p.host.value("kvroute_state_directory_publishes_total");
    assert!(directories >= 1);

    // Engine load changes: a new state, the same directory value and overlay.
    p.tick(100);
    p.answer(
        "/snapshot",
        200,
        snapshot(p.host.now_ms(), [5.0, 0.0], [true, true]).as_bytes(),
    );
    let h = p.published().header;
    assert!(h.version > version);
    assert_eq!(h.endpoints[0].engine.unwrap().waiting, 5.0);
    assert_eq!(p.host.shared(state::DIRECTORY_KEY).unwrap(), directory);
    assert_eq!(p.host.shared(state::OVERLAY_KEY).unwrap(), overlay);
    assert!(p.host.shared(state::STATE_KEY).unwrap().len() < 1024);
    assert_eq!(
        p.host.value("kvroute_state_directory_publishes_total"),
        directories
    );

    // A worker that reads the new state keeps routing on the overlay: the follow-up goes where
    // its prefix is, as a predicted hit, and the new engine load is what it reads.
    let fresh = p.worker(r#","sidecar":{"cluster":"sidecar"}"#);
    let before = p.host.value("kvroute_predicted_hits_total");
    let (_s, e2) = p.route_on(&fresh, "a", &format!("{}and a follow-up.", text(1)));
    assert_eq!(e2, e);
    assert_eq!(p.host.value("kvroute_predicted_hits_total"), before + 1);
}

#[test]
fn a_worker_that_reads_every_overlay_as_it_comes_sees_what_a_fresh_one_sees() {
    // Small endpoints (256 blocks each): a prompt here is about 40 blocks, so every decision
    // also evicts, and the directory is published again every few dozen decisions. A policy that follows the cache alone, so that both
    // workers choose by the directory's match.
    let extra =
        r#","default_capacity_blocks":256,"defaults":{"policy":"load_cache_aware","beta":0}"#;
    let mut p = Proxy::new(extra);
    let steady = p.worker(extra);
    for i in 0..60 {
        p.route_on(&steady, &format!("s{i}"), &text(i));
        p.apply_reports();
        // Each new prompt after the first few is checked both ways: its predecessors as the
        // steady worker sees them (its overlays read one publish at a time, the directory when
        // it is published again) and as a worker that reads everything now sees them.
        if i >= 4 {
            let fresh = p.worker(extra);
            for j in [i - 4, i - 1, i] {
                let (s1, _) = p.route_on(&steady, &format!("q{i}-{j}"), &text(j));
                let (s2, _) = p.route_on(&fresh, &format!("q{i}-{j}"), &text(j));
                let (a, b) = (s1.routed().unwrap(), s2.routed().unwrap());
                assert_eq!(
                    a.predicted_blocks, b.predicted_blocks,
                    "prompt {j} after {i}"
                );
                if j == i {
                    assert!(a.predicted_blocks > 0, "the newest prompt is placed");
                }
            }
        }
    }
    for (stat, least) in [
        ("kvroute_state_overlay_publishes_total", 10),
        ("kvroute_state_directory_publishes_total", 2),
    ] {
        let n = p.host.value(stat);
        assert!(n >= least, "{stat} = {n}");
    }
}

#[test]
fn long_prompts_on_a_large_directory_grow_the_overlay_instead_of_republishing_the_directory() {
    // Two endpoints of 16,384 blocks; each decision brings 1,000 new blocks (a long prompt).
    let mut p = Proxy::new(r#","default_capacity_blocks":16384"#);
    let q = p.host.queue_id(state::DECISION_QUEUE).unwrap();
    let mut next = 0u64;
    let mut decide = |p: &mut Proxy, endpoint: u16| {
        let report = DecisionReport {
            endpoint,
            session: None,
            blocks: (next..next + 1000)
                .map(|i| BlockHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1))
                .collect(),
        };
        next += 1000;
        p.host
            .enqueue(q, &state::encode_report_message(0, &report.encode()));
        p.apply_reports();
    };
    // Fill the directory.
    for i in 0..32 {
        decide(&mut p, i % 2);
    }
    let (dirs, overlays) = (
        p.host.value("kvroute_state_directory_publishes_total"),
        p.host.value("kvroute_state_overlay_publishes_total"),
    );
    for i in 0..40 {
        decide(&mut p, i % 2);
    }
    let dirs = p.host.value("kvroute_state_directory_publishes_total") - dirs;
    let overlays = p.host.value("kvroute_state_overlay_publishes_total") - overlays;
    assert_eq!(dirs + overlays, 40);
    // 2,000 changes a decision (1,000 added, 1,000 evicted) on 32,768 entries: a bound of
    // about 11,400, so five overlays between directory publishes; a bound of 2,048 would publish
    // the directory every other decision.
    assert!(dirs <= 8, "{dirs} directory publishes in 40 decisions");
    // The view stays exact: the last decision's blocks are where it put them.
    let last = (next - 1000..next).map(|i| BlockHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1));
    p.with_view(|view| {
        for b in last {
            assert_eq!(view.holders(b), 0b10);
        }
    });
}

#[test]
fn prompt_heads_and_their_continuing_shares_are_published_and_counted() {
    let mut p = Proxy::new("");
    let doc =
        "Answer from this document only: the tides follow the moon, twice a day, everywhere. "
            .repeat(3);
    // Twenty questions over one document, each its own session; ten conversations of ten requests,
    // each request's report recorded before the next is decided.
    let send = |p: &mut Proxy, session: String, prompt: String| {
        let _ = p.route(&session, &prompt);
        p.host.advance_us(REPORT_COALESCE_US);
        p.worker.on_tick();
        p.apply_reports();
    };
    for i in 0..20 {
        send(&mut p, format!("q{i}"), format!("{doc} Question {i}?"));
    }
    for c in 0..10 {
        for t in 0..10 {
            send(&mut p, format!("c{c}"), format!("{} turn {t}", text(c)));
        }
    }
    p.tick(TICK_MS);
    // The workers read the heads from the published state (its overlay's, where one applies): the
    // document's head never continued.
    let stats = p.with_view(|view| view.session_stats().unwrap().clone());
    let key = |t: &str| {
        let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": t}]});
        let f = kvroute_core::router::body_features(
            kvroute_core::request::ApiKind::Chat,
            body.to_string().as_bytes(),
            None,
            kvroute_core::prefix::BlockSpec::default(),
        )
        .unwrap();
        f.head_key
    };
    let question = key(&format!("{doc} Question 99?"));
    let h = stats
        .heads
        .iter()
        .find(|h| Some(h.key) == question)
        .unwrap();
    assert_eq!((h.seen(), h.continuing), (20, 0));
    assert_eq!(stats.continuing_for(question), 0.0);
    let conversation = key(&format!("{} turn 99", text(3)));
    assert!((stats.continuing_for(conversation) - 0.9).abs() < 1e-9);
    // And the gauges say so: 90 of 120 requests continued; eleven heads have their own share.
    assert_eq!(p.host.value("kvroute_session_continuing_milli"), 750);
    assert_eq!(p.host.value("kvroute_session_heads"), 11);
}
