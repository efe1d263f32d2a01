//! vLLM V1's metric families (names, types, labels `model_name` and `engine`, buckets), as
//! `shared/reference/vllm_0.33_metric_families.json` and the sample page list them, rendered in
//! the Prometheus text format.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, Opts, Registry, TextEncoder,
};

use crate::engine::{EngineConfig, EngineStats, Observation};

/// `request_tokens_buckets`: vLLM's `build_1_2_5_buckets(max_model_len)`, 1, 2, 5, 10, 20, ... up
/// to the context length (1 to 100,000 for a 131,072-token model, as the sample page shows).
pub fn token_buckets(max_model_len: u32) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1u64;
    loop {
        for m in [1u64, 2, 5] {
            let v = m * scale;
            if v > u64::from(max_model_len) {
                return out;
            }
            out.push(v as f64);
        }
        scale *= 10;
    }
}
/// `request_params_n`
pub const N_BUCKETS: [f64; 5] = [1.0, 2.0, 5.0, 10.0, 20.0];
/// `kv_cache_residency_buckets`, seconds.
pub const RESIDENCY_BUCKETS: [f64; 21] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1200.0, 1800.0,
];
/// `num_requests_waiting_by_reason`'s reasons: waiting for KV blocks or the step's token budget
/// (`capacity`, every waiting request here), or for something else first, such as KV from a
/// remote engine (`deferred`, none here).
const WAITING_REASONS: [&str; 2] = ["capacity", "deferred"];
/// `prompt_tokens_by_source`'s sources: computed here, hit in the local prefix cache, or moved
/// from another engine by a KV connector (none here).
const PROMPT_SOURCES: [&str; 3] = ["local_compute", "local_cache_hit", "external_kv_transfer"];
/// `time_to_first_token_buckets`
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// `inter_token_latency_buckets`
pub const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// `request_latency_buckets`
pub const LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// `iteration_tokens_buckets` (vLLM: powers of two up to the batch token budget; fixed here).
pub const ITERATION_BUCKETS: [f64; 14] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32768.0,
];

const LABELS: [&str; 2] = ["model_name", "engine"];

/// The metric families of one engine.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    labels: [String; 2],
    running: GaugeVec,
    waiting: GaugeVec,
    kv_usage: GaugeVec,
    queries: CounterVec,
    hits: CounterVec,
    prompt_tokens: CounterVec,
    generation_tokens: CounterVec,
    preemptions: CounterVec,
    success: CounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    queue_time: HistogramVec,
    prefill_kv: HistogramVec,
    prompt_hist: HistogramVec,
    generation_hist: HistogramVec,
    iteration: HistogramVec,
    prompt_cached: CounterVec,
    prefill_time: HistogramVec,
    decode_time: HistogramVec,
    inference_time: HistogramVec,
    tpot: HistogramVec,
    waiting_by_reason: GaugeVec,
    prompt_by_source: CounterVec,
    max_generation: HistogramVec,
    params_n: HistogramVec,
    params_max_tokens: HistogramVec,
    /// Lifetime, idle before eviction and reuse gap of sampled KV blocks, with
    /// `--kv-cache-metrics` ([`Metrics::with_kv_cache_metrics`]).
    residency: Option<[HistogramVec; 3]>,
    last: std::sync::Mutex<EngineStats>,
}

