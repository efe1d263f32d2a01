//! Decision cost in the core: parse + hash + score for 1 KB to 1 MB chat bodies (under
//! `load_cache_aware` and `predicted_ttft`), against the
//! published state a worker reads (the prefix already recorded on one endpoint, so prefix matching
//! walks every block: the worst case). Baseline in the same run: parsing the same body into a generic
//! `serde_json::Value`, the least any JSON-reading filter pays.
//!
//! Run: `cargo bench -p kvroute-core --bench decision` (or `just bench`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use kvroute_core::config::{EndpointConfig, PolicySettings};
use kvroute_core::directory::Directory;
use kvroute_core::policy::PolicyKind;
use kvroute_core::prefix::BlockSpec;
use kvroute_core::request::ApiKind;
use kvroute_core::router::{body_features, decide, Inputs};
use kvroute_core::state::{encode, DirectorySection, EndpointStatus, PublishedState, StateHeader};

fn body_of(bytes: usize) -> Vec<u8> {
    let sentence =
        "The quick brown fox jumps over the lazy dog while the engine keeps its cache warm. ";
    let system = sentence.repeat(8);
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    let mut turn = 0;
    let mut len = serde_json::to_vec(&messages).unwrap().len();
    while len < bytes {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        let m = serde_json::json!({"role": role, "content": format!("Turn {turn}: {}", sentence.repeat(3))});
        len += serde_json::to_vec(&m).unwrap().len() + 1;
        messages.push(m);
        turn += 1;
    }
    serde_json::to_vec(&serde_json::json!({"model": "meta-llama/Llama-3.2-3B-Instruct", "messages": messages, "stream": true})).unwrap()
}

/// The header of a state of two endpoints with these settings.
fn state_header(settings: PolicySettings) -> StateHeader {
    StateHeader {
        version: 1,
        published_at_ms: 0,
        settings,
        endpoints: vec![EndpointStatus::default(); 2],
        directory_as_of_ms: 0,
        decisions_recorded: 0,
        stale: false,
        sessions: Default::default(),
    }
}

