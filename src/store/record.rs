//! Records as stored: the state of one key, and its versioned binary encoding.
//!
//! Layout (all integers big-endian):
//! ```text
//! byte 0   schema version (1)
//! byte 1   state: 1 = in flight, 2 = completed
//! in flight:  token u64 | created_ms u64 | deadline_ms u64 | fingerprint [32]
//! completed:  created_ms u64 | expires_ms u64 | fingerprint [32] | flags u8 (1 = body omitted,
//!             2 = seen only) | status u16 | header count u16 | (name len u16, name, value len u32,
//!             value)* | body len u32 | body
//! ```
//! Decoding checks every length, so a corrupt or truncated record is an error, never a panic. State 3
//! is taken by the sled backend's stub of a large record kept in chunks (see `store::sled::chunks`).

use bytes::Bytes;

use crate::key::Fingerprint;

/// The schema version written into byte 0 of every record.
pub const SCHEMA_VERSION: u8 = 1;

const TAG_IN_FLIGHT: u8 = 1;
const TAG_COMPLETED: u8 = 2;
const FLAG_OMITTED: u8 = 1;
const FLAG_SEEN_ONLY: u8 = 2;

/// The state of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Claimed: a request with this key is being forwarded.
    InFlight(InFlight),
    /// Done: the upstream's answer, replayed until `expires_ms`.
    Completed(Completed),
}

/// A claim on a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Fencing token of the owner; only it may complete or release the claim.
    pub token: u64,
    /// When the claim was made (unix ms).
    pub created_ms: u64,
    /// After this (unix ms) a claim whose owner is gone may be taken over.
    pub deadline_ms: u64,
    /// Fingerprint of the claiming request.
    pub fingerprint: Fingerprint,
}

/// A recorded result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// When the first request was claimed (unix ms).
    pub created_ms: u64,
    /// When the record is forgotten (unix ms).
    pub expires_ms: u64,
    /// Fingerprint of the first request.
    pub fingerprint: Fingerprint,
    /// Upstream status.
    pub status: u16,
    /// Upstream headers, end-to-end only, without `Set-Cookie`.
    pub headers: Vec<(String, Bytes)>,
    /// Upstream body (empty when omitted or seen only).
    pub body: Bytes,
    /// The body was larger than `max_response_body` and was not recorded.
    pub body_omitted: bool,
    /// `store_response = false`: only the fact that the key was seen is kept.
    pub seen_only: bool,
}

impl Record {
    /// Whether the record has lapsed at `now_ms` (a completed record past its TTL, or a claim past its
    /// lease deadline; whether that claim's owner is still alive is for the store to judge).
    pub fn expired_at(&self, now_ms: u64) -> bool {
        match self {
            Record::InFlight(f) => f.deadline_ms <= now_ms,
            Record::Completed(c) => c.expires_ms <= now_ms,
        }
    }

    /// The time (unix ms) at which the record lapses.
    pub fn expiry_ms(&self) -> u64 {
        match self {
            Record::InFlight(f) => f.deadline_ms,
            Record::Completed(c) => c.expires_ms,
        }
    }

    /// Whether encoded bytes are a claim in flight (read without decoding the rest).
    pub fn peek_in_flight(bytes: &[u8]) -> bool {
        bytes.get(..2) == Some(&[SCHEMA_VERSION, TAG_IN_FLIGHT][..])
    }

    /// The sweeper's view of an encoded record, read without decoding the rest: the claim's token
    /// (`None` for a completed record) and the time (unix ms) it lapses. `None` when the bytes are not
    /// a record of this schema (the sweeper leaves those for the admin API).
    pub fn peek_lapse(bytes: &[u8]) -> Option<(Option<u64>, u64)> {
        let at = |i: usize| {
            bytes
                .get(i..i + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
        };
        match bytes.get(..2)? {
            [SCHEMA_VERSION, TAG_IN_FLIGHT] => Some((Some(at(2)?), at(18)?)),
            // 3: the sled backend's stub of a record stored in chunks, with its expiry in the
            // same place as a completed record's.
            [SCHEMA_VERSION, TAG_COMPLETED | 3] => Some((None, at(10)?)),
            _ => None,
        }
    }

    /// Encodes with the current schema version.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(SCHEMA_VERSION);
        match self {
            Record::InFlight(f) => {
                out.push(TAG_IN_FLIGHT);
                out.extend_from_slice(&f.token.to_be_bytes());
                out.extend_from_slice(&f.created_ms.to_be_bytes());
                out.extend_from_slice(&f.deadline_ms.to_be_bytes());
                out.extend_from_slice(&f.fingerprint.0);
            }
            Record::Completed(c) => {
                out.reserve(c.body.len() + 64 * c.headers.len());
                out.push(TAG_COMPLETED);
                out.extend_from_slice(&c.created_ms.to_be_bytes());
                out.extend_from_slice(&c.expires_ms.to_be_bytes());
                out.extend_from_slice(&c.fingerprint.0);
                let flags = if c.body_omitted { FLAG_OMITTED } else { 0 }
                    | if c.seen_only { FLAG_SEEN_ONLY } else { 0 };
                out.push(flags);
                out.extend_from_slice(&c.status.to_be_bytes());
                // Header counts and lengths are bounded by hyper's limits (≤ 100 headers, ≤ 64 KiB),
                // far inside u16/u32; saturate rather than wrap if that ever changes.
                let count = u16::try_from(c.headers.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&count.to_be_bytes());
                for (name, value) in c.headers.iter().take(usize::from(count)) {
                    let n = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
                    out.extend_from_slice(&(n.len() as u16).to_be_bytes());
                    out.extend_from_slice(n);
                    let v = &value[..value.len().min(u32::MAX as usize)];
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                let body = &c.body[..c.body.len().min(u32::MAX as usize)];
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend_from_slice(body);
            }
        }
        out
    }

    /// Decodes a stored record (header values and body are copied out of `bytes`).
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        Self::decode_with(bytes, Bytes::copy_from_slice)
    }

