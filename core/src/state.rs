//! The published cluster state: one versioned binary value in Envoy shared data.
//!
//! The singleton writes it; every worker re-reads it only when its version key changes. Between two
//! states, the singleton may publish an overlay ([`OVERLAY_KEY`]): the directory entries changed
//! since the state, each with its current value, for that state's version only. The version key
//! names the state's version and the overlay's sequence number, so a worker re-reads the overlay
//! (a few KB) only when that number moves, and the state only when the version does; the state
//! with its overlay answers exactly as the singleton's directory. Layout of the state:
//!
//! ```text
//! "KVR3" | header_len: u32 LE | header (postcard) | dir_n: u32 LE | sess_n: u32 LE
//!        | dir_n directory pairs | sess_n session pairs | bits: u32 LE | 2^bits + 1 offsets: u32 LE
//! directory pair = hash: u64 LE, holders mask: u64 LE   (ascending hash)
//! session pair   = session: u64 LE, endpoint: u64 LE    (ascending session)
//! offsets[i]     = the first directory pair whose hash's top `bits` bits are >= i
//! ```
//!
//! Readers never build a map: lookups read the bytes in place, so re-reading costs one copy. A
//! block lookup reads its bucket's two offsets and the few pairs between them (block hashes are
//! uniform, and there are two to four pairs per bucket): about two cache lines, where a search of
//! the whole section touched one per step.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::PolicySettings;
use crate::directory::{Changes, Directory, PrefixIndex, SessionStats};
use crate::hash::BlockHash;

/// Magic and schema version of the encoding.
pub const MAGIC: &[u8; 4] = b"KVR3";
/// Shared-data key of the state blob.
pub const STATE_KEY: &str = "kvroute.state";
/// Shared-data key of the state's version and directory as-of time ([`encode_version`]), read on
/// every request.
pub const VERSION_KEY: &str = "kvroute.state.version";

/// The value under [`VERSION_KEY`]: the state's version, and the time (ms) up to which the
/// published directory is known to be current. When decisions only refresh recency the singleton
/// advances that time without republishing the (unchanged) state.
pub fn encode_version(version: u64, directory_as_of_ms: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&version.to_le_bytes());
    b[8..].copy_from_slice(&directory_as_of_ms.to_le_bytes());
    b
}

/// [`encode_version`]'s value followed by the sequence number of the overlay published on top of
/// that state (0: none).
pub fn encode_version_with_overlay(
    version: u64,
    directory_as_of_ms: u64,
    overlay: u64,
) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..16].copy_from_slice(&encode_version(version, directory_as_of_ms));
    b[16..].copy_from_slice(&overlay.to_le_bytes());
    b
}

/// The overlay sequence number in a version value (0 when it names none).
pub fn decode_overlay_seq(b: &[u8]) -> u64 {
    u64_at(b, 16).unwrap_or(0)
}

/// [`encode_version_with_overlay`]'s value followed by the version of the state that published
/// the directory now under [`DIRECTORY_KEY`] (the overlay applies to that directory).
pub fn encode_version_with_directory(
    version: u64,
    directory_as_of_ms: u64,
    overlay: u64,
    directory: u64,
) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..24].copy_from_slice(&encode_version_with_overlay(
        version,
        directory_as_of_ms,
        overlay,
    ));
    b[24..].copy_from_slice(&directory.to_le_bytes());
    b
}

/// The directory's version in a version value: the state's own version where the value names
/// none (the directory was published with that state).
pub fn decode_directory_version(b: &[u8]) -> Option<u64> {
    u64_at(b, 24).or_else(|| u64_at(b, 0))
}

/// Shared-data key of the published directory ([`encode_directory`]): written only when the
/// directory is republished, so a state that changes only engine status, health or settings
/// (every sidecar pull) copies a header of a few hundred bytes, not the directory.
pub const DIRECTORY_KEY: &str = "kvroute.state.directory";
/// Magic of a directory value.
pub const DIRECTORY_MAGIC: &[u8; 4] = b"KVD1";

/// Encodes a directory value: `"KVD1" | version: u64 LE | section`, where `version` is the state
/// version that published it.
pub fn encode_directory(version: u64, directory: &DirectorySection) -> Vec<u8> {
    let dir = directory.bytes_or_empty();
    let mut out = Vec::with_capacity(12 + dir.len());
    out.extend_from_slice(DIRECTORY_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&dir);
    out
}

/// Reads [`encode_version`]'s value: (version, directory as-of ms if present).
pub fn decode_version(b: &[u8]) -> Option<(u64, Option<u64>)> {
    Some((u64_at(b, 0)?, u64_at(b, 8)))
}
/// Shared-data key of the gateway in-flight counters: one i64 LE per endpoint (requests), then one
/// per endpoint (prefix blocks of those requests), then one per endpoint (the prefill work of those
/// requests still to do, in tokens: not predicted cached, response not started), then one per endpoint
/// (until when, in ms since the epoch, it counts as down: it refused a connection).
pub const INFLIGHT_KEY: &str = "kvroute.inflight";
/// Sections of [`INFLIGHT_KEY`]'s value, each one i64 per endpoint.
pub const INFLIGHT_SECTIONS: usize = 4;
/// How long an endpoint that refused a connection counts as down for the policies, ms (the
/// sidecar's next scrapes take over from there).
pub const PASSIVE_DOWN_MS: u64 = 2_000;
/// Shared-data key of the tokenizer sample: two u64 LE running totals over the responses that
/// reported `usage.prompt_tokens`, the prompts' canonical text bytes and those tokens (see
/// [`crate::tokens`]). Workers add to it; the state service reads it.
pub const TOKENIZER_KEY: &str = "kvroute.tokenizer";

/// Decodes [`TOKENIZER_KEY`]'s value (zeros when absent or malformed).
pub fn decode_tokenizer(v: &[u8]) -> (u64, u64) {
    match (v.len(), u64_at(v, 0), u64_at(v, 8)) {
        (16, Some(bytes), Some(tokens)) => (bytes, tokens),
        _ => (0, 0),
    }
}

/// Encodes [`TOKENIZER_KEY`]'s value.
pub fn encode_tokenizer(bytes: u64, tokens: u64) -> Vec<u8> {
    [bytes, tokens]
        .iter()
        .flat_map(|c| c.to_le_bytes())
        .collect()
}

