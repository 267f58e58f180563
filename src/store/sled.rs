//! The embedded, durable store on sled 0.34.
//!
//! Trees: `records` (store key → encoded [`Record`]) and `meta` (schema version). Every state change is
//! a `compare_and_swap` on `records`, retried from the current value when it loses a race, so two
//! claimers can never both win. A first-seen key is claimed with a read and one compare-and-swap, and
//! its owner completes it with one more (expecting the claim bytes it wrote, no read): two tree writes
//! and one read per request.
//!
//! Sweeping: there is no expiry index (it cost a third tree write per request, on the right-most leaf,
//! whose keys grow with time). The sweeper walks `records` in key order from where the last sweep
//! stopped, a bounded slice per sweep, wrapping around, and deletes what has lapsed (a completed record
//! past its TTL, or a claim past its lease whose owner is not alive in this process — which covers
//! claims left by a crash, found without any scan at open). Reads check expiry themselves, so a lapsed
//! record is never replayed while it waits for the sweeper; the walk only bounds disk use.
//!
//! Durability: with `sync = "always"`, `claim`, `complete` and `release` return only once the write is
//! flushed (group commit, see `flusher`), and a replay of a result whose flush is still pending waits
//! for that flush (the `unflushed` map), so a client never sees a result that a crash could take back. sled flushes with `sync_file_range` on Linux: this
//! survives a process crash (kill -9); it is weaker than `fdatasync` against power loss.
//!
//! sled calls are synchronous but short (in-memory tree operations); the fsync runs on the flusher
//! thread and the sweep in `spawn_blocking`.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;

use super::{
    disk_sync::{self, DiskSync},
    flusher::{FlushStats, Flusher},
    retry_after,
    watch::{LiveOwners, Watchers},
    ClaimOutcome, Committed, Completed, InFlight, KeyWatch, NewResult, Record, Store, StoreError,
    SweepStats,
};
use crate::{
    clock::Clock,
    config::SyncPolicy,
    key::{Fingerprint, StoreKey},
};

/// Fewest records one sweep looks at: a sweep is a bounded slice of the walk over `records` (about
/// 1 µs per record here), so it never holds up shutdown for long.
const SWEEP_BATCH: u64 = 50_000;

/// A larger store gets larger slices, so one lap of the walk takes at most this many sweeps (5 minutes
/// at the default `sweep_interval`): an expired record stays on disk at most that long after its TTL,
/// however fast keys arrive.
const LAP_SWEEPS: u64 = 60;

/// Where the sweeper's walk over `records` stands.
#[derive(Debug, Clone, Default)]
struct Walk {
    /// Where the next sweep resumes (`None`: from the start).
    from: Option<sled::IVec>,
    /// Records looked at since the walk last passed the end of the tree.
    lap: u64,
    /// Records one sweep looks at: the size of the last lap ÷ LAP_SWEEPS, at least SWEEP_BATCH.
    batch: u64,
}

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
}

/// The sled store. Cheap to clone (shared inside).
#[derive(Debug, Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

/// Results written but not yet known durable: store key → (token of the writer, flush sequence number
/// that covers the write, 0 while its compare-and-swap is in progress or after its flush failed).
type UnflushedMap = Mutex<HashMap<[u8; 64], (u64, u64)>>;

/// The entry of one `complete` in `Inner::unflushed`. Dropped, it removes the entry if it is still
/// its own (a later writer of the same key — after a purge, or a TTL shorter than a flush — may have
/// replaced it); `keep` leaves it for the replays to settle (its flush failed).
struct Unflushed<'a> {
    map: &'a UnflushedMap,
    key: [u8; 64],
    token: u64,
    armed: bool,
}

impl<'a> Unflushed<'a> {
    fn new(map: &'a UnflushedMap, key: [u8; 64], token: u64) -> Self {
        lock(map).insert(key, (token, 0));
        Self {
            map,
            key,
            token,
            armed: true,
        }
    }

    fn covered_by(&self, seq: u64) {
        lock(self.map).insert(self.key, (self.token, seq));
    }

    /// The flush failed: later replays must wait for one that succeeds (a fresh one, seq 0).
    fn keep(mut self) {
        lock(self.map).insert(self.key, (self.token, 0));
        self.armed = false;
    }
}

impl Drop for Unflushed<'_> {
    fn drop(&mut self) {
        if self.armed {
            remove_if(self.map, &self.key, |(t, _)| t == self.token);
        }
    }
}

