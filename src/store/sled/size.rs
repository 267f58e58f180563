//! `[store] max_size` for sled: the exact size of live records, and the check that refuses a new key
//! once it is reached (503 `store-full`; replays and pass-through go on, and sweeping frees room).
//!
//! A record's size is its store key plus its encoded value, plus the chunks of a large record (keys,
//! headers, bodies: what a client can make the proxy keep). The count is moved by every
//! compare-and-swap that succeeded, with the exact old and new values it swapped: it cannot drift
//! under races, sweeps or purges. A claim that would pass `max_size` is refused; a result that would
//! is kept without its body (see `complete`), so the count passes `max_size` by at most the heads of
//! the results in flight.
//!
//! Across restarts: a clean shutdown saves the count (`meta["live_bytes"]`, written before the final
//! flush) and the next open takes it and deletes it, so a restart is as fast with a million records as
//! with ten. After a crash nothing is saved, and the records are counted again by a background thread
//! while the store already serves (`max_size` is not enforced until it is done, a few seconds for a
//! million records). The count stays exact meanwhile: it walks `records` in key order, a slice at a
//! time under the lock that every compare-and-swap takes while a count runs, and a swap of a key the
//! walk has already passed is added to the count, one of a key still ahead of it is left to the walk.

use std::{
    ops::Bound,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::{Mutex, MutexGuard};

use super::chunks::Stub;
use crate::{key::StoreKey, store::StoreError};

/// Where a clean shutdown leaves the count, in the `meta` tree.
const SAVED: &[u8] = b"live_bytes";

/// Records counted per slice of a background count (the writes wait for one slice at most).
const SLICE: usize = 1024;

/// Bytes of live records, against the cap.
#[derive(Debug)]
pub(super) struct Size {
    used: AtomicU64,
    max: u64,
    /// The count is known (always, but for the time a background count runs after a crash).
    ready: AtomicBool,
    /// While a background count runs: how far it got, and what the writes behind it changed.
    counting: Mutex<Option<Walk>>,
}

/// A background count's progress.
#[derive(Debug, Default)]
struct Walk {
    /// The last key counted (`None`: none yet).
    passed: Option<sled::IVec>,
    /// Bytes added (or removed) by swaps of keys the walk had passed.
    behind: i64,
    /// Bytes counted so far.
    counted: u64,
}

/// A write's hold on the count while a background count runs (see [`Size::write`]).
pub(super) struct Hold<'a>(Option<MutexGuard<'a, Option<Walk>>>);

impl Hold<'_> {
    /// A background count runs: writes go to sled at once (the walk must see them, see `overlay`).
    pub(super) fn counting(&self) -> bool {
        matches!(&self.0, Some(g) if g.is_some())
    }
}

/// The size counted for a record whose encoded value is `value_len` bytes.
pub(super) fn record_size(value_len: usize) -> u64 {
    (StoreKey::LEN + value_len) as u64
}

/// The bytes a stored value stands for: the record, and its chunks if it is a stub.
pub(super) fn weigh(value: &[u8]) -> u64 {
    record_size(value.len()) + Stub::parse(value).map_or(0, |st| st.chunk_bytes())
}

impl Size {
    /// The count a clean shutdown saved in `meta` (taken out, so that a crash before the next clean
    /// shutdown is noticed), 0 for a `fresh` data dir, or else a count of `records` started in the
    /// background.
    pub(super) fn open(
        meta: &sled::Tree,
        records: &sled::Tree,
        fresh: bool,
        max: u64,
    ) -> Result<Arc<Self>, StoreError> {
        let saved = meta
            .remove(SAVED)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .or(fresh.then_some(0));
        let size = Arc::new(Self {
            used: AtomicU64::new(saved.unwrap_or(0)),
            max,
            ready: AtomicBool::new(saved.is_some()),
            counting: Mutex::new(saved.is_none().then(Walk::default)),
        });
        if saved.is_none() {
            let (count, tree) = (Arc::clone(&size), records.clone());
            std::thread::Builder::new()
                .name("idemproxy-count".into())
                .spawn(move || count.count(&tree))
                .map_err(super::backend_err)?;
        }
        Ok(size)
    }

