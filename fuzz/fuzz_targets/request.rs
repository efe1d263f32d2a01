//! The OpenAI body parser, the canonical text and the block hashes (fine and coarse), as the
//! filter runs them on a request body: any bytes, never a panic.
use kvroute_core::prefix::BlockSpec;
use kvroute_core::request::ApiKind;
use kvroute_core::router::body_features;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        // The first byte picks the endpoint and a small block spec, so coarse blocks are reached.
        let Some((&first, body)) = data.split_first() else {
            return;
        };
        let kind = if first & 1 == 0 {
            ApiKind::Chat
        } else {
            ApiKind::Completions
        };
        let spec = BlockSpec {
            block_chars: 1 + usize::from(first >> 4),
            max_blocks: 64,
            coarse_after: usize::from((first >> 1) & 7),
            coarse_factor: 1 + usize::from(first >> 6),
        };
        if let Ok(f) = body_features(kind, body, Some("session"), spec) {
            assert!(f.blocks.len() <= spec.max_blocks);
        }
        let _ = body_features(kind, body, None, BlockSpec::default());
    });
}
