//! Hardware profiles: how long one engine step takes, and how many KV blocks fit.
//!
//! Two model forms:
//! - [`LatencyModel::Roofline`]: a step costs a fixed overhead plus the larger of its compute time
//!   and its memory time. Compute: linear-layer FLOPs per scheduled token, attention FLOPs growing
//!   with context (`attn_flops_coef * context` per token), LM-head FLOPs per sampled sequence, at
//!   `peak_flops * mfu`. Memory: the weights once per step plus the KV cache each scheduled sequence
//!   reads, at `mem_bandwidth * mbu`. The FLOP and byte counts are
//!   `shared/reference/calibration_first_principles.json`; with `mfu = mbu = 1` and no overhead this
//!   model reproduces that file's lower bounds exactly (tested).
//! - [`LatencyModel::Linear`]: the earlier prototype's fitted numbers (a base plus a cost per
//!   computed block for prefill; a cost per decode step).
//!
//! Efficiency factors and overheads are assumptions, named in each profile's `sources`.

use serde::{Deserialize, Serialize};

/// How a step's duration is computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LatencyModel {
    /// Roofline over first-principles FLOP and byte counts.
    Roofline {
        /// Linear-layer FLOPs per token processed (2 x matmul parameters).
        linear_flops_per_token: f64,
        /// Attention FLOPs per token per token of context before it.
        attn_flops_coef: f64,
        /// LM-head FLOPs per sequence sampled in the step.
        lm_head_flops_per_seq: f64,
        /// Bytes of weights read once per step.
        weight_bytes: f64,
        /// KV-cache bytes per token of context read by attention.
        kv_bytes_per_token: f64,
        /// Dense bf16 tensor FLOP/s of the GPU.
        peak_flops: f64,
        /// Memory bandwidth, bytes/s.
        mem_bandwidth: f64,
        /// Model FLOPs utilisation reached (0..=1).
        mfu: f64,
        /// Memory bandwidth utilisation reached (0..=1).
        mbu: f64,
        /// Fixed cost of one step (scheduling, launch, sampling), seconds.
        step_overhead_s: f64,
    },
    /// Measured points (a calibration of a real endpoint), interpolated linearly: the duration of a
    /// prefill over its computed tokens (with the prefix already cached for the rest), and of a
    /// decode step over the batch size. A step that does both pays both.
    Measured {
        /// (tokens computed, seconds), ascending by tokens.
        prefill: Vec<(f64, f64)>,
        /// (sequences decoding, seconds per step), ascending by sequences.
        decode: Vec<(f64, f64)>,
    },
    /// Fitted linear model.
    Linear {
        /// Cost of a step that computes any prefill tokens, seconds.
        prefill_base_s: f64,
        /// Cost per computed prefill block (of `block_size` tokens), seconds.
        prefill_per_block_s: f64,
        /// Cost of a step that decodes any sequence, seconds.
        decode_step_s: f64,
        /// Block size the fit was made with.
        block_size: u32,
    },
}

/// What one step computes, for the latency model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Tokens computed in the step (prefill chunks plus one per decoding sequence).
    pub tokens: u64,
    /// Prompt tokens computed (prefill) in the step.
    pub prefill_tokens: u64,
    /// Sequences that decode a token in the step.
    pub decode_seqs: u64,
    /// Sequences sampled in the step (decoding ones plus prefills that complete).
    pub sampled_seqs: u64,
    /// Sum over computed tokens of the context before each (attention work).
    pub attn_token_ctx: f64,
    /// Sum over scheduled sequences of their context length after the step (KV bytes read).
    pub kv_tokens_read: u64,
}

