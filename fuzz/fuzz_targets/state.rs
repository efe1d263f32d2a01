//! The published state and overlay codecs, the version and in-flight values and the decision
//! reports, as a worker or the singleton reads them from shared data and queues.
use kvroute_core::directory::PrefixIndex;
use kvroute_core::state::{
    decode_directory_version, decode_inflight, decode_overlay_seq, decode_report_message,
    decode_version, DecisionReport, PublishedOverlay, PublishedState,
};
use kvroute_core::BlockHash;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = decode_version(data);
        let _ = decode_overlay_seq(data);
        let _ = decode_directory_version(data);
        let mut counts = Vec::new();
        decode_inflight(data, 16, &mut counts);
        let _ = DecisionReport::decode_batch(data);
        if let Some((_, batch)) = decode_report_message(data) {
            let _ = DecisionReport::decode_batch(batch);
        }
        if let Ok(s) = PublishedState::decode(data.to_vec()) {
            for h in [0u64, 1, u64::MAX, 0x9e37_79b9_7f4a_7c15] {
                let _ = s.holders(BlockHash(h));
                let _ = s.session_endpoint(h);
            }
            // The same bytes as a directory value under that state's header.
            if let Ok((d, _)) = PublishedState::with_directory(s.header, data.to_vec()) {
                for h in [0u64, 1, u64::MAX, 0x9e37_79b9_7f4a_7c15] {
                    let _ = d.holders(BlockHash(h));
                    let _ = d.session_endpoint(h);
                }
            }
        }
        let _ = PublishedOverlay::decode(data.to_vec());
    });
}
