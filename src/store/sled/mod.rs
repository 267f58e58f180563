//! The embedded, durable store: sled 0.34 behind a write-ahead log of our own.
//!
//! Trees: `records` (store key → encoded [`Record`]), `chunks` (pieces of large records) and `meta`
//! (schema version, checkpoint marks). Every state change is a compare-and-swap decided in memory
//! under the key's lock (`overlay`): compared with the key's current value (the overlay's, else
//! sled's; a Bloom filter of stored keys spares a first-seen key the read), appended to the log
//! (`wal`), and kept in the overlay, which the checkpoint thread applies to sled off the request path.
//! Durability is the log's: one `fdatasync` of a preallocated segment shared by every write queued
//! meanwhile. sled is flushed only at checkpoints, and `recover` applies the log's tail after a crash.
//!
//! ```text
//!   claim/complete/release ─▶ overlay (key lock) ─▶ wal append ─▶ group fdatasync ─▶ acknowledged
//!                                  └─ every 50 ms: applied to sled ─ checkpoint: sled flush + fsync ─▶ log reused
//! ```
//!
//! Files of this folder, each owning one job:
//! - `open`: opening sled, the log's replay, the filter and the background threads; `ops`: the
//!   `Store` operations; `records`: the key-level primitives they are built on (reads through the
//!   overlay, compare-and-swap, fencing tokens, durability waits);
//! - `wal/`: the log (format, segments, the writer thread and its group commit);
//! - `overlay`: changes not yet applied to sled; `key_filter`: the Bloom filter of stored keys;
//! - `checkpoint`: the thread that applies the overlay and makes sled durable up to a cut of the log;
//!   `recover`: the replay;
//! - `disk_sync`: the `fdatasync`/`fsync` calls sled leaves out (it only `sync_file_range`s), and the
//!   data dir's private permissions;
//! - `unflushed`: results written but not yet durable (a replay waits for their sync);
//! - `size`: the exact byte count of live records behind `[store] max_size`; `space`: the free-disk
//!   guard; `chunks`: large records in pieces; `reopen`: recovery in place after a write error;
//! - `sweep`: the bounded walk that deletes lapsed records.
//!
//! Durability: with `sync = "always"`, `claim`, `complete` and `release` return only once their log
//! entry is synced, and a replay of a result whose sync is still pending waits for it, so a client
//! never sees a result that a crash or a power cut could take back.
//!
//! sled calls are synchronous but short (in-memory tree operations); the syncs run on the log's
//! thread, checkpoints on their own, and the sweep in `spawn_blocking`.

use std::{
    path::Path,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use parking_lot::Mutex;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;

mod checkpoint;
mod chunks;
mod disk_sync;
mod key_filter;
mod open;
mod ops;
mod overlay;
mod records;
mod recover;
mod reopen;
mod size;
mod space;
mod sweep;
#[cfg(test)]
mod tests;
mod unflushed;
mod wal;

use self::{
    checkpoint::{Checkpointer, Parts},
    chunks::{Stub, INLINE_MAX},
    disk_sync::DiskSync,
    key_filter::KeyFilter,
    overlay::Overlay,
    size::{record_size, weigh, Size},
    space::{SpaceGuard, CLAIM_RESERVE, RESULT_RESERVE},
    sweep::{Walk, SWEEP_BATCH},
    unflushed::{remove_if, Unflushed, UnflushedMap},
    wal::{CheckpointSignal, Entry, Wal},
};
use super::{
    retry_after,
    shared_bytes::SharedBytes,
    watch::{LiveOwners, Watchers},
    ClaimOutcome, Committed, Completed, InFlight, KeyWatch, NewResult, Record, Store, StoreError,
    SweepStats,
};
use crate::{
    clock::Clock,
    config::SyncPolicy,
    key::{Fingerprint, StoreKey},
};

/// How the sled store is opened.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// Data directory.
    pub path: std::path::PathBuf,
    /// Durability policy.
    pub sync: SyncPolicy,
    /// Page cache in bytes.
    pub cache_capacity: u64,
    /// Flush interval for `sync = "periodic"`.
    pub periodic_flush: Duration,
    /// `[store] max_size`: bytes of live records beyond which new keys are refused.
    pub max_size: u64,
}

