use super::*;
use kvroute_core::config::PublishInterval;
use kvroute_core::PolicyKind;
use kvroute_engine::profile::seed_rig;
use kvroute_traces::{arrivals, rag, with_arrivals, words, Turn};

fn chats(n: usize, turns: usize, seed: u64) -> Vec<Session> {
    let v: Vec<Session> = (0..n)
        .map(|i| Session {
            id: format!("chat-{seed}-{i}"),
            start_ms: 0.0,
            system: None,
            turns: (0..turns)
                .map(|t| Turn {
                    user: words(seed * 10_000 + (i * 100 + t) as u64, 150),
                    assistant: None,
                    max_tokens: 24,
                })
                .collect(),
            think_ms: 500.0,
        })
        .collect();
    let starts = arrivals::poisson(n, 4.0, seed);
    with_arrivals(v, &starts)
}

fn cfg(n: usize, policy: PolicyKind) -> SimConfig {
    SimConfig::new(
        n,
        EngineConfig::vllm_defaults(&seed_rig()),
        PolicySettings {
            policy,
            ..PolicySettings::default()
        },
    )
}

fn hit_rate(o: &SimOutput) -> f64 {
    o.counters.hits / o.counters.queries.max(1.0)
}

#[test]
fn same_seed_same_output_and_every_request_accounted() {
    let work = prepare(&chats(20, 4, 1), &cfg(3, PolicyKind::P2c).filter, 1);
    let a = simulate(&cfg(3, PolicyKind::P2c), &work);
    let b = simulate(&cfg(3, PolicyKind::P2c), &work);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert_eq!(a.records.len(), 80);
    assert_eq!(a.per_endpoint.iter().sum::<u64>(), 80);
    assert!(a.records.iter().all(|r| r.error.is_none()
        && r.completion_tokens == 24
        && r.ttft_us.is_some_and(|t| t > 0 && t <= r.e2e_us)));
    // The engines' own counters agree with what the requests saw.
    let cached: u64 = a.records.iter().map(|r| u64::from(r.cached_tokens)).sum();
    let prompt: u64 = a.records.iter().map(|r| u64::from(r.prompt_tokens)).sum();
    assert_eq!(cached as f64, a.counters.hits);
    assert_eq!(prompt as f64, a.counters.queries);
    assert_eq!(a.counters.ttft_count, 80.0);
    // Another seed draws differently.
    let c = simulate(
        &SimConfig {
            seed: 2,
            ..cfg(3, PolicyKind::P2c)
        },
        &work,
    );
    assert_ne!(a.per_endpoint, c.per_endpoint);
}

#[test]
fn preparation_does_not_depend_on_threads() {
    let sessions = chats(130, 2, 3);
    let f = cfg(2, PolicyKind::Jsq).filter;
    let one = prepare(&sessions, &f, 1);
    let four = prepare(&sessions, &f, 4);
    assert_eq!(format!("{one:?}"), format!("{four:?}"));
}

