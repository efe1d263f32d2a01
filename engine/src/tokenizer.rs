//! Approximate, deterministic tokenization and the Llama 3 chat template.
//!
//! The emulator needs token counts close to a real tokenizer's and token ids that are stable:
//! the same text gives the same ids, and two texts that share a prefix share the ids of that
//! prefix (up to the last pre-token), because vLLM's prefix cache works on token ids. It does not
//! need a vocabulary. Text is split the way Llama 3's pre-tokenizer does (an optional leading
//! space or symbol glued to a run of letters; digits in groups of up to three; runs of symbols;
//! runs of whitespace and newlines), and each pre-token becomes `ceil(len / width)` tokens with
//! a width per character class, fitted against Llama 3.2's real tokenizer on ShareGPT
//! (`scripts/tokenizer_error.py`, figures in docs/emulator.md). Token ids are hashes of the pieces.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Llama 3 special tokens.
pub const BEGIN_OF_TEXT: u32 = 128_000;
/// `<|start_header_id|>`
pub const START_HEADER: u32 = 128_006;
/// `<|end_header_id|>`
pub const END_HEADER: u32 = 128_007;
/// `<|eot_id|>`
pub const EOT: u32 = 128_009;
/// Ordinary token ids are below this.
pub const VOCAB: u64 = 128_000;

/// Characters per token for a run of ASCII letters (fitted on ShareGPT conversations 0-999 against
/// Llama 3's tokenizer: the total token ratio is 1.00; see scripts/tokenizer_error.py).
pub const ASCII_WORD_WIDTH: usize = 12;
/// Characters per token for a run of non-ASCII letters (accented Latin, Cyrillic, CJK, ...).
pub const OTHER_WORD_WIDTH: usize = 2;
/// Characters per token for a run of symbols.
pub const SYMBOL_WIDTH: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Newline,
    Space,
    Symbol,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Digit
    } else if c == '\n' || c == '\r' {
        Class::Newline
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Symbol
    }
}

fn piece_id(piece: &str) -> u32 {
    (xxh3_64_with_seed(piece.as_bytes(), 0x746f_6b65_6e73) % VOCAB) as u32
}

/// Appends the pieces of one pre-token, each `width` chars, as token ids.
fn emit(pre: &str, width: usize, out: &mut Vec<u32>) {
    let width = width.max(1);
    let mut start = 0usize;
    let mut count = 0usize;
    for (i, _) in pre.char_indices() {
        if count == width {
            out.push(piece_id(pre.get(start..i).unwrap_or_default()));
            start = i;
            count = 0;
        }
        count += 1;
    }
    if start < pre.len() {
        out.push(piece_id(pre.get(start..).unwrap_or_default()));
    }
}

/// Tokenizes text into ids.
pub fn encode(text: &str, out: &mut Vec<u32>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|(_, c)| *c);
    let byte = |i: usize| chars.get(i).map_or(text.len(), |(b, _)| *b);
    let mut i = 0usize;
    while let Some(c) = at(i) {
        let start = i;
        let mut lead = 0usize;
        // A leading space or symbol glues onto a following run of letters (" hello", "'s").
        if matches!(class(c), Class::Space | Class::Symbol)
            && at(i + 1).is_some_and(|n| class(n) == Class::Letter)
        {
            i += 1;
            lead = 1;
        }
        let Some(c) = at(i) else { break };
        let k = class(c);
        match k {
            Class::Letter => {
                let ascii = c.is_ascii();
                while at(i).is_some_and(|n| class(n) == Class::Letter && n.is_ascii() == ascii) {
                    i += 1;
                }
                let width = if ascii {
                    ASCII_WORD_WIDTH
                } else {
                    OTHER_WORD_WIDTH
                };
                // The glued lead character rides along with the first piece.
                let pre = text.get(byte(start)..byte(i)).unwrap_or_default();
                emit(pre, width + lead, out);
            }
            Class::Digit => {
                while at(i).is_some_and(|n| class(n) == Class::Digit) && i - start < 3 {
                    i += 1;
                }
                out.push(piece_id(text.get(byte(start)..byte(i)).unwrap_or_default()));
            }
            Class::Newline => {
                while at(i).is_some_and(|n| class(n) == Class::Newline) {
                    i += 1;
                }
                out.push(piece_id(text.get(byte(start)..byte(i)).unwrap_or_default()));
            }
            Class::Space => {
                while at(i).is_some_and(|n| class(n) == Class::Space)
                    && !at(i + 1).is_some_and(|n| class(n) == Class::Letter && at(i) == Some(' '))
                {
                    i += 1;
                }
                if i == start {
                    i += 1;
                }
                out.push(piece_id(text.get(byte(start)..byte(i)).unwrap_or_default()));
            }
            Class::Symbol => {
                while at(i).is_some_and(|n| class(n) == Class::Symbol) {
                    i += 1;
                }
                emit(
                    text.get(byte(start)..byte(i)).unwrap_or_default(),
                    SYMBOL_WIDTH,
                    out,
                );
            }
        }
    }
}

