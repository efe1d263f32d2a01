//! The routing policies: one small trait, no side effects.
//!
//! A policy sees only the candidates (healthy endpoints, each with its load, its longest prefix
//! match and whether it holds the request's session), the request's keys, the settings, a sequence
//! number and a random draw. State lives in the directory and the cluster view, never in a policy,
//! so the same request and state give the same pick in the filter, the simulator and the tests.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::PolicySettings;
use crate::hash::rendezvous_weight;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The value's name, as in config, runtime values and stats.
            pub fn as_str(self) -> &'static str { match self { $($name::$v => $s),+ } }
        }
        impl FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s.trim() { $($s => Ok($name::$v),)+ _ => Err(()) }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

string_enum! {
    /// The routing policies.
    PolicyKind {
        /// Cycle through the healthy endpoints.
        RoundRobin = "round_robin",
        /// Join the shortest queue: the least loaded endpoint, ties at random.
        Jsq = "jsq",
        /// Power of two choices: two distinct random endpoints, the less loaded of the two.
        P2c = "p2c",
        /// Hash of the session id (header or OpenAI `user`), modular or rendezvous.
        SessionHash = "session_hash",
        /// Hash of the first 200 chars of the system prompt (or first message); JSQ above a queue threshold.
        PrefixKey = "prefix_key",
        /// `alpha * cache_affinity - beta * load_pressure`, highest score wins.
        LoadCacheAware = "load_cache_aware",
        /// SGLang router `cache_aware` (reference; see [`crate::reference`]).
        SglangCacheAware = "sglang_cache_aware",
        /// Gateway API Inference Extension / llm-d weighted scorers (reference).
        LlmdScorer = "llmd_scorer",
        /// NVIDIA Dynamo KV router cost (reference).
        DynamoCost = "dynamo_cost",
        /// KubeAI consistent hashing with bounded loads (reference).
        Chwbl = "chwbl",
        /// DualMap-style two hashes of the prefix, the less loaded (reference).
        Dualmap = "dualmap",
        /// Each endpoint's predicted time to the first token (the prefill queued there and this
        /// request's uncached prefill), in milliseconds; the lowest wins. The default.
        #[default]
        PredictedTtft = "predicted_ttft",
        /// LMetric (reference): new prefill tokens x the endpoint's batch size, lowest wins.
        Lmetric = "lmetric",
    }
}

string_enum! {
    /// How a key is mapped onto the healthy endpoints.
    HashMode {
        /// `key mod n` over the healthy endpoints (remaps most keys when n changes).
        #[default]
        Modular = "modular",
        /// Highest random weight: only the keys of a removed endpoint move.
        Rendezvous = "rendezvous",
    }
}

string_enum! {
    /// Whose measured prefill rate `predicted_ttft` divides an endpoint's work by.
    RateScope {
        /// The fleet's: the mean over the measured engines (a fleet of like engines).
        #[default]
        Pooled = "pooled",
        /// The endpoint's own, the fleet's where it is not measured (a fleet of unlike engines).
        PerEndpoint = "per_endpoint",
    }
}

string_enum! {
    /// Which load the policies compare.
    LoadSignal {
        /// Requests the gateway has sent and not yet seen finish (always available, never stale).
        #[default]
        GatewayInflight = "gateway_inflight",
        /// Engine-reported `vllm:num_requests_waiting`.
        EngineWaiting = "engine_waiting",
        /// Engine-reported waiting + running requests.
        EngineQueue = "engine_queue",
        /// Engine-reported `vllm:kv_cache_usage_perc`.
        KvUsage = "kv_usage",
    }
}

