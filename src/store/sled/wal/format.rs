//! The bytes of the write-ahead log: segment headers and framed entries.
//!
//! ```text
//! segment:  header (32 bytes) | entry | entry | ... | zeros (preallocated) or stale entries (recycled)
//! header:   magic "IDPWAL\0\x01" | start seq u64 | reserved u64 | crc32 of the 24 bytes before | 0u32
//! entry:    payload length u32 | crc32 of the payload u32 | payload
//! payload:  seq u64 | kind u8 | body
//!   kind 1  record put     store key (64) | value
//!   kind 2  record delete  store key (64)
//!   kind 3  chunk put      chunk key (76) | piece
//!   kind 4  chunks delete  store key (64) | token u64     (every chunk of one stub)
//!   kind 5  token block    block u64                       (fencing tokens, see `Tokens`)
//! ```
//! All integers big-endian. Entries carry consecutive sequence numbers; a reader stops at the first
//! entry whose length is 0 (preallocated zeros), whose checksum fails (a torn write) or whose sequence
//! number is not the next one (what a recycled segment still holds from its earlier use).

use super::super::chunks::CHUNK_KEY_LEN;

/// Length of a segment header.
pub(crate) const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 8] = b"IDPWAL\0\x01";
/// Frame bytes before the payload.
const FRAME_LEN: usize = 8;
/// Largest payload a reader accepts (entries are at most a record of 4 KiB plus a key).
const MAX_PAYLOAD: usize = 1 << 20;

/// One logged change, applied to sled in the same order on recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry<'a> {
    /// `records[key] = value` (`None`: deleted).
    Record {
        /// The store key.
        key: &'a [u8; 64],
        /// The new value.
        value: Option<&'a [u8]>,
    },
    /// `chunks[key] = piece`.
    Chunk {
        /// The chunk key.
        key: &'a [u8; CHUNK_KEY_LEN],
        /// The piece.
        piece: &'a [u8],
    },
    /// Every chunk of (`key`, `token`) deleted.
    DropChunks {
        /// The store key.
        key: &'a [u8; 64],
        /// The stub's token.
        token: u64,
    },
    /// Fencing tokens of this block may be in use.
    TokenBlock(u64),
}

/// Appends the framed `entry` with sequence number `seq` to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, seq: u64, entry: &Entry<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_LEN]);
    out.extend_from_slice(&seq.to_be_bytes());
    match entry {
        Entry::Record { key, value } => {
            out.push(if value.is_some() { 1 } else { 2 });
            out.extend_from_slice(&key[..]);
            if let Some(v) = value {
                out.extend_from_slice(v);
            }
        }
        Entry::Chunk { key, piece } => {
            out.push(3);
            out.extend_from_slice(&key[..]);
            out.extend_from_slice(piece);
        }
        Entry::DropChunks { key, token } => {
            out.push(4);
            out.extend_from_slice(&key[..]);
            out.extend_from_slice(&token.to_be_bytes());
        }
        Entry::TokenBlock(block) => {
            out.push(5);
            out.extend_from_slice(&block.to_be_bytes());
        }
    }
    let payload = &out[start + FRAME_LEN..];
    let len = (payload.len() as u32).to_be_bytes();
    let crc = crc32fast::hash(payload).to_be_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc);
}

/// A segment header starting at `start`.
pub(crate) fn header(start: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&start.to_be_bytes());
    let crc = crc32fast::hash(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_be_bytes());
    h
}

/// The start sequence number of a segment, if `bytes` begin with a valid header.
pub(crate) fn parse_header(bytes: &[u8]) -> Option<u64> {
    let h = bytes.get(..HEADER_LEN)?;
    if &h[..8] != MAGIC || crc32fast::hash(&h[..24]).to_be_bytes() != h[24..28] {
        return None;
    }
    Some(u64::from_be_bytes(h[8..16].try_into().ok()?))
}

/// The entries of one segment's body (after its header), in order, up to the first that is not valid.
/// The caller checks that sequence numbers follow each other.
pub(crate) fn entries(body: &[u8]) -> Entries<'_> {
    Entries { rest: body }
}

