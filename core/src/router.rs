//! One routing decision: request features in, endpoint out.
//!
//! [`features`] turns a parsed request into what the policies read (blocks, session, prefix key);
//! [`decide`] builds the candidates from the configuration, the published status, the directory and
//! the gateway in-flight counts, and runs the active policy. [`decide_by_load`] is the load-only
//! fallback used when a request cannot be parsed.

use crate::config::{EndpointConfig, PolicySettings};
use crate::directory::{match_lengths, PrefixIndex};
use crate::hash::{session_key, BlockHash};
use crate::policy::{policy, Candidate, LoadSignal, PickContext, PickNote, PolicyKind};
use crate::prefix::{request_blocks, request_prefix_key, BlockSpec};
use crate::request::{parse_request, ApiKind, ParseError, ParsedRequest};
use crate::state::{EndpointStatus, EngineLoad};

/// What the policies read from a request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFeatures {
    /// Chained prefix block hashes (at most `max_blocks`).
    pub blocks: Vec<BlockHash>,
    /// Session key (session header, else OpenAI `user`).
    pub session: Option<u64>,
    /// Prefix key (`prefix_key` policy).
    pub prefix_key: Option<u64>,
    /// Hash of the prompt's head ([`crate::reference::HEAD_CHARS`] characters, whole blocks): the
    /// key of `chwbl` and `dualmap`.
    pub head_key: Option<u64>,
    /// Whether the response will carry `usage` (see [`ParsedRequest::usage_expected`]).
    pub usage_expected: bool,
    /// Whether the response is streamed (see [`ParsedRequest::streamed`]).
    pub streamed: bool,
    /// Bytes of the prompt's canonical text, the whole of it (the blocks stop at `max_blocks`).
    pub prompt_bytes: u64,
}

impl RequestFeatures {
    /// The prompt's tokens, estimated at `chars_per_token`.
    pub fn prompt_tokens(&self, chars_per_token: f64) -> f64 {
        self.prompt_bytes as f64 / chars_per_token.max(0.1)
    }
}

/// Features of a parsed request. `session_header` is the value of the configured session header.
pub fn features(
    req: &ParsedRequest<'_>,
    session_header: Option<&str>,
    spec: BlockSpec,
) -> RequestFeatures {
    let session = session_header
        .filter(|s| !s.is_empty())
        .or(req.user.as_deref().filter(|s| !s.is_empty()))
        .map(|s| session_key(s).0);
    let blocks = request_blocks(req, spec);
    let head_key = crate::prefix::head_key(&blocks, spec.head_blocks());
    let mut prompt_bytes = 0u64;
    crate::prefix::for_each_segment(req, |s| prompt_bytes += s.len() as u64);
    RequestFeatures {
        blocks,
        session,
        prefix_key: request_prefix_key(req),
        head_key,
        usage_expected: req.usage_expected,
        streamed: req.streamed,
        prompt_bytes,
    }
}

/// Parses a body and computes its features in one step.
pub fn body_features(
    kind: ApiKind,
    body: &[u8],
    session_header: Option<&str>,
    spec: BlockSpec,
) -> Result<RequestFeatures, ParseError> {
    parse_request(kind, body).map(|r| features(&r, session_header, spec))
}

/// The outcome of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index of the chosen endpoint in the configuration.
    pub endpoint: usize,
    /// The policy that decided (jsq for the load-only fallback).
    pub policy: PolicyKind,
    /// How the policy decided.
    pub note: PickNote,
    /// Leading blocks of the request the directory places on the chosen endpoint.
    pub predicted_blocks: u32,
    /// Blocks of the request.
    pub total_blocks: u32,
    /// The configured load signal was engine-reported but some endpoint had no engine report, so
    /// gateway in-flight counts were used.
    pub engine_load_missing: bool,
    /// No endpoint was healthy, so all were candidates.
    pub no_healthy: bool,
    /// Prefill work the chosen endpoint is predicted to do, in tokens (the request's estimated
    /// tokens less the blocks the directory places there, [`crate::ttft::uncached_tokens`],
    /// weighted for attention over the context, [`crate::ttft::prefill_work`]): what the gateway
    /// counts as queued there until the response starts.
    pub prefill_work: u32,
    /// Where a retry goes if the chosen endpoint refuses the connection: the healthy candidate
    /// other than the chosen one with the fewest requests in flight (None with one candidate).
    pub fallback: Option<usize>,
}

