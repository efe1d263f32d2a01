//! The fleet exchange: how several Envoy replicas share one decision log.
//!
//! Each replica's state service sends the sidecar, every `fleet.sync_ms`, one [`FleetRequest`]: the
//! decision reports it applied since the last exchange (the same batch encoding as the workers'
//! reports, [`crate::state::DecisionReport`]), its cursor in the fleet's log, and its own gateway
//! in-flight counts. The sidecar appends the batch to a Redis stream, stores the counts, and answers
//! with a [`FleetResponse`]: the other replicas' batches after the cursor, in the stream's order,
//! the new cursor, and the sum of the other replicas' in-flight counts. Every replica applies the
//! whole fleet's log to its own directory, so all converge on the same directory and sessions.
//!
//! Binary, little-endian, every length checked on decode. The stream is named by a fingerprint of
//! the endpoint list (reports carry endpoint indexes, so replicas configured with other endpoints
//! never mix) and the directory epoch (bumping it starts a new, empty log).

use crate::config::EndpointConfig;

/// First bytes of a request and of a response.
pub const MAGIC: &[u8; 4] = b"KVF1";
/// Longest cursor (a Redis stream id is at most 41 characters).
pub const MAX_CURSOR: usize = 64;
/// The cursor of a replica that has read nothing yet: the log from its start.
pub const START: &str = "0";
/// The log's default bounds, as the sidecar keeps it: the largest batch accepted from a replica,
/// most entries and most bytes of entries returned by one exchange (at least one entry).
pub const MAX_ENTRY_BYTES: usize = 1 << 20;
pub const READ_COUNT: usize = 512;
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// In-flight sections per endpoint sent in an exchange: requests, blocks, prompt tokens to prefill.
pub const INFLIGHT_SECTIONS: usize = 3;

/// A replica's half of one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRequest {
    /// This replica's id (its state service's lease id).
    pub replica: u64,
    /// [`fingerprint`] of the endpoint list.
    pub endpoints: u64,
    /// The directory epoch.
    pub epoch: u64,
    /// The last log entry this replica has read ([`START`]: none).
    pub cursor: String,
    /// Log entries worth keeping: older ones describe blocks the engines have evicted.
    pub keep: u32,
    /// When the oldest report of `batch` was applied here, ms since the epoch (0: empty batch).
    pub batch_from_ms: u64,
    /// This replica's gateway in-flight counts, [`INFLIGHT_SECTIONS`] sections of one value per
    /// endpoint.
    pub inflight: Vec<i64>,
    /// Decision reports back to back.
    pub batch: Vec<u8>,
}

/// One entry of the fleet's log as a response carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEntry {
    /// When its oldest report was applied on the replica that wrote it, ms since the epoch.
    pub from_ms: u64,
    /// Decision reports back to back.
    pub batch: Vec<u8>,
}

/// The sidecar's half of one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetResponse {
    /// The last log entry read (the cursor for the next exchange).
    pub cursor: String,
    /// The other live replicas' in-flight counts, summed, in the request's layout (empty: none).
    pub inflight: Vec<i64>,
    /// Other replicas' entries after the request's cursor, in the log's order.
    pub entries: Vec<FleetEntry>,
}

/// Why an exchange message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("bad magic")]
    Magic,
    #[error("truncated")]
    Truncated,
    #[error("cursor too long or not text")]
    Cursor,
    #[error("too many in-flight values")]
    Inflight,
}

/// An order-sensitive fingerprint of the endpoint names (xxh3).
pub fn fingerprint(endpoints: &[EndpointConfig]) -> u64 {
    let mut h = 0x6b76_726f_7574_6531u64;
    for e in endpoints {
        h = crate::hash::block_hash(h, e.name.as_bytes()).0;
    }
    h
}

/// One entry of the fleet's log as its store returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The entry's id in the log (the next exchange's cursor once read).
    pub id: String,
    /// The replica that appended it ([`FleetRequest::replica`], in decimal).
    pub replica: String,
    /// [`FleetRequest::batch_from_ms`] of the exchange that appended it.
    pub from_ms: u64,
    /// Its decision reports.
    pub batch: Vec<u8>,
}

