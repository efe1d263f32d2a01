//! Canonical, turn-aware prompt text and its chained block hashes.
//!
//! The canonical text of a chat is: the tools (raw JSON), then for each message a record separator,
//! its role, a unit separator, its name and tool-call id when present, its content (text parts in
//! order; other parts as their raw JSON) and its tool calls (raw JSON). The text of message `k` does
//! not depend on anything after it, so two chats that share their first `k` messages share their
//! canonical text up to the end of message `k`: the same relation their rendered prompts have in
//! the engine. The text is never built: its segments stream through a [`BlockChunker`] that cuts
//! blocks of `block_chars` Unicode scalar values and hashes each one chained to its parent.

use crate::hash::{block_hash, chain_root, prefix_key, BlockHash};
use crate::request::{Content, ParsedRequest, Part, Prompt, PromptText};

const RS: &str = "\u{1e}";
const US: &str = "\u{1f}";
const GS: &str = "\u{1d}";

/// Characters of the system prompt (or first message) that form the `prefix_key`.
pub const PREFIX_KEY_CHARS: usize = 200;

/// How prompts are cut into blocks.
///
/// The first `coarse_after` blocks are `block_chars` long; the ones after them are `coarse_factor`
/// times longer, so the blocks see a long prompt whole at a bounded count: by default 1,024 blocks
/// of 64 characters (64K characters, about 16k tokens), then up to 1,024 of 1,024 characters
/// (another 1M characters, about 256k tokens). A coarse block weighs `coarse_factor` blocks
/// wherever a count of blocks stands for tokens (the directory's capacity, matched tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    /// Unicode scalar values per block (about 4 per token: 64 is about 16 tokens).
    pub block_chars: usize,
    /// Most blocks hashed per request; text beyond is ignored for prefix matching.
    pub max_blocks: usize,
    /// Blocks of `block_chars` before the blocks grow coarser.
    pub coarse_after: usize,
    /// How many times longer a block after `coarse_after` is (1: every block alike).
    pub coarse_factor: usize,
}

impl Default for BlockSpec {
    fn default() -> Self {
        Self {
            block_chars: 64,
            max_blocks: 2048,
            coarse_after: 1024,
            coarse_factor: 16,
        }
    }
}

impl BlockSpec {
    /// Every block alike: `max_blocks` blocks of `block_chars`.
    pub fn uniform(block_chars: usize, max_blocks: usize) -> Self {
        Self {
            block_chars,
            max_blocks,
            coarse_after: max_blocks,
            coarse_factor: 1,
        }
    }

    /// Characters of block `i`.
    pub fn chars_of(&self, i: usize) -> usize {
        let base = self.block_chars.max(1);
        if i < self.coarse_after {
            base
        } else {
            base.saturating_mul(self.coarse_factor.max(1))
        }
    }

    /// The first `n` blocks in units of `block_chars`-long blocks.
    pub fn units(&self, n: u32) -> u64 {
        fine_units(n, self.coarse_after as u64, self.coarse_factor as u64)
    }

    /// Blocks that cover a prompt's head ([`crate::reference::HEAD_CHARS`] characters).
    pub fn head_blocks(&self) -> usize {
        (crate::reference::HEAD_CHARS as usize).div_ceil(self.block_chars.max(1))
    }
}

/// The key of a prompt's head: the hash of the last of its first `head_blocks` blocks (all of them
/// for a shorter prompt), so it stands for the whole head ([`BlockSpec::head_blocks`]).
pub fn head_key(blocks: &[BlockHash], head_blocks: usize) -> Option<u64> {
    blocks
        .get(head_blocks.min(blocks.len()).saturating_sub(1))
        .map(|b| b.0)
}

/// The first `n` blocks of a request in fine blocks, when the blocks after `coarse_after` stand
/// for `coarse_factor` fine ones each ([`BlockSpec`]).
pub fn fine_units(n: u32, coarse_after: u64, coarse_factor: u64) -> u64 {
    let n = u64::from(n);
    n.min(coarse_after) + n.saturating_sub(coarse_after) * coarse_factor.max(1)
}

