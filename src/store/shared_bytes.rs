//! Bytes shared by the concurrent readers of one record (contract rule 18): the first reader's copy is
//! registered under the record's key and identity, and readers that come while it is still in use
//! take it instead of holding a copy of their own. Only weak references are kept: nothing outlives
//! its last reader. Used by the sled backend for records it assembles from chunks, and by the proxy
//! for large replays of any backend (Redis sends a record again for every retry).

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Weak},
};

use parking_lot::Mutex;

use bytes::Bytes;

/// Entries looked at before dead ones are dropped from the map.
const TIDY_AT: usize = 64;

/// Records in use, by key: the identity of the record (which version of the key) and its bytes.
#[derive(Debug)]
pub struct SharedBytes<K, Id>(Mutex<HashMap<K, (Id, Weak<Bytes>)>>);

impl<K, Id> Default for SharedBytes<K, Id> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

/// Keeps the shared bytes alive while a reader's `Bytes` uses them.
struct Owner(Arc<Bytes>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl<K: Hash + Eq + Copy, Id: Eq + Copy> SharedBytes<K, Id> {
    /// The bytes of record `id` of `key` that a reader still holds, or else the ones `fresh` makes
    /// (registered for the readers that come next).
    pub fn share<E>(
        &self,
        key: &K,
        id: Id,
        fresh: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Bytes, E> {
        if let Some(live) = self.live(key, id) {
            return Ok(Bytes::from_owner(Owner(live)));
        }
        let made = Arc::new(fresh()?);
        let mut map = self.0.lock();
        // Another reader may have made it meanwhile: keep one copy.
        if let Some(live) = Self::alive(map.get(key), id) {
            return Ok(Bytes::from_owner(Owner(live)));
        }
        if map.len() >= TIDY_AT {
            map.retain(|_, (_, w)| w.strong_count() > 0);
        }
        map.insert(*key, (id, Arc::downgrade(&made)));
        Ok(Bytes::from_owner(Owner(made)))
    }

    fn live(&self, key: &K, id: Id) -> Option<Arc<Bytes>> {
        let map = self.0.lock();
        Self::alive(map.get(key), id)
    }

    fn alive(entry: Option<&(Id, Weak<Bytes>)>, id: Id) -> Option<Arc<Bytes>> {
        let (known, weak) = entry?;
        (*known == id).then(|| weak.upgrade()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Never = std::convert::Infallible;

    #[test]
    fn readers_of_one_record_share_one_copy_while_it_is_in_use() {
        let s = SharedBytes::<u8, u64>::default();
        let make = || Ok::<_, Never>(Bytes::from(vec![7u8; 1000]));
        let a = s.share(&1, 10, make).unwrap();
        let b = s.share(&1, 10, make).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr(), "one copy");
        let other = s.share(&1, 11, make).unwrap();
        assert_ne!(a.as_ptr(), other.as_ptr(), "another version of the key");
        drop((a, b, other));
        let c = s
            .share(&1, 10, || Ok::<_, Never>(Bytes::from_static(b"new")))
            .unwrap();
        assert_eq!(
            c,
            &b"new"[..],
            "nothing is kept once the last reader is gone"
        );
    }
}
