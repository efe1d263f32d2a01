//! Mooncake traces (JSONL: `timestamp` ms, `input_length`, `output_length` tokens, `hash_ids`: one
//! id per 512-token block, prefix-chained) as real prompts: each hash id becomes a deterministic
//! 512-word text (one token per word), so two requests share a prompt prefix exactly as far as
//! they share hash ids.

use serde::Deserialize;

use crate::{words, Session, Turn};

/// Tokens per Mooncake hash block.
pub const BLOCK_TOKENS: usize = 512;

/// One trace line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MooncakeRequest {
    /// Arrival, ms.
    pub timestamp: f64,
    /// Prompt tokens.
    pub input_length: usize,
    /// Generated tokens.
    pub output_length: u32,
    /// Block ids.
    pub hash_ids: Vec<u64>,
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {source}")]
pub struct TraceError {
    /// 1-based line.
    pub line: usize,
    /// The JSON error.
    #[source]
    pub source: serde_json::Error,
}

/// Parses a JSONL trace.
pub fn parse(text: &str) -> Result<Vec<MooncakeRequest>, TraceError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| TraceError {
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// The prompt of a request: its blocks' texts, cut to `input_length` words.
pub fn prompt(r: &MooncakeRequest) -> String {
    let mut text = String::new();
    let mut left = r.input_length;
    for id in &r.hash_ids {
        if left == 0 {
            break;
        }
        let n = left.min(BLOCK_TOKENS);
        let block = block_text(*id);
        let cut: Vec<&str> = block.split(' ').take(n).collect();
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&cut.join(" "));
        left -= n;
    }
    text
}

/// The 512 words of one hash block.
pub fn block_text(id: u64) -> String {
    words(
        id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6d6f_6f6e,
        BLOCK_TOKENS,
    )
}

/// The requests as single-turn sessions (completions-style prompt in the user turn), arriving at
/// their trace timestamps divided by `speedup`.
pub fn sessions(reqs: &[MooncakeRequest], speedup: f64) -> Vec<Session> {
    let s = if speedup > 0.0 { speedup } else { 1.0 };
    reqs.iter()
        .enumerate()
        .map(|(i, r)| Session {
            id: format!("mooncake-{i}"),
            start_ms: r.timestamp / s,
            system: None,
            turns: vec![Turn {
                user: prompt(r),
                assistant: None,
                max_tokens: r.output_length.max(1),
            }],
            think_ms: 0.0,
        })
        .collect()
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

    #[test]
    fn shared_hash_ids_are_shared_prompt_prefixes() {
        let a = MooncakeRequest {
            timestamp: 0.0,
            input_length: 1100,
            output_length: 5,
            hash_ids: vec![1, 2, 3],
        };
        let b = MooncakeRequest {
            timestamp: 5.0,
            input_length: 1024,
            output_length: 5,
            hash_ids: vec![1, 2],
        };
        let c = MooncakeRequest {
            timestamp: 9.0,
            input_length: 1024,
            output_length: 5,
            hash_ids: vec![1, 9],
        };
        let (pa, pb, pc) = (prompt(&a), prompt(&b), prompt(&c));
        assert_eq!(pa.split(' ').count(), 1100);
        assert!(pa.starts_with(&pb));
        let common = pb
            .chars()
            .zip(pc.chars())
            .take_while(|(x, y)| x == y)
            .count();
        assert!(common >= block_text(1).len() && common < pb.len());
    }
}
