//! Changes made but not yet applied to sled: claims are decided in memory, and sled is written off the
//! request path.
//!
//! Every change to `records` goes through [`Overlay::swap`]: under the key's shard lock it compares
//! with the key's current value (the overlay's, or else sled's), logs the new value (`wal`) and keeps
//! it here. Reads look here first. The checkpoint thread applies the overlay to sled every
//! [`APPLY_EVERY`] and before each checkpoint, one shard at a time under its lock, so sled and the
//! overlay never disagree about a key outside a lock. A key claimed and completed within one interval
//! costs sled one insert (its result) instead of a read and two compare-and-swaps on the request path.
//!
//! ```text
//!   swap(key, expected, new) ── shard lock ──▶ compare ─▶ wal.append ─▶ overlay[key] = new
//!   get(key) ─────────────────▶ overlay[key] ?? sled.get(key)
//!   apply() every 50 ms ──────── shard lock ──▶ sled.insert/remove every key ─▶ shard cleared
//! ```
//! Only one process owns the data dir (sled's lock), so a claim decided here is decided for all.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

// Single inserts and whole-shard applies: a panic cannot leave a shard half-changed.
use super::unflushed::lock;

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
        lock(&self.shards[usize::from(key[0]) % SHARDS])
    }

    /// The value of `key` if the overlay has one (`Some(None)`: deleted).
    pub(super) fn get(&self, key: &[u8; 64]) -> Option<Option<sled::IVec>> {
        self.shard(key).get(key).cloned()
    }

    /// Applies every change to `records` and empties the overlay; returns how many were applied.
    pub(super) fn apply(&self, records: &sled::Tree) -> Result<usize, sled::Error> {
        let mut n = 0;
        for shard in &self.shards {
            let mut s = lock(shard);
            if s.is_empty() {
                continue;
            }
            for (k, v) in s.iter() {
                match v {
                    Some(v) => records.insert(k, v.clone())?,
                    None => records.remove(k)?,
                };
            }
            n += s.len();
            s.clear();
            if s.capacity() > 4096 {
                s.shrink_to(1024);
            }
        }
        Ok(n)
    }

    /// Every shard, locked (no change is made meanwhile).
    pub(super) fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(lock).collect()
    }

    /// Changes not yet applied.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
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
    fn digest_keys_spread() {
        use std::hash::BuildHasher;
        let b = BuildHasherDefault::<DigestHasher>::default();
        let mut k = [0u8; 64];
        let h1 = b.hash_one(k);
        k[9] = 1;
        assert_ne!(h1, b.hash_one(k));
    }
}
