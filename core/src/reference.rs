//! Reference policies: the routing rules production routers ship, written against kvroute's
//! [`Policy`] trait so the filter, the simulator and the study run them beside kvroute's own six.
//!
//! Each one reads what its origin reads, mapped onto what a gateway sees:
//!
//! | policy | origin | load it reads | cache it reads |
//! |---|---|---|---|
//! | `sglang_cache_aware` | SGLang router `cache_aware` | gateway in-flight requests | longest prefix match in the directory |
//! | `llmd_scorer` | Gateway API Inference Extension / llm-d scorers | engine waiting queue, engine KV usage | prefix match ratio |
//! | `dynamo_cost` | NVIDIA Dynamo KV router | gateway in-flight blocks | overlap blocks |
//! | `chwbl` | KubeAI `PrefixHash` (consistent hashing with bounded loads) | gateway in-flight | hash of the prompt's head |
//! | `dualmap` | DualMap (two-choice hashing of the prefix) | gateway in-flight | hash of the prompt's head |
//! | `lmetric` | LMetric (Zhang et al., 2026) | gateway in-flight (batch size) | new prefill tokens |
//!
//! Differences from the originals, all forced by running inside a gateway filter: matches are on
//! kvroute's character blocks rather than on token trees; engine signals come from the sidecar's
//! scrape (and fall back to gateway in-flight counts where no scrape exists); consistent hashing
//! uses highest-random-weight order instead of a ring of virtual nodes (same guarantees: a key moves
//! only when its endpoint leaves, and the bounded-load walk visits endpoints in a per-key order).

use crate::hash::rendezvous_weight;
use crate::policy::{
    argbest, least_loaded, primary, Pick, PickContext, PickNote, Policy, PolicyKind,
};

/// Characters of the prompt's head that the hashing policies key on (KubeAI's
/// `prefixCharLength` default, 100), rounded up to whole blocks.
pub const HEAD_CHARS: u32 = 100;

fn inflight(ctx: &PickContext<'_>, i: usize) -> f64 {
    ctx.candidates.get(i).map_or(f64::INFINITY, |c| c.inflight)
}

fn least_inflight(ctx: &PickContext<'_>) -> usize {
    argbest(ctx.candidates.len(), ctx.rand, |a, b| {
        inflight(ctx, b).total_cmp(&inflight(ctx, a))
    })
}

fn match_ratio(ctx: &PickContext<'_>, i: usize) -> f64 {
    ctx.match_fraction(i)
}

/// SGLang router `cache_aware` (sgl-project/sglang `sgl-router`, policy `cache_aware`; defaults
/// `--cache-threshold 0.3`, `--balance-abs-threshold 64`, `--balance-rel-threshold 1.5`).
///
/// When the in-flight loads are imbalanced (max - min > abs threshold and max > rel threshold x
/// min), the least loaded endpoint. Otherwise the endpoint with the longest prefix match if its
/// match ratio exceeds the cache threshold, else the least loaded. (SGLang sends low-match
/// requests to the endpoint with the smallest tree; kvroute sends them to the least loaded, as the
/// study plan specifies.) The per-endpoint tree is kvroute's bounded directory.
#[derive(Debug)]
pub struct SglangCacheAware;
impl Policy for SglangCacheAware {
    fn kind(&self) -> PolicyKind {
        PolicyKind::SglangCacheAware
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let s = ctx.settings;
        let loads = ctx.candidates.iter().map(|c| c.inflight);
        let max = loads.clone().fold(f64::NEG_INFINITY, f64::max);
        let min = loads.fold(f64::INFINITY, f64::min);
        if max - min > s.balance_abs_threshold && max > s.balance_rel_threshold * min {
            return Pick {
                candidate: least_inflight(ctx),
                note: PickNote::Imbalanced,
            };
        }
        let best = argbest(ctx.candidates.len(), ctx.rand, |a, b| {
            match_ratio(ctx, a)
                .total_cmp(&match_ratio(ctx, b))
                .then(inflight(ctx, b).total_cmp(&inflight(ctx, a)))
        });
        if match_ratio(ctx, best) > s.cache_threshold {
            primary(best)
        } else {
            Pick {
                candidate: least_inflight(ctx),
                note: PickNote::LowMatch,
            }
        }
    }
}