/// One endpoint a policy may pick.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Candidate<'a> {
    /// Index of the endpoint in the configuration.
    pub endpoint: usize,
    /// Endpoint name (identity for rendezvous hashing).
    pub name: &'a str,
    /// Load under the configured signal (higher is busier).
    pub load: f64,
    /// Leading blocks of the request the directory places on this endpoint.
    pub matched_blocks: u32,
    /// Whether the directory places the request's session on this endpoint.
    pub holds_session: bool,
    /// Requests the gateway has sent to this endpoint and not yet seen finish.
    pub inflight: f64,
    /// Engine-reported waiting requests, when a sidecar reports them.
    pub waiting: Option<f64>,
    /// Engine-reported KV cache usage (0..=1), when a sidecar reports it.
    pub kv_usage: Option<f64>,
    /// Prefix blocks of the requests the gateway has in flight on this endpoint (the router's own
    /// account of the KV blocks it has sent there, fresh at every decision).
    pub active_blocks: f64,
    /// Prompt tokens the gateway has sent to this endpoint that are still to be prefilled: for each
    /// in-flight request whose response has not started, its prompt tokens less those the directory
    /// placed on the endpoint at its decision.
    pub queued_prefill_tokens: f64,
    /// The engine's measured prefill throughput, tokens/s (sidecar), if measured.
    pub prefill_tps: Option<f64>,
    /// The engine's measured time per output token, seconds (sidecar), if measured.
    pub step_s: Option<f64>,
    /// Conversations the directory places on this endpoint
    /// ([`crate::directory::SessionStats::per_endpoint`]).
    pub sessions: u32,
}

/// Everything a policy reads.
#[derive(Debug)]
pub struct PickContext<'a> {
    /// Healthy endpoints, in configuration order; never empty.
    pub candidates: &'a [Candidate<'a>],
    /// Blocks of the request (after the cap).
    pub total_blocks: u32,
    /// Session key, if the request has one.
    pub session: Option<u64>,
    /// Prefix key, if the request has one.
    pub prefix_key: Option<u64>,
    /// Hash of the prompt's first characters (whole blocks covering
    /// [`crate::reference::HEAD_CHARS`]), the key of the hashing reference policies.
    pub head_key: Option<u64>,
    /// Active settings.
    pub settings: &'a PolicySettings,
    /// Sequence number of this decision (round robin).
    pub seq: u64,
    /// A uniformly random draw (p2c, ties).
    pub rand: u64,
    /// The request's prompt tokens (estimated from its canonical text, whole prompt, beyond the
    /// block cap).
    pub prompt_tokens: f64,
    /// Tokens per directory block (a fine one: the first `coarse_after` blocks).
    pub tokens_per_block: f64,
    /// Blocks of the request before they grow coarser ([`crate::prefix::BlockSpec`]).
    pub coarse_after: u32,
    /// Fine blocks a coarser block stands for.
    pub coarse_factor: u32,
    /// Age of the directory view the matches come from, ms.
    pub directory_age_ms: u64,
    /// The request has a session the directory does not know (its first request, or one
    /// forgotten).
    pub new_session: bool,
    /// Share of the recent requests with a session that continued a known one, among those that
    /// begin as this request does where enough of them were counted
    /// ([`crate::directory::SessionStats::continuing_for`]).
    pub continuing_share: f64,
    /// Share of the recent requests with a session that begin with this request's prompt head,
    /// where the directory counted enough of them; else 0
    /// ([`crate::directory::SessionStats::share_of`]).
    pub head_share: f64,
    /// At most the share of the recent requests with a session that begin with this request's
    /// prompt head ([`crate::directory::SessionStats::share_bound`]); 1 where the directory keeps
    /// no session stats.
    pub head_share_bound: f64,
    /// Share of the recent requests with a session that begin with a prompt head whose requests
    /// do not continue one: questions over shared prefixes
    /// ([`crate::directory::SessionStats::one_shot_share`]).
    pub one_shot_share: f64,
    /// Leading blocks that cover a prompt's head ([`crate::prefix::BlockSpec::head_blocks`]): an
    /// endpoint that matches as many holds the request's head.
    pub head_blocks: u32,
}

impl PickContext<'_> {
    /// Fine blocks the request's first `n` blocks stand for (its first `n` when none is coarse).
    pub fn units(&self, n: u32) -> f64 {
        crate::prefix::fine_units(
            n,
            u64::from(self.coarse_after),
            u64::from(self.coarse_factor),
        ) as f64
    }

    /// The share of the request's blocks (in fine blocks) that candidate `i` matches.
    pub fn match_fraction(&self, i: usize) -> f64 {
        match self.candidates.get(i) {
            Some(c) if self.total_blocks > 0 => {
                self.units(c.matched_blocks) / self.units(self.total_blocks)
            }
            _ => 0.0,
        }
    }
}

