//! Shared data and shared queues in process memory, with the semantics Envoy gives proxy-wasm
//! VMs (`SharedData`, `SharedQueue`): one place for them, used by the native module's host (behind
//! a lock, for Envoy's threads) and by the in-memory host of the unit tests and the simulator.
//!
//! - a value's CAS token changes on every write; a write with a non-zero token that is not the
//!   current one is a mismatch, a write without one (or to a key not set yet) always lands;
//! - registering a queue name again returns the same id; dequeuing an empty queue finds nothing;
//! - an enqueue beyond the queue's bound fails (Envoy's queues are unbounded; a bound keeps a
//!   stalled reader from growing one without limit).

use std::collections::{HashMap, VecDeque};

/// Shared data and queues; see the module's documentation.
#[derive(Debug, Default)]
pub struct SharedMemory {
    data: HashMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
    queues: Vec<(String, VecDeque<Vec<u8>>)>,
}

impl SharedMemory {
    /// A value and its CAS token.
    pub fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.data.get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    /// A value as it is now, without copying it.
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.data.get(key).map(|(v, _)| v.as_slice())
    }

    /// Writes `value` whatever the key's token (a new token).
    pub fn put(&mut self, key: &str, value: &[u8]) {
        self.last_cas = self.last_cas.wrapping_add(1).max(1);
        self.data
            .insert(key.to_owned(), (value.to_vec(), self.last_cas));
    }

    /// Writes `value` if `cas` is absent, 0, or the key's current token (or the key is not set);
    /// false on a mismatch.
    pub fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        if let (Some(cas), Some((_, current))) = (cas, self.data.get(key)) {
            if cas != 0 && cas != *current {
                return false;
            }
        }
        self.put(key, value);
        true
    }

    /// The id of queue `name`, registering it if new.
    pub fn register_queue(&mut self, name: &str) -> u32 {
        if let Some(id) = self.resolve_queue(name) {
            return id;
        }
        self.queues.push((name.to_owned(), VecDeque::new()));
        self.queues.len() as u32 - 1
    }

    /// The id of queue `name`, if registered.
    pub fn resolve_queue(&self, name: &str) -> Option<u32> {
        self.queues
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| i as u32)
    }

    /// Queues `msg` unless the queue is unknown or holds `bound` messages already.
    pub fn enqueue(&mut self, queue: u32, msg: &[u8], bound: usize) -> bool {
        match self.queues.get_mut(queue as usize) {
            Some((_, q)) if q.len() < bound => {
                q.push_back(msg.to_vec());
                true
            }
            _ => false,
        }
    }

    /// The oldest message of the queue, if any.
    pub fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>> {
        self.queues.get_mut(queue as usize)?.1.pop_front()
    }

    /// Messages waiting in queue `name`.
    pub fn queued(&self, name: &str) -> usize {
        self.queues
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, q)| q.len())
    }

    /// The ids of the queues that hold messages.
    pub fn nonempty_queues(&self) -> Vec<u32> {
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, (_, q))| !q.is_empty())
            .map(|(i, _)| i as u32)
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_token_is_a_mismatch_and_an_unset_key_takes_any_write() {
        let mut m = SharedMemory::default();
        assert!(m.set("k", b"a", Some(7)), "not set yet: lands");
        let (_, t1) = m.get("k");
        assert!(m.set("k", b"b", t1));
        assert!(!m.set("k", b"c", t1), "t1 is stale now");
        assert_eq!(m.value("k").unwrap(), b"b");
        assert!(m.set("k", b"d", Some(0)), "0: no check");
        assert!(m.set("k", b"e", None));
        assert_ne!(m.get("k").1, t1);
    }

    #[test]
    fn queues_are_named_bounded_and_fifo() {
        let mut m = SharedMemory::default();
        let q = m.register_queue("q");
        assert_eq!(m.register_queue("q"), q);
        assert_eq!(m.resolve_queue("q"), Some(q));
        assert_eq!(m.resolve_queue("other"), None);
        assert!(m.enqueue(q, b"1", 2));
        assert!(m.enqueue(q, b"2", 2));
        assert!(!m.enqueue(q, b"3", 2), "full");
        assert!(!m.enqueue(q + 1, b"x", 2), "unknown queue");
        assert_eq!(m.nonempty_queues(), vec![q]);
        assert_eq!(m.dequeue(q).unwrap(), b"1");
        assert_eq!(m.dequeue(q).unwrap(), b"2");
        assert_eq!(m.dequeue(q), None);
        assert_eq!(m.queued("q"), 0);
    }
}