/// Token count of a text.
pub fn count(text: &str) -> usize {
    let mut v = Vec::new();
    encode(text, &mut v);
    v.len()
}

/// One chat message for the template.
#[derive(Debug, Clone, Copy)]
pub struct ChatMessage<'a> {
    /// Role.
    pub role: &'a str,
    /// Text content.
    pub content: &'a str,
}

/// The system preamble Llama 3.1/3.2's chat template inserts.
pub const SYSTEM_PREAMBLE: &str =
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";

/// Token ids of a chat rendered with Llama 3.2's template (with the generation prompt): a system
/// header with the date preamble (and the system message, if the first message is one), then each
/// message as `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
pub fn encode_chat(messages: &[ChatMessage<'_>]) -> Vec<u32> {
    let mut out = vec![BEGIN_OF_TEXT];
    let header = |role: &str, out: &mut Vec<u32>| {
        out.push(START_HEADER);
        encode(role, out);
        out.push(END_HEADER);
        encode("\n\n", out);
    };
    let (system, rest) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content), rest),
        _ => (None, messages),
    };
    header("system", &mut out);
    let mut sys = String::from(SYSTEM_PREAMBLE);
    if let Some(s) = system {
        sys.push_str(s.trim());
    }
    encode(&sys, &mut out);
    out.push(EOT);
    for m in rest {
        header(m.role, &mut out);
        encode(m.content.trim(), &mut out);
        out.push(EOT);
    }
    header("assistant", &mut out);
    out
}

/// The deterministic filler an emulated model generates: token `i` of every answer is the same.
pub fn filler_token(i: usize) -> (u32, &'static str) {
    const WORDS: [&str; 16] = [
        " The",
        " engine",
        " emulates",
        " a",
        " model",
        " and",
        " answers",
        " with",
        " filler",
        " text",
        ",",
        " token",
        " by",
        " token",
        ".",
        " Again",
    ];
    let w = WORDS.get(i % WORDS.len()).copied().unwrap_or(" the");
    (piece_id(w), w)
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
    use proptest::prelude::*;

    #[test]
    fn counts_look_like_a_bpe() {
        assert_eq!(count("Hello world"), 2);
        assert_eq!(count("Hello, world!"), 4);
        assert_eq!(count("12345"), 2);
        assert_eq!(count("antidisestablishmentarianism"), 3);
        assert_eq!(count(""), 0);
        assert!(count("日本語のテキスト") >= 4);
    }

    #[test]
    fn chat_template_overhead() {
        let ids = encode_chat(&[ChatMessage {
            role: "user",
            content: "Hi",
        }]);
        assert_eq!(ids[0], BEGIN_OF_TEXT);
        assert_eq!(ids.iter().filter(|t| **t == EOT).count(), 2);
        assert_eq!(*ids.last().unwrap(), encode_vec("\n\n")[0]);
    }

    fn encode_vec(s: &str) -> Vec<u32> {
        let mut v = Vec::new();
        encode(s, &mut v);
        v
    }

    proptest! {
        /// Deterministic, and a text's ids start with the ids of any prefix of it that ends
        /// before its last pre-token (what prefix caching needs).
        #[test]
        fn prefix_stable(a in "[a-zA-Z0-9 ,.!?\\n]{0,80}", b in "[a-zA-Z0-9 ,.!?\\n]{0,80}") {
            let whole = format!("{a}\n\n{b}");
            let ids = encode_vec(&whole);
            prop_assert_eq!(&ids, &encode_vec(&whole));
            let head = encode_vec(&format!("{a}\n\n"));
            let n = head.len().saturating_sub(1);
            prop_assert_eq!(&ids[..n.min(ids.len())], &head[..n]);
        }

        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = encode_vec(&s);
        }
    }
}
