//! The engine core, as vLLM V1 schedules: no I/O, no clock (time is an argument).
//!
//! Each [`Engine::step`] at time `now`:
//! 1. schedules running requests first, in order, each for all its uncomputed tokens up to the
//!    step's token budget (`max_num_batched_tokens`: chunked prefill); when blocks run out it
//!    preempts the last running request (recompute: its blocks are freed, it returns to the front of
//!    the waiting queue);
//! 2. if nothing was preempted, admits waiting requests first-come-first-served while the budget
//!    and `max_num_seqs` allow: each gets its longest cached prefix (full blocks, at most
//!    `prompt - 1` tokens), takes references on those blocks and allocates the rest; a request that
//!    does not fit blocks the queue;
//! 3. prices the step with the latency model and commits it at `now + duration`: computed tokens
//!    advance, newly full blocks enter the prefix cache, requests that caught up sample a token,
//!    finished ones free their blocks (tail first).
//!
//! The events and metric observations of a step carry that commit time.

use std::collections::{HashMap, VecDeque};

use xxhash_rust::xxh3::xxh3_64;

use crate::block_pool::{block_hash, chain_root, BlockId, BlockPool};
use crate::profile::{LatencyModel, StepShape};
use crate::tokenizer::filler_token;

/// Engine settings (what `vllm serve` flags and the profile decide).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Served model name (also the root of block hashes).
    pub model: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks.
    pub num_gpu_blocks: u32,
    /// Most running requests.
    pub max_num_seqs: u32,
    /// Token budget of one step.
    pub max_num_batched_tokens: u32,
    /// Longest prompt + output.
    pub max_model_len: u32,
    /// Automatic prefix caching.
    pub enable_prefix_caching: bool,
    /// Step latency model.
    pub latency: LatencyModel,
    /// Share of the GPU this instance gets (1 = alone); step times are divided by it.
    pub gpu_share: f64,
}

/// Why a request finished (vLLM's `finished_reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The model emitted end-of-sequence.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The client went away or the request was aborted.
    Abort,
}

impl FinishReason {
    /// OpenAI / vLLM name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// A request as the API hands it to the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    /// Unique id.
    pub id: u64,
    /// Prompt token ids (after the chat template).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Fewest tokens to generate before end-of-sequence may stop it.
    pub min_tokens: u32,
    /// Generate exactly `max_tokens`.
    pub ignore_eos: bool,
}

/// Token accounting of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache at the request's first scheduling.
    pub cached_tokens: u32,
}

/// What a step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token.
    Token {
        /// Request.
        id: u64,
        /// Index of the token in the output.
        index: u32,
        /// Its text.
        text: &'static str,
    },
    /// The request finished (after its last token, if any).
    Finished {
        /// Request.
        id: u64,
        /// Why.
        reason: FinishReason,
        /// Its token accounting.
        usage: Usage,
    },
}

/// A metric observation, with vLLM's meaning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// `time_to_first_token_seconds`
    Ttft(f64),
    /// `inter_token_latency_seconds`
    Itl(f64),
    /// `e2e_request_latency_seconds`
    E2e(f64),
    /// `request_queue_time_seconds`: arrival to first scheduled (at the request's end, as vLLM
    /// records it).
    QueueTime(f64),
    /// `request_prefill_kv_computed_tokens` (at the request's end, as vLLM records it)
    PrefillKvComputed(u32),
    /// `request_prompt_tokens`
    PromptTokens(u32),
    /// `request_generation_tokens`
    GenerationTokens(u32),
    /// `iteration_tokens_total`
    IterationTokens(u32),
    /// `request_prefill_time_seconds`: first scheduled to first token (at the request's end, as
    /// vLLM records it).
    PrefillTime(f64),
    /// `request_decode_time_seconds`: first token to last.
    DecodeTime(f64),
    /// `request_inference_time_seconds`: first scheduled to last token.
    InferenceTime(f64),
    /// `request_time_per_output_token_seconds`: decode time over the tokens after the first.
    TimePerOutputToken(f64),
    /// `request_num_preemptions`: times the request was preempted.
    RequestPreemptions(u32),
    /// `request_max_num_generation_tokens`: the most tokens any of a request's sequences
    /// generated (its only one: the emulator samples one sequence a request).
    MaxGenerationTokens(u32),
    /// `request_params_n`: the request's `n` (1: one sequence a request).
    ParamsN(u32),
    /// `request_params_max_tokens`: the request's `max_tokens` (vLLM's server fills in the
    /// context's room where a client sets none, so every request has one).
    ParamsMaxTokens(u32),
    /// `kv_block_lifetime_seconds`: a sampled block's allocation to its eviction (with
    /// [`Engine::track_block_residency`]).
    BlockLifetime(f64),
    /// `kv_block_idle_before_evict_seconds`: a sampled block's last access to its eviction.
    BlockIdleBeforeEvict(f64),
    /// `kv_block_reuse_gap_seconds`: between two consecutive accesses of a sampled block.
    BlockReuseGap(f64),
}

