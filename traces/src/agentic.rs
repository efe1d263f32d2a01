//! Synthetic agentic coding sessions: a long tool and system prompt that every session shares in
//! part, then dozens of turns of tool results, so prompts grow to tens of thousands of tokens.
//!
//! Each session's system prompt is a prefix shared by every session (the agent's instructions and
//! tool schemas) followed by a part of its own (the repository's context). Each turn after the
//! first carries a tool result (a file read, a test run, a search), the assistant answers with a
//! short tool call, and the next turn follows after a short pause (the tool running). A session
//! ends when its prompt would pass `max_prompt_tokens` or after `max_turns`.

use crate::rng::Rng;
use crate::{words, Session, Turn};

/// The shape of an agentic workload.
#[derive(Debug, Clone, PartialEq)]
pub struct AgenticOptions {
    /// Sessions.
    pub sessions: usize,
    /// Words (about tokens) of the system prompt every session shares.
    pub shared_tokens: usize,
    /// Words of each session's own part of its system prompt: uniform in this range.
    pub own_tokens: (usize, usize),
    /// Turns per session: uniform in this range.
    pub turns: (usize, usize),
    /// Words of a tool result: log-uniform in this range.
    pub tool_result_tokens: (usize, usize),
    /// Tokens generated per turn (the tool call): uniform in this range.
    pub max_tokens: (u32, u32),
    /// A session stops before its prompt would pass this many words.
    pub max_prompt_tokens: usize,
    /// Pause between a response and the next turn (the tool running), ms.
    pub think_ms: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for AgenticOptions {
    fn default() -> Self {
        Self {
            sessions: 100,
            shared_tokens: 7_000,
            own_tokens: (3_000, 10_000),
            turns: (20, 40),
            tool_result_tokens: (300, 6_000),
            max_tokens: (60, 300),
            max_prompt_tokens: 120_000,
            think_ms: 500.0,
            seed: 1,
        }
    }
}

fn uniform(r: &mut Rng, (lo, hi): (usize, usize)) -> usize {
    lo + (r.uniform() * (hi.saturating_sub(lo) + 1) as f64) as usize
}

/// The sessions (start times 0: give them arrivals).
pub fn generate(o: &AgenticOptions) -> Vec<Session> {
    let mut r = Rng::new(o.seed);
    let shared = format!(
        "You are a coding agent. Use the tools below to change the repository.\n\n{}",
        words(o.seed.wrapping_mul(7_919), o.shared_tokens)
    );
    (0..o.sessions)
        .map(|s| {
            let key = o.seed.wrapping_mul(1_000_003) ^ ((s as u64) << 24);
            let own = uniform(&mut r, o.own_tokens);
            let system = format!("{shared}\n\nRepository context:\n{}", words(key, own));
            let mut prompt = o.shared_tokens + own;
            let n = uniform(&mut r, o.turns).max(1);
            let mut turns = Vec::with_capacity(n);
            for t in 0..n {
                let max_tokens =
                    uniform(&mut r, (o.max_tokens.0 as usize, o.max_tokens.1 as usize)) as u32;
                let size = if t == 0 {
                    200
                } else {
                    let (lo, hi) = (
                        (o.tool_result_tokens.0.max(1) as f64).ln(),
                        (o.tool_result_tokens.1.max(1) as f64).ln(),
                    );
                    (lo + r.uniform() * (hi - lo)).exp() as usize
                };
                if t > 0 && prompt + size + max_tokens as usize > o.max_prompt_tokens {
                    break;
                }
                prompt += size + max_tokens as usize;
                let body = words(key ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9), size);
                let user = if t == 0 {
                    format!("Task: {body}")
                } else {
                    format!("Tool result:\n{body}")
                };
                turns.push(Turn {
                    user,
                    assistant: None,
                    max_tokens,
                });
            }
            Session {
                id: format!("agent-{s}"),
                start_ms: 0.0,
                system: Some(system),
                turns,
                think_ms: o.think_ms,
            }
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
    fn sessions_share_a_prefix_and_grow_long() {
        let s = generate(&AgenticOptions {
            sessions: 20,
            ..Default::default()
        });
        assert_eq!(s.len(), 20);
        let shared = s[0].system.as_ref().unwrap();
        let head = &shared[..shared.find("Repository context").unwrap()];
        assert!(s
            .iter()
            .all(|x| x.system.as_ref().unwrap().starts_with(head)));
        assert_ne!(s[0].system, s[1].system);
        for x in &s {
            let words: usize = x.system.as_ref().unwrap().split(' ').count()
                + x.turns
                    .iter()
                    .map(|t| t.user.split(' ').count() + t.max_tokens as usize)
                    .sum::<usize>();
            assert!(words <= 121_000, "{words}");
            assert!(x.turns.len() >= 10, "{}", x.turns.len());
        }
        let longest = s
            .iter()
            .map(|x| {
                x.turns
                    .iter()
                    .map(|t| t.user.split(' ').count())
                    .sum::<usize>()
            })
            .max()
            .unwrap();
        assert!(longest > 40_000, "{longest}");
        assert_eq!(
            generate(&AgenticOptions::default())[3],
            generate(&AgenticOptions::default())[3]
        );
    }
}
