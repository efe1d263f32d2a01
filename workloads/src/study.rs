//! The experiment runner: the routing study's runs against the live stack.
//!
//! A [`Lab`] is the stack: emulated engines (or real ones, by URL), the sidecar and Envoy with
//! kvroute. A [`RunSpec`] is one measured run: a workload, a policy and runtime values, a seed. Each
//! run starts cold (engine prefix caches reset, the router's directory forgotten through a new
//! `kvroute.directory_epoch`), sets its policy and parameters through Envoy runtime values, warms
//! up with sessions it does not record, then replays the measured sessions while the engines'
//! `/metrics` are read before and after. Every request becomes a [`RequestRecord`]; every run a
//! [`RunResult`] with its full spec, seed and the versions involved.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvroute_core::policy::PolicyKind;
use kvroute_traces::Session;
use serde::{Deserialize, Serialize};

use crate::emulated::{EmulatedEngine, RunningSidecar};
use crate::envoy_config::{Engine, EnvoySpec};
use crate::replay::{replay, MemorySink, ReplayOptions, RequestRecord};
use crate::stack::{filter_wasm, Envoy};

/// The stack the runs go through.
#[derive(Debug)]
pub struct Lab {
    /// Engine base URLs, in endpoint order.
    pub engine_urls: Vec<String>,
    /// Envoy with kvroute.
    pub envoy: Envoy,
    /// Emulated time per wall time (1 for real engines): client-side times are multiplied by it.
    pub time_scale: f64,
    _engines: Vec<EmulatedEngine>,
    _sidecar: RunningSidecar,
    client: reqwest::Client,
    epoch: u64,
}

impl Lab {
    /// `n` emulated engines with `profile`, `time_scale` times real time, the sidecar and Envoy.
    pub async fn emulated(n: usize, profile: &str, time_scale: f64) -> anyhow::Result<Lab> {
        let mut engines = Vec::new();
        for i in 0..n {
            engines.push(EmulatedEngine::start(&format!("engine{i}"), profile, time_scale).await?);
        }
        let refs: Vec<&EmulatedEngine> = engines.iter().collect();
        let sidecar =
            RunningSidecar::start_at(&refs, Duration::from_millis(100), "127.0.0.1:0".parse()?)
                .await?;
        let spec_engines = engines
            .iter()
            .map(|e| Engine::local(&e.name, e.addr.port()))
            .collect();
        let mut spec = EnvoySpec::new(spec_engines, filter_wasm()?.display().to_string());
        spec.set_sidecar(Engine::local("sidecar", sidecar.addr.port()));
        let envoy = Envoy::start(spec).await?;
        envoy
            .wait_stat("kvroute_state_stale", Duration::from_secs(10), |v| v == 0)
            .await?;
        Ok(Lab {
            engine_urls: engines.iter().map(EmulatedEngine::url).collect(),
            envoy,
            time_scale,
            _engines: engines,
            _sidecar: sidecar,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            epoch: 0,
        })
    }

