//! One engine's `/metrics` page, read into the numbers the router needs.
//!
//! Names of vLLM V1 (and their V0 spellings, so older engines work too). Samples of one family are
//! summed over label sets (a data-parallel vLLM reports one per engine index), except KV usage,
//! which is averaged.

use kvroute_core::rates::RateCounters;
use prom_text_format_parser::Scrape;
/// Which series of a histogram [`Page::hist`] reads (`Sum`, `Count`).
pub use prom_text_format_parser::ValueType;

/// What one scrape says.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineSample {
    /// `vllm:num_requests_waiting`
    pub waiting: f64,
    /// `vllm:num_requests_running`
    pub running: f64,
    /// `vllm:kv_cache_usage_perc` (V0: `vllm:gpu_cache_usage_perc`)
    pub kv_usage: f64,
    /// `vllm:prefix_cache_hits_total` (V0: `vllm:gpu_prefix_cache_hits_total`)
    pub hits: Option<f64>,
    /// `vllm:prefix_cache_queries_total` (V0: `vllm:gpu_prefix_cache_queries_total`)
    pub queries: Option<f64>,
    /// `vllm:prompt_tokens_total`
    pub prompt_tokens: Option<f64>,
    /// `vllm:generation_tokens_total`
    pub generation_tokens: Option<f64>,
    /// `vllm:cache_config_info{num_gpu_blocks, block_size}`: KV capacity in tokens.
    pub capacity_tokens: Option<u64>,
    /// The cumulative sums the engine's rates are measured from ([`kvroute_core::rates`]), when
    /// the page has all of `vllm:request_prefill_kv_computed_tokens`,
    /// `vllm:request_prefill_time_seconds` and `vllm:request_time_per_output_token_seconds`.
    pub rates: Option<RateCounters>,
}

/// Why a page could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScrapeError {
    /// Not the Prometheus text format.
    #[error("not a Prometheus text page: {0}")]
    Format(String),
    /// A metric every vLLM exports is missing.
    #[error("no {0} on the page: not a vLLM engine?")]
    Missing(&'static str),
}

fn value(v: &prom_text_format_parser::Value) -> Option<f64> {
    v.value.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// A parsed Prometheus text page, read by family name: what [`parse_vllm`] reads, and what the
/// study reads its counters with.
pub struct Page {
    scrape: Scrape,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("families", &self.scrape.metrics.len())
            .finish()
    }
}

impl Page {
    /// Parses a page in the Prometheus text format.
    pub fn parse(text: &str) -> Result<Self, ScrapeError> {
        Scrape::parse(text)
            .map(|scrape| Self { scrape })
            .map_err(|e| ScrapeError::Format(format!("{e:?}")))
    }

    fn metric(&self, names: &[&str]) -> Option<&prom_text_format_parser::Metric> {
        self.scrape
            .metrics
            .iter()
            .find(|m| names.contains(&m.name.as_str()))
    }

    fn values(&self, names: &[&str], kind: ValueType) -> Vec<f64> {
        self.metric(names).map_or_else(Vec::new, |m| {
            m.samples
                .iter()
                .filter(|s| s.value.value_type == kind)
                .filter_map(|s| value(&s.value))
                .collect()
        })
    }

    /// The first of `names` the page has: its samples summed over label sets, and how many there
    /// were (None: no sample).
    pub fn family(&self, names: &[&str]) -> Option<(f64, usize)> {
        let v = self.values(names, ValueType::Sample);
        (!v.is_empty()).then(|| (v.iter().sum(), v.len()))
    }

    /// The first of `names` the page has, summed over label sets.
    pub fn sum(&self, names: &[&str]) -> Option<f64> {
        self.family(names).map(|(s, _)| s)
    }

    /// A histogram's `_sum` (`kind` = Sum) or `_count` (Count), summed over label sets.
    pub fn hist(&self, name: &str, kind: ValueType) -> Option<f64> {
        let v = self.values(&[name], kind);
        (!v.is_empty()).then(|| v.iter().sum())
    }

    /// A histogram's buckets, summed over label sets: (upper bound, cumulative count) by bound.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = Vec::new();
        merge_buckets(&mut out, self.bucket_samples(name));
        out
    }

    /// A histogram's bucket samples, one (upper bound, cumulative count) per label set and bound.
    fn bucket_samples<'a>(&'a self, name: &str) -> impl Iterator<Item = (f64, f64)> + 'a {
        let samples = self.metric(&[name]).map_or(&[][..], |m| &m.samples[..]);
        samples
            .iter()
            .filter(|s| s.value.value_type == ValueType::Sample)
            .filter_map(|s| {
                let le = s
                    .labels
                    .iter()
                    .find(|l| l.key == "le")
                    .and_then(|l| l.value.parse::<f64>().ok())?;
                Some((le, s.value.value.parse::<f64>().ok()?))
            })
    }
}