/// Shared-data key of the gateway-wide round-robin sequence (u64 LE).
pub const RR_SEQ_KEY: &str = "kvroute.rr_seq";
/// Shared queue on which workers report their decisions to the singleton.
pub const DECISION_QUEUE: &str = "kvroute.decisions";

/// Shared-data key of the state service's lease ([`encode_lease`]): who runs the state service now,
/// and when it last said so. Envoy never restarts a bootstrap Wasm service whose VM crashed, so
/// the filter's root contexts stand by: when the lease expires, one of them takes it (a
/// compare-and-swap) and runs the state service itself, from the queue on.
pub const LEASE_KEY: &str = "kvroute.state.lease";
/// The holder renews its lease this often, ms.
pub const LEASE_RENEW_MS: u64 = 200;
/// A lease not renewed for this long has expired: its holder is dead or stuck, ms.
pub const LEASE_TTL_MS: u64 = 1_000;
/// A standby that has seen no lease at all for this long after it started takes one (no state
/// service was configured, or it failed to start), ms.
pub const LEASE_ABSENT_MS: u64 = 3_000;

/// The lease value: the holder's id and its last renewal (ms since the epoch), u64 LE each.
pub fn encode_lease(holder: u64, renewed_ms: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&holder.to_le_bytes());
    b[8..].copy_from_slice(&renewed_ms.to_le_bytes());
    b
}

/// Reads [`encode_lease`]'s value: (holder, renewed ms).
pub fn decode_lease(b: &[u8]) -> Option<(u64, u64)> {
    Some((u64_at(b, 0)?, u64_at(b, 8)?))
}

/// What a lease value means to `me` at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// `me` holds it.
    Mine,
    /// Another holder renewed it within [`LEASE_TTL_MS`].
    Held,
    /// Another holder let it lapse (or the value is unreadable): it can be taken.
    Expired,
    /// No lease was ever written.
    Absent,
}

/// Classifies the lease value `value` for `me` at `now_ms`. A renewal time in the future (another
/// VM's clock read a moment later) counts as fresh.
pub fn lease(value: Option<&[u8]>, me: u64, now_ms: u64) -> Lease {
    match value.map(decode_lease) {
        None => Lease::Absent,
        Some(None) => Lease::Expired,
        Some(Some((holder, _))) if holder == me => Lease::Mine,
        Some(Some((_, renewed))) if now_ms.saturating_sub(renewed) < LEASE_TTL_MS => Lease::Held,
        Some(Some(_)) => Lease::Expired,
    }
}

/// Engine-reported load of one endpoint (from the sidecar's snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EngineLoad {
    /// `vllm:num_requests_waiting`
    pub waiting: f64,
    /// `vllm:num_requests_running`
    pub running: f64,
    /// `vllm:kv_cache_usage_perc` (0..=1)
    pub kv_usage: f64,
    /// Prefill throughput, tokens/s, measured by the sidecar from the engine's counters (0: not
    /// measured yet).
    #[serde(default)]
    pub prefill_tps: f64,
    /// Time per output token, seconds, measured by the sidecar (0: not measured yet).
    #[serde(default)]
    pub step_s: f64,
    /// When it was scraped, in ms since the epoch.
    pub scraped_at_ms: u64,
}

/// What the router knows about one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// False routes around the endpoint.
    pub healthy: bool,
    /// Engine-reported load, when a sidecar provides it.
    pub engine: Option<EngineLoad>,
}

impl Default for EndpointStatus {
    fn default() -> Self {
        Self {
            healthy: true,
            engine: None,
        }
    }
}

/// The fixed-size part of the published state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateHeader {
    /// Increases with every publish.
    pub version: u64,
    /// When this state was published, in ms since the epoch.
    pub published_at_ms: u64,
    /// Active policy settings (configured defaults with runtime values applied).
    pub settings: PolicySettings,
    /// One status per configured endpoint, in configuration order.
    pub endpoints: Vec<EndpointStatus>,
    /// When the published directory was taken, in ms since the epoch (0: no directory published).
    pub directory_as_of_ms: u64,
    /// Decisions the singleton has recorded in the directory so far.
    pub decisions_recorded: u64,
    /// A sidecar is configured but its snapshot is missing or too old: engine load was dropped
    /// and health is unknown (every endpoint counts as healthy).
    pub stale: bool,
    /// How the directory's sessions spread over the endpoints, as of this state.
    pub sessions: SessionStats,
}

/// Why a state value could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Wrong magic (another schema version, or garbage).
    #[error("bad magic")]
    Magic,
    /// Too short for what its header says.
    #[error("truncated")]
    Truncated,
    /// The header does not decode.
    #[error("bad header")]
    Header,
    /// The directory's bucket index does not fit its entries.
    #[error("bad directory index")]
    Index,
}

/// Bucket bits for `n` directory entries: two to four entries a bucket (none below 16 entries).
fn bucket_bits(n: usize) -> u32 {
    if n < 16 {
        0
    } else {
        (usize::BITS - 1 - n.leading_zeros() - 1).min(MAX_BUCKET_BITS)
    }
}

/// Caps the index at 2^24 + 1 offsets (64 MiB), far above any directory's bound.
const MAX_BUCKET_BITS: u32 = 24;

/// The bucket of `key` under `bits` bucket bits.
fn bucket_of(key: u64, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (key >> (64 - bits)) as usize
    }
}

/// Merges two key-ascending runs of (key, value) pairs (keys unique within each) into one; on a key
/// in both, `newer`'s value wins. Pairs whose value `keep` refuses are left out.
fn merge_sorted<K: Ord + Copy, V: Copy>(
    base: impl Iterator<Item = (K, V)>,
    newer: impl Iterator<Item = (K, V)>,
    keep: impl Fn(V) -> bool,
) -> Vec<(K, V)> {
    let (mut base, mut newer) = (base.peekable(), newer.peekable());
    let mut out = Vec::with_capacity(base.size_hint().0 + newer.size_hint().0);
    loop {
        let next = match (base.peek(), newer.peek()) {
            (Some(x), Some(y)) if x.0 < y.0 => base.next(),
            (Some(x), Some(y)) if x.0 == y.0 => {
                base.next();
                newer.next()
            }
            (_, Some(_)) => newer.next(),
            (Some(_), None) => base.next(),
            (None, None) => break,
        };
        if let Some(p) = next.filter(|p| keep(p.1)) {
            out.push(p);
        }
    }
    out
}

