//! The data files the study reads (`../shared/data`), as the traces crate parses them: their sizes
//! and the properties the study's workloads rely on.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use kvroute_traces::arrivals::azure_csv;
use kvroute_traces::mooncake::{parse, sessions};
use kvroute_traces::sharegpt::{self, ShareGptOptions};

#[test]
fn the_sharegpt_file() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/sharegpt_dev_3000.json"
    ))
    .unwrap();
    let s = sharegpt::parse(&text, &ShareGptOptions::default()).unwrap();
    // The file holds conversations of 2-10 human turns, alternating, messages <= 8,000 chars.
    assert_eq!(s.len(), 3000);
    assert!(s.iter().all(|s| (2..=10).contains(&s.turns.len())));
}

#[test]
fn the_mooncake_trace() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/mooncake_synthetic_trace.jsonl"
    ))
    .unwrap();
    let reqs = parse(&text).unwrap();
    assert_eq!(reqs.len(), 3993);
    let mean = reqs.iter().map(|r| r.input_length).sum::<usize>() as f64 / reqs.len() as f64;
    assert!((15_000.0..15_700.0).contains(&mean), "{mean}");
    let s = sessions(&reqs[..10], 2.0);
    assert_eq!(s[0].turns[0].user.split(' ').count(), reqs[0].input_length);
    assert!(parse("{\"timestamp\": 1}\n").is_err());
}

#[test]
fn the_azure_trace() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/azure_llm_conv_2023.csv"
    ))
    .unwrap();
    let r = azure_csv(&text).unwrap();
    assert_eq!(r.len(), 19_366);
    let span_s = r[r.len() - 1].0 / 1000.0;
    let rate = r.len() as f64 / span_s;
    assert!((4.5..6.5).contains(&rate), "{rate} req/s (README: 5.5)");
}
