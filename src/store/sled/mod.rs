//! The embedded, durable store: sled 0.34 behind a write-ahead log of our own.
//!
//! Trees: `records` (store key → encoded [`Record`]), `chunks` (pieces of large records) and `meta`
//! (schema version, checkpoint marks). Every state change is a `compare_and_swap` on `records`, retried
//! from the current value when it loses a race, so two claimers can never both win. A first-seen key
//! is claimed with a read and one compare-and-swap, and its owner completes it with one more
//! (expecting the claim bytes it wrote, no read). Each change is then appended to the log (`wal`),
//! and durability is the log's: one `fdatasync` of a preallocated segment shared by every write
//! queued meanwhile. sled is never flushed on the request path; `checkpoint` flushes it now and then,
//! and `recover` applies the log's tail after a crash.
//!
//! ```text
//!   claim/complete/release ─▶ sled tree (in memory) ─▶ wal append ─▶ group fdatasync ─▶ acknowledged
//!                                        └────────── checkpoint: sled flush + fsync ──▶ log reused
//! ```
//!
//! Files of this folder, each owning one job:
//! - `wal/`: the log (format, segments, the writer thread and its group commit);
//! - `checkpoint`: the thread that makes sled durable up to a cut of the log; `recover`: the replay;
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
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;

mod checkpoint;
mod chunks;
mod disk_sync;
mod key_filter;
mod overlay;
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
    unflushed::{lock, remove_if, Unflushed, UnflushedMap},
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

/// Abandons a claim whose `claim` call was dropped before it returned.
struct AbandonOnDrop<'a> {
    store: &'a SledStore,
    token: u64,
    armed: bool,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.store.abandon(self.token);
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

