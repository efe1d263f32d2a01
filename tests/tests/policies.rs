//! Each policy's definition, checked through the real Envoy with the real filter (`--concurrency 2`):
//! by the endpoint that served each request and by Envoy's admin stats.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use kvroute_core::config::PolicySettings;
use kvroute_core::hash::{prefix_key, session_key};
use kvroute_core::prefix::PREFIX_KEY_CHARS;
use kvroute_e2e::*;

const SLOW: (&str, &str) = ("x-echo-delay-ms", "3000");

fn served(r: &Routed) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.served_by, r.kvroute_endpoint,
        "the filter's choice is the endpoint that served"
    );
    r.served_by.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_cycles() {
    let s = Stack::with_policy(2, "round_robin").await;
    // One keep-alive connection (one Envoy worker), then a new connection per request (both
    // workers): the sequence is gateway-wide, so it cycles either way.
    let mut seen = Vec::new();
    for i in 0..8 {
        seen.push(served(
            &s.chat(&chat(&[("user", &format!("question {i}"))]), &[])
                .await,
        ));
    }
    for i in 0..8 {
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let r = fresh
            .post(s.envoy.url("/v1/chat/completions"))
            .json(&chat(&[("user", &format!("fresh {i}"))]))
            .send()
            .await
            .unwrap();
        seen.push(served(&Stack::routed(r).await));
    }
    for w in seen.windows(2) {
        assert_ne!(w[0], w[1], "round robin must alternate: {seen:?}");
    }
    assert_eq!(
        s.stat("kvroute_decisions_total.policy.round_robin.endpoint.engine0")
            .await,
        8
    );
    assert_eq!(
        s.stat("kvroute_decisions_total.policy.round_robin.endpoint.engine1")
            .await,
        8
    );
    s.stop().await;
}