/// What a policy picked, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Index into `candidates`.
    pub candidate: usize,
    /// How the pick was made.
    pub note: PickNote,
}

/// How a pick was made, beyond the policy's main rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickNote {
    /// The policy's own rule.
    Primary,
    /// `prefix_key`: the preferred endpoint's queue was above the threshold, so JSQ.
    Overflow,
    /// `session_hash`: the request has no session id, so JSQ.
    NoSession,
    /// `prefix_key`: the request has no prefix key text, so JSQ.
    NoPrefixKey,
    /// `sglang_cache_aware`: the loads were imbalanced, so the least loaded.
    Imbalanced,
    /// `sglang_cache_aware`: the best match ratio was at or under the cache threshold, so the
    /// least loaded.
    LowMatch,
    /// `chwbl`: the key's first endpoint was at its load bound, so the next one in hash order.
    Spill,
    /// `predicted_ttft`: a new session's fastest endpoint served more than its share of the
    /// sessions, so the fastest of those that did not.
    SessionSpread,
    /// `predicted_ttft`: a question over a shared prefix found every endpoint that holds it busy
    /// and too few holding it for its share of the requests, so an idle endpoint (which then holds
    /// it too).
    IdleCopy,
}

impl PickNote {
    /// Stable name used in stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Overflow => "overflow",
            Self::NoSession => "no_session",
            Self::NoPrefixKey => "no_prefix_key",
            Self::Imbalanced => "imbalanced",
            Self::LowMatch => "low_match",
            Self::Spill => "spill",
            Self::SessionSpread => "session_spread",
            Self::IdleCopy => "idle_copy",
        }
    }
}

/// A routing policy.
pub trait Policy: Sync {
    /// Which policy this is.
    fn kind(&self) -> PolicyKind;
    /// Picks one of `ctx.candidates` (which is never empty).
    fn pick(&self, ctx: &PickContext<'_>) -> Pick;
}

/// The implementation of `kind`.
pub fn policy(kind: PolicyKind) -> &'static dyn Policy {
    match kind {
        PolicyKind::RoundRobin => &RoundRobin,
        PolicyKind::Jsq => &Jsq,
        PolicyKind::P2c => &P2c,
        PolicyKind::SessionHash => &SessionHash,
        PolicyKind::PrefixKey => &PrefixKey,
        PolicyKind::LoadCacheAware => &LoadCacheAware,
        PolicyKind::SglangCacheAware => &crate::reference::SglangCacheAware,
        PolicyKind::LlmdScorer => &crate::reference::LlmdScorer,
        PolicyKind::DynamoCost => &crate::reference::DynamoCost,
        PolicyKind::Chwbl => &crate::reference::Chwbl,
        PolicyKind::Dualmap => &crate::reference::Dualmap,
        PolicyKind::PredictedTtft => &crate::ttft::PredictedTtft,
        PolicyKind::Lmetric => &crate::reference::Lmetric,
    }
}

impl PolicyKind {
    /// Whether the policy reads the directory's prefix matches (only those pay for matching).
    pub fn reads_prefix(self) -> bool {
        matches!(
            self,
            Self::LoadCacheAware
                | Self::SglangCacheAware
                | Self::LlmdScorer
                | Self::DynamoCost
                | Self::PredictedTtft
                | Self::Lmetric
        )
    }

    /// Whether the policy is a reference policy from another router (not one of kvroute's six).
    pub fn is_reference(self) -> bool {
        matches!(
            self,
            Self::SglangCacheAware
                | Self::LlmdScorer
                | Self::DynamoCost
                | Self::Chwbl
                | Self::Dualmap
                | Self::Lmetric
        )
    }
}

pub(crate) fn primary(candidate: usize) -> Pick {
    Pick {
        candidate,
        note: PickNote::Primary,
    }
}

