//! Large records kept in small pieces, so that sled never writes a blob file.
//!
//! sled 0.34 writes any log item over about 128 KiB (a quarter of a 512 KiB segment) to a file of its
//! own under `blobs/`, and a blob write that fails — `ENOSPC` on a full disk — leaves a hole in its log
//! buffer that makes every later flush wait forever: the store is wedged until the process restarts,
//! and its lock on the data dir with it. A leaf holds up to 16 entries and is rewritten whole now and
//! then, so every value must stay well under 128 KiB / 16. Records are therefore stored inline only up
//! to [`INLINE_MAX`] bytes; a larger completed record is split into [`CHUNK`]-byte pieces in the
//! `chunks` tree, and `records` holds a small stub in its place:
//!
//! ```text
//! stub:   schema version | tag 3 | created_ms u64 | expires_ms u64 | token u64 | length u32
//! chunk:  key = store key (64) ‖ token u64 ‖ index u32  →  up to CHUNK bytes of the encoded record
//! ```
//! `expires_ms` sits where a completed record has it, so the sweeper reads both alike. Chunks are
//! written (and logged) before the compare-and-swap that installs their stub (the store's log is
//! replayed in order, so a stub that survives a crash has its chunks), and deleted after the one that
//! removes it; chunks that no stub points to (a crash in between, a lost race) are dropped as orphans
//! at open.

use super::wal::{Entry, Wal};
use crate::store::{record::SCHEMA_VERSION, DecodeError, StoreError};

/// Largest record stored inline in `records`.
pub(super) const INLINE_MAX: usize = 4096;
/// Size of one chunk.
pub(super) const CHUNK: usize = 4096;
/// The stub's state tag (1 and 2 are the record's own states).
const TAG_CHUNKED: u8 = 3;
const STUB_LEN: usize = 2 + 8 + 8 + 8 + 4;
/// Length of a chunk's key.
pub(super) const CHUNK_KEY_LEN: usize = 64 + 8 + 4;

/// What a stub says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stub {
    pub(super) created_ms: u64,
    pub(super) expires_ms: u64,
    /// The claim token the record was completed under: names its chunks.
    pub(super) token: u64,
    /// Length of the whole encoded record.
    pub(super) len: u32,
}

impl Stub {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STUB_LEN);
        out.extend_from_slice(&[SCHEMA_VERSION, TAG_CHUNKED]);
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.extend_from_slice(&self.token.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The stub in `bytes`, if they are one.
    pub(super) fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != STUB_LEN || bytes[..2] != [SCHEMA_VERSION, TAG_CHUNKED] {
            return None;
        }
        let u64_at = |i: usize| {
            <[u8; 8]>::try_from(&bytes[i..i + 8])
                .ok()
                .map(u64::from_be_bytes)
        };
        Some(Self {
            created_ms: u64_at(2)?,
            expires_ms: u64_at(10)?,
            token: u64_at(18)?,
            len: u32::from_be_bytes(<[u8; 4]>::try_from(&bytes[26..30]).ok()?),
        })
    }

    /// Bytes its chunks take (keys included), for the `max_size` count.
    pub(super) fn chunk_bytes(&self) -> u64 {
        let n = (self.len as usize).div_ceil(CHUNK);
        (self.len as usize + n * CHUNK_KEY_LEN) as u64
    }
}

/// Whether `bytes` are a stub (without parsing all of it).
pub(super) fn is_stub(bytes: &[u8]) -> bool {
    bytes.get(..2) == Some(&[SCHEMA_VERSION, TAG_CHUNKED])
}

