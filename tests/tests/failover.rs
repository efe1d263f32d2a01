//! A dead engine under load, with a count of lost requests.
//!
//! A dead engine loses only what was in flight on it: a request the filter sends to an engine that
//! refuses the connection is retried once on the fallback host the filter names (Envoy's
//! override_host policy), the refusing engine is marked down for the policies at once, and it
//! takes traffic again when it comes back: whether it stops gracefully or its process is killed
//! mid-stream. A killed engine's whole (not streamed) answers are retried too: only the streams it
//! had begun are lost.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kvroute_e2e::*;
use kvroute_harness::echo::EchoEngine;
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::procs;
use kvroute_harness::stack::{filter_wasm, Envoy};

/// After a kill: the load went on, no more requests failed than were in flight at the kill, and
/// requests sent to the dead engine were retried.
fn lost_only_what_was_in_flight(
    sent_since: u64,
    failed: u64,
    in_flight_at_kill: u64,
    retried: u64,
) {
    assert!(sent_since > 20, "the load went on");
    assert!(
        failed <= in_flight_at_kill,
        "{failed} failed, {in_flight_at_kill} in flight at the kill"
    );
    assert!(
        retried >= 1,
        "requests sent to the dead engine were retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_under_load_loses_nothing_and_comes_back() {
    // round_robin sends every other request to engine0, so its death shows at once.
    let s = Arc::new(Stack::with_policy(2, "round_robin").await);
    let load = Load::echo(&s, 4);
    let tally = load.tally.clone();
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
    lost_only_what_was_in_flight(sent1 - sent0, failed1, in_flight_at_kill, retried);
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
    load.stop().await;
    let (_, failed2, a2, _) = tally.get();
    assert!(back.completions() > 10, "engine0 serves again");
    assert_eq!(a2 - a1, back.completions());
    assert_eq!(failed2, failed1, "nothing failed after the kill settled");
}

/// What a SIGKILL of engine0 under load did, 1.5 s after it.
struct Killed {
    /// Requests answered since the kill.
    sent: u64,
    /// Requests failed, in all.
    failed: u64,
    /// Requests out (on both engines) at the kill.
    in_flight: u64,
    /// Completed by engine0 and engine1 since the kill.
    served: (u64, u64),
    /// Requests retried off engine0 (`kvroute_retried_total`).
    retried: u64,
}

/// Runs `load` for 1 s, SIGKILLs `engines[0]`, and tells what happened in the 1.5 s after.
async fn kill_engine0_under(load: &Load, engines: &mut [procs::Proc], envoy: &Envoy) -> Killed {
    let tally = &load.tally;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (sent0, failed0, a0, b0) = tally.get();
    assert!(a0 > 0 && b0 > 0 && failed0 == 0, "{:?}", tally.get());
    let in_flight = tally.in_flight.load(Ordering::SeqCst);
    engines[0].kill().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (sent1, failed, a1, b1) = tally.get();
    let retried = envoy
        .stat("kvroute_retried_total.endpoint.engine0")
        .await
        .unwrap();
    let k = Killed {
        sent: sent1 - sent0,
        failed,
        in_flight,
        served: (a1 - a0, b1 - b0),
        retried,
    };
    println!(
        "{} requests since, {} failed, {} in flight (both engines) at the kill; engine0 \
         completed {} more, engine1 {}; {} retried",
        k.sent, k.failed, k.in_flight, k.served.0, k.served.1, k.retried
    );
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_process_killed_mid_stream_loses_only_what_it_held() {
    // Two emulated vLLM engines as processes, four times real time; streaming chats of 48 tokens
    // (about 100 ms each), so a SIGKILL cuts streams in the middle: their open streams break,
    // the port refuses from then on.
    let (mut engines, envoy, model) = emulated_stack(|_| {}).await;
    let port0 = engines[0].addr.port();
    let load = Load::streaming(&[envoy.url("/v1/chat/completions")], &model, 48, 4);
    let k = kill_engine0_under(&load, &mut engines, &envoy).await;
    lost_only_what_was_in_flight(k.sent, k.failed, k.in_flight, k.retried);

    // A new process on the same port takes its share again once the down mark expires.
    let (_, _, a1, _) = load.tally.get();
    engines[0] = procs::emulator(EMULATED_PROFILE, 4.0, port0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (_, failed2, a2, _) = load.stop().await;
    println!("restarted: engine0 completed {} requests", a2 - a1);
    assert!(a2 > a1 + 10, "engine0 serves again");
    assert_eq!(failed2, k.failed, "nothing failed after the kill settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_process_killed_mid_answer_loses_no_whole_answer() {
    // Whole (not streamed) answers of 48 tokens, about 100 ms each at four times real time: an
    // engine sends nothing of one before it is complete, so a SIGKILL cuts its connection before
    // any response byte, and Envoy's retry sends the request again, to the fallback host the
    // filter named.
    let (mut engines, envoy, model) = emulated_stack(|_| {}).await;
    let load = Load::whole(&[envoy.url("/v1/chat/completions")], &model, 48, 4);
    let k = kill_engine0_under(&load, &mut engines, &envoy).await;
    load.stop().await;
    assert!(k.sent > 20, "the load went on");
    assert_eq!(
        k.failed, 0,
        "no whole answer was lost: each cut one was retried"
    );
    assert!(k.retried >= 1, "requests cut by the kill were retried");
}

const EMULATED_PROFILE: &str = "rtx5080-llama3.2-3b";

/// Two emulated vLLM engines as processes at four times real time, behind an Envoy with the
/// filter under test, `round_robin`, and `edit` applied to its spec. Returns the engines, the
/// Envoy and the served model.
async fn emulated_stack(edit: impl FnOnce(&mut EnvoySpec)) -> (Vec<procs::Proc>, Envoy, String) {
    let mut engines = Vec::new();
    for _ in 0..2 {
        engines.push(procs::emulator(EMULATED_PROFILE, 4.0, 0).await.unwrap());
    }
    let mut spec = EnvoySpec::new(
        engines
            .iter()
            .enumerate()
            .map(|(i, e)| Engine::local(&format!("engine{i}"), e.addr.port()))
            .collect(),
        filter_wasm().unwrap().display().to_string(),
    );
    kvroute_e2e::under_test(&mut spec);
    spec.filter.defaults.policy = "round_robin".parse().unwrap();
    edit(&mut spec);
    let envoy = Envoy::start(spec).await.unwrap();
    let model = served_model(&engines[0].url()).await;
    (engines, envoy, model)
}

/// Sends SIGSTOP or SIGCONT to a process.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Two emulated engines, four streaming clients, `round_robin`; engine0 frozen (SIGSTOP) for
/// 2.5 s, then thawed. Returns (requests completed while it was frozen, failed in all, retried).
async fn frozen_engine(stream_start_timeout_ms: u32) -> (u64, u64, u64) {
    let (engines, envoy, model) = emulated_stack(|spec| {
        spec.filter.stream_start_timeout_ms = stream_start_timeout_ms;
    })
    .await;
    let load = Load::streaming(&[envoy.url("/v1/chat/completions")], &model, 16, 4);
    let tally = load.tally.clone();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, failed0, a0, b0) = tally.get();
    assert!(a0 > 0 && b0 > 0 && failed0 == 0, "{:?}", tally.get());

    // A hung engine: its port still accepts connections, nothing answers.
    let pid = engines[0].pid().unwrap();
    signal(pid, "-STOP");
    let (sent0, ..) = tally.get();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (sent1, ..) = tally.get();
    signal(pid, "-CONT");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, failed, _, _) = load.stop().await;
    let retried = envoy
        .stat("kvroute_retried_total.endpoint.engine0")
        .await
        .unwrap();
    (sent1 - sent0, failed, retried)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_engine_holds_up_no_stream_that_it_has_not_answered() {
    // Without a bound on a stream's headers, every client ends up waiting on the frozen engine.
    let (stalled, failed_off, retried_off) = frozen_engine(0).await;
    // With one, a stream the frozen engine does not answer in 300 ms is retried on the other,
    // and the frozen engine is marked down.
    let (flowed, failed, retried) = frozen_engine(300).await;
    println!(
        "engine0 frozen 2.5 s under 4 streaming clients: {stalled} requests completed without a \
         bound on a stream's headers ({retried_off} retried, {failed_off} failed), {flowed} with \
         300 ms ({retried} retried on engine1, {failed} failed)"
    );
    assert_eq!(
        failed, 0,
        "nothing lost: the streams it held resumed on the thaw"
    );
    assert!(
        retried >= 1,
        "streams sent to the frozen engine were retried"
    );
    assert!(
        flowed > 10 && flowed > 2 * stalled,
        "the load went on while engine0 was frozen: {flowed} against {stalled}"
    );
}
