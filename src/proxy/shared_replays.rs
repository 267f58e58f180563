//! Replays of one large record share one copy of its body (contract rule 18), whatever the backend.
//!
//! sled hands out a record's bytes as slices of its own buffer, but Redis sends them again for every
//! retry, so 30 slow readers of one 8 MiB replay would each hold a copy until their download ends. The
//! first replay of a body of at least [`MIN_SHARED`] bytes registers it here (by store key and the
//! record's identity: created time, expiry and length); later replays of the same record, while one is
//! still being sent, take that body and drop their own fresh copy at once. Nothing is kept once the
//! last reader is done: the map holds weak references only.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use bytes::Bytes;

use crate::{key::StoreKey, store::Completed};

/// Bodies smaller than this are not worth a lookup.
pub(crate) const MIN_SHARED: usize = 64 * 1024;

/// What identifies one recorded body of one key.
type Identity = (u64, u64, usize);

/// The large bodies being replayed now.
#[derive(Debug, Default)]
pub(crate) struct SharedReplays(Mutex<HashMap<StoreKey, (Identity, Weak<Bytes>)>>);

/// Keeps the shared body alive while a response uses it.
struct Owner(Arc<Bytes>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl SharedReplays {
    /// `rec` with its body replaced by the copy already being replayed, if there is one (else this
    /// copy becomes the shared one).
    pub(crate) fn share(&self, key: &StoreKey, mut rec: Completed) -> Completed {
        if rec.body.len() < MIN_SHARED {
            return rec;
        }
        let id = (rec.created_ms, rec.expires_ms, rec.body.len());
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known, weak)) = map.get(key) {
            if *known == id {
                if let Some(live) = weak.upgrade() {
                    rec.body = Bytes::from_owner(Owner(live));
                    return rec;
                }
            }
        }
        if map.len() >= 256 {
            map.retain(|_, (_, w)| w.strong_count() > 0);
        }
        let shared = Arc::new(std::mem::take(&mut rec.body));
        map.insert(*key, (id, Arc::downgrade(&shared)));
        rec.body = Bytes::from_owner(Owner(shared));
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Fingerprint;

    fn rec(created: u64, body: &[u8]) -> Completed {
        Completed {
            created_ms: created,
            expires_ms: 9,
            fingerprint: Fingerprint([0; 32]),
            status: 200,
            headers: Vec::new(),
            body: Bytes::copy_from_slice(body),
            body_omitted: false,
            seen_only: false,
        }
    }

    #[test]
    fn replays_of_one_record_share_one_body_while_it_is_in_use() {
        let s = SharedReplays::default();
        let key = StoreKey {
            id: [1; 32],
            scope: [2; 32],
        };
        let big = vec![7u8; MIN_SHARED];
        let a = s.share(&key, rec(1, &big));
        let b = s.share(&key, rec(1, &big));
        assert_eq!(a.body.as_ptr(), b.body.as_ptr(), "one copy");
        let other = s.share(&key, rec(2, &big));
        assert_ne!(
            a.body.as_ptr(),
            other.body.as_ptr(),
            "another record of the key"
        );
        drop((a, b, other));
        let small = s.share(&key, rec(1, b"tiny"));
        assert_eq!(small.body, &b"tiny"[..]);
    }
}
