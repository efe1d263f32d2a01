//! vLLM's KV cache events (`--kv-events-config`): every change to the prefix cache published on a
//! ZeroMQ PUB socket, as vLLM 0.33 publishes it, for routers that follow each engine's cache from
//! the engine itself (llm-d's precise prefix-cache scorer, Dynamo's KV router).
//!
//! Wire format (vLLM's `ZmqEventPublisher` and `KVEventBatch`, checked against the decoded payloads
//! in `shared/reference/vllm_kv_event_wire_examples.txt`): each message has three frames, the topic,
//! the batch's sequence number (8 bytes, big-endian, from 0) and a msgpack payload
//! `[ts, events, data_parallel_rank]`, `ts` the wall-clock time in seconds; each event is a map
//! tagged by `type`:
//!
//! ```text
//! {type: BlockStored, block_hashes: [bin], parent_block_hash: bin | nil, token_ids: [int],
//!  block_size: int, lora_id: nil, medium: "GPU", lora_name: nil, group_idx: 0,
//!  kv_cache_spec_kind: "full_attention"}
//! {type: BlockRemoved, block_hashes: [bin], medium: "GPU", group_idx: 0}
//! {type: AllBlocksCleared}
//! ```
//!
//! One batch per engine step that changed the cache (and one per prefix-cache reset). A block hash
//! is the engine's 8-byte chained hash, big-endian (vLLM's are 32-byte SHA-256 digests; consumers
//! treat them as opaque keys and recompute their own from `token_ids`); with vLLM's environment
//! variable `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1` it is an unsigned integer instead, as vLLM then
//! sends the low 64 bits of each digest (the form llm-d's guides set, and the only one Dynamo 1.6
//! decodes). Delivery is best effort: the engine loop never waits for the socket, so a full queue
//! drops the batch and counts it (`/emulator/stats` `kv_events_dropped`; vLLM's publisher blocks
//! instead). Sequence numbers count the batches sent. The replay socket (`replay_endpoint`) is not
//! emulated.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use kvroute_engine::engine::KvEvent;
use serde::Deserialize;
use tokio::sync::mpsc;
use zeromq::{Socket as _, SocketSend as _, ZmqMessage};

/// vLLM's `KVEventsConfig`, as `--kv-events-config` takes it (JSON).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct KvEventsConfig {
    /// Publish at all.
    pub enable_kv_cache_events: bool,
    /// `zmq` or `null`.
    pub publisher: String,
    /// Where the PUB socket is (`tcp://*:5557`): a `*`, `::`, `0.0.0.0` or `127.0.0.1` host binds, another
    /// connects.
    pub endpoint: String,
    /// vLLM's replay socket: not emulated (refused when set).
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay (accepted, unused: no replay).
    pub buffer_steps: u64,
    /// ZeroMQ high-water mark (accepted; the socket's own default applies).
    pub hwm: u64,
    /// Batches queued for the socket before new ones are dropped.
    pub max_queue_size: usize,
    /// The first frame of every message.
    pub topic: String,
    /// Block hashes as integers (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`, an environment variable in
    /// vLLM, not a field of its config: [`KvEventsConfig::parse`] reads it).
    #[serde(skip)]
    pub int_block_hashes: bool,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: "null".into(),
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
            int_block_hashes: false,
        }
    }
}

