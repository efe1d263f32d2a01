//! Several Envoy replicas route as one: each replica's state service shares its decisions through
//! the sidecar's fleet log in a real Redis (`redis-server`, a child process), and applies the
//! others'. A conversation continued on another replica finds its engine; Redis down loses no
//! request and routing converges when it returns; a replica that starts late rebuilds its directory
//! from the log; a slow Redis never holds a request.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_e2e::*;
use kvroute_harness::emulated::EmulatedEngine;
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::procs::{self, Proc};
use kvroute_harness::stack::{filter_wasm, Envoy};

const PROFILE: &str = "rtx5080-llama3.2-3b";

/// Two emulated engines, Redis, one sidecar serving snapshots and the fleet log, and Envoy
/// replicas in front, each with its own kvroute.
struct Fleet {
    engines: Vec<EmulatedEngine>,
    redis: Proc,
    sidecar: Proc,
    replicas: Vec<Envoy>,
    model: String,
    http: reqwest::Client,
}

impl Fleet {
    async fn start(replicas: usize) -> Fleet {
        let redis = procs::redis(0).await.unwrap();
        let url = redis.redis_url();
        Self::start_on(replicas, redis, &url, &[]).await
    }

    /// A fleet on `redis`, which the sidecar reaches at `url` with `extra` flags.
    async fn start_on(replicas: usize, redis: Proc, url: &str, extra: &[String]) -> Fleet {
        let engines = EmulatedEngine::start_fleet(2, PROFILE, 4.0).await.unwrap();
        let named: Vec<(String, String)> =
            engines.iter().map(|e| (e.name.clone(), e.url())).collect();
        let sidecar =
            procs::sidecar_with_args(&named, 50, "127.0.0.1:0".parse().unwrap(), Some(url), extra)
                .await
                .unwrap();
        let model = served_model(&engines[0].url()).await;
        let mut me = Fleet {
            engines,
            redis,
            sidecar,
            replicas: Vec::new(),
            model,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        for _ in 0..replicas {
            me.add_replica().await;
        }
        me
    }

    /// The endpoints as every replica's filter lists them.
    fn replicas_endpoints(&self) -> Vec<kvroute_core::config::EndpointConfig> {
        EnvoySpec::new(
            self.engines
                .iter()
                .map(|e| Engine::local(&e.name, e.addr.port()))
                .collect(),
            String::new(),
        )
        .filter
        .endpoints
    }

    async fn add_replica(&mut self) {
        let mut spec = EnvoySpec::new(
            self.engines
                .iter()
                .map(|e| Engine::local(&e.name, e.addr.port()))
                .collect(),
            filter_wasm().unwrap().display().to_string(),
        );
        kvroute_e2e::under_test(&mut spec);
        spec.set_sidecar(Engine::local("sidecar", self.sidecar.addr.port()));
        spec.share_fleet(20);
        spec.filter.defaults.load_refresh_ms = 50;
        let envoy = Envoy::start(spec).await.unwrap();
        envoy
            .wait_stat("kvroute_fleet_connected", Duration::from_secs(10), |v| {
                v == 1
            })
            .await
            .unwrap();
        self.replicas.push(envoy);
    }

    /// One turn of a conversation on replica `r`: its messages so far and a new user message;
    /// returns the engine the replica chose.
    async fn turn(&self, r: usize, conversation: usize, turns: usize) -> String {
        let mut messages = vec![serde_json::json!({
            "role": "system",
            "content": system_prompt(&format!("conversation {conversation}")),
        })];
        for t in 0..turns {
            messages.push(serde_json::json!({"role": "user", "content": format!("question {t} of conversation {conversation}: tell me more about prefix caches")}));
            if t + 1 < turns {
                messages.push(serde_json::json!({"role": "assistant", "content": format!("answer {t}: prefix caches keep the KV of a prompt's start")}));
            }
        }
        let body = serde_json::json!({"model": self.model, "messages": messages, "max_tokens": 4});
        let r = self
            .http
            .post(self.replicas[r].url("/v1/chat/completions"))
            .header("x-session-id", format!("conversation-{conversation}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let e = r.headers()["x-kvroute-endpoint"]
            .to_str()
            .unwrap()
            .to_owned();
        let _ = r.bytes().await;
        e
    }

    /// Starts conversations `range` on replica `from` and continues each on replica `to` once `to`
    /// has applied them; returns how many continued on their engine, and how long `to` took to see
    /// them all.
    async fn continue_elsewhere(
        &self,
        from: usize,
        to: usize,
        range: std::ops::Range<usize>,
    ) -> (usize, Duration) {
        let applied = self.replicas[to]
            .stat("kvroute_fleet_reports_applied_total")
            .await
            .unwrap();
        let mut first = Vec::new();
        for c in range.clone() {
            first.push(self.turn(from, c, 1).await);
        }
        let t0 = Instant::now();
        let want = applied + range.len() as u64;
        self.replicas[to]
            .wait_stat(
                "kvroute_fleet_reports_applied_total",
                Duration::from_secs(10),
                |v| v >= want,
            )
            .await
            .unwrap();
        let seen = t0.elapsed();
        let mut same = 0;
        for (c, e) in range.zip(&first) {
            same += usize::from(self.turn(to, c, 2).await == *e);
        }
        (same, seen)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_continued_on_another_replica_goes_to_the_engine_that_holds_it() {
    let f = Fleet::start(2).await;
    let (same, seen) = f.continue_elsewhere(0, 1, 0..8).await;
    let hits = f.replicas[1]
        .stat("kvroute_predicted_hits_total")
        .await
        .unwrap();
    println!("8 conversations started on replica 0, continued on replica 1: {same} on their engine, {hits} predicted hits; replica 1 had them all {seen:?} after the last first turn");
    // Without the fleet's log, replica 1 would know none of them and pick by load: all 8 on
    // their engine by chance is 1 in 256.
    assert_eq!(same, 8);
    assert!(hits >= 8, "{hits}");
    // And the other way round.
    let (same, _) = f.continue_elsewhere(1, 0, 8..12).await;
    assert_eq!(same, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_loses_no_request_and_routing_converges_when_it_returns() {
    let mut f = Fleet::start(2).await;
    let load = Load::streaming(
        &[
            f.replicas[0].url("/v1/chat/completions"),
            f.replicas[1].url("/v1/chat/completions"),
        ],
        &f.model,
        8,
        4,
    );
    let tally = load.tally.clone();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let port = f.redis.addr.port();
    f.redis.kill().await;
    for r in &f.replicas {
        r.wait_stat("kvroute_fleet_connected", Duration::from_secs(10), |v| {
            v == 0
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut errors = [0u64; 2];
    for (i, r) in f.replicas.iter().enumerate() {
        errors[i] = r.stat("kvroute_fleet_errors_total").await.unwrap();
    }
    // Back, empty (no persistence): the replicas reconnect and share again.
    f.redis = procs::redis(port).await.unwrap();
    for r in &f.replicas {
        r.wait_stat("kvroute_fleet_connected", Duration::from_secs(10), |v| {
            v == 1
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.stop().await;
    let (sent, failed, a, b) = tally.get();
    println!("Redis SIGKILLed and restarted under load: {sent} requests, {failed} failed, {a} / {b} per engine; fleet errors counted per replica {errors:?}");
    assert!(sent > 40, "{sent}");
    assert_eq!(failed, 0, "Redis is off the request path");
    assert!(errors.iter().all(|e| *e > 0), "{errors:?}");
    let (same, _) = f.continue_elsewhere(0, 1, 100..106).await;
    assert_eq!(same, 6, "routing converges once Redis is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_under_load_rebuilds_its_directory_from_the_log() {
    let mut f = Fleet::start(1).await;
    let mut first = Vec::new();
    for c in 0..6 {
        first.push(f.turn(0, c, 1).await);
    }
    let load = Load::streaming(&[f.replicas[0].url("/v1/chat/completions")], &f.model, 8, 1);
    // A new replica (as one restarted) joins while replica 0 is under load.
    f.add_replica().await;
    f.replicas[1]
        .wait_stat(
            "kvroute_fleet_reports_applied_total",
            Duration::from_secs(10),
            |v| v >= 6,
        )
        .await
        .unwrap();
    let mut same = 0;
    for (c, e) in first.iter().enumerate() {
        same += usize::from(f.turn(1, c, 2).await == *e);
    }
    let (sent, failed, _, _) = load.stop().await;
    println!("a replica joined under load ({sent} requests, {failed} failed): {same} of 6 earlier conversations continued on their engine");
    assert_eq!(failed, 0);
    assert_eq!(same, 6);
}

/// Sends `DEBUG SLEEP seconds` to Redis (RESP by hand) until `stop`: every command queued behind
/// it waits.
async fn keep_redis_slow(addr: std::net::SocketAddr, seconds: &str, stop: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let cmd = format!(
        "*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n${}\r\n{seconds}\r\n",
        seconds.len()
    );
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        tcp.write_all(cmd.as_bytes()).await.unwrap();
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"+OK"), "{:?}", &buf[..n]);
    }
}

async fn latencies(f: &Fleet, n: usize, offset: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        f.turn(0, offset + i, 1).await;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn sidecar_fleet_mean_ms(metrics: &str) -> f64 {
    let get = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (sum, count) = (
        get("kvroute_sidecar_fleet_seconds_sum"),
        get("kvroute_sidecar_fleet_seconds_count"),
    );
    1000.0 * sum / count.max(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_never_holds_a_request() {
    let f = Fleet::start(2).await;
    let before = latencies(&f, 30, 0).await;
    let metrics_url = format!("{}/metrics", f.sidecar.url());
    let m0 = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let slow = tokio::spawn(keep_redis_slow(f.redis.addr, "0.1", stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = latencies(&f, 30, 1000).await;
    let m1 = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    slow.await.unwrap();
    let median = |v: &[f64]| v[v.len() / 2];
    println!(
        "Redis answering 100 ms late: request latency median {:.1} ms (before {:.1}), max {:.1} (before {:.1}); the sidecar's mean exchange {:.1} ms (before {:.1})",
        median(&during),
        median(&before),
        during[during.len() - 1],
        before[before.len() - 1],
        sidecar_fleet_mean_ms(&m1),
        sidecar_fleet_mean_ms(&m0),
    );
    assert!(
        sidecar_fleet_mean_ms(&m1) > sidecar_fleet_mean_ms(&m0),
        "the exchanges did wait on Redis"
    );
    // Had a request waited on one Redis round trip, it would take 100 ms more.
    assert!(
        median(&during) < median(&before) + 50.0,
        "{during:?} against {before:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_log_works_over_tls_with_a_password() {
    // A private CA and a server certificate for 127.0.0.1 signed by it, made with openssl as an
    // operator would (rustls refuses a self-signed CA certificate as the server's own).
    let dir = std::env::temp_dir().join(format!("kvroute-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let at = |f: &str| dir.join(f).display().to_string();
    let (ca, cert, key) = (at("ca.pem"), at("cert.pem"), at("key.pem"));
    std::fs::write(at("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for args in [
        vec![
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ]
        .into_iter()
        .chain([
            "-subj",
            "/CN=kvroute-test-ca",
            "-keyout",
            &at("ca.key"),
            "-out",
            &ca,
        ])
        .collect::<Vec<&str>>(),
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ]
        .into_iter()
        .chain(["-keyout", &key, "-out", &at("req.csr")])
        .collect(),
        vec![
            "x509",
            "-req",
            "-in",
            &at("req.csr"),
            "-CA",
            &ca,
            "-CAkey",
            &at("ca.key"),
        ]
        .into_iter()
        .chain([
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &at("ext.cnf"),
            "-out",
            &cert,
        ])
        .collect(),
    ] {
        let made = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let (cert, key) = (
        std::path::PathBuf::from(cert),
        std::path::PathBuf::from(key),
    );
    let redis = procs::redis_tls(0, &cert, &key, "s3cret").await.unwrap();
    let url = format!("rediss://:s3cret@{}/0", redis.addr);
    let ca = ["--redis-ca-file".to_string(), ca];
    let f = Fleet::start_on(2, redis, &url, &ca).await;
    let (same, seen) = f.continue_elsewhere(0, 1, 0..4).await;
    println!(
        "over TLS with a password: {same} of 4 conversations on their engine, seen after {seen:?}"
    );
    assert_eq!(same, 4);
    drop(f);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_bound_is_refused_counted_and_the_read_still_answers() {
    use kvroute_core::fleet::{FleetRequest, FleetResponse};
    let f = Fleet::start(1).await;
    // Something to read: one conversation through the replica, shared.
    f.turn(0, 1, 1).await;
    f.replicas[0]
        .wait_stat(
            "kvroute_fleet_reports_shared_total",
            Duration::from_secs(5),
            |v| v >= 1,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let http = reqwest::Client::new();
    let exchange = |replica: u64, batch: Vec<u8>| FleetRequest {
        replica,
        endpoints: kvroute_core::fleet::fingerprint(&f.replicas_endpoints()),
        epoch: 0,
        cursor: kvroute_core::fleet::START.into(),
        keep: 1000,
        batch_from_ms: 0,
        inflight: Vec::new(),
        batch,
    };
    // Two MiB of reports: over the sidecar's 1 MiB bound.
    let report = kvroute_core::state::DecisionReport {
        endpoint: 0,
        session: None,
        blocks: (0..1000).map(kvroute_core::BlockHash).collect(),
    };
    let mut big = Vec::new();
    while big.len() < 2 << 20 {
        report.encode_into(&mut big);
    }
    let r = http
        .post(format!("{}/fleet", f.sidecar.url()))
        .body(exchange(42, big).encode())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let resp = FleetResponse::decode(&r.bytes().await.unwrap()).unwrap();
    assert!(
        !resp.entries.is_empty(),
        "the replica's entries are still read"
    );
    let metrics = http
        .get(format!("{}/metrics", f.sidecar.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kvroute_sidecar_fleet_exchanges_total{result=\"refused\"} 1")),
        "{metrics}"
    );
    // Nothing of it reached the log: another reader finds only the replica's entries.
    let again = http
        .post(format!("{}/fleet", f.sidecar.url()))
        .body(exchange(43, Vec::new()).encode())
        .send()
        .await
        .unwrap();
    let again = FleetResponse::decode(&again.bytes().await.unwrap()).unwrap();
    assert!(again.entries.iter().all(|e| e.batch.len() < 1 << 20));
}