impl LatencyModel {
    /// Duration of a step, in seconds.
    pub fn step_seconds(&self, s: &StepShape) -> f64 {
        if s.tokens == 0 {
            return 0.0;
        }
        match self {
            LatencyModel::Roofline {
                linear_flops_per_token,
                attn_flops_coef,
                lm_head_flops_per_seq,
                weight_bytes,
                kv_bytes_per_token,
                peak_flops,
                mem_bandwidth,
                mfu,
                mbu,
                step_overhead_s,
            } => {
                let flops = linear_flops_per_token * s.tokens as f64
                    + attn_flops_coef * s.attn_token_ctx
                    + lm_head_flops_per_seq * s.sampled_seqs as f64;
                let compute = flops / (peak_flops * mfu);
                let bytes = weight_bytes + kv_bytes_per_token * s.kv_tokens_read as f64;
                let memory = bytes / (mem_bandwidth * mbu);
                step_overhead_s + compute.max(memory)
            }
            LatencyModel::Linear {
                prefill_base_s,
                prefill_per_block_s,
                decode_step_s,
                block_size,
            } => {
                let mut t = 0.0;
                if s.prefill_tokens > 0 {
                    let blocks = s.prefill_tokens.div_ceil(u64::from((*block_size).max(1)));
                    t += prefill_base_s + prefill_per_block_s * blocks as f64;
                }
                if s.decode_seqs > 0 {
                    t += decode_step_s;
                }
                t
            }
            LatencyModel::Measured { prefill, decode } => {
                let mut t = 0.0;
                if s.prefill_tokens > 0 {
                    t += interpolate(prefill, s.prefill_tokens as f64);
                }
                if s.decode_seqs > 0 {
                    t += interpolate(decode, s.decode_seqs as f64);
                }
                t
            }
        }
    }
}

/// Piecewise-linear interpolation through `points` (sorted by x), extrapolated from the end
/// segments; 0 without points.
pub fn interpolate(points: &[(f64, f64)], x: f64) -> f64 {
    match points {
        [] => 0.0,
        [(_, y)] => *y,
        _ => {
            let i = points
                .iter()
                .position(|p| p.0 >= x)
                .unwrap_or(points.len() - 1)
                .clamp(1, points.len() - 1);
            let (Some(a), Some(b)) = (points.get(i - 1), points.get(i)) else {
                return 0.0;
            };
            if (b.0 - a.0).abs() < f64::EPSILON {
                return b.1;
            }
            (a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0)).max(0.0)
        }
    }
}

/// A named hardware profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Name used on the command line.
    pub name: String,
    /// Model it describes.
    pub model: String,
    /// GPU it describes.
    pub gpu: String,
    /// GPU memory, bytes.
    pub gpu_memory_bytes: f64,
    /// Weight memory, bytes.
    pub weight_bytes: f64,
    /// KV-cache bytes per token.
    pub kv_bytes_per_token: f64,
    /// Memory held back from the KV cache besides weights (activations, graphs), bytes.
    pub reserved_bytes: f64,
    /// Default `--gpu-memory-utilization`.
    pub default_gpu_memory_utilization: f64,
    /// Fixed number of KV blocks (a measured setup), overriding the memory arithmetic.
    pub num_gpu_blocks: Option<u32>,
    /// Default `--max-model-len`.
    pub max_model_len: u32,
    /// The step latency model.
    pub latency: LatencyModel,
    /// Where every number comes from, and every assumption.
    pub sources: Vec<String>,
}

impl Profile {
    /// KV blocks of `block_size` tokens at `gpu_memory_utilization`: what vLLM computes as
    /// `(total * utilization - weights - reserved) / (kv_bytes_per_token * block_size)`.
    pub fn num_gpu_blocks(&self, gpu_memory_utilization: f64, block_size: u32) -> u32 {
        if let Some(n) = self.num_gpu_blocks {
            return n;
        }
        let kv = self.gpu_memory_bytes * gpu_memory_utilization
            - self.weight_bytes
            - self.reserved_bytes;
        let per_block = self.kv_bytes_per_token * f64::from(block_size.max(1));
        (kv / per_block).floor().max(0.0) as u32
    }