    /// Decodes a stored record whose body (and header values) stay slices of `bytes`: many replays of
    /// one record share its bytes instead of copying them each (contract rule 18).
    pub fn decode_shared(bytes: &Bytes) -> Result<Record, DecodeError> {
        Self::decode_with(bytes, |part| bytes.slice_ref(part))
    }

    fn decode_with(bytes: &[u8], share: impl Fn(&[u8]) -> Bytes) -> Result<Record, DecodeError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != SCHEMA_VERSION {
            return Err(DecodeError::Version(version));
        }
        let rec = match r.u8()? {
            TAG_IN_FLIGHT => Record::InFlight(InFlight {
                token: r.u64()?,
                created_ms: r.u64()?,
                deadline_ms: r.u64()?,
                fingerprint: Fingerprint(r.array()?),
            }),
            TAG_COMPLETED => {
                let created_ms = r.u64()?;
                let expires_ms = r.u64()?;
                let fingerprint = Fingerprint(r.array()?);
                let flags = r.u8()?;
                let status = r.u16()?;
                let count = r.u16()?;
                let mut headers = Vec::with_capacity(usize::from(count).min(128));
                for _ in 0..count {
                    let n = usize::from(r.u16()?);
                    let name = std::str::from_utf8(r.take(n)?)
                        .map_err(|_| DecodeError::Corrupt("header name"))?
                        .to_owned();
                    let v = r.u32()? as usize;
                    headers.push((name, share(r.take(v)?)));
                }
                let n = r.u32()? as usize;
                let body = share(r.take(n)?);
                Record::Completed(Completed {
                    created_ms,
                    expires_ms,
                    fingerprint,
                    status,
                    headers,
                    body,
                    body_omitted: flags & FLAG_OMITTED != 0,
                    seen_only: flags & FLAG_SEEN_ONLY != 0,
                })
            }
            tag => return Err(DecodeError::Tag(tag)),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::Corrupt("trailing bytes"));
        }
        Ok(rec)
    }
}

/// A stored record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Written by a newer (or unknown) schema.
    #[error("unknown record schema version {0}")]
    Version(u8),
    /// Unknown state tag.
    #[error("unknown record state {0}")]
    Tag(u8),
    /// Ended early.
    #[error("record truncated")]
    Truncated,
    /// A field is malformed.
    #[error("corrupt record: {0}")]
    Corrupt(&'static str),
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn completed() -> Record {
        Record::Completed(Completed {
            created_ms: 1,
            expires_ms: 2,
            fingerprint: Fingerprint([7; 32]),
            status: 201,
            headers: vec![(
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            )],
            body: Bytes::from_static(b"{\"ok\":true}"),
            body_omitted: false,
            seen_only: true,
        })
    }

    #[test]
    fn peek_lapse_reads_the_encoded_times() {
        let done = completed();
        let Record::Completed(c) = &done else {
            unreachable!()
        };
        assert_eq!(
            Record::peek_lapse(&done.encode()),
            Some((None, c.expires_ms))
        );
        let claim = Record::InFlight(InFlight {
            token: 7,
            created_ms: 1,
            deadline_ms: 99,
            fingerprint: Fingerprint([0; 32]),
        });
        assert_eq!(Record::peek_lapse(&claim.encode()), Some((Some(7), 99)));
        assert_eq!(Record::peek_lapse(&claim.encode()[..20]), None);
        assert_eq!(Record::peek_lapse(b"\x09\x01"), None);
    }

    #[test]
    fn roundtrip() {
        let f = Record::InFlight(InFlight {
            token: 9,
            created_ms: 3,
            deadline_ms: 4,
            fingerprint: Fingerprint([1; 32]),
        });
        assert_eq!(Record::decode(&f.encode()), Ok(f));
        let c = completed();
        assert_eq!(Record::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = completed().encode();
        for n in 0..bytes.len() {
            assert!(
                Record::decode(&bytes[..n]).is_err(),
                "prefix of {n} bytes decoded"
            );
        }
        let mut v = bytes;
        v[0] = 99;
        assert_eq!(Record::decode(&v), Err(DecodeError::Version(99)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn completed_roundtrips(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..200),
                                omitted: bool, seen: bool, exp: u64) {
            let c = Record::Completed(Completed {
                created_ms: 5, expires_ms: exp, fingerprint: Fingerprint([3; 32]), status,
                headers: vec![("x-a".into(), Bytes::from(body.clone()))],
                body: Bytes::from(body), body_omitted: omitted, seen_only: seen,
            });
            prop_assert_eq!(Record::decode(&c.encode()), Ok(c));
        }
    }
}