/// Calls `f` with each segment of the canonical text of `req`, in order.
pub fn for_each_segment(req: &ParsedRequest<'_>, mut f: impl FnMut(&str)) {
    match &req.prompt {
        Prompt::Chat(messages) => {
            if let Some(tools) = req.tools {
                f(RS);
                f("tools");
                f(US);
                f(tools.get());
            }
            for m in messages {
                f(RS);
                f(&m.role);
                if let Some(name) = &m.name {
                    f(GS);
                    f(name);
                }
                if let Some(id) = &m.tool_call_id {
                    f(GS);
                    f(id);
                }
                f(US);
                match &m.content {
                    Content::None => {}
                    Content::Text(t) => f(t),
                    Content::Parts(parts) => {
                        for p in parts {
                            match p {
                                Part::Text(t) => f(t),
                                Part::Other(raw) => {
                                    f(GS);
                                    f(raw.get());
                                    f(GS);
                                }
                            }
                        }
                    }
                }
                if let Some(calls) = m.tool_calls {
                    f(GS);
                    f(calls.get());
                }
            }
        }
        Prompt::Text(PromptText::Text(t)) => f(t),
        Prompt::Text(PromptText::Tokens(raw)) => {
            f(GS);
            f(raw.get());
        }
    }
}

/// Streams text segments into chained block hashes.
///
/// Each block is hashed in one shot (`xxh3_64_with_seed`, seeded with its parent's hash), straight
/// from the segment when the block lies inside one, else from a small buffer that collects the
/// pieces of a block spanning segments. A streaming hasher per block would give the same hashes but
/// re-derives its secret from the seed for every block, which cost more than the hashing itself.
pub struct BlockChunker {
    spec: BlockSpec,
    parent: u64,
    chars_in_block: usize,
    /// Bytes of the current block when it spans segments (empty otherwise).
    pending: Vec<u8>,
    blocks: Vec<BlockHash>,
    total_chars: usize,
}

impl std::fmt::Debug for BlockChunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockChunker")
            .field("spec", &self.spec)
            .field("parent", &self.parent)
            .field("chars_in_block", &self.chars_in_block)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl BlockChunker {
    /// A chunker for a prompt of `model`.
    pub fn new(spec: BlockSpec, model: &str) -> Self {
        let block_chars = spec.block_chars.max(1);
        Self {
            spec: BlockSpec {
                block_chars,
                coarse_factor: spec.coarse_factor.max(1),
                ..spec
            },
            parent: chain_root(model),
            chars_in_block: 0,
            pending: Vec::new(),
            blocks: Vec::with_capacity(spec.max_blocks.min(256)),
            total_chars: 0,
        }
    }

    /// True once `max_blocks` blocks are complete: further input is ignored.
    pub fn is_full(&self) -> bool {
        self.blocks.len() >= self.spec.max_blocks
    }

    fn push_block(&mut self, bytes: &[u8]) {
        let h = block_hash(self.parent, bytes);
        self.blocks.push(h);
        self.parent = h.0;
        self.chars_in_block = 0;
    }

    /// Feeds one segment of canonical text.
    pub fn feed(&mut self, mut s: &str) {
        while !s.is_empty() && !self.is_full() {
            let size = self.spec.chars_of(self.blocks.len());
            let need = size - self.chars_in_block;
            let (take, chars) = split_chars(s, need);
            let (head, tail) = s.split_at(take);
            self.total_chars += chars;
            s = tail;
            if self.chars_in_block == 0 && chars == need {
                // The whole block lies in this segment: hash it where it is.
                self.push_block(head.as_bytes());
                continue;
            }
            self.pending.extend_from_slice(head.as_bytes());
            self.chars_in_block += chars;
            if self.chars_in_block == size {
                let bytes = std::mem::take(&mut self.pending);
                self.push_block(&bytes);
                self.pending = bytes;
                self.pending.clear();
            }
        }
    }

    /// The hashes of the complete blocks (a trailing partial block is not cached by an engine
    /// either, so it never counts).
    pub fn finish(self) -> Vec<BlockHash> {
        self.blocks
    }
}

/// Byte length and char count of the longest prefix of `s` with at most `max_chars` chars.
fn split_chars(s: &str, max_chars: usize) -> (usize, usize) {
    let bytes = s.as_bytes();
    let ascii_len = max_chars.min(bytes.len());
    if bytes.get(..ascii_len).is_some_and(<[u8]>::is_ascii) {
        return (ascii_len, ascii_len);
    }
    match s.char_indices().nth(max_chars) {
        Some((idx, _)) => (idx, max_chars),
        None => (s.len(), s.chars().count()),
    }
}

/// Block hashes of a request's canonical prompt.
pub fn request_blocks(req: &ParsedRequest<'_>, spec: BlockSpec) -> Vec<BlockHash> {
    let mut c = BlockChunker::new(spec, &req.model);
    for_each_segment(req, |s| c.feed(s));
    c.finish()
}

