//! kvroute's decision as an Envoy ext_proc processor (`kvroute-extproc`, the architecture of the
//! Gateway API Inference Extension), end to end: the real Envoy's ext_proc filter in BUFFERED mode,
//! the processor as a process, echo endpoints.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kvroute_e2e::*;
use kvroute_harness::envoy_config::Engine;
use kvroute_harness::procs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ext_proc_processor_routes_by_prefix_through_envoy() {
    let mut processor = None;
    let s = Stack::start_with(2, |spec| {
        spec.filter.defaults.policy = "predicted_ttft".parse().unwrap();
        let json = serde_json::to_string(&spec.filter).unwrap();
        let p = std::thread::scope(|_| {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(procs::extproc(&json))
            })
        })
        .unwrap();
        spec.ext_proc = Some(Engine::local("extproc", p.addr.port()));
        processor = Some(p);
    })
    .await;
    // Four long conversations, each sent three times: every repeat goes where its first went.
    let mut homes = Vec::new();
    for c in 0..4 {
        let body = chat(&[
            ("system", &system_prompt(&format!("conversation {c}"))),
            ("user", "hello"),
        ]);
        let first = s.chat(&body, &[]).await;
        assert_eq!(first.status, 200);
        let home = first.served_by.clone().unwrap();
        for _ in 0..2 {
            let again = s.chat(&body, &[]).await;
            assert_eq!(
                again.served_by.as_deref(),
                Some(home.as_str()),
                "conversation {c}"
            );
        }
        homes.push(home);
    }
    assert!(
        homes.iter().any(|h| h == "engine0") && homes.iter().any(|h| h == "engine1"),
        "new conversations spread: {homes:?}"
    );
    // Every chat went through the processor, none around it.
    assert_eq!(s.stat("http.kvroute.ext_proc.streams_started").await, 12);
    assert_eq!(
        s.stat("http.kvroute.ext_proc.failure_mode_allowed").await,
        0
    );
    assert_eq!(
        s.stat("http.kvroute.ext_proc.rejected_header_mutations")
            .await,
        0
    );
    // Other requests pass through untouched.
    let models = s
        .client
        .get(s.envoy.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    drop(processor);
}