/// Writes a (key, value) pair into a 16-byte slot.
fn put_pair(slot: &mut [u8], key: u64, value: u64) {
    let (k, v) = slot.split_at_mut(8);
    k.copy_from_slice(&key.to_le_bytes());
    v.copy_from_slice(&value.to_le_bytes());
}

/// The encoded directory part of a state (entry counts and pairs), kept between publishes so that
/// a settings change can be published without publishing a newer directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectorySection(Vec<u8>);

impl DirectorySection {
    /// An empty directory.
    pub fn empty() -> Self {
        // No entries, no sessions, 0 bucket bits, offsets [0, 0].
        Self(vec![0; 20])
    }

    /// The directory's current entries and sessions.
    pub fn of(d: &Directory) -> Self {
        let mut sessions: Vec<(u64, u64)> =
            d.session_entries().map(|(s, e)| (s, e as u64)).collect();
        crate::directory::sort_by_hash(&mut sessions, |(s, _)| *s);
        Self::build(&d.entries(), &sessions)
    }

    /// The section of an overlay's entries.
    pub fn of_overlay(o: &OverlayBuilder) -> Self {
        Self::build(&o.blocks, &o.sessions)
    }

    /// This section with an overlay's entries applied on top: the directory the overlay
    /// describes, as a full section (a block no endpoint holds any more, and a forgotten session,
    /// drop out). Both are sorted, so it is one linear merge, with no look-up in the directory and
    /// no sort: what the singleton's full publish costs when it follows overlays.
    pub fn merged(&self, o: &OverlayBuilder) -> Self {
        let b = self.bytes_or_empty();
        // A section this type built always parses; one that did not would read as empty.
        let (dir, sess) = Section::parse(&b, 0).map_or((0..0, 0..0), |s| (s.dir, s.sess));
        let pairs_in = |r: Range<usize>| {
            b.get(r)
                .unwrap_or_default()
                .chunks_exact(16)
                .filter_map(|p| Some((u64_at(p, 0)?, u64_at(p, 8)?)))
        };
        let pairs = merge_sorted(
            pairs_in(dir).map(|(h, m)| (BlockHash(h), m)),
            o.blocks.iter().copied(),
            |m| m != 0,
        );
        let sessions = merge_sorted(pairs_in(sess), o.sessions.iter().copied(), |e| {
            e != NO_ENDPOINT
        });
        Self::build(&pairs, &sessions)
    }

    /// Encodes pairs in ascending hash order and sessions in ascending order.
    fn build(pairs: &[(BlockHash, u64)], sessions: &[(u64, u64)]) -> Self {
        let (dir_n, sess_n) = (pairs.len(), sessions.len());
        let bits = bucket_bits(dir_n);
        let buckets = 1usize << bits;
        // Written in place into a buffer of its final size (a directory of 8,192 blocks is 128 KB
        // of pairs): pushing each field in turn cost several times as much under V8.
        let mut out = vec![0u8; 8 + 16 * (dir_n + sess_n) + 4 + 4 * (buckets + 1)];
        let (head, rest) = out.split_at_mut(8);
        let (dir, rest) = rest.split_at_mut(16 * dir_n);
        let (sess, index) = rest.split_at_mut(16 * sess_n);
        head.copy_from_slice(
            &[(dir_n as u32).to_le_bytes(), (sess_n as u32).to_le_bytes()].concat(),
        );
        // offsets[b + 1] counts bucket b's entries, then the running sum makes each offset the
        // first entry of its bucket (entries are in ascending hash order).
        let mut offsets = vec![0u32; buckets + 1];
        for (slot, (h, m)) in dir.chunks_exact_mut(16).zip(pairs) {
            if let Some(c) = offsets.get_mut(bucket_of(h.0, bits) + 1) {
                *c += 1;
            }
            put_pair(slot, h.0, *m);
        }
        for (slot, (s, e)) in sess.chunks_exact_mut(16).zip(sessions) {
            put_pair(slot, *s, *e);
        }
        let mut sum = 0;
        let (bits_slot, index) = index.split_at_mut(4);
        bits_slot.copy_from_slice(&bits.to_le_bytes());
        for (slot, o) in index.chunks_exact_mut(4).zip(offsets) {
            sum += o;
            slot.copy_from_slice(&sum.to_le_bytes());
        }
        Self(out)
    }

    /// Its bytes, or an empty section's when it is too short to be one (a default value).
    fn bytes_or_empty(&self) -> std::borrow::Cow<'_, [u8]> {
        let empty = Self::empty();
        if self.0.len() >= empty.0.len() {
            std::borrow::Cow::Borrowed(&self.0)
        } else {
            std::borrow::Cow::Owned(empty.0)
        }
    }

    /// Encoded size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when it holds no entries.
    pub fn is_empty(&self) -> bool {
        u32_at(&self.0, 0).unwrap_or(0) == 0 && u32_at(&self.0, 4).unwrap_or(0) == 0
    }
}

/// Encodes a state.
pub fn encode(header: &StateHeader, directory: &DirectorySection) -> Vec<u8> {
    let head = postcard::to_allocvec(header).unwrap_or_default();
    let dir = directory.bytes_or_empty();
    let mut out = Vec::with_capacity(8 + head.len() + dir.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&dir);
    out
}

/// A worker's report of one decision, sent to the singleton over the shared queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionReport {
    /// Chosen endpoint.
    pub endpoint: u16,
    /// Session key, if any.
    pub session: Option<u64>,
    /// The request's block hashes.
    pub blocks: Vec<BlockHash>,
}

impl DecisionReport {
    /// Wire form: endpoint u16 LE, has_session u8, session u64 LE, n u32 LE, n hashes u64 LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(15 + 8 * self.blocks.len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the wire form to `out` (a batch is reports back to back).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.endpoint.to_le_bytes());
        out.push(u8::from(self.session.is_some()));
        out.extend_from_slice(&self.session.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for b in &self.blocks {
            out.extend_from_slice(&b.0.to_le_bytes());
        }
    }

    /// Decodes a batch of reports; stops at the first malformed one and says how many bytes were
    /// left over (0 for a well-formed batch).
    pub fn decode_batch(mut b: &[u8]) -> (Vec<Self>, usize) {
        let mut out = Vec::new();
        while !b.is_empty() {
            let Some(n) = u32_at(b, 11) else { break };
            let len = 15usize.saturating_add(8usize.saturating_mul(n as usize));
            let Some(one) = b.get(..len) else { break };
            match Self::decode(one) {
                Some(r) => out.push(r),
                None => break,
            }
            b = b.get(len..).unwrap_or_default();
        }
        (out, b.len())
    }

