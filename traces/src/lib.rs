//! kvroute-traces: the workloads of the routing study, as data. No I/O: loaders take the file's
//! text, generators take a seed, and everything comes back as [`Session`]s that the replayer
//! (and the simulator) run.
//!
//! - [`sharegpt`]: ShareGPT V3 conversations as multi-turn sessions (every turn resends the
//!   history; assistant turns from the file or from the engine).
//! - [`rag`]: many users querying over a few shared ~500-token system prompts, with a popularity
//!   skew; [`mix`] blends workloads.
//! - [`mooncake`]: Mooncake JSONL traces; each 512-token `hash_id` becomes a deterministic
//!   512-word text, so the trace's prefix sharing becomes prefix sharing in real prompts.
//! - [`agentic`]: coding-agent sessions: a long shared tool and system prompt, dozens of
//!   tool-result turns, prompts growing to 50-120k tokens.
//! - [`arrivals`]: Poisson, a trace's own timestamps, Azure-style CSV timestamps, each scalable.

pub mod agentic;
pub mod arrivals;
pub mod mooncake;
pub mod rag;
pub mod rng;
pub mod sharegpt;

use serde::{Deserialize, Serialize};

/// One user's conversation: turns sent one after another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Session (and user) id; sent as the session header.
    pub id: String,
    /// When the first turn is sent, ms from the start of the run.
    pub start_ms: f64,
    /// System prompt, if any.
    pub system: Option<String>,
    /// The turns, in order.
    pub turns: Vec<Turn>,
    /// Pause between a turn's response and the next turn, ms.
    pub think_ms: f64,
}

/// One turn: the user's message and what the assistant said (from the file, if known).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// The user's message.
    pub user: String,
    /// The assistant's reply in the source data; None uses the engine's own answer.
    pub assistant: Option<String>,
    /// Tokens to generate (sent as `max_tokens` with `ignore_eos`).
    pub max_tokens: u32,
}

/// Blends two workloads: a `fraction` of the sessions from `a` (chosen by `seed`), the rest from
/// `b`, ordered by start time.
pub fn mix(a: &[Session], b: &[Session], fraction: f64, total: usize, seed: u64) -> Vec<Session> {
    let mut r = rng::Rng::new(seed);
    let (mut ia, mut ib) = (0usize, 0usize);
    let mut out = Vec::with_capacity(total);
    for _ in 0..total {
        let want_a = r.uniform() < fraction;
        // Take from the wanted workload, or from the other one when it has run out.
        let from_a = if want_a { ia < a.len() } else { ib >= b.len() };
        let next = if from_a {
            ia += 1;
            a.get(ia - 1)
        } else {
            ib += 1;
            b.get(ib - 1)
        };
        match next {
            Some(s) => out.push(s.clone()),
            None => break,
        }
    }
    out.sort_by(|x, y| x.start_ms.total_cmp(&y.start_ms));
    out
}

/// Assigns start times to sessions in order (e.g. from [`arrivals`]).
pub fn with_arrivals(mut sessions: Vec<Session>, starts_ms: &[f64]) -> Vec<Session> {
    sessions.truncate(starts_ms.len());
    for (s, t) in sessions.iter_mut().zip(starts_ms) {
        s.start_ms = *t;
    }
    sessions
}

/// Total requests (turns) of a workload.
pub fn requests(sessions: &[Session]) -> usize {
    sessions.iter().map(|s| s.turns.len()).sum()
}

/// Common English words that are one token each in Llama 3's tokenizer (with their leading space)
/// and in the emulator's: the vocabulary of generated text.
pub const WORDS: &[&str] = &[
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "foot",
    "boy",
    "age",
    "policy",
    "process",
    "music",
    "market",
    "sense",
    "nation",
    "plan",
    "college",
    "interest",
    "death",
    "experience",
    "effect",
    "use",
    "class",
    "control",
    "care",
    "field",
    "development",
    "role",
    "effort",
    "rate",
    "heart",
    "drug",
    "show",
    "leader",
    "light",
    "voice",
];

/// `n` deterministic words (one token each) for `key`.
pub fn words(key: u64, n: usize) -> String {
    let mut r = rng::Rng::new(key);
    let mut s = String::with_capacity(n * 7);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(
            WORDS
                .get((r.next_u64() % WORDS.len() as u64) as usize)
                .copied()
                .unwrap_or("time"),
        );
    }
    s
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

    fn sessions(prefix: &str, n: usize) -> Vec<Session> {
        (0..n)
            .map(|i| Session {
                id: format!("{prefix}{i}"),
                start_ms: i as f64,
                system: None,
                turns: vec![],
                think_ms: 0.0,
            })
            .collect()
    }

    #[test]
    fn mix_blends_by_fraction_and_orders_by_start() {
        let m = mix(&sessions("a", 1000), &sessions("b", 1000), 0.25, 1000, 3);
        assert_eq!(m.len(), 1000);
        let from_a = m.iter().filter(|s| s.id.starts_with('a')).count();
        assert!((200..300).contains(&from_a), "{from_a}");
        assert!(m.windows(2).all(|w| w[0].start_ms <= w[1].start_ms));
        // When one side runs out, the other fills in.
        assert_eq!(
            mix(&sessions("a", 3), &sessions("b", 100), 0.9, 50, 1).len(),
            50
        );
    }

    #[test]
    fn words_are_deterministic_and_counted() {
        assert_eq!(words(5, 10), words(5, 10));
        assert_ne!(words(5, 10), words(6, 10));
        assert_eq!(words(5, 512).split(' ').count(), 512);
    }
}