    /// Sums of the engines' counters the results use.
    pub async fn engine_counters(&self) -> anyhow::Result<EngineCounters> {
        let mut c = EngineCounters::default();
        for url in &self.engine_urls {
            let page = self
                .client
                .get(format!("{url}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            for line in page.lines().filter(|l| !l.starts_with('#')) {
                let Some((series, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                let v: f64 = value.parse().unwrap_or(0.0);
                match series.split('{').next().unwrap_or("") {
                    "vllm:prefix_cache_hits_total" => c.hits += v,
                    "vllm:prefix_cache_queries_total" => c.queries += v,
                    "vllm:prompt_tokens_total" => c.prompt_tokens += v,
                    "vllm:request_prefill_kv_computed_tokens_sum" => c.prefill_computed += v,
                    "vllm:time_to_first_token_seconds_sum" => c.ttft_sum += v,
                    "vllm:time_to_first_token_seconds_count" => c.ttft_count += v,
                    "vllm:num_preemptions_total" => c.preemptions += v,
                    _ => {}
                }
            }
        }
        Ok(c)
    }

    /// Cold start: every engine's prefix cache reset, the router's directory forgotten.
    pub async fn cold_start(&mut self) -> anyhow::Result<()> {
        for url in &self.engine_urls {
            self.client
                .post(format!("{url}/reset_prefix_cache"))
                .send()
                .await?;
        }
        self.epoch += 1;
        let epoch = self.epoch.to_string();
        self.envoy
            .runtime_modify(&[("kvroute.directory_epoch", epoch.as_str())])
            .await?;
        let want = self.epoch;
        self.envoy
            .wait_stat(
                "kvroute_setting_directory_epoch",
                Duration::from_secs(10),
                |v| v == want,
            )
            .await?;
        Ok(())
    }

    /// Sets the policy and runtime values and waits until the singleton published them.
    pub async fn configure(
        &self,
        policy: PolicyKind,
        values: &[(String, String)],
    ) -> anyhow::Result<()> {
        let mut all: Vec<(&str, &str)> = vec![("kvroute.policy", policy.as_str())];
        all.extend(values.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.envoy.runtime_modify(&all).await?;
        self.envoy.set_policy(policy.as_str()).await?;
        // The settings gauges refresh on the singleton's tick; give the workers a publish too.
        tokio::time::sleep(Duration::from_millis(250)).await;
        Ok(())
    }

    /// One measured run.
    pub async fn run(
        &mut self,
        spec: &RunSpec,
        warmup: Vec<Session>,
        measured: Vec<Session>,
    ) -> anyhow::Result<RunResult> {
        // Workloads are defined in emulated time; the replayer sleeps in wall time.
        let to_wall = |v: Vec<Session>| -> Vec<Session> {
            v.into_iter()
                .map(|mut s| {
                    s.start_ms /= self.time_scale;
                    s.think_ms /= self.time_scale;
                    s
                })
                .collect()
        };
        let (warmup, measured) = (to_wall(warmup), to_wall(measured));
        self.cold_start().await?;
        self.configure(spec.policy, &spec.runtime).await?;
        let opts = ReplayOptions {
            url: self.envoy.url("/v1/chat/completions"),
            model: None,
            max_in_flight: 256,
            timeout: Duration::from_secs(120),
            session_header: "x-session-id".into(),
        };
        let sink: Arc<Mutex<dyn Write + Send>> = Arc::new(Mutex::new(std::io::sink()));
        if !warmup.is_empty() {
            replay(
                warmup,
                opts.clone(),
                sink,
                Arc::new(AtomicBool::new(false)),
                Arc::new(|_, _| {}),
            )
            .await?;
        }
        let before = self.engine_counters().await?;
        let decisions_before = self.decisions().await?;
        let sink = MemorySink::default();
        let out: Arc<Mutex<dyn Write + Send>> = Arc::new(Mutex::new(sink.clone()));
        let summary = replay(
            measured,
            opts,
            out,
            Arc::new(AtomicBool::new(false)),
            Arc::new(|_, _| {}),
        )
        .await?;
        let after = self.engine_counters().await?;
        let decisions_after = self.decisions().await?;
        let text = sink.text();
        let records: Vec<RequestRecord> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let per_endpoint: Vec<u64> = decisions_after
            .iter()
            .zip(&decisions_before)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        Ok(RunResult::new(
            spec,
            &records,
            (before, after),
            per_endpoint,
            summary.wall_s,
            self.time_scale,
        ))
    }

    async fn decisions(&self) -> anyhow::Result<Vec<u64>> {
        let stats = self.envoy.stats().await?;
        Ok((0..self.engine_urls.len())
            .map(|i| {
                stats
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with("kvroute_decisions_total.")
                            && k.ends_with(&format!(".endpoint.engine{i}"))
                    })
                    .map(|(_, v)| *v)
                    .sum()
            })
            .collect())
    }
}

/// Engine counters summed over engines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineCounters {
    /// `vllm:prefix_cache_hits_total`
    pub hits: f64,
    /// `vllm:prefix_cache_queries_total`
    pub queries: f64,
    /// `vllm:prompt_tokens_total`
    pub prompt_tokens: f64,
    /// `vllm:request_prefill_kv_computed_tokens_sum`
    pub prefill_computed: f64,
    /// `vllm:time_to_first_token_seconds_sum`
    pub ttft_sum: f64,
    /// `vllm:time_to_first_token_seconds_count`
    pub ttft_count: f64,
    /// `vllm:num_preemptions_total`
    pub preemptions: f64,
}

/// One measured run's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Experiment it belongs to.
    pub experiment: String,
    /// Workload name.
    pub workload: String,
    /// Policy.
    pub policy: PolicyKind,
    /// Extra runtime values (`kvroute.alpha` = ...).
    pub runtime: Vec<(String, String)>,
    /// Session arrival rate (sessions/s of emulated time).
    pub rate: f64,
    /// Label of the rate (0.5x, 1x, ...).
    pub rate_label: String,
    /// Seed of the workload and arrivals.
    pub seed: u64,
    /// Repeat index.
    pub repeat: usize,
}

