//! ShareGPT V3 conversations (`[{id, conversations: [{from: human|gpt|system, value}]}]`) as
//! multi-turn sessions.

use serde::Deserialize;

use crate::Session;
use crate::Turn;

/// Which conversations to keep and how to replay them.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareGptOptions {
    /// Fewest human turns.
    pub min_turns: usize,
    /// Most human turns kept (later turns are dropped).
    pub max_turns: usize,
    /// Longest message kept, in characters (longer conversations are skipped).
    pub max_message_chars: usize,
    /// Most sessions.
    pub limit: usize,
    /// Use the file's assistant replies as history (else the engine's own answers).
    pub assistant_from_file: bool,
    /// Tokens generated per turn (`max_tokens` with `ignore_eos`).
    pub max_tokens: u32,
    /// Pause between a response and the next turn, ms.
    pub think_ms: f64,
}

impl Default for ShareGptOptions {
    fn default() -> Self {
        Self {
            min_turns: 2,
            max_turns: 10,
            max_message_chars: 8000,
            limit: usize::MAX,
            assistant_from_file: true,
            max_tokens: 128,
            think_ms: 1000.0,
        }
    }
}

#[derive(Deserialize)]
struct Conversation {
    id: String,
    conversations: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    from: String,
    value: String,
}

/// Parses a ShareGPT file's text into sessions (start times 0: give them arrivals).
pub fn parse(text: &str, opts: &ShareGptOptions) -> Result<Vec<Session>, serde_json::Error> {
    let convs: Vec<Conversation> = serde_json::from_str(text)?;
    let mut out = Vec::new();
    for c in convs {
        if out.len() >= opts.limit {
            break;
        }
        let mut msgs = c.conversations.into_iter().peekable();
        let system = match msgs.peek() {
            Some(m) if m.from == "system" => msgs.next().map(|m| m.value),
            _ => None,
        };
        let mut turns = Vec::new();
        let mut ok = true;
        while let Some(m) = msgs.next() {
            if m.from != "human" || m.value.chars().count() > opts.max_message_chars {
                ok = false;
                break;
            }
            let reply = match msgs.peek() {
                Some(r) if r.from == "gpt" => msgs.next().map(|r| r.value),
                _ => None,
            };
            if reply
                .as_ref()
                .is_some_and(|r| r.chars().count() > opts.max_message_chars)
            {
                ok = false;
                break;
            }
            turns.push(Turn {
                user: m.value,
                assistant: if opts.assistant_from_file {
                    reply
                } else {
                    None
                },
                max_tokens: opts.max_tokens,
            });
        }
        if !ok || turns.len() < opts.min_turns {
            continue;
        }
        turns.truncate(opts.max_turns);
        out.push(Session {
            id: c.id,
            start_ms: 0.0,
            system,
            turns,
            think_ms: opts.think_ms,
        });
    }
    Ok(out)
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

    const FIXTURE: &str = r#"[
      {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                    {"from": "human", "value": "more"}, {"from": "gpt", "value": "sure"}]},
      {"id": "b", "conversations": [{"from": "human", "value": "one turn only"}, {"from": "gpt", "value": "ok"}]},
      {"id": "c", "conversations": [{"from": "gpt", "value": "starts with gpt"}, {"from": "human", "value": "x"}]},
      {"id": "d", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q1"},
                                    {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}]}
    ]"#;

    #[test]
    fn turns_filters_and_system_prompts() {
        let s = parse(FIXTURE, &ShareGptOptions::default()).unwrap();
        let ids: Vec<&str> = s.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a", "d"]);
        assert_eq!(s[0].turns.len(), 2);
        assert_eq!(s[0].turns[1].assistant.as_deref(), Some("sure"));
        assert_eq!(s[1].system.as_deref(), Some("be brief"));
        assert_eq!(s[1].turns[1].assistant, None);
        let engine = parse(
            FIXTURE,
            &ShareGptOptions {
                assistant_from_file: false,
                min_turns: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(engine.len(), 3);
        assert!(engine
            .iter()
            .flat_map(|s| &s.turns)
            .all(|t| t.assistant.is_none()));
        let capped = parse(
            FIXTURE,
            &ShareGptOptions {
                max_turns: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(capped.iter().all(|s| s.turns.len() == 1));
        assert!(parse("{", &ShareGptOptions::default()).is_err());
    }
}