/// Live inputs of a decision.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Configured endpoints.
    pub endpoints: &'a [EndpointConfig],
    /// Published status per endpoint (missing = healthy, no engine report).
    pub status: &'a [EndpointStatus],
    /// Gateway in-flight requests per endpoint.
    pub inflight: &'a [i64],
    /// Prefix blocks of those requests per endpoint (empty: unknown, read as 0).
    pub inflight_blocks: &'a [i64],
    /// Prefill work of those requests still to be done per endpoint, in tokens (their
    /// [`Decision::prefill_work`], until their response starts; empty: read as 0).
    pub inflight_prefill: &'a [i64],
    /// Characters per token of the prompt-size estimates.
    pub chars_per_token: f64,
    /// How prompts are cut into blocks (their sizes: fine, then coarser).
    pub spec: BlockSpec,
    /// Age of the directory view, ms.
    pub directory_age_ms: u64,
    /// Active settings.
    pub settings: &'a PolicySettings,
    /// Decision sequence number (round robin).
    pub seq: u64,
    /// A uniformly random draw.
    pub rand: u64,
}

fn load(signal: LoadSignal, inflight: f64, engine: Option<EngineLoad>, missing: &mut bool) -> f64 {
    match (signal, engine) {
        (LoadSignal::GatewayInflight, _) => inflight,
        (LoadSignal::EngineWaiting, Some(e)) => e.waiting,
        (LoadSignal::EngineQueue, Some(e)) => e.waiting + e.running,
        (LoadSignal::KvUsage, Some(e)) => e.kv_usage,
        (_, None) => {
            *missing = true;
            inflight
        }
    }
}

