//! Simulated runs as study results: the simulator's output turned into the replayer's records and
//! the runner's [`RunResult`], so the same report and figures come out of a simulated run.

use kvroute_sim::{prepare, simulate, PreparedSession, SimConfig, SimOutput, SimRecord};
use kvroute_traces::Session;

use crate::search::{another_sample, verdict, RateSearch};
use crate::study::{EngineCounters, RunResult, RunSpec};
use kvroute_core::policy::PolicyKind;
use kvroute_loadgen::replay::RequestRecord;

/// The client records of a simulated run, as the replayer writes them.
pub fn records(out: &SimOutput, work: &[PreparedSession]) -> Vec<RequestRecord> {
    let ms = |us: u64| us as f64 / 1000.0;
    out.records
        .iter()
        .map(|r| RequestRecord {
            session: work
                .get(r.session as usize)
                .map(|s| s.id.clone())
                .unwrap_or_default(),
            turn: r.turn as usize,
            sent_ms: ms(r.sent_us),
            sent_unix_ms: r.sent_us / 1000,
            scheduled_ms: None,
            status: if r.error.is_none() { 200 } else { 400 },
            ttft_ms: r.ttft_us.map(ms),
            itl_ms: r.itl_us.iter().map(|u| ms(*u)).collect(),
            e2e_ms: ms(r.e2e_us),
            prompt_tokens: Some(u64::from(r.prompt_tokens)),
            completion_tokens: Some(u64::from(r.completion_tokens)),
            cached_tokens: Some(u64::from(r.cached_tokens)),
            endpoint: Some(format!("engine{}", r.endpoint)),
            error: r.error.clone(),
        })
        .collect()
}

/// The study result of a simulated run.
pub fn result(spec: &RunSpec, out: &SimOutput, work: &[PreparedSession], wall_s: f64) -> RunResult {
    let mut r = RunResult::new(
        spec,
        &records(out, work),
        (EngineCounters::default(), out.counters.clone()),
        out.per_endpoint.clone(),
        wall_s,
        1.0,
    );
    let samples: Vec<Vec<f64>> = out
        .queue_samples
        .iter()
        .map(|(_, q)| q.iter().map(|x| f64::from(*x)).collect())
        .collect();
    r.set_queue_depths(&samples);
    let mut idle: Vec<f64> = out.block_residency.iter().map(|(_, i)| *i).collect();
    idle.sort_by(f64::total_cmp);
    r.kv_idle_before_evict_s = idle.get(idle.len() / 2).copied();
    r
}

/// The simulated knee: the highest ShareGPT session rate per engine at which `round_robin` keeps
/// P95 TTFT within `slo_ms` on `base`'s fleet (the study's N = 2), doubling from 0.125/s to the
/// first rate over the objective, then four bisection steps between the last rate within it and
/// that one (the knee to about 6%). As the live search, a close call takes a second seed and the
/// mean decides. `sessions_at(rate, seed)` makes a probe's sessions; every probe's result goes to
/// `keep`.
pub fn knee(
    base: &SimConfig,
    sessions_at: impl Fn(f64, u64) -> anyhow::Result<Vec<Session>>,
    slo_ms: f64,
    mut keep: impl FnMut(RunResult) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let mut search = RateSearch::new(0.125, 12, 4);
    while let Some(rate) = search.next() {
        let mut samples: Vec<(f64, usize)> = Vec::new();
        for rep in 0..2 {
            let spec = RunSpec::new(
                "sim-search",
                "sharegpt",
                PolicyKind::RoundRobin,
                rate * base.filter.endpoints.len() as f64,
                &format!("{rate:.3}/s/engine"),
                rep,
            );
            let work = prepare_for(base, &sessions_at(rate, rep as u64 + 1)?);
            let r = run(&spec, base, &work)?;
            samples.push((r.ttft_ms[1], r.failed));
            keep(r)?;
            if !another_sample(&samples, slo_ms) {
                break;
            }
        }
        search.record(verdict(&samples, slo_ms));
    }
    Ok(search.knee().unwrap_or(0.125))
}

/// Runs `spec` in the simulator: `base` with the spec's policy and runtime values applied.
pub fn run(
    spec: &RunSpec,
    base: &SimConfig,
    work: &[PreparedSession],
) -> anyhow::Result<RunResult> {
    Ok(run_with_output(spec, base, work)?.0)
}

