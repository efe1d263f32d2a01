//! The routing study's plan as a file: workloads and their sizes, the sustainable-rate search, the
//! live experiments (policies x rates x runtime values) and the simulated part. The reduced and
//! full plans are embedded (`plans/reduced.toml`, `plans/full.toml`); `kvroute-study --plan FILE`
//! runs any other, and every study writes the plan it ran next to its results.

use std::collections::BTreeMap;

use kvroute_core::policy::PolicyKind;
use kvroute_core::PolicySettings;
use kvroute_traces::{arrivals, rag, sharegpt, with_arrivals, Session};
use serde::{Deserialize, Serialize};

/// The embedded reduced plan (the main job).
pub const REDUCED: &str = include_str!("../plans/reduced.toml");
/// The embedded full-size plan.
pub const FULL: &str = include_str!("../plans/full.toml");

/// A whole study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyPlan {
    /// Its name (the report's mode).
    pub name: String,
    /// Repeats per configuration (seeds 1, 2, ...).
    pub repeats: usize,
    /// ShareGPT multi-turn replay.
    pub sharegpt: ShareGptPlan,
    /// Synthetic RAG.
    pub rag: RagPlan,
    /// The sustainable-rate search.
    pub search: SearchPlan,
    /// Live experiments, in order.
    #[serde(rename = "experiment", default)]
    pub experiments: Vec<Experiment>,
    /// The simulated part.
    pub simulated: SimulatedPlan,
}

/// ShareGPT sessions of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareGptPlan {
    /// Conversations per run at least.
    pub sessions: usize,
    /// Seconds (emulated) over which a run's conversations arrive: a run at `r` sessions/s has
    /// `max(sessions, ceil(r x window_s))` of them, so a higher rate is more load, not the same
    /// conversations sooner. 0: always `sessions`.
    #[serde(default)]
    pub window_s: f64,
    /// Turns per conversation at most.
    pub max_turns: usize,
    /// Answer tokens per turn.
    pub max_tokens: u32,
    /// Think time between turns, ms.
    pub think_ms: f64,
    /// Unrecorded conversations before a run that asks for a warm-up.
    pub warmup_sessions: usize,
    /// Turns of each warm-up conversation (0: all of them). One turn fills the caches and the
    /// directory with other prompts at a fraction of a whole conversation's time.
    #[serde(default)]
    pub warmup_turns: usize,
}

/// RAG users of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RagPlan {
    /// Users (one request each) at least.
    pub users: usize,
    /// Seconds (emulated) over which a run's users arrive: `max(users, ceil(r x window_s))`
    /// at `r` requests/s. 0: always `users`.
    #[serde(default)]
    pub window_s: f64,
    /// Answer tokens.
    pub max_tokens: u32,
}

/// The sustainable-rate search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchPlan {
    /// Policy probed.
    pub policy: PolicyKind,
    /// First rate, sessions/s.
    pub start_rate: f64,
    /// P95 TTFT objective, ms.
    pub slo_ms: f64,
    /// Doublings at most.
    pub max_steps: usize,
    /// Bisection steps between the last rate within the objective and the first over it.
    #[serde(default)]
    pub bisect_steps: usize,
    /// Seconds (emulated) over which a probe's conversations arrive, where it is not
    /// `sharegpt.window_s`. The sustainable rate is a steady state: queues build for about a
    /// conversation's lifetime, so a probe shorter than that measures a ramp and overstates the
    /// rate the fleet sustains, while the runs at its multiples may be shorter (with a warm-up).
    #[serde(default)]
    pub window_s: Option<f64>,
}

fn one() -> f64 {
    1.0
}

fn one_usize() -> usize {
    1
}

fn d_max_send_delay() -> f64 {
    20.0
}

fn d_attempts() -> usize {
    3
}

/// Conversations (or users) at `rate` over `window_s`, at least `min`.
fn sized(min: usize, window_s: f64, rate: f64) -> usize {
    let n = (rate * window_s).ceil();
    if n.is_finite() && n > min as f64 {
        n as usize
    } else {
        min
    }
}

impl ShareGptPlan {
    /// Conversations of a run at `rate` sessions/s.
    pub fn sessions_at(&self, rate: f64) -> usize {
        sized(self.sessions, self.window_s, rate)
    }
}