    /// Refuses a `--gpu-memory-utilization` outside (0, 1].
    pub fn check_utilization(gpu_memory_utilization: f64) -> Result<(), String> {
        let u = gpu_memory_utilization;
        if u > 0.0 && u <= 1.0 {
            Ok(())
        } else {
            Err(format!(
                "--gpu-memory-utilization {u}: want a share in (0, 1]"
            ))
        }
    }

    /// [`Profile::num_gpu_blocks`] for a `--gpu-memory-utilization` given by a user: refused
    /// outside (0, 1], or where the weights leave no memory for the KV cache.
    pub fn kv_blocks_at(
        &self,
        gpu_memory_utilization: f64,
        block_size: u32,
    ) -> Result<u32, String> {
        Self::check_utilization(gpu_memory_utilization)?;
        match self.num_gpu_blocks(gpu_memory_utilization, block_size) {
            0 => Err(format!(
                "--gpu-memory-utilization {gpu_memory_utilization}: profile {} leaves no memory \
                 for the KV cache",
                self.name
            )),
            n => Ok(n),
        }
    }

    /// Every built-in profile.
    pub fn builtin() -> Vec<Profile> {
        vec![seed_rig(), h100_llama31_8b(), a100_llama2_13b()]
    }

    /// A built-in profile by name, or a profile file (JSON) by path.
    pub fn load(name_or_path: &str) -> Result<Profile, String> {
        if let Some(p) = Self::builtin().into_iter().find(|p| p.name == name_or_path) {
            return Ok(p);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|e| {
            let names: Vec<String> = Self::builtin().into_iter().map(|p| p.name).collect();
            format!(
                "no built-in profile {name_or_path:?} ({}) and no such file: {e}",
                names.join(", ")
            )
        })?;
        serde_json::from_str(&text).map_err(|e| format!("profile {name_or_path}: {e}"))
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Assumed efficiency and overhead shared by the derived profiles.
const MFU: f64 = 0.55;
const MBU: f64 = 0.80;
const STEP_OVERHEAD_S: f64 = 0.002;

fn assumptions() -> Vec<String> {
    vec![
        format!("assumption: prefill reaches {MFU} of dense bf16 tensor peak (MFU); FlashAttention-based \
                 engines report 0.4-0.7 for long prefills"),
        format!("assumption: decode reaches {MBU} of peak memory bandwidth (MBU)"),
        format!("assumption: {} ms fixed cost per step (scheduler, launches, sampling; CUDA graphs on)", STEP_OVERHEAD_S * 1e3),
        "assumption: one instance has the GPU to itself (two instances sharing one GPU are not \
         slowed by each other unless --gpu-share is below 1)"
            .into(),
    ]
}

/// The seed rig: Llama-3.2-3B-Instruct on an RTX 5080 (16 GiB), `--gpu-memory-utilization 0.45`.
pub fn seed_rig() -> Profile {
    let mut sources = vec![
        "calibration_first_principles.json models[Llama-3.2-3B]: 5,637,144,576 linear FLOPs/token, \
         attention 344,064 FLOPs x context, LM head 788,004,864 FLOPs/sequence, weights 6,425,499,648 B, \
         KV 114,688 B/token"
            .into(),
        "calibration_first_principles.json gpus.RTX5080: 112.55 TFLOP/s dense bf16 (fp32 accumulate), \
         960 GB/s, 16 GiB"
            .into(),
        "calibration_first_principles.json kv_capacity_16GiB_llama3.2-3B.A_vllm_util_0_45_upper_bound: \
         711 blocks of 16 at 0.45 (no activation reserve), as in DESIGN.md"
            .into(),
    ];
    sources.extend(assumptions());
    Profile {
        name: "rtx5080-llama3.2-3b".into(),
        model: "meta-llama/Llama-3.2-3B-Instruct".into(),
        gpu: "NVIDIA RTX 5080 16 GiB".into(),
        gpu_memory_bytes: 16.0 * GIB,
        weight_bytes: 6_425_499_648.0,
        kv_bytes_per_token: 114_688.0,
        reserved_bytes: 0.0,
        default_gpu_memory_utilization: 0.45,
        num_gpu_blocks: None,
        max_model_len: 32_768,
        latency: LatencyModel::Roofline {
            linear_flops_per_token: 5_637_144_576.0,
            attn_flops_coef: 344_064.0,
            lm_head_flops_per_seq: 788_004_864.0,
            weight_bytes: 6_425_499_648.0,
            kv_bytes_per_token: 114_688.0,
            peak_flops: 112.551_936e12,
            mem_bandwidth: 960e9,
            mfu: MFU,
            mbu: MBU,
            step_overhead_s: STEP_OVERHEAD_S,
        },
        sources,
    }
}

/// Llama-3.1-8B on an H100 SXM 80 GB at 0.9 memory utilization.
pub fn h100_llama31_8b() -> Profile {
    let mut sources = vec![
        "calibration_first_principles.json models[Llama-3.1-8B]: 13,958,643,712 linear FLOPs/token, \
         attention 524,288 FLOPs x context, LM head 1,050,673,152 FLOPs/sequence, weights 16,060,522,496 B \
         (decode reads 15,009,849,344 B), KV 131,072 B/token"
            .into(),
        "calibration_first_principles.json gpus.H100_SXM: 989.4 TFLOP/s dense bf16, 3.35 TB/s, 80 GiB".into(),
        "assumption: 2 GiB held back for activations and CUDA graphs at 0.9 utilization".into(),
    ];
    sources.extend(assumptions());
    Profile {
        name: "h100-llama3.1-8b".into(),
        model: "meta-llama/Llama-3.1-8B-Instruct".into(),
        gpu: "NVIDIA H100 SXM 80 GB".into(),
        gpu_memory_bytes: 80.0 * GIB,
        weight_bytes: 16_060_522_496.0,
        kv_bytes_per_token: 131_072.0,
        reserved_bytes: 2.0 * GIB,
        default_gpu_memory_utilization: 0.9,
        num_gpu_blocks: None,
        max_model_len: 131_072,
        latency: LatencyModel::Roofline {
            linear_flops_per_token: 13_958_643_712.0,
            attn_flops_coef: 524_288.0,
            lm_head_flops_per_seq: 1_050_673_152.0,
            weight_bytes: 15_009_849_344.0,
            kv_bytes_per_token: 131_072.0,
            peak_flops: 989.4e12,
            mem_bandwidth: 3350e9,
            mfu: MFU,
            mbu: MBU,
            step_overhead_s: STEP_OVERHEAD_S,
        },
        sources,
    }
}

/// Llama-2-13B on an A100 40 GB, the earlier prototype's measured setup.
pub fn a100_llama2_13b() -> Profile {
    Profile {
        name: "a100-llama2-13b".into(),
        model: "meta-llama/Llama-2-13b-chat-hf".into(),
        gpu: "NVIDIA A100 40 GB".into(),
        gpu_memory_bytes: 40.0 * GIB,
        weight_bytes: 26_031_738_880.0,
        kv_bytes_per_token: 819_200.0,
        reserved_bytes: 0.0,
        default_gpu_memory_utilization: 0.9,
        num_gpu_blocks: Some(924),
        max_model_len: 4096,
        latency: LatencyModel::Linear {
            prefill_base_s: 0.005,
            prefill_per_block_s: 0.0025,
            decode_step_s: 0.015,
            block_size: 16,
        },
        sources: vec![
            "the earlier prototype (issue text): 924 KV blocks of 16 tokens; prefill 5 ms + 2.5 ms per \
             computed block; decode 15 ms per token"
                .into(),
            "Llama-2-13B: 13.0e9 parameters in bf16 = 26.0 GB; KV 40 layers x 5120 x 2 (K,V) x 2 B = \
             819,200 B/token (for reference only: the block count is the measured 924)"
                .into(),
        ],
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

    fn prefill_shape(n: u64) -> StepShape {
        StepShape {
            tokens: n,
            prefill_tokens: n,
            decode_seqs: 0,
            sampled_seqs: 1,
            attn_token_ctx: (n * n) as f64 / 2.0,
            kv_tokens_read: n,
        }
    }

    fn ideal(mut p: Profile) -> LatencyModel {
        if let LatencyModel::Roofline {
            mfu,
            mbu,
            step_overhead_s,
            ..
        } = &mut p.latency
        {
            *mfu = 1.0;
            *mbu = 1.0;
            *step_overhead_s = 0.0;
        }
        p.latency
    }

    /// With ideal efficiency the roofline gives the reference file's lower bounds.
    #[test]
    fn roofline_reproduces_reference_bounds() {
        let m = ideal(seed_rig());
        // ttft_lb_ms for 4096 and 1024 tokens; decode_step_ms_lb_bs1_ctx1k and bs32_ctx4k.
        assert!((m.step_seconds(&prefill_shape(4096)) * 1e3 - 230.8).abs() < 0.5);
        assert!((m.step_seconds(&prefill_shape(1024)) * 1e3 - 52.9).abs() < 0.5);
        let decode = |bs: u64, ctx: u64| StepShape {
            tokens: bs,
            prefill_tokens: 0,
            decode_seqs: bs,
            sampled_seqs: bs,
            attn_token_ctx: (bs * ctx) as f64,
            kv_tokens_read: bs * ctx,
        };
        assert!((m.step_seconds(&decode(1, 1024)) * 1e3 - 6.816).abs() < 0.01);
        assert!((m.step_seconds(&decode(32, 4096)) * 1e3 - 22.352).abs() < 0.05);
        let h = ideal(h100_llama31_8b());
        assert!((h.step_seconds(&prefill_shape(4096)) * 1e3 - 62.23).abs() < 0.5);
    }

    #[test]
    fn block_counts() {
        assert_eq!(seed_rig().num_gpu_blocks(0.45, 16), 711);
        assert_eq!(a100_llama2_13b().num_gpu_blocks(0.9, 16), 924);
        assert!(h100_llama31_8b().num_gpu_blocks(0.9, 16) > 25_000);
    }

    #[test]
    fn linear_model() {
        let m = a100_llama2_13b().latency;
        let t = m.step_seconds(&StepShape {
            tokens: 33,
            prefill_tokens: 32,
            decode_seqs: 1,
            ..Default::default()
        });
        assert!((t - (0.005 + 2.0 * 0.0025 + 0.015)).abs() < 1e-12);
    }

    #[test]
    fn measured_model_interpolates() {
        let m = LatencyModel::Measured {
            prefill: vec![(128.0, 0.01), (1024.0, 0.05)],
            decode: vec![(1.0, 0.007), (32.0, 0.011)],
        };
        let prefill = |n: u64| {
            m.step_seconds(&StepShape {
                tokens: n,
                prefill_tokens: n,
                ..Default::default()
            })
        };
        assert!((prefill(576) - 0.03).abs() < 1e-12);
        assert!(
            (prefill(2048) - (0.05 + 0.04 * 1024.0 / 896.0)).abs() < 1e-9,
            "extrapolates"
        );
        let d = m.step_seconds(&StepShape {
            tokens: 32,
            decode_seqs: 32,
            ..Default::default()
        });
        assert!((d - 0.011).abs() < 1e-12);
        assert_eq!(interpolate(&[], 5.0), 0.0);
    }

    #[test]
    fn profiles_round_trip_as_files() {
        for p in Profile::builtin() {
            let back: Profile = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            assert_eq!(back, p);
        }
    }
}
