//! Faults of the gateway's own parts under load, each with a count of lost requests: the sidecar
//! killed and restarted, the filter's configuration changed by ECDS, a storm of `runtime_modify`
//! calls, and the state singleton's Wasm VM crashing. None of them may lose a request: the
//! sidecar and the singleton are off the request path, and a new filter configuration applies to
//! new streams while old ones finish on the old one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use kvroute_e2e::*;
use kvroute_harness::emulated::EmulatedEngine;
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::procs;
use kvroute_harness::stack::{filter_wasm, Envoy};

async fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(name).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_killed_under_load_loses_nothing_and_routing_recovers() {
    const PROFILE: &str = "rtx5080-llama3.2-3b";
    let engines = EmulatedEngine::start_fleet(2, PROFILE, 4.0).await.unwrap();
    let named: Vec<(String, String)> = engines.iter().map(|e| (e.name.clone(), e.url())).collect();
    let mut sidecar = procs::sidecar(&named, 50, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut spec = EnvoySpec::new(
        engines
            .iter()
            .map(|e| Engine::local(&e.name, e.addr.port()))
            .collect(),
        filter_wasm().unwrap().display().to_string(),
    );
    kvroute_e2e::under_test(&mut spec);
    spec.set_sidecar(Engine::local("sidecar", sidecar.addr.port()));
    spec.filter.defaults.load_refresh_ms = 50;
    let envoy = Envoy::start(spec).await.unwrap();
    envoy
        .wait_stat("kvroute_state_stale", Duration::from_secs(5), |v| v == 0)
        .await
        .unwrap();
    let model = served_model(&engines[0].url()).await;
    let load = Load::streaming(&[envoy.url("/v1/chat/completions")], &model, 16, 3);
    let tally = load.tally.clone();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // SIGKILL the sidecar: the state goes stale, routing falls back to load, traffic goes on.
    sidecar.kill().await;
    envoy
        .wait_stat("kvroute_state_stale", Duration::from_secs(10), |v| v == 1)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stale_routed = stat(&envoy, "kvroute_fallbacks_total.reason.stale_state").await;
    let failed_pulls = stat(&envoy, "kvroute_host_errors_total.op.sidecar_pull").await;

    // A new sidecar process on the same address: the state is fresh again and the fallbacks stop.
    sidecar = procs::sidecar(&named, 50, sidecar.addr).await.unwrap();
    envoy
        .wait_stat("kvroute_state_stale", Duration::from_secs(10), |v| v == 0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_restart = stat(&envoy, "kvroute_fallbacks_total.reason.stale_state").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let settled = stat(&envoy, "kvroute_fallbacks_total.reason.stale_state").await;
    load.stop().await;
    let (sent, failed, a, b) = tally.get();
    println!(
        "sidecar SIGKILL and restart: {sent} requests, {failed} failed, {a} / {b} per engine; \
         {stale_routed} routed on stale state, {failed_pulls} failed pulls"
    );
    assert!(sent > 30, "{sent}");
    assert_eq!(failed, 0, "the sidecar is off the request path");
    assert!(
        stale_routed > 0,
        "requests meanwhile were routed by load, and counted"
    );
    assert!(failed_pulls > 0, "the failed pulls are counted");
    assert_eq!(
        settled, after_restart,
        "routing recovered: no stale fallbacks since"
    );
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_configs_changed_by_ecds_under_load_lose_nothing() {
    if kvroute_e2e::native_build() {
        eprintln!("skipped: the harness serves only the Wasm filter's configuration by ECDS");
        return;
    }
    // The HTTP filter's configuration comes by ECDS from a watched file; the harness replaces it.
    let s = Arc::new(
        Stack::start_with(2, |spec| {
            spec.ecds_path = Some("(in Envoy's directory)".into());
            spec.filter.defaults.policy = "round_robin".parse().unwrap();
        })
        .await,
    );
    let normal = serde_json::to_value(s.envoy_spec_filter()).unwrap();
    // The same filter with a 64-byte body limit: every chat is too large and routed by load,
    // counted, which shows the new configuration is the one serving.
    let mut tiny = normal.clone();
    tiny["max_body_bytes"] = 64.into();
    let load = Load::echo(&s, 3);
    let tally = load.tally.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reload = "extension_config_discovery.http_filter.kvroute.update_success";
    let fail = "extension_config_discovery.http_filter.kvroute.update_rejected";
    let reloads0 = stat(&s.envoy, reload).await;
    // 12 new configurations, 150 ms apart, alternating; a rejected one in the middle.
    for i in 0..12 {
        let cfg = if i % 2 == 0 { &tiny } else { &normal };
        s.envoy.push_filter_config(&cfg.to_string()).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        if i == 6 {
            s.envoy
                .push_filter_config(r#"{"endpoints": "not a list"}"#)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    // The last one pushed is the normal configuration: once it applies, no more fallbacks.
    s.envoy
        .wait_stat(reload, Duration::from_secs(5), |v| v >= reloads0 + 12)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let too_large = stat(&s.envoy, "kvroute_fallbacks_total.reason.body_too_large").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let too_large_after = stat(&s.envoy, "kvroute_fallbacks_total.reason.body_too_large").await;
    load.stop().await;
    let (sent, failed, a, b) = tally.get();
    let (reloads, fails) = (stat(&s.envoy, reload).await, stat(&s.envoy, fail).await);
    println!(
        "ECDS under load: {sent} requests, {failed} failed, {a} / {b} per engine; {} configurations \
         applied, {fails} rejected; {too_large} routed as too large under the 64-byte one",
        reloads - reloads0
    );
    assert!(sent > 30, "{sent}");
    assert_eq!(failed, 0, "no request lost to a configuration change");
    assert!(fails >= 1, "the bad configuration was rejected");
    assert!(too_large > 0, "the 64-byte configuration served");
    assert_eq!(too_large_after, too_large, "the last configuration serves");
    assert_eq!(s.vm_reloads().await, 0, "no VM crashed");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_runtime_modify_calls_loses_no_request() {
    let s = Arc::new(Stack::with_policy(2, "predicted_ttft").await);
    let load = Load::echo(&s, 3);
    let tally = load.tally.clone();
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
    load.stop().await;
    let (sent, failed, a, b) = tally.get();
    println!(
        "runtime_modify storm: {sent} requests, {failed} failed, {a} / {b} per engine; {} takeovers",
        s.stat("kvroute_state_takeovers_total").await
    );
    assert!(sent > 30, "{sent}");
    assert_eq!(failed, 0);
    assert!(s.stat("kvroute_runtime_polls_total").await > 0);
    assert_eq!(s.vm_reloads().await, 0, "no VM crashed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_state_singleton_loses_nothing_and_a_filter_vm_takes_over() {
    if kvroute_e2e::native_build() {
        eprintln!("skipped: the native module's state service runs in Envoy's main thread, not a VM that can crash alone");
        return;
    }
    // The filter built with the test-only trigger: the singleton traps at its next runtime poll.
    let wasm = kvroute_harness::stack::faults_wasm().unwrap();
    let s = Arc::new(
        Stack::start_with(2, |spec| {
            spec.wasm_path = wasm.display().to_string();
        })
        .await,
    );
    let load = Load::echo(&s, 3);
    let tally = load.tally.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 400;
    let crash_at = std::time::Instant::now();
    s.envoy
        .runtime_modify(&[(
            "kvroute.test_crash_singleton_before_ms",
            &deadline.to_string(),
        )])
        .await
        .unwrap();
    // Envoy never restarts the bootstrap service; a filter VM takes its lease when it lapses.
    s.envoy
        .wait_stat(
            "kvroute_state_takeovers_total",
            Duration::from_secs(10),
            |v| v >= 1,
        )
        .await
        .unwrap();
    let took_over = crash_at.elapsed();
    assert!(
        s.envoy.log_tail(400).contains("test fault"),
        "the singleton crashed"
    );
    // The new state service works: it applies the workers' reports and runtime values.
    let recorded = s.stat("kvroute_decisions_recorded_total").await;
    s.envoy.set_policy("jsq").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let jsq = s
        .stat("kvroute_decisions_total.policy.jsq.endpoint.engine0")
        .await
        + s.stat("kvroute_decisions_total.policy.jsq.endpoint.engine1")
            .await;
    let recorded_after = s.stat("kvroute_decisions_recorded_total").await;
    load.stop().await;
    let (sent, failed, a, b) = tally.get();
    println!(
        "singleton crash: {sent} requests, {failed} failed, {a} / {b} per engine; a filter VM took \
         over {took_over:?} after the crash was asked for; {} decisions recorded since, {jsq} by jsq",
        recorded_after - recorded
    );
    assert!(sent > 30, "{sent}");
    assert_eq!(failed, 0, "the state service is off the request path");
    assert!(recorded_after > recorded, "reports are applied again");
    assert!(jsq > 0, "runtime values apply again");
    assert_eq!(
        s.stat("kvroute_state_takeovers_total").await,
        1,
        "one takeover, not a fight over the lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_bootstrap_service_a_filter_vm_runs_the_state_service() {
    if kvroute_e2e::native_build() {
        eprintln!("skipped: the native module always runs its own state service");
        return;
    }
    // Platforms that cannot add a bootstrap extension: the filter alone. Envoy::start waits for
    // the first published state, which a filter VM publishes once no lease appeared for 3 s.
    let s = Stack::start_with(2, |spec| spec.state_service = false).await;
    assert_eq!(s.stat("kvroute_state_takeovers_total").await, 1);
    s.envoy.set_policy("jsq").await.unwrap();
    for i in 0..10 {
        let r = s
            .chat(&chat(&[("user", &format!("question {i}"))]), &[])
            .await;
        assert_eq!(r.status, 200);
    }
    let jsq = s
        .stat("kvroute_decisions_total.policy.jsq.endpoint.engine0")
        .await
        + s.stat("kvroute_decisions_total.policy.jsq.endpoint.engine1")
            .await;
    assert_eq!(
        jsq, 10,
        "runtime values reach the filter through its own state service"
    );
    assert!(s.stat("kvroute_decisions_recorded_total").await > 0);
}