/// The value a replica's in-flight counts are stored as: when (ms since the epoch), then the
/// counts, all little-endian.
pub fn stored_inflight(now_ms: u64, counts: &[i64]) -> Vec<u8> {
    let mut v = now_ms.to_le_bytes().to_vec();
    v.extend(counts.iter().flat_map(|c| c.to_le_bytes()));
    v
}

/// The answer to `req` from what the log's store read for it: every replica's stored in-flight
/// value ([`stored_inflight`], this replica's own included) and the log's entries after the
/// request's cursor, in the log's order. The other replicas' counts younger than `ttl_ms` are
/// summed; entries are returned up to `max_response_bytes` (at least one), the replica's own are
/// skipped but move the cursor. Also returns the replicas whose counts are older than `ttl_ms`,
/// for the store to forget.
pub fn answer<'a>(
    req: &FleetRequest,
    now_ms: u64,
    ttl_ms: u64,
    max_response_bytes: usize,
    inflight: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    range: impl IntoIterator<Item = StoredEntry>,
) -> (FleetResponse, Vec<String>) {
    let replica = req.replica.to_string();
    let mut sum = vec![0i64; req.inflight.len()];
    let mut stale = Vec::new();
    let mut replicas = 0usize;
    for (r, v) in inflight {
        replicas += 1;
        if r == replica {
            continue;
        }
        let at = v
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        if now_ms.saturating_sub(at) > ttl_ms {
            stale.push(r.to_owned());
            continue;
        }
        let counts = v.get(8..).unwrap_or_default().chunks_exact(8);
        for (s, c) in sum.iter_mut().zip(counts) {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            *s = s.saturating_add(i64::from_le_bytes(a));
        }
    }
    let mut cursor = req.cursor.clone();
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    for e in range {
        if !entries.is_empty() && bytes + e.batch.len() > max_response_bytes {
            break;
        }
        cursor = e.id;
        if e.replica == replica {
            continue;
        }
        bytes += e.batch.len();
        entries.push(FleetEntry {
            from_ms: e.from_ms,
            batch: e.batch,
        });
    }
    let resp = FleetResponse {
        cursor,
        inflight: if replicas > 1 { sum } else { Vec::new() },
        entries,
    };
    (resp, stale)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FleetError> {
        let (a, b) = (self.0.get(..n), self.0.get(n..));
        match (a, b) {
            (Some(a), Some(b)) => {
                self.0 = b;
                Ok(a)
            }
            _ => Err(FleetError::Truncated),
        }
    }
    fn u16(&mut self) -> Result<u16, FleetError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([
            b.first().copied().unwrap_or(0),
            b.get(1).copied().unwrap_or(0),
        ]))
    }
    fn u32(&mut self) -> Result<u32, FleetError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, FleetError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn magic(&mut self) -> Result<(), FleetError> {
        if self.take(4).map_err(|_| FleetError::Magic)? == MAGIC {
            Ok(())
        } else {
            Err(FleetError::Magic)
        }
    }
    fn cursor(&mut self) -> Result<String, FleetError> {
        let n = usize::from(self.u16()?);
        if n > MAX_CURSOR {
            return Err(FleetError::Cursor);
        }
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| FleetError::Cursor)
    }
    fn inflight(&mut self) -> Result<Vec<i64>, FleetError> {
        let n = usize::from(self.u16()?);
        if n > INFLIGHT_SECTIONS * crate::MAX_ENDPOINTS {
            return Err(FleetError::Inflight);
        }
        (0..n).map(|_| self.u64().map(|v| v as i64)).collect()
    }
}

fn put_cursor(out: &mut Vec<u8>, cursor: &str) {
    let c = cursor
        .as_bytes()
        .get(..cursor.len().min(MAX_CURSOR))
        .unwrap_or_default();
    out.extend_from_slice(&(c.len() as u16).to_le_bytes());
    out.extend_from_slice(c);
}