    /// Decodes the wire form of one report; None if malformed.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let endpoint = u16::from_le_bytes(b.get(0..2)?.try_into().ok()?);
        let has_session = *b.get(2)? == 1;
        let session = u64_at(b, 3)?;
        let n = u32_at(b, 11)? as usize;
        if b.len() != 15usize.saturating_add(8usize.saturating_mul(n)) {
            return None;
        }
        let blocks = (0..n)
            .map(|i| u64_at(b, 15 + 8 * i).map(BlockHash))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            endpoint,
            session: has_session.then_some(session),
            blocks,
        })
    }
}

/// Wraps a batch of reports (back to back, [`DecisionReport::encode_into`]) for the decision
/// queue: `from_us: u64 LE | batch`, where `from_us` is when the batch's first report was decided
/// (the host's clock, us), so that the singleton can tell how long reports wait to be applied.
pub fn encode_report_message(from_us: u64, batch: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(REPORT_MESSAGE_HEADER + batch.len());
    begin_report_message(&mut out, from_us);
    out.extend_from_slice(batch);
    out
}

/// Bytes of a decision-queue message before its reports.
pub const REPORT_MESSAGE_HEADER: usize = 8;

/// Starts a decision-queue message in `out` (emptied first): its time, `from_us`; the reports are
/// appended after it ([`DecisionReport::encode_into`]).
pub fn begin_report_message(out: &mut Vec<u8>, from_us: u64) {
    out.clear();
    out.extend_from_slice(&from_us.to_le_bytes());
}

/// Splits a decision-queue message into its time and its batch; None when it is too short.
pub fn decode_report_message(msg: &[u8]) -> Option<(u64, &[u8])> {
    Some((u64_at(msg, 0)?, msg.get(REPORT_MESSAGE_HEADER..)?))
}

/// A decoded state, owning its bytes; lookups read the bytes in place.
#[derive(Debug, Clone)]
pub struct PublishedState {
    bytes: Vec<u8>,
    /// The header.
    pub header: StateHeader,
    section: Section,
}

/// Where a directory section's parts lie in the bytes that hold it.
#[derive(Debug, Clone)]
struct Section {
    dir: Range<usize>,
    sess: Range<usize>,
    /// Bucket bits of the directory's index.
    bits: u32,
    /// Where the index's offsets start.
    index: usize,
}

/// A session's endpoint in a published overlay when the directory forgot the session.
pub const NO_ENDPOINT: u64 = u64::MAX;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
}

impl PublishedState {
    /// Decodes a state value, checking every length.
    pub fn decode(bytes: Vec<u8>) -> Result<Self, StateError> {
        if bytes.get(..4) != Some(MAGIC.as_slice()) {
            return Err(StateError::Magic);
        }
        let head_len = u32_at(&bytes, 4).ok_or(StateError::Truncated)? as usize;
        let head = bytes
            .get(8..8usize.saturating_add(head_len))
            .ok_or(StateError::Truncated)?;
        let header: StateHeader = postcard::from_bytes(head).map_err(|_| StateError::Header)?;
        let section = Section::parse(&bytes, 8 + head_len)?;
        Ok(Self {
            bytes,
            header,
            section,
        })
    }

    /// A state of `header` with the directory of a [`DIRECTORY_KEY`] value, and that directory's
    /// version.
    pub fn with_directory(header: StateHeader, bytes: Vec<u8>) -> Result<(Self, u64), StateError> {
        if bytes.get(..4) != Some(DIRECTORY_MAGIC.as_slice()) {
            return Err(StateError::Magic);
        }
        let version = u64_at(&bytes, 4).ok_or(StateError::Truncated)?;
        let section = Section::parse(&bytes, 12)?;
        Ok((
            Self {
                bytes,
                header,
                section,
            },
            version,
        ))
    }

    /// Directory entries published.
    pub fn directory_entries(&self) -> usize {
        self.section.dir.len() / 16
    }

    /// Size of the encoded value.
    pub fn encoded_len(&self) -> usize {
        self.bytes.len()
    }
}

impl Section {
    /// Parses the section that starts at `at` and runs to the end of `bytes`, checking every
    /// length.
    fn parse(bytes: &[u8], at: usize) -> Result<Self, StateError> {
        let dir_n = u32_at(bytes, at).ok_or(StateError::Truncated)? as usize;
        let sess_n = u32_at(bytes, at + 4).ok_or(StateError::Truncated)? as usize;
        // Neither part can be longer than the value (which also keeps the sums below from
        // overflowing a 32-bit usize).
        if dir_n.max(sess_n) > bytes.len() / 16 {
            return Err(StateError::Truncated);
        }
        let dir = at + 8..at + 8 + 16 * dir_n;
        let sess = dir.end..dir.end + 16 * sess_n;
        let bits = u32_at(bytes, sess.end).ok_or(StateError::Truncated)?;
        if bits > MAX_BUCKET_BITS {
            return Err(StateError::Index);
        }
        let index = sess.end + 4;
        let buckets = 1usize << bits;
        if bytes.len() != index + 4 * (buckets + 1) {
            return Err(StateError::Truncated);
        }
        // Lookups clamp each bucket's range to the entries, so a bad offset can only miss a key;
        // the ends are checked here.
        if u32_at(bytes, index) != Some(0)
            || u32_at(bytes, index + 4 * buckets) != Some(dir_n as u32)
        {
            return Err(StateError::Index);
        }
        Ok(Self {
            dir,
            sess,
            bits,
            index,
        })
    }

