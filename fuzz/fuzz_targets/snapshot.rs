//! The sidecar's snapshot JSON, as the singleton pulls it.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = kvroute_core::snapshot::Snapshot::from_json(data);
    });
}