/// Removes `key` from `map` if its entry passes `mine`.
fn remove_if(map: &UnflushedMap, key: &[u8; 64], mine: impl Fn((u64, u64)) -> bool) {
    let mut m = lock(map);
    if m.get(key).is_some_and(|e| mine(*e)) {
        m.remove(key);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Single inserts and removes: a panic cannot leave the map inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
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

/// Fencing tokens without a sled call per claim: `block` comes from sled's id generator (monotonic
/// across restarts and crashes) and the low [`TOKEN_BITS`] bits count claims within it, so every token
/// is larger than all tokens issued before, in this process or an earlier one. A new block is taken
/// every 2^TOKEN_BITS claims.
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
    records: sled::Tree,
    /// The sweeper's walk over `records`.
    walk: Mutex<Walk>,
    flusher: Flusher,
    sync: SyncPolicy,
    /// Claims whose owner is alive in this process: token → store key and the claim's stored bytes
    /// (so `complete` and `release` swap them out without reading the record first).
    live: Arc<LiveOwners<(StoreKey, sled::IVec)>>,
    /// Results written but not yet known durable (`sync = "always"`, see [`UnflushedMap`]). A replay
    /// of a key listed here waits for that flush; every other record is durable and replays at once.
    unflushed: UnflushedMap,
    /// Fencing tokens: see [`Tokens`].
    tokens: Mutex<Tokens>,
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
        disk_sync::create_private_dir(&opts.path).map_err(backend_err)?;
        let db = sled::Config::new()
            .path(&opts.path)
            .cache_capacity(opts.cache_capacity)
            // The flusher thread is the only caller of flush (see `flusher`).
            .flush_every_ms(None)
            .open()?;
        let meta = db.open_tree("meta")?;
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
        let block = db.generate_id()?;
        let every = (opts.sync == SyncPolicy::Periodic).then_some(opts.periodic_flush);
        let live: Arc<LiveOwners<(StoreKey, sled::IVec)>> = Arc::default();
        let claims = Arc::clone(&live);
        disk_sync::make_private(&opts.path).map_err(backend_err)?;
        let disk = DiskSync::open(&opts.path).map_err(backend_err)?;
        let flusher = Flusher::start(db.clone(), disk, every, Box::new(move || claims.len()))
            .map_err(backend_err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                records,
                walk: Mutex::new(Walk {
                    batch: SWEEP_BATCH,
                    ..Walk::default()
                }),
                flusher,
                sync: opts.sync,
                live,
                unflushed: Mutex::default(),
                tokens: Mutex::new(Tokens { block, used: 0 }),
                watchers: Arc::default(),
                clock,
            }),
        })
    }

    /// Bytes used on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// Group-commit counters.
    pub fn flush_stats(&self) -> FlushStats {
        self.inner.flusher.stats()
    }

    /// Number of records (live or not yet swept).
    pub fn len(&self) -> usize {
        self.inner.records.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.inner.records.is_empty()
    }

    /// Final flush and stop of the flusher thread. Claims still in flight stay in the tree; after their
    /// lease the sweeper (or a retry) takes them over, as after a crash.
    pub fn close(&self) {
        self.inner.flusher.stop();
        let _ = self.inner.db.flush();
    }
}

impl Inner {
    /// A record that no longer counts: completed past its TTL, or a claim past its lease whose owner is
    /// not alive in this process.
    fn lapsed(&self, rec: &Record, now: u64) -> bool {
        match rec {
            Record::InFlight(f) => f.deadline_ms <= now && !self.live.contains(f.token),
            Record::Completed(c) => c.expires_ms <= now,
        }
    }

