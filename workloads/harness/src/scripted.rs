//! A small scripted multi-turn workload and the engine-side numbers it is judged by, shared by the
//! demo and the benchmarks (the study's replayer replaces it for experiments).

use futures_util::StreamExt;
use serde_json::json;

use crate::emulated::EmulatedEngine;
use kvroute_loadgen::sse;

/// Sums of the engines' prefix-cache counters and TTFT histograms.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    /// `vllm:prefix_cache_hits_total`
    pub hits: f64,
    /// `vllm:prefix_cache_queries_total`
    pub queries: f64,
    /// `vllm:time_to_first_token_seconds_sum`
    pub ttft_sum: f64,
    /// `vllm:time_to_first_token_seconds_count`
    pub ttft_count: f64,
}

/// Sums the engines' metrics.
pub async fn snapshot(
    client: &reqwest::Client,
    engines: &[EmulatedEngine],
) -> anyhow::Result<Snapshot> {
    let mut s = Snapshot::default();
    for e in engines {
        let text = client
            .get(format!("{}/metrics", e.url()))
            .send()
            .await?
            .text()
            .await?;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let v: f64 = value.parse().unwrap_or(0.0);
            let name = series.split('{').next().unwrap_or("");
            match name {
                "vllm:prefix_cache_hits_total" => s.hits += v,
                "vllm:prefix_cache_queries_total" => s.queries += v,
                "vllm:time_to_first_token_seconds_sum" => s.ttft_sum += v,
                "vllm:time_to_first_token_seconds_count" => s.ttft_count += v,
                _ => {}
            }
        }
    }
    Ok(s)
}

/// How a conversation's turns are spread over several gateways (Envoy replicas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Every turn to the first gateway.
    Single,
    /// Each conversation sticks to one gateway (a session-affine balancer in front).
    PerConversation,
    /// Each turn to a pseudo-random gateway (a plain L4 balancer spreading new connections).
    PerTurn,
}

impl Spread {
    fn pick(self, c: usize, t: usize, n: usize) -> usize {
        let n = n.max(1);
        match self {
            Spread::Single => 0,
            Spread::PerConversation => c % n,
            Spread::PerTurn => {
                (kvroute_traces::rng::mix((c as u64) << 32 | t as u64) % n as u64) as usize
            }
        }
    }
}

/// One conversation of `turns` turns: the history is resent every turn, the system prompt is one
/// of three shared ones, the session id is `user-c`; turn `t` goes to `urls[spread.pick(c, t)]`.
pub async fn conversation(
    client: reqwest::Client,
    urls: Vec<String>,
    spread: Spread,
    c: usize,
    turns: usize,
) -> anyhow::Result<()> {
    let family = c % 3;
    let system = format!("[team {family}] You are the meticulous assistant of team {family}; cite sources, be precise. ").repeat(10);
    let mut messages = vec![json!({"role": "system", "content": system})];
    for t in 0..turns {
        messages.push(json!({"role": "user", "content": format!("Conversation {c}, turn {t}: please continue the analysis with more detail.")}));
        let body = json!({"messages": messages, "max_tokens": 32, "ignore_eos": true, "stream": true,
                          "stream_options": {"include_usage": true}});
        let url = urls
            .get(spread.pick(c, t, urls.len()))
            .cloned()
            .unwrap_or_default();
        let r = client
            .post(&url)
            .header("x-session-id", format!("user-{c}"))
            .json(&body)
            .send()
            .await?;
        if !r.status().is_success() {
            anyhow::bail!("request failed: {}", r.status());
        }
        let mut answer = String::new();
        let mut events = std::pin::pin!(sse::json_events(r));
        while let Some(v) = events.next().await {
            if let Some(t) = sse::chunk_text(&v.map_err(anyhow::Error::msg)?) {
                answer.push_str(t);
            }
        }
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    Ok(())
}

impl Snapshot {
    /// Prefix hit rate between two snapshots.
    pub fn hit_rate_since(&self, before: &Snapshot) -> f64 {
        (self.hits - before.hits) / (self.queries - before.queries).max(1.0)
    }

    /// Mean TTFT (s) between two snapshots.
    pub fn mean_ttft_since(&self, before: &Snapshot) -> f64 {
        (self.ttft_sum - before.ttft_sum) / (self.ttft_count - before.ttft_count).max(1.0)
    }
}