/// With one slow request held on one engine, quick requests one after another all go to the other
/// (round robin would send every other one to the busy engine); then slow requests one at a time,
/// after each of which the in-flight counts differ by at most one.
async fn balances_in_flight(policy: &str) {
    let s = std::sync::Arc::new(Stack::with_policy(2, policy).await);
    let s2 = s.clone();
    let mut held = vec![tokio::spawn(async move {
        s2.chat(&chat(&[("user", "hold first")]), &[SLOW]).await
    })];
    for _ in 0..500 {
        if s.engines[0].active() + s.engines[1].active() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let busy = usize::from(s.engines[1].active() == 1);
    for i in 0..6 {
        let r = s.chat(&chat(&[("user", &format!("quick {i}"))]), &[]).await;
        assert_eq!(
            served(&r),
            format!("engine{}", 1 - busy),
            "{policy}: quick request {i} went to the engine holding the slow one"
        );
    }
    for k in 2..=6u64 {
        let s2 = s.clone();
        held.push(tokio::spawn(async move {
            s2.chat(&chat(&[("user", "hold")]), &[SLOW]).await
        }));
        for _ in 0..500 {
            if s.engines[0].active() + s.engines[1].active() == k {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (a, b) = (s.engines[0].active(), s.engines[1].active());
        assert_eq!(a + b, k);
        assert!(
            a.abs_diff(b) <= 1,
            "{policy}: in flight {a} vs {b} after {k} requests"
        );
    }
    // The singleton mirrors the gateway's in-flight counts into gauges.
    s.envoy
        .wait_stat(
            "kvroute_inflight.endpoint.engine0",
            Duration::from_secs(2),
            |v| v >= 2,
        )
        .await
        .unwrap();
    for h in held {
        served(&h.await.unwrap());
    }
    // Counts go back to zero when responses end.
    s.envoy
        .wait_stat(
            "kvroute_inflight.endpoint.engine0",
            Duration::from_secs(2),
            |v| v == 0,
        )
        .await
        .unwrap();
    s.envoy
        .wait_stat(
            "kvroute_inflight.endpoint.engine1",
            Duration::from_secs(2),
            |v| v == 0,
        )
        .await
        .unwrap();
    let total = s
        .stat(&format!(
            "kvroute_decisions_total.policy.{policy}.endpoint.engine0"
        ))
        .await
        + s.stat(&format!(
            "kvroute_decisions_total.policy.{policy}.endpoint.engine1"
        ))
        .await;
    assert_eq!(
        total, 12,
        "1 held, 6 quick, 5 held, every one decided by {policy}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsq_picks_the_shortest_queue() {
    balances_in_flight("jsq").await;
}

/// With two endpoints p2c's pair is both of them, so it must pick the less loaded one every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_picks_the_less_loaded_of_its_pair() {
    balances_in_flight("p2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_hash_is_sticky_and_modular() {
    let s = Stack::with_policy(2, "session_hash").await;
    let mut used = std::collections::BTreeSet::new();
    for u in 0..10 {
        let sid = format!("session-{u}");
        let expected = format!("engine{}", session_key(&sid).0 % 2);
        for turn in 0..3 {
            let r = s
                .chat(
                    &chat(&[("user", &format!("turn {turn}"))]),
                    &[("x-session-id", &sid)],
                )
                .await;
            assert_eq!(served(&r), expected, "{sid} turn {turn}");
        }
        used.insert(expected);
    }
    assert_eq!(used.len(), 2, "ten sessions use both endpoints");
    // The OpenAI `user` field is the session when there is no header.
    let mut body = chat(&[("user", "hi")]);
    body["user"] = "alice".into();
    let expected = format!("engine{}", session_key("alice").0 % 2);
    for _ in 0..3 {
        assert_eq!(served(&s.chat(&body, &[]).await), expected);
    }
    // No session at all: JSQ, counted.
    served(&s.chat(&chat(&[("user", "anonymous")]), &[]).await);
    assert_eq!(s.stat("kvroute_fallbacks_total.reason.no_session").await, 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_key_is_sticky_and_overflows_to_jsq() {
    let s = std::sync::Arc::new(Stack::with_policy(2, "prefix_key").await);
    let mut families = Vec::new();
    for f in 0..6 {
        let sp = system_prompt(&format!("family {f}"));
        let key_text: String = sp.chars().take(PREFIX_KEY_CHARS).collect();
        let expected = format!("engine{}", prefix_key(&key_text) % 2);
        for q in 0..3 {
            let r = s
                .chat(
                    &chat(&[("system", &sp), ("user", &format!("question {q}"))]),
                    &[],
                )
                .await;
            assert_eq!(served(&r), expected, "family {f}");
        }
        families.push((sp, expected));
    }
    assert_eq!(s.stat("kvroute_prefix_key_overflows_total").await, 0);
    // Threshold 0: one request in flight at the preferred endpoint makes the next one overflow.
    // The state published after the change carries it.
    let published = s.stat("kvroute_state_publishes_total").await;
    s.envoy
        .runtime_modify(&[("kvroute.prefix_key_threshold", "0")])
        .await
        .unwrap();
    s.envoy
        .wait_stat(
            "kvroute_state_publishes_total",
            Duration::from_secs(2),
            |v| v > published,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sp, preferred) = families[0].clone();
    let body = chat(&[("system", &sp), ("user", "slow one")]);
    let s2 = s.clone();
    let b2 = body.clone();
    let held = tokio::spawn(async move { s2.chat(&b2, &[SLOW]).await });
    let pi = s.index_of(&preferred);
    s.wait_active(pi, 1).await;
    let r = s.chat(&body, &[]).await;
    assert_ne!(
        served(&r),
        preferred,
        "over the threshold, prefix_key must overflow to JSQ"
    );
    assert_eq!(s.stat("kvroute_prefix_key_overflows_total").await, 1);
    assert_eq!(served(&held.await.unwrap()), preferred);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_cache_aware_follows_cache_and_trades_with_load() {
    let s = std::sync::Arc::new(Stack::with_policy(2, "load_cache_aware").await);
    // Four multi-turn conversations: every turn resends the history, so later turns share the
    // prefix of earlier ones and must stay where that prefix is cached.
    let mut homes = Vec::new();
    let mut follow_ups = 0;
    let mut sent = 0u64;
    for c in 0..4 {
        let sp = system_prompt(&format!("conversation {c}"));
        let mut history: Vec<(String, String)> = vec![("system".into(), sp)];
        let mut home = None;
        for turn in 0..3 {
            history.push((
                "user".into(),
                format!("Turn {turn} of conversation {c}: tell me more."),
            ));
            let msgs: Vec<(&str, &str)> = history
                .iter()
                .map(|(r, t)| (r.as_str(), t.as_str()))
                .collect();
            let e = served(&s.chat(&chat(&msgs), &[]).await);
            sent += 1;
            // The policy is checked against the directory: wait until the singleton applied the
            // decision (with publish interval 0 it publishes in the same callback).
            s.envoy
                .wait_stat(
                    "kvroute_decisions_recorded_total",
                    Duration::from_secs(2),
                    |v| v >= sent,
                )
                .await
                .unwrap();
            match &home {
                None => home = Some(e),
                Some(h) => {
                    assert_eq!(&e, h, "conversation {c} turn {turn} left its cache");
                    follow_ups += 1;
                }
            }
            history.push(("assistant".into(), "ok".into()));
        }
        homes.push((history, home.unwrap()));
    }
    assert_eq!(s.stat("kvroute_predicted_hits_total").await, follow_ups);
    assert!(s.stat("kvroute_predicted_cached_blocks_total").await >= follow_ups * 10);
    // The service refreshes its gauges on its tick (20 ms).
    s.envoy
        .wait_stat("kvroute_directory_blocks", Duration::from_secs(1), |v| {
            v > 0
        })
        .await
        .unwrap();

    // Load on the home endpoint: at alpha 0.7 / beta 0.3 the cache still wins (0.7 - 0.3 > 0)...
    let (history, home) = homes[0].clone();
    let msgs: Vec<(&str, &str)> = history
        .iter()
        .map(|(r, t)| (r.as_str(), t.as_str()))
        .collect();
    let body = chat(&msgs);
    let (s2, b2) = (s.clone(), body.clone());
    let held = tokio::spawn(async move { s2.chat(&b2, &[SLOW]).await });
    let hi = s.index_of(&home);
    s.wait_active(hi, 1).await;
    assert_eq!(
        served(&s.chat(&body, &[]).await),
        home,
        "alpha 0.7 beta 0.3: cache beats one queued request"
    );
    // ...and with alpha 0 only load counts.
    s.envoy
        .runtime_modify(&[("kvroute.alpha", "0")])
        .await
        .unwrap();
    s.envoy
        .wait_stat("kvroute_setting_alpha_milli", Duration::from_secs(2), |v| {
            v == 0
        })
        .await
        .unwrap();
    assert_ne!(
        served(&s.chat(&body, &[]).await),
        home,
        "alpha 0 follows load"
    );
    served(&held.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_live_through_runtime_modify() {
    let s = Stack::with_policy(2, "round_robin").await;
    let sid = "live-session";
    let expected = format!("engine{}", session_key(sid).0 % 2);
    let mut rr = Vec::new();
    for _ in 0..4 {
        rr.push(served(
            &s.chat(&chat(&[("user", "x")]), &[("x-session-id", sid)])
                .await,
        ));
    }
    assert!(
        rr.windows(2).all(|w| w[0] != w[1]),
        "round robin first: {rr:?}"
    );
    let took = s.envoy.set_policy("session_hash").await.unwrap();
    println!("runtime_modify to published: {took:?}");
    assert!(took < Duration::from_secs(2));
    for _ in 0..4 {
        assert_eq!(
            served(
                &s.chat(&chat(&[("user", "x")]), &[("x-session-id", sid)])
                    .await
            ),
            expected
        );
    }
    assert_eq!(
        s.stat(&format!(
            "kvroute_decisions_total.policy.session_hash.endpoint.{expected}"
        ))
        .await,
        4
    );
    assert_eq!(s.stat("kvroute_policy_active.policy.round_robin").await, 0);
    // An invalid value is ignored (and shown); the policy stays.
    s.envoy
        .runtime_modify(&[("kvroute.beta", "lots")])
        .await
        .unwrap();
    s.envoy
        .wait_stat(
            "kvroute_runtime_invalid_values",
            Duration::from_secs(2),
            |v| v == 1,
        )
        .await
        .unwrap();
    assert_eq!(
        served(
            &s.chat(&chat(&[("user", "x")]), &[("x-session-id", sid)])
                .await
        ),
        expected
    );
    assert_eq!(s.stat("kvroute_setting_beta_milli").await, 300);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_have_prometheus_labels() {
    let s = Stack::with_policy(2, "round_robin").await;
    served(&s.chat(&chat(&[("user", "x")]), &[]).await);
    let page = s.envoy.prometheus().await.unwrap();
    // Envoy drops the Wasm stat namespace from Prometheus names only where a Wasm VM registered
    // it; the native module's stats keep it.
    let prefix = if kvroute_e2e::native_build() {
        "envoy_wasmcustom_"
    } else {
        ""
    };
    let line = page
        .lines()
        .find(|l| l.starts_with(&format!("{prefix}kvroute_decisions_total{{")) && l.ends_with(" 1"))
        .unwrap_or_else(|| {
            panic!(
                "no labelled decision counter in:\n{}",
                page.lines()
                    .filter(|l| l.contains("kvroute"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    assert!(line.contains("policy=\"round_robin\""), "{line}");
    assert!(line.contains("endpoint=\"engine"), "{line}");
    assert!(page.contains("kvroute_fallbacks_total{reason=\"parse_error\"}"));
    s.stop().await;
}

/// Sends a three-turn conversation; returns the endpoint of each turn, waiting after each turn
/// until the singleton applied the decision.
async fn conversation(s: &Stack, tag: &str, recorded: &mut u64) -> Vec<String> {
    let mut history: Vec<(String, String)> = vec![("system".into(), system_prompt(tag))];
    let mut out = Vec::new();
    for turn in 0..3 {
        history.push(("user".into(), format!("Turn {turn} of {tag}: go on.")));
        let msgs: Vec<(&str, &str)> = history
            .iter()
            .map(|(r, t)| (r.as_str(), t.as_str()))
            .collect();
        out.push(served(&s.chat(&chat(&msgs), &[]).await));
        *recorded += 1;
        let want = *recorded;
        s.envoy
            .wait_stat(
                "kvroute_decisions_recorded_total",
                Duration::from_secs(2),
                |v| v >= want,
            )
            .await
            .unwrap();
        history.push(("assistant".into(), "ok".into()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_policies_keep_conversations_home_at_idle() {
    // Cache readers follow the directory; hashers follow the prompt's head: either way, with no
    // load every turn of a conversation goes where its first turn went.
    let s = Stack::with_policy(2, "sglang_cache_aware").await;
    let mut recorded = 0u64;
    for policy in [
        "sglang_cache_aware",
        "llmd_scorer",
        "dynamo_cost",
        "chwbl",
        "dualmap",
        "lmetric",
        "predicted_ttft",
    ] {
        s.envoy.set_policy(policy).await.unwrap();
        for c in 0..3 {
            let e = conversation(&s, &format!("{policy} {c}"), &mut recorded).await;
            assert!(e.iter().all(|x| *x == e[0]), "{policy}: {e:?}");
        }
        let n = s
            .stat(&format!(
                "kvroute_decisions_total.policy.{policy}.endpoint.engine0"
            ))
            .await
            + s.stat(&format!(
                "kvroute_decisions_total.policy.{policy}.endpoint.engine1"
            ))
            .await;
        assert_eq!(n, 9, "{policy}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicted_ttft_leaves_home_while_a_long_prompt_is_prefilled_there() {
    let s = std::sync::Arc::new(Stack::with_policy(2, "predicted_ttft").await);
    let mut recorded = 0u64;
    let e = conversation(&s, "queued", &mut recorded).await;
    assert!(e.iter().all(|x| *x == e[0]), "{e:?}");
    let home = e[0].clone();
    let hi = s.index_of(&home);
    // A long turn of the same conversation (about 4,000 new tokens after its cached history) goes
    // home; its response has not started, so the gateway counts its prefill as queued there.
    let long = "long document text ".repeat(800);
    let (s2, b2) = (
        s.clone(),
        chat(&[
            ("system", &system_prompt("queued")),
            ("user", "Turn 0 of queued: go on."),
            ("assistant", "ok"),
            ("user", &long),
        ]),
    );
    let held = tokio::spawn(async move { s2.chat(&b2, &[SLOW]).await });
    s.wait_active(hi, 1).await;
    // The conversation's next turn: its history (a few hundred tokens) is cached at home, but
    // recomputing it elsewhere is quicker than waiting for the queued prefill.
    let next = chat(&[
        ("system", &system_prompt("queued")),
        ("user", "Turn 0 of queued: go on."),
        ("assistant", "ok"),
        ("user", "Turn 1 of queued: go on."),
        ("assistant", "ok"),
        ("user", "Turn 2 of queued: go on."),
        ("assistant", "ok"),
        ("user", "Turn 3 of queued: go on."),
    ]);
    assert_ne!(served(&s.chat(&next, &[]).await), home, "must leave home");
    // The singleton shows the queued prefill; once the long request's response has started,
    // nothing is queued there.
    let gauge = format!("kvroute_queued_prefill_tokens.endpoint.{home}");
    s.envoy
        .wait_stat(&gauge, Duration::from_secs(2), |v| v >= 3_000)
        .await
        .unwrap();
    assert_eq!(served(&held.await.unwrap()), home);
    s.envoy
        .wait_stat(&gauge, Duration::from_secs(2), |v| v == 0)
        .await
        .unwrap();
    let other = if hi == 0 { "engine1" } else { "engine0" };
    s.envoy
        .wait_stat(
            &format!("kvroute_queued_prefill_tokens.endpoint.{other}"),
            Duration::from_secs(2),
            |v| v == 0,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chwbl_spills_over_its_bound_and_sglang_gates_on_imbalance() {
    let s = std::sync::Arc::new(Stack::with_policy(2, "chwbl").await);
    let body = chat(&[("system", &system_prompt("bounded")), ("user", "hello")]);
    let home = served(&s.chat(&body, &[]).await);
    let hi = s.index_of(&home);
    // Two held requests with the same head: the bound ceil(1.25 x (in flight + 1) / 2) admits
    // both at home; the third goes to the other endpoint.
    let mut held = Vec::new();
    for k in 1..=2 {
        let (s2, b2) = (s.clone(), body.clone());
        held.push(tokio::spawn(async move { s2.chat(&b2, &[SLOW]).await }));
        s.wait_active(hi, k).await;
    }
    assert_ne!(served(&s.chat(&body, &[]).await), home, "chwbl must spill");
    assert_eq!(s.stat("kvroute_reference_rule_total.reason.spill").await, 1);
    for h in held {
        assert_eq!(served(&h.await.unwrap()), home);
    }

    // sglang_cache_aware: thresholds at 0 / 1 make any difference an imbalance.
    s.envoy
        .runtime_modify(&[
            ("kvroute.balance_abs_threshold", "0"),
            ("kvroute.balance_rel_threshold", "1"),
        ])
        .await
        .unwrap();
    s.envoy.set_policy("sglang_cache_aware").await.unwrap();
    let mut recorded = s.stat("kvroute_decisions_recorded_total").await;
    let e = conversation(&s, "imbalance", &mut recorded).await;
    let home = e[0].clone();
    let hi = s.index_of(&home);
    // Turn 0 of that conversation, held at its home (loads equal: the cache decides) ...
    let msgs = [
        ("system", system_prompt("imbalance")),
        ("user", "Turn 0 of imbalance: go on.".to_string()),
    ];
    let m: Vec<(&str, &str)> = msgs.iter().map(|(r, t)| (*r, t.as_str())).collect();
    let turn0 = chat(&m);
    let (s2, b2) = (s.clone(), turn0.clone());
    let slow = tokio::spawn(async move { s2.chat(&b2, &[SLOW]).await });
    s.wait_active(hi, 1).await;
    // ... then the same request again: 1 vs 0 in flight is an imbalance, so the least loaded.
    assert_ne!(served(&s.chat(&turn0, &[]).await), home);
    assert!(
        s.stat("kvroute_reference_rule_total.reason.imbalanced")
            .await
            >= 1
    );
    assert_eq!(served(&slow.await.unwrap()), home);
}

/// A decision that only refreshes recency (the directory already places the request's blocks on
/// that endpoint) is recorded without republishing the state: the workers keep their copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_prompts_are_recorded_without_republishing() {
    let s = Stack::with_policy(2, "load_cache_aware").await;
    let body = chat(&[
        ("system", &system_prompt("repeat")),
        ("user", "The same question, again and again."),
    ]);
    let home = served(&s.chat(&body, &[]).await);
    s.envoy
        .wait_stat(
            "kvroute_decisions_recorded_total",
            Duration::from_secs(2),
            |v| v >= 1,
        )
        .await
        .unwrap();
    let publishes = s.stat("kvroute_state_publishes_total").await;
    for _ in 0..5 {
        assert_eq!(served(&s.chat(&body, &[]).await), home);
    }
    s.envoy
        .wait_stat(
            "kvroute_decisions_recorded_total",
            Duration::from_secs(2),
            |v| v >= 6,
        )
        .await
        .unwrap();
    assert_eq!(s.stat("kvroute_state_publishes_total").await, publishes);
    // A new prompt changes the directory: published at once (publish interval 0), as an overlay
    // of the changes on top of the state the workers hold.
    let overlays = s.stat("kvroute_state_overlay_publishes_total").await;
    let other = chat(&[
        ("system", &system_prompt("another")),
        ("user", "Something new."),
    ]);
    s.chat(&other, &[]).await;
    s.envoy
        .wait_stat(
            "kvroute_state_overlay_publishes_total",
            Duration::from_secs(2),
            |v| v > overlays,
        )
        .await
        .unwrap();
    assert_eq!(s.stat("kvroute_state_publishes_total").await, publishes);
    assert!(s.stat("kvroute_state_overlay_entries").await > 0);
}

/// With publishing on every decision, the directory's changes go to the workers as an overlay on
/// the state they hold, evictions included, so each decision sees the directory as it is; once the
/// changes outgrow an overlay, a full state is published and routing reads that as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlays_carry_every_change_and_give_way_to_a_full_state() {
    let s = Stack::start(1, |c| {
        c.defaults = PolicySettings {
            policy: "load_cache_aware".parse().unwrap(),
            ..PolicySettings::default()
        };
        // 64 blocks: a prompt here is 13, so the fifth prompt after one evicts it.
        c.default_capacity_blocks = 64;
    })
    .await;
    let prompt = |i: usize| {
        chat(&[
            ("system", &system_prompt(&format!("prompt {i}"))),
            ("user", "A question."),
        ])
    };
    let sent = std::cell::Cell::new(0u64);
    let send = |i: usize| {
        sent.set(sent.get() + 1);
        let body = prompt(i);
        let s = &s;
        let n = sent.get();
        async move {
            served(&s.chat(&body, &[]).await);
            s.envoy
                .wait_stat(
                    "kvroute_decisions_recorded_total",
                    Duration::from_secs(2),
                    |v| v >= n,
                )
                .await
                .unwrap();
        }
    };
    for i in 0..8 {
        send(i).await;
    }
    let publishes = s.stat("kvroute_state_publishes_total").await;
    assert!(s.stat("kvroute_state_overlay_publishes_total").await >= 8);
    // The newest prompt is placed whole (every block predicted); the first was evicted, and the
    // overlay says so.
    let predicted = || async {
        (
            s.stat("kvroute_predicted_cached_blocks_total").await,
            s.stat("kvroute_request_blocks_total").await,
        )
    };
    let (p0, b0) = predicted().await;
    send(7).await;
    let (p1, b1) = predicted().await;
    assert_eq!(p1 - p0, b1 - b0, "prompt 7 is placed whole");
    assert!(b1 - b0 >= 12);
    send(0).await;
    assert_eq!(predicted().await.0, p1, "prompt 0 was evicted");
    // Enough new prompts to outgrow an overlay (2,048 changes): a full state goes out.
    for i in 100..300 {
        send(i).await;
    }
    assert!(s.stat("kvroute_state_publishes_total").await > publishes);
    let (p0, b0) = predicted().await;
    send(299).await;
    let (p1, b1) = predicted().await;
    assert_eq!(p1 - p0, b1 - b0, "prompt 299 is placed whole");
    // The full states merged the overlays' evictions in: prompt 100, evicted long before, is gone.
    send(100).await;
    assert_eq!(predicted().await.0, p1, "prompt 100 was evicted");
    s.stop().await;
}
