//! An in-memory [`Host`] with Envoy's semantics on a virtual clock: the control plane without a
//! proxy. The unit tests drive it; the simulator runs one per gateway replica.
//!
//! Clones of one [`InMemoryHost`] are VMs of one proxy: they share the shared data (with Envoy's
//! compare-and-swap rules), the queues, the stats (one stat per name, as Envoy merges the VMs'
//! definitions), the clock and the log. Time moves only when its driver moves it. HTTP callouts
//! wait until the driver answers them; the stream whose callback runs is the one the driver set.
//!
//! Shared data and queues are [`SharedMemory`] (Envoy's `SharedData` and `SharedQueue` rules, the
//! same code as the native module's); for tests, the host also plays another VM's interleaved
//! writes and the host's refusals.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use crate::host::{Host, LogLevel, MetricId, MetricKind, SharedSetError};
use crate::memory::SharedMemory;

/// Another VM's write, applied to a key just before this VM's next compare-and-swap on it.
type Interleaved = Box<dyn FnOnce(Option<Vec<u8>>) -> Vec<u8>>;

/// One defined stat.
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: String,
    pub kind: MetricKind,
    /// A counter's total, a gauge's value, or how many values a histogram recorded.
    pub value: i64,
    /// A histogram's recorded values.
    pub samples: Vec<u64>,
}

/// An HTTP callout waiting for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    pub token: u32,
    pub cluster: String,
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// The HTTP stream whose callbacks run: what Envoy holds of it.
#[derive(Debug, Clone, Default)]
pub struct InMemoryStream {
    pub request_headers: Vec<(String, Vec<u8>)>,
    pub request_body: Vec<u8>,
    pub response_headers: Vec<(String, String)>,
    pub response_body: Vec<u8>,
    pub upstream_address: Option<String>,
}

impl InMemoryStream {
    /// A POST to `path` with this JSON body and its content-length.
    pub fn post(path: &str, body: &str) -> Self {
        Self {
            request_headers: vec![
                (":method".into(), b"POST".to_vec()),
                (":path".into(), path.as_bytes().to_vec()),
                ("content-length".into(), body.len().to_string().into_bytes()),
            ],
            request_body: body.as_bytes().to_vec(),
            ..Self::default()
        }
    }