/// Index among the `n` maxima of `score` chosen by `rand`; 0 if `cands` is empty.
pub(crate) fn argbest(
    n: usize,
    rand: u64,
    better: impl Fn(usize, usize) -> std::cmp::Ordering,
) -> usize {
    let mut best = 0usize;
    let mut ties = 1u64;
    let mut chosen = 0usize;
    // Reservoir-free: first find the best, then pick the (rand % ties)-th among equals.
    for i in 1..n {
        match better(i, best) {
            std::cmp::Ordering::Greater => {
                best = i;
                ties = 1;
            }
            std::cmp::Ordering::Equal => ties += 1,
            std::cmp::Ordering::Less => {}
        }
    }
    let mut k = rand % ties;
    for i in 0..n {
        if better(i, best) == std::cmp::Ordering::Equal {
            if k == 0 {
                chosen = i;
                break;
            }
            k -= 1;
        }
    }
    chosen
}

fn load_of(ctx: &PickContext<'_>, i: usize) -> f64 {
    ctx.candidates.get(i).map_or(f64::INFINITY, |c| c.load)
}

pub(crate) fn least_loaded(ctx: &PickContext<'_>) -> usize {
    argbest(ctx.candidates.len(), ctx.rand, |a, b| {
        load_of(ctx, b).total_cmp(&load_of(ctx, a))
    })
}

/// Maps `key` onto a candidate with the configured hash mode.
pub fn hash_pick(ctx: &PickContext<'_>, key: u64) -> usize {
    let n = ctx.candidates.len().max(1);
    match ctx.settings.hash_mode {
        HashMode::Modular => (key % n as u64) as usize,
        HashMode::Rendezvous => argbest(ctx.candidates.len(), 0, |a, b| {
            let w = |i: usize| {
                ctx.candidates
                    .get(i)
                    .map_or(0, |c| rendezvous_weight(key, c.name))
            };
            w(a).cmp(&w(b))
        }),
    }
}

/// `round_robin`: candidate `seq mod n`.
#[derive(Debug)]
pub struct RoundRobin;
impl Policy for RoundRobin {
    fn kind(&self) -> PolicyKind {
        PolicyKind::RoundRobin
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        primary((ctx.seq % ctx.candidates.len().max(1) as u64) as usize)
    }
}

/// `jsq`: the least loaded candidate, ties at random.
#[derive(Debug)]
pub struct Jsq;
impl Policy for Jsq {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Jsq
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        primary(least_loaded(ctx))
    }
}

/// `p2c`: two distinct random candidates, the less loaded one (the first drawn on a tie).
#[derive(Debug)]
pub struct P2c;
impl P2c {
    /// The pair `p2c` draws for `rand` among `n` candidates.
    pub fn pair(n: usize, rand: u64) -> (usize, usize) {
        if n < 2 {
            return (0, 0);
        }
        let i = (rand % n as u64) as usize;
        let mut j = ((rand >> 32) % (n as u64 - 1)) as usize;
        if j >= i {
            j += 1;
        }
        (i, j)
    }
}
impl Policy for P2c {
    fn kind(&self) -> PolicyKind {
        PolicyKind::P2c
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let (i, j) = Self::pair(ctx.candidates.len(), ctx.rand);
        primary(if load_of(ctx, j) < load_of(ctx, i) {
            j
        } else {
            i
        })
    }
}

/// `session_hash`: the session key mapped onto the candidates; JSQ without a session.
#[derive(Debug)]
pub struct SessionHash;
impl Policy for SessionHash {
    fn kind(&self) -> PolicyKind {
        PolicyKind::SessionHash
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        match ctx.session {
            Some(key) => primary(hash_pick(ctx, key)),
            None => Pick {
                candidate: least_loaded(ctx),
                note: PickNote::NoSession,
            },
        }
    }
}

