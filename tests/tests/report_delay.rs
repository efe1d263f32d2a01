//! How long a decision waits before the state service (on Envoy's main thread) applies it to the
//! directory: the `kvroute_report_delay_us` histogram, through the real Envoy and the real filter.
//! The ignored test measures it at a light load and prints its percentiles, the figure the
//! simulator's modelled queue wake-up (`sim::HostLatency::queue_us`) is taken from:
//!
//! ```sh
//! cargo test -p kvroute-e2e --test report_delay -- --ignored --nocapture
//! ```
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use kvroute_e2e::*;

/// Sends `n` chats of prompts new to the directory, one at a time, `gap` apart, and waits until
/// the state service applied every decision.
async fn send_new_prompts(s: &Stack, n: u64, gap: Duration) {
    let filler = "some words about prefix caching. ".repeat(60);
    for i in 0..n {
        let body = chat(&[("system", &format!("prompt {i} {filler}")), ("user", "hi")]);
        assert_eq!(s.chat(&body, &[]).await.status, 200);
        tokio::time::sleep(gap).await;
    }
    s.envoy
        .wait_stat(
            "kvroute_decisions_recorded_total",
            Duration::from_secs(5),
            |v| v >= n,
        )
        .await
        .unwrap();
}

/// The histogram's cumulative quantiles, once Envoy has merged the workers' histograms (on its
/// stats flush, every 5 s); empty if they never show.
async fn delay_quantiles(s: &Stack) -> Vec<(String, f64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let q = histogram_quantiles(&s.envoy, "kvroute_report_delay_us").await;
        if quantile(&q, "P50").is_some_and(f64::is_finite) || std::time::Instant::now() > deadline {
            return q;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The value of quantile `name` (`"P50"`), if the histogram has it.
fn quantile(q: &[(String, f64)], name: &str) -> Option<f64> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_applied_decision_records_how_long_it_waited() {
    let s = Stack::start(2, |_| {}).await;
    send_new_prompts(&s, 20, Duration::from_millis(10)).await;
    let q = delay_quantiles(&s).await;
    let p50 = quantile(&q, "P50").unwrap_or(f64::NAN);
    // A wait is positive and, on an idle Envoy, far under a second.
    assert!(p50 > 0.0 && p50 < 1e6, "{q:?}");
    assert!(quantile(&q, "P100").is_some_and(|m| m >= p50), "{q:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn measure_the_report_delay_at_a_light_load() {
    let s = Stack::start(2, |_| {}).await;
    send_new_prompts(&s, 400, Duration::from_millis(20)).await;
    let q = delay_quantiles(&s).await;
    println!("400 new 2 KB prompts, one every 20 ms, 2 engines:");
    for name in ["P25", "P50", "P75", "P90", "P99"] {
        let v = quantile(&q, name).unwrap_or(f64::NAN);
        println!("report delay {name}: {v:.0} us");
    }
}
