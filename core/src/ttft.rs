//! `predicted_ttft`: every endpoint scored in predicted milliseconds to the request's first token.
//!
//! A cache hit and a queue are both time: a hit saves the prefill of the tokens an endpoint already
//! holds, a queue costs the prefill of the work sent there before. So for each candidate `i`:
//!
//! ```text
//! predicted_i = 1000 * (queued_i + uncached_i) / rate_i + busy_i            (ms)
//! score_i     = predicted_i + work_weight * 1000 * uncached_i / rate_i   (work_weight 0 for a
//!               request that opens a session over a hot prefix: one that begins at least 1/N of
//!               the recent requests, whose copies serve the requests that follow)
//! queued_i    = prompt tokens the gateway sent to i that i has not answered yet, less the tokens
//!               the directory placed on i at each of their decisions (their predicted prefill)
//! uncached_i  = max(prompt_tokens - w * matched_tokens_i, 0)
//! w           = 0.5 ^ (directory_age_ms / ttft_cache_halflife_ms)   (older views count less)
//! rate_i      = the fleet's measured prefill throughput (tokens/s: the mean of the engines the
//!               sidecar has measured, [`crate::rates`]); with `ttft_rates = per_endpoint`, i's own
//!               (for fleets of unlike engines); with none measured, `ttft_prefill_tps`
//! busy_i      = 1000 * step_i / 2 if i has requests in flight, else 0: the rest of the step in
//!               progress, which a request arriving at a busy engine waits for (half a step on
//!               average); step_i the measured time per output token, pooled like the rates (0
//!               until measured)
//! ```
//!
//! The lowest score wins; ties go to the endpoint with fewer requests in flight, then at random.
//! `predicted_i` is the request's own wait; the second term (`ttft_work_weight`, 1 by default) is
//! what its prefill costs the requests that reach that endpoint after it: a miss recomputes
//! tokens that a hit would not, and every request queued behind waits for them.
//!
//! Choices, measured in the simulator (`kvroute-sim-grid`, ShareGPT at N = 2 and 8, 0.25x to 2x):
//! - Rates are pooled by default. An engine's measured prefill rate moves with its load (prefills
//!   share steps with other prefills and decodes), so on a fleet of like engines per-endpoint
//!   rates add noise that sends requests away from their cache: at N = 8, 0.25x, 0.17 lower hit
//!   rate and 1.36x the P95 of the same policy with pooled rates.
//! - Decode load is not a term beyond the step in progress: a prefill step is compute-bound and a
//!   decoding sequence adds one token to it, so even 100 decoding sequences change a 2,048-token
//!   prefill step by 5%. Adding the measured time per output token for a busy endpoint sent
//!   requests away from their cache. But an idle engine starts a request at once, and a busy one
//!   only when its current step ends: without `busy_i`, a question over a document went to a busy
//!   holder that matched one block more than an idle holder (saving 2 ms and waiting 5), in 41% of
//!   one document's questions (simulated RAG, 32 engines at 0.5x: P95 17 ms against 10 with it,
//!   `round_robin` 10).
//!
//! Every term grows with the work sent to an endpoint, so no prefix, however widely shared,
//! sends every request to one endpoint: once its queue costs more than recomputing the prefix
//! elsewhere, the next request goes to a second holder (or to a cold endpoint, which then becomes
//! one). Unhealthy endpoints are not candidates ([`crate::router::decide`]).
//!
//! Two rules place a request that opens a session by more than its own wait: a new conversation
//! starts where fewer conversations are served (`PredictedTtft::session_share`), and a question
//! over a shared document that finds every holder busy makes a copy on an idle endpoint
//! (`PredictedTtft::idle_copy`).

use crate::policy::{
    argbest, primary, Candidate, Pick, PickContext, PickNote, Policy, PolicyKind, RateScope,
};

/// The `predicted_ttft` policy.
#[derive(Debug)]
pub struct PredictedTtft;

/// Weight of the directory's matches for a view `age_ms` old.
pub fn cache_weight(age_ms: u64, halflife_ms: u32) -> f64 {
    if age_ms == 0 {
        return 1.0;
    }
    0.5f64.powf(age_ms as f64 / f64::from(halflife_ms.max(1)))
}