impl RagPlan {
    /// Users of a run at `rate` requests/s.
    pub fn users_at(&self, rate: f64) -> usize {
        sized(self.users, self.window_s, rate)
    }
}

/// Which workload an experiment replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// ShareGPT multi-turn.
    Sharegpt,
    /// Synthetic RAG.
    Rag,
}

impl Workload {
    /// Its name in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Sharegpt => "sharegpt",
            Workload::Rag => "rag",
        }
    }
}

/// "all" or a list of policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Policies {
    /// `"all"`: every policy of the core.
    All(String),
    /// These policies.
    List(Vec<PolicyKind>),
}

impl Policies {
    /// The policies meant.
    pub fn resolve(&self) -> Result<Vec<PolicyKind>, String> {
        match self {
            Policies::All(s) if s == "all" => Ok(PolicyKind::ALL.to_vec()),
            Policies::All(s) => Err(format!("policies: \"{s}\" is neither \"all\" nor a list")),
            Policies::List(v) if v.is_empty() => Err("policies: empty list".into()),
            Policies::List(v) => Ok(v.clone()),
        }
    }
}

/// A multiple of the sustainable rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Its label in results (`1x`).
    pub label: String,
    /// The multiple.
    pub x: f64,
}

/// One live experiment: every policy at every rate over every grid point, each repeated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Its name in results (the report has sections for exp1-exp4; others get a table each).
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub title: String,
    /// The workload.
    pub workload: Workload,
    /// Policies.
    pub policies: Policies,
    /// Rates.
    pub rates: Vec<Rate>,
    /// Repeats of each configuration, where the plan's `repeats` is not wanted (a long sweep in a
    /// reduced plan); `--repeats` overrides both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<usize>,
    /// Warm-up conversations before each run (ShareGPT only).
    #[serde(default)]
    pub warmup: bool,
    /// Runtime values: every combination of the values listed per key.
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<String>>,
    /// Peer routers run on the same engines, sessions and seeds, each as `ROUTER:POLICY`
    /// (`smg:cache_aware`: SGLang's model gateway with that policy at its defaults).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Repeats of each peer run, where fewer than the policies' are wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_repeats: Option<usize>,
}

impl Experiment {
    /// Every combination of the grid's values (one empty point without a grid), keys in order.
    pub fn points(&self) -> Vec<Vec<(String, String)>> {
        let mut points: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for (key, values) in &self.grid {
            points = points
                .into_iter()
                .flat_map(|p| {
                    values.iter().map(move |v| {
                        let mut q = p.clone();
                        q.push((key.clone(), v.clone()));
                        q
                    })
                })
                .collect();
        }
        points
    }
}

