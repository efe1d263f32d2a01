//! The plugin configuration JSON (Envoy hands it to `on_configure`).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(c) = kvroute_core::FilterConfig::from_json(data) {
            let _ = c.block_spec();
            for i in 0..c.endpoints.len() {
                let _ = c.capacity_of(i);
            }
        }
    });
}