/// Weights of the llm-d / Gateway API Inference Extension default scheduling profile: queue
/// scorer 2, KV-cache utilization scorer 2, prefix-cache scorer 3.
pub const LLMD_WEIGHTS: [f64; 3] = [2.0, 2.0, 3.0];

/// Gateway API Inference Extension / llm-d scorers (kubernetes-sigs/gateway-api-inference-extension
/// `queue-scorer`, `kv-cache-utilization-scorer`, `prefix-cache-scorer`, `max-score-picker`;
/// weights [`LLMD_WEIGHTS`]).
///
/// Each scorer gives 0..=1: queue = (max - q) / (max - min) of the engines' waiting queues (1 when
/// all are equal); KV = 1 - KV usage; prefix = matched blocks / request blocks. The weighted sum is
/// maximised, ties at random. Without engine reports, the queue is the gateway in-flight count and
/// KV usage is taken as 0 (the scorer then does not discriminate).
#[derive(Debug)]
pub struct LlmdScorer;
impl LlmdScorer {
    /// The weighted score of every candidate.
    pub fn scores(ctx: &PickContext<'_>) -> Vec<f64> {
        let q: Vec<f64> = ctx
            .candidates
            .iter()
            .map(|c| c.waiting.unwrap_or(c.inflight))
            .collect();
        let qmax = q.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let qmin = q.iter().copied().fold(f64::INFINITY, f64::min);
        ctx.candidates
            .iter()
            .zip(&q)
            .enumerate()
            .map(|(i, (c, qi))| {
                let queue = if qmax > qmin {
                    (qmax - qi) / (qmax - qmin)
                } else {
                    1.0
                };
                let kv = 1.0 - c.kv_usage.unwrap_or(0.0).clamp(0.0, 1.0);
                let [wq, wk, wp] = LLMD_WEIGHTS;
                wq * queue + wk * kv + wp * match_ratio(ctx, i)
            })
            .collect()
    }
}
impl Policy for LlmdScorer {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LlmdScorer
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let s = Self::scores(ctx);
        let at = |i: usize| s.get(i).copied().unwrap_or(f64::NEG_INFINITY);
        primary(argbest(ctx.candidates.len(), ctx.rand, |a, b| {
            let d = at(a) - at(b);
            if d.abs() > 1e-12 {
                d.total_cmp(&0.0)
            } else {
                std::cmp::Ordering::Equal
            }
        }))
    }
}

/// NVIDIA Dynamo KV router cost (ai-dynamo/dynamo `kv_router` scheduler; defaults
/// `overlap_score_weight` 1.0, `router_temperature` 0).
///
/// cost = `dynamo_overlap_weight` x prefill blocks + decode blocks, where prefill blocks are the
/// request's blocks not matched on the endpoint and decode blocks are the blocks the router has in
/// flight there plus this request's (as Dynamo's router counts its own active sequences rather than
/// reading the engines' KV usage, which a scrape makes stale). Temperature 0 takes the argmin (ties
/// at random); above 0 samples from the softmax of the negated costs normalised to 0..=1, divided
/// by the temperature.
#[derive(Debug)]
pub struct DynamoCost;
impl DynamoCost {
    /// The cost of every candidate.
    pub fn costs(ctx: &PickContext<'_>) -> Vec<f64> {
        let total = ctx.units(ctx.total_blocks);
        ctx.candidates
            .iter()
            .map(|c| {
                let prefill = (total - ctx.units(c.matched_blocks)).max(0.0);
                ctx.settings.dynamo_overlap_weight * prefill + c.active_blocks + total
            })
            .collect()
    }
}
impl Policy for DynamoCost {
    fn kind(&self) -> PolicyKind {
        PolicyKind::DynamoCost
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let costs = Self::costs(ctx);
        let t = ctx.settings.dynamo_temperature;
        let at = |i: usize| costs.get(i).copied().unwrap_or(f64::INFINITY);
        if t > 0.0 && costs.len() > 1 {
            let max = costs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
            let span = if max > min { max - min } else { 1.0 };
            let w: Vec<f64> = costs
                .iter()
                .map(|c| (-((c - min) / span) / t).exp())
                .collect();
            let sum: f64 = w.iter().sum();
            // 53 random bits as a uniform draw in [0, 1).
            let mut u = (ctx.rand >> 11) as f64 / (1u64 << 53) as f64 * sum;
            for (i, wi) in w.iter().enumerate() {
                if u < *wi {
                    return primary(i);
                }
                u -= wi;
            }
            return primary(costs.len() - 1);
        }
        primary(argbest(ctx.candidates.len(), ctx.rand, |a, b| {
            let d = at(b) - at(a);
            if d.abs() > 1e-9 {
                d.total_cmp(&0.0)
            } else {
                std::cmp::Ordering::Equal
            }
        }))
    }
}