/// The sled store. Cheap to clone (shared inside).
#[derive(Debug, Clone)]
pub struct SledStore {
    shared: Arc<Shared>,
}

/// What outlives one open sled database: the store is reopened in place after a write error (see
/// `reopen`), and claims, watchers and settings carry over.
#[derive(Debug)]
struct Shared {
    /// The open database; `None` while it is being reopened.
    current: ArcSwapOption<Inner>,
    opts: SledOptions,
    clock: Arc<dyn Clock>,
    /// Claims whose owner is alive in this process (see `Inner::live`).
    live: Arc<LiveOwners<(StoreKey, sled::IVec)>>,
    watchers: Arc<Watchers>,
    /// A reopen is under way.
    reopening: std::sync::atomic::AtomicBool,
    /// Called by the flusher when a flush fails: starts a reopen.
    hook: reopen::Hook,
}

/// A claim written but not yet returned to its caller: nothing has acted on it, so if its sync fails
/// or the `claim` call is dropped first (the client went away while the claim waited for its sync),
/// it is taken back, as if it had never been made. A crash before the take-back is durable leaves the
/// claim to its lease, as any claim of a dead owner.
struct TakeBack<'a> {
    inner: &'a Inner,
    key: &'a StoreKey,
    /// The claim as written.
    claim: sled::IVec,
    /// What the key held before (a lapsed record it took over, or nothing).
    before: Option<sled::IVec>,
    token: u64,
    armed: bool,
}

impl TakeBack<'_> {
    /// Puts back what the key held before, if it still holds this claim, and wakes its waiters.
    fn run(&mut self) {
        self.armed = false;
        self.inner.live.remove(self.token);
        // If this write fails, the claim has no live owner any more and ends with its lease.
        let _ = self.inner.cas(
            &self.key.to_bytes(),
            Some(&self.claim),
            self.before.as_ref().map(|b| b.to_vec()),
        );
        self.inner.watchers.notify(self.key);
    }
}

impl Drop for TakeBack<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.run();
        }
    }
}

/// Fencing tokens without a write per claim: the high bits are a block number, the low [`TOKEN_BITS`]
/// bits count claims within it, so every token is larger than all tokens issued before, in this
/// process or an earlier one. A new block (the next number) is taken every 2^TOKEN_BITS claims and
/// logged before any claim uses it; at open the block is above every block logged or checkpointed
/// (`recover`), and above sled's id generator, which earlier versions took blocks from.
#[derive(Debug)]
struct Tokens {
    block: u64,
    used: u64,
}

/// Claims per block of fencing tokens.
const TOKEN_BITS: u32 = 20;

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    /// Schema version, and the `max_size` count saved by a clean shutdown.
    meta: sled::Tree,
    records: sled::Tree,
    /// Pieces of large records (see `chunks`).
    chunks: sled::Tree,
    /// Large records assembled for replays still running, by store key and token.
    assembled: SharedBytes<[u8; 64], u64>,
    /// The sweeper's walk over `records`.
    walk: Mutex<Walk>,
    /// The write-ahead log: durability of every change.
    wal: Arc<Wal>,
    /// Makes sled durable up to a cut of the log, so the log's segments can be reused.
    checkpointer: Checkpointer,
    /// Changes not yet applied to sled (claims are decided in memory, see `overlay`).
    overlay: Arc<Overlay>,
    /// Keys that may be in `records`: a first-seen key is claimed without a read.
    filter: KeyFilter,
    sync: SyncPolicy,
    /// Claims whose owner is alive in this process: token → store key and the claim's stored bytes
    /// (so `complete` and `release` swap them out without reading the record first).
    live: Arc<LiveOwners<(StoreKey, sled::IVec)>>,
    /// Results written but not yet known durable (`sync = "always"`, see [`UnflushedMap`]). A replay
    /// of a key listed here waits for that flush; every other record is durable and replays at once.
    unflushed: UnflushedMap,
    /// Fencing tokens: see [`Tokens`].
    tokens: Mutex<Tokens>,
    /// The token block in use, for checkpoints.
    block: Arc<AtomicU64>,
    /// Bytes of live records, against `max_size`.
    size: Arc<Size>,
    /// Free disk space, checked before each write.
    space: SpaceGuard,
    watchers: Arc<Watchers>,
    clock: Arc<dyn Clock>,
}

