//! The embedded, durable store on sled 0.34.
//!
//! Trees: `records` (store key → encoded [`Record`]), `expiry` (big-endian unix ms ‖ store key → empty,
//! for completed records), `meta` (schema version, clean-stop flag). Every state change is a `compare_and_swap` on `records`, retried from a fresh
//! read when it loses a race, so two claimers can never both win. The expiry index entry of a result is
//! written *before* the record it points to: a crash in between leaves an orphan index entry (removed
//! when its time comes) rather than a record the sweeper would never find. Claims are short-lived and
//! not indexed; the few that an unclean stop leaves behind are indexed by a scan at the next open. The sweeper re-reads each record
//! before deleting it, so a stale index entry never deletes a live record.
//!
//! Durability: with `sync = "always"`, `claim`, `complete` and `release` return only once the write is
//! flushed (group commit, see `flusher`), and a replay waits for any flush still pending, so a client
//! never sees a result that a crash could take back. sled flushes with `sync_file_range` on Linux: this
//! survives a process crash (kill -9); it is weaker than `fdatasync` against power loss.
//!
//! sled calls are synchronous but short (in-memory tree operations); the fsync runs on the flusher
//! thread and the sweep in `spawn_blocking`.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;

use super::{
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

/// Most index entries one sweep looks at, so a sweep never holds up shutdown for long.
const SWEEP_BATCH: usize = 100_000;

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
    meta: sled::Tree,
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

/// `meta` key: 1 after a clean stop with no claim in flight.
const CLEAN: &str = "clean";

/// Puts every in-flight claim into the expiry index (after an unclean stop); returns how many.
fn index_leftover_claims(records: &sled::Tree, expiry: &sled::Tree) -> Result<u64, StoreError> {
    let mut n = 0;
    for item in records.iter() {
        let (k, v) = item?;
        if let (Ok(Record::InFlight(f)), Ok(key)) =
            (Record::decode(&v), <[u8; 64]>::try_from(k.as_ref()))
        {
            expiry.insert(index_key(f.deadline_ms, &key), &[])?;
            n += 1;
        }
    }
    Ok(n)
}

fn index_key(at_ms: u64, key: &[u8; 64]) -> [u8; 72] {
    let mut k = [0u8; 72];
    k[..8].copy_from_slice(&at_ms.to_be_bytes());
    k[8..].copy_from_slice(key);
    k
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    records: sled::Tree,
    expiry: sled::Tree,
    flusher: Flusher,
    sync: SyncPolicy,
    /// Claims whose owner is alive in this process: token → store key.
    live: LiveOwners,
    /// `complete` calls between their CAS and their flush sequence number (see `claim`).
    completing: AtomicU64,
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
        let expiry = db.open_tree("expiry")?;
        // Claims are not put in the expiry index (it would cost a write per request, for the rare
        // claim a crash leaves behind); after an unclean stop they are found by a scan instead.
        let clean = meta.get(CLEAN)?.is_some_and(|v| v.as_ref() == [1]);
        meta.insert(CLEAN, &[0])?;
        let every = (opts.sync == SyncPolicy::Periodic).then_some(opts.periodic_flush);
        let flusher = Flusher::start(db.clone(), every).map_err(backend_err)?;
        if !clean {
            let (records, expiry) = (records.clone(), expiry.clone());
            std::thread::Builder::new()
                .name("idemproxy-recover".into())
                .spawn(move || match index_leftover_claims(&records, &expiry) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        claims = n,
                        "unclean stop: claims left in flight will expire with their lease"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "scan for claims left by an unclean stop failed")
                    }
                })
                .map_err(backend_err)?;
        }
        Ok(Self {
            meta,
            inner: Arc::new(Inner {
                db,
                records,
                expiry,
                flusher,
                sync: opts.sync,
                live: LiveOwners::default(),
                completing: AtomicU64::new(0),
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

    /// Final flush and stop of the flusher thread. The store is marked clean only if no claim is left
    /// in flight (otherwise the next open scans for them).
    pub fn close(&self) {
        self.inner.flusher.stop();
        if self.inner.live.is_empty() && self.meta.insert(CLEAN, &[1]).is_ok() {
            let _ = self.inner.db.flush();
        }
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

    fn index(&self, at_ms: u64, key: &[u8; 64]) -> Result<(), StoreError> {
        self.expiry.insert(index_key(at_ms, key), &[])?;
        Ok(())
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

    /// One compare-and-swap; `Ok(false)` when another writer got there first.
    fn cas(
        &self,
        key: &[u8; 64],
        old: Option<&sled::IVec>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        Ok(self.records.compare_and_swap(key, old, new)?.is_ok())
    }

    fn sweep_blocking(&self) -> Result<SweepStats, StoreError> {
        let now = self.clock.now_ms();
        let end = now.saturating_add(1).to_be_bytes();
        let mut stats = SweepStats::default();
        for item in self.expiry.range(..end.as_slice()).take(SWEEP_BATCH) {
            let (ik, _) = item?;
            stats.scanned += 1;
            let Some(key) = ik.get(8..).and_then(StoreKey::from_bytes) else {
                self.expiry.remove(&ik)?;
                continue;
            };
            let at = ik
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            let kb = key.to_bytes();
            let mut keep_entry = false;
            if let Some(cur) = self.records.get(kb)? {
                if let Ok(rec) = Record::decode(&cur) {
                    if self.lapsed(&rec, now) {
                        if self.cas(&kb, Some(&cur), None)? {
                            stats.expired += 1;
                            self.watchers.notify(&key);
                        }
                    } else if Some(rec.expiry_ms()) == at {
                        // A live owner past its deadline: look again next time.
                        keep_entry = true;
                    }
                }
            }
            if !keep_entry {
                self.expiry.remove(&ik)?;
            }
        }
        Ok(stats)
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
        loop {
            let now = s.clock.now_ms();
            let cur = s.records.get(kb)?;
            if let Some(bytes) = &cur {
                let rec = Record::decode(bytes)?;
                if !s.lapsed(&rec, now) {
                    return Ok(match rec {
                        Record::InFlight(f) => ClaimOutcome::InFlight {
                            fingerprint: f.fingerprint,
                            retry_after: retry_after(f.deadline_ms, now),
                        },
                        Record::Completed(c) => {
                            // The record may have been written by a request whose flush is still
                            // pending: never replay what a crash could take back. A `complete` between
                            // its CAS and its sequence number is visible in `completing`: then wait for
                            // a flush that starts after this read.
                            if s.sync == SyncPolicy::Always {
                                let waited = if s.completing.load(Ordering::SeqCst) > 0 {
                                    s.flusher.durable(s.flusher.wrote()).await
                                } else {
                                    s.flusher.durable_now().await
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
            // Fencing token: sled's id generator is monotonic across restarts and crashes.
            let token = s.db.generate_id()? + 1;
            let rec = Record::InFlight(InFlight {
                token,
                created_ms: now,
                deadline_ms: now.saturating_add(lease.as_millis() as u64),
                fingerprint: fp,
            });
            let encoded = rec.encode();
            if !s.cas(&kb, cur.as_ref(), Some(encoded.clone()))? {
                continue; // lost the race: look again
            }
            s.live.insert(token, *key);
            // If this future is dropped while it waits (the client went away), the claim must not
            // stay "owned by a live process" forever: the guard abandons it to its lease.
            let mut guard = AbandonOnDrop {
                store: self,
                token,
                armed: true,
            };
            let durable = s.durable(s.flusher.wrote()).await;
            guard.armed = false;
            if let Err(e) = durable {
                // Not durable: take the claim back so the client's retry is not refused for a lease.
                s.live.remove(token);
                let _ = s.cas(
                    &kb,
                    Some(&sled::IVec::from(encoded)),
                    cur.map(|c| c.to_vec()),
                );
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
        loop {
            let Some((cur, f)) = s.claim_of(&kb, token)? else {
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
            s.index(rec.expiry_ms(), &kb)?;
            // Between this CAS and `wrote()` a reader could see the result before its write is
            // counted; `completing` tells the replay path to wait for a fresh flush meanwhile.
            s.completing.fetch_add(1, Ordering::SeqCst);
            let swapped = s.cas(&kb, Some(&cur), Some(rec.encode()));
            let seq = s.flusher.wrote();
            s.completing.fetch_sub(1, Ordering::SeqCst);
            if !swapped? {
                continue;
            }
            s.live.remove(token);
            let durable = s.durable(seq).await;
            s.watchers.notify(key);
            durable?;
            return Ok(Committed::Done);
        }
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        let s = &*self.inner;
        let kb = key.to_bytes();
        loop {
            let Some((cur, _)) = s.claim_of(&kb, token)? else {
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
        // The owner died: index its claim at its deadline so the sweeper removes it if nobody retries.
        let s = &*self.inner;
        if let Some(kb) = s.live.remove(token).map(|k| k.to_bytes()) {
            if let Ok(Some(cur)) = s.records.get(kb) {
                if let Ok(Record::InFlight(f)) = Record::decode(&cur) {
                    if f.token == token {
                        let _ = s.index(f.deadline_ms, &kb);
                    }
                }
            }
        }
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

    /// A claim left by a crash (no clean close) is found at the next open and swept after its lease.
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
        clock.advance(lease.as_millis() as u64);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            // The scan runs in the background; sweep until it has indexed the claim.
            if s.sweep().await.unwrap().expired == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "leftover claim never swept"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(s.is_empty());
        s.close();
        drop(s);
        // A clean close with nothing in flight marks the store clean: no scan next time.
        let raw = sled::open(dir.path()).unwrap();
        let flag = raw.open_tree("meta").unwrap().get(CLEAN).unwrap();
        assert_eq!(flag.as_deref(), Some(&[1u8][..]));
    }
}