/// Cumulative counters and current gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found.
    pub prefix_cache_hits: u64,
    /// Prompt tokens of requests that produced their first token.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generation_tokens: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Prompt tokens served from the prefix cache, of requests that produced their first token
    /// (`prompt_tokens_cached_total`).
    pub prompt_tokens_cached: u64,
    /// Finished requests by reason: stop, length, abort.
    pub finished: [u64; 3],
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// KV blocks in use (0..=1).
    pub kv_usage: f64,
    /// Steps taken.
    pub steps: u64,
    /// Sum of step durations, seconds.
    pub busy_seconds: f64,
}

/// The outcome of one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutcome {
    /// Step duration, seconds (0 when there was nothing to do).
    pub duration: f64,
    /// What the latency model was given.
    pub shape: StepShape,
    /// Events, all at `now + duration`.
    pub events: Vec<Event>,
    /// Metric observations.
    pub observations: Vec<Observation>,
}

#[derive(Debug)]
struct Req {
    prompt_len: usize,
    max_tokens: u32,
    tokens: Vec<u32>,
    hashes: Vec<u64>,
    target: u32,
    stop_reason: FinishReason,
    blocks: Vec<BlockId>,
    num_computed: usize,
    cached_tokens: Option<usize>,
    arrival: f64,
    first_scheduled: Option<f64>,
    first_token: Option<f64>,
    last_token: Option<f64>,
    preemptions: u32,
}

impl Req {
    fn outputs(&self) -> u32 {
        (self.tokens.len() - self.prompt_len) as u32
    }
}

/// One emulated engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    pool: BlockPool,
    root: u64,
    reqs: HashMap<u64, Req>,
    running: Vec<u64>,
    waiting: VecDeque<u64>,
    stats: EngineStats,
    /// KV cache events since the last [`Engine::take_kv_events`], when recorded.
    kv_events: Option<Vec<KvEvent>>,
}

/// A change to the prefix cache, as vLLM publishes it with `--kv-events-config` (its
/// `BlockStored`, `BlockRemoved` and `AllBlocksCleared`): what a router that follows each engine's
/// cache from the engine itself (llm-d's precise prefix-cache scorer, Dynamo's KV router) reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Full blocks of one request entered the cache, in order.
    Stored {
        /// Their chained hashes.
        block_hashes: Vec<u64>,
        /// The hash of the block before the first (None: the first is the prompt's first block).
        parent_block_hash: Option<u64>,
        /// Their tokens, `block_size` per block.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
    },
    /// A cached block was evicted (one event per block, as vLLM emits them).
    Removed {
        /// Its hash.
        block_hash: u64,
    },
    /// The whole prefix cache was reset.
    AllCleared,
}