/// Iterator returned by [`entries`].
#[derive(Debug)]
pub(crate) struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Entries<'a> {
    type Item = (u64, Entry<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let frame = self.rest.get(..FRAME_LEN)?;
        let len = u32::from_be_bytes(frame[..4].try_into().ok()?) as usize;
        if len == 0 || len > MAX_PAYLOAD {
            return None;
        }
        let payload = self.rest.get(FRAME_LEN..FRAME_LEN + len)?;
        if crc32fast::hash(payload).to_be_bytes() != frame[4..8] {
            return None;
        }
        let decoded = decode(payload);
        if decoded.is_none() {
            self.rest = &[];
        } else {
            self.rest = &self.rest[FRAME_LEN + len..];
        }
        decoded
    }
}

fn decode(p: &[u8]) -> Option<(u64, Entry<'_>)> {
    let seq = u64::from_be_bytes(p.get(..8)?.try_into().ok()?);
    let kind = *p.get(8)?;
    let body = &p[9..];
    let key64 = || <&[u8; 64]>::try_from(body.get(..64)?).ok();
    let entry = match kind {
        1 => Entry::Record {
            key: key64()?,
            value: Some(&body[64..]),
        },
        2 if body.len() == 64 => Entry::Record {
            key: key64()?,
            value: None,
        },
        3 => Entry::Chunk {
            key: <&[u8; CHUNK_KEY_LEN]>::try_from(body.get(..CHUNK_KEY_LEN)?).ok()?,
            piece: &body[CHUNK_KEY_LEN..],
        },
        4 if body.len() == 72 => Entry::DropChunks {
            key: key64()?,
            token: u64::from_be_bytes(body[64..72].try_into().ok()?),
        },
        5 if body.len() == 8 => Entry::TokenBlock(u64::from_be_bytes(body.try_into().ok()?)),
        _ => return None,
    };
    Some((seq, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(u64, Vec<u8>)> {
        let key = [7u8; 64];
        let ck = [9u8; CHUNK_KEY_LEN];
        let entries = [
            Entry::Record {
                key: &key,
                value: Some(b"claim"),
            },
            Entry::Record {
                key: &key,
                value: None,
            },
            Entry::Chunk {
                key: &ck,
                piece: &[1; 4096],
            },
            Entry::DropChunks {
                key: &key,
                token: 42,
            },
            Entry::TokenBlock(5),
            Entry::Record {
                key: &key,
                value: Some(b""),
            },
        ];
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut out = Vec::new();
                encode(&mut out, 10 + i as u64, e);
                (10 + i as u64, out)
            })
            .collect()
    }

    #[test]
    fn entries_round_trip_in_order() {
        let frames = sample();
        let body: Vec<u8> = frames.iter().flat_map(|(_, b)| b.clone()).collect();
        let seqs: Vec<u64> = entries(&body).map(|(s, _)| s).collect();
        assert_eq!(seqs, (10..16).collect::<Vec<_>>());
        let all: Vec<_> = entries(&body).collect();
        assert_eq!(
            all[1].1,
            Entry::Record {
                key: &[7; 64],
                value: None
            }
        );
        assert_eq!(all[4].1, Entry::TokenBlock(5));
        assert_eq!(
            all[5].1,
            Entry::Record {
                key: &[7; 64],
                value: Some(b"")
            },
            "an empty value is not a delete"
        );
    }

    #[test]
    fn a_reader_stops_at_zeros_a_torn_entry_or_garbage() {
        let frames = sample();
        let mut body: Vec<u8> = frames[..2].iter().flat_map(|(_, b)| b.clone()).collect();
        body.extend_from_slice(&[0; 64]);
        body.extend_from_slice(&frames[2].1);
        assert_eq!(entries(&body).count(), 2, "zeros end the segment");

        let mut torn: Vec<u8> = frames.iter().flat_map(|(_, b)| b.clone()).collect();
        let at = frames[0].1.len() + frames[1].1.len() + 100;
        torn[at] ^= 0xff;
        assert_eq!(
            entries(&torn).count(),
            2,
            "a flipped byte fails the checksum"
        );

        let cut: Vec<u8> = frames[0].1[..frames[0].1.len() - 1].to_vec();
        assert_eq!(entries(&cut).count(), 0, "a short entry is not read");
    }

    #[test]
    fn headers_are_checked() {
        let h = header(1234);
        assert_eq!(parse_header(&h), Some(1234));
        let mut bad = h;
        bad[9] ^= 1;
        assert_eq!(parse_header(&bad), None);
        assert_eq!(parse_header(&[0; HEADER_LEN]), None);
    }
}
