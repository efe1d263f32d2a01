//! Simulated runs as study results: the simulator's output turned into the replayer's records and
//! the runner's [`RunResult`], so the same report and figures come out of a simulated run.

use kvroute_sim::{prepare, simulate, PreparedSession, SimConfig, SimOutput};
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

/// How a run's follow-up requests (a session's turns after its first) were placed: how many went
/// to another endpoint than the session's previous turn, and the share of their prompt tokens the
/// engine had cached, for the moved turns and for the ones that stayed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moves {
    /// Follow-up turns.
    pub follow_ups: usize,
    /// Of those, sent to another endpoint than the previous turn.
    pub moved: usize,
    /// Cached share of the moved turns' prompt tokens.
    pub moved_hit: f64,
    /// Cached share of the other follow-ups' prompt tokens.
    pub stayed_hit: f64,
}

/// The [`Moves`] of a simulated run.
pub fn moves(out: &SimOutput) -> Moves {
    let mut turns: Vec<_> = out.records.iter().filter(|r| r.error.is_none()).collect();
    turns.sort_by_key(|r| (r.session, r.turn));
    let (mut m, mut s) = ((0u64, 0u64), (0u64, 0u64));
    let mut out_m = Moves::default();
    for pair in turns.windows(2) {
        let [prev, next] = pair else { continue };
        if prev.session != next.session {
            continue;
        }
        out_m.follow_ups += 1;
        let acc = if prev.endpoint == next.endpoint {
            &mut s
        } else {
            out_m.moved += 1;
            &mut m
        };
        acc.0 += u64::from(next.cached_tokens);
        acc.1 += u64::from(next.prompt_tokens);
    }
    let share = |(c, t): (u64, u64)| c as f64 / t.max(1) as f64;
    out_m.moved_hit = share(m);
    out_m.stayed_hit = share(s);
    out_m
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
    let p = kvroute_emulator::profile::Profile::load(profile).map_err(anyhow::Error::msg)?;
    Ok(kvroute_emulator::engine::EngineConfig::vllm_defaults(&p))
}
