//! Synthetic RAG: many users ask questions over a few shared ~500-token system prompts (retrieved
//! documents), chosen with a popularity skew.

use crate::rng::Rng;
use crate::{words, Session, Turn};

/// The shape of a RAG workload.
#[derive(Debug, Clone, PartialEq)]
pub struct RagOptions {
    /// Distinct shared system prompts.
    pub documents: usize,
    /// Words (about tokens) per system prompt.
    pub document_tokens: usize,
    /// Zipf exponent of document popularity (0: uniform).
    pub popularity_skew: f64,
    /// Users (sessions).
    pub users: usize,
    /// Questions per user (turns; each resends the history).
    pub questions_per_user: usize,
    /// Words per question.
    pub question_tokens: usize,
    /// Tokens generated per answer.
    pub max_tokens: u32,
    /// Pause between answers and questions, ms.
    pub think_ms: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for RagOptions {
    fn default() -> Self {
        Self {
            documents: 4,
            document_tokens: 500,
            popularity_skew: 1.0,
            users: 200,
            questions_per_user: 1,
            question_tokens: 24,
            max_tokens: 64,
            think_ms: 1000.0,
            seed: 1,
        }
    }
}

/// The sessions (start times 0: give them arrivals).
pub fn generate(o: &RagOptions) -> Vec<Session> {
    let mut r = Rng::new(o.seed);
    let docs: Vec<String> = (0..o.documents.max(1))
        .map(|d| {
            format!(
                "Answer from this document only.\n\n{}",
                words(o.seed.wrapping_mul(1_000_003) + d as u64, o.document_tokens)
            )
        })
        .collect();
    (0..o.users)
        .map(|u| {
            let d = r.zipf(docs.len(), o.popularity_skew);
            let turns = (0..o.questions_per_user.max(1))
                .map(|q| Turn {
                    user: format!(
                        "Question: {}?",
                        words(
                            r.next_u64() ^ ((u as u64) << 20) ^ q as u64,
                            o.question_tokens
                        )
                    ),
                    assistant: None,
                    max_tokens: o.max_tokens,
                })
                .collect();
            Session {
                id: format!("rag-user-{u}"),
                start_ms: 0.0,
                system: docs.get(d).cloned(),
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
    fn shared_prompts_with_a_popularity_skew() {
        let s = generate(&RagOptions {
            users: 2000,
            ..Default::default()
        });
        assert_eq!(
            s,
            generate(&RagOptions {
                users: 2000,
                ..Default::default()
            })
        );
        let mut counts = std::collections::BTreeMap::new();
        for x in &s {
            *counts.entry(x.system.clone().unwrap()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        let mut c: Vec<i32> = counts.values().copied().collect();
        c.sort_unstable();
        // Zipf(1) over 4: the most popular about 4x the least.
        assert!(c[3] > 3 * c[0], "{c:?}");
        let words_in_doc = s[0].system.as_ref().unwrap().split_whitespace().count();
        assert!((500..520).contains(&words_in_doc));
        assert!(s
            .iter()
            .all(|x| x.turns.len() == 1 && x.turns[0].assistant.is_none()));
    }
}
