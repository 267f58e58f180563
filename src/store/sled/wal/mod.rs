//! The store's write-ahead log: every change to sled is also appended here, and a write is durable once
//! the log is synced — one `fdatasync` of a preallocated file, shared by every write queued meanwhile
//! (group commit). sled itself is flushed only at checkpoints, off the request path.
//!
//! ```text
//!  request ─ sled CAS ─ append ──▶ pending bytes ──▶ writer thread: write + fdatasync ──▶ waiters woken
//!                                                        │ segment full / every CHECKPOINT_EVERY
//!                                                        ▼
//!                            checkpoint thread: sled flush + fsync, then segments ≤ cut reused
//! ```
//! - **Order**: a change is appended after sled applied it, under a per-key lock held across both
//!   (see `Inner::swap`), so the log holds each key's changes in the order sled made them, and every
//!   entry numbered up to any `appended()` reading is already in sled (what a checkpoint relies on).
//! - **Durability** (`sync = "always"`): a writer appends, takes the entry's sequence number and waits
//!   until `synced` reaches it. The writer thread takes every pending byte at once, writes them to
//!   the active segment and syncs; segments are zero-filled when created so that sync writes data
//!   blocks only. With `sync = "periodic"` the thread writes and syncs every `periodic_flush`.
//! - **Commit window**: as PostgreSQL's `commit_delay`, the writer holds a sync back — at most about one
//!   sync's time, never longer than [`MAX_WINDOW`] — while claims of this process are at the upstream
//!   (their results will come soon and can share the sync), and syncs at once when every claim holder
//!   waits already. Writers wake the thread only when it sleeps for a first writer, or when it holds a
//!   window and the last live claim starts to wait (a futex wake per write cost a fifth of the CPU).
//! - **Recovery** (see `recover`): sled holds everything up to its last checkpoint; the log's entries
//!   after it are applied again at open, up to the first torn or missing one.

mod format;
mod segments;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex, MutexGuard};

use tokio::sync::oneshot;

#[cfg(test)]
pub(crate) use format::encode as encode_for_tests;
pub(crate) use format::{entries, Entry};
pub(crate) use segments::{Found, Pool};

use crate::store::StoreError;

/// Longest a sync is held back for writers known to be coming.
pub(crate) const MAX_WINDOW: Duration = Duration::from_millis(2);

/// A sync (or a checkpoint) that has not returned after this long is stuck: the store is then not
/// ready, and is not waited for at shutdown.
pub(crate) const STALL: Duration = Duration::from_secs(2);

/// A checkpoint is asked for at least this often while the log grows, so a restart has little to
/// replay even when a segment takes long to fill.
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// A writer waiting for its entry to be durable.
struct Waiter {
    seq: u64,
    /// The writer holds a claim (it is counted by the live-claims count).
    holds_claim: bool,
    tx: oneshot::Sender<Result<(), Arc<std::io::Error>>>,
}

#[derive(Default)]
struct State {
    waiters: Vec<Waiter>,
    /// Waiters that hold a claim.
    claim_waiters: usize,
    /// The thread is blocked waiting for a first writer: wake it on arrival.
    listening: bool,
    /// The thread is holding a sync back (commit window): wake it only once every live claim waits.
    windowed: bool,
    /// The pending bytes passed [`WRITE_AT`]: write them now (`sync = "periodic"`).
    full: bool,
    stop: bool,
}

/// Pending bytes beyond which the writer is woken to write them, whatever the policy: bounds the
/// memory the log holds between periodic syncs.
const WRITE_AT: usize = 1 << 20;

/// Entries appended and not yet written.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Sequence number of the first entry in `bytes`.
    first: u64,
    /// Sequence number of the last entry appended (written or not).
    last: u64,
}

/// How many claims of this process are held (waiting for their sync or at the upstream).
pub(crate) type LiveClaims = Box<dyn Fn() -> usize + Send + Sync>;

/// What the log tells the checkpoint thread.
#[derive(Debug, Default)]
pub(crate) struct CheckpointSignal {
    due: Mutex<(bool, bool)>,
    wake: Condvar,
}

impl CheckpointSignal {
    /// Asks for a checkpoint.
    pub(crate) fn request(&self) {
        self.due.lock().0 = true;
        self.wake.notify_one();
    }

    /// Asks the checkpoint thread to end.
    pub(crate) fn stop(&self) {
        self.due.lock().1 = true;
        self.wake.notify_one();
    }

