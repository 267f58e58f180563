//! `[store] max_size` for sled: the exact size of live records, and the check that refuses a new key
//! once it is reached (503 `store-full`; replays and pass-through go on, and sweeping frees room).
//!
//! A record's size is its store key plus its encoded value (keys, headers, bodies: what a client can
//! make the proxy keep). The count is moved by every compare-and-swap that succeeded, with the exact old
//! and new values it swapped: it cannot drift under races, sweeps or purges. A clean shutdown saves it
//! (`meta["live_bytes"]`, written before the final flush); the next open takes it and deletes it, so
//! a restart is as fast with a million records as with ten. After a crash (no saved count) the open
//! counts every record once instead: exact either way. A claim that would pass `max_size` is refused;
//! a result that would is kept without its body (see `complete`), so the count passes `max_size` by at
//! most the heads of the results in flight.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{key::StoreKey, store::StoreError};

/// Where a clean shutdown leaves the count, in the `meta` tree.
const SAVED: &[u8] = b"live_bytes";

/// Bytes of live records, against the cap.
#[derive(Debug)]
pub(super) struct Size {
    used: AtomicU64,
    max: u64,
}

/// The size counted for a record whose encoded value is `value_len` bytes.
pub(super) fn record_size(value_len: usize) -> u64 {
    (StoreKey::LEN + value_len) as u64
}

impl Size {
    /// The count a clean shutdown saved in `meta` (taken out, so a crash before the next clean
    /// shutdown is noticed), or else a count of `trees`.
    pub(super) fn open(
        meta: &sled::Tree,
        trees: &[&sled::Tree],
        max: u64,
    ) -> Result<Self, StoreError> {
        let saved = meta
            .remove(SAVED)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes);
        match saved {
            Some(used) => Ok(Self {
                used: AtomicU64::new(used),
                max,
            }),
            None => Self::count(trees, max),
        }
    }

    /// Saves the count for the next open (clean shutdown, nothing writes any more).
    pub(super) fn save(&self, meta: &sled::Tree) -> Result<(), StoreError> {
        meta.insert(SAVED, &self.used().to_be_bytes())?;
        Ok(())
    }

    /// Counts the entries of `trees` (one pass over each): records (a key is 64 bytes) and chunks.
    pub(super) fn count(trees: &[&sled::Tree], max: u64) -> Result<Self, StoreError> {
        let mut used = 0u64;
        for tree in trees {
            for item in tree.iter() {
                let (k, v) = item?;
                used = used.saturating_add((k.len() + v.len()) as u64);
            }
        }
        Ok(Self {
            used: AtomicU64::new(used),
            max,
        })
    }

    /// Whether a write that grows the records by `grow` bytes fits; `StoreError::Full` if not.
    pub(super) fn admit(&self, grow: u64) -> Result<(), StoreError> {
        let used = self.used();
        if grow > 0 && used.saturating_add(grow) > self.max {
            return Err(StoreError::Full(format!(
                "{used} of {} bytes in live records",
                self.max
            )));
        }
        Ok(())
    }

    /// A record of `old` bytes (0: none) was replaced by one of `new` bytes (0: deleted).
    pub(super) fn swapped(&self, old: u64, new: u64) {
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

    #[test]
    fn refuses_growth_past_the_cap_and_follows_every_swap() {
        let s = Size {
            used: AtomicU64::new(0),
            max: 1000,
        };
        s.swapped(0, 600);
        assert!(s.admit(400).is_ok());
        assert!(matches!(s.admit(401), Err(StoreError::Full(_))));
        assert!(s.admit(0).is_ok(), "a swap that does not grow always fits");
        s.swapped(600, 100);
        assert_eq!(s.used(), 100);
        s.swapped(100, 0);
        s.swapped(5, 0);
        assert_eq!(s.used(), 0, "never below zero");
    }
}