#[test]
fn multi_turn_affinity_beats_round_robin_and_turns_hit() {
    let work = prepare(&chats(40, 4, 5), &cfg(4, PolicyKind::RoundRobin).filter, 1);
    let rr = simulate(&cfg(4, PolicyKind::RoundRobin), &work);
    let sh = simulate(&cfg(4, PolicyKind::SessionHash), &work);
    let lca = simulate(&cfg(4, PolicyKind::LoadCacheAware), &work);
    // Sessions stick: each later turn finds the previous turn's prompt cached (its full blocks).
    let prompt_of = |s: u32, t: u32| {
        sh.records
            .iter()
            .find(|r| r.session == s && r.turn == t)
            .map(|r| r.prompt_tokens)
            .unwrap()
    };
    for r in &sh.records {
        if r.turn > 0 {
            let prev = prompt_of(r.session, r.turn - 1);
            assert!(r.cached_tokens >= prev / 16 * 16, "{r:?} after {prev}");
        }
    }
    assert!(
        hit_rate(&sh) > hit_rate(&rr) + 0.2,
        "{} vs {}",
        hit_rate(&sh),
        hit_rate(&rr)
    );
    assert!(hit_rate(&lca) > hit_rate(&rr) + 0.2);
    // Later turns reach their first token sooner when their history is cached.
    let later = |o: &SimOutput| {
        let v: Vec<f64> = o
            .records
            .iter()
            .filter(|r| r.turn > 0)
            .filter_map(|r| r.ttft_us)
            .map(|t| t as f64)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(later(&sh) < later(&rr), "{} vs {}", later(&sh), later(&rr));
}

#[test]
fn every_policy_runs_and_reference_policies_share_rag_documents() {
    let sessions = {
        let s = rag::generate(&rag::RagOptions {
            users: 60,
            documents: 3,
            seed: 2,
            ..Default::default()
        });
        let starts = arrivals::poisson(s.len(), 6.0, 2);
        with_arrivals(s, &starts)
    };
    let work = prepare(&sessions, &cfg(4, PolicyKind::Jsq).filter, 1);
    let rr = simulate(&cfg(4, PolicyKind::RoundRobin), &work);
    // An average request's share of the prompt tokens: dynamo_cost adds the candidates'
    // in-flight blocks to their cost, which on this small workload ties it with round_robin,
    // and which of the tied candidates it takes is the worker's random draw.
    let one = 1.0 / 60.0;
    let rr = hit_rate(&rr);
    for p in PolicyKind::ALL {
        let o = simulate(&cfg(4, *p), &work);
        assert_eq!(o.records.len(), 60, "{p}");
        if p.reads_prefix() || matches!(p, PolicyKind::Chwbl | PolicyKind::Dualmap) {
            assert!(hit_rate(&o) >= rr - one, "{p}: {} < rr {rr}", hit_rate(&o));
        }
    }
}

#[test]
fn stale_directory_loses_hits() {
    let work = prepare(
        &chats(40, 4, 7),
        &cfg(4, PolicyKind::LoadCacheAware).filter,
        1,
    );
    let fresh = simulate(&cfg(4, PolicyKind::LoadCacheAware), &work);
    let mut never = cfg(4, PolicyKind::LoadCacheAware);
    never.settings.publish_interval = PublishInterval::Never;
    let never = simulate(&never, &work);
    assert!(hit_rate(&fresh) > hit_rate(&never) + 0.1);
    // With no directory, nothing is predicted.
    assert!(never.records.iter().all(|r| r.predicted_blocks == 0));
}

#[test]
fn gateway_cost_adds_to_every_request() {
    let work = prepare(&chats(1, 3, 9), &cfg(2, PolicyKind::SessionHash).filter, 1);
    let base = simulate(&cfg(2, PolicyKind::SessionHash), &work);
    let mut c = cfg(2, PolicyKind::SessionHash);
    c.gateway = GatewayCost {
        request_us: 300,
        response_us: 200,
    };
    let slow = simulate(&c, &work);
    // One session alone: every request meets an idle engine, so the cost adds exactly.
    let sort = |o: &SimOutput| {
        let mut v: Vec<(u32, u32, u64)> = o
            .records
            .iter()
            .map(|r| (r.session, r.turn, r.ttft_us.unwrap_or(0)))
            .collect();
        v.sort_unstable();
        v
    };
    let (base, slow) = (sort(&base), sort(&slow));
    // Every request of the session ran in both, with a first token.
    assert_eq!(base.len(), 3, "{base:?}");
    assert_eq!(slow.len(), base.len());
    assert!(base.iter().all(|r| r.2 > 0), "{base:?}");
    for (a, b) in base.iter().zip(&slow) {
        assert_eq!(b.2, a.2 + 500, "{a:?} {b:?}");
    }
}

/// How late each request was sent, us, by (session, turn): after the session's start, or after the
/// previous response's end plus the think time.
fn lateness(o: &SimOutput, work: &[PreparedSession]) -> Vec<((u32, u32), u64)> {
    let t: std::collections::BTreeMap<(u32, u32), (u64, u64)> = o
        .records
        .iter()
        .map(|r| ((r.session, r.turn), (r.sent_us, r.e2e_us)))
        .collect();
    t.iter()
        .map(|(&(s, turn), &(sent, _))| {
            let meant = match turn {
                0 => work[s as usize].start_us,
                _ => t[&(s, turn - 1)].0 + t[&(s, turn - 1)].1 + work[s as usize].think_us,
            };
            ((s, turn), sent - meant)
        })
        .collect()
}

#[test]
fn send_delays_come_from_their_distribution_and_reorder_close_sends() {
    let sessions = chats(40, 3, 11);
    let work = prepare(&sessions, &cfg(2, PolicyKind::RoundRobin).filter, 1);
    let on_time = simulate(&cfg(2, PolicyKind::RoundRobin), &work);
    // Without delays, every send is when it was meant to be: the session's start, or the previous
    // response's end plus the think time; and router seeds cannot change round_robin.
    for ((s, turn), late) in lateness(&on_time, &work) {
        assert_eq!(late, 0, "session {s} turn {turn}");
    }
    let reseeded = simulate(
        &SimConfig {
            seed: 7,
            ..cfg(2, PolicyKind::RoundRobin)
        },
        &work,
    );
    assert_eq!(format!("{on_time:?}"), format!("{reseeded:?}"));

    // With delays of 1 to 9 ms, every send is late by an amount within those bounds.
    let jittered = |seed: u64| SimConfig {
        send_delay_us: vec![1_000, 2_000, 9_000],
        seed,
        ..cfg(2, PolicyKind::RoundRobin)
    };
    let a = simulate(&jittered(1), &work);
    for ((s, turn), late) in lateness(&a, &work) {
        assert!(
            (1_000..=9_000).contains(&late),
            "session {s} turn {turn}: {late} us late"
        );
    }
    // Same seed, same run; other seeds draw other delays, so round_robin sees another order of
    // sends and sends other turns to other engines.
    assert_eq!(
        format!("{a:?}"),
        format!("{:?}", simulate(&jittered(1), &work))
    );
    let routes = |o: &SimOutput| -> Vec<(u32, u32, u32)> {
        let mut v: Vec<_> = o
            .records
            .iter()
            .map(|r| (r.session, r.turn, r.endpoint))
            .collect();
        v.sort_unstable();
        v
    };
    let other = (2..6)
        .map(|seed| routes(&simulate(&jittered(seed), &work)))
        .filter(|r| *r != routes(&a))
        .count();
    assert!(other > 0, "router seeds never changed round_robin's routes");
}

#[test]
fn gateways_that_share_a_fleet_log_keep_one_gateways_hit_rate_and_independent_ones_lose_it() {
    // Conversations on 4 engines, each turn through one of 4 gateways at random.
    let sessions = {
        let v = chats(40, 5, 11);
        let starts = arrivals::poisson(v.len(), 4.0, 11);
        with_arrivals(v, &starts)
    };
    let base = cfg(4, PolicyKind::PredictedTtft);
    let work = prepare(&sessions, &base.filter, 1);
    let one = simulate(&base, &work);
    let run = |sync: Option<u64>| {
        simulate(
            &SimConfig {
                gateways: 4,
                fleet_sync_us: sync,
                ..base.clone()
            },
            &work,
        )
    };
    let (shared, independent) = (run(Some(50_000)), run(None));
    let (h1, hs, hi) = (hit_rate(&one), hit_rate(&shared), hit_rate(&independent));
    assert_eq!(shared.records.len(), 200);
    assert!(
        hi < 0.9 * h1,
        "independent {hi:.3} against one gateway {h1:.3}"
    );
    assert!(hs > 0.97 * h1, "shared {hs:.3} against one gateway {h1:.3}");
    // One gateway with a fleet configured is one gateway.
    let alone = simulate(
        &SimConfig {
            fleet_sync_us: Some(50_000),
            ..base.clone()
        },
        &work,
    );
    assert_eq!(format!("{alone:?}"), format!("{one:?}"));
}

#[test]
fn a_smaller_kv_cache_evicts_blocks_sooner_and_the_residency_says_so() {
    // Every allocation followed; 100 sessions of four turns on two engines.
    let work = prepare(
        &chats(100, 4, 11),
        &cfg(2, PolicyKind::RoundRobin).filter,
        1,
    );
    let run = |blocks: u32| {
        let mut c = cfg(2, PolicyKind::RoundRobin);
        c.engine.num_gpu_blocks = blocks;
        c.kv_residency_sample = Some(1.0);
        simulate(&c, &work)
    };
    let median_idle = |o: &SimOutput| {
        let mut v: Vec<f64> = o.block_residency.iter().map(|(_, i)| *i).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (small, large) = (run(200), run(800));
    assert!(small.block_residency.len() > 100, "blocks evicted");
    assert!(small
        .block_residency
        .iter()
        .all(|(life, idle)| *idle >= 0.0 && idle <= life));
    assert!(
        median_idle(&small) < median_idle(&large),
        "{} against {}",
        median_idle(&small),
        median_idle(&large)
    );
    // Not followed: nothing reported, and the same requests, served the same way.
    let mut c = cfg(2, PolicyKind::RoundRobin);
    c.engine.num_gpu_blocks = 200;
    let plain = simulate(&c, &work);
    assert!(plain.block_residency.is_empty());
    assert_eq!(plain.records, small.records);
}