/// Median time of one call, over batches taking ~20 ms each, for ~1.5 s.
fn measure(mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    let mut calls = 0u32;
    while t.elapsed() < Duration::from_millis(20) {
        f();
        calls += 1;
    }
    let per_batch = calls.max(1);
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) || samples.len() < 15 {
        let t = Instant::now();
        for _ in 0..per_batch {
            f();
        }
        samples.push(t.elapsed() / per_batch);
    }
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let endpoints: Vec<EndpointConfig> = (0..2)
        .map(|i| EndpointConfig {
            name: format!("engine{i}"),
            cluster: None,
            capacity_blocks: None,
            address: None,
        })
        .collect();
    let spec = BlockSpec::default();
    println!("decision cost in kvroute-core (parse + hash + score), median of batches");
    println!(
        "{:>8} {:>7} {:>12} {:>14} {:>12} {:>8} {:>9} {:>9}",
        "body",
        "blocks",
        "decision_us",
        "parse_hash_us",
        "baseline_us",
        "ratio",
        "ttft_us",
        "ttft/lca"
    );
    for kb in [1usize, 8, 100, 200, 1024] {
        let body = body_of(kb * 1024);
        let f = body_features(ApiKind::Chat, &body, Some("session-1"), spec).unwrap();
        let mut dir = Directory::new(&[4096, 4096], 4096);
        dir.record(1, &f.blocks, f.session);
        // A realistic directory: other prefixes fill both endpoints to capacity.
        for i in 0..4096u64 {
            dir.record(
                (i % 2) as usize,
                &[kvroute_core::BlockHash(
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                )],
                None,
            );
        }
        // The same decision under load_cache_aware (the "decision" column) and predicted_ttft.
        let decision_of = |policy: PolicyKind| {
            let header = state_header(PolicySettings {
                policy,
                ..PolicySettings::default()
            });
            let state =
                PublishedState::decode(encode(&header, &DirectorySection::of(&dir))).unwrap();
            let mut seq = 0u64;
            measure(|| {
                seq += 1;
                let f = body_features(ApiKind::Chat, black_box(&body), Some("session-1"), spec)
                    .unwrap();
                let inputs = Inputs {
                    endpoints: &endpoints,
                    status: &state.header.endpoints,
                    inflight: &[3, 1],
                    inflight_blocks: &[40, 10],
                    inflight_prefill: &[600, 0],
                    chars_per_token: 4.0,
                    spec,
                    directory_age_ms: 0,
                    settings: &state.header.settings,
                    seq,
                    rand: seq.wrapping_mul(0x2545_f491_4f6c_dd1d),
                };
                black_box(decide(&f, &state, &inputs, None));
            })
        };
        let decision = decision_of(PolicyKind::LoadCacheAware);
        let ttft = decision_of(PolicyKind::PredictedTtft);
        let features = measure(|| {
            black_box(
                body_features(ApiKind::Chat, black_box(&body), Some("session-1"), spec).unwrap(),
            );
        });
        let baseline = measure(|| {
            black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap());
        });
        let d_us = decision.as_secs_f64() * 1e6;
        let b_us = baseline.as_secs_f64() * 1e6;
        let t_us = ttft.as_secs_f64() * 1e6;
        println!(
            "{:>6}KB {:>7} {:>12.2} {:>14.2} {:>12.2} {:>7.2}x {:>9.2} {:>8.3}x",
            body.len() / 1024,
            f.blocks.len(),
            d_us,
            features.as_secs_f64() * 1e6,
            b_us,
            d_us / b_us,
            t_us,
            t_us / d_us
        );
    }
    println!(
        "baseline: serde_json::from_slice::<Value> of the same body; ratio = decision / baseline; \
         decision under load_cache_aware, ttft under predicted_ttft"
    );
    // The state table is the host's cost (encoding on the singleton, copying out of shared data);
    // under wasm its multi-megabyte states only measure the JS engine's memory growth.
    singleton_cost();
    if !cfg!(target_family = "wasm") {
        published_state_cost();
    }
}

