//! Checkpoints: sled flushed and synced up to a cut of the log, after which the log's segments up to
//! the cut are reused (see `wal`).
//!
//! The same thread applies the overlay to sled every [`APPLY_EVERY`] between checkpoints (see
//! `overlay`). It runs checkpoints when the log's writer asks (a segment is full, or the log has grown for
//! [`wal::CHECKPOINT_EVERY`]), when a failed sled call asks whether sled can still write, and once more
//! at a clean close. A checkpoint:
//! 1. reads `cut`, the last entry appended, and applies the overlay to sled: every change up to `cut`
//!    is then in sled's trees;
//! 2. writes `cut` and the fencing-token block in use to `meta` (so a restart replays only what follows
//!    `cut`, and takes tokens above every block ever used);
//! 3. flushes sled and makes it power-safe (`disk_sync`);
//! 4. hands the segments whose entries are all `<= cut` back to the log for reuse.
//!
//! A checkpoint that fails leaves sled broken (sled 0.34 keeps failing after a failed write): the store
//! is marked failed and reopened (see `reopen`); the log still holds every change since the last good
//! checkpoint, and the reopen replays it.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Instant,
};

use parking_lot::Mutex;

use super::{
    disk_sync::DiskSync,
    overlay::{Overlay, APPLY_EVERY},
    wal::{self, CheckpointSignal, Wal},
};

/// `meta` key: every log entry up to this sequence number is in sled's durable state.
pub(super) const APPLIED: &[u8] = b"wal_applied";
/// `meta` key: the fencing-token block in use at the last checkpoint.
pub(super) const TOKEN_BLOCK: &[u8] = b"token_block";

/// What a checkpoint works on.
#[derive(Debug)]
pub(super) struct Parts {
    pub(super) db: sled::Db,
    pub(super) meta: sled::Tree,
    pub(super) disk: Mutex<DiskSync>,
    pub(super) wal: Arc<Wal>,
    /// Changes not yet in sled.
    pub(super) overlay: Arc<Overlay>,
    pub(super) records: sled::Tree,
    /// The token block in use (see `Tokens`).
    pub(super) block: Arc<AtomicU64>,
    /// When the checkpoint in progress started (unix ms; 0: none).
    pub(super) since: AtomicU64,
}

impl Parts {
    /// Applies the overlay's settled changes to sled (no flush; claims in flight wait for their
    /// result or the next checkpoint).
    pub(super) fn apply(&self) -> Result<(), sled::Error> {
        self.since.store(wal::unix_ms().max(1), Ordering::SeqCst);
        let r = self.overlay.apply_settled(&self.records);
        self.since.store(0, Ordering::SeqCst);
        r.map(|_| ())
    }

    /// Runs one checkpoint; returns its cut.
    pub(super) fn run(&self) -> Result<u64, sled::Error> {
        // Every entry up to `cut` has its key's change in the overlay (or applied already): the
        // apply that follows puts them all in sled.
        let cut = self.wal.appended();
        self.since.store(wal::unix_ms().max(1), Ordering::SeqCst);
        let started = Instant::now();
        let result = (|| {
            self.overlay.apply(&self.records)?;
            self.meta.insert(APPLIED, &cut.to_be_bytes())?;
            self.meta.insert(
                TOKEN_BLOCK,
                &self.block.load(Ordering::SeqCst).to_be_bytes(),
            )?;
            self.db.flush()?;
            self.disk.lock().after_flush().map_err(sled::Error::Io)
        })();
        self.since.store(0, Ordering::SeqCst);
        result?;
        self.wal.checkpointed(cut);
        tracing::debug!(cut, took = ?started.elapsed(), "checkpoint");
        Ok(cut)
    }
}

/// The checkpoint thread; stopping it waits for a checkpoint in progress.
#[derive(Debug)]
pub(super) struct Checkpointer {
    pub(super) parts: Arc<Parts>,
    signal: Arc<CheckpointSignal>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Checkpointer {
    pub(super) fn start(
        parts: Arc<Parts>,
        signal: Arc<CheckpointSignal>,
        on_failure: Box<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        let (p, sig) = (Arc::clone(&parts), Arc::clone(&signal));
        let handle = thread::Builder::new()
            .name("idemproxy-checkpoint".into())
            .spawn(move || {
                while let Some(due) = sig.wait(APPLY_EVERY) {
                    let r = if due { p.run().map(|_| ()) } else { p.apply() };
                    if let Err(e) = r {
                        tracing::error!(error = %e, "checkpoint of the store failed");
                        p.wal.set_failed();
                        on_failure();
                        return;
                    }
                }
            })?;
        Ok(Self {
            parts,
            signal,
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Asks for a checkpoint now (after a failed sled call: it tells whether sled can still write).
    pub(super) fn request(&self) {
        self.signal.request();
    }

    /// How long the checkpoint in progress has been running, if longer than [`wal::STALL`].
    pub(super) fn stalled(&self) -> Option<std::time::Duration> {
        wal::stalled_since(self.parts.since.load(Ordering::SeqCst))
    }

    /// Stops the thread (after the checkpoint in progress) and waits for it.
    pub(super) fn stop(&self) {
        self.signal.stop();
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }

    /// Lets the thread go without waiting (stuck in a flush that will not return).
    pub(super) fn detach(&self) {
        self.signal.stop();
        drop(self.thread.lock().take());
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}