    /// The holders of block `key` if the section has an entry for it: the pairs of its bucket,
    /// scanned (a bucket holds two to four when hashes are uniform), or binary searched when a
    /// bucket is unusually full.
    fn holders(&self, bytes: &[u8], key: u64) -> Option<u64> {
        let b = bucket_of(key, self.bits);
        let n = self.dir.len() / 16;
        let at = |i: usize| u32_at(bytes, self.index + 4 * i).map_or(n, |o| o as usize);
        let (lo, hi) = (at(b).min(n), at(b + 1).min(n));
        let pairs = bytes.get(self.dir.start + 16 * lo..self.dir.start + 16 * hi.max(lo))?;
        if pairs.len() <= 16 * 16 {
            for p in pairs.chunks_exact(16) {
                match u64_at(p, 0).map(|k| k.cmp(&key)) {
                    Some(std::cmp::Ordering::Equal) => return u64_at(p, 8),
                    Some(std::cmp::Ordering::Greater) | None => return None,
                    Some(std::cmp::Ordering::Less) => {}
                }
            }
            return None;
        }
        let (mut lo, mut hi) = (0usize, pairs.len() / 16);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match u64_at(pairs, mid * 16).map(|k| k.cmp(&key)) {
                Some(std::cmp::Ordering::Equal) => return u64_at(pairs, mid * 16 + 8),
                Some(std::cmp::Ordering::Less) => lo = mid + 1,
                Some(std::cmp::Ordering::Greater) | None => hi = mid,
            }
        }
        None
    }

    /// The endpoint value of session `s` if the section has an entry for it.
    fn session(&self, bytes: &[u8], s: u64) -> Option<u64> {
        search(bytes, &self.sess, s)
    }
}

/// The value of `key` in a sorted section of (key, value) pairs. Keys are uniform 64-bit hashes,
/// so a few interpolation steps narrow the range to a handful of entries (about log log n
/// probes instead of log n); a binary search finishes, which also bounds the worst case.
fn search(bytes: &[u8], range: &Range<usize>, key: u64) -> Option<u64> {
    let b = bytes.get(range.clone())?;
    let (mut lo, mut hi) = (0usize, b.len() / 16);
    // Every key in entries lo..hi lies in (k_lo, k_hi) (bounds inclusive at the ends).
    let (mut k_lo, mut k_hi) = (0u64, u64::MAX);
    for _ in 0..4 {
        if hi - lo <= 8 || key < k_lo || key > k_hi {
            break;
        }
        let frac = (key - k_lo) as f64 / ((k_hi - k_lo) as f64 + 1.0);
        let mid = (lo + (frac * (hi - lo) as f64) as usize).min(hi - 1);
        let k = u64_at(b, mid * 16)?;
        match k.cmp(&key) {
            std::cmp::Ordering::Equal => return u64_at(b, mid * 16 + 8),
            std::cmp::Ordering::Less => (lo, k_lo) = (mid + 1, k),
            std::cmp::Ordering::Greater => (hi, k_hi) = (mid, k),
        }
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let k = u64_at(b, mid * 16)?;
        match k.cmp(&key) {
            std::cmp::Ordering::Equal => return u64_at(b, mid * 16 + 8),
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    None
}

impl PrefixIndex for PublishedState {
    fn holders(&self, h: BlockHash) -> u64 {
        self.section.holders(&self.bytes, h.0).unwrap_or(0)
    }
    fn session_endpoint(&self, s: u64) -> Option<usize> {
        self.section.session(&self.bytes, s).map(|e| e as usize)
    }
    fn session_stats(&self) -> Option<&SessionStats> {
        Some(&self.header.sessions)
    }
}

/// The entries of an overlay: every change since the last full state, with its value as of the
/// latest change, kept sorted so that each publish merges in only the changes since the one before
/// (the journal's take), instead of looking every change up again.
#[derive(Debug, Default, Clone)]
pub struct OverlayBuilder {
    blocks: Vec<(BlockHash, u64)>,
    sessions: Vec<(u64, u64)>,
}

impl OverlayBuilder {
    /// Forgets every entry (a full state was published).
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.sessions.clear();
    }

    /// Entries held (blocks and sessions).
    pub fn len(&self) -> usize {
        self.blocks.len() + self.sessions.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Merges in the current values of `changes` in `d` (newer than any it holds).
    pub fn add(&mut self, d: &Directory, changes: &Changes) {
        let blocks: Vec<(BlockHash, u64)> =
            changes.blocks.iter().map(|h| (*h, d.holders(*h))).collect();
        let sessions: Vec<(u64, u64)> = changes
            .sessions
            .iter()
            .map(|s| (*s, d.session_endpoint(*s).map_or(NO_ENDPOINT, |e| e as u64)))
            .collect();
        merge_newer(&mut self.blocks, blocks);
        merge_newer(&mut self.sessions, sessions);
    }
}

/// Merges `newer` (sorted by key, keys unique) into `into` (the same); on a key in both, the newer
/// value wins.
fn merge_newer<K: Ord + Copy, V: Copy>(into: &mut Vec<(K, V)>, newer: Vec<(K, V)>) {
    if newer.is_empty() {
        return;
    }
    let old = std::mem::take(into);
    *into = merge_sorted(old.into_iter(), newer.into_iter(), |_| true);
}

/// Most directory changes (blocks and sessions) an overlay carries, at the least; past its bound
/// the next publish is a full one. With publishing on every decision, each decision that changes
/// the directory publishes the changes since the last full state (an overlay of a few KB) instead
/// of the whole directory, and the workers copy that instead of the whole directory. With 8 KB
/// prompts new to a full directory (118 blocks added and 118 evicted a decision), 1,024 or 4,096
/// cost the singleton more per decision than 2,048 (the core's decision bench measures it).
pub const OVERLAY_MAX_CHANGES: usize = 2048;
/// The most an overlay's bound grows to ([`overlay_bound`]): 512 KiB of entries.
pub const OVERLAY_CAP_CHANGES: usize = 32_768;

/// The overlay's bound for a directory of `entries` blocks whose decisions change
/// `changes_per_decision` entries each: sqrt(2 x entries x changes), within [`OVERLAY_MAX_CHANGES`]
/// and [`OVERLAY_CAP_CHANGES`]. Each decision costs about the overlay's size (the service encodes
/// it, every worker copies it), half the bound on average, and a full publish every
/// bound / changes decisions costs the directory's size; their sum is least at that bound. Small
/// directories and short prompts keep 2,048; long prompts on large directories (the Mooncake
/// trace's 660 new blocks a request on 16 engines) get a larger overlay instead of copying the
/// directory every few requests.
pub fn overlay_bound(entries: usize, changes_per_decision: f64) -> usize {
    let k = (2.0 * entries as f64 * changes_per_decision.max(0.0)).sqrt();
    if k.is_finite() {
        (k as usize).clamp(OVERLAY_MAX_CHANGES, OVERLAY_CAP_CHANGES)
    } else {
        OVERLAY_MAX_CHANGES
    }
}

/// Magic of a published overlay.
pub const OVERLAY_MAGIC: &[u8; 4] = b"KVO2";
/// Shared-data key of the overlay: what changed in the directory since the published state's.
pub const OVERLAY_KEY: &str = "kvroute.state.overlay";

/// Encodes an overlay: `"KVO2" | base version: u64 LE | seq: u64 LE | stats_len: u32 LE |
/// session stats (postcard) | section` (the section of [`DirectorySection::of_overlay`]). It
/// applies to the state of version `base` only; its session stats replace the state's.
pub fn encode_overlay(
    base: u64,
    seq: u64,
    sessions: &SessionStats,
    changes: &DirectorySection,
) -> Vec<u8> {
    let section = changes.bytes_or_empty();
    let stats = postcard::to_allocvec(sessions).unwrap_or_default();
    let mut out = Vec::with_capacity(24 + stats.len() + section.len());
    out.extend_from_slice(OVERLAY_MAGIC);
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(stats.len() as u32).to_le_bytes());
    out.extend_from_slice(&stats);
    out.extend_from_slice(&section);
    out
}

/// A decoded overlay, owning its bytes.
#[derive(Debug, Clone)]
pub struct PublishedOverlay {
    bytes: Vec<u8>,
    /// The version of the state it applies to.
    pub base: u64,
    /// Its sequence number (the version key names the current one).
    pub seq: u64,
    /// How the directory's sessions spread, as of this overlay.
    pub sessions: SessionStats,
    section: Section,
}

impl PublishedOverlay {
    /// Decodes an overlay value, checking every length.
    pub fn decode(bytes: Vec<u8>) -> Result<Self, StateError> {
        if bytes.get(..4) != Some(OVERLAY_MAGIC.as_slice()) {
            return Err(StateError::Magic);
        }
        let base = u64_at(&bytes, 4).ok_or(StateError::Truncated)?;
        let seq = u64_at(&bytes, 12).ok_or(StateError::Truncated)?;
        let stats_len = u32_at(&bytes, 20).ok_or(StateError::Truncated)? as usize;
        let stats = bytes
            .get(24..24usize.saturating_add(stats_len))
            .ok_or(StateError::Truncated)?;
        let sessions: SessionStats = postcard::from_bytes(stats).map_err(|_| StateError::Header)?;
        let section = Section::parse(&bytes, 24 + stats_len)?;
        Ok(Self {
            bytes,
            base,
            seq,
            sessions,
            section,
        })
    }
}

/// A published state with the overlay published on top of it, if any: what the workers route on.
/// An entry of the overlay replaces the state's (a block no endpoint holds any more reads 0, a
/// forgotten session none).
#[derive(Debug, Clone, Copy)]
pub struct Layered<'a> {
    /// The state.
    pub base: &'a PublishedState,
    /// The overlay, when it applies to that state.
    pub top: Option<&'a PublishedOverlay>,
}