fn backend_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend {
        backend: "sled",
        source: Box::new(e),
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        backend_err(e)
    }
}

impl SledStore {
    /// Opens (or creates) the store at `opts.path`. Fails at once if another process has it open.
    pub fn open(opts: &SledOptions, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let live: Arc<LiveOwners<(StoreKey, sled::IVec)>> = Arc::default();
        let watchers: Arc<Watchers> = Arc::default();
        let hook = reopen::Hook::default();
        let inner = Inner::open(
            opts,
            Arc::clone(&live),
            Arc::clone(&watchers),
            Arc::clone(&clock),
            &hook,
        )?;
        let shared = Arc::new(Shared {
            current: ArcSwapOption::from_pointee(inner),
            opts: opts.clone(),
            clock,
            live,
            watchers,
            reopening: std::sync::atomic::AtomicBool::new(false),
            hook,
        });
        shared.hook.arm(&shared);
        Ok(Self { shared })
    }

    /// The open database, or a store error while it is being reopened.
    fn inner(&self) -> Result<Arc<Inner>, StoreError> {
        self.shared.current.load_full().ok_or_else(|| {
            backend_err(std::io::Error::other(
                "the store is being reopened after a write error",
            ))
        })
    }
}

impl SledStore {
    /// Bytes used on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner()?.db.size_on_disk()?)
    }

    /// Group-commit counters.
    pub fn flush_stats(&self) -> wal::FlushStats {
        self.inner().map(|i| i.wal.stats()).unwrap_or_default()
    }

    /// Number of records (live or not yet swept).
    pub fn len(&self) -> usize {
        self.inner()
            .map_or(0, |i| i.apply().map_or(0, |()| i.records.len()))
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Final flush and stop of the flusher thread. Claims still in flight stay in the tree; after their
    /// lease the sweeper (or a retry) takes them over, as after a crash.
    ///
    /// A store whose flush is stuck (sled wedged after an I/O error, see `space`) is left as it is:
    /// its flusher thread is not waited for, and the database is never dropped (sled's drop flushes,
    /// and would block the process's exit forever).
    ///
    /// `clean`: nothing writes any more (every request and detached exchange has ended, the sweeper
    /// and the admin listener are stopped): the `max_size` count is saved for a fast next open.
    pub fn close(&self, clean: bool) {
        let Ok(inner) = self.inner() else { return };
        if inner.stalled().is_some() {
            tracing::error!("the store's flush is stuck: exiting without a final flush");
            inner.leak();
            return;
        }
        if clean {
            if let Err(e) = inner.size.save(&inner.meta) {
                tracing::warn!(error = %e, "could not save the store's size; the next start counts it");
            }
        }
        // The last entries synced, then a last checkpoint: the next open has nothing to replay.
        inner.checkpointer.stop();
        inner.wal.stop();
        if !inner.wal.failed() {
            if let Err(e) = inner.checkpointer.parts.run() {
                tracing::warn!(error = %e, "final checkpoint failed; the next start replays the log");
            }
        }
    }
}

fn backend_err_len(_: std::array::TryFromSliceError) -> StoreError {
    backend_err(std::io::Error::other("record key of unexpected length"))
}

/// Opens the store at `path` with default options (tests, tools).
pub fn open_default(
    path: &Path,
    sync: SyncPolicy,
    clock: Arc<dyn Clock>,
) -> Result<SledStore, StoreError> {
    SledStore::open(
        &SledOptions {
            path: path.to_owned(),
            sync,
            cache_capacity: crate::config::defaults::DEFAULT_CACHE_CAPACITY,
            periodic_flush: crate::config::defaults::DEFAULT_PERIODIC_FLUSH,
            max_size: crate::config::defaults::DEFAULT_MAX_SIZE,
        },
        clock,
    )
}