    /// The background count (see the module docs).
    fn count(&self, records: &sled::Tree) {
        let started = std::time::Instant::now();
        loop {
            let mut hold = self.lock();
            let Some(walk) = hold.as_mut() else { return };
            let range = match &walk.passed {
                Some(k) => {
                    records.range::<&[u8], _>((Bound::Excluded(k.as_ref()), Bound::Unbounded))
                }
                None => records.iter(),
            };
            let mut seen = 0;
            for item in range.take(SLICE) {
                match item {
                    Ok((k, v)) => {
                        walk.counted = walk.counted.saturating_add(weigh(&v));
                        walk.passed = Some(k);
                        seen += 1;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "counting the store's records failed; store.max_size is not enforced until a restart");
                        *hold = None;
                        return;
                    }
                }
            }
            if seen < SLICE {
                let total = i128::from(walk.counted) + i128::from(walk.behind);
                self.used.store(
                    u64::try_from(total.max(0)).unwrap_or(u64::MAX),
                    Ordering::SeqCst,
                );
                self.ready.store(true, Ordering::SeqCst);
                *hold = None;
                tracing::info!(
                    bytes = self.used(),
                    took = ?started.elapsed(),
                    "live records counted (store.max_size enforced again)"
                );
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Walk>> {
        self.counting.lock()
    }

    /// Taken by a write around its compare-and-swap: nothing while the count is known; the count's
    /// lock while a background count runs, so that the walk sees the write either before or after it.
    pub(super) fn write(&self) -> Hold<'_> {
        if self.ready.load(Ordering::SeqCst) {
            Hold(None)
        } else {
            Hold(Some(self.lock()))
        }
    }

    /// The value of `key` went from `old` to `new` bytes (0: none), under `hold`.
    pub(super) fn swapped(&self, hold: &mut Hold<'_>, key: &[u8], old: u64, new: u64) {
        if let Some(Some(walk)) = hold.0.as_deref_mut() {
            if walk.passed.as_ref().is_some_and(|p| key <= p.as_ref()) {
                walk.behind += new as i64 - old as i64;
            }
            return;
        }
        if new >= old {
            self.used.fetch_add(new - old, Ordering::Relaxed);
        } else {
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(old - new))
                });
        }
    }

    /// Saves the count for the next open (clean shutdown, nothing writes any more). Nothing is saved
    /// while a background count runs: the next open counts again.
    pub(super) fn save(&self, meta: &sled::Tree) -> Result<(), StoreError> {
        if self.ready.load(Ordering::SeqCst) {
            meta.insert(SAVED, &self.used().to_be_bytes())?;
        }
        Ok(())
    }

    /// Whether a write that grows the records by `grow` bytes fits; `StoreError::Full` if not (always
    /// fits while a background count runs).
    pub(super) fn admit(&self, grow: u64) -> Result<(), StoreError> {
        let used = self.used();
        if grow > 0 && self.is_ready() && used.saturating_add(grow) > self.max {
            return Err(StoreError::Full(format!(
                "{used} of {} bytes in live records",
                self.max
            )));
        }
        Ok(())
    }

    /// Whether the count is known.
    pub(super) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Bytes of live records now.
    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// `[store] max_size`.
    pub(super) fn max(&self) -> u64 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(max: u64) -> Size {
        Size {
            used: AtomicU64::new(0),
            max,
            ready: AtomicBool::new(true),
            counting: Mutex::new(None),
        }
    }

    #[test]
    fn refuses_growth_past_the_cap_and_follows_every_swap() {
        let s = ready(1000);
        s.swapped(&mut s.write(), b"a", 0, 600);
        assert!(s.admit(400).is_ok());
        assert!(matches!(s.admit(401), Err(StoreError::Full(_))));
        assert!(s.admit(0).is_ok(), "a swap that does not grow always fits");
        s.swapped(&mut s.write(), b"a", 600, 100);
        assert_eq!(s.used(), 100);
        s.swapped(&mut s.write(), b"a", 100, 0);
        s.swapped(&mut s.write(), b"b", 5, 0);
        assert_eq!(s.used(), 0, "never below zero");
    }

    /// A background count with writes before and behind the walk comes out exact.
    #[test]
    fn a_background_count_is_exact_under_concurrent_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let records = db.open_tree("records").unwrap();
        let meta = db.open_tree("meta").unwrap();
        let value = |n: usize| vec![1u8; n];
        for i in 0..5000u32 {
            records.insert(i.to_be_bytes(), value(10)).unwrap();
        }
        let size = Size::open(&meta, &records, false, u64::MAX).unwrap();
        // Writes while the count runs: every key is rewritten to 20 bytes, through the hold.
        for i in 0..5000u32 {
            let key = i.to_be_bytes();
            let mut hold = size.write();
            let old = records.insert(key, value(20)).unwrap().unwrap();
            size.swapped(&mut hold, &key, weigh(&old), weigh(&value(20)));
        }
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !size.is_ready() {
            assert!(std::time::Instant::now() < give_up, "the count never ended");
            std::thread::yield_now();
        }
        assert_eq!(size.used(), 5000 * weigh(&value(20)));
    }
}