impl PrefixIndex for Layered<'_> {
    fn holders(&self, h: BlockHash) -> u64 {
        match self.top.and_then(|t| t.section.holders(&t.bytes, h.0)) {
            Some(m) => m,
            None => self.base.holders(h),
        }
    }
    fn session_endpoint(&self, s: u64) -> Option<usize> {
        match self.top.and_then(|t| t.section.session(&t.bytes, s)) {
            Some(NO_ENDPOINT) => None,
            Some(e) => Some(e as usize),
            None => self.base.session_endpoint(s),
        }
    }
    fn session_stats(&self) -> Option<&SessionStats> {
        match self.top {
            Some(t) => Some(&t.sessions),
            None => self.base.session_stats(),
        }
    }
}

/// The other Envoy replicas' gateway in-flight counts (requests, blocks, prompt tokens to prefill;
/// one value per endpoint each), summed, as the state service last received them from the fleet:
/// `u64` ms since the epoch when received, then the counts ([`encode_inflight`]).
pub const FLEET_INFLIGHT_KEY: &str = "kvroute.fleet.inflight";
/// Fleet in-flight counts older than this are not added to the local ones.
pub const FLEET_INFLIGHT_TTL_MS: u64 = 2_000;

/// Encodes the fleet's in-flight counts received at `at_ms`.
pub fn encode_fleet_inflight(at_ms: u64, counts: &[i64]) -> Vec<u8> {
    let mut out = at_ms.to_le_bytes().to_vec();
    out.extend(counts.iter().flat_map(|c| c.to_le_bytes()));
    out
}

/// Decodes the fleet's in-flight counts into `out` (resized to `n`) if they are younger than
/// [`FLEET_INFLIGHT_TTL_MS`] at `now_ms`; false (and `out` untouched) otherwise.
pub fn decode_fleet_inflight(bytes: &[u8], n: usize, now_ms: u64, out: &mut Vec<i64>) -> bool {
    match u64_at(bytes, 0) {
        Some(at) if now_ms.saturating_sub(at) <= FLEET_INFLIGHT_TTL_MS => {
            decode_inflight(bytes.get(8..).unwrap_or_default(), n, out);
            true
        }
        _ => false,
    }
}