/// Runs the active policy (or `force` instead) for a request with `features`.
pub fn decide(
    features: &RequestFeatures,
    index: &dyn PrefixIndex,
    inputs: &Inputs<'_>,
    force: Option<PolicyKind>,
) -> Decision {
    let n = inputs.endpoints.len();
    let kind = force.unwrap_or(inputs.settings.policy);
    // Prefix matching is the costly part: only the policy that reads it pays for it.
    let lens = if kind.reads_prefix() {
        match_lengths(index, &features.blocks, n)
    } else {
        Vec::new()
    };
    let session_at = match (kind, features.session) {
        (PolicyKind::LoadCacheAware | PolicyKind::PredictedTtft, Some(s)) => {
            index.session_endpoint(s)
        }
        _ => None,
    };
    // Where sessions are, for the policy that places a new one by them.
    let sessions = match kind {
        PolicyKind::PredictedTtft => index.session_stats(),
        _ => None,
    };
    let new_session = features.session.is_some() && session_at.is_none();
    // The shares of the session stats place only a request that opens a session.
    let opening = sessions.filter(|_| new_session);
    let healthy = |i: usize| inputs.status.get(i).is_none_or(|s| s.healthy);
    let no_healthy = !(0..n).any(healthy);
    let mut missing = false;
    let candidates: Vec<Candidate<'_>> = inputs
        .endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| no_healthy || healthy(*i))
        .map(|(i, e)| {
            let engine = inputs.status.get(i).and_then(|s| s.engine);
            let inflight = inputs.inflight.get(i).copied().unwrap_or(0).max(0) as f64;
            Candidate {
                endpoint: i,
                name: &e.name,
                load: load(inputs.settings.load_signal, inflight, engine, &mut missing),
                matched_blocks: lens.get(i).copied().unwrap_or(0),
                holds_session: session_at == Some(i),
                inflight,
                active_blocks: inputs.inflight_blocks.get(i).copied().unwrap_or(0).max(0) as f64,
                waiting: engine.map(|e| e.waiting),
                kv_usage: engine.map(|e| e.kv_usage),
                queued_prefill_tokens: inputs.inflight_prefill.get(i).copied().unwrap_or(0).max(0)
                    as f64,
                prefill_tps: engine.map(|e| e.prefill_tps).filter(|r| *r > 0.0),
                step_s: engine.map(|e| e.step_s).filter(|r| *r > 0.0),
                sessions: sessions
                    .and_then(|s| s.per_endpoint.get(i).copied())
                    .unwrap_or(0),
            }
        })
        .collect();
    let total_blocks = features.blocks.len() as u32;
    let ctx = PickContext {
        candidates: &candidates,
        total_blocks,
        session: features.session,
        prefix_key: features.prefix_key,
        head_key: features.head_key,
        settings: inputs.settings,
        seq: inputs.seq,
        rand: inputs.rand,
        prompt_tokens: features.prompt_tokens(inputs.chars_per_token),
        tokens_per_block: inputs.spec.block_chars as f64 / inputs.chars_per_token.max(0.1),
        coarse_after: u32::try_from(inputs.spec.coarse_after).unwrap_or(u32::MAX),
        coarse_factor: u32::try_from(inputs.spec.coarse_factor.max(1)).unwrap_or(1),
        directory_age_ms: inputs.directory_age_ms,
        new_session,
        continuing_share: opening.map_or(0.0, |s| s.continuing_for(features.head_key)),
        head_share: opening.map_or(0.0, |s| s.share_of(features.head_key)),
        head_share_bound: opening.map_or(1.0, |s| s.share_bound(features.head_key)),
        one_shot_share: opening.map_or(0.0, |s| {
            s.one_shot_share(inputs.settings.ttft_session_spread)
        }),
        head_blocks: u32::try_from(inputs.spec.head_blocks()).unwrap_or(u32::MAX),
    };
    let pick = policy(kind).pick(&ctx);
    let endpoint = candidates.get(pick.candidate).map_or(0, |c| c.endpoint);
    // Predicted cached blocks is reported for every policy, so it is computed for the chosen
    // endpoint even when the policy did not read it.
    let predicted_blocks = match lens.get(endpoint) {
        Some(l) => *l,
        None => match_lengths(index, &features.blocks, n)
            .get(endpoint)
            .copied()
            .unwrap_or(0),
    };
    let chosen = [Candidate {
        matched_blocks: predicted_blocks,
        ..Candidate::default()
    }];
    let uncached = crate::ttft::uncached_tokens(
        &PickContext {
            candidates: &chosen,
            ..ctx
        },
        0,
        1.0,
    );
    let fallback = candidates
        .iter()
        .filter(|c| c.endpoint != endpoint)
        .min_by(|a, b| a.inflight.total_cmp(&b.inflight))
        .map(|c| c.endpoint);
    Decision {
        endpoint,
        policy: kind,
        note: pick.note,
        predicted_blocks,
        total_blocks,
        engine_load_missing: missing,
        no_healthy,
        prefill_work: crate::ttft::prefill_work(
            uncached,
            crate::ttft::prompt_total(&ctx) - uncached,
            inputs.settings.ttft_attention_tokens,
        )
        .round()
        .min(f64::from(u32::MAX)) as u32,
        fallback,
    }
}