/// Adds histogram buckets (upper bound, cumulative count) into `into`, summing counts of the same
/// bound, and keeps it in bound order: one page's label sets, or several engines' pages.
pub fn merge_buckets(into: &mut Vec<(f64, f64)>, buckets: impl IntoIterator<Item = (f64, f64)>) {
    for (le, v) in buckets {
        match into.iter_mut().find(|(l, _)| *l == le) {
            Some(b) => b.1 += v,
            None => into.push((le, v)),
        }
    }
    into.sort_by(|a, b| a.0.total_cmp(&b.0));
}

/// Reads a vLLM `/metrics` page.
pub fn parse_vllm(text: &str) -> Result<EngineSample, ScrapeError> {
    let page = Page::parse(text)?;
    let scrape = &page.scrape;
    let rates = (|| {
        Some(RateCounters {
            prefill_tokens: page.hist("vllm:request_prefill_kv_computed_tokens", ValueType::Sum)?,
            prefill_seconds: page.hist("vllm:request_prefill_time_seconds", ValueType::Sum)?,
            prefill_requests: page.hist("vllm:request_prefill_time_seconds", ValueType::Count)?,
            tpot_seconds: page
                .hist("vllm:request_time_per_output_token_seconds", ValueType::Sum)?,
            tpot_requests: page.hist(
                "vllm:request_time_per_output_token_seconds",
                ValueType::Count,
            )?,
        })
    })();
    let waiting = page
        .sum(&["vllm:num_requests_waiting"])
        .ok_or(ScrapeError::Missing("vllm:num_requests_waiting"))?;
    let running = page
        .sum(&["vllm:num_requests_running"])
        .ok_or(ScrapeError::Missing("vllm:num_requests_running"))?;
    let kv_usage = page
        .family(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"])
        .map(|(s, n)| s / n as f64)
        .ok_or(ScrapeError::Missing("vllm:kv_cache_usage_perc"))?;
    let capacity_tokens = scrape
        .metrics
        .iter()
        .find(|m| m.name == "vllm:cache_config_info")
        .and_then(|m| {
            m.samples
                .iter()
                .filter_map(|s| {
                    let get = |k: &str| {
                        s.labels
                            .iter()
                            .find(|l| l.key == k)
                            .and_then(|l| l.value.parse::<u64>().ok())
                    };
                    // A page's labels are outside input: a product or sum past u64 is refused,
                    // not wrapped (the fuzzer found it).
                    get("num_gpu_blocks")?.checked_mul(get("block_size")?)
                })
                .try_fold(0u64, u64::checked_add)
                .filter(|t| *t > 0)
        });
    Ok(EngineSample {
        waiting,
        running,
        kv_usage,
        hits: page.sum(&[
            "vllm:prefix_cache_hits_total",
            "vllm:gpu_prefix_cache_hits_total",
        ]),
        queries: page.sum(&[
            "vllm:prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_queries_total",
        ]),
        prompt_tokens: page.sum(&["vllm:prompt_tokens_total"]),
        generation_tokens: page.sum(&["vllm:generation_tokens_total"]),
        capacity_tokens,
        rates,
    })
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

    /// The sample page produced from vLLM's own metric definitions (a copy of
    /// shared/reference/vllm_metrics_sample.prom).
    #[test]
    fn reads_the_reference_vllm_page() {
        let page = include_str!("../tests/fixtures/vllm_metrics_sample.prom");
        let s = parse_vllm(page).unwrap();
        assert_eq!((s.waiting, s.running, s.kv_usage), (1.0, 3.0, 0.42));
        assert_eq!((s.hits, s.queries), (Some(640.0), Some(1000.0)));
        assert_eq!(s.prompt_tokens, Some(1000.0));
        assert_eq!(s.generation_tokens, Some(200.0));
        // The reference page has no cache_config_info.
        assert_eq!(s.capacity_tokens, None);
    }

    #[test]
    fn data_parallel_pages_sum_and_capacity_multiplies() {
        let page = "# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\"} 2
vllm:num_requests_waiting{engine=\"1\"} 3
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\"} 1
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine=\"0\"} 0.2
vllm:gpu_cache_usage_perc{engine=\"1\"} 0.4
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"711\"} 1
";
        let s = parse_vllm(page).unwrap();
        assert_eq!((s.waiting, s.running), (5.0, 1.0));
        assert!((s.kv_usage - 0.3).abs() < 1e-12);
        assert_eq!(s.capacity_tokens, Some(11_376));
        assert_eq!(s.hits, None);
    }

    #[test]
    fn rejects_non_vllm_pages() {
        assert!(matches!(
            parse_vllm("# TYPE up gauge\nup 1\n"),
            Err(ScrapeError::Missing(_))
        ));
        assert!(parse_vllm("<html>nope</html>").is_err());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod fuzz_regressions {
    use super::parse_vllm;

    /// Pages the fuzzer found that once panicked (`tests/fixtures/fuzz-*`): each is read or
    /// refused, never a panic.
    #[test]
    fn fuzz_found_pages_never_panic() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("fuzz-"))
            {
                continue;
            }
            seen += 1;
            let bytes = std::fs::read(&path).unwrap();
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = parse_vllm(text);
            }
        }
        assert!(seen >= 1);
    }
}