impl Inner {
    /// Opens the database at `opts.path` (see [`SledStore::open`]).
    fn open(
        opts: &SledOptions,
        live: Arc<LiveOwners<(StoreKey, sled::IVec)>>,
        watchers: Arc<Watchers>,
        clock: Arc<dyn Clock>,
        hook: &reopen::Hook,
    ) -> Result<Self, StoreError> {
        disk_sync::create_private_dir(&opts.path).map_err(backend_err)?;
        let db = sled::Config::new()
            .path(&opts.path)
            .cache_capacity(opts.cache_capacity)
            // Checkpoints are the only flushes (see `checkpoint`).
            .flush_every_ms(None)
            .open()?;
        let meta = db.open_tree("meta")?;
        let fresh = meta.get("schema")?.is_none();
        match meta.get("schema")? {
            None => {
                meta.insert("schema", &[super::record::SCHEMA_VERSION])?;
            }
            Some(v) if v.as_ref() == [super::record::SCHEMA_VERSION] => {}
            Some(v) => {
                return Err(backend_err(std::io::Error::other(format!(
                    "{} was written by an unknown schema version {:?}",
                    opts.path.display(),
                    v.as_ref()
                ))))
            }
        }
        let records = db.open_tree("records")?;
        // Data dirs of earlier builds kept an expiry index; the sweeper's walk replaced it.
        if db.tree_names().iter().any(|n| n.as_ref() == b"expiry") {
            db.drop_tree("expiry")?;
        }
        let chunks = db.open_tree("chunks")?;
        // The log's entries after the last checkpoint, applied again (a crash, a power cut).
        let rec = recover::recover(&opts.path, &meta, &records, &chunks)?;
        chunks::drop_orphans(&records, &chunks)?;
        let size = Size::open(&meta, &records, fresh, opts.max_size)?;
        let block = db.generate_id()?.max(rec.block + 1);
        // Everything replayed (and the saved count's removal) is durable before the log is reused.
        meta.insert(checkpoint::APPLIED, &(rec.next - 1).to_be_bytes())?;
        db.flush()?;
        disk_sync::make_private(&opts.path).map_err(backend_err)?;
        let disk = DiskSync::open(&opts.path).map_err(backend_err)?;
        let every = (opts.sync == SyncPolicy::Periodic).then_some(opts.periodic_flush);
        let claims = Arc::clone(&live);
        let signal = Arc::new(CheckpointSignal::default());
        let wal = Arc::new(
            Wal::start(
                rec.pool,
                rec.next,
                every,
                Box::new(move || claims.len()),
                Arc::clone(&signal),
                hook.callback(),
            )
            .map_err(backend_err)?,
        );
        // Claims of this block are acknowledged only after this entry is synced (it comes first).
        wal.append(&Entry::TokenBlock(block));
        let block_mark = Arc::new(AtomicU64::new(block));
        let overlay = Arc::new(Overlay::default());
        let filter = KeyFilter::open(&records, &overlay);
        let checkpointer = Checkpointer::start(
            Arc::new(Parts {
                db: db.clone(),
                meta: meta.clone(),
                disk: Mutex::new(disk),
                wal: Arc::clone(&wal),
                overlay: Arc::clone(&overlay),
                records: records.clone(),
                block: Arc::clone(&block_mark),
                since: AtomicU64::new(0),
            }),
            signal,
            hook.callback(),
        )
        .map_err(backend_err)?;
        Ok(Inner {
            db,
            meta,
            records,
            chunks,
            assembled: SharedBytes::default(),
            walk: Mutex::new(Walk {
                batch: SWEEP_BATCH,
                ..Walk::default()
            }),
            wal,
            checkpointer,
            overlay,
            filter,
            sync: opts.sync,
            live,
            unflushed: Mutex::default(),
            tokens: Mutex::new(Tokens { block, used: 0 }),
            block: block_mark,
            size,
            space: SpaceGuard::new(opts.path.clone()),
            watchers,
            clock,
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

impl Inner {
    /// Gives up on a database whose flush is stuck: its flusher thread is not waited for and the
    /// database is never dropped (sled's drop flushes, and would block forever).
    fn leak(&self) {
        std::mem::forget(self.db.clone());
        std::mem::forget(self.records.clone());
        std::mem::forget(self.chunks.clone());
        self.checkpointer.detach();
        self.wal.detach();
    }

    /// How long a sync of the log, or a checkpoint, has been stuck (see [`wal::STALL`]).
    fn stalled(&self) -> Option<Duration> {
        self.wal.stalled().or_else(|| self.checkpointer.stalled())
    }

    /// A record that no longer counts: completed past its TTL, or a claim past its lease whose owner is
    /// not alive in this process.
    fn lapsed(&self, rec: &Record, now: u64) -> bool {
        match rec {
            Record::InFlight(f) => f.deadline_ms <= now && !self.live.contains(f.token),
            Record::Completed(c) => c.expires_ms <= now,
        }
    }

    /// Waits until the log entries up to `seq` are durable (no-op with `sync = "periodic"`).
    async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        match self.sync {
            SyncPolicy::Always => self.wal.durable(seq).await,
            SyncPolicy::Periodic => Ok(()),
        }
    }

    /// [`durable`](Self::durable) for a claim's own write (its owner is counted as live).
    async fn durable_claim(&self, seq: u64) -> Result<(), StoreError> {
        match self.sync {
            SyncPolicy::Always => self.wal.durable_claim(seq).await,
            SyncPolicy::Periodic => Ok(()),
        }
    }

    /// The stored claim of `token` (its raw bytes, for the compare-and-swap), or `None` when the
    /// record is no longer that claim (taken over, purged, expired): the token is then stale and no
    /// longer counted as a live owner.
    fn claim_of(
        &self,
        key: &[u8; 64],
        token: u64,
    ) -> Result<Option<(sled::IVec, InFlight)>, StoreError> {
        let cur = self.get(key)?;
        if let Some(bytes) = cur.filter(|b| !chunks::is_stub(b)) {
            if let Record::InFlight(f) = Record::decode(&bytes)? {
                if f.token == token {
                    return Ok(Some((bytes, f)));
                }
            }
        }
        self.live.remove(token);
        Ok(None)
    }

    /// The next fencing token (> 0).
    fn next_token(&self) -> Result<u64, StoreError> {
        let mut t = lock(&self.tokens);
        if t.used == 1 << TOKEN_BITS {
            t.block += 1;
            t.used = 0;
            // Logged before any claim of the block: that claim's sync covers it.
            self.wal.append(&Entry::TokenBlock(t.block));
            self.block
                .store(t.block, std::sync::atomic::Ordering::SeqCst);
        }
        t.used += 1;
        Ok((t.block << TOKEN_BITS) | t.used)
    }

    /// The claim of `token` as this process wrote it (`known`, no read needed: the compare-and-swap that
    /// follows checks it is still there), or else as read from the tree (see `claim_of`).
    fn current_claim(
        &self,
        key: &[u8; 64],
        token: u64,
        known: Option<sled::IVec>,
    ) -> Result<Option<(sled::IVec, InFlight)>, StoreError> {
        if let Some(bytes) = known {
            if let Record::InFlight(f) = Record::decode(&bytes)? {
                return Ok(Some((bytes, f)));
            }
        }
        self.claim_of(key, token)
    }

    /// One compare-and-swap; `Ok(None)` when another writer got there first, else the sequence
    /// number of its log entry.
    fn cas(
        &self,
        key: &[u8; 64],
        old: Option<&sled::IVec>,
        new: Option<Vec<u8>>,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self.swap(key, old, new.map(sled::IVec::from))?.ok())
    }

    /// One compare-and-swap on `records`, decided in memory (see `overlay`), with what follows one
    /// that took effect: its log entry (under the key's lock, so the log has the key's changes in
    /// order), the `max_size` count moved by the exact sizes swapped (chunks included), and the chunks
    /// of a replaced stub deleted. `Ok` holds the log entry's sequence number; the inner `Err` the
    /// current value when another writer got there first.
    fn swap(
        &self,
        key: &[u8; 64],
        old: Option<&sled::IVec>,
        new: Option<sled::IVec>,
    ) -> Result<Result<u64, Option<sled::IVec>>, StoreError> {
        let sizes = (
            old.map_or(0, |v| weigh(v)),
            new.as_ref().map_or(0, |v| weigh(v)),
        );
        let mut shard = self.overlay.shard(key);
        let current = match shard.get(key) {
            Some(v) => v.clone(),
            // Under the key's lock the filter is exact for this key (see `key_filter`).
            None if self.filter.may_contain(key) => self.records.get(key)?,
            None => None,
        };
        if current.as_deref() != old.map(|o| o.as_ref()) {
            return Ok(Err(current));
        }
        if current.is_none() && new.is_some() {
            // Before the key can reach sled (the overlay is applied under this lock).
            self.filter.insert(key, &self.records, &self.overlay);
        }
        let mut hold = self.size.write();
        let seq = self.wal.append(&Entry::Record {
            key,
            value: new.as_deref(),
        });
        if hold.counting() {
            // A background count walks sled: it must see this change now.
            shard.remove(key);
            match &new {
                Some(v) => self.records.insert(key, v.clone())?,
                None => self.records.remove(key)?,
            };
        } else {
            shard.insert(*key, new);
        }
        drop(shard);
        self.size.swapped(&mut hold, key, sizes.0, sizes.1);
        drop(hold);
        if let Some(stub) = old.and_then(|o| Stub::parse(o)) {
            chunks::drop_logged(&self.chunks, &self.wal, key, stub.token)?;
        }
        Ok(Ok(seq))
    }

    /// The current value of `key`: the overlay's, or else sled's (not read when the filter knows the
    /// key was never stored).
    fn get(&self, key: &[u8; 64]) -> Result<Option<sled::IVec>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v);
        }
        if !self.filter.may_contain(key) {
            return Ok(None);
        }
        Ok(self.records.get(key)?)
    }

    /// Applies the overlay to sled (before a walk over `records`).
    fn apply(&self) -> Result<(), StoreError> {
        self.overlay.apply(&self.records)?;
        Ok(())
    }

    /// The sequence number that covers a change of `key` made so far, even one still between its
    /// decision and its log entry (the key's lock waits for that).
    fn covering(&self, key: &[u8; 64]) -> u64 {
        let _shard = self.overlay.shard(key);
        self.wal.appended()
    }

    /// Decodes a stored value: an inline record (its body a slice of sled's buffer), or a stub
    /// whose chunks are assembled once and shared by the replays that read it meanwhile.
    fn read_record(&self, key: &[u8; 64], bytes: &sled::IVec) -> Result<Record, StoreError> {
        let whole = match Stub::parse(bytes) {
            Some(stub) => self.assembled.share(key, stub.token, || {
                chunks::read(&self.chunks, key, &stub).map(bytes::Bytes::from)
            })?,
            None => bytes::Bytes::from_owner(bytes.clone()),
        };
        Ok(Record::decode_shared(&whole)?)
    }
}