    /// Waits until the writes made so far are durable (no-op with `sync = "periodic"`).
    async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        match self.sync {
            SyncPolicy::Always => self.flusher.durable(seq).await,
            SyncPolicy::Periodic => Ok(()),
        }
    }

    /// [`durable`](Self::durable) for a claim's own write (its owner is counted as live).
    async fn durable_claim(&self, seq: u64) -> Result<(), StoreError> {
        match self.sync {
            SyncPolicy::Always => self.flusher.durable_claim(seq).await,
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
        let cur = self.records.get(key)?;
        if let Some(bytes) = cur {
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
            t.block = self.db.generate_id()?;
            t.used = 0;
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

    /// One compare-and-swap; `Ok(false)` when another writer got there first.
    fn cas(
        &self,
        key: &[u8; 64],
        old: Option<&sled::IVec>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        Ok(self.records.compare_and_swap(key, old, new)?.is_ok())
    }

    /// One slice of the walk over `records`: from where the last sweep stopped to the end, then from
    /// the start back to there, at most `walk.batch` records. On an error the walk stays where it was.
    fn sweep_blocking(&self) -> Result<SweepStats, StoreError> {
        let now = self.clock.now_ms();
        let mut stats = SweepStats::default();
        let mut walk = lock(&self.walk).clone();
        let from = walk.from.clone();
        let range = self.records.range(from.clone().unwrap_or_default()..);
        let mut next = self.sweep_range(range, now, walk.batch, &mut stats)?;
        if next.is_none() {
            // Past the end: a lap is over, and its size sets the slices of the next one.
            let lap = walk.lap + stats.scanned;
            walk.batch = (lap / LAP_SWEEPS).max(SWEEP_BATCH);
            walk.lap = 0;
            let before = stats.scanned;
            if let Some(from) = from {
                next = self.sweep_range(self.records.range(..from), now, walk.batch, &mut stats)?;
            }
            walk.lap = stats.scanned - before;
        } else {
            walk.lap += stats.scanned;
        }
        walk.from = next;
        *lock(&self.walk) = walk;
        Ok(stats)
    }

    /// Sweeps the records of `range` until the batch is used up; returns the key to resume from then.
    fn sweep_range(
        &self,
        range: sled::Iter,
        now: u64,
        batch: u64,
        stats: &mut SweepStats,
    ) -> Result<Option<sled::IVec>, StoreError> {
        for item in range {
            let (k, v) = item?;
            if stats.scanned >= batch {
                return Ok(Some(k));
            }
            stats.scanned += 1;
            let lapsed = match Record::peek_lapse(&v) {
                Some((Some(token), deadline)) => deadline <= now && !self.live.contains(token),
                Some((None, expires)) => expires <= now,
                None => false,
            };
            if lapsed
                && self
                    .records
                    .compare_and_swap(&k, Some(&v), None::<&[u8]>)?
                    .is_ok()
            {
                stats.expired += 1;
                if let Some(key) = StoreKey::from_bytes(&k) {
                    self.watchers.notify(&key);
                }
            }
        }
        Ok(None)
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
        let s = &*self.inner;
        let kb = key.to_bytes();
        // Read first: retries and duplicates (replays, 409s) are answered from the read alone, with no
        // token, no live-owner entry and no failed write; a first-seen key then costs one
        // compare-and-swap expecting what was read.
        let mut cur = s.records.get(kb)?;
        loop {
            let now = s.clock.now_ms();
            if let Some(bytes) = &cur {
                let rec = Record::decode(bytes)?;
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
                                        let seq = if seq == 0 { s.flusher.wrote() } else { seq };
                                        let r = s.flusher.durable(seq).await;
                                        if r.is_ok() {
                                            // Durable now, whoever wrote it: settle a kept entry.
                                            remove_if(&s.unflushed, &kb, |e| e == entry);
                                        }
                                        r
                                    }
                                };
                                // Replaying is still right if the flush failed: forwarding (as
                                // `on_store_error = "pass"` would) could run the request twice.
                                if let Err(e) = waited {
                                    tracing::warn!(error = %e, "replaying a result whose flush failed");
                                }
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
            // Live before it is written: the sweeper must never see this claim without its owner
            // (with a lease of a few ms it could otherwise delete it as lapsed).
            s.live.insert(token, (*key, encoded.clone()));
            let swapped = s
                .records
                .compare_and_swap(kb, cur.as_ref(), Some(encoded.clone()));
            match swapped {
                Ok(Ok(())) => {}
                Ok(Err(lost)) => {
                    s.live.remove(token);
                    cur = lost.current; // a record exists, or changed since it was read: look at it
                    continue;
                }
                Err(e) => {
                    s.live.remove(token);
                    return Err(e.into());
                }
            }
            // If this future is dropped while it waits (the client went away), the claim must not
            // stay "owned by a live process" forever: the guard abandons it to its lease.
            let mut guard = AbandonOnDrop {
                store: self,
                token,
                armed: true,
            };
            let durable = s.durable_claim(s.flusher.wrote()).await;
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

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let s = &*self.inner;
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
            // Listed as unflushed before the CAS, so a replay that sees the result also sees the
            // entry; removed (by the guard) once the flush returned, or if this write did not happen.
            let pending =
                (s.sync == SyncPolicy::Always).then(|| Unflushed::new(&s.unflushed, kb, token));
            let swapped = s.cas(&kb, Some(&cur), Some(rec.encode()));
            let seq = s.flusher.wrote();
            if let Some(p) = &pending {
                p.covered_by(seq);
            }
            if !swapped? {
                continue;
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

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        let s = &*self.inner;
        let kb = key.to_bytes();
        let mut known = s.live.get(token).map(|(_, bytes)| bytes);
        loop {
            let Some((cur, _)) = s.current_claim(&kb, token, known.take())? else {
                return Ok(Committed::Stale);
            };
            if !s.cas(&kb, Some(&cur), None)? {
                continue;
            }
            s.live.remove(token);
            let durable = s.durable(s.flusher.wrote()).await;
            s.watchers.notify(key);
            durable?;
            return Ok(Committed::Done);
        }
    }

    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let s = &*self.inner;
        let now = s.clock.now_ms();
        let Some(bytes) = s.records.get(key.to_bytes())? else {
            return Ok(None);
        };
        let rec = Record::decode(&bytes)?;
        Ok((!matches!(&rec, Record::Completed(c) if c.expires_ms <= now)).then_some(rec))
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let s = &*self.inner;
        let now = s.clock.now_ms();
        let mut out = Vec::new();
        for item in s.records.scan_prefix(id) {
            let (k, v) = item?;
            let (Some(key), rec) = (StoreKey::from_bytes(&k), Record::decode(&v)?) else {
                continue;
            };
            if !matches!(&rec, Record::Completed(c) if c.expires_ms <= now) {
                out.push((key, rec));
            }
        }
        Ok(out)
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        let s = &*self.inner;
        let mut n = 0;
        for item in s.records.scan_prefix(id) {
            let (k, v) = item?;
            if s.cas(
                &<[u8; 64]>::try_from(k.as_ref()).map_err(backend_err_len)?,
                Some(&v),
                None,
            )? {
                n += 1;
                if let Some(key) = StoreKey::from_bytes(&k) {
                    s.watchers.notify(&key);
                }
            }
        }
        s.durable(s.flusher.wrote()).await?;
        Ok(n)
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.inner.watchers.subscribe(key)
    }

    fn abandon(&self, token: u64) {
        // The owner died: its claim is no longer protected by a live owner, so after its lease a
        // retry takes it over or the sweeper's walk deletes it.
        self.inner.live.remove(token);
    }

    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.sweep_blocking())
            .await
            .map_err(backend_err)?
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flusher.durable_now().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.inner.flusher.failed() {
            return Err(backend_err(std::io::Error::other(
                "the last flush to disk failed",
            )));
        }
        self.inner.records.get([0u8; 1])?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sled"
    }

    fn stats(&self) -> super::BackendStats {
        let f = self.inner.flusher.stats();
        super::BackendStats {
            size_on_disk: self.inner.db.size_on_disk().ok(),
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
        },
        clock,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    /// A claim left by a crash (no clean close) is swept after its lease by the walk over the records.
    #[tokio::test]
    async fn claims_left_by_a_crash_are_swept_after_their_lease() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(10_000_000));
        let key = StoreKey {
            id: [3; 32],
            scope: [4; 32],
        };
        let lease = Duration::from_secs(30);
        {
            let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
            assert!(matches!(
                s.claim(&key, Fingerprint([1; 32]), lease).await.unwrap(),
                ClaimOutcome::Claimed { .. }
            ));
            // Dropped without `close`: like a crash after the claim was made durable.
        }
        let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
        clock.advance(lease.as_millis() as u64 - 1);
        assert_eq!(
            s.sweep().await.unwrap().expired,
            0,
            "swept before its lease"
        );
        clock.advance(1);
        assert_eq!(s.sweep().await.unwrap().expired, 1);
        assert!(s.is_empty());
    }

    /// A replay waits only for the flush of its own key's result: once `complete` returned, the
    /// key is off the unflushed list (nothing leaks), and the replay answers at once.
    #[tokio::test]
    async fn completed_results_leave_the_unflushed_list() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(10_000_000));
        let s = open_default(dir.path(), SyncPolicy::Always, clock).unwrap();
        let fp = Fingerprint([1; 32]);
        for i in 0..20u8 {
            let key = StoreKey {
                id: [i; 32],
                scope: [0; 32],
            };
            let ClaimOutcome::Claimed { token } =
                s.claim(&key, fp, Duration::from_secs(30)).await.unwrap()
            else {
                panic!("not claimed")
            };
            let result = NewResult {
                status: 201,
                headers: Vec::new(),
                body: bytes::Bytes::from_static(b"ok"),
                body_omitted: false,
                seen_only: false,
            };
            let ttl = Duration::from_secs(60);
            assert_eq!(
                s.complete(&key, token, result, ttl).await.unwrap(),
                Committed::Done
            );
            assert!(lock(&s.inner.unflushed).is_empty());
            assert!(matches!(
                s.claim(&key, fp, Duration::from_secs(30)).await.unwrap(),
                ClaimOutcome::Completed(c) if c.body.as_ref() == b"ok"
            ));
        }
    }

    /// Two `complete`s of one key that overlap (the key was purged or expired in between) each remove
    /// only their own unflushed entry, and a kept entry (failed flush) stays for the replays.
    #[test]
    fn unflushed_entries_belong_to_their_writer() {
        let map = UnflushedMap::default();
        let key = [7u8; 64];
        let a = Unflushed::new(&map, key, 1);
        a.covered_by(10);
        let b = Unflushed::new(&map, key, 2);
        drop(a);
        assert_eq!(lock(&map).get(&key), Some(&(2, 0)), "A removed B's entry");
        b.covered_by(11);
        b.keep();
        assert_eq!(
            lock(&map).get(&key),
            Some(&(2, 0)),
            "a failed flush must stay listed"
        );
        remove_if(&map, &key, |e| e == (2, 0));
        assert!(lock(&map).is_empty());
    }

    /// Claims a fresh key; its token.
    async fn claimed(s: &SledStore, id: [u8; 32]) -> u64 {
        let key = StoreKey { id, scope: [0; 32] };
        match s
            .claim(&key, Fingerprint([1; 32]), Duration::from_secs(5))
            .await
            .unwrap()
        {
            ClaimOutcome::Claimed { token } => token,
            o => panic!("not claimed: {o:?}"),
        }
    }

    /// Fencing tokens grow across a reopen (and across blocks of tokens).
    #[tokio::test]
    async fn tokens_grow_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(10_000_000));
        let mut last = 0;
        for round in 0..3u8 {
            // sled's IO threads may hold the directory lock for a moment after the last handle is
            // dropped (there is no event to wait for): retry the open, bounded.
            let give_up = std::time::Instant::now() + Duration::from_secs(10);
            let s = loop {
                match open_default(dir.path(), SyncPolicy::Periodic, clock.clone()) {
                    Ok(s) => break s,
                    Err(e) if std::time::Instant::now() < give_up => {
                        assert!(e.to_string().contains("lock"), "{e}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            for i in 0..3u8 {
                let token = claimed(&s, [round * 3 + i; 32]).await;
                assert!(token > last, "token {token} after {last}");
                last = token;
            }
            lock(&s.inner.tokens).used = 1 << TOKEN_BITS; // the next claim takes a new block
            let token = claimed(&s, [99 - round; 32]).await;
            assert!(token > last, "token {token} of a new block after {last}");
            last = token;
            s.close();
            drop(s);
        }
    }

    /// The walk resumes where the last sweep stopped and wraps around, so every record is reached
    /// even when one sweep cannot look at them all.
    #[tokio::test]
    async fn the_sweep_walk_resumes_and_wraps_around() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(10_000_000));
        let s = open_default(dir.path(), SyncPolicy::Periodic, clock.clone()).unwrap();
        let ttl = Duration::from_secs(1);
        let n = SWEEP_BATCH + SWEEP_BATCH / 2;
        for i in 0..n as u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let key = StoreKey { id, scope: [0; 32] };
            let ClaimOutcome::Claimed { token } =
                s.claim(&key, Fingerprint([1; 32]), ttl).await.unwrap()
            else {
                panic!("not claimed")
            };
            let result = NewResult {
                status: 200,
                headers: Vec::new(),
                body: bytes::Bytes::new(),
                body_omitted: false,
                seen_only: true,
            };
            s.complete(&key, token, result, ttl).await.unwrap();
        }
        clock.advance(1_000);
        let first = s.sweep().await.unwrap();
        assert_eq!((first.scanned, first.expired), (SWEEP_BATCH, SWEEP_BATCH));
        let second = s.sweep().await.unwrap();
        assert_eq!(second.expired, n - SWEEP_BATCH);
        assert!(s.is_empty());
    }
}
