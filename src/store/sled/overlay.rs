//! Changes made but not yet applied to sled: claims are decided in memory, and sled is written off the
//! request path.
//!
//! Every change to `records` goes through [`Overlay::swap`]: under the key's shard lock it compares
//! with the key's current value (the overlay's, or else sled's), logs the new value (`wal`) and keeps
//! it here. Reads look here first. The checkpoint thread applies the overlay to sled every
//! [`APPLY_EVERY`] (all but the claims still in flight) and before each checkpoint (everything),
//! one shard at a time under its lock, so sled and the overlay never disagree about a key outside a
//! lock. A key claimed and completed within one interval
//! costs sled one insert (its result) instead of a read and two compare-and-swaps on the request path.
//!
//! ```text
//!   swap(key, expected, new) ── shard lock ──▶ compare ─▶ wal.append ─▶ overlay[key] = new
//!   get(key) ─────────────────▶ overlay[key] ?? sled.get(key)
//!   apply_settled() every 50 ms ─ shard lock ──▶ sled.insert/remove every key but claims in flight
//!   apply() at a checkpoint ──── shard lock ──▶ sled.insert/remove every key ─▶ shard cleared
//! ```
//! Only one process owns the data dir (sled's lock), so a claim decided here is decided for all.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    time::Duration,
};

use parking_lot::{Mutex, MutexGuard};

/// How often the overlay is applied to sled (it holds at most about this much of the write rate).
pub(super) const APPLY_EVERY: Duration = Duration::from_millis(50);

/// Number of shards (and of per-key locks).
const SHARDS: usize = 64;

/// Store keys are two digests: a few of their bytes are a hash already.
#[derive(Debug, Default)]
pub(super) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut b = [0u8; 8];
        let n = bytes.len().min(16).saturating_sub(8);
        b[..n].copy_from_slice(&bytes[8..8 + n]);
        self.0 =
            (self.0.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Key → new value (`None`: deleted) of one shard.
pub(super) type Shard = HashMap<[u8; 64], Option<sled::IVec>, BuildHasherDefault<DigestHasher>>;

/// The changes not yet applied to sled, sharded by the key's first byte.
#[derive(Debug)]
pub(super) struct Overlay {
    shards: [Mutex<Shard>; SHARDS],
}

impl Default for Overlay {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl Overlay {
    /// The shard of `key`, locked: the key's lock for a change.
    pub(super) fn shard(&self, key: &[u8; 64]) -> MutexGuard<'_, Shard> {
        self.shards[usize::from(key[0]) % SHARDS].lock()
    }

    /// The value of `key` if the overlay has one (`Some(None)`: deleted).
    pub(super) fn get(&self, key: &[u8; 64]) -> Option<Option<sled::IVec>> {
        self.shard(key).get(key).cloned()
    }

    /// Applies every change to `records` and empties the overlay; returns how many were applied.
    pub(super) fn apply(&self, records: &sled::Tree) -> Result<usize, sled::Error> {
        self.apply_where(records, |_| true)
    }

    /// Applies the changes that are not claims in flight. A claim usually completes within
    /// milliseconds: left here, its result replaces it in memory and sled gets one insert, where
    /// applying it would cost sled an insert now and a read and an insert at completion. Checkpoints
    /// apply everything.
    pub(super) fn apply_settled(&self, records: &sled::Tree) -> Result<usize, sled::Error> {
        self.apply_where(records, |v| {
            !v.is_some_and(|v| crate::store::record::Record::peek_in_flight(v))
        })
    }

    fn apply_where(
        &self,
        records: &sled::Tree,
        settled: impl Fn(Option<&sled::IVec>) -> bool,
    ) -> Result<usize, sled::Error> {
        let mut n = 0;
        for shard in &self.shards {
            let mut s = shard.lock();
            if s.is_empty() {
                continue;
            }
            let mut failed = None;
            s.retain(|k, v| {
                if failed.is_some() || !settled(v.as_ref()) {
                    return true;
                }
                let r = match v {
                    Some(v) => records.insert(k, v.clone()).map(drop),
                    None => records.remove(k).map(drop),
                };
                match r {
                    Ok(()) => {
                        n += 1;
                        false
                    }
                    Err(e) => {
                        failed = Some(e);
                        true
                    }
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
            if s.capacity() > 4096 && s.len() < 1024 {
                s.shrink_to(1024);
            }
        }
        Ok(n)
    }

    /// Every shard, locked (no change is made meanwhile).
    pub(super) fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(|s| s.lock()).collect()
    }

    /// Changes not yet applied.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_puts_and_deletes_and_empties() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let records = db.open_tree("records").unwrap();
        records.insert([2u8; 64], b"old").unwrap();
        let o = Overlay::default();
        o.shard(&[1; 64])
            .insert([1; 64], Some(sled::IVec::from(b"new")));
        o.shard(&[2; 64]).insert([2; 64], None);
        assert_eq!(o.get(&[2; 64]), Some(None));
        assert_eq!(o.get(&[3; 64]), None);
        assert_eq!(o.apply(&records).unwrap(), 2);
        assert_eq!(o.len(), 0);
        assert_eq!(records.get([1u8; 64]).unwrap().unwrap().as_ref(), b"new");
        assert!(records.get([2u8; 64]).unwrap().is_none());
    }

    #[test]
    fn claims_in_flight_wait_for_their_result_or_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let records = db.open_tree("records").unwrap();
        let claim = [crate::store::record::SCHEMA_VERSION, 1, 0, 0];
        let o = Overlay::default();
        o.shard(&[1; 64])
            .insert([1; 64], Some(sled::IVec::from(&claim[..])));
        o.shard(&[2; 64])
            .insert([2; 64], Some(sled::IVec::from(b"result")));
        assert_eq!(o.apply_settled(&records).unwrap(), 1);
        assert!(records.get([1u8; 64]).unwrap().is_none(), "claim kept back");
        assert_eq!(o.get(&[1; 64]), Some(Some(sled::IVec::from(&claim[..]))));
        assert!(records.get([2u8; 64]).unwrap().is_some());
        assert_eq!(o.apply(&records).unwrap(), 1);
        assert_eq!(
            records.get([1u8; 64]).unwrap().unwrap().as_ref(),
            &claim[..]
        );
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn digest_keys_spread() {
        use std::hash::BuildHasher;
        let b = BuildHasherDefault::<DigestHasher>::default();
        let mut k = [0u8; 64];
        let h1 = b.hash_one(k);
        k[9] = 1;
        assert_ne!(h1, b.hash_one(k));
    }
}