/// Each candidate's value of a figure the sidecar measures per engine (`get`), taken as
/// `ttft_rates` says: pooled, the mean over the measured engines for every candidate; per
/// endpoint, its own, else that mean; `unmeasured` where no engine is measured.
fn measured_or_mean(
    ctx: &PickContext<'_>,
    get: impl Fn(&Candidate<'_>) -> Option<f64>,
    unmeasured: f64,
) -> Vec<f64> {
    let measured = |c: &Candidate<'_>| get(c).filter(|x| x.is_finite() && *x > 0.0);
    let (sum, n) = ctx
        .candidates
        .iter()
        .filter_map(measured)
        .fold((0.0, 0u32), |(s, n), r| (s + r, n + 1));
    let mean = if n > 0 {
        sum / f64::from(n)
    } else {
        unmeasured
    };
    ctx.candidates
        .iter()
        .map(|c| match ctx.settings.ttft_rates {
            RateScope::Pooled => mean,
            RateScope::PerEndpoint => measured(c).unwrap_or(mean),
        })
        .collect()
}

/// Each candidate's prefill throughput, tokens/s: measured, else the mean of the measured ones,
/// else the configured default.
pub fn prefill_rates(ctx: &PickContext<'_>) -> Vec<f64> {
    measured_or_mean(
        ctx,
        |c| c.prefill_tps,
        ctx.settings.ttft_prefill_tps.max(1.0),
    )
}

/// Each candidate's time per decode step, seconds (the sidecar's measured time per output token),
/// taken as [`prefill_rates`] takes rates; 0 where none is measured (the step in progress is then
/// not counted).
pub fn step_times(ctx: &PickContext<'_>) -> Vec<f64> {
    measured_or_mean(ctx, |c| c.step_s, 0.0)
}

/// Prefill work, in tokens of linear-layer compute, of `uncached` tokens computed after `cached`
/// ones: each token also attends to every token before it, which costs as much as its linear
/// layers at a context of `attention_tokens` (0: attention not counted).
pub fn prefill_work(uncached: f64, cached: f64, attention_tokens: u32) -> f64 {
    let u = uncached.max(0.0);
    if attention_tokens == 0 {
        return u;
    }
    u + u * (cached.max(0.0) + u / 2.0) / f64::from(attention_tokens)
}

/// The request's prompt tokens that candidate `i` does not hold, as the policies estimate them:
/// the whole prompt less the directory's match on `i`, the match weighted by `weight`.
pub fn uncached_tokens(ctx: &PickContext<'_>, i: usize, weight: f64) -> f64 {
    let total = prompt_total(ctx);
    let matched = ctx
        .candidates
        .get(i)
        .map_or(0.0, |c| ctx.units(c.matched_blocks) * ctx.tokens_per_block);
    (total - weight * matched).max(0.0)
}

/// The request's prompt tokens as the policies estimate them: its size, or its blocks' if more.
pub(crate) fn prompt_total(ctx: &PickContext<'_>) -> f64 {
    ctx.prompt_tokens
        .max(ctx.units(ctx.total_blocks) * ctx.tokens_per_block)
}

impl PredictedTtft {
    /// The share of the recent requests above which questions over shared prefixes are most of
    /// them ([`PredictedTtft::idle_copy`]).
    const MOST: f64 = 0.5;

    /// The share of a step that a request arriving at a busy engine waits for, on average, before
    /// the engine schedules it (a uniform arrival within the step in progress).
    const STEP_IN_PROGRESS: f64 = 0.5;

    /// Every candidate's (predicted time to first token, own prefill time), ms.
    fn parts(ctx: &PickContext<'_>) -> Vec<(f64, f64)> {
        let rates = prefill_rates(ctx);
        let w = cache_weight(ctx.directory_age_ms, ctx.settings.ttft_cache_halflife_ms);
        let total = prompt_total(ctx);
        let a = ctx.settings.ttft_attention_tokens;
        ctx.candidates
            .iter()
            .zip(rates)
            .zip(step_times(ctx))
            .enumerate()
            .map(|(i, ((c, rate), step))| {
                let u = uncached_tokens(ctx, i, w);
                let own = 1000.0 * prefill_work(u, total - u, a) / rate;
                let busy = if c.inflight > 0.0 {
                    1000.0 * Self::STEP_IN_PROGRESS * step
                } else {
                    0.0
                };
                (
                    1000.0 * c.queued_prefill_tokens.max(0.0) / rate + busy + own,
                    own,
                )
            })
            .collect()
    }

    /// For a new session, when most requests continue one ([`PolicySettings::ttft_session_spread`]):
    /// whether candidate `i` serves no more than the mean number of conversations (sessions less
    /// single questions over a shared document: [`crate::directory::SessionStats::per_endpoint`]).
    /// A session's later requests follow its cache, so where its first one goes decides their
    /// queue too; placed by each first request's own wait alone, sessions gather on the endpoints
    /// that hold a prefix they all share (a tool and system prompt) while the others stay idle.
    /// "Most requests" are those that begin as this one does where the directory counted enough
    /// of them
    /// ([`PickContext::continuing_share`]): a question over a shared document, whose kind never
    /// continues, is not moved away from the document's holders.
    ///
    /// [`PolicySettings::ttft_session_spread`]: crate::config::PolicySettings::ttft_session_spread
    fn session_share<'a>(ctx: &'a PickContext<'_>) -> Option<impl Fn(usize) -> bool + 'a> {
        let spread = ctx.settings.ttft_session_spread;
        if !ctx.new_session || spread >= 1.0 || ctx.continuing_share < spread {
            return None;
        }
        let n = ctx.candidates.len().max(1) as f64;
        let mean = ctx
            .candidates
            .iter()
            .map(|c| f64::from(c.sessions))
            .sum::<f64>()
            / n;
        Some(move |i: usize| {
            ctx.candidates
                .get(i)
                .is_some_and(|c| f64::from(c.sessions) <= mean)
        })
    }

    /// For a question over a shared prefix ([`PolicySettings::ttft_idle_copies`]): whether to send
    /// it to an idle endpoint rather than to `best`, the fastest. A question opens a session, and
    /// the requests that begin as it does do not continue one (the same test that keeps it out of
    /// the session spread): RAG questions over a few documents. Each question placed by its own
    /// wait stays with the document's holders, since a queue at a holder costs it less than
    /// recomputing the document elsewhere; on a fleet with idle endpoints the holders stay busy,
    /// and every question pays their queue, while round robin pays one recompute per endpoint and
    /// document and then answers every question on an idle endpoint. So when every holder is busy
    /// (`best` has requests in flight) and an endpoint is idle, the question goes to the fastest
    /// idle one, which then holds the document too, as long as fewer endpoints hold the head than
    /// `ttft_idle_copies` times the head's share of the recent requests times the endpoints: a
    /// document's holders are bounded by the traffic it brings, so that copies of a rare document
    /// do not crowd the KV caches (where they would be evicted and recomputed again). And only
    /// where such questions are most of the recent requests: where conversations are, a copy
    /// evicts histories their next turns need (simulated mix of ShareGPT and RAG at N = 16, 1x:
    /// 1.5 points of hit rate lost in every repeat, from ten copies early in the run).
    ///
    /// [`PolicySettings::ttft_idle_copies`]: crate::config::PolicySettings::ttft_idle_copies
    fn idle_copy(ctx: &PickContext<'_>, best: usize) -> bool {
        let s = ctx.settings;
        let busy = |i: usize| ctx.candidates.get(i).is_some_and(|c| c.inflight > 0.0);
        if !ctx.new_session
            || ctx.head_share <= 0.0
            || ctx.continuing_share >= s.ttft_session_spread
            || ctx.one_shot_share <= Self::MOST
            || !busy(best)
        {
            return false;
        }
        let head = ctx.head_blocks.min(ctx.total_blocks).max(1);
        let holders = ctx
            .candidates
            .iter()
            .filter(|c| c.matched_blocks >= head)
            .count() as f64;
        let n = ctx.candidates.len() as f64;
        holders < s.ttft_idle_copies * ctx.head_share * n
            && ctx.candidates.iter().any(|c| c.inflight <= 0.0)
    }

    /// Every candidate's predicted time to first token, ms.
    pub fn predicted_ms(ctx: &PickContext<'_>) -> Vec<f64> {
        Self::parts(ctx).into_iter().map(|(t, _)| t).collect()
    }

    /// Every candidate's score, ms: its predicted time to first token plus `ttft_work_weight`
    /// times this request's own prefill there (the delay it adds for the requests behind it).
    ///
    /// A request that opens a session ([`PickContext::new_session`]) over a hot prefix is not
    /// charged the work term: what it recomputes is a prefix it shares with other sessions (a
    /// document, a tool and system prompt), and the copy it leaves serves the requests that
    /// follow, where a follow-up's recompute only duplicates a history cached elsewhere. Charged,
    /// a hot shared prefix stays on as few endpoints as the queues allow (simulated RAG, four
    /// documents, 64 engines at 2x: P95 59 ms against 22 uncharged and `round_robin`'s 21).
    /// A prefix is hot when its prompt head begins at least one endpoint's share (1/N) of the
    /// recent requests ([`PickContext::head_share_bound`]): more than one endpoint's worth of
    /// traffic needs more than one copy. Below that, a new session is charged like a follow-up,
    /// and its prefix stays with its holders: in a trace of requests that each open a session
    /// over prefixes few others share (Mooncake), exempting them all cost hit rate (simulated, 8
    /// engines: 0.323 against 0.334 charged, `llmd_scorer` 0.353) for no gain in P95.
    pub fn scores(ctx: &PickContext<'_>) -> Vec<f64> {
        let hot = ctx.head_share_bound * ctx.candidates.len() as f64 >= 1.0;
        let ww = if ctx.new_session && hot {
            0.0
        } else {
            ctx.settings.ttft_work_weight
        };
        Self::parts(ctx)
            .into_iter()
            .map(|(t, own)| t + ww * own)
            .collect()
    }
}

impl Policy for PredictedTtft {
    fn kind(&self) -> PolicyKind {
        PolicyKind::PredictedTtft
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let t = Self::scores(ctx);
        let at = |i: usize| t.get(i).copied().unwrap_or(f64::INFINITY);
        let inflight = |i: usize| ctx.candidates.get(i).map_or(f64::INFINITY, |c| c.inflight);
        let faster = |a: usize, b: usize| {
            let d = at(b) - at(a);
            if d.abs() > 1e-9 {
                d.total_cmp(&0.0)
            } else {
                inflight(b).total_cmp(&inflight(a))
            }
        };
        let n = ctx.candidates.len();
        let best = argbest(n, ctx.rand, faster);
        if Self::idle_copy(ctx, best) {
            let idle = |i: usize| inflight(i) <= 0.0;
            return Pick {
                candidate: argbest(n, ctx.rand, |a, b| {
                    idle(a).cmp(&idle(b)).then_with(|| faster(a, b))
                }),
                note: PickNote::IdleCopy,
            };
        }
        let Some(within) = Self::session_share(ctx) else {
            return primary(best);
        };
        if within(best) {
            return primary(best);
        }
        Pick {
            candidate: argbest(n, ctx.rand, |a, b| {
                within(a).cmp(&within(b)).then_with(|| faster(a, b))
            }),
            note: PickNote::SessionSpread,
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
    use super::*;
    use crate::config::PolicySettings;
    use crate::policy::test_support::{context, NAMES};
    use crate::policy::{Candidate, RateScope};
    use proptest::prelude::*;

    /// A request of 40 blocks, 640 tokens.
    fn ctx<'a>(c: &'a [Candidate<'a>], s: &'a PolicySettings, rand: u64) -> PickContext<'a> {
        PickContext {
            total_blocks: 40,
            prompt_tokens: 640.0,
            rand,
            ..context(c, s)
        }
    }

    fn cand(i: usize, matched: u32, queued: f64, tps: Option<f64>) -> Candidate<'static> {
        Candidate {
            endpoint: i,
            name: NAMES[i],
            matched_blocks: matched,
            queued_prefill_tokens: queued,
            inflight: if queued > 0.0 { 1.0 } else { 0.0 },
            prefill_tps: tps,
            ..Candidate::default()
        }
    }

    fn cands() -> impl Strategy<Value = Vec<Candidate<'static>>> {
        prop::collection::vec(
            (
                0u32..=40,
                0u32..20_000,
                prop::option::of(1_000u32..50_000),
                0u32..5,
            ),
            1..8,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (m, q, tps, inflight))| Candidate {
                    inflight: f64::from(inflight),
                    step_s: Some(0.01),
                    ..cand(i, m, f64::from(q), tps.map(f64::from))
                })
                .collect()
        })
    }

    /// The defaults with attention not counted: work is tokens, so the figures are round.
    fn linear() -> PolicySettings {
        PolicySettings {
            ttft_attention_tokens: 0,
            ..PolicySettings::default()
        }
    }

    #[test]
    fn idle_endpoints_follow_the_cache() {
        let s = linear();
        let c = [cand(0, 0, 0.0, None), cand(1, 30, 0.0, None)];
        let x = ctx(&c, &s, 0);
        assert_eq!(PredictedTtft.pick(&x).candidate, 1);
        let t = PredictedTtft::predicted_ms(&x);
        // 640 tokens at the default 10,000 tokens/s, against the 160 not cached on e1.
        assert!(
            (t[0] - 64.0).abs() < 1e-9 && (t[1] - 16.0).abs() < 1e-9,
            "{t:?}"
        );
    }

    #[test]
    fn a_hot_holder_spills_once_its_queue_costs_more_than_recomputing() {
        // e1 holds 480 of the 640 tokens. Without the work term it keeps the request while its
        // queue is under the 480 tokens a miss would recompute; with it (weight 1), while the
        // queue is under the 960 tokens the miss adds in all (480 waited for, 480 imposed).
        let own = PolicySettings {
            ttft_work_weight: 0.0,
            ..linear()
        };
        let both = linear();
        for (s, cases) in [
            (&own, [(400.0, 1), (479.0, 1), (481.0, 0), (5_000.0, 0)]),
            (&both, [(900.0, 1), (959.0, 1), (961.0, 0), (5_000.0, 0)]),
        ] {
            for (queued, want) in cases {
                let c = [cand(0, 0, 0.0, None), cand(1, 30, queued, None)];
                assert_eq!(
                    PredictedTtft.pick(&ctx(&c, s, 0)).candidate,
                    want,
                    "{queued}"
                );
            }
        }
    }

    #[test]
    fn measured_rates_weigh_the_work() {
        let s = PolicySettings {
            ttft_rates: RateScope::PerEndpoint,
            ..PolicySettings::default()
        };
        // The same uncached work, but e0 prefills four times faster.
        let c = [
            cand(0, 0, 1_000.0, Some(40_000.0)),
            cand(1, 0, 500.0, Some(10_000.0)),
        ];
        assert_eq!(PredictedTtft.pick(&ctx(&c, &s, 0)).candidate, 0);
        // An unmeasured engine is taken at the mean of the measured ones.
        let c = [cand(0, 0, 0.0, Some(20_000.0)), cand(1, 0, 0.0, None)];
        assert_eq!(prefill_rates(&ctx(&c, &s, 0)), vec![20_000.0, 20_000.0]);
        // Pooled (the default), every endpoint is taken at the fleet's mean.
        let pooled = PolicySettings::default();
        let c = [
            cand(0, 0, 1_000.0, Some(40_000.0)),
            cand(1, 0, 500.0, Some(10_000.0)),
        ];
        assert_eq!(
            prefill_rates(&ctx(&c, &pooled, 0)),
            vec![25_000.0, 25_000.0]
        );
        assert_eq!(PredictedTtft.pick(&ctx(&c, &pooled, 0)).candidate, 1);
        // None measured: the configured rate.
        let c = [cand(0, 0, 0.0, None), cand(1, 0, 0.0, None)];
        assert_eq!(
            prefill_rates(&ctx(&c, &pooled, 0)),
            vec![10_000.0, 10_000.0]
        );
    }

    #[test]
    fn a_new_session_over_a_hot_prefix_is_not_charged_the_work_term() {
        // e1 holds 480 of the 640 tokens behind a queue of 700: over the 480 a miss recomputes,
        // under the 960 it costs with the work term.
        let s = linear();
        let c = [cand(0, 0, 0.0, None), cand(1, 30, 700.0, None)];
        let follow_up = ctx(&c, &s, 0);
        assert_eq!(PredictedTtft.pick(&follow_up).candidate, 1);
        // A new session whose head begins half the requests or more (one endpoint's share of two)
        // is not charged (1: no session stats kept); under one endpoint's share (a prefix few
        // requests share, a head not followed) it is charged, as a follow-up is.
        for (bound, pick) in [(0.5, 0), (1.0, 0), (0.0, 1), (0.49, 1)] {
            let opening = PickContext {
                new_session: true,
                head_share_bound: bound,
                ..ctx(&c, &s, 0)
            };
            assert_eq!(PredictedTtft.pick(&opening).candidate, pick, "{bound}");
        }
    }

    #[test]
    fn a_busy_endpoint_costs_the_rest_of_its_step() {
        // e1 matches one block (16 tokens, 1.6 ms of prefill, 3.2 with the work term) more than
        // e0, but is decoding (a request in flight, nothing queued) at 10 ms a step: a request
        // waits 5 ms there on average before it is scheduled, so the idle e0 is faster.
        let s = linear();
        let busy = |m: u32, step: Option<f64>| Candidate {
            inflight: 1.0,
            step_s: step,
            ..cand(1, m, 0.0, None)
        };
        let c = [cand(0, 29, 0.0, None), busy(30, Some(0.01))];
        let x = ctx(&c, &s, 0);
        assert_eq!(PredictedTtft.pick(&x).candidate, 0);
        let t = PredictedTtft::predicted_ms(&x);
        assert!((t[1] - t[0] - (5.0 - 1.6)).abs() < 1e-9, "{t:?}");
        // Ten blocks more are worth the wait.
        let c = [cand(0, 20, 0.0, None), busy(30, Some(0.01))];
        assert_eq!(PredictedTtft.pick(&ctx(&c, &s, 0)).candidate, 1);
        // Until a step is measured, it is not counted; an unmeasured engine is taken at the
        // measured ones' mean.
        let c = [cand(0, 29, 0.0, None), busy(30, None)];
        assert_eq!(PredictedTtft.pick(&ctx(&c, &s, 0)).candidate, 1);
        let c = [
            Candidate {
                step_s: Some(0.02),
                ..cand(0, 0, 0.0, None)
            },
            busy(0, None),
        ];
        assert_eq!(step_times(&ctx(&c, &s, 0)), vec![0.02, 0.02]);
    }

    #[test]
    fn an_old_view_weighs_matches_less() {
        assert_eq!(cache_weight(0, 10_000), 1.0);
        assert!((cache_weight(10_000, 10_000) - 0.5).abs() < 1e-12);
        let s = PolicySettings::default();
        // Fresh: e1's 30 matched blocks (480 tokens) outweigh its 300 queued tokens.
        let c = [cand(0, 0, 0.0, None), cand(1, 30, 300.0, None)];
        assert_eq!(PredictedTtft.pick(&ctx(&c, &s, 0)).candidate, 1);
        // Two half-lives old, they count as 120 tokens: less than the queue.
        let x = PickContext {
            directory_age_ms: 20_000,
            ..ctx(&c, &s, 0)
        };
        assert_eq!(PredictedTtft.pick(&x).candidate, 0);
    }

    #[test]
    fn a_shared_prefix_does_not_concentrate_load() {
        // Every request shares its first 30 of 40 blocks, recorded on e0 only; each decision's
        // uncached work is queued where it went (nothing is answered in between).
        let s = PolicySettings::default();
        let mut queued = [0.0f64; 4];
        let mut holds = [true, false, false, false];
        let mut sent = [0u32; 4];
        for r in 0..200u64 {
            let c: Vec<Candidate<'_>> = (0..4)
                .map(|i| cand(i, if holds[i] { 30 } else { 0 }, queued[i], None))
                .collect();
            let x = ctx(&c, &s, r);
            let p = PredictedTtft.pick(&x).candidate;
            queued[p] += uncached_tokens(&x, p, 1.0);
            holds[p] = true;
            sent[p] += 1;
        }
        assert!(sent.iter().all(|n| (40..=60).contains(n)), "{sent:?}");
    }

    #[test]
    fn long_sessions_start_where_there_are_fewer_sessions() {
        // e0 holds the prefix every session shares and is idle, but already serves three
        // sessions to e1's none.
        let s = PolicySettings::default();
        let mut c = [cand(0, 30, 0.0, None), cand(1, 0, 0.0, None)];
        c[0].sessions = 3;
        let new = |share: f64| PickContext {
            new_session: true,
            continuing_share: share,
            ..ctx(&c, &s, 0)
        };
        // Most requests continue a session: the new one starts on e1.
        let p = PredictedTtft.pick(&new(0.9));
        assert_eq!((p.candidate, p.note), (1, PickNote::SessionSpread));
        // Every request its own session (RAG, a trace of single requests): the cache wins.
        assert_eq!(PredictedTtft.pick(&new(0.1)).candidate, 0);
        // A request continuing its session is placed by its own wait, as is every request
        // with the rule switched off.
        let cont = PickContext {
            continuing_share: 0.9,
            ..ctx(&c, &s, 0)
        };
        assert_eq!(PredictedTtft.pick(&cont).candidate, 0);
        let off = PolicySettings {
            ttft_session_spread: 1.0,
            ..PolicySettings::default()
        };
        let x = PickContext {
            settings: &off,
            ..new(1.0)
        };
        assert_eq!(PredictedTtft.pick(&x).candidate, 0);
    }

    #[test]
    fn a_question_finding_every_holder_busy_opens_a_copy_on_an_idle_endpoint() {
        // e0 and e1 hold the document (30 of the 40 blocks) and each has a request in flight; e2
        // is idle and holds nothing; e3 is busy and holds nothing.
        let s = PolicySettings::default();
        let mut c = [
            cand(0, 30, 0.0, None),
            cand(1, 30, 0.0, None),
            cand(2, 0, 0.0, None),
            cand(3, 0, 0.0, None),
        ];
        for i in [0, 1, 3] {
            c[i].inflight = 1.0;
        }
        // A question (its own session, of a head whose requests never continue one) of a
        // document that begins half the requests: up to 2 x 0.5 x 4 = 4 endpoints may hold it.
        // Such questions are 90% of the recent requests.
        let question = |c: &[Candidate<'static>; 4], share: f64| {
            let x = PickContext {
                new_session: true,
                continuing_share: 0.0,
                head_share: share,
                one_shot_share: 0.9,
                ..ctx(c, &s, 0)
            };
            PredictedTtft.pick(&x)
        };
        let p = question(&c, 0.5);
        assert_eq!((p.candidate, p.note), (2, PickNote::IdleCopy));
        // A document of a quarter of the requests is already held by as many as it may be (2).
        assert!(question(&c, 0.25).candidate < 2);
        // A head not counted enough (no share): the holders' wait is the shorter.
        assert!(question(&c, 0.0).candidate < 2);
        // An idle holder: it is the fastest, and no copy is made.
        let mut idle_holder = c.clone();
        idle_holder[1].inflight = 0.0;
        assert_eq!(question(&idle_holder, 0.5), primary(1));
        // No idle endpoint: the fastest holder.
        let mut all_busy = c.clone();
        all_busy[2].inflight = 1.0;
        assert!(question(&all_busy, 0.5).candidate < 2);
        // Questions are fewer than half the requests (conversations, whose histories a copy
        // would evict, are the rest): the holders.
        let among_conversations = PickContext {
            new_session: true,
            head_share: 0.3,
            one_shot_share: 0.4,
            ..ctx(&c, &s, 0)
        };
        assert!(PredictedTtft.pick(&among_conversations).candidate < 2);
        // A follow-up, a new conversation (its head's requests continue sessions), and the rule
        // switched off: the holders.
        let follow_up = PickContext {
            head_share: 0.5,
            ..ctx(&c, &s, 0)
        };
        assert!(PredictedTtft.pick(&follow_up).candidate < 2);
        let conversation = PickContext {
            new_session: true,
            continuing_share: 0.9,
            head_share: 0.5,
            ..ctx(&c, &s, 0)
        };
        assert!(PredictedTtft.pick(&conversation).candidate < 2);
        let off = PolicySettings {
            ttft_idle_copies: 0.0,
            ..PolicySettings::default()
        };
        let x = PickContext {
            new_session: true,
            head_share: 1.0,
            one_shot_share: 1.0,
            ..ctx(&c, &off, 0)
        };
        assert!(PredictedTtft.pick(&x).candidate < 2);
    }

    #[test]
    fn attention_makes_long_contexts_cost_more() {
        // 1,000 new tokens cost more after 50,000 cached than after none, and recomputing a
        // 50,000-token history costs more than 50x its first 1,000 tokens.
        assert_eq!(prefill_work(1_000.0, 0.0, 0), 1_000.0);
        assert!(prefill_work(1_000.0, 50_000.0, 26_624) > 2.0 * prefill_work(1_000.0, 0.0, 26_624));
        assert!(prefill_work(50_000.0, 0.0, 26_624) > 50.0 * prefill_work(1_000.0, 0.0, 26_624));
        assert_eq!(prefill_work(-5.0, 10.0, 26_624), 0.0);
    }

    proptest! {
        #[test]
        fn new_sessions_go_to_an_endpoint_at_or_under_the_mean(
            c in cands(),
            sessions in prop::collection::vec(0u32..20, 8),
            rand in any::<u64>(),
        ) {
            let s = PolicySettings::default();
            let mut c = c;
            for (x, n) in c.iter_mut().zip(&sessions) {
                x.sessions = *n;
            }
            let x = PickContext { new_session: true, continuing_share: 0.8, ..ctx(&c, &s, rand) };
            let p = PredictedTtft.pick(&x).candidate;
            let mean = c.iter().map(|x| f64::from(x.sessions)).sum::<f64>() / c.len() as f64;
            prop_assert!(f64::from(c[p].sessions) <= mean);
            // ... the fastest of those.
            let t = PredictedTtft::scores(&x);
            let min = (0..c.len())
                .filter(|i| f64::from(c[*i].sessions) <= mean)
                .map(|i| t[i])
                .fold(f64::INFINITY, f64::min);
            prop_assert!(t[p] <= min + 1e-9);
        }

        #[test]
        fn a_copy_goes_to_the_fastest_idle_endpoint_when_the_fastest_is_busy(
            c in cands(),
            share in 0.0f64..1.0,
            rand in any::<u64>(),
        ) {
            let s = PolicySettings::default();
            let x = PickContext {
                new_session: true,
                continuing_share: 0.0,
                head_share: share,
                one_shot_share: 1.0,
                ..ctx(&c, &s, rand)
            };
            let p = PredictedTtft.pick(&x);
            let t = PredictedTtft::scores(&x);
            let min = |idle: bool| {
                (0..c.len())
                    .filter(|i| !idle || c[*i].inflight <= 0.0)
                    .map(|i| t[i])
                    .fold(f64::INFINITY, f64::min)
            };
            if p.note == PickNote::IdleCopy {
                prop_assert!(c[p.candidate].inflight <= 0.0);
                prop_assert!(t[p.candidate] <= min(true) + 1e-9);
                // Only when an idle endpoint is not already the fastest.
                prop_assert!(min(true) > min(false) - 1e-9);
            } else {
                prop_assert!(t[p.candidate] <= min(false) + 1e-9);
            }
        }

        #[test]
        fn picks_a_minimum_score(c in cands(), rand in any::<u64>(), age in 0u64..60_000, per in any::<bool>()) {
            let s = PolicySettings {
                ttft_rates: if per { RateScope::PerEndpoint } else { RateScope::Pooled },
                ..PolicySettings::default()
            };
            let x = PickContext { directory_age_ms: age, ..ctx(&c, &s, rand) };
            let t = PredictedTtft::scores(&x);
            let p = PredictedTtft.pick(&x).candidate;
            let min = t.iter().copied().fold(f64::INFINITY, f64::min);
            prop_assert!(t[p] <= min + 1e-9);
            prop_assert!(t.iter().all(|v| v.is_finite() && *v >= 0.0));
        }

        #[test]
        fn more_queued_work_never_helps(c in cands(), i in 0usize..8, extra in 1.0f64..10_000.0) {
            let s = PolicySettings::default();
            let i = i % c.len();
            let before = PredictedTtft::predicted_ms(&ctx(&c, &s, 0))[i];
            let mut c2 = c.clone();
            c2[i].queued_prefill_tokens += extra;
            let after = PredictedTtft::predicted_ms(&ctx(&c2, &s, 0))[i];
            prop_assert!(after > before);
        }

        #[test]
        fn longer_matches_never_hurt(c in cands(), i in 0usize..8) {
            let s = PolicySettings::default();
            let i = i % c.len();
            let before = PredictedTtft::predicted_ms(&ctx(&c, &s, 0))[i];
            let mut c2 = c.clone();
            c2[i].matched_blocks = (c2[i].matched_blocks + 5).min(40);
            let after = PredictedTtft::predicted_ms(&ctx(&c2, &s, 0))[i];
            prop_assert!(after <= before);
        }
    }
}
