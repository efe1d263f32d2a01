//! The one hashing module: block hashes, session keys and prefix keys.
//!
//! All hashes are xxh3-64 with fixed seeds over explicit bytes, so they are identical on every
//! platform (host and wasm32) and pinned by golden vectors in the tests. A block's hash is seeded
//! with its parent's hash, so block `i`'s hash covers blocks `0..=i`: two prompts share block `i`'s
//! hash exactly when they share the whole prefix up to the end of block `i`.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of the chain's root before the model name is mixed in ("kvroute" in ASCII).
pub const ROOT_SEED: u64 = 0x006b_7672_6f75_7465;
/// Seed for session keys.
pub const SESSION_SEED: u64 = 0x5345_5353_494f_4e31;
/// Seed for prefix keys (`prefix_key` policy).
pub const PREFIX_KEY_SEED: u64 = 0x5052_4546_4958_4b31;
/// Seed for endpoint identities in rendezvous hashing.
pub const ENDPOINT_SEED: u64 = 0x454e_4450_4f49_4e54;

/// Hash of one prefix block, chained over all blocks before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// Hash of a session identity (header value or OpenAI `user`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey(pub u64);

/// Root of a request's block chain: the model name mixed into [`ROOT_SEED`], so prompts of two models
/// never share blocks (vLLM caches per model).
pub fn chain_root(model: &str) -> u64 {
    xxh3_64_with_seed(model.as_bytes(), ROOT_SEED)
}

/// Hash of one block given its parent's hash (the chain root for block 0).
pub fn block_hash(parent: u64, block: &[u8]) -> BlockHash {
    BlockHash(xxh3_64_with_seed(block, parent))
}

/// Session key of a session identity string.
pub fn session_key(id: &str) -> SessionKey {
    SessionKey(xxh3_64_with_seed(id.as_bytes(), SESSION_SEED))
}

/// Prefix key of the text that identifies a prompt family (`prefix_key` policy).
pub fn prefix_key(text: &str) -> u64 {
    xxh3_64_with_seed(text.as_bytes(), PREFIX_KEY_SEED)
}

/// Rendezvous weight of `key` on an endpoint named `endpoint`.
pub fn rendezvous_weight(key: u64, endpoint: &str) -> u64 {
    let id = xxh3_64_with_seed(endpoint.as_bytes(), ENDPOINT_SEED);
    xxh3_64_with_seed(&key.to_le_bytes(), id)
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

    /// Golden vectors, computed with an independent xxh3 implementation (Python `xxhash` 3.x:
    /// `xxh3_64_intdigest(data, seed=...)`). They must never change: every deployed directory and
    /// every recorded experiment depends on them.
    #[test]
    fn golden_vectors() {
        assert_eq!(chain_root(""), 0xaae1_c7e9_d946_8162);
        assert_eq!(chain_root("m"), 0x81aa_0742_aee3_78bc);
        assert_eq!(
            block_hash(chain_root("m"), b"hello world").0,
            0xeeec_2f9c_da59_048b
        );
        assert_eq!(session_key("user-1").0, 0xf55e_82c3_fdab_0b0c);
        assert_eq!(
            prefix_key("You are a helpful assistant."),
            0x3e01_494f_0a5e_c511
        );
    }

    /// A whole request through parsing, canonical text and 16-char blocks.
    #[test]
    fn golden_chat_chain() {
        use crate::prefix::{request_blocks, BlockSpec};
        use crate::request::{parse_request, ApiKind};
        let body = br#"{"model":"llama","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Hello there, how are you today?"}]}"#;
        let req = parse_request(ApiKind::Chat, body).unwrap_or_else(|e| unreachable!("{e}"));
        let blocks = request_blocks(&req, BlockSpec::uniform(16, 100));
        let got: Vec<u64> = blocks.iter().map(|b| b.0).collect();
        assert_eq!(
            got,
            [
                0x4da0_7d29_87a7_029c,
                0xa136_4ab9_cab0_3fc1,
                0x94f4_9631_5c02_b29e,
                0xa9e0_e582_5b43_b905
            ]
        );
    }
}