/// The operations themselves; the `Store` impl below passes their errors through [`SledStore::settled`].
impl SledStore {
    /// Passes `r` on; a failure that came from sled asks the flusher for a flush, which fails too if
    /// sled is broken and then starts a reopen (see `reopen`). The space guard's refusals are not
    /// sled's and change nothing.
    fn settled<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Backend { source, .. }) = &r {
            if source.downcast_ref::<sled::Error>().is_some() {
                if let Ok(inner) = self.inner() {
                    inner.checkpointer.request();
                }
            }
        }
        r
    }

    async fn do_claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let kb = key.to_bytes();
        // Read first: retries and duplicates (replays, 409s) are answered from the read alone, with no
        // token, no live-owner entry and no failed write; a first-seen key then costs one
        // compare-and-swap expecting what was read. A key sled never had is not read from sled at all
        // (see `key_filter`), and the compare-and-swap is decided in memory (see `overlay`).
        let mut cur = s.get(&kb)?;
        loop {
            let now = s.clock.now_ms();
            let lapsed_stub = cur
                .as_deref()
                .and_then(Stub::parse)
                .is_some_and(|st| st.expires_ms <= now);
            if let Some(bytes) = cur.as_ref().filter(|_| !lapsed_stub) {
                // A replay's body is shared, not copied per replay (see `read_record`).
                let rec = s.read_record(&kb, bytes)?;
                if !s.lapsed(&rec, now) {
                    return Ok(match rec {
                        Record::InFlight(f) => ClaimOutcome::InFlight {
                            fingerprint: f.fingerprint,
                            retry_after: retry_after(f.deadline_ms, now),
                        },
                        Record::Completed(c) => {
                            // A result whose flush is still pending is not replayed before it is
                            // durable: never answer with what a crash could take back. A `complete`
                            // still between its CAS and its sequence number (0) waits for a flush
                            // that starts after this read.
                            if s.sync == SyncPolicy::Always {
                                let pending = lock(&s.unflushed).get(&kb).copied();
                                let waited = match pending {
                                    None => Ok(()),
                                    Some(entry @ (_, seq)) => {
                                        let seq = if seq == 0 { s.covering(&kb) } else { seq };
                                        let r = s.wal.durable(seq).await;
                                        if r.is_ok() {
                                            // Durable now, whoever wrote it: settle a kept entry.
                                            remove_if(&s.unflushed, &kb, |e| e == entry);
                                        }
                                        r
                                    }
                                };
                                // A result that is not durable is not replayed (rule 14: only
                                // durable results are acknowledged); the retry gets a store error
                                // and comes back once the store works again.
                                waited?;
                            }
                            ClaimOutcome::Completed(c)
                        }
                    });
                }
            }
            let token = s.next_token()?;
            let rec = Record::InFlight(InFlight {
                token,
                created_ms: now,
                deadline_ms: now.saturating_add(lease.as_millis() as u64),
                fingerprint: fp,
            });
            let encoded = sled::IVec::from(rec.encode());
            // `max_size`: only a claim that grows the store is refused (a takeover of a lapsed
            // record of at least its size is not).
            let sizes = (
                cur.as_ref().map_or(0, |c| record_size(c.len())),
                record_size(encoded.len()),
            );
            s.size.admit(sizes.1.saturating_sub(sizes.0))?;
            s.space.admit(sizes.1, CLAIM_RESERVE)?;
            // Live before it is written: the sweeper must never see this claim without its owner
            // (with a lease of a few ms it could otherwise delete it as lapsed).
            s.live.insert(token, (*key, encoded.clone()));
            let swapped = s.swap(&kb, cur.as_ref(), Some(encoded.clone()));
            let seq = match swapped {
                Ok(Ok(seq)) => seq,
                Ok(Err(current)) => {
                    s.live.remove(token);
                    cur = current; // a record exists, or changed since it was read: look at it
                    continue;
                }
                Err(e) => {
                    s.live.remove(token);
                    return Err(e);
                }
            };
            // If this future is dropped while it waits (the client went away), the claim must not
            // stay "owned by a live process" forever: the guard abandons it to its lease.
            let mut guard = AbandonOnDrop {
                store: self,
                token,
                armed: true,
            };
            let durable = s.durable_claim(seq).await;
            guard.armed = false;
            if let Err(e) = durable {
                // Not durable: take the claim back so the client's retry is not refused for a lease.
                s.live.remove(token);
                let _ = s.cas(&kb, Some(&encoded), cur.map(|c| c.to_vec()));
                s.watchers.notify(key);
                return Err(e);
            }
            return Ok(ClaimOutcome::Claimed { token });
        }
    }

    async fn do_complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let kb = key.to_bytes();
        let mut known = s.live.get(token).map(|(_, bytes)| bytes);
        loop {
            let Some((cur, f)) = s.current_claim(&kb, token, known.take())? else {
                return Ok(Committed::Stale);
            };
            let rec = Record::Completed(Completed {
                created_ms: f.created_ms,
                expires_ms: s.clock.now_ms().saturating_add(ttl.as_millis() as u64),
                fingerprint: f.fingerprint,
                status: result.status,
                headers: result.headers.clone(),
                body: result.body.clone(),
                body_omitted: result.body_omitted,
                seen_only: result.seen_only,
            });
            let mut encoded = rec.encode();
            // `max_size` is checked on claims; a result that would still take the store past it is
            // kept without its body (its replays say `Idempotency-Replay: omitted`, as for a body
            // over `max_response_body`): the request never runs twice, and the store stays bounded
            // by `max_size` plus the heads of the results in flight.
            let grow = record_size(encoded.len()).saturating_sub(record_size(cur.len()));
            let rec = match (s.size.admit(grow), rec) {
                (Err(_), Record::Completed(mut c)) if !c.body.is_empty() => {
                    tracing::warn!(
                        bytes = c.body.len(),
                        "store.max_size reached: result recorded without its body"
                    );
                    c.body = bytes::Bytes::new();
                    c.body_omitted = true;
                    let rec = Record::Completed(c);
                    encoded = rec.encode();
                    rec
                }
                (_, rec) => rec,
            };
            s.space.admit(record_size(encoded.len()), RESULT_RESERVE)?;
            // A large record goes to chunks, behind a stub (see `chunks`: sled must never write a
            // blob). The chunks are written first; if the stub is not installed they are deleted.
            let chunked = encoded.len() > INLINE_MAX;
            if chunked {
                let stub = Stub {
                    created_ms: f.created_ms,
                    expires_ms: rec.expiry_ms(),
                    token,
                    len: u32::try_from(encoded.len())
                        .map_err(|_| backend_err(std::io::Error::other("record over 4 GiB")))?,
                };
                chunks::write(
                    &s.chunks,
                    &|e| {
                        s.wal.append(e);
                    },
                    &kb,
                    token,
                    &encoded,
                )?;
                encoded = stub.encode();
            }
            // Listed as unflushed before the CAS, so a replay that sees the result also sees the
            // entry; removed (by the guard) once the flush returned, or if this write did not happen.
            let pending =
                (s.sync == SyncPolicy::Always).then(|| Unflushed::new(&s.unflushed, kb, token));
            let swapped = s.cas(&kb, Some(&cur), Some(encoded));
            if chunked && !matches!(swapped, Ok(Some(_))) {
                chunks::drop_logged(&s.chunks, &s.wal, &kb, token)?;
            }
            let Some(seq) = swapped? else {
                continue;
            };
            if let Some(p) = &pending {
                p.covered_by(seq);
            }
            s.live.remove(token);
            let durable = s.durable(seq).await;
            if let (Err(_), Some(p)) = (&durable, pending) {
                p.keep();
            }
            s.watchers.notify(key);
            durable?;
            return Ok(Committed::Done);
        }
    }

    async fn do_release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let kb = key.to_bytes();
        let mut known = s.live.get(token).map(|(_, bytes)| bytes);
        s.space.admit(0, RESULT_RESERVE)?;
        loop {
            let Some((cur, _)) = s.current_claim(&kb, token, known.take())? else {
                return Ok(Committed::Stale);
            };
            let Some(seq) = s.cas(&kb, Some(&cur), None)? else {
                continue;
            };
            s.live.remove(token);
            let durable = s.durable(seq).await;
            s.watchers.notify(key);
            durable?;
            return Ok(Committed::Done);
        }
    }

    async fn do_lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let now = s.clock.now_ms();
        let kb = key.to_bytes();
        let Some(bytes) = s.get(&kb)? else {
            return Ok(None);
        };
        let rec = s.read_record(&kb, &bytes)?;
        Ok((!matches!(&rec, Record::Completed(c) if c.expires_ms <= now)).then_some(rec))
    }

    async fn do_list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let now = s.clock.now_ms();
        let mut out = Vec::new();
        s.apply()?;
        for item in s.records.scan_prefix(id) {
            let (k, v) = item?;
            let Some(key) = StoreKey::from_bytes(&k) else {
                continue;
            };
            let rec = s.read_record(&key.to_bytes(), &v)?;
            if !matches!(&rec, Record::Completed(c) if c.expires_ms <= now) {
                out.push((key, rec));
            }
        }
        Ok(out)
    }

    async fn do_purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        s.space.admit(0, RESULT_RESERVE)?;
        let mut n = 0;
        s.apply()?;
        for item in s.records.scan_prefix(id) {
            let (k, v) = item?;
            if s.cas(
                &<[u8; 64]>::try_from(k.as_ref()).map_err(backend_err_len)?,
                Some(&v),
                None,
            )?
            .is_some()
            {
                n += 1;
                if let Some(key) = StoreKey::from_bytes(&k) {
                    s.watchers.notify(&key);
                }
            }
        }
        s.durable(s.wal.appended()).await?;
        Ok(n)
    }
}