/// `prefix_key`: the prefix key mapped onto the candidates; JSQ when that candidate's load is above
/// `prefix_key_threshold`, or without a key.
#[derive(Debug)]
pub struct PrefixKey;
impl Policy for PrefixKey {
    fn kind(&self) -> PolicyKind {
        PolicyKind::PrefixKey
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let Some(key) = ctx.prefix_key else {
            return Pick {
                candidate: least_loaded(ctx),
                note: PickNote::NoPrefixKey,
            };
        };
        let preferred = hash_pick(ctx, key);
        if load_of(ctx, preferred) > f64::from(ctx.settings.prefix_key_threshold) {
            Pick {
                candidate: least_loaded(ctx),
                note: PickNote::Overflow,
            }
        } else {
            primary(preferred)
        }
    }
}

/// `load_cache_aware`: the highest `alpha * cache_affinity - beta * load_pressure`.
///
/// `cache_affinity` is the fraction of the request's blocks the directory places on the candidate,
/// raised to `session_affinity` where the candidate holds the request's session. `load_pressure` is
/// the candidate's load over the highest load among the candidates (0 when all are idle). Ties go to
/// the less loaded candidate, then at random.
#[derive(Debug)]
pub struct LoadCacheAware;
impl LoadCacheAware {
    /// The score of candidate `i`.
    pub fn score(ctx: &PickContext<'_>, i: usize) -> f64 {
        let Some(c) = ctx.candidates.get(i) else {
            return f64::NEG_INFINITY;
        };
        let max_load = ctx.candidates.iter().map(|c| c.load).fold(0.0f64, f64::max);
        let mut affinity = ctx.match_fraction(i);
        if c.holds_session {
            affinity = affinity.max(ctx.settings.session_affinity);
        }
        let pressure = if max_load > 0.0 {
            c.load / max_load
        } else {
            0.0
        };
        ctx.settings.alpha * affinity - ctx.settings.beta * pressure
    }
}
impl Policy for LoadCacheAware {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LoadCacheAware
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let scores: Vec<f64> = (0..ctx.candidates.len())
            .map(|i| Self::score(ctx, i))
            .collect();
        let s = |i: usize| scores.get(i).copied().unwrap_or(f64::NEG_INFINITY);
        primary(argbest(ctx.candidates.len(), ctx.rand, |a, b| {
            let d = s(a) - s(b);
            if d.abs() > 1e-12 {
                d.total_cmp(&0.0)
            } else {
                load_of(ctx, b).total_cmp(&load_of(ctx, a))
            }
        }))
    }
}