fn put_inflight(out: &mut Vec<u8>, v: &[i64]) {
    let v = v
        .get(..v.len().min(INFLIGHT_SECTIONS * crate::MAX_ENDPOINTS))
        .unwrap_or_default();
    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

impl FleetRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 8 * self.inflight.len() + self.batch.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.replica.to_le_bytes());
        out.extend_from_slice(&self.endpoints.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        put_cursor(&mut out, &self.cursor);
        out.extend_from_slice(&self.keep.to_le_bytes());
        out.extend_from_slice(&self.batch_from_ms.to_le_bytes());
        put_inflight(&mut out, &self.inflight);
        out.extend_from_slice(&self.batch);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, FleetError> {
        let mut r = Reader(b);
        r.magic()?;
        Ok(Self {
            replica: r.u64()?,
            endpoints: r.u64()?,
            epoch: r.u64()?,
            cursor: r.cursor()?,
            keep: r.u32()?,
            batch_from_ms: r.u64()?,
            inflight: r.inflight()?,
            batch: r.0.to_vec(),
        })
    }
}

impl FleetResponse {
    pub fn encode(&self) -> Vec<u8> {
        let bytes: usize = self.entries.iter().map(|e| 12 + e.batch.len()).sum();
        let mut out = Vec::with_capacity(80 + 8 * self.inflight.len() + bytes);
        out.extend_from_slice(MAGIC);
        put_cursor(&mut out, &self.cursor);
        put_inflight(&mut out, &self.inflight);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.from_ms.to_le_bytes());
            out.extend_from_slice(&(e.batch.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.batch);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, FleetError> {
        let mut r = Reader(b);
        r.magic()?;
        let cursor = r.cursor()?;
        let inflight = r.inflight()?;
        let count = r.u32()? as usize;
        // Each entry takes at least 12 bytes: a count larger than the rest can hold is truncation.
        if count > r.0.len() / 12 {
            return Err(FleetError::Truncated);
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let from_ms = r.u64()?;
            let n = r.u32()? as usize;
            entries.push(FleetEntry {
                from_ms,
                batch: r.take(n)?.to_vec(),
            });
        }
        if !r.0.is_empty() {
            return Err(FleetError::Truncated);
        }
        Ok(Self {
            cursor,
            inflight,
            entries,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::state::DecisionReport;
    use crate::BlockHash;
    use proptest::prelude::*;

    #[test]
    fn a_request_and_a_response_survive_the_round_trip() {
        let report = DecisionReport {
            endpoint: 1,
            session: Some(9),
            blocks: vec![BlockHash(1), BlockHash(2)],
        };
        let req = FleetRequest {
            replica: 7,
            endpoints: 11,
            epoch: 2,
            cursor: "1733-4".into(),
            keep: 900,
            batch_from_ms: 5,
            inflight: vec![1, 2, 3, 4, 5, -6],
            batch: report.encode(),
        };
        assert_eq!(FleetRequest::decode(&req.encode()).unwrap(), req);
        let resp = FleetResponse {
            cursor: "1734-0".into(),
            inflight: vec![3, 0, 1, 0, 7, 7],
            entries: vec![
                FleetEntry {
                    from_ms: 4,
                    batch: report.encode(),
                },
                FleetEntry {
                    from_ms: 5,
                    batch: Vec::new(),
                },
            ],
        };
        assert_eq!(FleetResponse::decode(&resp.encode()).unwrap(), resp);
    }

    #[test]
    fn the_fingerprint_tells_endpoint_lists_apart_by_name_and_order() {
        let eps = |names: &[&str]| {
            crate::FilterConfig::from_json(
                format!(
                    r#"{{"endpoints":[{}]}}"#,
                    names
                        .iter()
                        .map(|n| format!(r#"{{"name":"{n}"}}"#))
                        .collect::<Vec<_>>()
                        .join(",")
                )
                .as_bytes(),
            )
            .unwrap()
            .endpoints
        };
        let a = fingerprint(&eps(&["e0", "e1"]));
        assert_eq!(a, fingerprint(&eps(&["e0", "e1"])));
        assert_ne!(a, fingerprint(&eps(&["e1", "e0"])));
        assert_ne!(a, fingerprint(&eps(&["e0", "e1", "e2"])));
    }

    #[test]
    fn the_fuzz_seeds_are_well_formed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/fleet/");
        let resp =
            FleetResponse::decode(&std::fs::read(format!("{dir}response")).unwrap()).unwrap();
        assert_eq!(resp.entries.len(), 1);
        let (reports, left) = DecisionReport::decode_batch(&resp.entries[0].batch);
        assert_eq!((reports.len(), left), (1, 0));
        let req = FleetRequest::decode(&std::fs::read(format!("{dir}request")).unwrap()).unwrap();
        assert_eq!(
            (req.replica, req.cursor.as_str(), req.inflight.len()),
            (7, "0", 3)
        );
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = FleetRequest::decode(&b);
            let _ = FleetResponse::decode(&b);
            let mut m = MAGIC.to_vec();
            m.extend_from_slice(&b);
            let _ = FleetRequest::decode(&m);
            let _ = FleetResponse::decode(&m);
        }

        #[test]
        fn a_truncated_response_is_an_error_not_a_shorter_response(cut in 5usize..60) {
            let resp = FleetResponse {
                cursor: "1-0".into(),
                inflight: vec![1, 2, 3],
                entries: vec![FleetEntry { from_ms: 1, batch: vec![9; 40] }],
            };
            let b = resp.encode();
            prop_assume!(cut < b.len());
            prop_assert!(FleetResponse::decode(&b[..cut]).is_err());
        }
    }

    #[test]
    fn an_answer_skips_the_replicas_own_entries_and_stale_counts() {
        let req = FleetRequest {
            replica: 7,
            endpoints: 1,
            epoch: 0,
            cursor: "3".into(),
            keep: 100,
            batch_from_ms: 0,
            inflight: vec![1, 1],
            batch: Vec::new(),
        };
        let entry = |id: &str, replica: &str, n: usize| StoredEntry {
            id: id.into(),
            replica: replica.into(),
            from_ms: 5,
            batch: vec![0xab; n],
        };
        let inflight = [
            ("7".to_owned(), stored_inflight(1_000, &[100, 100])),
            ("8".to_owned(), stored_inflight(1_000, &[2, 3])),
            ("9".to_owned(), stored_inflight(900, &[4, 5])),
            ("10".to_owned(), stored_inflight(1, &[50, 50])),
        ];
        let (resp, stale) = answer(
            &req,
            1_000,
            500,
            10,
            inflight.iter().map(|(r, v)| (r.as_str(), v.as_slice())),
            [
                entry("4", "8", 4),
                entry("5", "7", 4),
                entry("6", "9", 4),
                entry("7", "8", 4),
                entry("8", "8", 4),
            ],
        );
        // Its own entry is skipped but read past; the bytes bound (10) stops the read at the
        // others' third entry.
        assert_eq!(resp.entries.len(), 2);
        assert_eq!(resp.cursor, "6");
        // The others' fresh counts, summed; the stale replica's left out and named.
        assert_eq!(resp.inflight, vec![6, 8]);
        assert_eq!(stale, vec!["10".to_owned()]);

        // Alone in the fleet: no counts, and an empty range keeps the cursor.
        let mine = [("7".to_owned(), stored_inflight(1_000, &[1, 1]))];
        let (resp, _) = answer(
            &req,
            1_000,
            500,
            10,
            mine.iter().map(|(r, v)| (r.as_str(), v.as_slice())),
            [],
        );
        assert!(resp.inflight.is_empty() && resp.entries.is_empty());
        assert_eq!(resp.cursor, "3");
    }
}
