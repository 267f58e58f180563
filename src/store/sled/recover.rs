//! Recovery at open: the log's entries after sled's last checkpoint are applied to sled again.
//!
//! sled holds every change up to the cut of its last checkpoint (`meta["wal_applied"]`), durably; it
//! may hold some later ones too, or parts of them (its own log is written when its buffers fill). The
//! log holds every change after the cut that was acknowledged, in the order sled made them, each as
//! the value it left (a put or a delete, never a delta). Applying them in order, from the cut on, gives
//! each key the value of its last logged change: replaying a change sled already has is harmless.
//!
//! The replay stops at the first entry that is torn (checksum), missing (a gap in the sequence
//! numbers) or stale (left in a reused segment). Nothing after a gap was acknowledged: the writer never
//! acknowledges an entry before every entry numbered below it is synced (see `wal`).

use std::path::Path;

use super::{
    checkpoint::{APPLIED, TOKEN_BLOCK},
    chunks,
    wal::{self, entries, Entry, Found, Pool},
};
use crate::store::StoreError;

/// What recovery found.
#[derive(Debug)]
pub(super) struct Recovered {
    /// The log's segments, all free for reuse once sled is flushed and synced.
    pub(super) pool: Pool,
    /// The next sequence number to give out (above every number found anywhere in the log).
    pub(super) next: u64,
    /// The highest fencing-token block recorded (0: none).
    pub(super) block: u64,
}

fn u64_of(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

/// Applies the log at `data_dir` to sled; the caller then records `next - 1` as applied, flushes and
/// syncs before the log's segments are reused.
pub(super) fn recover(
    data_dir: &Path,
    meta: &sled::Tree,
    records: &sled::Tree,
    chunk_tree: &sled::Tree,
) -> Result<Recovered, StoreError> {
    let (pool, found) = Pool::open(&wal::dir(data_dir)).map_err(super::backend_err)?;
    let applied = u64_of(meta.get(APPLIED)?);
    let mut block = u64_of(meta.get(TOKEN_BLOCK)?);
    let (last, replayed, highest) = replay(&found, applied, |entry| {
        match entry {
            Entry::Record {
                key,
                value: Some(v),
            } => {
                records.insert(key, v)?;
            }
            Entry::Record { key, value: None } => {
                records.remove(key)?;
            }
            Entry::Chunk { key, piece } => {
                chunk_tree.insert(key, piece)?;
            }
            Entry::DropChunks { key, token } => chunks::delete(chunk_tree, key, token)?,
            Entry::TokenBlock(b) => block = block.max(b),
        }
        Ok(())
    })?;
    if replayed > 0 {
        tracing::info!(
            entries = replayed,
            from = applied + 1,
            to = last,
            "store log replayed into sled"
        );
    }
    Ok(Recovered {
        pool,
        next: last.max(highest) + 1,
        block,
    })
}

/// Applies the entries after `applied`, in order, up to the first torn, missing or stale one. Returns
/// the last sequence number applied (or `applied`), how many were applied, and the highest sequence
/// number seen anywhere (new numbers must start above it).
fn replay(
    found: &[Found],
    applied: u64,
    mut apply: impl FnMut(Entry<'_>) -> Result<(), StoreError>,
) -> Result<(u64, u64, u64), StoreError> {
    let mut last = applied;
    let mut replayed = 0;
    let mut highest = applied;
    let mut gap = false;
    for seg in found {
        highest = highest.max(seg.start.saturating_sub(1));
        for (expect, (seq, entry)) in (seg.start..).zip(entries(&seg.body)) {
            if seq != expect {
                break; // what the segment held before it was reused
            }
            highest = highest.max(seq);
            if seq <= last || gap {
                continue;
            }
            if seq != last + 1 {
                tracing::error!(
                    missing_from = last + 1,
                    found = seq,
                    "the store's log has a gap: entries after it are not replayed"
                );
                gap = true;
                continue;
            }
            apply(entry)?;
            last = seq;
            replayed += 1;
        }
    }
    Ok((last, replayed, highest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::wal::Entry;

    fn segment(start: u64, seqs: &[u64], key: u8) -> Found {
        let mut body = Vec::new();
        for &s in seqs {
            wal::encode_for_tests(&mut body, s, &Entry::TokenBlock(u64::from(key) * 1000 + s));
        }
        Found { start, body }
    }

    fn run(found: &[Found], applied: u64) -> (Vec<u64>, u64, u64) {
        let mut seen = Vec::new();
        let (last, n, highest) = replay(found, applied, |e| {
            if let Entry::TokenBlock(b) = e {
                seen.push(b % 1000);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(n as usize, seen.len());
        (seen, last, highest)
    }

    #[test]
    fn replays_in_order_from_the_cut_across_segments() {
        let found = [segment(1, &[1, 2, 3], 1), segment(4, &[4, 5], 1)];
        assert_eq!(run(&found, 2), (vec![3, 4, 5], 5, 5));
        assert_eq!(run(&found, 0), (vec![1, 2, 3, 4, 5], 5, 5));
        assert_eq!(run(&found, 5), (vec![], 5, 5));
    }

    #[test]
    fn stale_entries_of_a_reused_segment_end_it() {
        // Reused at 10: new entries 10, 11, then what it held before (3, 4).
        let found = [segment(10, &[10, 11, 3, 4], 1)];
        assert_eq!(run(&found, 9), (vec![10, 11], 11, 11));
    }

    #[test]
    fn a_gap_stops_the_replay_and_new_numbers_go_above_everything() {
        let found = [segment(1, &[1, 2], 1), segment(5, &[5, 6], 1)];
        assert_eq!(run(&found, 0), (vec![1, 2], 2, 6));
    }
}
