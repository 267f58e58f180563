//! Group commit for sled: one thread calls `Db::flush` and every write that finished before that flush
//! started is durable when it returns.
//!
//! Why a dedicated thread: sled 0.34's `flush_async` deadlocks when called concurrently (sled#1308), and
//! a blocking `flush` per request would serialise requests behind one fsync each. Here writers only bump
//! a sequence number and wait; while one flush runs, the writes that arrive queue up and share the next
//! one, so under load the cost of an fsync is split among every request waiting on it.
//!
//! Protocol: a writer finishes its sled write, then takes `seq = written + 1` and waits for
//! `flushed >= seq`. The flusher reads `target = written` *before* calling `flush`, so a flush that
//! reports `target` started after each of those writes completed and covers them.
//!
//! Commit window (`sync = "always"`): a flush costs far more CPU than the writes it covers (sled seals
//! and writes its buffer on its IO threads, the kernel submits and syncs it: ~250 µs of CPU per flush
//! measured here), so fewer, larger flushes mean more requests per core. Like PostgreSQL's
//! `commit_delay`/`commit_siblings`, the flusher holds a flush back — at most about one flush time, and
//! never longer than [`MAX_WINDOW`] — while claims of this process are at the upstream (they will write
//! their result soon and can share the flush), and flushes at once when every claim holder is already
//! waiting. A lone request never waits for a window.
//!
//! Writers wake the flusher only when it sleeps waiting for a first writer, or when it holds a window
//! and the last live claim has just started to wait; a writer that arrives while a flush runs just
//! queues (the flusher looks at the queue when the flush returns). Waking it on every arrival during a
//! window cost a futex wake and two context switches per write (a fifth of the CPU at 256 connections).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::disk_sync::DiskSync;
use crate::store::StoreError;

/// Longest a flush is held back for writers known to be coming.
pub(crate) const MAX_WINDOW: Duration = Duration::from_millis(2);

/// A flush that has not returned after this long is stuck (the store is then not ready, and is not
/// waited for at shutdown).
pub(crate) const STALL: Duration = Duration::from_secs(2);

/// A writer waiting for its write to be durable.
struct Waiter {
    seq: u64,
    /// The writer holds a claim (it is counted by the live-claims count).
    holds_claim: bool,
    tx: oneshot::Sender<Result<(), Arc<sled::Error>>>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("seq", &self.seq).finish()
    }
}

#[derive(Debug, Default)]
struct State {
    waiters: Vec<Waiter>,
    /// Waiters that hold a claim.
    claim_waiters: usize,
    /// The flusher is blocked waiting for a first writer: wake it on arrival.
    listening: bool,
    /// The flusher is holding a flush back (commit window): wake it only once every live claim waits.
    windowed: bool,
    /// A flush was asked for without a waiter (see `Flusher::check`).
    forced: bool,
    stop: bool,
}

/// How many claims of this process are held (waiting for their flush or at the upstream).
pub(crate) type LiveClaims = Box<dyn Fn() -> usize + Send + Sync>;

struct Shared {
    state: Mutex<State>,
    /// Claims of this process held right now.
    live: LiveClaims,
    wake: Condvar,
    written: AtomicU64,
    flushed: AtomicU64,
    flushes: AtomicU64,
    failed: AtomicBool,
    /// When the flush in progress started (unix ms; 0: none in progress).
    flushing_since: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("written", &self.written)
            .field("flushed", &self.flushed)
            .finish_non_exhaustive()
    }
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Writes that asked to be durable.
    pub writes: u64,
    /// `fsync`s performed.
    pub flushes: u64,
}