impl RunSpec {
    /// A run of `policy` on `workload` at `rate` sessions/s; repeat `repeat` uses seed
    /// `repeat + 1`, and no extra runtime values.
    pub fn new(
        experiment: &str,
        workload: &str,
        policy: PolicyKind,
        rate: f64,
        rate_label: &str,
        repeat: usize,
    ) -> Self {
        Self {
            experiment: experiment.into(),
            workload: workload.into(),
            policy,
            runtime: Vec::new(),
            rate,
            rate_label: rate_label.into(),
            seed: repeat as u64 + 1,
            repeat,
        }
    }

    /// The same run with these runtime values.
    pub fn with_runtime(mut self, runtime: Vec<(String, String)>) -> Self {
        self.runtime = runtime;
        self
    }
}

/// What a run measured. Times are emulated milliseconds (client wall time x time scale).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The spec.
    pub spec: RunSpec,
    /// Requests finished.
    pub requests: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Engines' prefix hit rate (hits / queries deltas).
    pub hit_rate: f64,
    /// Cached over prompt tokens from the clients' usage records.
    pub hit_rate_client: f64,
    /// Prompt tokens the engines computed (prefill, excluding cached).
    pub prefill_computed_tokens: f64,
    /// Client TTFT quantiles (p50, p95, p99), ms.
    pub ttft_ms: [f64; 3],
    /// Engines' mean TTFT, ms.
    pub engine_ttft_mean_ms: f64,
    /// Client end-to-end p50 and p95, ms.
    pub e2e_ms: [f64; 2],
    /// Requests per second (emulated).
    pub throughput_rps: f64,
    /// Generated tokens per second (emulated).
    pub output_tokens_per_s: f64,
    /// Requests per endpoint.
    pub per_endpoint: Vec<u64>,
    /// Load imbalance: max / mean of requests per endpoint.
    pub imbalance: f64,
    /// Preemptions.
    pub preemptions: f64,
    /// Wall time of the measured part, s.
    pub wall_s: f64,
    /// Client TTFTs, ms (for CDFs).
    pub ttfts: Vec<f64>,
    /// TTFT of requests that hit (cached > half the prompt) and of those that missed, ms.
    pub ttft_hit_miss_ms: [f64; 2],
    /// Per request: (sent ms, cached tokens / prompt tokens).
    pub hit_timeline: Vec<(f64, f64)>,
}