/// Every spec of `specs` run on `base` and `work`, on every core, the results in `specs`' order.
/// Each run is deterministic, so the results are those of running them one after another (only
/// each run's `wall_s`, the time it took, depends on what ran beside it).
pub fn run_each(
    specs: &[RunSpec],
    base: &SimConfig,
    work: &[PreparedSession],
) -> anyhow::Result<Vec<RunResult>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(specs.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<anyhow::Result<RunResult>>> = (0..specs.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, anyhow::Result<RunResult>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(spec) = specs.get(i) else {
                            break;
                        };
                        mine.push((i, run(spec, base, work)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for (i, r) in done.into_iter().flatten() {
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(r);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| Err(anyhow::anyhow!("simulated run {i} did not finish"))))
        .collect()
}

/// [`run`], with the simulator's own output (its per-request records).
pub fn run_with_output(
    spec: &RunSpec,
    base: &SimConfig,
    work: &[PreparedSession],
) -> anyhow::Result<(RunResult, SimOutput)> {
    let cfg = configured(spec, base)?;
    let t = std::time::Instant::now();
    let out = simulate(&cfg, work);
    Ok((result(spec, &out, work, t.elapsed().as_secs_f64()), out))
}

/// A class of a run's requests: how many, and their cached and prompt tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Requests.
    pub requests: usize,
    /// Prompt tokens the engines had cached.
    pub cached: u64,
    /// Prompt tokens.
    pub prompt: u64,
}

impl Tokens {
    fn add(&mut self, r: &SimRecord) {
        self.requests += 1;
        self.cached += u64::from(r.cached_tokens);
        self.prompt += u64::from(r.prompt_tokens);
    }

    /// Cached share of the prompt tokens (0 with none).
    pub fn hit(&self) -> f64 {
        self.cached as f64 / self.prompt.max(1) as f64
    }
}

impl std::ops::AddAssign for Tokens {
    fn add_assign(&mut self, o: Self) {
        self.requests += o.requests;
        self.cached += o.cached;
        self.prompt += o.prompt;
    }
}

/// Where a run's hits came from: requests of one-request sessions (a RAG question, a trace's
/// request), the first requests of longer sessions, and the follow-ups (a session's requests after
/// its first), split by whether they went to the endpoint of the session's previous request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moves {
    /// Requests of sessions with one request.
    pub single: Tokens,
    /// First requests of sessions with more than one.
    pub opening: Tokens,
    /// Follow-ups sent to another endpoint than the session's previous request.
    pub moved: Tokens,
    /// Follow-ups sent to the same endpoint.
    pub stayed: Tokens,
}

impl Moves {
    /// Follow-ups.
    pub fn follow_ups(&self) -> usize {
        self.moved.requests + self.stayed.requests
    }
}

impl std::ops::AddAssign for Moves {
    fn add_assign(&mut self, o: Self) {
        self.single += o.single;
        self.opening += o.opening;
        self.moved += o.moved;
        self.stayed += o.stayed;
    }
}

/// The [`Moves`] of a simulated run.
pub fn moves(out: &SimOutput) -> Moves {
    moves_of(&out.records)
}

/// The [`Moves`] of a run's records (failed requests left out).
pub fn moves_of(records: &[SimRecord]) -> Moves {
    let mut turns: Vec<&SimRecord> = records.iter().filter(|r| r.error.is_none()).collect();
    turns.sort_by_key(|r| (r.session, r.turn));
    let mut m = Moves::default();
    for (i, r) in turns.iter().enumerate() {
        let prev = i.checked_sub(1).and_then(|j| turns.get(j));
        let next = turns.get(i + 1);
        match prev.filter(|p| p.session == r.session) {
            Some(p) if p.endpoint == r.endpoint => m.stayed.add(r),
            Some(_) => m.moved.add(r),
            None if next.is_some_and(|n| n.session == r.session) => m.opening.add(r),
            None => m.single.add(r),
        }
    }
    m
}

/// Prepares sessions for `base`'s filter on every core.
pub fn prepare_for(base: &SimConfig, sessions: &[Session]) -> Vec<PreparedSession> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    prepare(sessions, &base.filter, threads)
}