/// Handle to the flusher thread; dropping the last handle stops it after a final flush.
#[derive(Debug)]
pub(crate) struct Flusher {
    shared: Arc<Shared>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Flusher {
    /// Starts the flusher for `db`. With `every = Some(d)` it also flushes on its own every `d`
    /// (`sync = "periodic"`), so it stays the only caller of `flush`.
    pub(crate) fn start(
        db: sled::Db,
        disk: DiskSync,
        every: Option<Duration>,
        live: LiveClaims,
        on_failure: Box<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            live,
            wake: Condvar::new(),
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            flushing_since: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("idemproxy-flush".into())
            .spawn(move || run(&db, disk, &s, every, &*on_failure))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Notes that a write finished; returns the sequence number to wait for.
    pub(crate) fn wrote(&self) -> u64 {
        self.shared.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Waits until every write up to `seq` is durable (immediately if it already is).
    pub(crate) async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        self.wait(seq, false).await
    }

    /// Like [`durable`](Self::durable), for a writer that holds a claim counted by the live-claims
    /// set (the commit window must know it is already waiting).
    pub(crate) async fn durable_claim(&self, seq: u64) -> Result<(), StoreError> {
        self.wait(seq, true).await
    }

    async fn wait(&self, seq: u64, holds_claim: bool) -> Result<(), StoreError> {
        if self.shared.flushed.load(Ordering::SeqCst) >= seq {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut st = lock(&self.shared.state);
            if st.stop {
                return Err(StoreError::Closed);
            }
            // A flush may have covered `seq` since the check above (it takes the queue under this
            // lock): do not queue for the next one.
            if self.shared.flushed.load(Ordering::SeqCst) >= seq {
                return Ok(());
            }
            st.waiters.push(Waiter {
                seq,
                holds_claim,
                tx,
            });
            st.claim_waiters += usize::from(holds_claim);
            st.listening || (st.windowed && (self.shared.live)() <= st.claim_waiters)
        };
        if wake {
            self.shared.wake.notify_one();
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

    /// Waits until every write made so far is durable.
    pub(crate) async fn durable_now(&self) -> Result<(), StoreError> {
        self.durable(self.shared.written.load(Ordering::SeqCst))
            .await
    }

    /// Whether the last flush failed.
    pub(crate) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// How long the flush in progress has been running, if longer than [`STALL`].
    pub(crate) fn stalled(&self) -> Option<Duration> {
        let since = self.shared.flushing_since.load(Ordering::SeqCst);
        let running = Duration::from_millis(unix_ms().saturating_sub(since));
        (since != 0 && running > STALL).then_some(running)
    }

    /// Lets the thread go without waiting for it (it is stuck in a flush that will not return).
    pub(crate) fn detach(&self) {
        lock(&self.shared.state).stop = true;
        drop(self.thread.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// Asks for a flush now, whether or not a write waits for one: after a failed operation, a flush
    /// tells whether sled can still write (and reports the failure if not).
    pub(crate) fn check(&self) {
        lock(&self.shared.state).forced = true;
        self.shared.wake.notify_one();
    }

    /// Counters so far.
    pub(crate) fn stats(&self) -> FlushStats {
        FlushStats {
            writes: self.shared.written.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
        }
    }

    /// Stops the thread after a final flush, and waits for it.
    pub(crate) fn stop(&self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_one();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    db: &sled::Db,
    mut disk: DiskSync,
    s: &Shared,
    every: Option<Duration>,
    on_failure: &(dyn Fn() + Send + Sync),
) {
    // Wall time of the last flush: the commit window is at most about one flush long.
    let mut last_flush = Duration::ZERO;
    loop {
        let stop = {
            let mut st = lock(&s.state);
            st.listening = true;
            while st.waiters.is_empty() && !st.stop && !st.forced {
                match every {
                    Some(d) => {
                        let (g, timeout) = s
                            .wake
                            .wait_timeout(st, d)
                            .unwrap_or_else(|e| e.into_inner());
                        st = g;
                        if timeout.timed_out() {
                            break;
                        }
                    }
                    None => st = s.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
                }
            }
            st.listening = false;
            st.forced = false;
            if every.is_none() && !st.stop {
                st = window(s, st, last_flush.min(MAX_WINDOW));
            }
            st.stop
        };
        // Read the target before flushing: every write numbered <= target completed before this point.
        let target = s.written.load(Ordering::SeqCst);
        let started = Instant::now();
        s.flushing_since.store(unix_ms().max(1), Ordering::SeqCst);
        // sled's flush only `sync_file_range`s its log: the fsyncs that make it survive a power cut
        // follow, before any waiter hears that its write is durable (see `disk_sync`).
        let result = db
            .flush()
            .map(|_| ())
            .and_then(|()| disk.after_flush().map_err(sled::Error::Io))
            .map_err(Arc::new);
        s.flushing_since.store(0, Ordering::SeqCst);
        last_flush = started.elapsed();
        s.flushes.fetch_add(1, Ordering::Relaxed);
        s.failed.store(result.is_err(), Ordering::SeqCst);
        if result.is_ok() {
            s.flushed.fetch_max(target, Ordering::SeqCst);
            crate::admin::metrics::store_fsync(disk.last_sync);
        }
        let ready: Vec<Waiter> = {
            let mut st = lock(&s.state);
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
        if let Err(e) = &result {
            // sled keeps failing after a failed write, until it is opened again (see `reopen`).
            tracing::error!(error = %e, "flush to disk failed");
            on_failure();
        }
        if stop {
            let st = lock(&s.state);
            if st.waiters.is_empty() {
                return;
            }
        }
    }
}

/// The commit window: holds the flush back, for at most `limit`, while some live claims are not yet
/// waiting for it (they are at the upstream and will write their result soon). Returns at once when
/// every claim holder waits already, or when nothing holds a claim (a lone writer, a release). A claim
/// that ends without a write (abandoned, stale) ends the window only at its limit.
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
        // A writer that makes every live claim a waiter wakes us (see `Flusher::wait`).
        st.windowed = true;
        st = s
            .wake
            .wait_timeout(st, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A sled error shared by every waiter of one failed flush.
#[derive(Debug)]
struct SharedError(Arc<sled::Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flush failed: {}", self.0)
    }
}

impl std::error::Error for SharedError {}