fn gauge(r: &Registry, name: &str, help: &str, extra: &[&str]) -> prometheus::Result<GaugeVec> {
    let mut labels = LABELS.to_vec();
    labels.extend_from_slice(extra);
    let g = GaugeVec::new(Opts::new(name, help), &labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(r: &Registry, name: &str, help: &str, extra: &[&str]) -> prometheus::Result<CounterVec> {
    let mut labels = LABELS.to_vec();
    labels.extend_from_slice(extra);
    let c = CounterVec::new(Opts::new(name, help), &labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        &LABELS,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Registers every family for an engine serving `model_name`.
    pub fn new(
        model_name: &str,
        cfg: &EngineConfig,
        gpu_memory_utilization: f64,
    ) -> prometheus::Result<Self> {
        let r = Registry::new();
        let tokens = token_buckets(cfg.max_model_len);
        let m = Self {
            running: gauge(
                &r,
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                &[],
            )?,
            waiting: gauge(
                &r,
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                &[],
            )?,
            kv_usage: gauge(
                &r,
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                &[],
            )?,
            queries: counter(
                &r,
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                &[],
            )?,
            hits: counter(
                &r,
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                &[],
            )?,
            prompt_tokens: counter(
                &r,
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
                &[],
            )?,
            generation_tokens: counter(
                &r,
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                &[],
            )?,
            preemptions: counter(
                &r,
                "vllm:num_preemptions_total",
                "Cumulative number of preemption from the engine.",
                &[],
            )?,
            success: counter(
                &r,
                "vllm:request_success_total",
                "Count of successfully processed requests.",
                &["finished_reason"],
            )?,
            ttft: histogram(
                &r,
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &TTFT_BUCKETS,
            )?,
            itl: histogram(
                &r,
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &ITL_BUCKETS,
            )?,
            e2e: histogram(
                &r,
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &LATENCY_BUCKETS,
            )?,
            queue_time: histogram(
                &r,
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                &LATENCY_BUCKETS,
            )?,
            prefill_kv: histogram(
                &r,
                "vllm:request_prefill_kv_computed_tokens",
                "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
                &tokens,
            )?,
            prompt_hist: histogram(
                &r,
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                &tokens,
            )?,
            generation_hist: histogram(
                &r,
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                &tokens,
            )?,
            iteration: histogram(
                &r,
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                &ITERATION_BUCKETS,
            )?,
            prompt_cached: counter(
                &r,
                "vllm:prompt_tokens_cached_total",
                "Number of cached prompt tokens (local + external).",
                &[],
            )?,
            prefill_time: histogram(
                &r,
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                &LATENCY_BUCKETS,
            )?,
            decode_time: histogram(
                &r,
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                &LATENCY_BUCKETS,
            )?,
            inference_time: histogram(
                &r,
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                &LATENCY_BUCKETS,
            )?,
            tpot: histogram(
                &r,
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                &ITL_BUCKETS,
            )?,
            waiting_by_reason: gauge(
                &r,
                "vllm:num_requests_waiting_by_reason",
                "Number of requests waiting, by the reason they wait.",
                &["reason"],
            )?,
            prompt_by_source: counter(
                &r,
                "vllm:prompt_tokens_by_source_total",
                "Number of prompt tokens by source.",
                &["source"],
            )?,
            max_generation: histogram(
                &r,
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                &tokens,
            )?,
            params_n: histogram(
                &r,
                "vllm:request_params_n",
                "Histogram of the n request parameter.",
                &N_BUCKETS,
            )?,
            params_max_tokens: histogram(
                &r,
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                &tokens,
            )?,
            residency: None,
            labels: [model_name.to_string(), "0".to_string()],
            last: std::sync::Mutex::new(EngineStats::default()),
            registry: r,
        };
        let info = GaugeVec::new(
            Opts::new(
                "vllm:cache_config_info",
                "Information of the LLMEngine CacheConfig",
            ),
            &[
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "gpu_memory_utilization",
                "num_gpu_blocks",
                "engine",
                "model_name",
            ],
        )?;
        m.registry.register(Box::new(info.clone()))?;
        let (bs, util, blocks) = (
            cfg.block_size.to_string(),
            gpu_memory_utilization.to_string(),
            cfg.num_gpu_blocks.to_string(),
        );
        let caching = if cfg.enable_prefix_caching {
            "True"
        } else {
            "False"
        };
        info.with_label_values(&[
            bs.as_str(),
            "auto",
            caching,
            util.as_str(),
            blocks.as_str(),
            "0",
            model_name,
        ])
        .set(1.0);
        // Labelled series exist from the start, at zero, as in vLLM.
        for reason in ["stop", "length", "abort"] {
            m.success
                .with_label_values(&[&m.labels[0], &m.labels[1], reason])
                .inc_by(0.0);
        }
        let l = m.l();
        for g in [&m.running, &m.waiting, &m.kv_usage] {
            g.with_label_values(&l).set(0.0);
        }
        for reason in WAITING_REASONS {
            m.waiting_by_reason
                .with_label_values(&[l[0], l[1], reason])
                .set(0.0);
        }
        for source in PROMPT_SOURCES {
            m.prompt_by_source
                .with_label_values(&[l[0], l[1], source])
                .inc_by(0.0);
        }
        for c in [
            &m.queries,
            &m.hits,
            &m.prompt_tokens,
            &m.generation_tokens,
            &m.preemptions,
            &m.prompt_cached,
        ] {
            c.with_label_values(&l).inc_by(0.0);
        }
        for h in [
            &m.ttft,
            &m.itl,
            &m.e2e,
            &m.queue_time,
            &m.prefill_kv,
            &m.prompt_hist,
            &m.generation_hist,
            &m.iteration,
            &m.prefill_time,
            &m.decode_time,
            &m.inference_time,
            &m.tpot,
            &m.max_generation,
            &m.params_n,
            &m.params_max_tokens,
        ] {
            let _ = h.with_label_values(&l);
        }
        Ok(m)
    }

    /// Adds vLLM's KV cache residency families (`--kv-cache-metrics`): the engine must follow
    /// block residency ([`crate::engine::Engine::track_block_residency`]) for them to count.
    pub fn with_kv_cache_metrics(mut self) -> prometheus::Result<Self> {
        let h = |name: &str, help: &str| {
            let h = histogram(&self.registry, name, help, &RESIDENCY_BUCKETS)?;
            let _ = h.with_label_values(&self.l());
            Ok::<_, prometheus::Error>(h)
        };
        let sampled = "Sampled metrics (controlled by --kv-cache-metrics-sample).";
        let families = [
            h(
                "vllm:kv_block_lifetime_seconds",
                &format!(
                    "Histogram of KV cache block lifetime from allocation to eviction. {sampled}"
                ),
            )?,
            h(
                "vllm:kv_block_idle_before_evict_seconds",
                &format!("Histogram of idle time before KV cache block eviction. {sampled}"),
            )?,
            h(
                "vllm:kv_block_reuse_gap_seconds",
                &format!(
                    "Histogram of time gaps between consecutive KV cache block accesses. Only \
                     the most recent accesses are recorded (ring buffer). {sampled}"
                ),
            )?,
        ];
        self.residency = Some(families);
        Ok(self)
    }

    fn l(&self) -> [&str; 2] {
        [&self.labels[0], &self.labels[1]]
    }

    /// Applies a step's observations and the engine's counters and gauges.
    pub fn update(&self, stats: &EngineStats, observations: &[Observation]) {
        let l = self.l();
        for o in observations {
            match *o {
                Observation::Ttft(s) => self.ttft.with_label_values(&l).observe(s),
                Observation::Itl(s) => self.itl.with_label_values(&l).observe(s),
                Observation::E2e(s) => self.e2e.with_label_values(&l).observe(s),
                Observation::QueueTime(s) => self.queue_time.with_label_values(&l).observe(s),
                Observation::PrefillKvComputed(n) => {
                    self.prefill_kv.with_label_values(&l).observe(f64::from(n))
                }
                Observation::PromptTokens(n) => {
                    self.prompt_hist.with_label_values(&l).observe(f64::from(n))
                }
                Observation::GenerationTokens(n) => self
                    .generation_hist
                    .with_label_values(&l)
                    .observe(f64::from(n)),
                Observation::IterationTokens(n) => {
                    self.iteration.with_label_values(&l).observe(f64::from(n))
                }
                Observation::PrefillTime(s) => self.prefill_time.with_label_values(&l).observe(s),
                Observation::DecodeTime(s) => self.decode_time.with_label_values(&l).observe(s),
                Observation::InferenceTime(s) => {
                    self.inference_time.with_label_values(&l).observe(s)
                }
                Observation::TimePerOutputToken(s) => self.tpot.with_label_values(&l).observe(s),
                // vLLM's `request_num_preemptions` buckets are not in the reference file; the
                // total is `num_preemptions_total`.
                Observation::RequestPreemptions(_) => {}
                Observation::MaxGenerationTokens(n) => self
                    .max_generation
                    .with_label_values(&l)
                    .observe(f64::from(n)),
                Observation::ParamsN(n) => {
                    self.params_n.with_label_values(&l).observe(f64::from(n))
                }
                Observation::ParamsMaxTokens(n) => self
                    .params_max_tokens
                    .with_label_values(&l)
                    .observe(f64::from(n)),
                Observation::BlockLifetime(s) => self.residency(0, s),
                Observation::BlockIdleBeforeEvict(s) => self.residency(1, s),
                Observation::BlockReuseGap(s) => self.residency(2, s),
            }
        }
        self.running.with_label_values(&l).set(stats.running as f64);
        self.waiting.with_label_values(&l).set(stats.waiting as f64);
        self.waiting_by_reason
            .with_label_values(&[l[0], l[1], WAITING_REASONS[0]])
            .set(stats.waiting as f64);
        self.kv_usage.with_label_values(&l).set(stats.kv_usage);
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let d = |new: u64, old: u64| new.saturating_sub(old) as f64;
        self.queries
            .with_label_values(&l)
            .inc_by(d(stats.prefix_cache_queries, last.prefix_cache_queries));
        self.hits
            .with_label_values(&l)
            .inc_by(d(stats.prefix_cache_hits, last.prefix_cache_hits));
        self.prompt_tokens
            .with_label_values(&l)
            .inc_by(d(stats.prompt_tokens, last.prompt_tokens));
        self.generation_tokens
            .with_label_values(&l)
            .inc_by(d(stats.generation_tokens, last.generation_tokens));
        self.preemptions
            .with_label_values(&l)
            .inc_by(d(stats.preemptions, last.preemptions));
        self.prompt_cached
            .with_label_values(&l)
            .inc_by(d(stats.prompt_tokens_cached, last.prompt_tokens_cached));
        // Every cached prompt token here is a local hit: `prompt_tokens_cached_total` is the
        // local_cache_hit source, and the rest of `prompt_tokens_total` was computed.
        let hit = d(stats.prompt_tokens_cached, last.prompt_tokens_cached);
        self.prompt_by_source
            .with_label_values(&[l[0], l[1], PROMPT_SOURCES[1]])
            .inc_by(hit);
        self.prompt_by_source
            .with_label_values(&[l[0], l[1], PROMPT_SOURCES[0]])
            .inc_by((d(stats.prompt_tokens, last.prompt_tokens) - hit).max(0.0));
        for (i, reason) in ["stop", "length", "abort"].iter().enumerate() {
            let (new, old) = (
                stats.finished.get(i).copied().unwrap_or(0),
                last.finished.get(i).copied().unwrap_or(0),
            );
            self.success
                .with_label_values(&[l[0], l[1], reason])
                .inc_by(d(new, old));
        }
        *last = stats.clone();
    }

    /// Observes `seconds` in residency family `i` (lifetime, idle before eviction, reuse gap),
    /// where those families are exported.
    fn residency(&self, i: usize, seconds: f64) {
        if let Some(h) = self.residency.as_ref().and_then(|r| r.get(i)) {
            h.with_label_values(&self.l()).observe(seconds);
        }
    }

    /// The `/metrics` page.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;
    use crate::profile::seed_rig;

    /// A fresh engine exports every family, gauges at 0, as vLLM does from startup.
    #[test]
    fn fresh_page_has_every_gauge() {
        let cfg = EngineConfig {
            model: "m".into(),
            block_size: 16,
            num_gpu_blocks: 711,
            max_num_seqs: 8,
            max_num_batched_tokens: 512,
            max_model_len: 4096,
            enable_prefix_caching: true,
            latency: seed_rig().latency,
            gpu_share: 1.0,
        };
        let page = Metrics::new("m", &cfg, 0.45).unwrap().render();
        for name in [
            "vllm:num_requests_running{",
            "vllm:num_requests_waiting{",
            "vllm:kv_cache_usage_perc{",
            "vllm:prefix_cache_hits_total{",
        ] {
            assert!(
                page.lines()
                    .any(|l| l.starts_with(name) && l.ends_with(" 0")),
                "{name} missing from a fresh page"
            );
        }
    }
}