/// The singleton's work per decision when every prompt is new to a full directory (2 endpoints of
/// 4,096 blocks, 8 KB prompts of 118 blocks, a new session each), publishing on every decision as
/// the filter does by default: record the decision, take the journal's changes, publish them as
/// an overlay, and once the overlay would outgrow its bound, a full state merged from the last one
/// and the overlay. Baseline in the same run: a full state built from the directory on every
/// decision (no overlays). Rows for other overlay bounds show why the filter's is 2,048.
fn singleton_cost() {
    use kvroute_core::state::{
        encode_overlay, OverlayBuilder, PublishedOverlay, OVERLAY_MAX_CHANGES,
    };
    println!();
    println!("singleton per decision, every prompt new (8 KB, 118 blocks; 2 x 4,096-block directory), mean us");
    println!(
        "{:>9} {:>9} {:>9} {:>9} {:>12} {:>9} {:>11} {:>8}",
        "bound", "record", "changes", "overlay", "full(amort)", "total", "full_every", "ratio"
    );
    let header = state_header(PolicySettings::default());
    let decisions = 3000u64;
    let prompt = |i: u64| -> Vec<kvroute_core::BlockHash> {
        (0..118u64)
            .map(|b| {
                kvroute_core::BlockHash((i * 118 + b).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234)
            })
            .collect()
    };
    let secs = |t: Instant| t.elapsed().as_secs_f64();
    // Baseline: a full state from the directory after every decision.
    let mut dir = Directory::new(&[4096, 4096], 4096);
    let mut base_full = 0.0;
    for i in 0..decisions {
        dir.record((i % 2) as usize, &prompt(i), Some(i));
        let t = Instant::now();
        black_box(encode(&header, &DirectorySection::of(&dir)));
        base_full += secs(t);
    }
    for bound in [1024, OVERLAY_MAX_CHANGES, 4096] {
        let mut dir = Directory::new(&[4096, 4096], 4096);
        dir.set_journal_capacity(bound);
        let mut overlay = OverlayBuilder::default();
        let mut published = DirectorySection::of(&dir);
        let (mut rec, mut chg, mut ovl, mut full) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..decisions {
            let blocks = prompt(i);
            let t = Instant::now();
            dir.record((i % 2) as usize, &blocks, Some(i));
            rec += secs(t);
            let t = Instant::now();
            let changes = dir.take_changes();
            chg += secs(t);
            let t = Instant::now();
            match changes {
                Some(c) if overlay.len() + c.blocks.len() + c.sessions.len() <= bound => {
                    overlay.add(&dir, &c);
                    let blob = encode_overlay(
                        1,
                        i,
                        &Default::default(),
                        &DirectorySection::of_overlay(&overlay),
                    );
                    black_box(PublishedOverlay::decode(blob).unwrap());
                    ovl += secs(t);
                }
                c => {
                    published = match c {
                        Some(c) => {
                            overlay.add(&dir, &c);
                            published.merged(&overlay)
                        }
                        None => DirectorySection::of(&dir),
                    };
                    overlay.clear();
                    dir.reset_journal();
                    black_box(encode(&header, &published));
                    full += secs(t);
                }
            }
        }
        let us = |v: f64| v * 1e6 / decisions as f64;
        let total = us(rec + chg + ovl + full);
        println!(
            "{:>9} {:>9.1} {:>9.1} {:>9.1} {:>12.1} {:>9.1} {:>11.1} {:>7.2}x",
            bound,
            us(rec),
            us(chg),
            us(ovl),
            us(full),
            total,
            us(base_full),
            total / us(base_full)
        );
    }
    println!("full_every: a full state from the directory after every decision; ratio = total / full_every");
}

/// The published state as the directory grows to its bound: what the singleton pays to encode it
/// on every publish, and what a worker pays to decode it and look up a 1,024-block prompt. (Inside
/// Envoy each read also copies the value out of shared data.)
fn published_state_cost() {
    println!();
    println!("published state vs directory size (2 endpoints; native: wasm in V8 is slower)");
    println!(
        "{:>9} {:>10} {:>12} {:>15} {:>12}",
        "entries", "bytes", "encode_us", "copy+decode_us", "lookup_us"
    );
    let blocks: Vec<kvroute_core::BlockHash> = (0..1024u64)
        .map(|i| kvroute_core::BlockHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x55))
        .collect();
    for entries in [1_024u32, 8_192, 65_536, 262_144] {
        let mut dir = Directory::new(&[entries / 2, entries / 2], 4096);
        for i in 0..u64::from(entries) {
            dir.record(
                (i % 2) as usize,
                &[kvroute_core::BlockHash(
                    i.wrapping_mul(0x2545_f491_4f6c_dd1d),
                )],
                None,
            );
        }
        dir.record(0, &blocks, Some(1));
        let header = state_header(PolicySettings::default());
        let encoded = encode(&header, &DirectorySection::of(&dir));
        let enc = measure(|| {
            black_box(encode(&header, &DirectorySection::of(black_box(&dir))));
        });
        let dec = measure(|| {
            black_box(PublishedState::decode(black_box(encoded.clone())).unwrap());
        });
        let state = PublishedState::decode(encoded.clone()).unwrap();
        let look = measure(|| {
            black_box(kvroute_core::directory::match_lengths(
                &state,
                black_box(&blocks),
                2,
            ));
        });
        println!(
            "{:>9} {:>10} {:>12.1} {:>15.1} {:>12.1}",
            dir.distinct_blocks(),
            encoded.len(),
            enc.as_secs_f64() * 1e6,
            dec.as_secs_f64() * 1e6,
            look.as_secs_f64() * 1e6
        );
    }
}
