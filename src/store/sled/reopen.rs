//! Reopening the database in place after a write error, so the store comes back by itself when the
//! disk has room again (contract rule 14), without a restart.
//!
//! sled 0.34 turns a failed log write (`ENOSPC`, `EIO`) into a sticky error: from then on every call
//! fails, until the database is opened again. When a checkpoint (sled's flush) or a write of the log
//! fails, the failing thread calls the [`Hook`], which
//! starts one reopen thread:
//! 1. the broken database is taken out of service (calls fail at once with a store error: 503
//!    `store-unavailable`) and its log writer and checkpoint threads are stopped;
//! 2. once every handle to it is gone (calls in progress end quickly, with errors) and the file system
//!    has room again, the data dir is opened anew — sled recovers it from disk, which holds everything
//!    that was acknowledged (what sled lost since its last checkpoint is replayed from the log, see
//!    `recover`), and put back.
//!
//! Claims of live owners, watchers and settings live outside the database and carry over. The wait is
//! polled with a backoff (50 ms up to 1 s): what it waits for — room on a disk other processes fill
//! and free, sled's threads letting go of the data dir's lock — sends no event.

use std::{
    sync::{atomic::Ordering, Arc, OnceLock, Weak},
    time::Duration,
};

use super::{space::SpaceGuard, Inner, Shared, CLAIM_RESERVE};

/// What the log writer or the checkpoint thread calls when a write fails; armed with the store once
/// it exists.
#[derive(Debug, Clone, Default)]
pub(super) struct Hook(Arc<OnceLock<Weak<Shared>>>);

impl Hook {
    pub(super) fn arm(&self, shared: &Arc<Shared>) {
        let _ = self.0.set(Arc::downgrade(shared));
    }

    pub(super) fn callback(&self) -> Box<dyn Fn() + Send + Sync> {
        let cell = Arc::clone(&self.0);
        Box::new(move || {
            if let Some(shared) = cell.get().and_then(Weak::upgrade) {
                start(&shared);
            }
        })
    }
}

/// Starts a reopen unless one is under way.
pub(super) fn start(shared: &Arc<Shared>) {
    if shared.reopening.swap(true, Ordering::SeqCst) {
        return;
    }
    let weak = Arc::downgrade(shared);
    let spawned = std::thread::Builder::new()
        .name("idemproxy-reopen".into())
        .spawn(move || run(&weak));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the thread that reopens the store");
        shared.reopening.store(false, Ordering::SeqCst);
    }
}

fn run(weak: &Weak<Shared>) {
    let Some(shared) = weak.upgrade() else { return };
    let Some(old) = shared.current.swap(None) else {
        shared.reopening.store(false, Ordering::SeqCst);
        return;
    };
    if let Some(d) = old.stalled() {
        // sled is wedged, not just failed: its flush will never return, and its lock on the data
        // dir is never released. Nothing in this process can open the data dir again.
        tracing::error!(
            stuck_for = ?d,
            "the store's flush is stuck after a write error: restart the proxy to recover"
        );
        old.leak();
        return;
    }
    tracing::error!(
        "a write to the store failed: it is out of service until it is reopened (503 \
         store-unavailable meanwhile; reads of acknowledged results come back with it)"
    );
    // The log's writer syncs what it can: the reopen replays it into sled.
    old.checkpointer.stop();
    old.wal.stop();
    let gone = Arc::downgrade(&old);
    drop(old);
    let space = SpaceGuard::new(shared.opts.path.clone());
    let mut delay = Duration::from_millis(50);
    let hook = shared.hook.clone();
    drop(shared);
    loop {
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(1));
        let Some(shared) = weak.upgrade() else { return };
        if gone.strong_count() > 0 || space.free().map_or(true, |f| f < CLAIM_RESERVE) {
            continue;
        }
        match Inner::open(
            &shared.opts,
            Arc::clone(&shared.live),
            Arc::clone(&shared.watchers),
            Arc::clone(&shared.clock),
            &hook,
        ) {
            Ok(inner) => {
                shared.current.store(Some(Arc::new(inner)));
                shared.reopening.store(false, Ordering::SeqCst);
                tracing::info!("the store is reopened and takes writes again");
                return;
            }
            // sled's threads may hold the data dir's lock a moment longer; the disk may fill again.
            Err(e) => tracing::debug!(error = %e, "reopening the store failed; trying again"),
        }
    }
}