#[async_trait]
impl Store for SledStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.settled(self.do_claim(key, fp, lease).await)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        self.settled(self.do_complete(key, token, result, ttl).await)
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        self.settled(self.do_release(key, token).await)
    }

    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.settled(self.do_lookup(key).await)
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        self.settled(self.do_list(id).await)
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        self.settled(self.do_purge(id).await)
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.shared.watchers.subscribe(key)
    }

    fn abandon(&self, token: u64) {
        // The owner died: its claim is no longer protected by a live owner, so after its lease a
        // retry takes it over or the sweeper's walk deletes it.
        self.shared.live.remove(token);
    }

    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        // Deleting writes too (sled logs it): not on a disk that is about full.
        let inner = self.inner()?;
        inner.space.admit(0, RESULT_RESERVE)?;
        let swept = tokio::task::spawn_blocking(move || inner.sweep_blocking())
            .await
            .map_err(backend_err)?;
        self.settled(swept)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner()?.wal.durable_now().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let inner = self.inner()?;
        if inner.wal.failed() {
            return Err(backend_err(std::io::Error::other("a write to disk failed")));
        }
        if let Some(d) = inner.stalled() {
            return Err(backend_err(std::io::Error::other(format!(
                "a flush to disk has not returned for {d:?}"
            ))));
        }
        // Not ready while new keys would be refused for want of space.
        inner.space.admit(0, CLAIM_RESERVE)?;
        inner.records.get([0u8; 1])?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sled"
    }

    fn stats(&self) -> super::BackendStats {
        let Ok(inner) = self.inner() else {
            return super::BackendStats::default();
        };
        let f = inner.wal.stats();
        super::BackendStats {
            size_on_disk: inner.db.size_on_disk().ok(),
            // Unknown while the records are counted again after a crash.
            live_bytes: inner.size.is_ready().then(|| inner.size.used()),
            max_size: Some(inner.size.max()),
            flushes: f.flushes,
            durable_writes: f.writes,
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