/// KubeAI `PrefixHash` load balancing (kubeai-project/kubeai; consistent hashing with bounded loads,
/// Mirrokni et al.; defaults `prefixCharLength` 100, `meanLoadPercentage` 125).
///
/// The endpoints in the key's highest-random-weight order; the first whose in-flight count is
/// under the bound ceil(`chwbl_load_factor` x (total in-flight + 1) / n). The key is
/// [`PickContext::head_key`]; without one, the least loaded.
#[derive(Debug)]
pub struct Chwbl;
impl Chwbl {
    /// Candidates in the key's hash order (highest weight first).
    pub fn order(ctx: &PickContext<'_>, key: u64) -> Vec<usize> {
        let mut order: Vec<(u64, usize)> = ctx
            .candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (rendezvous_weight(key, c.name), i))
            .collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        order.into_iter().map(|(_, i)| i).collect()
    }

    /// The bound on any endpoint's in-flight count for the next request.
    pub fn bound(ctx: &PickContext<'_>) -> f64 {
        let n = ctx.candidates.len().max(1) as f64;
        let total: f64 = ctx.candidates.iter().map(|c| c.inflight.max(0.0)).sum();
        (ctx.settings.chwbl_load_factor * (total + 1.0) / n).ceil()
    }
}
impl Policy for Chwbl {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Chwbl
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let Some(key) = ctx.head_key else {
            return Pick {
                candidate: least_loaded(ctx),
                note: PickNote::NoPrefixKey,
            };
        };
        let bound = Self::bound(ctx);
        let order = Self::order(ctx, key);
        for (rank, i) in order.iter().enumerate() {
            if inflight(ctx, *i) + 1.0 <= bound {
                return Pick {
                    candidate: *i,
                    note: if rank == 0 {
                        PickNote::Primary
                    } else {
                        PickNote::Spill
                    },
                };
            }
        }
        // Unreachable with factor >= 1 (the bound admits at least one endpoint); kept total.
        Pick {
            candidate: least_inflight(ctx),
            note: PickNote::Spill,
        }
    }
}

/// LMetric (Zhang et al., "LMetric: Simple is Better - Multiplication May Be All You Need for LLM
/// Request Scheduling", arXiv 2603.15202, 2026; deployed in production by its authors).
///
/// Score = the request's new prefill tokens if routed to the endpoint (its prompt tokens less the
/// directory's match there) x the endpoint's batch size (the gateway's in-flight requests there);
/// the lowest wins, with no weights to tune. Where scores tie (an idle endpoint scores 0 whatever
/// its cache, the case the paper names as multiplication's failure), the fewer new prefill tokens,
/// then at random.
#[derive(Debug)]
pub struct Lmetric;
impl Lmetric {
    /// Every candidate's (score, new prefill tokens).
    pub fn scores(ctx: &PickContext<'_>) -> Vec<(f64, f64)> {
        (0..ctx.candidates.len())
            .map(|i| {
                let new = crate::ttft::uncached_tokens(ctx, i, 1.0);
                (new * inflight(ctx, i).max(0.0), new)
            })
            .collect()
    }
}
impl Policy for Lmetric {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lmetric
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let s = Self::scores(ctx);
        let at = |i: usize| s.get(i).copied().unwrap_or((f64::INFINITY, f64::INFINITY));
        primary(argbest(ctx.candidates.len(), ctx.rand, |a, b| {
            let (sa, na) = at(a);
            let (sb, nb) = at(b);
            if (sb - sa).abs() > 1e-9 {
                sb.total_cmp(&sa)
            } else if (nb - na).abs() > 1e-9 {
                nb.total_cmp(&na)
            } else {
                std::cmp::Ordering::Equal
            }
        }))
    }
}

