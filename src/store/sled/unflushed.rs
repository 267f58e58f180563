//! Results written but not yet known durable (`sync = "always"`): a replay of a key listed here waits
//! for the flush that covers its write, so no client is shown a result a crash could take back; every
//! other record is durable and replays at once.

use std::collections::HashMap;

use parking_lot::Mutex;

/// Results written but not yet known durable: store key → (token of the writer, flush sequence number
/// that covers the write, 0 while its compare-and-swap is in progress or after its flush failed).
pub(super) type UnflushedMap = Mutex<HashMap<[u8; 64], (u64, u64)>>;

/// The entry of one `complete` in `Inner::unflushed`. Dropped, it removes the entry if it is still
/// its own (a later writer of the same key — after a purge, or a TTL shorter than a flush — may have
/// replaced it); `keep` leaves it for the replays to settle (its flush failed).
pub(super) struct Unflushed<'a> {
    map: &'a UnflushedMap,
    key: [u8; 64],
    token: u64,
    armed: bool,
}

impl<'a> Unflushed<'a> {
    pub(super) fn new(map: &'a UnflushedMap, key: [u8; 64], token: u64) -> Self {
        map.lock().insert(key, (token, 0));
        Self {
            map,
            key,
            token,
            armed: true,
        }
    }

    pub(super) fn covered_by(&self, seq: u64) {
        self.map.lock().insert(self.key, (self.token, seq));
    }

    /// The flush failed: later replays must wait for one that succeeds (a fresh one, seq 0).
    pub(super) fn keep(mut self) {
        self.map.lock().insert(self.key, (self.token, 0));
        self.armed = false;
    }
}

impl Drop for Unflushed<'_> {
    fn drop(&mut self) {
        if self.armed {
            remove_if(self.map, &self.key, |(t, _)| t == self.token);
        }
    }
}

/// Removes `key` from `map` if its entry passes `mine`.
pub(super) fn remove_if(map: &UnflushedMap, key: &[u8; 64], mine: impl Fn((u64, u64)) -> bool) {
    let mut m = map.lock();
    if m.get(key).is_some_and(|e| mine(*e)) {
        m.remove(key);
    }
}
