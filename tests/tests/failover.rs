//! Faults under load, each with a count of lost requests.
//!
//! A dead engine loses only what was in flight on it: a request the filter sends to an engine that
//! refuses the connection is retried once on the fallback host the filter names (Envoy's
//! override_host policy), the refusing engine is marked down for the policies at once, and it
//! takes traffic again when it comes back. A storm of `runtime_modify` calls loses nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvroute_e2e::*;
use kvroute_workloads::echo::EchoEngine;

/// Requests sent, failed (not a 200 from an engine), and served per engine.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    failed: AtomicU64,
    by: [AtomicU64; 2],
}

impl Tally {
    fn get(&self) -> (u64, u64, u64, u64) {
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        (
            l(&self.sent),
            l(&self.failed),
            l(&self.by[0]),
            l(&self.by[1]),
        )
    }
}

/// One client sending requests one after another (each held 20 ms by the engine) until `stop`.
async fn client(s: Arc<Stack>, stop: Arc<AtomicBool>, tally: Arc<Tally>, c: usize) {
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) && i < 20_000 {
        i += 1;
        let body = chat(&[("user", &format!("client {c} request {i}: a new prompt"))]);
        let r = s.chat(&body, &[("x-echo-delay-ms", "20")]).await;
        tally.sent.fetch_add(1, Ordering::SeqCst);
        match (r.status, r.served_by.as_deref()) {
            (200, Some("engine0")) => tally.by[0].fetch_add(1, Ordering::SeqCst),
            (200, Some("engine1")) => tally.by[1].fetch_add(1, Ordering::SeqCst),
            _ => tally.failed.fetch_add(1, Ordering::SeqCst),
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_under_load_loses_nothing_and_comes_back() {
    // round_robin sends every other request to engine0, so its death shows at once.
    let s = Arc::new(Stack::with_policy(2, "round_robin").await);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..4)
        .map(|c| tokio::spawn(client(s.clone(), stop.clone(), tally.clone(), c)))
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (sent0, failed0, a0, b0) = tally.get();
    assert!(a0 > 0 && b0 > 0 && failed0 == 0, "{:?}", tally.get());

    // Kill engine0: it accepts no connection from now on and finishes what it holds.
    let in_flight_at_kill = s.engines[0].active();
    s.engines[0].shutdown();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (sent1, failed1, a1, b1) = tally.get();
    let retried = s.stat("kvroute_retried_total.endpoint.engine0").await;
    println!(
        "killed: {} requests since, {} failed, {in_flight_at_kill} in flight on engine0 at the \
         kill; engine0 served {} more, engine1 {}; {retried} retried on engine1",
        sent1 - sent0,
        failed1,
        a1 - a0,
        b1 - b0
    );
    assert!(sent1 > sent0 + 20, "the load went on");
    assert!(
        failed1 <= in_flight_at_kill,
        "{failed1} failed, {in_flight_at_kill} in flight at the kill"
    );
    assert!(
        retried >= 1,
        "requests sent to the dead engine were retried"
    );
    // Marked down at its first refusal: round_robin stops sending there, so few were retried.
    assert!(
        retried < (sent1 - sent0) / 4,
        "{retried} retried of {}",
        sent1 - sent0
    );

    // Back on the same address: once its down mark expires (2 s), it takes its share again.
    let back = EchoEngine::start_on("engine0", s.engines[0].addr)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let (_, failed2, a2, _) = tally.get();
    assert!(back.completions() > 10, "engine0 serves again");
    assert_eq!(a2 - a1, back.completions());
    assert_eq!(failed2, failed1, "nothing failed after the kill settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_runtime_modify_calls_loses_no_request() {
    let s = Arc::new(Stack::with_policy(2, "predicted_ttft").await);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..3)
        .map(|c| tokio::spawn(client(s.clone(), stop.clone(), tally.clone(), c)))
        .collect();
    // 300 calls as fast as the admin answers: every policy in turn, with parameters, some of them
    // invalid, and the directory epoch bumped (the singleton forgets the directory each time).
    let policies = kvroute_core::PolicyKind::ALL;
    for i in 0..300usize {
        let policy = policies[i % policies.len()].as_str();
        let epoch = (i / 50).to_string();
        let alpha = if i % 7 == 0 { "nan" } else { "0.6" };
        s.envoy
            .runtime_modify(&[
                ("kvroute.policy", policy),
                ("kvroute.alpha", alpha),
                ("kvroute.ttft_work_weight", "2"),
                ("kvroute.directory_epoch", &epoch),
            ])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let (sent, failed, a, b) = tally.get();
    println!("runtime_modify storm: {sent} requests, {failed} failed, {a} / {b} per engine");
    assert!(sent > 30, "{sent}");
    assert_eq!(failed, 0);
    assert!(s.stat("kvroute_runtime_polls_total").await > 0);
    assert_eq!(s.vm_reloads().await, 0, "no VM crashed");
}