/// Encodes gateway in-flight counters.
pub fn encode_inflight(counts: &[i64]) -> Vec<u8> {
    counts.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// Decodes gateway in-flight counters into `out` (resized to `n`; missing ones read 0). With
/// `n` = endpoints these are the request counts; with `2 * endpoints`, the request counts followed
/// by the block counts.
pub fn decode_inflight(bytes: &[u8], n: usize, out: &mut Vec<i64>) {
    out.clear();
    out.extend((0..n).map(|i| u64_at(bytes, i * 8).map_or(0, |v| v as i64)));
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
    use crate::directory::{match_lengths, HeadStats};
    use proptest::prelude::*;

    #[test]
    fn a_lease_is_mine_held_expired_or_absent() {
        let now = 1_700_000_000_000;
        let v = encode_lease(7, now - 100);
        assert_eq!(decode_lease(&v), Some((7, now - 100)));
        assert_eq!(lease(Some(&v), 7, now), Lease::Mine);
        assert_eq!(lease(Some(&v), 8, now), Lease::Held);
        // Renewed a moment "later" by another VM's clock: fresh, not expired.
        assert_eq!(lease(Some(&encode_lease(7, now + 5)), 8, now), Lease::Held);
        let old = encode_lease(7, now - LEASE_TTL_MS);
        assert_eq!(lease(Some(&old), 8, now), Lease::Expired);
        assert_eq!(
            lease(Some(&old), 7, now),
            Lease::Mine,
            "its holder may renew it"
        );
        assert_eq!(lease(Some(b"junk"), 8, now), Lease::Expired);
        assert_eq!(lease(None, 8, now), Lease::Absent);
        const {
            assert!(
                LEASE_RENEW_MS * 3 < LEASE_TTL_MS,
                "a renewal may miss twice"
            )
        };
    }

    fn header() -> StateHeader {
        StateHeader {
            version: 7,
            published_at_ms: 1_700_000_000_000,
            settings: PolicySettings::default(),
            endpoints: vec![
                EndpointStatus::default(),
                EndpointStatus {
                    healthy: false,
                    engine: None,
                },
            ],
            directory_as_of_ms: 1_700_000_000_000,
            decisions_recorded: 3,
            stale: false,
            sessions: SessionStats {
                per_endpoint: vec![4, 1],
                continuing: 0.75,
                heads: vec![HeadStats {
                    key: 42,
                    requests: 20,
                    continuing: 3,
                    inherited: 4,
                }],
            },
        }
    }

    #[test]
    fn round_trip_answers_like_the_directory() {
        let mut d = Directory::new(&[50, 50], 10);
        let blocks: Vec<BlockHash> = (1..=20).map(BlockHash).collect();
        d.record(0, &blocks, Some(99));
        d.record(1, &blocks[..5], Some(5));
        let s = PublishedState::decode(encode(&header(), &DirectorySection::of(&d))).unwrap();
        assert_eq!(s.header, header());
        assert_eq!(s.directory_entries(), 20);
        assert_eq!(match_lengths(&s, &blocks, 2), match_lengths(&d, &blocks, 2));
        assert_eq!(s.session_endpoint(99), Some(0));
        assert_eq!(s.session_endpoint(5), Some(1));
        assert_eq!(s.session_endpoint(6), None);
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(
            PublishedState::decode(vec![]).unwrap_err(),
            StateError::Magic
        );
        let mut b = encode(&header(), &DirectorySection::empty());
        b.pop();
        assert_eq!(
            PublishedState::decode(b).unwrap_err(),
            StateError::Truncated
        );
        let mut b = encode(&header(), &DirectorySection::empty());
        b.push(0);
        assert_eq!(
            PublishedState::decode(b).unwrap_err(),
            StateError::Truncated
        );
        // An index whose last offset is not the entry count.
        let mut d = Directory::new(&[50], 10);
        d.record(0, &(1..=20).map(BlockHash).collect::<Vec<_>>(), None);
        let mut b = encode(&header(), &DirectorySection::of(&d));
        let last = b.len() - 4;
        b[last..].copy_from_slice(&19u32.to_le_bytes());
        assert_eq!(PublishedState::decode(b).unwrap_err(), StateError::Index);
        // Bucket bits past the cap.
        let mut b = encode(&header(), &DirectorySection::empty());
        let bits_at = b.len() - 12;
        b[bits_at..bits_at + 4].copy_from_slice(&31u32.to_le_bytes());
        assert_eq!(PublishedState::decode(b).unwrap_err(), StateError::Index);
    }

    #[test]
    fn the_journal_overflows_past_its_capacity_and_on_untracked_changes() {
        let mut d = Directory::new(&[100, 100], 10);
        assert_eq!(d.changes(), None, "off by default");
        d.set_journal_capacity(4);
        d.record(0, &[BlockHash(1), BlockHash(2)], Some(9));
        let c = d.changes().unwrap();
        assert_eq!(c.blocks, vec![BlockHash(1), BlockHash(2)]);
        assert_eq!(c.sessions, vec![9]);
        // Recency only: nothing new.
        d.record(0, &[BlockHash(1)], Some(9));
        assert_eq!(d.changes().unwrap().blocks.len(), 2);
        d.record(1, &[BlockHash(3), BlockHash(4)], None);
        assert_eq!(d.changes(), None, "five changes in a journal of four");
        d.reset_journal();
        assert_eq!(d.changes().unwrap().blocks, vec![]);
        d.clear_endpoint(1);
        assert_eq!(
            d.changes(),
            None,
            "a cleared endpoint is not tracked block by block"
        );
    }

    /// Uniform block hashes land two to four to a bucket, so a lookup reads a few pairs.
    #[test]
    fn buckets_hold_a_few_uniform_hashes() {
        for n in [16usize, 100, 1_000, 8_192, 20_000] {
            let mut d = Directory::new(&[n as u32], 4);
            let blocks: Vec<BlockHash> = (0..n as u64)
                .map(|i| BlockHash(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())))
                .collect();
            d.record(0, &blocks, None);
            let s = PublishedState::decode(encode(&header(), &DirectorySection::of(&d))).unwrap();
            let buckets = 1usize << s.section.bits;
            let offsets: Vec<usize> = (0..=buckets)
                .map(|i| u32_at(&s.bytes, s.section.index + 4 * i).unwrap() as usize)
                .collect();
            let mean = n as f64 / buckets as f64;
            let max = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap();
            assert!((2.0..=4.0).contains(&mean), "{n}: mean {mean}");
            assert!(max <= 16, "{n}: fullest bucket {max}");
            for b in &blocks {
                assert_eq!(s.holders(*b), 1);
            }
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut b = MAGIC.to_vec();
            b.extend(bytes);
            let _ = PublishedState::decode(b);
        }

        #[test]
        fn published_lookup_equals_directory(
            ops in prop::collection::vec((0usize..3, prop::collection::vec(0u64..100, 0..20)), 0..30),
            probe in prop::collection::vec(0u64..100, 0..30),
        ) {
            let mut d = Directory::new(&[15, 15, 15], 4);
            for (e, b) in &ops {
                d.record(*e, &b.iter().map(|x| BlockHash(*x)).collect::<Vec<_>>(), Some(*e as u64));
            }
            let s = PublishedState::decode(encode(&header(), &DirectorySection::of(&d))).unwrap();
            let probe: Vec<BlockHash> = probe.into_iter().map(BlockHash).collect();
            prop_assert_eq!(match_lengths(&s, &probe, 3), match_lengths(&d, &probe, 3));
        }

        /// A full snapshot with the overlay of the changes since answers exactly as the live
        /// directory does: blocks added and evicted, sessions moved and forgotten.
        #[test]
        fn snapshot_and_overlay_answer_like_the_directory(
            before in prop::collection::vec((0usize..3, prop::collection::vec(0u64..60, 0..12), prop::option::of(0u64..12)), 0..20),
            after in prop::collection::vec((0usize..3, prop::collection::vec(0u64..60, 0..12), prop::option::of(0u64..12)), 0..20),
        ) {
            let mut d = Directory::new(&[10, 15, 20], 5);
            d.set_journal_capacity(10_000);
            let record = |d: &mut Directory, ops: &[(usize, Vec<u64>, Option<u64>)]| {
                for (e, b, s) in ops {
                    d.record(*e, &b.iter().map(|x| BlockHash(*x)).collect::<Vec<_>>(), *s);
                }
            };
            record(&mut d, &before);
            let base_dir = DirectorySection::of(&d);
            let base = PublishedState::decode(encode(&header(), &base_dir)).unwrap();
            d.reset_journal();
            // Published after every few decisions, each time merging only the changes since the
            // last take, as the singleton does.
            let mut overlay = OverlayBuilder::default();
            for chunk in after.chunks(3) {
                record(&mut d, chunk);
                let c = d.take_changes().unwrap();
                overlay.add(&d, &c);
            }
            let top = PublishedOverlay::decode(encode_overlay(
                7,
                1,
                &d.session_stats().cloned().unwrap_or_default(),
                &DirectorySection::of_overlay(&overlay),
            ))
            .unwrap();
            // The same in one piece.
            let mut one = OverlayBuilder::default();
            one.add(&d, &Changes {
                blocks: overlay.blocks.iter().map(|(h, _)| *h).collect(),
                sessions: overlay.sessions.iter().map(|(s, _)| *s).collect(),
            });
            let whole = DirectorySection::of_overlay(&one);
            prop_assert_eq!(&whole, &DirectorySection::of_overlay(&overlay));
            prop_assert_eq!(top.base, 7);
            // A full publish that follows the overlays merges them into the last full section,
            // and gets the section a snapshot of the directory would.
            prop_assert_eq!(base_dir.merged(&overlay), DirectorySection::of(&d));
            let view = Layered { base: &base, top: Some(&top) };
            for h in 0u64..60 {
                prop_assert_eq!(view.holders(BlockHash(h)), d.holders(BlockHash(h)), "block {}", h);
            }
            for s in 0u64..12 {
                prop_assert_eq!(view.session_endpoint(s), d.session_endpoint(s), "session {}", s);
            }
        }

        /// The bucket index finds every key and no absent one, whatever the key distribution
        /// (uniform, clustered, at the ends of the range: clustered keys fill one bucket, which
        /// is then binary searched).
        #[test]
        fn search_finds_exactly_the_recorded_keys(
            keys in prop::collection::vec(prop_oneof![
                any::<u64>(),
                0u64..64,
                (u64::MAX - 64)..=u64::MAX,
                (1u64 << 40)..(1u64 << 40) + 1000,
            ], 0..400),
            probes in prop::collection::vec(any::<u64>(), 0..50),
        ) {
            let mut d = Directory::new(&[1000, 1000], 4);
            for (i, k) in keys.iter().enumerate() {
                d.record(i % 2, &[BlockHash(*k)], None);
            }
            let s = PublishedState::decode(encode(&header(), &DirectorySection::of(&d))).unwrap();
            for k in keys.iter().chain(&probes) {
                prop_assert_eq!(s.holders(BlockHash(*k)), d.holders(BlockHash(*k)));
            }
        }
    }

    #[test]
    fn report_round_trip_and_rejects_garbage() {
        let r = DecisionReport {
            endpoint: 3,
            session: Some(42),
            blocks: vec![BlockHash(1), BlockHash(u64::MAX)],
        };
        assert_eq!(DecisionReport::decode(&r.encode()), Some(r.clone()));
        let r2 = DecisionReport {
            session: None,
            ..r.clone()
        };
        assert_eq!(DecisionReport::decode(&r2.encode()), Some(r2.clone()));
        let mut b = r2.encode();
        b.pop();
        assert_eq!(DecisionReport::decode(&b), None);
        assert_eq!(DecisionReport::decode(&[]), None);
        let mut batch = r.encode();
        r2.encode_into(&mut batch);
        assert_eq!(
            DecisionReport::decode_batch(&batch),
            (vec![r.clone(), r2.clone()], 0)
        );
        batch.extend_from_slice(&[1, 2, 3]);
        assert_eq!(DecisionReport::decode_batch(&batch), (vec![r, r2], 3));
    }

    #[test]
    fn report_message_round_trip() {
        let r = DecisionReport {
            endpoint: 1,
            session: Some(5),
            blocks: vec![BlockHash(9)],
        };
        let m = encode_report_message(1_234, &r.encode());
        assert_eq!(
            decode_report_message(&m),
            Some((1_234, r.encode().as_slice()))
        );
        assert_eq!(
            DecisionReport::decode_batch(decode_report_message(&m).unwrap().1),
            (vec![r], 0)
        );
        assert_eq!(decode_report_message(&m[..7]), None);
        assert_eq!(decode_report_message(&m[..8]), Some((1_234, &[][..])));
    }

    #[test]
    fn version_round_trip() {
        assert_eq!(
            decode_version(&encode_version(7, 1_234)),
            Some((7, Some(1_234)))
        );
        // The 8-byte form (version only) still reads.
        assert_eq!(decode_version(&9u64.to_le_bytes()), Some((9, None)));
        assert_eq!(decode_version(&[1, 2, 3]), None);
    }

    #[test]
    fn inflight_round_trip() {
        let mut out = Vec::new();
        decode_inflight(&encode_inflight(&[3, -1, 0]), 4, &mut out);
        assert_eq!(out, vec![3, -1, 0, 0]);
    }

    #[test]
    fn the_overlay_bound_grows_with_the_directory_and_the_changes_per_decision() {
        // Short prompts or a small directory: the fixed bound.
        assert_eq!(overlay_bound(8192, 118.0), OVERLAY_MAX_CHANGES);
        assert_eq!(overlay_bound(0, 1000.0), OVERLAY_MAX_CHANGES);
        // The Mooncake trace on 16 engines: about 31k.
        let k = overlay_bound(740_000, 660.0);
        assert!((31_000..31_500).contains(&k), "{k}");
        // Capped, and nothing odd out of bad input.
        assert_eq!(overlay_bound(usize::MAX, 1e9), OVERLAY_CAP_CHANGES);
        assert_eq!(overlay_bound(1000, f64::NAN), OVERLAY_MAX_CHANGES);
        assert_eq!(overlay_bound(1000, -5.0), OVERLAY_MAX_CHANGES);
    }
}