/// vLLM's reading of `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`: `bool(int(value))`; unset or not a
/// number, bytes.
fn int_hashes_from_env() -> bool {
    std::env::var("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|v| v != 0)
}

impl KvEventsConfig {
    /// Parses the flag's JSON; None when events are off (`enable_kv_cache_events` false or the
    /// `null` publisher), an error for what vLLM would refuse or the emulator does not do.
    pub fn parse(json: &str) -> anyhow::Result<Option<Self>> {
        let mut c: Self =
            serde_json::from_str(json).context("--kv-events-config: not valid JSON")?;
        c.int_block_hashes = int_hashes_from_env();
        if !c.enable_kv_cache_events || c.publisher == "null" {
            return Ok(None);
        }
        anyhow::ensure!(
            c.publisher == "zmq",
            "--kv-events-config: unknown publisher {:?} (zmq or null)",
            c.publisher
        );
        anyhow::ensure!(
            c.replay_endpoint.is_none(),
            "--kv-events-config: replay_endpoint is not emulated"
        );
        anyhow::ensure!(
            c.max_queue_size > 0,
            "--kv-events-config: max_queue_size must be positive"
        );
        Ok(Some(c))
    }
}

/// One step's events, on their way to the socket.
#[derive(Debug)]
struct Batch {
    ts: f64,
    events: Vec<KvEvent>,
}

/// The engine loop's end of the publisher: hands batches to the socket's task without waiting.
#[derive(Debug, Clone)]
pub struct KvEventSink {
    tx: mpsc::Sender<Batch>,
    dropped: Arc<AtomicU64>,
}

impl KvEventSink {
    /// Queues a batch (nothing for no events); drops it if the queue is full.
    pub fn publish(&self, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if self.tx.try_send(Batch { ts, events }).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Batches dropped so far (queue full, or the socket's task gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Binds (or connects) the PUB socket and starts its task; returns the sink and the endpoint the
/// socket is on (with the port the system chose, for a `:0` endpoint).
pub async fn start(cfg: &KvEventsConfig) -> anyhow::Result<(KvEventSink, String)> {
    let mut socket = zeromq::PubSocket::new();
    let (host_rest, wildcard) = match cfg.endpoint.strip_prefix("tcp://") {
        Some(rest)
            if rest.starts_with("*:") || rest.starts_with("[::]:") || rest.starts_with(":::") =>
        {
            let port = rest.rsplit(':').next().unwrap_or("5557");
            (format!("tcp://0.0.0.0:{port}"), true)
        }
        _ => (cfg.endpoint.clone(), false),
    };
    let bound = if wildcard || is_local_bind(&cfg.endpoint) {
        socket
            .bind(&host_rest)
            .await
            .with_context(|| format!("--kv-events-config: cannot bind {}", cfg.endpoint))?
            .to_string()
    } else {
        socket
            .connect(&host_rest)
            .await
            .with_context(|| format!("--kv-events-config: cannot connect to {}", cfg.endpoint))?;
        host_rest
    };
    let (tx, mut rx) = mpsc::channel::<Batch>(cfg.max_queue_size);
    let dropped = Arc::new(AtomicU64::new(0));
    let topic = bytes::Bytes::from(cfg.topic.clone().into_bytes());
    let lost = dropped.clone();
    let int_hashes = cfg.int_block_hashes;
    tokio::spawn(async move {
        let mut seq: u64 = 0;
        while let Some(b) = rx.recv().await {
            let mut msg = ZmqMessage::from(topic.clone());
            msg.push_back(bytes::Bytes::copy_from_slice(&seq.to_be_bytes()));
            msg.push_back(bytes::Bytes::from(encode_batch(
                b.ts, &b.events, 0, int_hashes,
            )));
            seq += 1;
            if socket.send(msg).await.is_err() {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok((KvEventSink { tx, dropped }, bound))
}

/// Whether a `tcp://` endpoint names a local address to bind rather than a peer to connect to: the
/// emulator binds loopback and wildcard hosts (vLLM binds only wildcards; a loopback endpoint lets a
/// test pick a free port with `:0`).
fn is_local_bind(endpoint: &str) -> bool {
    endpoint
        .strip_prefix("tcp://")
        .is_some_and(|r| r.starts_with("127.0.0.1:") || r.starts_with("0.0.0.0:"))
}

/// A batch's msgpack payload, `[ts, events, data_parallel_rank]` (module docs).
/// `int_hashes`: block hashes as unsigned integers rather than bytes.
pub fn encode_batch(
    ts: f64,
    events: &[KvEvent],
    data_parallel_rank: u32,
    int_hashes: bool,
) -> Vec<u8> {
    use rmp::encode as m;
    // Writes to a Vec cannot fail.
    let mut w = Vec::with_capacity(64 + events.len() * 32);
    let _ = m::write_array_len(&mut w, 3);
    let _ = m::write_f64(&mut w, ts);
    let _ = m::write_array_len(&mut w, events.len() as u32);
    let hash = |w: &mut Vec<u8>, h: u64| {
        if int_hashes {
            let _ = m::write_uint(w, h);
        } else {
            let _ = m::write_bin(w, &h.to_be_bytes());
        }
    };
    let key = |w: &mut Vec<u8>, k: &str| {
        let _ = m::write_str(w, k);
    };
    for e in events {
        match e {
            KvEvent::Stored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
            } => {
                let _ = m::write_map_len(&mut w, 10);
                key(&mut w, "type");
                key(&mut w, "BlockStored");
                key(&mut w, "block_hashes");
                let _ = m::write_array_len(&mut w, block_hashes.len() as u32);
                for h in block_hashes {
                    hash(&mut w, *h);
                }
                key(&mut w, "parent_block_hash");
                match parent_block_hash {
                    Some(p) => hash(&mut w, *p),
                    None => {
                        let _ = m::write_nil(&mut w);
                    }
                }
                key(&mut w, "token_ids");
                let _ = m::write_array_len(&mut w, token_ids.len() as u32);
                for t in token_ids {
                    let _ = m::write_uint(&mut w, u64::from(*t));
                }
                key(&mut w, "block_size");
                let _ = m::write_uint(&mut w, u64::from(*block_size));
                key(&mut w, "lora_id");
                let _ = m::write_nil(&mut w);
                key(&mut w, "medium");
                key(&mut w, "GPU");
                key(&mut w, "lora_name");
                let _ = m::write_nil(&mut w);
                key(&mut w, "group_idx");
                let _ = m::write_uint(&mut w, 0);
                key(&mut w, "kv_cache_spec_kind");
                key(&mut w, "full_attention");
            }
            KvEvent::Removed { block_hash } => {
                let _ = m::write_map_len(&mut w, 4);
                key(&mut w, "type");
                key(&mut w, "BlockRemoved");
                key(&mut w, "block_hashes");
                let _ = m::write_array_len(&mut w, 1);
                hash(&mut w, *block_hash);
                key(&mut w, "medium");
                key(&mut w, "GPU");
                key(&mut w, "group_idx");
                let _ = m::write_uint(&mut w, 0);
            }
            KvEvent::AllCleared => {
                let _ = m::write_map_len(&mut w, 1);
                key(&mut w, "type");
                key(&mut w, "AllBlocksCleared");
            }
        }
    }
    let _ = m::write_uint(&mut w, u64::from(data_parallel_rank));
    w
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

    #[test]
    fn the_flag_is_vllms_json() {
        assert_eq!(KvEventsConfig::parse("{}").unwrap(), None);
        assert_eq!(
            KvEventsConfig::parse(r#"{"enable_kv_cache_events": true}"#).unwrap(),
            None,
            "the null publisher is vLLM's default"
        );
        let c = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.topic.as_str()),
            ("tcp://*:5557", "kv")
        );
        for bad in [
            "not json",
            r#"{"enable_kv_cache_events": true, "publisher": "kafka"}"#,
            r#"{"enable_kv_cache_events": true, "publisher": "zmq", "replay_endpoint": "tcp://*:5558"}"#,
        ] {
            assert!(KvEventsConfig::parse(bad).is_err(), "{bad}");
        }
    }

    /// The payload of vLLM 0.33's wire example (shared/reference), with the emulator's 8-byte
    /// hashes: the same bytes msgspec writes for that batch.
    #[test]
    fn a_batch_encodes_as_vllm_033_does() {
        let h = u64::from_be_bytes([1; 8]);
        let events = [
            KvEvent::Stored {
                block_hashes: vec![h],
                parent_block_hash: None,
                token_ids: (0..16).collect(),
                block_size: 16,
            },
            KvEvent::Removed { block_hash: h },
            KvEvent::AllCleared,
        ];
        let got = encode_batch(1_700_000_000.5, &events, 0, false);
        // Built by hand from the msgpack spec: fixarray(3), float64, fixarray(3) of fixmaps.
        let mut want = vec![0x93, 0xcb];
        want.extend_from_slice(&1_700_000_000.5f64.to_be_bytes());
        want.push(0x93);
        let s = |v: &mut Vec<u8>, x: &str| {
            v.push(0xa0 | x.len() as u8);
            v.extend_from_slice(x.as_bytes());
        };
        let bin8 = |v: &mut Vec<u8>| {
            v.extend_from_slice(&[0xc4, 8]);
            v.extend_from_slice(&[1; 8]);
        };
        want.push(0x8a);
        s(&mut want, "type");
        s(&mut want, "BlockStored");
        s(&mut want, "block_hashes");
        want.push(0x91);
        bin8(&mut want);
        s(&mut want, "parent_block_hash");
        want.push(0xc0);
        s(&mut want, "token_ids");
        want.push(0xdc);
        want.extend_from_slice(&16u16.to_be_bytes());
        want.extend(0u8..16);
        s(&mut want, "block_size");
        want.push(16);
        s(&mut want, "lora_id");
        want.push(0xc0);
        s(&mut want, "medium");
        s(&mut want, "GPU");
        s(&mut want, "lora_name");
        want.push(0xc0);
        s(&mut want, "group_idx");
        want.push(0);
        s(&mut want, "kv_cache_spec_kind");
        s(&mut want, "full_attention");
        want.push(0x84);
        s(&mut want, "type");
        s(&mut want, "BlockRemoved");
        s(&mut want, "block_hashes");
        want.push(0x91);
        bin8(&mut want);
        s(&mut want, "medium");
        s(&mut want, "GPU");
        s(&mut want, "group_idx");
        want.push(0);
        want.push(0x81);
        s(&mut want, "type");
        s(&mut want, "AllBlocksCleared");
        want.push(0);
        assert_eq!(got, want);
        // With integer hashes each `bin 8` (c4 08 + 8 bytes) becomes a `uint 64` (cf + 8 bytes).
        let ints = encode_batch(1_700_000_000.5, &events, 0, true);
        let mut want_ints = Vec::new();
        let mut i = 0;
        while i < want.len() {
            if want[i..].starts_with(&[0xc4, 8, 1, 1, 1, 1, 1, 1, 1, 1]) {
                want_ints.push(0xcf);
                i += 2;
            } else {
                want_ints.push(want[i]);
                i += 1;
            }
        }
        assert_eq!(ints, want_ints);
    }
}