    /// A request header's value, as text.
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.request_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

#[derive(Default)]
struct World {
    now_ns: u64,
    mem: SharedMemory,
    interleaved: HashMap<String, VecDeque<Interleaved>>,
    fail_shared_sets: bool,
    fail_enqueue: bool,
    metrics: Vec<Metric>,
    callouts: Vec<Callout>,
    next_token: u32,
    call_response: Option<(String, Vec<u8>)>,
    tick: Option<Duration>,
    logs: Vec<(LogLevel, String)>,
    stream: InMemoryStream,
    /// Most values a histogram keeps (the rest are counted in `Metric::value` only).
    samples_cap: usize,
}

/// 2026-01-01T00:00:00Z, where [`InMemoryHost::new`]'s clock starts.
pub const START_NS: u64 = 1_767_225_600_000_000_000;

/// An in-memory proxy; see the module's documentation.
#[derive(Clone)]
pub struct InMemoryHost {
    world: Rc<RefCell<World>>,
}

impl std::fmt::Debug for InMemoryHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryHost")
            .field("now_ns", &self.world.borrow().now_ns)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryHost {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryHost {
    /// A proxy whose clock reads 2026-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self::starting_at_ns(START_NS)
    }

    /// A proxy whose clock reads `now_ns` (ns since the epoch).
    pub fn starting_at_ns(now_ns: u64) -> Self {
        let world = World {
            now_ns,
            next_token: 1,
            samples_cap: usize::MAX,
            ..World::default()
        };
        Self {
            world: Rc::new(RefCell::new(world)),
        }
    }

    /// Keeps at most `cap` values per histogram (a long simulation records millions); a
    /// histogram's `value` counts every record.
    pub fn with_samples_cap(self, cap: usize) -> Self {
        self.world.borrow_mut().samples_cap = cap;
        self
    }

    /// Sets the clock (it never goes back).
    pub fn set_now_ns(&self, now_ns: u64) {
        let mut w = self.world.borrow_mut();
        w.now_ns = w.now_ns.max(now_ns);
    }

    pub fn now_ms(&self) -> u64 {
        self.world.borrow().now_ns / 1_000_000
    }

    pub fn advance_ms(&self, ms: u64) {
        self.advance_us(ms * 1000);
    }

    pub fn advance_us(&self, us: u64) {
        self.world.borrow_mut().now_ns += us * 1000;
    }

    /// A shared-data value as it is now.
    pub fn shared(&self, key: &str) -> Option<Vec<u8>> {
        self.world.borrow().mem.value(key).map(<[u8]>::to_vec)
    }

    /// Writes a shared-data value as another VM would (its token changes).
    pub fn put_shared(&self, key: &str, value: &[u8]) {
        self.world.borrow_mut().mem.put(key, value);
    }

    /// Another VM writes `key` (the value `write` makes of the current one) between this VM's
    /// read and its next compare-and-swap on `key`, which then finds a mismatch.
    pub fn interleave(&self, key: &str, write: impl FnOnce(Option<Vec<u8>>) -> Vec<u8> + 'static) {
        self.world
            .borrow_mut()
            .interleaved
            .entry(key.to_owned())
            .or_default()
            .push_back(Box::new(write));
    }

    /// Makes every shared-data write fail (the host refuses it), or stops doing so.
    pub fn fail_shared_sets(&self, fail: bool) {
        self.world.borrow_mut().fail_shared_sets = fail;
    }

    /// Makes every enqueue fail, or stops doing so.
    pub fn fail_enqueue(&self, fail: bool) {
        self.world.borrow_mut().fail_enqueue = fail;
    }

    /// Messages waiting in the queue `name`.
    pub fn queued(&self, name: &str) -> usize {
        self.world.borrow().mem.queued(name)
    }

    /// The id of the queue `name`, if registered.
    pub fn queue_id(&self, name: &str) -> Option<u32> {
        self.world.borrow().mem.resolve_queue(name)
    }

    /// Callouts sent and not yet answered.
    pub fn callouts(&self) -> Vec<Callout> {
        self.world.borrow().callouts.clone()
    }

    /// Takes the newest unanswered callout whose path starts with `path` (the one its sender
    /// waits for: a sender that gave up on an older one sent this one instead).
    pub fn take_callout(&self, path: &str) -> Option<Callout> {
        let mut w = self.world.borrow_mut();
        let i = w.callouts.iter().rposition(|c| c.path.starts_with(path))?;
        Some(w.callouts.remove(i))
    }

    /// Takes every unanswered callout, oldest first.
    pub fn take_callouts(&self) -> Vec<Callout> {
        std::mem::take(&mut self.world.borrow_mut().callouts)
    }

    /// Answers a callout: while `deliver` runs (it calls the context's `on_http_call_response`
    /// with the body's size), the host serves this status and body.
    pub fn answer<R>(&self, status: u16, body: &[u8], deliver: impl FnOnce(usize) -> R) -> R {
        self.world.borrow_mut().call_response = Some((status.to_string(), body.to_vec()));
        let r = deliver(body.len());
        self.world.borrow_mut().call_response = None;
        r
    }

    /// The tick period last set.
    pub fn tick(&self) -> Option<Duration> {
        self.world.borrow().tick
    }

    /// Every stat defined so far.
    pub fn metrics(&self) -> Vec<Metric> {
        self.world.borrow().metrics.clone()
    }

    /// A stat by name.
    pub fn metric(&self, name: &str) -> Option<Metric> {
        let w = self.world.borrow();
        w.metrics.iter().find(|m| m.name == name).cloned()
    }

    /// A counter's total or a gauge's value (0 if never defined).
    pub fn value(&self, name: &str) -> i64 {
        self.metric(name).map_or(0, |m| m.value)
    }

    /// A histogram's recorded values.
    pub fn samples(&self, name: &str) -> Vec<u64> {
        self.metric(name).map(|m| m.samples).unwrap_or_default()
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.world.borrow().logs.clone()
    }

    /// How many log lines contain `text`.
    pub fn logged(&self, text: &str) -> usize {
        self.world
            .borrow()
            .logs
            .iter()
            .filter(|(_, m)| m.contains(text))
            .count()
    }

    /// Sets the stream whose callbacks run next.
    pub fn set_stream(&self, stream: InMemoryStream) {
        self.world.borrow_mut().stream = stream;
    }

    /// The current stream as the callbacks left it.
    pub fn stream(&self) -> InMemoryStream {
        self.world.borrow().stream.clone()
    }

    /// Edits the current stream (a response arriving, a retry's upstream).
    pub fn edit_stream(&self, edit: impl FnOnce(&mut InMemoryStream)) {
        edit(&mut self.world.borrow_mut().stream);
    }
}

impl Host for InMemoryHost {
    fn now_ns(&self) -> u64 {
        self.world.borrow().now_ns
    }