/// DualMap-style two-choice hashing (Zhao et al., "DualMap: Enabling Both Cache Affinity and Load
/// Balancing for Distributed LLM Serving", 2025): two independent hashes of the prompt's head name
/// two distinct endpoints; the one with fewer in-flight requests wins, the first on a tie.
#[derive(Debug)]
pub struct Dualmap;
impl Dualmap {
    /// The two endpoints `key` maps to among `n`.
    pub fn pair(key: u64, n: usize) -> (usize, usize) {
        if n < 2 {
            return (0, 0);
        }
        let h1 = xxhash_rust::xxh3::xxh3_64_with_seed(&key.to_le_bytes(), 0x4475_616c_4d61_7031);
        let h2 = xxhash_rust::xxh3::xxh3_64_with_seed(&key.to_le_bytes(), 0x4475_616c_4d61_7032);
        let i = (h1 % n as u64) as usize;
        let mut j = (h2 % (n as u64 - 1)) as usize;
        if j >= i {
            j += 1;
        }
        (i, j)
    }
}
impl Policy for Dualmap {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Dualmap
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Pick {
        let Some(key) = ctx.head_key else {
            return Pick {
                candidate: least_loaded(ctx),
                note: PickNote::NoPrefixKey,
            };
        };
        let (i, j) = Self::pair(key, ctx.candidates.len());
        primary(if inflight(ctx, j) < inflight(ctx, i) {
            j
        } else {
            i
        })
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
    use crate::policy::test_support::{self, NAMES};
    use crate::policy::Candidate;
    use proptest::prelude::*;

    /// Loads up to 100, past `sglang_cache_aware`'s imbalance bound of 64.
    fn cands() -> impl Strategy<Value = Vec<Candidate<'static>>> {
        test_support::cands(100)
    }

    use test_support::keyed as ctx;

