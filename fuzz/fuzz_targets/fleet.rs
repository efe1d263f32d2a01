//! The fleet exchange: a request as the sidecar reads it from a replica, a response as the state
//! service reads it from the sidecar, and the report batches inside.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = kvroute_core::fleet::FleetRequest::decode(data);
        if let Ok(r) = kvroute_core::fleet::FleetResponse::decode(data) {
            for e in &r.entries {
                let _ = kvroute_core::state::DecisionReport::decode_batch(&e.batch);
            }
        }
    });
}
