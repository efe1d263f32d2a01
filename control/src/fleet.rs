//! The state service's half of the fleet exchange ([`kvroute_core::fleet`]): what this replica
//! shares, where it is in the fleet's log, and whether the log is reachable.
//!
//! The state service drives it: it hands over every batch of reports it applied
//! ([`FleetSync::share`]), asks for the next request when the sync period is due
//! ([`FleetSync::request`]), and gives back the answer or the failure. Nothing here waits: a slow
//! or dead log only delays what this replica learns from the others.

use kvroute_core::config::FleetEndpoint;
use kvroute_core::fleet::{self, FleetRequest, FleetResponse};

/// Fewest and most log entries a replica asks the log to keep.
const KEEP_MIN: u32 = 64;
const KEEP_MAX: u32 = 1_000_000;

/// One replica's exchange state.
#[derive(Debug)]
pub struct FleetSync {
    pub config: FleetEndpoint,
    replica: u64,
    endpoints: u64,
    epoch: u64,
    cursor: String,
    /// Reports applied here and not yet sent, back to back, and when the oldest was applied.
    out: Vec<u8>,
    out_from_ms: u64,
    out_blocks: u64,
    /// The batch of the exchange in flight (given back to `out` if the exchange fails).
    sent: Vec<u8>,
    sent_from_ms: u64,
    pub token: Option<u32>,
    pub sent_ms: u64,
    /// Whether the last exchange succeeded.
    pub connected: bool,
    /// Mean blocks per shared batch (exponentially weighted), which sizes `keep`.
    mean_batch_blocks: f64,
}

/// What one answer changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// Entries read and the reports in them.
    pub entries: usize,
    pub reports: usize,
    /// Reports or entries that could not be read (counted, skipped).
    pub bad: usize,
}

impl FleetSync {
    pub fn new(config: FleetEndpoint, replica: u64, endpoints: u64, epoch: u64) -> Self {
        Self {
            config,
            replica,
            endpoints,
            epoch,
            cursor: fleet::START.into(),
            out: Vec::new(),
            out_from_ms: 0,
            out_blocks: 0,
            sent: Vec::new(),
            sent_from_ms: 0,
            token: None,
            sent_ms: 0,
            connected: false,
            mean_batch_blocks: 0.0,
        }
    }

    /// Queues a batch of reports applied here for the fleet; false (not queued) when it would pass
    /// `max_batch_bytes`.
    pub fn share(&mut self, batch: &[u8], blocks: usize, now_ms: u64) -> bool {
        if batch.is_empty() {
            return true;
        }
        if self.out.len() + batch.len() > self.config.max_batch_bytes as usize {
            return false;
        }
        if self.out.is_empty() {
            self.out_from_ms = now_ms;
        }
        self.out.extend_from_slice(batch);
        self.out_blocks += blocks as u64;
        true
    }

    /// The directory was forgotten (a new epoch): the log of the new epoch starts here, and what
    /// waited to be sent belongs to the old one.
    pub fn new_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.cursor = fleet::START.into();
        self.out.clear();
        self.out_blocks = 0;
        self.token = None;
    }

    /// Whether an exchange is due: the period passed (to within a tenth: the tick that drives it
    /// may come a little early) and none is in flight (or the one in flight has had ten periods,
    /// at least a second, to answer).
    pub fn due(&self, now_ms: u64) -> bool {
        let since = now_ms.saturating_sub(self.sent_ms);
        let sync = u64::from(self.config.sync_ms);
        10 * since >= 9 * sync && (self.token.is_none() || since >= (10 * sync).max(1000))
    }

    /// The next request, taking what waits to be sent. `capacity_blocks` is what the engines hold
    /// in all (the directory's capacities); `inflight` this replica's in-flight counts.
    pub fn request(&mut self, now_ms: u64, capacity_blocks: u64, inflight: Vec<i64>) -> Vec<u8> {
        // A request still in flight is given up: its batch goes again.
        self.restore();
        if self.out_blocks > 0 {
            let b = self.out_blocks as f64;
            self.mean_batch_blocks = if self.mean_batch_blocks == 0.0 {
                b
            } else {
                0.9 * self.mean_batch_blocks + 0.1 * b
            };
        }
        // Entries older than the engines' capacity can still hold describe evicted blocks.
        let keep = if self.mean_batch_blocks > 0.0 {
            (capacity_blocks as f64 / self.mean_batch_blocks).ceil() as u64
        } else {
            u64::from(KEEP_MAX)
        };
        self.sent = std::mem::take(&mut self.out);
        self.sent_from_ms = std::mem::replace(&mut self.out_from_ms, 0);
        self.out_blocks = 0;
        self.sent_ms = now_ms;
        FleetRequest {
            replica: self.replica,
            endpoints: self.endpoints,
            epoch: self.epoch,
            cursor: self.cursor.clone(),
            keep: keep.clamp(u64::from(KEEP_MIN), u64::from(KEEP_MAX)) as u32,
            batch_from_ms: self.sent_from_ms,
            inflight,
            batch: self.sent.clone(),
        }
        .encode()
    }

    /// The exchange failed: its batch waits for the next one (if it still fits; false if dropped).
    pub fn failed(&mut self) -> bool {
        self.token = None;
        self.connected = false;
        self.restore()
    }

    fn restore(&mut self) -> bool {
        if self.sent.is_empty() {
            return true;
        }
        let sent = std::mem::take(&mut self.sent);
        if sent.len() + self.out.len() > self.config.max_batch_bytes as usize {
            return false;
        }
        let mut out = sent;
        out.extend_from_slice(&self.out);
        self.out = out;
        self.out_from_ms = match self.out_from_ms {
            0 => self.sent_from_ms,
            t => t.min(self.sent_from_ms),
        };
        true
    }

    /// The exchange succeeded: the cursor moves on.
    pub fn answered(&mut self, resp: &FleetResponse) {
        self.token = None;
        self.connected = true;
        self.sent.clear();
        self.cursor.clone_from(&resp.cursor);
    }

    pub fn cursor(&self) -> &str {
        &self.cursor
    }

    /// Bytes of reports waiting to be sent.
    pub fn pending(&self) -> usize {
        self.out.len() + self.sent.len()
    }
}
