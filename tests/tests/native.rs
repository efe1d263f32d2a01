//! The native module (`kvroute-native`, an Envoy dynamic module running the same control plane
//! as the `.wasm`) on the real Envoy with `--concurrency 2`: in `kvroute` mode it keeps
//! conversations where their prefix is (the directory of its state service, on Envoy's main
//! thread), counts requests in flight and uncounts them when they end (the load term); in the
//! bench's `floor` mode it routes every chat request to the first endpoint after buffering its
//! body. Other requests pass through. The suites that apply to both builds run again on this one
//! with `KVROUTE_FILTER=native` (`just e2e`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use kvroute_e2e::{chat, system_prompt, Routed, Stack};

const SLOW: (&str, &str) = ("x-echo-delay-ms", "2000");

fn served(r: &Routed) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    r.served_by.clone().expect("served by an endpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_kvroute_follows_the_cache_and_the_load() {
    let s = Arc::new(Stack::native(2, "kvroute", "load_cache_aware").await);
    // Multi-turn conversations: each turn resends the history, so it shares the earlier turns'
    // blocks and must stay where they are.
    let mut sent = 0;
    for c in 0..4 {
        let mut history: Vec<(String, String)> =
            vec![("system".into(), system_prompt(&format!("native {c}")))];
        let mut home = None;
        for turn in 0..3 {
            history.push(("user".into(), format!("Turn {turn} of {c}: go on.")));
            let msgs: Vec<(&str, &str)> = history
                .iter()
                .map(|(r, t)| (r.as_str(), t.as_str()))
                .collect();
            let e = served(&s.chat(&chat(&msgs), &[]).await);
            sent += 1;
            // The policy is checked against the directory: wait until the state service (on
            // Envoy's main thread) applied the decision, as the Wasm filter's test does.
            s.envoy
                .wait_stat(
                    "kvroute_decisions_recorded_total",
                    std::time::Duration::from_secs(2),
                    |v| v >= sent,
                )
                .await
                .unwrap();
            match &home {
                None => home = Some(e),
                Some(h) => assert_eq!(&e, h, "conversation {c} turn {turn} left its cache"),
            }
            history.push(("assistant".into(), "ok".into()));
        }
    }

    // Load: while one endpoint holds a request, a prompt new to both goes to the other.
    let hold = |tag: &str| chat(&[("system", &system_prompt(tag)), ("user", "hold")]);
    let (s2, b) = (s.clone(), hold("held one"));
    let held = tokio::spawn(async move { s2.chat(&b, &[SLOW]).await });
    let busy = loop {
        if let Some(i) = (0..2).find(|&i| s.engines[i].active() == 1) {
            break i;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let other = s.engines[1 - busy].name.clone();
    for k in 0..3 {
        let r = s.chat(&hold(&format!("new {k}")), &[]).await;
        assert_eq!(served(&r), other, "new prompt {k} while {busy} holds one");
    }
    assert_eq!(served(&held.await.unwrap()), s.engines[busy].name);

    // The end of a stream uncounts it: now the other endpoint holds one, and new prompts go back.
    let (s2, b) = (s.clone(), hold("new 0"));
    let held = tokio::spawn(async move { s2.chat(&b, &[SLOW]).await });
    s.wait_active(1 - busy, 1).await;
    for k in 0..5 {
        let r = s.chat(&hold(&format!("newer {k}")), &[]).await;
        assert_eq!(
            served(&r),
            s.engines[busy].name,
            "new prompt {k}: the first held request ended and no longer counts"
        );
    }
    assert_eq!(served(&held.await.unwrap()), other);
    Arc::try_unwrap(s).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_floor_routes_every_chat_to_the_first_endpoint() {
    let s = Stack::native(2, "floor", "load_cache_aware").await;
    for k in 0..6 {
        let body = chat(&[
            ("system", &system_prompt(&format!("floor {k}"))),
            ("user", "hi"),
        ]);
        assert_eq!(served(&s.chat(&body, &[]).await), "engine0");
    }
    // Other paths pass through to the aggregate route.
    let r = s
        .client
        .get(s.envoy.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    s.stop().await;
}
