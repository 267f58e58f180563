//! The free-space guard: sled writes are refused, as a store error, before the disk is full.
//!
//! sled 0.34 does not survive running out of space. A log write that fails with `ENOSPC` poisons the
//! database for good (every later call fails until it is reopened), and a value large enough to go to
//! a blob file whose write fails leaves a hole in sled's log buffer that makes every later `flush`
//! wait forever (and the data dir's lock with it). So the store checks the file system's free space
//! (`statvfs`, read at most every [`REFRESH`]) before each write: a claim needs [`CLAIM_RESERVE`]
//! beyond what it writes, a result [`RESULT_RESERVE`] beyond twice its size (results of requests that
//! already ran take the last room first). Refused writes are 503 `store-unavailable`; reads, replays
//! and pass-through go on, and the store takes writes again by itself once space is freed.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::store::StoreError;

/// Free space a claim leaves untouched: room for sled to finish the log segments it has started
/// (512 KiB each) and for the results of the requests in flight.
pub(super) const CLAIM_RESERVE: u64 = 4 << 20;
/// Free space a result leaves untouched, beyond twice its size (the value, and sled's log entry or
/// blob file for it).
pub(super) const RESULT_RESERVE: u64 = 1 << 20;
/// How long one `statvfs` reading is trusted.
const REFRESH: Duration = Duration::from_millis(1);

/// Free space of the data dir's file system, read at most every [`REFRESH`].
#[derive(Debug)]
pub(super) struct SpaceGuard {
    dir: PathBuf,
    free: AtomicU64,
    /// When `free` was read (unix µs; 0: never).
    read_at: AtomicU64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl SpaceGuard {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            free: AtomicU64::new(0),
            read_at: AtomicU64::new(0),
        }
    }

    /// Bytes free for the proxy's user (`f_bavail`), as of at most [`REFRESH`] ago.
    pub(super) fn free(&self) -> std::io::Result<u64> {
        let now = now_us();
        let at = self.read_at.load(Ordering::Relaxed);
        if at != 0 && now.saturating_sub(at) < REFRESH.as_micros() as u64 {
            return Ok(self.free.load(Ordering::Relaxed));
        }
        let st = rustix::fs::statvfs(&self.dir)?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        self.free.store(free, Ordering::Relaxed);
        self.read_at.store(now, Ordering::Relaxed);
        Ok(free)
    }

    /// Whether a write of about `bytes` may go ahead leaving `reserve` free.
    pub(super) fn admit(&self, bytes: u64, reserve: u64) -> Result<(), StoreError> {
        let free = self.free().map_err(super::backend_err)?;
        let need = bytes.saturating_mul(2).saturating_add(reserve);
        if free < need {
            return Err(super::backend_err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "the disk of {} is (nearly) full: {free} bytes free, {need} needed",
                    self.dir.display()
                ),
            )));
        }
        // What this write takes is not seen by the next reading for up to REFRESH: count it now.
        let _ = self
            .free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_sub(bytes))
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_within_the_free_space_only() {
        let dir = tempfile::tempdir().unwrap();
        let g = SpaceGuard::new(dir.path().to_owned());
        let free = g.free().unwrap();
        assert!(free > 0);
        assert!(g.admit(1, 0).is_ok());
        let e = g.admit(free, 0).unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        assert!(g.admit(0, free.saturating_add(1)).is_err());
    }
}
