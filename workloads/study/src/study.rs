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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvroute_core::policy::PolicyKind;
use kvroute_sidecar::scrape::{merge_buckets, parse_vllm, Page, ValueType};
use kvroute_traces::Session;
use serde::{Deserialize, Serialize};

use kvroute_harness::emulated::{EmulatedEngine, RunningSidecar};
use kvroute_harness::envoy_config::{Engine, EnvoySpec};
use kvroute_harness::peer::{Dynamo, Peer, Smg};
use kvroute_harness::stack::{filter_wasm, Envoy};
use kvroute_loadgen::engine_api::{metrics_page, served_model};
use kvroute_loadgen::replay::{replay, MemorySink, ReplayOptions, RequestRecord};

/// The runtime values that set `policy` and `values`, as one update.
fn runtime_update(policy: PolicyKind, values: &[(String, String)]) -> Vec<(&str, &str)> {
    std::iter::once(("kvroute.policy", policy.as_str()))
        .chain(values.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect()
}

/// A peer router running for one run.
enum PeerRouter {
    Smg(Smg),
    Dynamo(Dynamo),
}

impl PeerRouter {
    /// URL of `path` on the router.
    fn url(&self, path: &str) -> String {
        match self {
            Self::Smg(smg) => smg.url(path),
            Self::Dynamo(d) => d.url(path),
        }
    }

    /// Stops it.
    async fn stop(self) {
        match self {
            Self::Smg(smg) => smg.stop().await,
            Self::Dynamo(d) => d.stop().await,
        }
    }
}

/// The stack the runs go through.
#[derive(Debug)]
pub struct Lab {
    /// Engine base URLs, in endpoint order.
    pub engine_urls: Vec<String>,
    /// Envoy with kvroute.
    pub envoy: Envoy,
    /// Emulated time per wall time (1 for real engines): client-side times are multiplied by it.
    pub time_scale: f64,
    /// Where each run's per-request records go (`<dir>/<run id>.jsonl`); None keeps them in memory.
    pub records_dir: Option<PathBuf>,
    /// How often engine queue depths are sampled during a measured run (wall time).
    pub queue_sample_every: Duration,
    /// The `model` every request names (None: the workload's own; the emulator serves any).
    pub model: Option<String>,
    // Fields drop in order: the sidecar stops before the engines it polls.
    _sidecar: RunningSidecar,
    /// The emulated engines, in endpoint order (none for real engines).
    engines: Vec<EmulatedEngine>,
    client: reqwest::Client,
    epoch: u64,
}

impl Lab {
    /// `n` emulated engines with `profile`, `time_scale` times real time, the sidecar and Envoy.
    pub async fn emulated(n: usize, profile: &str, time_scale: f64) -> anyhow::Result<Lab> {
        let engines = EmulatedEngine::start_fleet(n, profile, time_scale).await?;
        let targets = engines
            .iter()
            .map(|e| (Engine::local(&e.name, e.addr.port()), e.url()))
            .collect();
        Self::assemble(targets, engines, time_scale, None).await
    }

    /// Real engines (vLLM, or anything that speaks its API and metrics) at `urls`
    /// (`http://host:port`), with the sidecar and Envoy started here. Times are real (scale 1).
    /// Requests carry `model` when given. Cold starts call each engine's `POST /reset_prefix_cache`
    /// (vLLM serves it with `VLLM_SERVER_DEV_MODE=1`); where it is missing the run still goes on,
    /// with a warning, from a warm cache.
    pub async fn remote(urls: &[String], model: Option<String>) -> anyhow::Result<Lab> {
        let mut targets = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let parsed =
                reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("engine URL {url}: {e}"))?;
            let host = parsed
                .host_str()
                .ok_or_else(|| anyhow::anyhow!("engine URL {url} has no host"))?
                .to_string();
            let port = parsed
                .port_or_known_default()
                .ok_or_else(|| anyhow::anyhow!("engine URL {url} has no port"))?;
            let name = format!("engine{i}");
            targets.push((
                Engine { name, host, port },
                url.trim_end_matches('/').to_string(),
            ));
        }
        Self::assemble(targets, Vec::new(), 1.0, model).await
    }

    /// The sidecar polling `targets` (Envoy endpoint, base URL) and Envoy routing to them.
    async fn assemble(
        targets: Vec<(Engine, String)>,
        engines: Vec<EmulatedEngine>,
        time_scale: f64,
        model: Option<String>,
    ) -> anyhow::Result<Lab> {
        let named: Vec<(String, String)> = targets
            .iter()
            .map(|(e, url)| (e.name.clone(), url.clone()))
            .collect();
        let sidecar =
            RunningSidecar::start_for(&named, Duration::from_millis(100), "127.0.0.1:0".parse()?)
                .await?;
        let spec_engines = targets.into_iter().map(|(e, _)| e).collect();
        let mut spec = EnvoySpec::new(spec_engines, filter_wasm()?.display().to_string());
        spec.set_sidecar(Engine::local("sidecar", sidecar.addr.port()));
        let envoy = Envoy::start(spec).await?;
        envoy
            .wait_stat("kvroute_state_stale", Duration::from_secs(10), |v| v == 0)
            .await?;
        Ok(Lab {
            engine_urls: named.into_iter().map(|(_, u)| u).collect(),
            envoy,
            time_scale,
            records_dir: None,
            queue_sample_every: Duration::from_millis(100),
            model,
            engines,
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
            let text = metrics_page(&self.client, url).await?;
            let page = Page::parse(&text).map_err(|e| anyhow::anyhow!("{url}/metrics: {e}"))?;
            let sum = |name: &str| page.sum(&[name]).unwrap_or(0.0);
            let hist = |name: &str, kind| page.hist(name, kind).unwrap_or(0.0);
            c.hits += sum("vllm:prefix_cache_hits_total");
            c.queries += sum("vllm:prefix_cache_queries_total");
            c.prompt_tokens += sum("vllm:prompt_tokens_total");
            c.prefill_computed += hist("vllm:request_prefill_kv_computed_tokens", ValueType::Sum);
            c.ttft_sum += hist("vllm:time_to_first_token_seconds", ValueType::Sum);
            c.ttft_count += hist("vllm:time_to_first_token_seconds", ValueType::Count);
            c.preemptions += sum("vllm:num_preemptions_total");
            merge_buckets(
                &mut c.ttft_buckets,
                page.buckets("vllm:time_to_first_token_seconds"),
            );
            merge_buckets(
                &mut c.idle_before_evict_buckets,
                page.buckets("vllm:kv_block_idle_before_evict_seconds"),
            );
        }
        Ok(c)
    }

    /// Each engine's KV cache, in tokens, as it reports it (`vllm:cache_config_info`'s
    /// `num_gpu_blocks x block_size`, what the sidecar sizes the directory by).
    pub async fn kv_capacity_tokens(&self) -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::with_capacity(self.engine_urls.len());
        for url in &self.engine_urls {
            let text = metrics_page(&self.client, url).await?;
            let sample = parse_vllm(&text).map_err(|e| anyhow::anyhow!("{url}/metrics: {e}"))?;
            out.push(sample.capacity_tokens.ok_or_else(|| {
                anyhow::anyhow!(
                    "{url}/metrics has no vllm:cache_config_info with num_gpu_blocks and \
                     block_size: the study's capacity bound needs each engine's KV capacity"
                )
            })?);
        }
        Ok(out)
    }

    /// Cold start under `policy` and runtime `values`: every engine's prefix cache reset, then one
    /// runtime update that forgets the router's directory (a new `kvroute.directory_epoch`) and sets
    /// the policy and values. Envoy applies one update as one snapshot and the singleton publishes
    /// the settings it polled before its gauges show them, so once the epoch gauge reads the new
    /// epoch every worker's next request sees all of it.
    pub async fn cold_start(
        &mut self,
        policy: PolicyKind,
        values: &[(String, String)],
    ) -> anyhow::Result<()> {
        for url in &self.engine_urls {
            let r = self
                .client
                .post(format!("{url}/reset_prefix_cache"))
                .send()
                .await?;
            if !r.status().is_success() {
                eprintln!(
                    "study: {url}/reset_prefix_cache answered {}; this run starts from the engine's warm cache",
                    r.status()
                );
            }
        }
        self.epoch += 1;
        let epoch = self.epoch.to_string();
        let mut all = runtime_update(policy, values);
        all.push(("kvroute.directory_epoch", epoch.as_str()));
        self.envoy.runtime_modify(&all).await?;
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
        self.envoy
            .runtime_modify(&runtime_update(policy, values))
            .await?;
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
        self.cold_start(spec.policy, &spec.runtime).await?;
        // A peer router routes by model, so its requests name the one the engines serve (the
        // emulator itself serves any name).
        let model = match (&spec.peer, &self.model) {
            (Some(_), None) => Some(self.served_model().await?),
            _ => self.model.clone(),
        };
        // A peer router is started for the run (its own state cold) and the clients go to it.
        let peer = match &spec.peer {
            Some(p) if p.router == "dynamo" => {
                if self.engines.is_empty() {
                    anyhow::bail!(
                        "the Dynamo peer needs the engines' KV events (emulated engines publish them)"
                    );
                }
                let engines: Vec<(String, String)> = self
                    .engines
                    .iter()
                    .map(|e| (e.url(), e.kv_events.clone()))
                    .collect();
                let served = model.clone().unwrap_or_default();
                Some(PeerRouter::Dynamo(
                    Dynamo::start(&p.policy, &engines, &served).await?,
                ))
            }
            Some(p) => Some(PeerRouter::Smg(
                Smg::start(&p.policy, &self.engine_urls).await?,
            )),
            None => None,
        };
        let url = match &peer {
            Some(p) => p.url("/v1/chat/completions"),
            None => self.envoy.url("/v1/chat/completions"),
        };
        let opts = ReplayOptions {
            urls: vec![url],
            model,
            max_in_flight: 256,
            timeout: Duration::from_secs(120),
            session_header: "x-session-id".into(),
            // Dynamo's frontend stalls a streamed response on a kept-alive connection for the
            // client's delayed ACK (docs/study.md, "Dynamo"): a connection per request to it.
            fresh_connections: matches!(peer, Some(PeerRouter::Dynamo(_))),
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
        let decisions_before = self.per_endpoint(peer.is_some()).await?;
        let stats_before = self.envoy.stats().await?;
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let lab = QueueProbe {
                engine_urls: self.engine_urls.clone(),
                client: self.client.clone(),
            };
            let (sampling, every) = (sampling.clone(), self.queue_sample_every);
            tokio::spawn(async move {
                let mut samples: Vec<Vec<Option<f64>>> = Vec::new();
                while sampling.load(Ordering::Relaxed) {
                    samples.push(lab.depths().await);
                    tokio::time::sleep(every).await;
                }
                samples
            })
        };
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
        sampling.store(false, Ordering::Relaxed);
        let samples = sampler.await.unwrap_or_default();
        let after = self.engine_counters().await?;
        let decisions_after = self.per_endpoint(peer.is_some()).await?;
        if let Some(p) = peer {
            p.stop().await;
        }
        let stats_after = self.envoy.stats().await?;
        let text = sink.text();
        let requests_file = match &self.records_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(format!("{}.jsonl", spec.id()));
                std::fs::write(&path, &text)?;
                Some(path.display().to_string())
            }
            None => None,
        };
        let records: Vec<RequestRecord> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let per_endpoint: Vec<u64> = decisions_after
            .iter()
            .zip(&decisions_before)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let mut result = RunResult::new(
            spec,
            &records,
            (before, after),
            per_endpoint,
            summary.wall_s,
            self.time_scale,
        );
        result.set_queue_depths(
            &samples
                .iter()
                .map(|s| s.iter().map(|d| d.unwrap_or(f64::NAN)).collect())
                .collect::<Vec<Vec<f64>>>(),
        );
        result.envoy_stats = stats_after
            .iter()
            .filter(|(k, _)| !k.starts_with("kvroute_setting"))
            .map(|(k, v)| {
                let b = stats_before.get(k).copied().unwrap_or(0);
                (k.clone(), *v as f64 - b as f64)
            })
            .filter(|(_, d)| *d != 0.0)
            .collect();
        result.requests_file = requests_file;
        Ok(result)
    }

    /// The model the first engine serves (`/v1/models`).
    async fn served_model(&self) -> anyhow::Result<String> {
        let url = self.engine_urls.first().map_or("", String::as_str);
        served_model(&self.client, url).await
    }

    /// Requests per endpoint so far: kvroute's decisions (Envoy's stats), or for a peer router,
    /// which reports no serving endpoint, the requests each engine finished
    /// (`vllm:request_success_total`).
    async fn per_endpoint(&self, peer: bool) -> anyhow::Result<Vec<u64>> {
        if !peer {
            return self.decisions().await;
        }
        let mut out = Vec::new();
        for url in &self.engine_urls {
            let page = metrics_page(&self.client, url).await?;
            let done: f64 = page
                .lines()
                .filter(|l| l.starts_with("vllm:request_success_total"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum();
            out.push(done as u64);
        }
        Ok(out)
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

/// The engine URLs and an HTTP client, for sampling queue depths from a task of its own.
struct QueueProbe {
    engine_urls: Vec<String>,
    client: reqwest::Client,
}

impl QueueProbe {
    async fn depths(&self) -> Vec<Option<f64>> {
        let mut out = Vec::new();
        for url in &self.engine_urls {
            let page = metrics_page(&self.client, url).await.ok();
            out.push(page.and_then(|p| queue_depth(&p)));
        }
        out
    }
}

/// Waiting + running requests in one engine's `/metrics` page (None: not a vLLM page).
pub fn queue_depth(page: &str) -> Option<f64> {
    parse_vllm(page).ok().map(|s| s.waiting + s.running)
}

pub use kvroute_sim::EngineCounters;

/// One measured run's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Experiment it belongs to.
    pub experiment: String,
    /// Workload name.
    pub workload: String,
    /// kvroute's policy (when `peer` is set, a peer router routes the run and this is unused).
    pub policy: PolicyKind,
    /// A peer router that routes this run instead of kvroute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
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
    /// Seed of the simulated router's random draws where it is not `seed` (the simulated
    /// validation runs every live run under several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_seed: Option<u64>,
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
            peer: None,
            runtime: Vec::new(),
            rate,
            rate_label: rate_label.into(),
            seed: repeat as u64 + 1,
            repeat,
            router_seed: None,
        }
    }

    /// A file-name-safe identity of the run: experiment, workload, policy, rate label, runtime
    /// values and repeat.
    pub fn id(&self) -> String {
        let mut id = format!(
            "{}-{}-{}-{}",
            self.experiment,
            self.workload,
            self.label(),
            self.rate_label
        );
        for (k, v) in &self.runtime {
            id.push_str(&format!("-{}={v}", k.trim_start_matches("kvroute.")));
        }
        id.push_str(&format!("-r{}", self.repeat));
        id.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.=".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// What routed the run, as its rows name it: kvroute's policy, or the peer (router, version
    /// and policy).
    pub fn label(&self) -> String {
        match &self.peer {
            Some(p) => p.label(),
            None => self.policy.as_str().to_string(),
        }
    }

    /// The same run routed by `peer`.
    pub fn with_peer(mut self, peer: Peer) -> Self {
        self.peer = Some(peer);
        self
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
    /// Engines' TTFT p50 and p95 from their histogram's bucket deltas, ms (NaN where unknown: the
    /// simulator has no engine histogram).
    #[serde(default = "nan2", deserialize_with = "nan_pair")]
    pub engine_ttft_ms: [f64; 2],
    /// How long the engines' KV blocks stayed cached after their last use, median over the
    /// sampled blocks evicted during the run, s (vLLM's `kv_block_idle_before_evict_seconds`,
    /// exported with `--kv-cache-metrics`); None where the engines do not report it.
    #[serde(default)]
    pub kv_idle_before_evict_s: Option<f64>,
    /// Mean queue depth (waiting + running) per engine over the run's samples (NaN: no answer).
    #[serde(default, deserialize_with = "nan_vec")]
    pub queue_mean: Vec<f64>,
    /// Largest queue depth of any engine in any sample.
    #[serde(default)]
    pub queue_max: f64,
    /// Queue-depth samples taken.
    #[serde(default)]
    pub queue_samples: usize,
    /// Changes of Envoy's kvroute counters over the measured part (live runs).
    #[serde(default)]
    pub envoy_stats: std::collections::BTreeMap<String, f64>,
    /// The run's per-request records (JSON lines), when written.
    #[serde(default)]
    pub requests_file: Option<String>,
    /// The client's send delay (sent minus meant to send), ms: quantiles at 0, 5, ..., 100%
    /// (live runs; empty where the records do not say when they were meant to be sent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub send_delay_ms: Vec<f64>,
}

/// Quantiles of the send delay kept per run: 0, 5, ..., 100%.
pub const SEND_DELAY_QUANTILES: usize = 21;

/// The experiment name of a live validation run set aside for a host stall (its client sent a
/// turn later than the plan's `validation_max_send_delay_ms`).
pub const VALIDATION_STALLED: &str = "val-live-stalled";

fn nan2() -> [f64; 2] {
    [f64::NAN; 2]
}

/// JSON has no NaN: serde_json writes it as null; these read null back as NaN.
fn nan_vec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let v: Vec<Option<f64>> = Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

fn nan_pair<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[f64; 2], D::Error> {
    let v = nan_vec(d)?;
    Ok([
        v.first().copied().unwrap_or(f64::NAN),
        v.get(1).copied().unwrap_or(f64::NAN),
    ])
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
    /// The latest send of the run, ms after it was due (None where the records do not say).
    pub fn max_send_delay_ms(&self) -> Option<f64> {
        self.send_delay_ms.last().copied()
    }

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
        let mut delays: Vec<f64> = records
            .iter()
            .filter_map(|r| r.scheduled_ms.map(|s| (r.sent_ms - s).max(0.0) * scale))
            .collect();
        delays.sort_by(f64::total_cmp);
        let send_delay_ms = if delays.is_empty() {
            Vec::new()
        } else {
            (0..SEND_DELAY_QUANTILES)
                .map(|i| quantile(&delays, i as f64 / (SEND_DELAY_QUANTILES - 1) as f64))
                .collect()
        };
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
            engine_ttft_ms: [
                after.ttft_quantile_ms(&before, 0.5),
                after.ttft_quantile_ms(&before, 0.95),
            ],
            kv_idle_before_evict_s: after.idle_before_evict_quantile_s(&before, 0.5),
            queue_mean: Vec::new(),
            queue_max: 0.0,
            queue_samples: 0,
            envoy_stats: std::collections::BTreeMap::new(),
            requests_file: None,
            send_delay_ms,
        }
    }

    /// Records queue-depth samples: one row per sample, one column per engine (NaN: no answer).
    pub fn set_queue_depths(&mut self, samples: &[Vec<f64>]) {
        let n = samples.iter().map(Vec::len).max().unwrap_or(0);
        self.queue_mean = (0..n)
            .map(|e| {
                let v: Vec<f64> = samples
                    .iter()
                    .filter_map(|s| s.get(e).copied())
                    .filter(|x| x.is_finite())
                    .collect();
                mean(&v)
            })
            .collect();
        self.queue_max = samples
            .iter()
            .flatten()
            .copied()
            .filter(|x| x.is_finite())
            .fold(0.0, f64::max);
        self.queue_samples = samples.len();
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn queue_depth_reads_waiting_and_running() {
        let page = "# HELP x\nvllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2.0\n\
                    vllm:num_requests_waiting_by_reason{reason=\"capacity\"} 9.0\n\
                    vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.5\n";
        // `_by_reason` shares the prefix; only exact names count.
        assert_eq!(queue_depth(page), Some(5.0));
        assert_eq!(queue_depth("not a metrics page {"), None);
    }
}