/// Block hashes of a text, computed in one piece (reference for tests and tools).
pub fn text_blocks(text: &str, model: &str, spec: BlockSpec) -> Vec<BlockHash> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut parent = chain_root(model);
    let mut start = 0usize;
    while out.len() < spec.max_blocks {
        let end_char = start + spec.chars_of(out.len());
        if end_char > chars.len() {
            break;
        }
        let from = chars.get(start).map_or(text.len(), |c| c.0);
        let to = chars.get(end_char).map_or(text.len(), |c| c.0);
        let h = block_hash(parent, text.as_bytes().get(from..to).unwrap_or_default());
        out.push(h);
        parent = h.0;
        start = end_char;
    }
    out
}

/// The text behind the `prefix_key` policy's key: the first [`PREFIX_KEY_CHARS`] characters of the
/// system (or developer) prompt, else of the first message, else of the completion prompt.
pub fn prefix_key_text(req: &ParsedRequest<'_>) -> String {
    let mut out = String::new();
    let mut left = PREFIX_KEY_CHARS;
    let mut push = |t: &str| {
        if left == 0 {
            return;
        }
        let (bytes, chars) = split_chars(t, left);
        out.push_str(t.get(..bytes).unwrap_or_default());
        left -= chars;
    };
    match &req.prompt {
        Prompt::Chat(messages) => {
            let chosen = messages
                .iter()
                .find(|m| m.role == "system" || m.role == "developer")
                .or_else(|| messages.first());
            if let Some(m) = chosen {
                m.content.for_each_text(&mut push);
            }
        }
        Prompt::Text(PromptText::Text(t)) => push(t),
        Prompt::Text(PromptText::Tokens(raw)) => push(raw.get()),
    }
    out
}

/// The `prefix_key` of a request (None when its key text is empty).
pub fn request_prefix_key(req: &ParsedRequest<'_>) -> Option<u64> {
    let text = prefix_key_text(req);
    (!text.is_empty()).then(|| prefix_key(&text))
}