/// Appends the `Stored` events of a request's newly cached blocks `js` (ascending block indices):
/// one event per run of consecutive blocks.
fn stored_events(into: &mut Vec<KvEvent>, req: &Req, js: &[usize], bs: usize) {
    let mut i = 0;
    while let Some(&first) = js.get(i) {
        let mut last = first;
        while js.get(i + 1) == Some(&(last + 1)) {
            i += 1;
            last += 1;
        }
        i += 1;
        let hashes = req.hashes.get(first..=last).map(<[u64]>::to_vec);
        let tokens = req
            .tokens
            .get(first * bs..(last + 1) * bs)
            .map(<[u32]>::to_vec);
        if let (Some(block_hashes), Some(token_ids)) = (hashes, tokens) {
            into.push(KvEvent::Stored {
                block_hashes,
                parent_block_hash: first
                    .checked_sub(1)
                    .and_then(|p| req.hashes.get(p).copied()),
                token_ids,
                block_size: bs as u32,
            });
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// Prompt plus output cannot fit `max_model_len`.
    #[error("This model's maximum context length is {max} tokens. However, your request has {prompt} input tokens. Please reduce the length of the input messages.")]
    TooLong {
        /// `max_model_len`
        max: u32,
        /// Prompt tokens.
        prompt: usize,
    },
    /// The prompt needs more KV blocks than the engine has.
    #[error("The prompt needs {need} KV cache blocks but the engine has {have}.")]
    TooManyBlocks {
        /// Blocks needed.
        need: usize,
        /// Blocks available in all.
        have: usize,
    },
    /// Same id twice.
    #[error("duplicate request id {0}")]
    Duplicate(u64),
}

impl EngineConfig {
    /// What `vllm serve` starts with on `profile`: block size 16, 256 sequences, 2048 batched
    /// tokens, prefix caching on, the profile's memory utilization and context length. The live
    /// lab and the simulator both build their engines from this.
    pub fn vllm_defaults(profile: &crate::profile::Profile) -> Self {
        let util = profile.default_gpu_memory_utilization;
        EngineConfig {
            model: profile.model.clone(),
            block_size: 16,
            num_gpu_blocks: profile.num_gpu_blocks(util, 16),
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: profile.max_model_len,
            enable_prefix_caching: true,
            latency: profile.latency.clone(),
            gpu_share: 1.0,
        }
    }
}

impl Engine {
    /// A fresh engine.
    pub fn new(cfg: EngineConfig) -> Self {
        let pool = BlockPool::new(cfg.num_gpu_blocks, cfg.enable_prefix_caching);
        let root = chain_root(&cfg.model);
        Self {
            cfg,
            pool,
            root,
            reqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            stats: EngineStats::default(),
            kv_events: None,
        }
    }

    /// Follows the residency of a `sample` share of KV block allocations from now on and reports
    /// each sampled block's eviction in the step's observations, as vLLM's `--kv-cache-metrics`
    /// with `--kv-cache-metrics-sample`; an error for a share outside (0, 1].
    pub fn track_block_residency(&mut self, sample: f64) -> Result<(), String> {
        self.pool.track_residency(sample)
    }

    /// Records every change to the prefix cache from now on, for [`Engine::take_kv_events`].
    pub fn record_kv_events(&mut self) {
        self.pool.record_evictions();
        self.kv_events.get_or_insert_with(Vec::new);
    }

    /// The prefix cache's changes since the last call, in order (empty unless recorded).
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.drain_evictions();
        self.kv_events
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Moves the pool's evictions so far into the event log (they precede what comes next).
    fn drain_evictions(&mut self) {
        if let Some(ev) = self.kv_events.as_mut() {
            ev.extend(
                self.pool
                    .take_evicted()
                    .into_iter()
                    .map(|block_hash| KvEvent::Removed { block_hash }),
            );
        }
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Counters and gauges.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The block pool (read-only).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Whether a step would do anything.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Requests the engine holds.
    pub fn len(&self) -> usize {
        self.reqs.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Output length a request will have: `max_tokens` with `ignore_eos`, else a deterministic
    /// "natural" length from the prompt (32..512 tokens), kept within `min_tokens..=max_tokens`.
    pub fn planned_output(req: &NewRequest) -> (u32, FinishReason) {
        if req.ignore_eos {
            return (req.max_tokens, FinishReason::Length);
        }
        let mut bytes = Vec::with_capacity(req.prompt.len() * 4);
        for t in &req.prompt {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        let natural = 32 + (xxh3_64(&bytes) % 480) as u32;
        let natural = natural.max(req.min_tokens);
        if natural >= req.max_tokens {
            (req.max_tokens, FinishReason::Length)
        } else {
            (natural, FinishReason::Stop)
        }
    }

    /// Queues a request arriving at `now`.
    pub fn add(&mut self, r: NewRequest, now: f64) -> Result<(), AddError> {
        if self.reqs.contains_key(&r.id) {
            return Err(AddError::Duplicate(r.id));
        }
        if r.prompt.len() >= self.cfg.max_model_len as usize {
            return Err(AddError::TooLong {
                max: self.cfg.max_model_len,
                prompt: r.prompt.len(),
            });
        }
        let need = (r.prompt.len() + 1).div_ceil(self.cfg.block_size.max(1) as usize);
        if need > self.pool.capacity() {
            return Err(AddError::TooManyBlocks {
                need,
                have: self.pool.capacity(),
            });
        }
        let (target, stop_reason) = Self::planned_output(&r);
        // A request must fit the whole KV cache on its own, or it would preempt itself forever.
        let kv_room = self.pool.capacity() * self.cfg.block_size.max(1) as usize;
        let room = (self.cfg.max_model_len as usize)
            .min(kv_room)
            .saturating_sub(r.prompt.len());
        let (target, stop_reason) = if target as usize > room {
            (room as u32, FinishReason::Length)
        } else {
            (target, stop_reason)
        };
        let id = r.id;
        self.reqs.insert(
            id,
            Req {
                prompt_len: r.prompt.len(),
                max_tokens: r.max_tokens,
                tokens: r.prompt,
                hashes: Vec::new(),
                target: target.max(1),
                stop_reason,
                blocks: Vec::new(),
                num_computed: 0,
                cached_tokens: None,
                arrival: now,
                first_scheduled: None,
                first_token: None,
                preemptions: 0,
                last_token: None,
            },
        );
        self.waiting.push_back(id);
        self.refresh_gauges();
        Ok(())
    }

    /// Aborts a request (client gone): frees its blocks. False if unknown or finished.
    pub fn abort(&mut self, id: u64) -> Option<Usage> {
        let req = self.reqs.remove(&id)?;
        self.running.retain(|r| *r != id);
        self.waiting.retain(|r| *r != id);
        self.pool.free(req.blocks.iter().rev().copied());
        if let Some(f) = self.stats.finished.get_mut(2) {
            *f += 1;
        }
        self.refresh_gauges();
        Some(Usage {
            prompt_tokens: req.prompt_len as u32,
            completion_tokens: req.outputs(),
            cached_tokens: req.cached_tokens.unwrap_or(0) as u32,
        })
    }

    /// `POST /reset_prefix_cache`: false (and nothing reset) while any block is in use.
    pub fn reset_prefix_cache(&mut self) -> bool {
        let done = self.pool.reset_prefix_cache();
        if done {
            self.drain_evictions();
            if let Some(ev) = self.kv_events.as_mut() {
                ev.push(KvEvent::AllCleared);
            }
        }
        done
    }

    fn refresh_gauges(&mut self) {
        self.stats.running = self.running.len();
        self.stats.waiting = self.waiting.len();
        self.stats.kv_usage = self.pool.usage();
    }

    fn ensure_hashes(root: u64, req: &mut Req, bs: usize) {
        let full = req.tokens.len() / bs;
        while req.hashes.len() < full {
            let i = req.hashes.len();
            let parent = if i == 0 {
                root
            } else {
                req.hashes.get(i - 1).copied().unwrap_or(root)
            };
            let toks = req.tokens.get(i * bs..(i + 1) * bs).unwrap_or_default();
            req.hashes.push(block_hash(parent, toks));
        }
    }

    /// Gives a running request the blocks for `num_new` more tokens.
    fn allocate_more(&mut self, id: u64, num_new: usize) -> bool {
        let bs = self.cfg.block_size.max(1) as usize;
        let Some(req) = self.reqs.get(&id) else {
            return false;
        };
        let need = (req.num_computed + num_new)
            .div_ceil(bs)
            .saturating_sub(req.blocks.len());
        if need == 0 {
            return true;
        }
        match self.pool.allocate(need) {
            Some(b) => {
                if let Some(req) = self.reqs.get_mut(&id) {
                    req.blocks.extend(b);
                }
                true
            }
            None => false,
        }
    }

    fn preempt(&mut self, id: u64) {
        if let Some(req) = self.reqs.get_mut(&id) {
            let blocks = std::mem::take(&mut req.blocks);
            self.pool.free(blocks.into_iter().rev());
            req.num_computed = 0;
            req.preemptions += 1;
        }
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
    }

    /// Runs one step starting at `now`.
    pub fn step(&mut self, now: f64) -> StepOutcome {
        self.pool.set_clock(now);
        let bs = self.cfg.block_size.max(1) as usize;
        let mut budget = self.cfg.max_num_batched_tokens as usize;
        let mut scheduled: Vec<(u64, usize)> = Vec::new();
        let mut preempted = false;

        // 1. Running requests.
        let mut i = 0usize;
        while i < self.running.len() && budget > 0 {
            let Some(&id) = self.running.get(i) else {
                break;
            };
            let Some(req) = self.reqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let num_new = (req.tokens.len() - req.num_computed).min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            let mut scheduled_self = true;
            while !self.allocate_more(id, num_new) {
                let Some(victim) = self.running.pop() else {
                    break;
                };
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    scheduled_self = false;
                    break;
                }
            }
            if !scheduled_self || !self.running.contains(&id) {
                break;
            }
            scheduled.push((id, num_new));
            budget -= num_new;
            i += 1;
        }

        // 2. Waiting requests, first come first served.
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs as usize {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let root = self.root;
            let Some(req) = self.reqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            Self::ensure_hashes(root, req, bs);
            let max_hit = (req.tokens.len() - 1) / bs;
            let hit = self.pool.longest_cached(&req.hashes, max_hit);
            let num_computed = hit.len() * bs;
            let num_new = (req.tokens.len() - num_computed).min(budget);
            let need = (num_computed + num_new).div_ceil(bs) - hit.len();
            if need + self.pool.free_among(&hit) > self.pool.num_free() {
                break;
            }
            self.pool.touch(&hit);
            let Some(fresh) = self.pool.allocate(need) else {
                self.pool.free(hit.iter().rev().copied());
                break;
            };
            req.blocks = hit;
            req.blocks.extend(fresh);
            req.num_computed = num_computed;
            self.stats.prefix_cache_queries += req.tokens.len() as u64;
            self.stats.prefix_cache_hits += num_computed as u64;
            if req.cached_tokens.is_none() {
                req.cached_tokens = Some(num_computed);
                req.first_scheduled = Some(now);
            }
            self.waiting.pop_front();
            self.running.push(id);
            scheduled.push((id, num_new));
            budget -= num_new;
        }

        // 3. Price the step.
        let mut shape = StepShape::default();
        for (id, n) in &scheduled {
            let Some(req) = self.reqs.get(id) else {
                continue;
            };
            let n64 = *n as u64;
            shape.tokens += n64;
            let prompt_left = req.prompt_len.saturating_sub(req.num_computed);
            shape.prefill_tokens += prompt_left.min(*n) as u64;
            if req.num_computed >= req.prompt_len {
                shape.decode_seqs += 1;
            }
            if req.num_computed + n == req.tokens.len() {
                shape.sampled_seqs += 1;
            }
            shape.attn_token_ctx +=
                (*n as f64) * req.num_computed as f64 + (*n as f64) * (*n as f64) / 2.0;
            shape.kv_tokens_read += (req.num_computed + n) as u64;
        }
        let share = if self.cfg.gpu_share > 0.0 {
            self.cfg.gpu_share
        } else {
            1.0
        };
        let duration = self.cfg.latency.step_seconds(&shape) / share;
        let t = now + duration;
        let mut out = StepOutcome {
            duration,
            shape,
            events: Vec::new(),
            observations: Vec::new(),
        };
        if !scheduled.is_empty() {
            self.stats.steps += 1;
            self.stats.busy_seconds += duration;
            out.observations
                .push(Observation::IterationTokens(shape.tokens as u32));
        }
        for e in self.pool.take_residency() {
            out.observations
                .push(Observation::BlockLifetime(e.lifetime_s));
            out.observations
                .push(Observation::BlockIdleBeforeEvict(e.idle_s));
            out.observations
                .extend(e.reuse_gaps_s.into_iter().map(Observation::BlockReuseGap));
        }

        // 4. Commit at now + duration.
        self.drain_evictions();
        for (id, n) in scheduled {
            let root = self.root;
            let Some(req) = self.reqs.get_mut(&id) else {
                continue;
            };
            let before = req.num_computed / bs;
            req.num_computed += n;
            let after = req.num_computed / bs;
            Self::ensure_hashes(root, req, bs);
            // Newly cached blocks, kept only where events are recorded (no allocation otherwise).
            let mut stored: Vec<usize> = Vec::new();
            let record = self.kv_events.is_some();
            for j in before..after {
                if let (Some(b), Some(h)) = (req.blocks.get(j), req.hashes.get(j)) {
                    if self.pool.cache(*b, *h) && record {
                        stored.push(j);
                    }
                }
            }
            if let Some(ev) = self.kv_events.as_mut() {
                stored_events(ev, req, &stored, bs);
            }
            if req.num_computed < req.tokens.len() {
                continue; // a prefill chunk: no token yet
            }
            let index = req.outputs();
            let (token, text) = filler_token(index as usize);
            req.tokens.push(token);
            if index == 0 {
                out.observations.push(Observation::Ttft(t - req.arrival));
                out.observations
                    .push(Observation::PromptTokens(req.prompt_len as u32));
                let cached = req.cached_tokens.unwrap_or(0);
                self.stats.prompt_tokens += req.prompt_len as u64;
                self.stats.prompt_tokens_cached += cached.min(req.prompt_len) as u64;
                req.first_token = Some(t);
            } else if let Some(last) = req.last_token {
                out.observations.push(Observation::Itl(t - last));
            }
            req.last_token = Some(t);
            self.stats.generation_tokens += 1;
            out.events.push(Event::Token { id, index, text });
            if req.outputs() >= req.target {
                let reason = req.stop_reason;
                let usage = Usage {
                    prompt_tokens: req.prompt_len as u32,
                    completion_tokens: req.outputs(),
                    cached_tokens: req.cached_tokens.unwrap_or(0) as u32,
                };
                out.observations.push(Observation::E2e(t - req.arrival));
                out.observations
                    .push(Observation::GenerationTokens(usage.completion_tokens));
                let scheduled = req.first_scheduled.unwrap_or(req.arrival);
                let first = req.first_token.unwrap_or(t);
                out.observations
                    .push(Observation::QueueTime((scheduled - req.arrival).max(0.0)));
                out.observations
                    .push(Observation::PrefillTime((first - scheduled).max(0.0)));
                out.observations
                    .push(Observation::DecodeTime((t - first).max(0.0)));
                out.observations
                    .push(Observation::InferenceTime((t - scheduled).max(0.0)));
                if usage.completion_tokens > 1 {
                    out.observations.push(Observation::TimePerOutputToken(
                        (t - first).max(0.0) / f64::from(usage.completion_tokens - 1),
                    ));
                }
                out.observations
                    .push(Observation::RequestPreemptions(req.preemptions));
                out.observations
                    .push(Observation::MaxGenerationTokens(usage.completion_tokens));
                out.observations.push(Observation::ParamsN(1));
                out.observations
                    .push(Observation::ParamsMaxTokens(req.max_tokens));
                out.observations.push(Observation::PrefillKvComputed(
                    (req.prompt_len - (usage.cached_tokens as usize).min(req.prompt_len)) as u32,
                ));
                let blocks = std::mem::take(&mut req.blocks);
                self.pool.free(blocks.into_iter().rev());
                self.reqs.remove(&id);
                self.running.retain(|r| *r != id);
                let slot = if reason == FinishReason::Stop { 0 } else { 1 };
                if let Some(f) = self.stats.finished.get_mut(slot) {
                    *f += 1;
                }
                out.events.push(Event::Finished { id, reason, usage });
            }
        }
        self.refresh_gauges();
        out
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
    use crate::block_pool::block_hash;
    use crate::profile::a100_llama2_13b;
    use proptest::prelude::*;

    fn cfg(blocks: u32) -> EngineConfig {
        EngineConfig {
            model: "m".into(),
            block_size: 16,
            num_gpu_blocks: blocks,
            max_num_seqs: 8,
            max_num_batched_tokens: 512,
            max_model_len: 4096,
            enable_prefix_caching: true,
            latency: a100_llama2_13b().latency,
            gpu_share: 1.0,
        }
    }

    fn req(id: u64, prompt: Vec<u32>, max_tokens: u32) -> NewRequest {
        NewRequest {
            id,
            prompt,
            max_tokens,
            min_tokens: 0,
            ignore_eos: true,
        }
    }

    /// Runs until idle; returns (time, usage per request).
    fn run(e: &mut Engine, mut now: f64) -> (f64, HashMap<u64, Usage>) {
        let mut done = HashMap::new();
        for _ in 0..100_000 {
            if !e.has_work() {
                break;
            }
            let o = e.step(now);
            now += o.duration;
            for ev in o.events {
                if let Event::Finished { id, usage, .. } = ev {
                    done.insert(id, usage);
                }
            }
        }
        (now, done)
    }

    /// Runs until idle and returns every observation, with the time it ended.
    fn observe(e: &mut Engine, mut now: f64) -> (f64, Vec<Observation>) {
        let mut seen = Vec::new();
        while e.has_work() {
            let o = e.step(now);
            now += o.duration;
            seen.extend(o.observations);
        }
        (now, seen)
    }

    #[test]
    fn sampled_blocks_report_their_residency_when_reallocated() {
        // 16 blocks: a 160-token prompt takes 11 (10 and one for its output); its two repeats hit
        // 9 and take 2 more each, all from blocks never allocated, so nothing is evicted yet.
        let mut e = Engine::new(cfg(16));
        e.track_block_residency(1.0).unwrap();
        let p: Vec<u32> = (0..160).collect();
        let mut t = 0.0;
        for id in 1..=3 {
            e.add(req(id, p.clone(), 2), t).unwrap();
            let (end, seen) = observe(&mut e, t);
            assert!(
                !seen
                    .iter()
                    .any(|o| matches!(o, Observation::BlockLifetime(_))),
                "nothing evicted while free blocks were never used"
            );
            t = end + 1.0;
        }
        // Two other prompts take the whole pool.
        let mut seen = Vec::new();
        for id in 4..=5u32 {
            e.add(
                req(u64::from(id), (id * 1000..id * 1000 + 160).collect(), 2),
                t,
            )
            .unwrap();
            let (end, s) = observe(&mut e, t);
            seen.extend(s);
            t = end;
        }
        let of = |f: fn(&Observation) -> Option<f64>| seen.iter().filter_map(f).collect::<Vec<_>>();
        let life = of(|o| match o {
            Observation::BlockLifetime(s) => Some(*s),
            _ => None,
        });
        let idle = of(|o| match o {
            Observation::BlockIdleBeforeEvict(s) => Some(*s),
            _ => None,
        });
        let gaps = of(|o| match o {
            Observation::BlockReuseGap(s) => Some(*s),
            _ => None,
        });
        assert_eq!(life.len(), idle.len(), "one of each per evicted block");
        assert!(
            life.iter().zip(&idle).all(|(l, i)| i <= l),
            "{life:?} {idle:?}"
        );
        // The first prompt's blocks, allocated at 0, lived past the two pauses of a second.
        assert!(life.iter().filter(|s| **s > 2.0).count() >= 9, "{life:?}");
        // Its first request's output block was never hit: idle since its allocation.
        assert!(idle.iter().any(|s| *s > 2.0), "{idle:?}");
        // The 9 blocks hit by requests 2 and 3: one gap each, over the second between them.
        assert_eq!(gaps.len(), 9, "{gaps:?}");
        assert!(gaps.iter().all(|g| *g > 1.0), "{gaps:?}");
    }

    #[test]
    fn untracked_engines_report_no_residency() {
        let mut e = Engine::new(cfg(12));
        for id in 0..4u32 {
            e.add(
                req(u64::from(id), (id * 1000..id * 1000 + 160).collect(), 2),
                0.0,
            )
            .unwrap();
        }
        let (_, seen) = observe(&mut e, 0.0);
        assert!(!seen.iter().any(|o| matches!(
            o,
            Observation::BlockLifetime(_)
                | Observation::BlockIdleBeforeEvict(_)
                | Observation::BlockReuseGap(_)
        )));
        assert!(seen.iter().any(|o| matches!(o, Observation::ParamsN(1))));
        assert!(seen
            .iter()
            .any(|o| matches!(o, Observation::ParamsMaxTokens(2))));
        assert!(seen
            .iter()
            .any(|o| matches!(o, Observation::MaxGenerationTokens(2))));
    }

    #[test]
    fn identical_second_request_hits_every_full_block_but_the_last_token() {
        let mut e = Engine::new(cfg(100));
        let prompt: Vec<u32> = (0..160).collect(); // exactly 10 blocks
        e.add(req(1, prompt.clone(), 4), 0.0).unwrap();
        let (t, _) = run(&mut e, 0.0);
        e.add(req(2, prompt.clone(), 4), t).unwrap();
        let (_, done) = run(&mut e, t);
        // Capped at prompt - 1 tokens: the last block is recomputed.
        assert_eq!(done[&2].cached_tokens, 144);
        let p2: Vec<u32> = (0..170).collect(); // 10 full blocks + 10 tokens
        e.add(req(3, p2, 4), t).unwrap();
        let (_, done) = run(&mut e, t);
        assert_eq!(done[&3].cached_tokens, 160);
        assert_eq!(e.stats().prefix_cache_hits, 144 + 160);
        assert_eq!(e.stats().prefix_cache_queries, 160 + 160 + 170);
    }

    #[test]
    fn running_blocks_are_never_evicted_and_preemption_recomputes() {
        // 10 blocks; two requests that each grow to 6 blocks cannot both stay.
        let mut c = cfg(10);
        c.max_num_batched_tokens = 4096;
        let mut e = Engine::new(c);
        e.add(req(1, (0..64).collect(), 30), 0.0).unwrap();
        e.add(req(2, (1000..1064).collect(), 30), 0.0).unwrap();
        let (_, done) = run(&mut e, 0.0);
        assert_eq!(done.len(), 2);
        assert!(e.stats().preemptions >= 1);
        assert_eq!(e.pool().num_free(), 10);
        assert_eq!(done[&1].completion_tokens, 30);
        assert_eq!(done[&2].completion_tokens, 30);
    }

    #[test]
    fn chunked_prefill_respects_the_budget() {
        let mut c = cfg(200);
        c.max_num_batched_tokens = 256;
        let mut e = Engine::new(c);
        e.add(req(1, (0..1000).collect(), 1), 0.0).unwrap();
        let mut steps = 0;
        while e.has_work() {
            let o = e.step(0.0);
            assert!(o.shape.tokens <= 256);
            steps += 1;
        }
        assert_eq!(steps, 4);
    }

    #[test]
    fn abort_frees_blocks() {
        let mut e = Engine::new(cfg(50));
        e.add(req(1, (0..100).collect(), 100), 0.0).unwrap();
        e.step(0.0);
        assert!(e.pool().num_free() < 50);
        assert!(e.abort(1).is_some());
        assert_eq!(e.pool().num_free(), 50);
        assert!(!e.has_work());
        assert_eq!(e.stats().finished[2], 1);
    }

    #[test]
    fn queue_time_is_observed_when_the_request_finishes() {
        // vLLM observes queue, prefill, decode and inference time per finished request: a request
        // still decoding shows in none of them, so a router reading their sums reads finished
        // requests only.
        let mut c = cfg(200);
        c.max_num_seqs = 1;
        let mut e = Engine::new(c);
        e.add(req(1, (0..100).collect(), 3), 0.0).unwrap();
        e.add(req(2, (500..600).collect(), 3), 0.0).unwrap();
        let (mut now, mut queue, mut finished) = (0.0, Vec::new(), 0);
        while e.has_work() {
            let o = e.step(now);
            now += o.duration;
            for ob in &o.observations {
                match ob {
                    Observation::QueueTime(s) => queue.push((*s, finished)),
                    Observation::E2e(_) => finished += 1,
                    _ => {}
                }
            }
        }
        // Each after its own request's end: the first waited for nothing, the second (one running
        // sequence at most) for the whole first one.
        assert_eq!(queue.len(), 2, "{queue:?}");
        assert!(queue[0].0.abs() < 1e-12 && queue[0].1 == 1, "{queue:?}");
        assert!(queue[1].0 > 0.0 && queue[1].1 == 2, "{queue:?}");
    }

    #[test]
    fn rejects_too_long() {
        let mut e = Engine::new(cfg(1000));
        assert!(matches!(
            e.add(req(1, vec![0; 4096], 1), 0.0),
            Err(AddError::TooLong { .. })
        ));
    }

    proptest! {
        /// Every request finishes with its planned length, blocks all come back, counters add up.
        #[test]
        fn everything_finishes_and_blocks_return(
            reqs in prop::collection::vec((1usize..300, 1u32..40, 0u64..4), 1..12),
            blocks in 40u32..120,
            batched in 32u32..600,
        ) {
            let mut c = cfg(blocks);
            c.max_num_batched_tokens = batched;
            let mut e = Engine::new(c);
            let mut expected = HashMap::new();
            for (i, (len, out, family)) in reqs.iter().enumerate() {
                // Families share prefixes, so the cache is exercised.
                let prompt: Vec<u32> = (0..*len as u32).map(|t| t + 10_000 * *family as u32).collect();
                e.add(req(i as u64, prompt, *out), 0.0).unwrap();
                expected.insert(i as u64, *out);
            }
            let (_, done) = run(&mut e, 0.0);
            prop_assert_eq!(done.len(), expected.len());
            for (id, u) in &done {
                prop_assert_eq!(u.completion_tokens, expected[id]);
            }
            prop_assert_eq!(e.pool().num_free(), blocks as usize);
            prop_assert!(e.stats().prefix_cache_hits <= e.stats().prefix_cache_queries);
            prop_assert_eq!(e.stats().generation_tokens, expected.values().map(|v| u64::from(*v)).sum::<u64>());
        }

        /// A consumer that replays the KV events holds exactly the engine's cached blocks, whatever
        /// is evicted or reset on the way, and every stored block's hash follows from its parent and
        /// its tokens (what a router recomputes them from).
        #[test]
        fn kv_events_replay_to_the_engines_cache(
            waves in prop::collection::vec(
                prop::collection::vec((1usize..300, 1u32..30, 0u64..4), 1..8),
                1..4,
            ),
            blocks in 30u32..100,
            reset in any::<bool>(),
        ) {
            let mut e = Engine::new(cfg(blocks));
            e.record_kv_events();
            let root = chain_root("m");
            let mut held: HashMap<u64, i64> = HashMap::new();
            let mut id = 0;
            for (w, wave) in waves.iter().enumerate() {
                for (len, out, family) in wave {
                    let prompt: Vec<u32> = (0..*len as u32).map(|t| t + 10_000 * *family as u32).collect();
                    e.add(req(id, prompt, *out), 0.0).unwrap();
                    id += 1;
                }
                run(&mut e, 0.0);
                if reset && w == 0 {
                    prop_assert!(e.reset_prefix_cache());
                }
                for ev in e.take_kv_events() {
                    match ev {
                        KvEvent::Stored { block_hashes, parent_block_hash, token_ids, block_size } => {
                            prop_assert_eq!(block_size, 16);
                            prop_assert_eq!(token_ids.len(), block_hashes.len() * 16);
                            let mut parent = parent_block_hash.unwrap_or(root);
                            for (h, chunk) in block_hashes.iter().zip(token_ids.chunks(16)) {
                                prop_assert_eq!(*h, block_hash(parent, chunk));
                                parent = *h;
                                *held.entry(*h).or_default() += 1;
                            }
                        }
                        KvEvent::Removed { block_hash } => *held.entry(block_hash).or_default() -= 1,
                        KvEvent::AllCleared => held.clear(),
                    }
                }
                held.retain(|_, n| *n != 0);
                let mut truth: HashMap<u64, i64> = HashMap::new();
                for h in e.pool().block_hashes() {
                    *truth.entry(h).or_default() += 1;
                }
                prop_assert_eq!(&held, &truth);
            }
        }
    }
}