fn chunk_key(key: &[u8; 64], token: u64, index: u32) -> [u8; CHUNK_KEY_LEN] {
    let mut k = [0u8; CHUNK_KEY_LEN];
    k[..64].copy_from_slice(key);
    k[64..72].copy_from_slice(&token.to_be_bytes());
    k[72..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The (store key, token) a chunk belongs to.
pub(super) fn owner_of(chunk_key: &[u8]) -> Option<([u8; 64], u64)> {
    if chunk_key.len() != CHUNK_KEY_LEN {
        return None;
    }
    let key = <[u8; 64]>::try_from(&chunk_key[..64]).ok()?;
    let token = u64::from_be_bytes(<[u8; 8]>::try_from(&chunk_key[64..72]).ok()?);
    Some((key, token))
}

/// Writes the chunks of `encoded` for (`key`, `token`), each passed to `log` after sled took it (the
/// store logs them, see `wal`).
pub(super) fn write(
    chunks: &sled::Tree,
    log: &dyn Fn(&Entry<'_>),
    key: &[u8; 64],
    token: u64,
    encoded: &[u8],
) -> Result<(), StoreError> {
    for (i, piece) in encoded.chunks(CHUNK).enumerate() {
        let index = u32::try_from(i).map_err(|_| corrupt("record too large to chunk"))?;
        let k = chunk_key(key, token, index);
        chunks.insert(k, piece)?;
        log(&Entry::Chunk { key: &k, piece });
    }
    Ok(())
}

/// Deletes every chunk of (`key`, `token`) and logs it.
pub(super) fn drop_logged(
    chunks: &sled::Tree,
    wal: &Wal,
    key: &[u8; 64],
    token: u64,
) -> Result<(), StoreError> {
    delete(chunks, key, token)?;
    wal.append(&Entry::DropChunks { key, token });
    Ok(())
}

/// Deletes every chunk of (`key`, `token`).
pub(super) fn delete(chunks: &sled::Tree, key: &[u8; 64], token: u64) -> Result<(), StoreError> {
    let mut prefix = [0u8; 72];
    prefix[..64].copy_from_slice(key);
    prefix[64..].copy_from_slice(&token.to_be_bytes());
    for item in chunks.scan_prefix(prefix) {
        let (k, _) = item?;
        chunks.remove(k)?;
    }
    Ok(())
}

/// Deletes the chunks no stub points to: left by a crash between writing a record's chunks and
/// installing its stub, or between removing a stub and deleting its chunks. Runs when the store opens
/// (before any claim, so no writer is between the two steps).
pub(super) fn drop_orphans(records: &sled::Tree, chunks: &sled::Tree) -> Result<u64, StoreError> {
    let mut dropped = 0;
    let mut last: Option<([u8; 64], u64, bool)> = None;
    for item in chunks.iter() {
        let (k, _) = item?;
        let Some((key, token)) = owner_of(&k) else {
            chunks.remove(&k)?;
            dropped += 1;
            continue;
        };
        let referenced = match last {
            Some((lk, lt, r)) if lk == key && lt == token => r,
            _ => {
                let r = records
                    .get(key)?
                    .and_then(|v| Stub::parse(&v))
                    .is_some_and(|st| st.token == token);
                last = Some((key, token, r));
                r
            }
        };
        if !referenced {
            chunks.remove(&k)?;
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::info!(
            chunks = dropped,
            "dropped chunks of records that were never completed"
        );
    }
    Ok(dropped)
}

/// Reads the whole encoded record a stub stands for.
pub(super) fn read(
    chunks: &sled::Tree,
    key: &[u8; 64],
    stub: &Stub,
) -> Result<Vec<u8>, StoreError> {
    let len = stub.len as usize;
    let mut out = Vec::with_capacity(len);
    let n = len.div_ceil(CHUNK);
    for i in 0..n {
        let index = u32::try_from(i).map_err(|_| corrupt("chunk index"))?;
        let piece = chunks
            .get(chunk_key(key, stub.token, index))?
            .ok_or_else(|| corrupt("a chunk of a large record is missing"))?;
        out.extend_from_slice(&piece);
    }
    if out.len() != len {
        return Err(corrupt("the chunks of a large record do not add up"));
    }
    Ok(out)
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::Corrupt(DecodeError::Corrupt(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_round_trip_and_are_told_apart() {
        let s = Stub {
            created_ms: 1,
            expires_ms: 2,
            token: 3,
            len: 40_000,
        };
        let b = s.encode();
        assert!(is_stub(&b));
        assert_eq!(Stub::parse(&b), Some(s));
        assert_eq!(
            crate::store::Record::peek_lapse(&b),
            Some((None, 2)),
            "the sweeper reads a stub's expiry like a completed record's"
        );
        assert!(Stub::parse(&b[..b.len() - 1]).is_none());
        assert_eq!(s.chunk_bytes(), 40_000 + 10 * CHUNK_KEY_LEN as u64);
    }

    #[test]
    fn chunks_reassemble_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("chunks").unwrap();
        let key = [7u8; 64];
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        write(&tree, &|_| {}, &key, 9, &data).unwrap();
        let stub = Stub {
            created_ms: 0,
            expires_ms: 0,
            token: 9,
            len: data.len() as u32,
        };
        assert_eq!(read(&tree, &key, &stub).unwrap(), data);
        delete(&tree, &key, 9).unwrap();
        assert!(tree.is_empty());
        assert!(
            read(&tree, &key, &stub).is_err(),
            "missing chunks are an error"
        );
    }
}