/// The simulated part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedPlan {
    /// Policies validated against the live stack.
    pub validation_policies: Policies,
    /// ShareGPT conversations per validation run (live and simulated, at the 1x rate).
    pub validation_sessions: usize,
    /// Emulated time per wall time of the validation's live stack (1: real time; more is faster,
    /// but every millisecond of host overhead then counts that many times).
    #[serde(default = "one")]
    pub validation_time_scale: f64,
    /// Repeats of each validation run (seeds 1, 2, ...), where the plan's `repeats` is not
    /// wanted: a TTFT P95 over a few hundred requests moves by about 5% from one realisation to
    /// the next, so the 10% tolerance needs more of them. `--repeats` overrides it.
    #[serde(default)]
    pub validation_repeats: Option<usize>,
    /// The simulator runs every validation run this many times, with as many router seeds, and
    /// pools them: the live filter's random draws (ties, p2c) are not the simulator's, so one
    /// simulated draw is one sample of the simulator's distribution, not its expectation.
    #[serde(default = "one_usize")]
    pub validation_router_seeds: usize,
    /// A live validation run in which the client sent a turn later than this after it was due
    /// (emulated ms) ran through a host stall, not the model: on a quiet machine the latest send
    /// is a few ms late (timers and scheduling), a descheduled host makes it tens to hundreds. Such
    /// a run is set aside (`val-live-stalled`) and run again.
    #[serde(default = "d_max_send_delay")]
    pub validation_max_send_delay_ms: f64,
    /// Attempts per live validation run: the last one is kept whatever its send delay.
    #[serde(default = "d_attempts")]
    pub validation_attempts: usize,
    /// Policies of experiment 5 and the Mooncake runs.
    pub policies: Policies,
    /// Engine counts of experiment 5.
    pub engines: Vec<usize>,
    /// ShareGPT sessions per engine.
    pub sessions_per_engine: usize,
    /// Engines of the repeated sweeps.
    pub sweep_engines: usize,
    /// alpha and beta values of the repeated sweep (grid).
    pub ab: Vec<String>,
    /// Publish intervals of the repeated staleness sweep.
    pub intervals: Vec<String>,
    /// Engine counts of the Mooncake trace.
    pub mooncake_engines: Vec<usize>,
    /// Agentic sessions of the agentic run (0: none), on the Mooncake profile.
    #[serde(default)]
    pub agentic_sessions: usize,
    /// Their arrival rate, sessions/s.
    #[serde(default = "d_agentic_rate")]
    pub agentic_rate: f64,
    /// Engines of the agentic run.
    #[serde(default = "d_agentic_engines")]
    pub agentic_engines: usize,
    /// Gateway replicas compared (each request to one at random), sharing a fleet log or not.
    #[serde(default = "d_gateways")]
    pub gateways: Vec<usize>,
    /// Engines behind them.
    #[serde(default = "d_gateway_engines")]
    pub gateway_engines: usize,
    /// The fleet log's sync period, ms (the filter's `fleet.sync_ms`).
    #[serde(default = "d_fleet_sync_ms")]
    pub fleet_sync_ms: u64,
    /// The rest of the default policy's criterion grid (`exp5-grid`): workloads, fleets and loads
    /// beyond experiment 5's ShareGPT at 1x, every policy of `policies` in each cell.
    #[serde(default)]
    pub grid: Vec<GridCells>,
}

/// A workload of the simulated criterion grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GridWorkload {
    /// ShareGPT cut to the plan's `sharegpt.max_turns` (experiment 5's conversations).
    Sharegpt,
    /// ShareGPT at full length: up to [`FULL_LENGTH_TURNS`] turns.
    SharegptFull,
    /// Synthetic RAG: one question a user on one of a few shared documents.
    Rag,
    /// Half ShareGPT conversations, half RAG users, interleaved.
    Mix,
}

/// Turns at most of a full-length ShareGPT conversation in the grid.
pub const FULL_LENGTH_TURNS: usize = 10;

impl GridWorkload {
    /// Its name in results.
    pub fn as_str(self) -> &'static str {
        match self {
            GridWorkload::Sharegpt => "sharegpt",
            GridWorkload::SharegptFull => "sharegpt-full",
            GridWorkload::Rag => "rag",
            GridWorkload::Mix => "mix",
        }
    }

    /// The workload named `name` (`sharegpt`, `sharegpt-full`, `rag`, `mix`).
    pub fn parse(name: &str) -> Option<GridWorkload> {
        [
            GridWorkload::Sharegpt,
            GridWorkload::SharegptFull,
            GridWorkload::Rag,
            GridWorkload::Mix,
        ]
        .into_iter()
        .find(|w| w.as_str() == name)
    }
}

/// Cells of the simulated criterion grid: one workload on each fleet at each load. A load is a
/// multiple of the workload's own 1x: half the knee that the live and simulated searches use (the
/// highest rate per engine at which `round_robin` keeps P95 TTFT within the objective at N = 2),
/// as experiment 5 runs ShareGPT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridCells {
    /// The workload.
    pub workload: GridWorkload,
    /// Engine counts.
    pub engines: Vec<usize>,
    /// Multiples of the workload's 1x.
    pub loads: Vec<f64>,
}

/// A load's label in results: `0.5x`, `1x`, `2x`.
pub fn load_label(x: f64) -> String {
    format!("{x}x")
}

fn d_gateways() -> Vec<usize> {
    vec![1, 2, 4, 8]
}
fn d_gateway_engines() -> usize {
    16
}
fn d_fleet_sync_ms() -> u64 {
    10
}

fn d_agentic_rate() -> f64 {
    0.8
}
fn d_agentic_engines() -> usize {
    16
}

