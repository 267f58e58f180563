//! Replays of one large record share one copy of its body (contract rule 18), whatever the backend:
//! sled hands out slices of its own buffers, but Redis sends a record again for every retry, so 30
//! slow readers of one 8 MiB replay would each hold a copy until their download ends. A body of at
//! least [`MIN_SHARED`] bytes is shared through [`SharedBytes`] by store key and the record's identity
//! (created time, expiry, length): a later replay of the same record, while one is still being sent,
//! takes that body and drops its own fresh copy at once.

use crate::{
    key::StoreKey,
    store::{shared_bytes::SharedBytes, Completed},
};

/// Bodies smaller than this are not worth a lookup.
pub(crate) const MIN_SHARED: usize = 64 * 1024;

/// The large bodies being replayed now.
pub(crate) type SharedReplays = SharedBytes<StoreKey, (u64, u64, usize)>;

/// `rec` with its body replaced by the copy already being replayed, if there is one.
pub(crate) fn share(replays: &SharedReplays, key: &StoreKey, mut rec: Completed) -> Completed {
    if rec.body.len() < MIN_SHARED {
        return rec;
    }
    let id = (rec.created_ms, rec.expires_ms, rec.body.len());
    let fresh = std::mem::take(&mut rec.body);
    let shared = replays.share(key, id, || Ok::<_, std::convert::Infallible>(fresh));
    rec.body = match shared {
        Ok(b) => b,
        Err(never) => match never {},
    };
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Fingerprint;
    use bytes::Bytes;

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
        let a = share(&s, &key, rec(1, &big));
        let b = share(&s, &key, rec(1, &big));
        assert_eq!(a.body.as_ptr(), b.body.as_ptr(), "one copy");
        let other = share(&s, &key, rec(2, &big));
        assert_ne!(
            a.body.as_ptr(),
            other.body.as_ptr(),
            "another record of the key"
        );
        let small = share(&s, &key, rec(1, b"tiny"));
        assert_eq!(small.body, &b"tiny"[..]);
    }
}
