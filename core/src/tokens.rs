//! Characters of prompt text per engine token, measured.
//!
//! The directory turns an engine's KV capacity (tokens) into its own blocks (characters) at this
//! ratio, so the directory forgets about what the engine forgets. The configured
//! `chars_per_token` (4.0) is a guess; the engines' tokenizers and the traffic decide the real
//! ratio (with Llama 3's tokenizer: 4.45 on ShareGPT, 6.18 on the Mooncake trace's prompts). A
//! directory sized at too low a ratio forgets prefixes the engines still hold. The gateway
//! measures it from the responses that report `usage.prompt_tokens`: the prompt's canonical text
//! bytes against the tokens the engine counted (its chat template included, which the KV cache
//! holds too).

/// Running totals over recent responses; see the module's documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CharsPerToken {
    bytes: f64,
    tokens: f64,
}

impl CharsPerToken {
    /// Tokens measured before the ratio replaces the configured one.
    pub const MIN_TOKENS: f64 = 20_000.0;
    /// Past this many tokens the totals halve, so the ratio follows the recent traffic.
    pub const WINDOW_TOKENS: f64 = 4_000_000.0;
    /// The ratio stays within this range whatever the input.
    pub const RANGE: (f64, f64) = (1.0, 16.0);
    /// A measured ratio that differs from the one in use by less than this share is not applied
    /// (each change resizes the directory).
    pub const MIN_CHANGE: f64 = 0.05;

    /// One response: `bytes` of prompt text the engine counted as `tokens`.
    pub fn add(&mut self, bytes: u64, tokens: u64) {
        if tokens == 0 || bytes == 0 {
            return;
        }
        self.bytes += bytes as f64;
        self.tokens += tokens as f64;
        if self.tokens > Self::WINDOW_TOKENS {
            self.bytes /= 2.0;
            self.tokens /= 2.0;
        }
    }

    /// The measured ratio, once enough is measured.
    pub fn ratio(&self) -> Option<f64> {
        (self.tokens >= Self::MIN_TOKENS)
            .then(|| (self.bytes / self.tokens).clamp(Self::RANGE.0, Self::RANGE.1))
    }

    /// The ratio to use instead of `current`, if the measurement moved far enough from it.
    pub fn update(&self, current: f64) -> Option<f64> {
        self.ratio()
            .filter(|r| (r - current).abs() > Self::MIN_CHANGE * current.max(f64::MIN_POSITIVE))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_waits_for_enough_tokens_then_follows_them() {
        let mut c = CharsPerToken::default();
        c.add(60_000, 10_000);
        assert_eq!(c.ratio(), None);
        c.add(60_000, 10_000);
        assert!((c.ratio().unwrap() - 6.0).abs() < 1e-9);
        assert_eq!(c.update(4.0), Some(6.0));
        assert_eq!(c.update(5.9), None, "within 5%");
        c.add(0, 10);
        c.add(10, 0);
        assert!(
            (c.ratio().unwrap() - 6.0).abs() < 1e-9,
            "empty samples change nothing"
        );
    }

    #[test]
    fn old_traffic_fades_and_the_ratio_stays_in_range() {
        let mut c = CharsPerToken::default();
        for _ in 0..100 {
            c.add(6_000_000, 1_000_000);
        }
        for _ in 0..100 {
            c.add(4_000_000, 1_000_000);
        }
        assert!((c.ratio().unwrap() - 4.0).abs() < 0.01, "{:?}", c.ratio());
        let mut wild = CharsPerToken::default();
        wild.add(u64::MAX, 30_000);
        assert_eq!(wild.ratio(), Some(CharsPerToken::RANGE.1));
    }
}
