//! The fleet's log: several Envoy replicas share their routing decisions through Redis.
//!
//! `POST /fleet` takes one replica's [`FleetRequest`] and, in one pipelined round trip to Redis:
//! - appends its batch of decision reports to the stream `PREFIX:log:ENDPOINTS:EPOCH` (`XADD`
//!   with fields `r` (replica), `t` (when its oldest report was applied) and `b` (the batch)),
//!   trimmed to about the `keep` entries the replica asked for (`MAXLEN ~`), which is what the
//!   engines' capacity can still hold;
//! - stores its in-flight counts in the hash `PREFIX:inflight:ENDPOINTS` (field: the replica,
//!   value: when, then the counts) and reads the others';
//! - reads the stream after the replica's cursor (`XRANGE`, at most `read_count` entries).
//!
//! It answers a [`FleetResponse`] with the other replicas' entries, the new cursor and the sum of
//! the other replicas' in-flight counts that are younger than `inflight_ttl`. A batch larger than
//! `max_entry_bytes` is refused (counted, and the read still happens). Redis unreachable, slow or
//! failing: 503, counted; the replica keeps its batch and routes on its own directory meanwhile.
//!
//! The client is redis-rs' `ConnectionManager`, connected lazily and reconnecting by itself, with a
//! response timeout so that a slow Redis never holds an exchange for long.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvroute_core::fleet::{self, FleetRequest, StoredEntry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamRangeReply;

/// Where the fleet's log lives and its bounds.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS.
    pub url: String,
    /// PEM file of the CA that signed the Redis server's certificate, for `rediss://` to a server
    /// whose certificate the system's roots do not cover (None: the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// Prefix of every key.
    pub prefix: String,
    /// Largest batch accepted from a replica.
    pub max_entry_bytes: usize,
    /// Most entries returned by one exchange.
    pub read_count: usize,
    /// Most bytes of entries returned by one exchange (at least one entry is returned).
    pub max_response_bytes: usize,
    /// A replica's in-flight counts older than this are not summed.
    pub inflight_ttl: Duration,
    /// How long one Redis round trip may take.
    pub timeout: Duration,
}

impl FleetConfig {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            prefix: "kvroute".into(),
            max_entry_bytes: fleet::MAX_ENTRY_BYTES,
            read_count: fleet::READ_COUNT,
            max_response_bytes: fleet::MAX_RESPONSE_BYTES,
            inflight_ttl: Duration::from_millis(kvroute_core::state::FLEET_INFLIGHT_TTL_MS),
            timeout: Duration::from_millis(250),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetFailure {
    #[error("bad request: {0}")]
    BadRequest(fleet::FleetError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis timed out")]
    Timeout,
}

/// The outcome counted in the sidecar's own stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The batch was too large and not appended (the read still happened).
    Refused,
}

/// The fleet's log in Redis.
#[derive(Clone)]
pub struct FleetLog {
    cfg: FleetConfig,
    conn: ConnectionManager,
}

impl std::fmt::Debug for FleetLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLog")
            .field("prefix", &self.cfg.prefix)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl FleetLog {
    /// A log at `cfg.url`; connects on first use (Redis may be down when the sidecar starts).
    pub fn new(cfg: FleetConfig) -> anyhow::Result<Self> {
        let client = match &cfg.ca_file {
            Some(path) => {
                let root_cert = std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("--redis-ca-file {}: {e}", path.display()))?;
                redis::Client::build_with_tls(
                    cfg.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )?
            }
            None => redis::Client::open(cfg.url.as_str())?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self { cfg, conn })
    }

    /// One exchange: `body` is a [`FleetRequest`]; the answer a [`FleetResponse`].
    pub async fn exchange(&self, body: &[u8]) -> Result<(Vec<u8>, Outcome), FleetFailure> {
        let req = FleetRequest::decode(body).map_err(FleetFailure::BadRequest)?;
        let log_key = format!(
            "{}:log:{:016x}:{}",
            self.cfg.prefix, req.endpoints, req.epoch
        );
        let inflight_key = format!("{}:inflight:{:016x}", self.cfg.prefix, req.endpoints);
        let replica = req.replica.to_string();
        let now = now_ms();
        let mut pipe = redis::pipe();
        let outcome = if req.batch.len() > self.cfg.max_entry_bytes {
            Outcome::Refused
        } else {
            if !req.batch.is_empty() {
                pipe.cmd("XADD")
                    .arg(&log_key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(req.keep.max(1))
                    .arg("*")
                    .arg("r")
                    .arg(&replica)
                    .arg("t")
                    .arg(req.batch_from_ms)
                    .arg("b")
                    .arg(req.batch.as_slice())
                    .ignore();
            }
            Outcome::Ok
        };
        pipe.cmd("HSET")
            .arg(&inflight_key)
            .arg(&replica)
            .arg(fleet::stored_inflight(now, &req.inflight))
            .ignore();
        pipe.cmd("HGETALL").arg(&inflight_key);
        // After the cursor, exclusive ("(" needs Redis 6.2); from the start for a new reader.
        let start = if req.cursor == fleet::START {
            "-".to_owned()
        } else {
            format!("({}", req.cursor)
        };
        pipe.cmd("XRANGE")
            .arg(&log_key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(self.cfg.read_count);
        let mut conn = self.conn.clone();
        let (all_inflight, range): (HashMap<String, Vec<u8>>, StreamRangeReply) =
            tokio::time::timeout(self.cfg.timeout, pipe.query_async(&mut conn))
                .await
                .map_err(|_| FleetFailure::Timeout)??;
        let (resp, stale) = fleet::answer(
            &req,
            now,
            self.cfg.inflight_ttl.as_millis() as u64,
            self.cfg.max_response_bytes,
            all_inflight.iter().map(|(r, v)| (r.as_str(), v.as_slice())),
            range.ids.into_iter().map(|id| StoredEntry {
                replica: id.get("r").unwrap_or_default(),
                from_ms: id.get("t").unwrap_or(0),
                batch: id.get("b").unwrap_or_default(),
                id: id.id,
            }),
        );
        if !stale.is_empty() {
            // Replicas gone for a while: forget their counts (best effort; a failure only leaves
            // them to be skipped again).
            let mut conn = self.conn.clone();
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(&inflight_key).arg(&stale);
            let _ = tokio::time::timeout(self.cfg.timeout, hdel.query_async::<()>(&mut conn)).await;
        }
        Ok((resp.encode(), outcome))
    }
}