impl StudyPlan {
    /// Reads and checks a plan: every policy, runtime key and value must be one the router takes.
    pub fn parse(text: &str) -> Result<StudyPlan, String> {
        let plan: StudyPlan = toml::from_str(text).map_err(|e| e.to_string())?;
        plan.check()?;
        Ok(plan)
    }

    /// Seconds (emulated) over which a search probe's conversations arrive.
    pub fn search_window_s(&self) -> f64 {
        self.search.window_s.unwrap_or(self.sharegpt.window_s)
    }

    /// Conversations of a search probe at `rate` sessions/s.
    pub fn search_sessions_at(&self, rate: f64) -> usize {
        sized(self.sharegpt.sessions, self.search_window_s(), rate)
    }

    /// Repeats of each validation run: the simulated part's own, else the plan's.
    pub fn validation_repeats(&self) -> usize {
        self.simulated.validation_repeats.unwrap_or(self.repeats)
    }

    fn check(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if self.repeats == 0 {
            errors.push("repeats: at least 1".to_string());
        }
        if self.sharegpt.sessions == 0 || self.sharegpt.max_turns == 0 {
            errors.push("sharegpt: sessions and max_turns at least 1".into());
        }
        for (what, w) in [
            ("sharegpt.window_s", self.sharegpt.window_s),
            ("rag.window_s", self.rag.window_s),
            ("search.window_s", self.search.window_s.unwrap_or(0.0)),
        ] {
            if !(0.0..=3600.0).contains(&w) {
                errors.push(format!("{what}: 0 to 3600 seconds"));
            }
        }
        if self.search.start_rate.is_nan()
            || self.search.start_rate <= 0.0
            || self.search.slo_ms.is_nan()
            || self.search.slo_ms <= 0.0
        {
            errors.push("search: start_rate and slo_ms must be positive".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for e in &self.experiments {
            let at = format!("experiment {}", e.name);
            if !names.insert(e.name.clone()) {
                errors.push(format!("{at}: name used twice"));
            }
            if let Err(m) = e.policies.resolve() {
                errors.push(format!("{at}: {m}"));
            }
            for p in &e.peers {
                if let Err(m) = kvroute_harness::peer::Peer::parse(p) {
                    errors.push(format!("{at}: {m}"));
                }
            }
            if !e.peers.is_empty() && !e.grid.is_empty() {
                errors.push(format!("{at}: peers run without kvroute's runtime grid"));
            }
            if e.repeats == Some(0) {
                errors.push(format!("{at}: repeats at least 1"));
            }
            if e.rates.is_empty() || e.rates.iter().any(|r| r.x.is_nan() || r.x <= 0.0) {
                errors.push(format!(
                    "{at}: rates must be a non-empty list of positive multiples"
                ));
            }
            for (key, values) in &e.grid {
                if values.is_empty() {
                    errors.push(format!("{at}: grid {key} has no values"));
                }
                for v in values {
                    let (_, errs) =
                        PolicySettings::default().with_runtime([(key.as_str(), v.as_str())]);
                    let known = key
                        .strip_prefix("kvroute.")
                        .is_some_and(|k| kvroute_core::config::RUNTIME_KEYS.contains(&k));
                    if !known || !errs.is_empty() {
                        errors.push(format!(
                            "{at}: grid {key} = {v:?} is not a runtime value the router takes"
                        ));
                    }
                }
            }
        }
        if !(1.0..=16.0).contains(&self.simulated.validation_time_scale) {
            errors.push("simulated.validation_time_scale: 1 to 16".into());
        }
        if self.simulated.validation_repeats == Some(0) {
            errors.push("simulated.validation_repeats: at least 1".into());
        }
        let bound = self.simulated.validation_max_send_delay_ms;
        if bound.is_nan() || bound <= 0.0 {
            errors.push("simulated.validation_max_send_delay_ms: more than 0".into());
        }
        if !(1..=10).contains(&self.simulated.validation_attempts) {
            errors.push("simulated.validation_attempts: 1 to 10".into());
        }
        if !(1..=64).contains(&self.simulated.validation_router_seeds) {
            errors.push("simulated.validation_router_seeds: 1 to 64".into());
        }
        if let Err(m) = self.simulated.validation_policies.resolve() {
            errors.push(format!("simulated.validation_policies: {m}"));
        }
        if let Err(m) = self.simulated.policies.resolve() {
            errors.push(format!("simulated.policies: {m}"));
        }
        if self
            .simulated
            .engines
            .iter()
            .chain(&self.simulated.mooncake_engines)
            .any(|n| *n < 1 || *n > 64)
            || !(1..=64).contains(&self.simulated.sweep_engines)
        {
            errors.push("simulated: engine counts must be 1 to 64".into());
        }
        for g in &self.simulated.grid {
            let at = format!("simulated.grid {}", g.workload.as_str());
            if g.engines.is_empty() || g.engines.iter().any(|n| *n < 1 || *n > 64) {
                errors.push(format!("{at}: engines must be a non-empty list of 1 to 64"));
            }
            if g.loads.is_empty() || g.loads.iter().any(|x| !x.is_finite() || *x <= 0.0) {
                errors.push(format!(
                    "{at}: loads must be a non-empty list of positive multiples"
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The plan as TOML (written next to a study's results).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// `count` ShareGPT conversations of the plan's shape, picked by `seed` (from `offset`), starting
/// as a Poisson process of `rate` sessions/s.
pub fn sharegpt_sessions(
    text: &str,
    p: &ShareGptPlan,
    count: usize,
    seed: u64,
    rate: f64,
    offset: usize,
) -> anyhow::Result<Vec<Session>> {
    let all = sharegpt::parse(
        text,
        &sharegpt::ShareGptOptions {
            max_turns: p.max_turns,
            max_tokens: p.max_tokens,
            think_ms: p.think_ms,
            ..Default::default()
        },
    )?;
    // Different seeds take different conversations.
    let start = (offset + seed as usize * 97) % all.len().max(1);
    let picked: Vec<Session> = all
        .iter()
        .cycle()
        .skip(start)
        .take(count)
        .cloned()
        .collect();
    let starts = arrivals::poisson(picked.len(), rate, seed);
    Ok(with_arrivals(picked, &starts))
}

/// `sessions` sessions of a simulated grid run of `workload`, starting as a Poisson process of
/// `rate` sessions/s. ShareGPT conversations are picked by `seed` as in [`sharegpt_sessions`]; RAG
/// users have the plan's `rag` shape; the mix draws each session from one or the other, half and
/// half, by `seed`.
pub fn grid_sessions(
    text: &str,
    plan: &StudyPlan,
    workload: GridWorkload,
    sessions: usize,
    seed: u64,
    rate: f64,
) -> anyhow::Result<Vec<Session>> {
    let sharegpt = |max_turns: usize| {
        let p = ShareGptPlan {
            max_turns,
            ..plan.sharegpt.clone()
        };
        sharegpt_sessions(text, &p, sessions, seed, 1.0, 0)
    };
    let rag = || {
        rag::generate(&rag::RagOptions {
            users: sessions,
            max_tokens: plan.rag.max_tokens,
            seed,
            ..Default::default()
        })
    };
    let picked = match workload {
        GridWorkload::Sharegpt => sharegpt(plan.sharegpt.max_turns)?,
        GridWorkload::SharegptFull => sharegpt(FULL_LENGTH_TURNS)?,
        GridWorkload::Rag => rag(),
        GridWorkload::Mix => {
            // The mix keeps its draw's order among equal start times (arrivals come after).
            let unset = |mut v: Vec<Session>| {
                v.iter_mut().for_each(|s| s.start_ms = 0.0);
                v
            };
            kvroute_traces::mix(
                &unset(sharegpt(plan.sharegpt.max_turns)?),
                &unset(rag()),
                0.5,
                sessions,
                seed,
            )
        }
    };
    let starts = arrivals::poisson(picked.len(), rate, seed);
    Ok(with_arrivals(picked, &starts))
}

/// The load of the simulated criterion grid. Experiment 5 runs ShareGPT at `per_engine` sessions/s
/// per engine, `sessions_per_engine` of them per engine: its window is their arrival time. Each
/// grid workload's 1x offers experiment 5's requests per second per engine (its session rate
/// scaled by requests per session, measured on 400 of its sessions), and a run's sessions arrive
/// over that window, so a higher load is more sessions in the same time, as in the live runs. (A
/// knee search per workload does not bound RAG: its requests are short, and round_robin keeps its
/// P95 within the objective past 500 users/s per engine.)
#[derive(Debug, Clone, Copy)]
pub struct GridLoad {
    /// Experiment 5's ShareGPT sessions/s per engine (1x).
    pub per_engine: f64,
    /// Experiment 5's window, s.
    pub window_s: f64,
    sharegpt_per_session: f64,
}

impl GridLoad {
    /// The grid's load for experiment 5 at `per_engine` with `sessions_per_engine`.
    pub fn new(
        text: &str,
        plan: &StudyPlan,
        per_engine: f64,
        sessions_per_engine: usize,
    ) -> anyhow::Result<GridLoad> {
        Ok(GridLoad {
            per_engine,
            window_s: sessions_per_engine as f64 / per_engine.max(1e-9),
            sharegpt_per_session: requests_per_session(text, plan, GridWorkload::Sharegpt)?,
        })
    }

    /// `workload`'s 1x, sessions/s per engine.
    pub fn one_x(
        &self,
        text: &str,
        plan: &StudyPlan,
        workload: GridWorkload,
    ) -> anyhow::Result<f64> {
        let own = requests_per_session(text, plan, workload)?;
        Ok(self.per_engine * self.sharegpt_per_session / own.max(1e-9))
    }

    /// The sessions of a run of `workload` on `engines` engines at `rate` sessions/s per engine:
    /// as many as arrive in the window.
    pub fn sessions(
        &self,
        text: &str,
        plan: &StudyPlan,
        workload: GridWorkload,
        engines: usize,
        rate: f64,
        seed: u64,
    ) -> anyhow::Result<Vec<Session>> {
        let total = rate * engines as f64;
        let count = (total * self.window_s).ceil().max(1.0) as usize;
        grid_sessions(text, plan, workload, count, seed, total)
    }
}

/// Requests per session of `workload`, measured on 400 of its sessions.
fn requests_per_session(
    text: &str,
    plan: &StudyPlan,
    workload: GridWorkload,
) -> anyhow::Result<f64> {
    let s = grid_sessions(text, plan, workload, 400, 1, 1.0)?;
    Ok(kvroute_traces::requests(&s) as f64 / s.len().max(1) as f64)
}

/// The RAG users of a run at `rate` requests/s (one request each).
pub fn rag_sessions(p: &RagPlan, seed: u64, rate: f64) -> Vec<Session> {
    let s = rag::generate(&rag::RagOptions {
        users: p.users_at(rate),
        max_tokens: p.max_tokens,
        seed,
        ..Default::default()
    });
    let starts = arrivals::poisson(s.len(), rate, seed);
    with_arrivals(s, &starts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn embedded_plans_parse_and_round_trip() {
        // The shipped plan that is not embedded (the peers beside kvroute) parses too.
        let peers = StudyPlan::parse(include_str!("../plans/peers.toml")).unwrap();
        assert_eq!(StudyPlan::parse(&peers.to_toml()).unwrap(), peers);
        assert!(peers.experiments.iter().all(|e| !e.peers.is_empty()));
        for text in [REDUCED, FULL] {
            let p = StudyPlan::parse(text).unwrap();
            assert_eq!(StudyPlan::parse(&p.to_toml()).unwrap(), p);
            assert_eq!(
                p.experiments
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>(),
                ["exp1", "exp2", "exp3", "exp4"]
            );
        }
        let r = StudyPlan::parse(REDUCED).unwrap();
        assert_eq!(
            r.experiments[0].policies.resolve().unwrap().len(),
            PolicyKind::ALL.len()
        );
        // exp3: the alpha x beta grid.
        let pts = r.experiments[2].points();
        assert_eq!(pts.len(), 9);
        assert_eq!(
            pts[1],
            vec![
                ("kvroute.alpha".to_string(), "0".to_string()),
                ("kvroute.beta".to_string(), "0.5".to_string())
            ]
        );
        assert_eq!(r.experiments[0].points(), vec![Vec::new()]);
        // The sweeps' own repeats; the others take the plan's.
        assert_eq!(r.experiments[0].repeats, None);
        assert_eq!(r.experiments[2].repeats, Some(2));
        // The validation's own repeats; the full plan takes the plan's.
        assert_eq!(r.validation_repeats(), 6);
        assert_eq!(r.simulated.validation_router_seeds, 8);
        let f = StudyPlan::parse(FULL).unwrap();
        assert_eq!(f.validation_repeats(), f.repeats);
        // The criterion grid: part of it in the reduced plan, all of it in the full one.
        let workloads = |p: &StudyPlan| {
            p.simulated
                .grid
                .iter()
                .map(|g| g.workload)
                .collect::<Vec<_>>()
        };
        let all = [
            GridWorkload::Sharegpt,
            GridWorkload::SharegptFull,
            GridWorkload::Rag,
            GridWorkload::Mix,
        ];
        assert_eq!(workloads(&r), all);
        assert_eq!(workloads(&f), all);
        assert!(f
            .simulated
            .grid
            .iter()
            .all(|g| g.engines == f.simulated.engines));
        assert_eq!(r.simulated.grid[1].loads, vec![0.5, 1.0, 2.0]);
        assert_eq!(load_label(0.5), "0.5x");
        assert_eq!(load_label(2.0), "2x");
        for w in all {
            assert_eq!(GridWorkload::parse(w.as_str()), Some(w));
        }
    }

    /// The project's ShareGPT data, beside the checkout (as CI has it).
    fn sharegpt_text() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/data/sharegpt_dev_3000.json"
        ))
        .unwrap()
    }

    #[test]
    fn grid_sessions_have_their_workloads_shape() {
        let text = sharegpt_text();
        let p = StudyPlan::parse(REDUCED).unwrap();
        let turns = |w: GridWorkload| {
            let s = grid_sessions(&text, &p, w, 300, 1, 2.0).unwrap();
            assert_eq!(s.len(), 300, "{w:?}");
            // Poisson starts at 2 sessions/s: about 150 s for 300 sessions.
            let last = s.iter().map(|x| x.start_ms).fold(0.0, f64::max);
            assert!((100_000.0..200_000.0).contains(&last), "{w:?} {last}");
            s.iter().map(|x| x.turns.len()).collect::<Vec<_>>()
        };
        let (short, full, rag, mix) = (
            turns(GridWorkload::Sharegpt),
            turns(GridWorkload::SharegptFull),
            turns(GridWorkload::Rag),
            turns(GridWorkload::Mix),
        );
        assert!(short.iter().all(|t| (1..=p.sharegpt.max_turns).contains(t)));
        assert!(full.iter().all(|t| (1..=FULL_LENGTH_TURNS).contains(t)));
        assert!(full.iter().any(|t| *t > p.sharegpt.max_turns));
        assert!(rag.iter().all(|t| *t == 1));
        // About half of the mix is single-question RAG users, the rest conversations.
        let single = mix.iter().filter(|t| **t == 1).count();
        assert!((100..250).contains(&single), "{single}");
        assert!(mix.iter().any(|t| *t > 1));
    }

    #[test]
    fn every_grid_workload_offers_experiment_5s_requests_per_second() {
        let text = sharegpt_text();
        let p = StudyPlan::parse(REDUCED).unwrap();
        // Experiment 5: 2 ShareGPT sessions/s per engine, 60 per engine: a 30 s window.
        let load = GridLoad::new(&text, &p, 2.0, 60).unwrap();
        assert!((load.window_s - 30.0).abs() < 1e-9);
        let per_s = |w: GridWorkload, x: f64| {
            let rate = load.one_x(&text, &p, w).unwrap() * x;
            let s = load.sessions(&text, &p, w, 4, rate, 1).unwrap();
            // Sessions arriving over the window on 4 engines.
            assert_eq!(s.len(), (rate * 4.0 * 30.0).ceil() as usize, "{w:?}");
            kvroute_traces::requests(&s) as f64 / 30.0
        };
        assert!((load.one_x(&text, &p, GridWorkload::Sharegpt).unwrap() - 2.0).abs() < 1e-9);
        let sharegpt = per_s(GridWorkload::Sharegpt, 1.0);
        for w in [
            GridWorkload::SharegptFull,
            GridWorkload::Rag,
            GridWorkload::Mix,
        ] {
            // Within the draw of one run's sessions against the 400 the rate is measured on.
            let r = per_s(w, 1.0) / sharegpt;
            assert!((0.8..1.25).contains(&r), "{w:?} {r}");
            // RAG is one request a user: a higher rate of users than of conversations.
            if w == GridWorkload::Rag {
                assert!(load.one_x(&text, &p, w).unwrap() > 2.0);
            }
        }
        // 2x is twice the sessions in the same window.
        let r = per_s(GridWorkload::Mix, 2.0) / per_s(GridWorkload::Mix, 1.0);
        assert!((1.9..2.1).contains(&r), "{r}");
    }

    #[test]
    fn runs_are_sized_by_rate_and_window() {
        let mut p = StudyPlan::parse(REDUCED).unwrap();
        p.sharegpt.sessions = 24;
        p.sharegpt.window_s = 10.0;
        assert_eq!(p.sharegpt.sessions_at(1.0), 24);
        assert_eq!(p.sharegpt.sessions_at(4.05), 41);
        assert_eq!(p.sharegpt.sessions_at(8.0), 80);
        p.sharegpt.window_s = 0.0;
        assert_eq!(p.sharegpt.sessions_at(8.0), 24);
        p.rag.users = 48;
        p.rag.window_s = 10.0;
        assert_eq!(p.rag.users_at(2.0), 48);
        assert_eq!(p.rag.users_at(16.0), 160);
        assert_eq!(p.rag.users_at(f64::NAN), 48);
        // The search's probes: their own window, else the runs'.
        p.sharegpt.window_s = 6.0;
        p.search.window_s = Some(16.0);
        assert_eq!(p.search_sessions_at(8.0), 128);
        assert_eq!(p.search_sessions_at(1.0), 24);
        p.search.window_s = None;
        assert_eq!(p.search_sessions_at(8.0), 48);
    }

    #[test]
    fn bad_plans_are_refused_with_the_field() {
        let bad = |from: &str, to: &str| {
            assert!(REDUCED.contains(from), "{from}");
            StudyPlan::parse(&REDUCED.replacen(from, to, 1)).unwrap_err()
        };
        assert!(bad("\"kvroute.beta\"", "\"kvroute.betta\"").contains("kvroute.betta"));
        assert!(bad("\"kvroute.alpha\" = [\"0\"", "\"kvroute.alpha\" = [\"-3\"").contains("-3"));
        assert!(bad(
            "policies = [\"load_cache_aware\"]",
            "policies = [\"fastest\"]"
        )
        .contains("policies"));
        assert!(bad("policies = \"all\"", "policies = \"some\"").contains("neither"));
        assert!(bad(
            "{ label = \"0.5x\", x = 0.5 }",
            "{ label = \"0.5x\", x = 0 }"
        )
        .contains("rates"));
        assert!(bad("repeats = 3", "repeats = 3\nrepeat = 2").contains("repeat"));
        assert!(bad("window_s = 6", "window_s = -1").contains("sharegpt.window_s"));
        assert!(bad("repeats = 2", "repeats = 0").contains("experiment exp3: repeats"));
        assert!(bad("name = \"exp2\"", "name = \"exp1\"").contains("twice"));
        assert!(bad("validation_repeats = 6", "validation_repeats = 0")
            .contains("simulated.validation_repeats"));
        assert!(
            bad("validation_router_seeds = 8", "validation_router_seeds = 0")
                .contains("simulated.validation_router_seeds")
        );
        assert!(bad("validation_attempts = 3", "validation_attempts = 0")
            .contains("simulated.validation_attempts"));
        assert!(bad(
            "validation_max_send_delay_ms = 20",
            "validation_max_send_delay_ms = -1"
        )
        .contains("simulated.validation_max_send_delay_ms"));
        assert!(
            bad("mooncake_engines = [8, 16]", "mooncake_engines = [8, 128]").contains("1 to 64")
        );
        assert!(bad("engines = [2, 8, 32]", "engines = [2, 80]")
            .contains("simulated.grid sharegpt: engines"));
        assert!(bad("loads = [0.5, 2.0]", "loads = [0.5, -2.0]")
            .contains("simulated.grid sharegpt: loads"));
        assert!(bad("workload = \"mix\"", "workload = \"chat\"").contains("chat"));
    }
}