/// The q-quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl RunResult {
    /// A run's results from its client records, the engines' counters before and after, and the
    /// decisions per endpoint (the live runner and the simulator both build results here).
    pub fn new(
        spec: &RunSpec,
        records: &[RequestRecord],
        (before, after): (EngineCounters, EngineCounters),
        per_endpoint: Vec<u64>,
        wall_s: f64,
        scale: f64,
    ) -> RunResult {
        let ok: Vec<&RequestRecord> = records
            .iter()
            .filter(|r| r.status == 200 && r.error.is_none())
            .collect();
        let mut ttfts: Vec<f64> = ok
            .iter()
            .filter_map(|r| r.ttft_ms)
            .map(|t| t * scale)
            .collect();
        ttfts.sort_by(f64::total_cmp);
        let mut e2e: Vec<f64> = ok.iter().map(|r| r.e2e_ms * scale).collect();
        e2e.sort_by(f64::total_cmp);
        let (cached, prompt) = ok.iter().fold((0u64, 0u64), |(c, p), r| {
            (
                c + r.cached_tokens.unwrap_or(0),
                p + r.prompt_tokens.unwrap_or(0),
            )
        });
        let hit =
            |r: &&RequestRecord| r.cached_tokens.unwrap_or(0) * 2 > r.prompt_tokens.unwrap_or(1);
        let hits: Vec<f64> = ok
            .iter()
            .filter(|r| hit(r))
            .filter_map(|r| r.ttft_ms)
            .map(|t| t * scale)
            .collect();
        let misses: Vec<f64> = ok
            .iter()
            .filter(|r| !hit(r))
            .filter_map(|r| r.ttft_ms)
            .map(|t| t * scale)
            .collect();
        let span_s = {
            let first = ok.iter().map(|r| r.sent_ms).fold(f64::INFINITY, f64::min);
            let last = ok.iter().map(|r| r.sent_ms + r.e2e_ms).fold(0.0, f64::max);
            ((last - first) * scale / 1000.0).max(1e-9)
        };
        let output: u64 = ok.iter().map(|r| r.completion_tokens.unwrap_or(0)).sum();
        let n = per_endpoint.len().max(1) as f64;
        let total: u64 = per_endpoint.iter().sum();
        let imbalance = if total == 0 {
            1.0
        } else {
            *per_endpoint.iter().max().unwrap_or(&0) as f64 / (total as f64 / n)
        };
        let mut timeline: Vec<(f64, f64)> = ok
            .iter()
            .map(|r| {
                (
                    r.sent_ms * scale,
                    r.cached_tokens.unwrap_or(0) as f64
                        / r.prompt_tokens.unwrap_or(1).max(1) as f64,
                )
            })
            .collect();
        timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
        RunResult {
            spec: spec.clone(),
            requests: records.len(),
            failed: records.len() - ok.len(),
            hit_rate: (after.hits - before.hits) / (after.queries - before.queries).max(1.0),
            hit_rate_client: cached as f64 / prompt.max(1) as f64,
            prefill_computed_tokens: after.prefill_computed - before.prefill_computed,
            ttft_ms: [
                quantile(&ttfts, 0.5),
                quantile(&ttfts, 0.95),
                quantile(&ttfts, 0.99),
            ],
            engine_ttft_mean_ms: (after.ttft_sum - before.ttft_sum)
                / (after.ttft_count - before.ttft_count).max(1.0)
                * 1e3,
            e2e_ms: [quantile(&e2e, 0.5), quantile(&e2e, 0.95)],
            throughput_rps: ok.len() as f64 / span_s,
            output_tokens_per_s: output as f64 / span_s,
            per_endpoint,
            imbalance,
            preemptions: after.preemptions - before.preemptions,
            wall_s,
            ttfts,
            ttft_hit_miss_ms: [mean(&hits), mean(&misses)],
            hit_timeline: timeline,
        }
    }
}

/// Appends a run to `dir/runs.jsonl`.
pub fn save(dir: &Path, r: &RunResult) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("runs.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    writeln!(f, "{}", serde_json::to_string(r)?)?;
    Ok(path)
}

/// Reads every run of `dir/runs.jsonl`.
pub fn load(dir: &Path) -> anyhow::Result<Vec<RunResult>> {
    let text = std::fs::read_to_string(dir.join("runs.jsonl"))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
