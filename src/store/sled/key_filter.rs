//! A Bloom filter of the keys that may be in sled's `records`, so that a first-seen key is claimed
//! without reading sled (a read of a missing key costs as much as a write: a walk down sled's tree).
//!
//! It never says "absent" for a key sled has: a key is added under its overlay lock when its first
//! value enters the overlay, before the overlay can be applied to sled (see `overlay`), and a rebuild
//! installs its new filter with every overlay shard locked and adds the keys the overlay holds then,
//! before it walks sled. So under the key's lock, "absent" is exact; a false "maybe" costs one read.
//!
//! Built in the background at open and again whenever it holds more keys than it was sized for (the
//! false-positive rate would climb; deleted keys are never removed, so sweeping leaves them until the
//! next build). While a rebuild runs, the new filter takes inserts and the previous one (complete up
//! to the rebuild's start) answers with it; during the first build at open, every answer is "maybe".

use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use fastbloom::AtomicBloomFilter;

use super::overlay::Overlay;

/// Fewest keys a filter is sized for: about 1.2 MB at 1% false positives. A rebuild walks sled (and
/// pages much of it in), so a store that stays under a million keys never rebuilds after its open.
const MIN_CAPACITY: usize = 1 << 20;
/// Target false-positive rate (a false positive costs one read).
const FALSE_POSITIVES: f64 = 0.01;

#[derive(Debug)]
struct Filter {
    bloom: AtomicBloomFilter,
    capacity: usize,
    inserted: AtomicUsize,
    /// Every key of `records` is in it (the build's walk is done).
    ready: AtomicBool,
    /// Until `ready`: the filter this one replaces, which holds every key added before this one was
    /// installed (dropped once this one is ready).
    previous: ArcSwapOption<Filter>,
}

impl Filter {
    fn new(capacity: usize, previous: Option<Arc<Filter>>) -> Self {
        Self {
            bloom: AtomicBloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(capacity),
            capacity,
            inserted: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            previous: ArcSwapOption::new(previous),
        }
    }
}

/// The filter, swapped whole by each build. Dropping it stops a build and waits for its thread (which
/// holds the database open).
#[derive(Debug)]
pub(super) struct KeyFilter {
    /// Fewest keys a filter is sized for ([`MIN_CAPACITY`]; smaller in tests).
    min: usize,
    current: Arc<ArcSwap<Filter>>,
    building: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for KeyFilter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The filter's hash of a store key (two digests: its first 8 bytes of each are uniform already).
fn hash(key: &[u8; 64]) -> u64 {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[i..i + 8]);
        u64::from_le_bytes(b)
    };
    word(0) ^ word(32).rotate_left(29)
}

impl KeyFilter {
    /// Starts the first build over `records`.
    pub(super) fn open(records: &sled::Tree, overlay: &Arc<Overlay>) -> Self {
        Self::open_sized(records, overlay, MIN_CAPACITY)
    }

    fn open_sized(records: &sled::Tree, overlay: &Arc<Overlay>, min: usize) -> Self {
        let f = Self {
            min,
            current: Arc::new(ArcSwap::from_pointee(Filter::new(min, None))),
            building: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: parking_lot::Mutex::new(None),
        };
        f.rebuild(records, overlay, 0);
        f
    }

    /// Whether `key` may be in `records` ("yes" while the first build runs).
    pub(super) fn may_contain(&self, key: &[u8; 64]) -> bool {
        let f = self.current.load();
        let h = hash(key);
        if f.ready.load(Ordering::Acquire) {
            return f.bloom.contains_hash(h);
        }
        match &*f.previous.load() {
            // Keys added since the rebuild began are in `f`, the others in `previous`.
            Some(prev) => prev.bloom.contains_hash(h) || f.bloom.contains_hash(h),
            None => true,
        }
    }

    /// Adds `key` (under its overlay lock, before it can reach `records`); starts a larger build when
    /// this one is full.
    pub(super) fn insert(&self, key: &[u8; 64], records: &sled::Tree, overlay: &Arc<Overlay>) {
        let f = self.current.load();
        f.bloom.insert_hash(hash(key));
        let n = f.inserted.fetch_add(1, Ordering::Relaxed) + 1;
        if n > f.capacity && f.ready.load(Ordering::Acquire) {
            self.rebuild(records, overlay, n);
        }
    }