    proptest! {
        #[test]
        fn lmetric_is_new_prefill_times_batch_lowest_wins(c in cands(), rand in any::<u64>()) {
            let s = PolicySettings::default();
            let x = ctx(&c, &s, 0, rand);
            let p = Lmetric.pick(&x).candidate;
            let score = |i: usize| {
                let new = (320.0 - 16.0 * f64::from(c[i].matched_blocks)).max(0.0);
                (new * c[i].inflight, new)
            };
            for i in 0..c.len() {
                prop_assert_eq!(Lmetric::scores(&x)[i], score(i));
                let (si, ni) = score(i);
                let (sp, np) = score(p);
                prop_assert!(sp < si + 1e-9);
                if (sp - si).abs() <= 1e-9 {
                    prop_assert!(np <= ni + 1e-9);
                }
            }
        }

        #[test]
        fn sglang_gates_on_imbalance_then_follows_match(c in cands(), rand in any::<u64>(), abs in 0.0f64..80.0) {
            let s = PolicySettings { balance_abs_threshold: abs, ..PolicySettings::default() };
            let x = ctx(&c, &s, 0, rand);
            let p = SglangCacheAware.pick(&x);
            let max = c.iter().map(|c| c.inflight).fold(f64::NEG_INFINITY, f64::max);
            let min = c.iter().map(|c| c.inflight).fold(f64::INFINITY, f64::min);
            let best = c.iter().map(|c| c.matched_blocks).max().unwrap();
            if max - min > abs && max > 1.5 * min {
                prop_assert_eq!(p.note, PickNote::Imbalanced);
                prop_assert_eq!(c[p.candidate].inflight, min);
            } else if f64::from(best) / 20.0 > 0.3 {
                prop_assert_eq!(p.note, PickNote::Primary);
                prop_assert_eq!(c[p.candidate].matched_blocks, best);
            } else {
                prop_assert_eq!(p.note, PickNote::LowMatch);
                prop_assert_eq!(c[p.candidate].inflight, min);
            }
        }

        #[test]
        fn llmd_picks_the_max_weighted_score(c in cands(), rand in any::<u64>()) {
            let s = PolicySettings::default();
            let x = ctx(&c, &s, 0, rand);
            let p = LlmdScorer.pick(&x).candidate;
            let scores = LlmdScorer::scores(&x);
            let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(scores[p] >= best - 1e-9);
            for sc in &scores { prop_assert!((0.0..=7.0 + 1e-9).contains(sc)); }
        }

        #[test]
        fn dynamo_argmin_of_cost(c in cands(), rand in any::<u64>(), w in 0.0f64..4.0) {
            let s = PolicySettings { dynamo_overlap_weight: w, ..PolicySettings::default() };
            let x = ctx(&c, &s, 0, rand);
            let p = DynamoCost.pick(&x).candidate;
            let costs = DynamoCost::costs(&x);
            let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
            prop_assert!(costs[p] <= min + 1e-6);
        }

        #[test]
        fn chwbl_respects_the_bound_and_is_sticky_when_idle(c in cands(), key in any::<u64>(), rand in any::<u64>()) {
            let s = PolicySettings::default();
            let x = ctx(&c, &s, key, rand);
            let p = Chwbl.pick(&x).candidate;
            prop_assert!(c[p].inflight + 1.0 <= Chwbl::bound(&x));
            // Every endpoint the walk skipped was at its bound.
            let order = Chwbl::order(&x, key);
            for i in order.iter().take_while(|i| **i != p) {
                prop_assert!(c[*i].inflight + 1.0 > Chwbl::bound(&x));
            }
            // With no load, the key always goes to its first endpoint, whatever the rand.
            let idle: Vec<Candidate<'_>> = c.iter().map(|k| Candidate { inflight: 0.0, ..k.clone() }).collect();
            let y = ctx(&idle, &s, key, rand ^ 0x5555);
            prop_assert_eq!(Chwbl.pick(&y).candidate, order[0]);
        }

        #[test]
        fn dualmap_picks_the_less_loaded_of_its_two(c in cands(), key in any::<u64>(), rand in any::<u64>()) {
            let s = PolicySettings::default();
            let p = Dualmap.pick(&ctx(&c, &s, key, rand)).candidate;
            let (i, j) = Dualmap::pair(key, c.len());
            prop_assert!(p == i || p == j);
            let other = if p == i { j } else { i };
            prop_assert!(c[p].inflight <= c[other].inflight);
            if c.len() >= 2 { prop_assert_ne!(i, j); }
        }
    }

    #[test]
    fn dynamo_temperature_spreads_picks() {
        let c: Vec<Candidate<'_>> = (0..3)
            .map(|i| Candidate {
                endpoint: i,
                name: NAMES[i],
                matched_blocks: [20, 10, 0][i],
                ..Candidate::default()
            })
            .collect();
        let cold = PolicySettings::default();
        let warm = PolicySettings {
            dynamo_temperature: 1.0,
            ..PolicySettings::default()
        };
        let mut counts = [0usize; 3];
        for r in 0..3000u64 {
            let rand = xxhash_rust::xxh3::xxh3_64(&r.to_le_bytes());
            assert_eq!(DynamoCost.pick(&ctx(&c, &cold, 0, rand)).candidate, 0);
            counts[DynamoCost.pick(&ctx(&c, &warm, 0, rand)).candidate] += 1;
        }
        // exp(0) : exp(-0.5) : exp(-1) = 0.506 : 0.307 : 0.186.
        assert!(
            counts[0] > counts[1] && counts[1] > counts[2] && counts[2] > 300,
            "{counts:?}"
        );
    }

    #[test]
    fn chwbl_moves_only_the_removed_endpoints_keys() {
        let s = PolicySettings::default();
        let all: Vec<Candidate<'_>> = (0..4)
            .map(|i| Candidate {
                endpoint: i,
                name: NAMES[i],
                ..Candidate::default()
            })
            .collect();
        let without2: Vec<Candidate<'_>> =
            all.iter().filter(|c| c.endpoint != 2).cloned().collect();
        for key in 0..500u64 {
            let a = all[Chwbl.pick(&ctx(&all, &s, key, 0)).candidate].endpoint;
            let b = without2[Chwbl.pick(&ctx(&without2, &s, key, 0)).candidate].endpoint;
            if a != 2 {
                assert_eq!(a, b);
            }
        }
    }
}
