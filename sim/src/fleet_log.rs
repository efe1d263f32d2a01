//! The fleet's log in memory, with the sidecar's semantics (its Redis stream and in-flight hash):
//! what several simulated gateway replicas exchange with. The answer is built by the same
//! [`fleet::answer`] as the sidecar's; the log keeps about the `keep` newest entries a replica asks
//! for, as `XADD MAXLEN ~` does.

use std::collections::{BTreeMap, HashMap, VecDeque};

use kvroute_core::fleet::{self, FleetRequest, StoredEntry};
use kvroute_core::state::FLEET_INFLIGHT_TTL_MS;

/// One log (of one endpoint list and directory epoch).
#[derive(Debug, Default)]
struct Log {
    /// (id, entry), ids increasing.
    entries: VecDeque<(u64, StoredEntry)>,
    next_id: u64,
}

/// Every log and every replica's in-flight counts.
#[derive(Debug, Default)]
pub(crate) struct FleetLog {
    logs: HashMap<(u64, u64), Log>,
    inflight: HashMap<u64, BTreeMap<String, Vec<u8>>>,
}

impl FleetLog {
    /// One exchange at `now_ms`: `body` is a [`FleetRequest`]; the answer a
    /// [`fleet::FleetResponse`], or None for a request the sidecar would refuse (400).
    pub(crate) fn exchange(&mut self, body: &[u8], now_ms: u64) -> Option<Vec<u8>> {
        let req = FleetRequest::decode(body).ok()?;
        let log = self.logs.entry((req.endpoints, req.epoch)).or_default();
        if !req.batch.is_empty() && req.batch.len() <= fleet::MAX_ENTRY_BYTES {
            log.next_id += 1;
            log.entries.push_back((
                log.next_id,
                StoredEntry {
                    id: log.next_id.to_string(),
                    replica: req.replica.to_string(),
                    from_ms: req.batch_from_ms,
                    batch: req.batch.clone(),
                },
            ));
            let keep = (req.keep.max(1)) as usize;
            while log.entries.len() > keep {
                log.entries.pop_front();
            }
        }
        let inflight = self.inflight.entry(req.endpoints).or_default();
        inflight.insert(
            req.replica.to_string(),
            fleet::stored_inflight(now_ms, &req.inflight),
        );
        let after = match req.cursor.as_str() {
            fleet::START => 0,
            c => c.parse::<u64>().unwrap_or(0),
        };
        let from = log.entries.partition_point(|(id, _)| *id <= after);
        let range = log
            .entries
            .iter()
            .skip(from)
            .take(fleet::READ_COUNT)
            .map(|(_, e)| e.clone());
        let (resp, stale) = fleet::answer(
            &req,
            now_ms,
            FLEET_INFLIGHT_TTL_MS,
            fleet::MAX_RESPONSE_BYTES,
            inflight.iter().map(|(r, v)| (r.as_str(), v.as_slice())),
            range,
        );
        for r in stale {
            inflight.remove(&r);
        }
        Some(resp.encode())
    }
}