fn configured(spec: &RunSpec, base: &SimConfig) -> anyhow::Result<SimConfig> {
    let mut cfg = base.clone();
    let (settings, errors) = base.settings.with_runtime(
        std::iter::once(("kvroute.policy", spec.policy.as_str()))
            .chain(spec.runtime.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
    );
    if let Some(e) = errors.first() {
        anyhow::bail!("run {}: {}: {}", spec.experiment, e.field, e.message);
    }
    cfg.settings = settings;
    cfg.seed = spec.router_seed.unwrap_or(spec.seed);
    Ok(cfg)
}

/// The engine configuration `vllm serve` would start with on a built-in profile or profile file.
pub fn engine_config(profile: &str) -> anyhow::Result<kvroute_emulator::engine::EngineConfig> {
    engine_config_at(profile, None)
}

/// [`engine_config`] with the KV capacity vLLM computes at `gpu_memory_utilization` (None: the
/// profile's own).
pub fn engine_config_at(
    profile: &str,
    gpu_memory_utilization: Option<f64>,
) -> anyhow::Result<kvroute_emulator::engine::EngineConfig> {
    let p = kvroute_emulator::profile::Profile::load(profile).map_err(anyhow::Error::msg)?;
    let mut cfg = kvroute_emulator::engine::EngineConfig::vllm_defaults(&p);
    if let Some(u) = gpu_memory_utilization {
        cfg.num_gpu_blocks = p
            .kv_blocks_at(u, cfg.block_size)
            .map_err(anyhow::Error::msg)?;
    }
    Ok(cfg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn memory_utilization_sets_the_kv_capacity_as_vllm_computes_it() {
        let seed = engine_config("rtx5080-llama3.2-3b").unwrap();
        // The seed rig's 0.45: (16 GiB x 0.45 - 6,425,499,648 B of weights) / (114,688 B x 16).
        assert_eq!(seed.num_gpu_blocks, 711);
        assert_eq!(
            engine_config_at("rtx5080-llama3.2-3b", Some(0.45)).unwrap(),
            seed
        );
        let more = engine_config_at("rtx5080-llama3.2-3b", Some(0.6)).unwrap();
        assert_eq!(more.num_gpu_blocks, 2_115);
        assert_eq!(more.max_num_batched_tokens, seed.max_num_batched_tokens);
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(
                engine_config_at("rtx5080-llama3.2-3b", Some(bad)).is_err(),
                "{bad}"
            );
        }
        // Less than the weights: no KV cache at all, refused.
        let err = engine_config_at("rtx5080-llama3.2-3b", Some(0.3)).unwrap_err();
        assert!(err.to_string().contains("no memory"), "{err}");
    }

    #[test]
    fn runs_side_by_side_give_what_runs_one_after_another_give() {
        let sessions = kvroute_traces::rag::generate(&kvroute_traces::rag::RagOptions {
            users: 40,
            ..Default::default()
        });
        let starts = kvroute_traces::arrivals::poisson(sessions.len(), 20.0, 1);
        let sessions = kvroute_traces::with_arrivals(sessions, &starts);
        let base = SimConfig::new(
            3,
            engine_config("rtx5080-llama3.2-3b").unwrap(),
            kvroute_core::PolicySettings::default(),
        );
        let work = prepare_for(&base, &sessions);
        let specs: Vec<RunSpec> = [
            PolicyKind::RoundRobin,
            PolicyKind::PredictedTtft,
            PolicyKind::P2c,
            PolicyKind::SessionHash,
            PolicyKind::Jsq,
        ]
        .iter()
        .map(|p| RunSpec::new("t", "rag", *p, 20.0, "1x", 0))
        .collect();
        let together = run_each(&specs, &base, &work).unwrap();
        assert_eq!(together.len(), specs.len());
        for (spec, r) in specs.iter().zip(&together) {
            let alone = run(spec, &base, &work).unwrap();
            assert_eq!(r.spec.policy, spec.policy, "in the specs' order");
            assert_eq!(
                (
                    r.requests,
                    r.hit_rate,
                    r.ttfts.clone(),
                    r.per_endpoint.clone()
                ),
                (
                    alone.requests,
                    alone.hit_rate,
                    alone.ttfts,
                    alone.per_endpoint
                ),
                "{}",
                spec.policy.as_str()
            );
        }
    }

    fn rec(session: u32, turn: u32, endpoint: u32, prompt: u32, cached: u32) -> SimRecord {
        SimRecord {
            session,
            turn,
            endpoint,
            sent_us: 0,
            ttft_us: Some(1),
            e2e_us: 1,
            itl_us: Vec::new(),
            prompt_tokens: prompt,
            completion_tokens: 1,
            cached_tokens: cached,
            predicted_blocks: 0,
            error: None,
        }
    }

    #[test]
    fn requests_are_told_apart_by_their_place_in_the_session() {
        // Completion order, not session order: session 0 has three turns (the second moves, the
        // third stays), session 1 one request, session 2 two turns on one endpoint, and a failed
        // request of session 3 counts nowhere.
        let mut failed = rec(3, 0, 0, 100, 0);
        failed.error = Some("too long".into());
        let records = [
            rec(0, 2, 1, 300, 200),
            rec(1, 0, 0, 500, 480),
            rec(0, 0, 0, 100, 0),
            rec(2, 1, 1, 200, 100),
            rec(0, 1, 1, 200, 0),
            rec(2, 0, 1, 100, 20),
            failed,
        ];
        let m = moves_of(&records);
        let t = |requests, cached, prompt| Tokens {
            requests,
            cached,
            prompt,
        };
        assert_eq!(m.single, t(1, 480, 500));
        assert_eq!(m.opening, t(2, 20, 200));
        assert_eq!(m.moved, t(1, 0, 200));
        assert_eq!(m.stayed, t(2, 300, 500));
        assert_eq!(m.follow_ups(), 3);
        assert!((m.stayed.hit() - 0.6).abs() < 1e-12);
        let mut sum = m;
        sum += m;
        assert_eq!(sum.stayed, t(4, 600, 1000));
        assert_eq!(Tokens::default().hit(), 0.0);
    }
}