/// The canonical text as one string (for tests, tools and debugging; the router never builds it).
pub fn canonical_text(req: &ParsedRequest<'_>) -> String {
    let mut s = String::new();
    for_each_segment(req, |seg| s.push_str(seg));
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
    use crate::request::{parse_request, ApiKind};
    use proptest::prelude::*;

    fn chat_body(messages: &[(&str, &str)]) -> String {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        serde_json::json!({"model": "m", "messages": msgs}).to_string()
    }

    #[test]
    fn streaming_equals_one_piece() {
        let spec = BlockSpec::uniform(7, 100);
        let body = chat_body(&[
            ("system", "héllo wörld, ünïcode ✓ text"),
            ("user", "and more ascii text here"),
        ]);
        let req = parse_request(ApiKind::Chat, body.as_bytes()).unwrap();
        let text = canonical_text(&req);
        assert_eq!(request_blocks(&req, spec), text_blocks(&text, "m", spec));
        assert_eq!(request_blocks(&req, spec).len(), text.chars().count() / 7);
    }

    #[test]
    fn cap_on_blocks() {
        let spec = BlockSpec::uniform(4, 3);
        let body = chat_body(&[("user", &"x".repeat(1000))]);
        let req = parse_request(ApiKind::Chat, body.as_bytes()).unwrap();
        assert_eq!(request_blocks(&req, spec).len(), 3);
    }

    #[test]
    fn blocks_grow_coarser_past_coarse_after() {
        let spec = BlockSpec {
            block_chars: 4,
            max_blocks: 6,
            coarse_after: 3,
            coarse_factor: 10,
        };
        assert_eq!(
            (0..6).map(|i| spec.chars_of(i)).collect::<Vec<_>>(),
            vec![4, 4, 4, 40, 40, 40]
        );
        assert_eq!((spec.units(2), spec.units(3), spec.units(5)), (2, 3, 23));
        // 12 + 40 + 40 characters: three fine blocks and two coarse ones (the rest is partial).
        let text = "y".repeat(12 + 80 + 39);
        let blocks = text_blocks(&text, "m", spec);
        assert_eq!(blocks.len(), 5);
        // The fine blocks are those of a uniform spec: the coarse ones only extend the chain.
        assert_eq!(
            blocks[..3],
            text_blocks(&text, "m", BlockSpec::uniform(4, 3))[..]
        );
        // The default sees about 1.1M characters of a prompt.
        let d = BlockSpec::default();
        assert_eq!(d.units(2048) * 64, 64 * 1024 + 1024 * 1024);
    }

    #[test]
    fn model_separates_chains() {
        let a = text_blocks(&"a".repeat(64), "m1", BlockSpec::default());
        let b = text_blocks(&"a".repeat(64), "m2", BlockSpec::default());
        assert_ne!(a, b);
    }

    #[test]
    fn prefix_key_uses_system_prompt_first_200_chars() {
        let long = "s".repeat(300);
        let a = chat_body(&[("user", "q1"), ("system", &long)]);
        let b = chat_body(&[
            (
                "system",
                &format!("{}{}", "s".repeat(200), "different tail"),
            ),
            ("user", "q2"),
        ]);
        let ra = parse_request(ApiKind::Chat, a.as_bytes()).unwrap();
        let rb = parse_request(ApiKind::Chat, b.as_bytes()).unwrap();
        assert_eq!(prefix_key_text(&ra).chars().count(), 200);
        assert_eq!(request_prefix_key(&ra), request_prefix_key(&rb));
        let c = chat_body(&[("user", "first message only")]);
        let rc = parse_request(ApiKind::Chat, c.as_bytes()).unwrap();
        assert_eq!(prefix_key_text(&rc), "first message only");
    }

    fn message() -> impl Strategy<Value = (String, String)> {
        (prop_oneof!["system", "user", "assistant"], "[a-zé✓ ]{0,90}")
            .prop_map(|(r, c)| (r.to_string(), c))
    }

    proptest! {
        /// Streaming the segments (blocks hashed in place or gathered across segments) gives the
        /// same hashes as cutting the whole canonical text in one piece, for any block size.
        #[test]
        fn streaming_equals_one_piece_for_any_chat(
            messages in prop::collection::vec(message(), 1..8),
            block_chars in 1usize..100,
            max_blocks in 1usize..50,
            coarse_after in 0usize..50,
            coarse_factor in 1usize..5,
        ) {
            let spec = BlockSpec { block_chars, max_blocks, coarse_after, coarse_factor };
            let pm: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            let body = chat_body(&pm);
            let req = parse_request(ApiKind::Chat, body.as_bytes()).unwrap();
            prop_assert_eq!(request_blocks(&req, spec), text_blocks(&canonical_text(&req), "m", spec));
        }

        /// Two chats that share their first k messages share every block that lies inside the
        /// canonical text of those k messages, and no block past the point where their texts differ.
        #[test]
        fn shared_messages_share_exactly_their_blocks(
            common in prop::collection::vec(message(), 1..6),
            tail_a in prop::collection::vec(message(), 1..4),
            tail_b in prop::collection::vec(message(), 1..4),
            block_chars in 1usize..40,
        ) {
            let spec = BlockSpec::uniform(block_chars, 10_000);
            let mut a: Vec<(String, String)> = common.clone();
            a.extend(tail_a.clone());
            let mut b: Vec<(String, String)> = common.clone();
            let mut tb = tail_b.clone();
            // Make the first differing message differ in its role or first character.
            if tb[0].0 == tail_a[0].0 {
                tb[0].1 = format!("B{}", tb[0].1);
                a[common.len()].1 = format!("A{}", a[common.len()].1);
            }
            b.extend(tb);
            let pa: Vec<(&str, &str)> = a.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            let pb: Vec<(&str, &str)> = b.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            let ba = chat_body(&pa);
            let bb = chat_body(&pb);
            let ra = parse_request(ApiKind::Chat, ba.as_bytes()).unwrap();
            let rb = parse_request(ApiKind::Chat, bb.as_bytes()).unwrap();
            let ha = request_blocks(&ra, spec);
            let hb = request_blocks(&rb, spec);
            let pc: Vec<(&str, &str)> = common.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            let bc = chat_body(&pc);
            let rc = parse_request(ApiKind::Chat, bc.as_bytes()).unwrap();
            let common_chars = canonical_text(&rc).chars().count();
            let (ta, tb) = (canonical_text(&ra), canonical_text(&rb));
            let lcp = ta.chars().zip(tb.chars()).take_while(|(x, y)| x == y).count();
            prop_assert!(lcp >= common_chars);
            let shared = ha.iter().zip(&hb).take_while(|(x, y)| x == y).count();
            // Every block inside the common messages is shared...
            prop_assert!(shared >= common_chars / block_chars);
            // ...and exactly the blocks inside the common text, none after.
            prop_assert_eq!(shared, (lcp / block_chars).min(ha.len()).min(hb.len()));
        }
    }
}
