//! The sweeper: the task that deletes expired records every `[store] sweep_interval` (completed
//! records past their TTL, claims past their lease whose owner is gone). The store owns it (see
//! [`super::instrumented::Instrumented`]): it starts with the store and stops at `close()`, or on its
//! own once the store is dropped.
//!
//! A sweep under way when the stop comes is finished first (it is bounded by `[store] timeout`), so
//! nothing deletes records while the store closes.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{sync::watch, task::JoinHandle};

use super::StoreUpkeep;

/// The running sweeper of one store.
#[derive(Debug)]
pub(crate) struct Sweeper {
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Sweeper {
    /// Sweeps `store` every `every` while it lives (the task holds it weakly).
    pub(crate) fn start<S: StoreUpkeep + Send + Sync + 'static>(
        store: Weak<S>,
        every: Duration,
    ) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                let Some(store) = store.upgrade() else {
                    return;
                };
                sweep_once(&store).await;
            }
        });
        Self {
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Stops the sweeper, after the sweep under way (if any) ends.
    pub(crate) async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn sweep_once<S: StoreUpkeep + ?Sized>(store: &Arc<S>) {
    match store.sweep().await {
        Ok(s) if s.expired > 0 => {
            tracing::debug!(expired = s.expired, scanned = s.scanned, "swept");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "sweep failed"),
    }
}
