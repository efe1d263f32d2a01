//! The sidecar's reading of an engine's `/metrics` page (the Prometheus text format).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = kvroute_sidecar::scrape::parse_vllm(text);
        }
    });
}