/// The load-only fallback: JSQ over the healthy endpoints, for requests that cannot be parsed.
pub fn decide_by_load(inputs: &Inputs<'_>) -> Decision {
    decide(
        &RequestFeatures::default(),
        &crate::directory::EmptyIndex,
        inputs,
        Some(PolicyKind::Jsq),
    )
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
    use crate::directory::Directory;

    fn eps(n: usize) -> Vec<EndpointConfig> {
        (0..n)
            .map(|i| EndpointConfig {
                name: format!("e{i}"),
                cluster: None,
                capacity_blocks: None,
                address: None,
            })
            .collect()
    }

    #[test]
    fn cache_aware_follows_recorded_prefix_and_skips_unhealthy() {
        let endpoints = eps(3);
        let mut dir = Directory::new(&[1000; 3], 100);
        let body = br#"{"model":"m","messages":[{"role":"system","content":"You are a helpful assistant. Answer in full sentences and cite your sources."},{"role":"user","content":"What is the capital of France and why?"}]}"#;
        let f = body_features(ApiKind::Chat, body, None, BlockSpec::uniform(16, 64)).unwrap();
        assert!(f.blocks.len() >= 5);
        dir.record(2, &f.blocks, None);
        let settings = PolicySettings::default();
        let mut status = vec![EndpointStatus::default(); 3];
        let inputs = Inputs {
            endpoints: &endpoints,
            status: &status,
            inflight: &[0, 0, 0],
            inflight_blocks: &[],
            inflight_prefill: &[],
            chars_per_token: 4.0,
            spec: BlockSpec::default(),
            directory_age_ms: 0,
            settings: &settings,
            seq: 0,
            rand: 1,
        };
        let d = decide(&f, &dir, &inputs, None);
        assert_eq!(
            (d.endpoint, d.predicted_blocks, d.total_blocks),
            (2, f.blocks.len() as u32, f.blocks.len() as u32)
        );
        assert_eq!(d.fallback, Some(0), "the least loaded other endpoint");
        status[2].healthy = false;
        let inputs = Inputs {
            endpoints: &endpoints,
            status: &status,
            inflight: &[0, 0, 0],
            inflight_blocks: &[],
            inflight_prefill: &[],
            chars_per_token: 4.0,
            spec: BlockSpec::default(),
            directory_age_ms: 0,
            settings: &settings,
            seq: 0,
            rand: 1,
        };
        let d = decide(&f, &dir, &inputs, None);
        assert_ne!(d.endpoint, 2);
        assert_eq!(d.predicted_blocks, 0);
    }

    #[test]
    fn fallback_is_least_loaded_and_all_unhealthy_means_all() {
        let endpoints = eps(3);
        let settings = PolicySettings::default();
        let status = vec![
            EndpointStatus {
                healthy: false,
                engine: None
            };
            3
        ];
        let inputs = Inputs {
            endpoints: &endpoints,
            status: &status,
            inflight: &[4, 1, 2],
            inflight_blocks: &[],
            inflight_prefill: &[],
            chars_per_token: 4.0,
            spec: BlockSpec::default(),
            directory_age_ms: 0,
            settings: &settings,
            seq: 0,
            rand: 9,
        };
        let d = decide_by_load(&inputs);
        assert_eq!(
            (d.endpoint, d.policy, d.no_healthy),
            (1, PolicyKind::Jsq, true)
        );
    }

    #[test]
    fn engine_signal_missing_uses_inflight() {
        let endpoints = eps(2);
        let settings = PolicySettings {
            policy: PolicyKind::Jsq,
            load_signal: LoadSignal::EngineWaiting,
            ..Default::default()
        };
        let inputs = Inputs {
            endpoints: &endpoints,
            status: &[],
            inflight: &[5, 2],
            inflight_blocks: &[],
            inflight_prefill: &[],
            chars_per_token: 4.0,
            spec: BlockSpec::default(),
            directory_age_ms: 0,
            settings: &settings,
            seq: 0,
            rand: 0,
        };
        let d = decide(
            &RequestFeatures::default(),
            &crate::directory::EmptyIndex,
            &inputs,
            None,
        );
        assert_eq!(d.endpoint, 1);
        assert!(d.engine_load_missing);
    }

    #[test]
    fn questions_over_a_shared_document_are_not_spread_like_conversations() {
        let spec = BlockSpec::default();
        let mut dir = Directory::with_spec(&[100_000; 2], 10_000, &spec);
        let doc = "Answer from this document only: the tides follow the moon. ".repeat(10);
        let question = |i: usize| {
            let body = format!(
                r#"{{"model":"m","messages":[{{"role":"system","content":"{doc}"}},{{"role":"user","content":"Question {i}?"}}]}}"#
            );
            body_features(ApiKind::Chat, body.as_bytes(), Some(&format!("q{i}")), spec).unwrap()
        };
        let turn = |c: usize, t: usize| {
            let mut messages = vec![format!(
                r#"{{"role":"user","content":"Conversation {c} starts with a question of its own, long enough to fill its head."}}"#
            )];
            for k in 0..t {
                messages.push(format!(r#"{{"role":"assistant","content":"Answer {k}."}}"#));
                messages.push(format!(r#"{{"role":"user","content":"Follow-up {k}."}}"#));
            }
            let body = format!(r#"{{"model":"m","messages":[{}]}}"#, messages.join(","));
            body_features(ApiKind::Chat, body.as_bytes(), Some(&format!("c{c}")), spec).unwrap()
        };
        // Twenty questions on e0, each its own session; ten conversations of ten requests on e1:
        // most requests continue a session. The questions, sessions of one request, bring no
        // more requests: once their head has a share of its own (eight questions), they are not
        // counted as conversations.
        for i in 0..20 {
            let f = question(i);
            dir.record(0, &f.blocks, f.session);
        }
        for c in 0..10 {
            for t in 0..10 {
                let f = turn(c, t);
                dir.record(1, &f.blocks, f.session);
            }
        }
        let stats = dir.session_stats().unwrap();
        assert!(stats.continuing > 0.5, "{}", stats.continuing);
        assert_eq!(stats.per_endpoint, vec![8, 10]);
        let settings = PolicySettings::default();
        let inputs = Inputs {
            endpoints: &eps(2),
            status: &[EndpointStatus::default(), EndpointStatus::default()],
            inflight: &[0, 0],
            inflight_blocks: &[],
            inflight_prefill: &[],
            chars_per_token: 4.0,
            spec,
            directory_age_ms: 0,
            settings: &settings,
            seq: 0,
            rand: 0,
        };
        let pick = |f: &RequestFeatures| decide(f, &dir, &inputs, Some(PolicyKind::PredictedTtft));
        // A new question goes where its document is: questions over it never continue.
        let d = pick(&question(99));
        assert_eq!((d.endpoint, d.note), (0, PickNote::Primary));
        // A new conversation, which no endpoint holds, starts on the endpoint with fewer
        // conversations, however many questions it answers (counted as sessions, the questions
        // would put e0 over the mean and send it to e1).
        assert_eq!(pick(&turn(99, 0)).endpoint, 0);
    }

    #[test]
    fn session_from_header_then_user() {
        let spec = BlockSpec::default();
        let body = br#"{"user":"alice","messages":[{"role":"user","content":"x"}]}"#;
        let a = body_features(ApiKind::Chat, body, Some("s1"), spec).unwrap();
        let b = body_features(ApiKind::Chat, body, None, spec).unwrap();
        assert_eq!(a.session, Some(session_key("s1").0));
        assert_eq!(b.session, Some(session_key("alice").0));
    }
}

/// The engine-reported `usage.prompt_tokens_details.cached_tokens` in a chunk of a response body
/// (a JSON response, or an SSE event carrying usage), if the chunk holds it.
pub fn find_cached_tokens(chunk: &[u8]) -> Option<u64> {
    find_number(chunk, b"\"cached_tokens\"")
}

/// The `usage.prompt_tokens` an engine reports, if `chunk` (a JSON body or SSE events) carries it.
pub fn find_prompt_tokens(chunk: &[u8]) -> Option<u64> {
    find_number(chunk, b"\"prompt_tokens\"")
}

/// The unsigned integer after the first `KEY:` in `chunk`.
fn find_number(chunk: &[u8], key: &[u8]) -> Option<u64> {
    let at = chunk.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = chunk.get(at..)?;
    let rest = rest.get(rest.iter().position(|b| !b.is_ascii_whitespace())?..)?;
    let rest = rest.strip_prefix(b":")?;
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let digits = rest.get(start..)?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(digits.get(..end)?).ok()?.parse().ok()
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod usage_tests {
    use super::{find_cached_tokens, find_prompt_tokens};

    #[test]
    fn finds_prompt_tokens_not_their_details() {
        let json =
            br#"{"usage":{"prompt_tokens":44,"prompt_tokens_details":{"cached_tokens":32}}}"#;
        assert_eq!(find_prompt_tokens(json), Some(44));
        let details_first =
            br#"{"usage":{"prompt_tokens_details":{"cached_tokens":3},"prompt_tokens":7}}"#;
        assert_eq!(find_prompt_tokens(details_first), Some(7));
        assert_eq!(find_prompt_tokens(b"{}"), None);
    }

    #[test]
    fn finds_cached_tokens_in_json_and_sse() {
        let json = br#"{"usage":{"prompt_tokens":44,"prompt_tokens_details":{"cached_tokens":32},"total_tokens":47}}"#;
        assert_eq!(find_cached_tokens(json), Some(32));
        let sse = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens_details\": { \"cached_tokens\" : 1984 }}}\n\n";
        assert_eq!(find_cached_tokens(sse), Some(1984));
        assert_eq!(
            find_cached_tokens(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}"),
            None
        );
        assert_eq!(find_cached_tokens(b"\"cached_tokens\":"), None);
        assert_eq!(find_cached_tokens(b"\"cached_tokens\":null"), None);
        assert_eq!(find_cached_tokens(b""), None);
    }
}