    fn log(&self, level: LogLevel, msg: &str) {
        self.world.borrow_mut().logs.push((level, msg.to_owned()));
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.world.borrow().mem.get(key)
    }

    fn shared_set(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<bool, SharedSetError> {
        let other = if cas.is_some() {
            self.world
                .borrow_mut()
                .interleaved
                .get_mut(key)
                .and_then(VecDeque::pop_front)
        } else {
            None
        };
        if let Some(write) = other {
            let current = self.shared(key);
            self.put_shared(key, &write(current));
        }
        let mut w = self.world.borrow_mut();
        if w.fail_shared_sets {
            return Err(SharedSetError);
        }
        Ok(w.mem.set(key, value, cas))
    }

    fn register_queue(&self, name: &str) -> Option<u32> {
        Some(self.world.borrow_mut().mem.register_queue(name))
    }

    fn resolve_queue(&self, name: &str) -> Option<u32> {
        self.queue_id(name)
    }

    fn enqueue(&self, queue: u32, msg: &[u8]) -> bool {
        let mut w = self.world.borrow_mut();
        if w.fail_enqueue {
            return false;
        }
        w.mem.enqueue(queue, msg, usize::MAX)
    }

    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        self.world.borrow_mut().mem.dequeue(queue)
    }

    fn set_tick(&self, period: Duration) -> bool {
        self.world.borrow_mut().tick = Some(period);
        true
    }

    fn http_call(
        &self,
        cluster: &str,
        _authority: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        _timeout: Duration,
    ) -> Option<u32> {
        let mut w = self.world.borrow_mut();
        let token = w.next_token;
        w.next_token += 1;
        w.callouts.push(Callout {
            token,
            cluster: cluster.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            body: body.map(<[u8]>::to_vec).unwrap_or_default(),
        });
        Some(token)
    }

    fn call_response_status(&self) -> Option<String> {
        self.world
            .borrow()
            .call_response
            .as_ref()
            .map(|(s, _)| s.clone())
    }

    fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
        let w = self.world.borrow();
        let (_, body) = w.call_response.as_ref()?;
        Some(body.get(..size.min(body.len()))?.to_vec())
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> MetricId {
        let mut w = self.world.borrow_mut();
        if let Some(i) = w.metrics.iter().position(|m| m.name == name) {
            return Some(i as u32);
        }
        w.metrics.push(Metric {
            name: name.to_owned(),
            kind,
            value: 0,
            samples: Vec::new(),
        });
        Some(w.metrics.len() as u32 - 1)
    }

    fn increment(&self, id: MetricId, by: i64) {
        let mut w = self.world.borrow_mut();
        if let Some(m) = id.and_then(|i| w.metrics.get_mut(i as usize)) {
            m.value += by;
        }
    }

    fn record(&self, id: MetricId, value: u64) {
        let mut w = self.world.borrow_mut();
        let cap = w.samples_cap;
        if let Some(m) = id.and_then(|i| w.metrics.get_mut(i as usize)) {
            match m.kind {
                MetricKind::Histogram => {
                    m.value += 1;
                    if m.samples.len() < cap {
                        m.samples.push(value);
                    }
                }
                _ => m.value = value as i64,
            }
        }
    }

    fn request_headers(&self) -> Option<Vec<(String, Vec<u8>)>> {
        Some(self.world.borrow().stream.request_headers.clone())
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> bool {
        let mut w = self.world.borrow_mut();
        let headers = &mut w.stream.request_headers;
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            headers.push((name.to_owned(), v.as_bytes().to_vec()));
        }
        true
    }

    fn add_response_header(&self, name: &str, value: &str) -> bool {
        let mut w = self.world.borrow_mut();
        w.stream
            .response_headers
            .push((name.to_owned(), value.to_owned()));
        true
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        let w = self.world.borrow();
        let b = &w.stream.request_body;
        Some(b.get(..size.min(b.len()))?.to_vec())
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        let w = self.world.borrow();
        let b = &w.stream.response_body;
        Some(b.get(..size.min(b.len()))?.to_vec())
    }

    fn upstream_address(&self) -> Option<String> {
        self.world.borrow().stream.upstream_address.clone()
    }
}