    /// Builds a filter for at least twice the keys in `records` (or `hint`) on a thread of its own,
    /// unless a build runs already.
    fn rebuild(&self, records: &sled::Tree, overlay: &Arc<Overlay>, hint: usize) {
        if self.building.swap(true, Ordering::SeqCst) {
            return;
        }
        let min = self.min;
        let (current, building, records, overlay, stop) = (
            Arc::clone(&self.current),
            Arc::clone(&self.building),
            records.clone(),
            Arc::clone(overlay),
            Arc::clone(&self.stop),
        );
        let spawned = std::thread::Builder::new()
            .name("idemproxy-keyfilter".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let count = records.len().max(hint);
                let previous = Some(current.load_full()).filter(|f| f.ready.load(Ordering::Acquire));
                let next = Arc::new(Filter::new((count * 2).max(min), previous));
                // Installed before the walk, with every overlay shard locked: writers insert into it
                // from now on, and the keys already in the overlay (not yet in sled) are added now.
                {
                    let shards = overlay.lock_all();
                    current.store(Arc::clone(&next));
                    for k in shards.iter().flat_map(|s| s.keys()) {
                        next.bloom.insert_hash(hash(k));
                    }
                }
                let mut walked = 0usize;
                for item in records.iter().keys() {
                    let Ok(k) = item.map_err(drop).and_then(|k| {
                        if stop.load(Ordering::Relaxed) {
                            Err(())
                        } else {
                            Ok(k)
                        }
                    }) else {
                        // Left "not ready": every claim reads first, as without a filter.
                        building.store(false, Ordering::SeqCst);
                        return;
                    };
                    if let Ok(k) = <&[u8; 64]>::try_from(k.as_ref()) {
                        next.bloom.insert_hash(hash(k));
                        walked += 1;
                    }
                }
                next.inserted.fetch_add(walked, Ordering::Relaxed);
                next.ready.store(true, Ordering::Release);
                next.previous.store(None);
                building.store(false, Ordering::SeqCst);
                tracing::debug!(keys = walked, capacity = next.capacity, took = ?started.elapsed(), "key filter built");
            });
        match spawned {
            Ok(h) => {
                let old = self.thread.lock().replace(h);
                // The previous build is over (`building` was false); reap its thread.
                if let Some(old) = old {
                    let _ = old.join();
                }
            }
            Err(_) => self.building.store(false, Ordering::SeqCst),
        }
    }

    /// Waits until no build runs (tests).
    #[cfg(test)]
    pub(super) fn wait_ready(&self) {
        while self.building.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filter size that tests can fill quickly.
    const SMALL: usize = 1 << 16;

    fn key(i: u32) -> [u8; 64] {
        let mut k = [0u8; 64];
        let d = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            i.to_be_bytes(),
        ));
        k[..32].copy_from_slice(&d);
        k[32..].copy_from_slice(&d);
        k
    }

    #[test]
    fn never_says_absent_for_a_stored_or_inserted_key_and_grows() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let records = db.open_tree("records").unwrap();
        for i in 0..1000 {
            records.insert(key(i), b"v").unwrap();
        }
        let overlay = Arc::new(Overlay::default());
        let f = KeyFilter::open_sized(&records, &overlay, SMALL);
        f.wait_ready();
        assert!((0..1000).all(|i| f.may_contain(&key(i))));
        let absent = (1000..11_000).filter(|&i| !f.may_contain(&key(i))).count();
        assert!(absent > 9_500, "false positives: {}", 10_000 - absent);
        // Past its capacity it is built again, larger, and still knows every key. As in the store, a
        // key is added under its overlay lock before it can reach `records`.
        for i in 1000..(SMALL as u32 + 5000) {
            let k = key(i);
            let _shard = overlay.shard(&k);
            f.insert(&k, &records, &overlay);
            records.insert(k, b"v").unwrap();
        }
        f.wait_ready();
        assert!(f.current.load().capacity > SMALL);
        assert!((0..SMALL as u32 + 5000).all(|i| f.may_contain(&key(i))));
    }

    #[test]
    fn a_rebuild_answers_with_the_filter_it_replaces() {
        let prev = Arc::new(Filter::new(SMALL, None));
        for i in 0..1000 {
            prev.bloom.insert_hash(hash(&key(i)));
        }
        prev.ready.store(true, Ordering::Release);
        let next = Filter::new(SMALL, Some(prev));
        next.bloom.insert_hash(hash(&key(5000)));
        let f = KeyFilter {
            min: SMALL,
            current: Arc::new(ArcSwap::from_pointee(next)),
            building: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: parking_lot::Mutex::new(None),
        };
        assert!((0..1000).chain([5000]).all(|i| f.may_contain(&key(i))));
        let absent = (10_000..20_000)
            .filter(|&i| !f.may_contain(&key(i)))
            .count();
        assert!(absent > 9_500, "false positives: {}", 10_000 - absent);
    }
}