/// What the policies' tests share: endpoint names and a context of 20 blocks of 16 tokens.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{Candidate, PickContext};
    use crate::config::PolicySettings;

    use proptest::prelude::*;

    /// Endpoint names of the test candidates.
    pub const NAMES: [&str; 8] = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7"];

    /// [`context`] for a request whose session, prefix key and head key are all `key`, decided
    /// `key`-th (round robin's sequence) with the random draw `rand`.
    pub fn keyed<'a>(
        c: &'a [Candidate<'a>],
        s: &'a PolicySettings,
        key: u64,
        rand: u64,
    ) -> PickContext<'a> {
        PickContext {
            session: Some(key),
            prefix_key: Some(key),
            head_key: Some(key),
            seq: key,
            rand,
            ..context(c, s)
        }
    }

    /// 1 to 8 candidates: a load under `max_load` (also their in-flight count, and 20 blocks in
    /// flight per request), a match of up to the context's 20 blocks, the session or not, and an
    /// engine's KV usage and waiting queue or none.
    pub fn cands(max_load: u32) -> impl Strategy<Value = Vec<Candidate<'static>>> {
        prop::collection::vec(
            (
                0..max_load,
                0u32..=20,
                any::<bool>(),
                prop::option::of(0.0f64..1.0),
                prop::option::of(0u32..10),
            ),
            1..8,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (load, m, s, kv, q))| Candidate {
                    endpoint: i,
                    name: NAMES.get(i).copied().unwrap_or("e"),
                    load: f64::from(load),
                    matched_blocks: m,
                    holds_session: s,
                    inflight: f64::from(load),
                    kv_usage: kv,
                    waiting: q.map(f64::from),
                    active_blocks: f64::from(load) * 20.0,
                    ..Candidate::default()
                })
                .collect()
        })
    }

    /// A request of 20 fine blocks (320 tokens) with no keys, over `c`; tests override fields.
    pub fn context<'a>(c: &'a [Candidate<'a>], s: &'a PolicySettings) -> PickContext<'a> {
        PickContext {
            candidates: c,
            total_blocks: 20,
            session: None,
            prefix_key: None,
            head_key: None,
            settings: s,
            seq: 0,
            rand: 0,
            prompt_tokens: 320.0,
            tokens_per_block: 16.0,
            coarse_after: u32::MAX,
            coarse_factor: 1,
            directory_age_ms: 0,
            new_session: false,
            continuing_share: 0.0,
            head_share: 0.0,
            head_share_bound: 1.0,
            one_shot_share: 0.0,
            head_blocks: 2,
        }
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
    use super::test_support::{self, NAMES};
    use super::*;
    use proptest::prelude::*;

    /// Loads under 6, so that ties are common.
    fn cands() -> impl Strategy<Value = Vec<Candidate<'static>>> {
        test_support::cands(6)
    }

    use test_support::keyed as ctx;

    #[test]
    fn names_round_trip() {
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>(), Ok(*k));
            assert_eq!(policy(*k).kind(), *k);
        }
        assert_eq!(PolicyKind::ALL.len(), 13);
        assert_eq!(
            PolicyKind::ALL.iter().filter(|k| !k.is_reference()).count(),
            7
        );
    }

    proptest! {
        #[test]
        fn round_robin_cycles(c in cands(), start in 0u64..1000, rand in any::<u64>()) {
            let s = PolicySettings::default();
            let n = c.len();
            let picks: Vec<usize> = (start..start + 2 * n as u64)
                .map(|seq| RoundRobin.pick(&ctx(&c, &s, seq, rand)).candidate).collect();
            for w in 0..n {
                prop_assert_eq!(picks[w], picks[w + n]);
            }
            let mut first: Vec<usize> = picks[..n].to_vec();
            first.sort_unstable();
            prop_assert_eq!(first, (0..n).collect::<Vec<_>>());
        }

        #[test]
        fn jsq_picks_a_minimum(c in cands(), rand in any::<u64>()) {
            let s = PolicySettings::default();
            let p = Jsq.pick(&ctx(&c, &s, 0, rand)).candidate;
            let min = c.iter().map(|c| c.load).fold(f64::INFINITY, f64::min);
            prop_assert_eq!(c[p].load, min);
        }

        #[test]
        fn p2c_never_picks_the_worse_of_its_pair(c in cands(), rand in any::<u64>()) {
            let s = PolicySettings::default();
            let p = P2c.pick(&ctx(&c, &s, 0, rand)).candidate;
            let (i, j) = P2c::pair(c.len(), rand);
            prop_assert!(p == i || p == j);
            let other = if p == i { j } else { i };
            prop_assert!(c[p].load <= c[other].load);
            if c.len() >= 2 { prop_assert_ne!(i, j); }
        }

        #[test]
        fn session_hash_is_sticky(c in cands(), session in any::<u64>(), r1 in any::<u64>(), r2 in any::<u64>(), mode in 0..2) {
            let s = PolicySettings { hash_mode: HashMode::ALL[mode as usize], ..PolicySettings::default() };
            let mut c2 = c.clone();
            for x in &mut c2 { x.load += (r2 % 7) as f64; x.matched_blocks = 0; }
            let a = SessionHash.pick(&PickContext { session: Some(session), ..ctx(&c, &s, 1, r1) });
            let b = SessionHash.pick(&PickContext { session: Some(session), ..ctx(&c2, &s, 2, r2) });
            prop_assert_eq!(a, b);
            if s.hash_mode == HashMode::Modular {
                prop_assert_eq!(a.candidate, (session % c.len() as u64) as usize);
            }
        }

        #[test]
        fn prefix_key_sticky_then_overflows_to_jsq(c in cands(), key in any::<u64>(), rand in any::<u64>(), threshold in 0u32..5) {
            let s = PolicySettings { prefix_key_threshold: threshold, ..PolicySettings::default() };
            let p = PrefixKey.pick(&PickContext { prefix_key: Some(key), ..ctx(&c, &s, 0, rand) });
            let preferred = (key % c.len() as u64) as usize;
            if c[preferred].load > f64::from(threshold) {
                prop_assert_eq!(p.note, PickNote::Overflow);
                let min = c.iter().map(|c| c.load).fold(f64::INFINITY, f64::min);
                prop_assert_eq!(c[p.candidate].load, min);
            } else {
                prop_assert_eq!(p, Pick { candidate: preferred, note: PickNote::Primary });
            }
        }

        #[test]
        fn load_cache_aware_beta0_follows_longest_match(mut c in cands(), rand in any::<u64>()) {
            for x in &mut c { x.holds_session = false; }
            let s = PolicySettings { alpha: 0.7, beta: 0.0, ..PolicySettings::default() };
            let p = LoadCacheAware.pick(&ctx(&c, &s, 0, rand)).candidate;
            let best = c.iter().map(|c| c.matched_blocks).max().unwrap();
            prop_assert_eq!(c[p].matched_blocks, best);
        }

        #[test]
        fn load_cache_aware_alpha0_follows_load(c in cands(), rand in any::<u64>()) {
            let s = PolicySettings { alpha: 0.0, beta: 0.3, ..PolicySettings::default() };
            let p = LoadCacheAware.pick(&ctx(&c, &s, 0, rand)).candidate;
            let min = c.iter().map(|c| c.load).fold(f64::INFINITY, f64::min);
            prop_assert_eq!(c[p].load, min);
        }

        #[test]
        fn load_cache_aware_picks_max_score(c in cands(), rand in any::<u64>(), a in 0.0f64..1.0, b in 0.0f64..1.0) {
            let s = PolicySettings { alpha: a, beta: b, ..PolicySettings::default() };
            let x = ctx(&c, &s, 0, rand);
            let p = LoadCacheAware.pick(&x).candidate;
            let best = (0..c.len()).map(|i| LoadCacheAware::score(&x, i)).fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(LoadCacheAware::score(&x, p) >= best - 1e-9);
        }
    }

    #[test]
    fn no_session_or_key_falls_back_to_jsq() {
        let s = PolicySettings::default();
        let c = [
            Candidate {
                endpoint: 0,
                name: "a",
                load: 3.0,
                matched_blocks: 0,
                holds_session: false,
                ..Candidate::default()
            },
            Candidate {
                endpoint: 1,
                name: "b",
                load: 1.0,
                matched_blocks: 0,
                holds_session: false,
                ..Candidate::default()
            },
        ];
        let x = PickContext {
            session: None,
            prefix_key: None,
            ..ctx(&c, &s, 0, 0)
        };
        assert_eq!(
            SessionHash.pick(&x),
            Pick {
                candidate: 1,
                note: PickNote::NoSession
            }
        );
        assert_eq!(
            PrefixKey.pick(&x),
            Pick {
                candidate: 1,
                note: PickNote::NoPrefixKey
            }
        );
    }

    #[test]
    fn rendezvous_moves_only_removed_endpoint_keys() {
        let s = PolicySettings {
            hash_mode: HashMode::Rendezvous,
            ..PolicySettings::default()
        };
        let all: Vec<Candidate<'_>> = (0..4)
            .map(|i| Candidate {
                endpoint: i,
                name: NAMES[i],
                load: 0.0,
                matched_blocks: 0,
                holds_session: false,
                ..Candidate::default()
            })
            .collect();
        let without2: Vec<Candidate<'_>> =
            all.iter().filter(|c| c.endpoint != 2).cloned().collect();
        for key in 0..500u64 {
            let a = all[SessionHash
                .pick(&PickContext {
                    session: Some(key),
                    ..ctx(&all, &s, 0, 0)
                })
                .candidate]
                .endpoint;
            let b = without2[SessionHash
                .pick(&PickContext {
                    session: Some(key),
                    ..ctx(&without2, &s, 0, 0)
                })
                .candidate]
                .endpoint;
            if a != 2 {
                assert_eq!(a, b);
            }
        }
    }
}