    /// Waits for a request (`Some(true)`), at most `timeout` (`Some(false)`), or the stop (`None`).
    pub(crate) fn wait(&self, timeout: Duration) -> Option<bool> {
        let until = Instant::now() + timeout;
        let mut due = self.due.lock();
        loop {
            if due.1 {
                return None;
            }
            if std::mem::take(&mut due.0) {
                return Some(true);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Some(false);
            }
            self.wake.wait_for(&mut due, left);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    pending: Mutex<Pending>,
    /// Segments not being appended to (the checkpoint thread releases them).
    pool: Mutex<Pool>,
    checkpoint: Arc<CheckpointSignal>,
    live: LiveClaims,
    wake: Condvar,
    synced: AtomicU64,
    syncs: AtomicU64,
    failed: AtomicBool,
    /// When the sync in progress started (unix ms; 0: none in progress).
    syncing_since: AtomicU64,
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Entries appended to the log.
    pub writes: u64,
    /// `fdatasync`s of the log.
    pub flushes: u64,
}

/// Handle to the log and its writer thread; [`Wal::stop`] writes and syncs what is pending.
pub(crate) struct Wal {
    shared: Arc<Shared>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("synced", &self.shared.synced)
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Starts the writer on `pool` (whose segments hold nothing that is not in sled yet), numbering
    /// entries from `next`. `every`: sync on a timer instead (`sync = "periodic"`).
    pub(crate) fn start(
        mut pool: Pool,
        next: u64,
        every: Option<Duration>,
        live: LiveClaims,
        checkpoint: Arc<CheckpointSignal>,
        on_failure: Box<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        let active = pool.activate(next)?;
        active.sync()?;
        pool.prepare()?;
        let last = next.saturating_sub(1);
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            pending: Mutex::new(Pending {
                bytes: Vec::with_capacity(1 << 16),
                first: next,
                last,
            }),
            pool: Mutex::new(pool),
            checkpoint,
            live,
            wake: Condvar::new(),
            synced: AtomicU64::new(last),
            syncs: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            syncing_since: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("idemproxy-wal".into())
            .spawn(move || run(&s, active, every, &*on_failure))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Appends `entry` (sled has applied it already); returns its sequence number.
    pub(crate) fn append(&self, entry: &Entry<'_>) -> u64 {
        let mut p = self.shared.pending.lock();
        p.last += 1;
        let seq = p.last;
        if p.bytes.is_empty() {
            p.first = seq;
        }
        let before = p.bytes.len();
        format::encode(&mut p.bytes, seq, entry);
        let crossed = before < WRITE_AT && p.bytes.len() >= WRITE_AT;
        drop(p);
        if crossed {
            // Not under the pending lock: the writer takes the state lock first.
            self.shared.state.lock().full = true;
            self.shared.wake.notify_one();
        }
        seq
    }

    /// The sequence number of the last entry appended.
    pub(crate) fn appended(&self) -> u64 {
        self.shared.pending.lock().last
    }

    /// Waits until every entry up to `seq` is durable (at once if it already is).
    pub(crate) async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        self.wait(seq, false).await
    }

    /// Like [`durable`](Self::durable), for a writer that holds a claim counted by the live-claims
    /// count (the commit window must know it is already waiting).
    pub(crate) async fn durable_claim(&self, seq: u64) -> Result<(), StoreError> {
        self.wait(seq, true).await
    }

    /// Waits until every entry appended so far is durable.
    pub(crate) async fn durable_now(&self) -> Result<(), StoreError> {
        self.durable(self.appended()).await
    }

    async fn wait(&self, seq: u64, holds_claim: bool) -> Result<(), StoreError> {
        let s = &self.shared;
        if s.synced.load(Ordering::SeqCst) >= seq {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut st = s.state.lock();
            if st.stop {
                return Err(StoreError::Closed);
            }
            // A sync may have covered `seq` since the check above (the thread takes the waiters
            // under this lock): do not queue for the next one.
            if s.synced.load(Ordering::SeqCst) >= seq {
                return Ok(());
            }
            st.waiters.push(Waiter {
                seq,
                holds_claim,
                tx,
            });
            st.claim_waiters += usize::from(holds_claim);
            st.listening || (st.windowed && (s.live)() <= st.claim_waiters)
        };
        if wake {
            s.wake.notify_one();
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Backend {
                backend: "sled",
                source: Box::new(SharedError(e)),
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Whether the last write or sync of the log failed.
    pub(crate) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// Notes a failure found elsewhere (a checkpoint): the store is not ready until it is reopened.
    pub(crate) fn set_failed(&self) {
        self.shared.failed.store(true, Ordering::SeqCst);
    }

    /// How long the sync in progress has been running, if longer than [`STALL`].
    pub(crate) fn stalled(&self) -> Option<Duration> {
        stalled_since(self.shared.syncing_since.load(Ordering::SeqCst))
    }

    /// Segments are released up to `cut`: a checkpoint made every entry up to it durable in sled.
    pub(crate) fn checkpointed(&self, cut: u64) {
        let mut pool = self.shared.pool.lock();
        pool.release_upto(cut);
        if let Err(e) = pool.prepare() {
            tracing::warn!(error = %e, "could not prepare a spare log segment");
        }
    }

    /// Counters so far.
    pub(crate) fn stats(&self) -> FlushStats {
        FlushStats {
            writes: self.appended(),
            flushes: self.shared.syncs.load(Ordering::Relaxed),
        }
    }

    /// Lets the thread go without waiting for it (it is stuck in a sync that will not return).
    pub(crate) fn detach(&self) {
        self.shared.state.lock().stop = true;
        drop(self.thread.lock().take());
    }

    /// Stops the thread after a final write and sync, and waits for it.
    pub(crate) fn stop(&self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_one();
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long something that started at `since` (unix ms, 0: nothing running) has run, if over STALL.
pub(crate) fn stalled_since(since: u64) -> Option<Duration> {
    let running = Duration::from_millis(unix_ms().saturating_sub(since));
    (since != 0 && running > STALL).then_some(running)
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn run(
    s: &Shared,
    mut active: segments::Active,
    every: Option<Duration>,
    on_failure: &(dyn Fn() + Send + Sync),
) {
    // Wall time of the last sync: the commit window is at most about one sync long.
    let mut last_sync = Duration::ZERO;
    let mut batch: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut last_checkpoint = Instant::now();
    let mut checkpointed_upto = active.start().saturating_sub(1);
    let mut broken: Option<Arc<std::io::Error>> = None;
    loop {
        let stop = {
            let mut st = s.state.lock();
            st.listening = true;
            while st.waiters.is_empty() && !st.stop && !st.full {
                let d = every.unwrap_or(CHECKPOINT_EVERY);
                if s.wake.wait_for(&mut st, d).timed_out() {
                    break;
                }
            }
            st.listening = false;
            st.full = false;
            if every.is_none() && !st.stop {
                st = window(s, st, last_sync.min(MAX_WINDOW));
            }
            st.stop
        };
        // Take everything appended so far: it is all in sled already (see the module docs).
        let (first, target) = {
            let mut p = s.pending.lock();
            std::mem::swap(&mut p.bytes, &mut batch);
            (p.first, p.last)
        };
        let wrote = !batch.is_empty() && broken.is_none();
        let started = Instant::now();
        let result = if let Some(e) = &broken {
            // After a failed write or sync nothing more is acknowledged: an entry lost before a
            // later one that was synced would end recovery there and take the later one with it.
            Err(std::io::Error::new(e.kind(), e.to_string()))
        } else if wrote {
            s.syncing_since.store(unix_ms().max(1), Ordering::SeqCst);
            let r = write_batch(s, &mut active, &batch, first);
            s.syncing_since.store(0, Ordering::SeqCst);
            r
        } else {
            Ok(())
        };
        batch.clear();
        if batch.capacity() > 2 * WRITE_AT {
            // A burst between periodic syncs: do not keep its buffer.
            batch = Vec::with_capacity(1 << 16);
        }
        if result.is_ok() && wrote {
            last_sync = started.elapsed();
            s.syncs.fetch_add(1, Ordering::Relaxed);
            crate::metrics::store_fsync(last_sync);
        }
        let result = result.map_err(Arc::new);
        if let Err(e) = &result {
            // Sticky: after a failed fsync the file's state is unknown; the store is reopened.
            s.failed.store(true, Ordering::SeqCst);
            if broken.is_none() {
                tracing::error!(error = %e, "write to the store's log failed");
                on_failure();
            }
            broken = Some(Arc::clone(e));
        } else {
            s.synced.fetch_max(target, Ordering::SeqCst);
        }
        let ready: Vec<Waiter> = {
            let mut st = s.state.lock();
            let (ready, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut st.waiters)
                .into_iter()
                .partition(|w| w.seq <= target || result.is_err());
            st.claim_waiters = rest.iter().filter(|w| w.holds_claim).count();
            st.waiters = rest;
            ready
        };
        for w in ready {
            let _ = w.tx.send(result.clone());
        }
        // A checkpoint once a segment is full, and now and then while the log grows.
        let sealed = s.pool.lock().sealed();
        if sealed > 0
            || (target > checkpointed_upto && last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
        {
            s.checkpoint.request();
            last_checkpoint = Instant::now();
            checkpointed_upto = target;
        }
        if stop {
            let st = s.state.lock();
            if st.waiters.is_empty() && s.pending.lock().bytes.is_empty() {
                return;
            }
        }
    }
}

/// Appends `batch` (entries from `first` on) to the active segment, rolling to the next segment first
/// when it does not fit, and syncs.
fn write_batch(
    s: &Shared,
    active: &mut segments::Active,
    batch: &[u8],
    first: u64,
) -> std::io::Result<()> {
    if !active.fits(batch.len()) {
        if let Err(e) = s.pool.lock().roll(active, first - 1) {
            // Appends go on past the preallocated end; the next checkpoint retries.
            tracing::warn!(error = %e, "could not start a new log segment");
        }
    }
    active.append(batch)?;
    active.sync()
}

/// The commit window: holds the sync back, for at most `limit`, while some live claims are not yet
/// waiting for it (they are at the upstream and will write their result soon). Returns at once when
/// every claim holder waits already, or when nothing holds a claim (a lone writer, a release).
fn window<'a>(
    s: &'a Shared,
    mut st: MutexGuard<'a, State>,
    limit: Duration,
) -> MutexGuard<'a, State> {
    let until = Instant::now() + limit;
    loop {
        let left = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero());
        let Some(left) = left.filter(|_| !st.stop && (s.live)() > st.claim_waiters) else {
            st.windowed = false;
            return st;
        };
        // A writer that makes every live claim a waiter wakes us (see `Wal::wait`).
        st.windowed = true;
        s.wake.wait_for(&mut st, left);
    }
}

/// An I/O error shared by every waiter of one failed sync.
#[derive(Debug)]
struct SharedError(Arc<std::io::Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing the store's log failed: {}", self.0)
    }
}

impl std::error::Error for SharedError {}

/// The log's directory inside a data dir.
pub(crate) fn dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("wal")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(dir: &Path, every: Option<Duration>) -> Wal {
        let (pool, found) = Pool::open(dir).unwrap();
        assert!(found.is_empty());
        Wal::start(
            pool,
            1,
            every,
            Box::new(|| 0),
            Arc::new(CheckpointSignal::default()),
            Box::new(|| {}),
        )
        .unwrap()
    }

    /// Entries acknowledged by `durable` are in the segment files, in order, and read back.
    #[tokio::test]
    async fn durable_entries_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let wal = start(dir.path(), None);
        let key = [5u8; 64];
        let mut last = 0;
        for i in 0..100u8 {
            last = wal.append(&Entry::Record {
                key: &key,
                value: Some(&[i; 100]),
            });
        }
        wal.durable(last).await.unwrap();
        let (_, found) = Pool::open(dir.path()).unwrap();
        let read: Vec<u64> = found
            .iter()
            .flat_map(|f| entries(&f.body).map(|(s, _)| s).collect::<Vec<_>>())
            .collect();
        assert_eq!(read, (1..=last).collect::<Vec<_>>());
        assert!(wal.stats().flushes >= 1);
    }

    /// With periodic syncs an hour apart, a megabyte of pending entries is written anyway: the log's
    /// memory stays bounded between syncs.
    #[test]
    fn a_full_buffer_is_written_before_the_periodic_sync() {
        let dir = tempfile::tempdir().unwrap();
        let wal = start(dir.path(), Some(Duration::from_secs(3600)));
        let key = [7u8; 64];
        for _ in 0..(WRITE_AT / 4000 + 1) {
            wal.append(&Entry::Record {
                key: &key,
                value: Some(&[1; 4000]),
            });
        }
        // No event to await from outside: poll the counter, bounded.
        let give_up = Instant::now() + Duration::from_secs(10);
        while wal.stats().flushes == 0 {
            assert!(Instant::now() < give_up, "pending bytes were not written");
            thread::sleep(Duration::from_millis(5));
        }
    }
}
