//! State freshness end to end: the real Envoy and filter, emulated vLLM engines, the sidecar.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kvroute_core::config::PolicySettings;
use kvroute_core::policy::{LoadSignal, PolicyKind};
use kvroute_e2e::histogram_quantiles;
use kvroute_harness::emulated::{EmulatedEngine, RunningSidecar};
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::stack::{filter_wasm, Envoy};
use serde_json::json;

const PROFILE: &str = "rtx5080-llama3.2-3b";
const POLL: Duration = Duration::from_millis(50);

struct Rig {
    engines: Vec<Option<EmulatedEngine>>,
    addrs: Vec<SocketAddr>,
    sidecar: Option<RunningSidecar>,
    sidecar_addr: SocketAddr,
    envoy: Envoy,
    client: reqwest::Client,
}

impl Rig {
    async fn start(policy: PolicyKind, signal: LoadSignal) -> Rig {
        let engines = EmulatedEngine::start_fleet(2, PROFILE, 1.0).await.unwrap();
        let refs: Vec<&EmulatedEngine> = engines.iter().collect();
        let sidecar = RunningSidecar::start_at(&refs, POLL, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let spec_engines = engines
            .iter()
            .map(|e| Engine::local(&e.name, e.addr.port()))
            .collect();
        let mut spec = EnvoySpec::new(spec_engines, filter_wasm().unwrap().display().to_string());
        kvroute_e2e::under_test(&mut spec);
        spec.set_sidecar(Engine::local("sidecar", sidecar.addr.port()));
        spec.filter.defaults = PolicySettings {
            policy,
            load_signal: signal,
            load_refresh_ms: 50,
            ..PolicySettings::default()
        };
        let envoy = Envoy::start(spec).await.unwrap();
        envoy
            .wait_stat("kvroute_state_stale", Duration::from_secs(5), |v| v == 0)
            .await
            .unwrap();
        Rig {
            addrs: engines.iter().map(|e| e.addr).collect(),
            engines: engines.into_iter().map(Some).collect(),
            sidecar_addr: sidecar.addr,
            sidecar: Some(sidecar),
            envoy,
            client: reqwest::Client::new(),
        }
    }

    /// Sends a short chat through Envoy; returns (status, chosen endpoint).
    async fn send(&self, i: usize) -> (u16, String) {
        let r = self
            .client
            .post(self.envoy.url("/v1/chat/completions"))
            .json(&json!({"messages": [{"role": "user", "content": format!("request {i}")}], "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let ep = r
            .headers()
            .get("x-kvroute-endpoint")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let _ = r.bytes().await;
        (status, ep)
    }

    async fn stat(&self, name: &str) -> u64 {
        self.envoy
            .stats()
            .await
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_aware_routing_moves_traffic_off_an_engine_made_busy() {
    let rig = Rig::start(PolicyKind::Jsq, LoadSignal::EngineQueue).await;
    // Load engine0 directly, past the gateway: only the engine's own metrics can show it.
    let url = format!(
        "{}/v1/chat/completions",
        rig.engines[0].as_ref().unwrap().url()
    );
    let mut floods = Vec::new();
    for i in 0..8 {
        let body = json!({"messages": [{"role": "user", "content": format!("long job {i}")}], "max_tokens": 4000,
                          "ignore_eos": true, "stream": true});
        let r = rig.client.post(&url).json(&body).send().await.unwrap();
        floods.push(r.bytes_stream());
    }
    for f in &mut floods {
        f.next().await;
    }
    rig.envoy
        .wait_stat(
            "kvroute_engine_queue.endpoint.engine0",
            Duration::from_secs(5),
            |v| v >= 8,
        )
        .await
        .unwrap();
    for i in 0..6 {
        assert_eq!(
            rig.send(i).await,
            (200, "engine1".to_string()),
            "request {i} should avoid the busy engine"
        );
    }
    drop(floods);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_gets_no_requests_after_one_refresh_and_is_used_again() {
    let mut rig = Rig::start(PolicyKind::RoundRobin, LoadSignal::GatewayInflight).await;
    for i in 0..4 {
        assert_eq!(rig.send(i).await.0, 200);
    }
    let killed_at = Instant::now();
    rig.engines[1] = None;
    rig.envoy
        .wait_stat(
            "kvroute_endpoint_healthy.endpoint.engine1",
            Duration::from_secs(10),
            |v| v == 0,
        )
        .await
        .unwrap();
    println!(
        "engine1 marked unhealthy {:?} after it stopped",
        killed_at.elapsed()
    );
    for i in 0..10 {
        assert_eq!(
            rig.send(i).await,
            (200, "engine0".to_string()),
            "request {i} after the engine died"
        );
    }
    rig.engines[1] = Some(
        EmulatedEngine::start_at("engine1", PROFILE, 1.0, rig.addrs[1])
            .await
            .unwrap(),
    );
    rig.envoy
        .wait_stat(
            "kvroute_endpoint_healthy.endpoint.engine1",
            Duration::from_secs(10),
            |v| v == 1,
        )
        .await
        .unwrap();
    let mut used = std::collections::BTreeSet::new();
    for i in 0..6 {
        let (status, ep) = rig.send(i).await;
        assert_eq!(status, 200);
        used.insert(ep);
    }
    assert!(used.contains("engine1"), "engine1 is used again: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sidecar_degrades_routing_not_traffic() {
    let mut rig = Rig::start(PolicyKind::Jsq, LoadSignal::EngineQueue).await;
    assert_eq!(
        rig.stat("kvroute_fallbacks_total.reason.stale_state").await,
        0
    );
    rig.sidecar = None;
    rig.envoy
        .wait_stat("kvroute_state_stale", Duration::from_secs(10), |v| v == 1)
        .await
        .unwrap();
    assert!(
        rig.stat("kvroute_host_errors_total.op.sidecar_pull").await >= 1,
        "the failed pulls are counted"
    );
    for i in 0..10 {
        assert_eq!(rig.send(i).await.0, 200, "no 5xx while the sidecar is down");
    }
    assert_eq!(
        rig.stat("kvroute_fallbacks_total.reason.stale_state").await,
        10
    );
    // Without engine load, the engine-queue signal falls back to gateway in-flight counts.
    assert!(
        rig.stat("kvroute_fallbacks_total.reason.engine_load_missing")
            .await
            >= 10
    );
    let refs: Vec<&EmulatedEngine> = rig.engines.iter().flatten().collect();
    rig.sidecar = Some(
        RunningSidecar::start_at(&refs, POLL, rig.sidecar_addr)
            .await
            .unwrap(),
    );
    rig.envoy
        .wait_stat("kvroute_state_stale", Duration::from_secs(10), |v| v == 0)
        .await
        .unwrap();
    for i in 0..5 {
        assert_eq!(rig.send(i).await.0, 200);
    }
    assert_eq!(
        rig.stat("kvroute_fallbacks_total.reason.stale_state").await,
        10,
        "routing recovered"
    );
}

/// The sidecar's engine poll interval is an Envoy runtime value too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_poll_interval_follows_a_runtime_value() {
    let rig = Rig::start(PolicyKind::Jsq, LoadSignal::EngineQueue).await;
    rig.envoy
        .wait_stat(
            "kvroute_sidecar_poll_interval_ms",
            Duration::from_secs(5),
            |v| v == 50,
        )
        .await
        .unwrap();
    rig.envoy
        .runtime_modify(&[("kvroute.sidecar_poll_ms", "400")])
        .await
        .unwrap();
    rig.envoy
        .wait_stat(
            "kvroute_sidecar_poll_interval_ms",
            Duration::from_secs(5),
            |v| v == 400,
        )
        .await
        .unwrap();
    let snap: serde_json::Value = reqwest::get(format!("http://{}/snapshot", rig.sidecar_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(snap["poll_interval_ms"], 400);
    // Fewer scrapes per second now: about 2.5 per engine.
    let m = |t: &str| -> f64 {
        t.lines()
            .filter(|l| l.starts_with("kvroute_sidecar_scrapes_total{") && l.contains("engine0"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let page = |a| async move {
        reqwest::get(format!("http://{a}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = m(&page(rig.sidecar_addr).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = m(&page(rig.sidecar_addr).await);
    assert!(
        (3.0..=7.0).contains(&(after - before)),
        "{} scrapes in 2 s at 400 ms",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_second_directory_interval_shows_in_the_age_histogram() {
    let rig = Rig::start(PolicyKind::LoadCacheAware, LoadSignal::GatewayInflight).await;
    rig.envoy
        .runtime_modify(&[("kvroute.publish_interval_ms", "5000")])
        .await
        .unwrap();
    rig.envoy
        .wait_stat(
            "kvroute_setting_publish_interval_ms",
            Duration::from_secs(5),
            |v| v == 5000,
        )
        .await
        .unwrap();
    // Requests over more than one interval, so their ages spread over 0..5 s.
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(7) {
        assert_eq!(rig.send(i).await.0, 200);
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Histograms reach /stats at Envoy's 5 s flush.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let q = histogram_quantiles(&rig.envoy, "kvroute_state_age_ms").await;
    let get = |name: &str| q.iter().find(|(k, _)| k == name).map(|(_, v)| *v).unwrap();
    println!("state age quantiles (ms): {q:?}");
    assert!(
        get("P50") > 1000.0,
        "median age {} should reflect a 5 s interval",
        get("P50")
    );
    assert!(get("P90") > 3000.0);
    assert!(get("P100") < 7000.0);
}

/// An in-process sidecar stops polling when asked (the study's labs start and drop several; a
/// poller left running would scrape dead engines for as long as the process lives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_sidecar_polls_no_more() {
    use kvroute_sidecar::{EngineTarget, Sidecar, SidecarConfig};
    let engine = EmulatedEngine::start("engine0", PROFILE, 1.0)
        .await
        .unwrap();
    let (_app, sidecar) = Sidecar::start(SidecarConfig {
        engines: vec![EngineTarget {
            name: engine.name.clone(),
            metrics_url: format!("{}/metrics", engine.url()),
        }],
        poll_interval: Duration::from_millis(20),
        timeout: Duration::from_millis(500),
        unhealthy_after: 3,
        window: Duration::from_secs(10),
        fleet: None,
    })
    .unwrap();
    let t0 = Instant::now();
    while sidecar.snapshot().version < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the sidecar never polled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sidecar.stop();
    // A poll under way when stopped may still land; none after it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let v = sidecar.snapshot().version;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sidecar.snapshot().version, v, "polled after stop()");
}
