//! A tiny study through the live stack: its runs and report are internally consistent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kvroute_core::policy::PolicyKind;
use kvroute_harness::emulated::EmulatedEngine;
use kvroute_harness::peer::{smg_version, Dynamo, Peer};
use kvroute_loadgen::analyze::analyze;
use kvroute_study::report::{write, Meta, SimMeta};
use kvroute_study::simulated;
use kvroute_study::study::{Lab, RunSpec};
use kvroute_traces::{arrivals, rag, sharegpt, with_arrivals, Session};

fn conversations(seed: u64) -> Vec<Session> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/sharegpt_dev_3000.json"
    ))
    .unwrap();
    let s = sharegpt::parse(
        &text,
        &sharegpt::ShareGptOptions {
            limit: 6,
            max_turns: 3,
            max_tokens: 16,
            think_ms: 500.0,
            ..Default::default()
        },
    )
    .unwrap();
    let starts = arrivals::poisson(s.len(), 4.0, seed);
    with_arrivals(s, &starts)
}

fn spec(exp: &str, workload: &str, policy: PolicyKind, runtime: &[(&str, &str)]) -> RunSpec {
    RunSpec {
        experiment: exp.into(),
        workload: workload.into(),
        policy,
        peer: None,
        runtime: runtime
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        rate: 4.0,
        rate_label: "1x".into(),
        seed: 1,
        repeat: 0,
        router_seed: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_router_runs_on_the_same_engines_and_is_counted_from_them() {
    // SGLang's model gateway (the bootstrap's pinned smg) with its cache-aware policy, launched
    // for the run against the lab's engines; Envoy sees none of its traffic.
    let mut lab = Lab::emulated(2, "rtx5080-llama3.2-3b", 8.0).await.unwrap();
    let peer = Peer {
        version: smg_version().unwrap(),
        ..Peer::parse("smg:cache_aware").unwrap()
    };
    let s = spec("exp1", "sharegpt", PolicyKind::default(), &[]).with_peer(peer.clone());
    let sessions = conversations(1);
    let requests = kvroute_traces::requests(&sessions);
    let r = lab.run(&s, vec![], sessions).await.unwrap();
    assert_eq!((r.requests, r.failed), (requests, 0));
    assert_eq!(r.spec.label(), peer.label());
    // Counted from the engines: every request finished on one of them, none went through Envoy.
    assert_eq!(r.per_endpoint.iter().sum::<u64>() as usize, requests);
    assert_eq!(r.envoy_stats.get("kvroute_requests_total"), None);
    assert!((r.hit_rate - r.hit_rate_client).abs() < 0.002);
    // Its row stands in the criterion's cell beside kvroute's policies.
    let cells = kvroute_study::criterion::cells(&[r], 1000.0);
    assert_eq!(cells[0].policies[0].policy, peer.label());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamo_routes_by_the_engines_kv_events() {
    // NVIDIA Dynamo (the bootstrap's pinned ai-dynamo) with its KV router in front of two emulated
    // engines: it learns where a prompt's blocks are only from the engines' KV cache events, so a
    // prompt sent again goes to the engine that holds it, every time. Its round-robin mode, the
    // same deployment without KV routing, alternates.
    let engines = EmulatedEngine::start_fleet(2, "rtx5080-llama3.2-3b", 8.0)
        .await
        .unwrap();
    let targets: Vec<(String, String)> = engines
        .iter()
        .map(|e| (e.url(), e.kv_events.clone()))
        .collect();
    let http = reqwest::Client::new();
    let models: serde_json::Value = http
        .get(format!("{}/v1/models", engines[0].url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    let system = "You answer questions about prefix caching, in detail. ".repeat(40);
    for (mode, want_hits) in [("kv", true), ("round-robin", false)] {
        for e in &engines {
            http.post(format!("{}/reset_prefix_cache", e.url()))
                .send()
                .await
                .unwrap();
        }
        let dynamo = Dynamo::start(mode, &targets, &model).await.unwrap();
        let mut cached = Vec::new();
        for _ in 0..4 {
            let body = serde_json::json!({
                "model": model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": "What is a block?"}],
                "max_tokens": 4,
                "ignore_eos": true,
            });
            let r: serde_json::Value = http
                .post(dynamo.url("/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            cached.push(
                r["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0),
            );
            // The engine's events reach the router within a step or two.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        dynamo.stop().await;
        if want_hits {
            assert!(
                cached[0] == 0 && cached[1..].iter().all(|c| *c > 0),
                "{mode}: {cached:?}"
            );
        } else {
            assert!(
                cached.iter().filter(|c| **c == 0).count() >= 2,
                "{mode}: {cached:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_study_is_internally_consistent() {
    let mut lab = Lab::emulated(2, "rtx5080-llama3.2-3b", 8.0).await.unwrap();
    let records_dir = std::env::temp_dir().join(format!("kvroute-records-{}", std::process::id()));
    lab.records_dir = Some(records_dir.clone());
    lab.queue_sample_every = std::time::Duration::from_millis(5);
    let rag_users = rag::generate(&rag::RagOptions {
        users: 8,
        max_tokens: 8,
        ..Default::default()
    });
    let rag_users = with_arrivals(rag_users, &arrivals::poisson(8, 4.0, 1));
    let plan = vec![
        (
            spec("exp1", "sharegpt", PolicyKind::RoundRobin, &[]),
            conversations(1),
        ),
        (
            spec("exp1", "sharegpt", PolicyKind::LoadCacheAware, &[]),
            conversations(1),
        ),
        (
            spec("exp2", "rag", PolicyKind::LoadCacheAware, &[]),
            rag_users.clone(),
        ),
        (
            spec(
                "exp3",
                "sharegpt",
                PolicyKind::LoadCacheAware,
                &[("kvroute.alpha", "0.5"), ("kvroute.beta", "0.5")],
            ),
            conversations(1),
        ),
        (
            spec(
                "exp4",
                "sharegpt",
                PolicyKind::LoadCacheAware,
                &[("kvroute.publish_interval_ms", "1000")],
            ),
            conversations(1),
        ),
    ];
    let mut runs = Vec::new();
    for (s, sessions) in plan {
        let requests = kvroute_traces::requests(&sessions);
        let r = lab.run(&s, vec![], sessions).await.unwrap();
        assert_eq!((r.requests, r.failed), (requests, 0), "{:?}", s.experiment);
        // Engine counters and client usage agree; Envoy routed every request the client sent.
        assert!(
            (r.hit_rate - r.hit_rate_client).abs() < 0.002,
            "engine {} vs client {}",
            r.hit_rate,
            r.hit_rate_client
        );
        assert_eq!(r.per_endpoint.iter().sum::<u64>() as usize, requests);
        // Envoy counted the same requests, and routed every one of them.
        assert_eq!(
            r.envoy_stats.get("kvroute_requests_total"),
            Some(&(requests as f64))
        );
        // Every decision of the measured part was made under the run's policy: the cold start's
        // one runtime update (epoch, policy, values) was in force before the first request.
        let decided: f64 = r
            .envoy_stats
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&format!(
                    "kvroute_decisions_total.policy.{}.",
                    s.policy.as_str()
                ))
            })
            .map(|(_, v)| *v)
            .sum();
        assert_eq!(decided, requests as f64, "{:?}", r.envoy_stats);
        // The per-request file holds one record per request.
        let file = std::fs::read_to_string(r.requests_file.as_deref().unwrap()).unwrap();
        assert_eq!(file.lines().count(), requests);
        // Queue depths were sampled, and the engines' own TTFT histogram gives a p95 no smaller
        // than its p50.
        assert!(r.queue_samples > 0 && r.queue_mean.len() == 2, "{r:?}");
        assert!(r.engine_ttft_ms[0] > 0.0 && r.engine_ttft_ms[1] >= r.engine_ttft_ms[0]);
        runs.push(r);
    }
    assert!(
        runs.iter().any(|r| r.queue_max >= 1.0),
        "no request ever seen in an engine queue"
    );
    let _ = std::fs::remove_dir_all(&records_dir);
    lab.envoy
        .runtime_modify(&[("kvroute.publish_interval_ms", "0")])
        .await
        .unwrap();
    // The simulator on the same sessions: the same kind of results, and just as consistent.
    let live = lab
        .run(
            &spec("val-live", "sharegpt", PolicyKind::SessionHash, &[]),
            vec![],
            conversations(1),
        )
        .await
        .unwrap();
    let engine = kvroute_study::simulated::engine_config("rtx5080-llama3.2-3b").unwrap();
    let base = kvroute_sim::SimConfig::new(2, engine, Default::default());
    let work = simulated::prepare_for(&base, &conversations(1));
    let sim = simulated::run(
        &spec("val-sim", "sharegpt", PolicyKind::SessionHash, &[]),
        &base,
        &work,
    )
    .unwrap();
    assert_eq!((sim.requests, sim.failed), (live.requests, 0));
    assert_eq!(sim.hit_rate, sim.hit_rate_client);
    assert_eq!(sim.per_endpoint.iter().sum::<u64>() as usize, sim.requests);
    // Session hashing routes every session to the same engine live and simulated, and the
    // engines are the same model: the hit rates agree.
    assert!(
        (sim.hit_rate - live.hit_rate).abs() < 0.02,
        "sim {} live {}",
        sim.hit_rate,
        live.hit_rate
    );
    let base4 = kvroute_sim::SimConfig::new(
        4,
        kvroute_study::simulated::engine_config("rtx5080-llama3.2-3b").unwrap(),
        Default::default(),
    );
    let e5 = simulated::run(
        &spec("exp5", "sharegpt", PolicyKind::LoadCacheAware, &[]),
        &base4,
        &simulated::prepare_for(&base4, &conversations(2)),
    )
    .unwrap();
    assert_eq!(e5.per_endpoint.len(), 4);
    // A live validation run the study set aside for a host stall: reported as such, not compared.
    let mut stalled = live.clone();
    stalled.spec.experiment = "val-live-stalled".into();
    stalled.send_delay_ms = vec![150.0; 21];
    runs.extend([live, sim, e5, stalled]);
    // The capacity bound is sized by what the engines report: the seed rig's 711 blocks of 16.
    let kv = lab.kv_capacity_tokens().await.unwrap();
    assert_eq!(kv, vec![11_376, 11_376]);
    let blocks = (kv[0] / 16) as usize;
    let bounds = vec![
        (
            "sharegpt 1x".to_string(),
            analyze(
                &conversations(1),
                "meta-llama/Llama-3.2-3B-Instruct",
                2,
                blocks,
            ),
        ),
        (
            "rag".to_string(),
            analyze(&rag_users, "meta-llama/Llama-3.2-3B-Instruct", 2, blocks),
        ),
    ];
    // No policy beats the oracle.
    for r in &runs {
        let bound = bounds
            .iter()
            .find(|(w, _)| w.split(' ').next() == Some(r.spec.workload.as_str()))
            .unwrap()
            .1
            .oracle_infinite;
        assert!(
            r.hit_rate <= bound + 1e-9,
            "{} > oracle {bound}",
            r.hit_rate
        );
    }
    let dir = std::env::temp_dir().join(format!("kvroute-study-{}", std::process::id()));
    let meta = Meta {
        mode: "smoke".into(),
        profile: "rtx5080-llama3.2-3b".into(),
        kv_tokens_per_engine: kv[0],
        time_scale: 8.0,
        engines: 2,
        sustainable_rate: 4.0,
        slo_ms: 1000.0,
        search_capped: false,
        repeats: 1,
        sessions: 6,
        window_s: 0.0,
        search_window_s: 0.0,
        wall_s: 0.0,
        envoy: "1.40.0".into(),
        kvroute: "test".into(),
        simulator: Some(SimMeta {
            gateway_ms: 0.0,
            send_delay_ms: Vec::new(),
            per_instance_rate: 2.0,
            mooncake_profile: "h100-llama3.1-8b".into(),
            wall_s: 0.0,
            validation_sessions: 6,
            validation_time_scale: 1.0,
            validation_repeats: 1,
            validation_router_seeds: 1,
            validation_max_send_delay_ms: 20.0,
            fleet_sync_ms: 50,
        }),
    };
    let calibration = kvroute_loadgen::calibrate::Calibration {
        prefill: vec![kvroute_loadgen::calibrate::PrefillPoint {
            tokens: 128,
            miss_s: 0.014,
            hit_s: 0.011,
            hit_cached: 112,
        }],
        decode: vec![kvroute_loadgen::calibrate::DecodePoint {
            batch: 1,
            step_s: 0.009,
        }],
    };
    let page =
        std::fs::read_to_string(write(&dir, &runs, &bounds, Some(&calibration), &meta).unwrap())
            .unwrap();
    for section in [
        "Calibration",
        "a KV cache of 11376 tokens each",
        "Trace analysis and oracle bounds",
        "Prefix overlap by workload",
        "Experiment 1",
        "Against the plan's expectation",
        "Experiment 2",
        "Experiment 3",
        "Experiment 4",
        "Simulator validation",
        "configurations within every tolerance",
        "Set aside and run again: 1 live run(s) in which the client sent a turn more than 20 ms after it was due",
        "session_hash repeat 0 (a send 150 ms late)",
        "Experiment 5",
        "Consistency",
        "<svg",
    ] {
        assert!(page.contains(section), "report lacks {section}");
    }
    let figs: Vec<String> = std::fs::read_dir(dir.join("figures"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        figs.iter().filter(|f| f.ends_with(".svg")).count(),
        figs.iter().filter(|f| f.ends_with(".png")).count()
    );
    assert!(figs.len() >= 20, "{figs:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The runner against engines given by URL, as it runs against real vLLM instances: here two
/// emulated engines started on their own, which the lab knows only by their URLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_works_against_engines_by_url() {
    use kvroute_harness::emulated::EmulatedEngine;
    let e0 = EmulatedEngine::start("gpu-a", "rtx5080-llama3.2-3b", 8.0)
        .await
        .unwrap();
    let e1 = EmulatedEngine::start("gpu-b", "rtx5080-llama3.2-3b", 8.0)
        .await
        .unwrap();
    let urls = vec![e0.url(), format!("{}/", e1.url())];
    let mut lab = Lab::remote(&urls, Some("meta-llama/Llama-3.2-3B-Instruct".into()))
        .await
        .unwrap();
    assert_eq!(lab.time_scale, 1.0);
    let sessions = conversations(3);
    let requests = kvroute_traces::requests(&sessions);
    let r = lab
        .run(
            &spec("exp1", "sharegpt", PolicyKind::SessionHash, &[]),
            vec![],
            sessions,
        )
        .await
        .unwrap();
    assert_eq!((r.requests, r.failed), (requests, 0));
    assert_eq!(r.per_endpoint.iter().sum::<u64>() as usize, requests);
    // Both engines served (six sessions hashed over two engines), and their own counters (read
    // through the URLs) agree with the clients' usage.
    assert!(
        r.per_endpoint.iter().all(|n| *n > 0),
        "{:?}",
        r.per_endpoint
    );
    assert!((r.hit_rate - r.hit_rate_client).abs() < 0.002);
    assert!(r.hit_rate > 0.0, "multi-turn sessions kept home must hit");
}
