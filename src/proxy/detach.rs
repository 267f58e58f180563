//! Work that must finish even if its request is dropped: a claimed exchange and its recording run
//! inline, in the request's own task (no task spawn, no channel, no cross-task wake on the hot
//! path), and what is left of them moves to a tracked task of its own only if the request goes away
//! first — the client disconnected, or the request's deadline fired. Shutdown waits for both kinds
//! (the inline one holds a tracker token). An [`AbandonGuard`] covers the one way such work can end
//! without settling its claim: a panic.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use crate::store::Store;

/// A future polled inline, detached into `tasks` if dropped before it completes.
pub(super) struct Detachable<F: Future + Send + 'static>
where
    F::Output: Send,
{
    /// Until it completes: the work, and the token that keeps shutdown waiting for it.
    running: Option<(Pin<Box<F>>, TaskTrackerToken)>,
}

impl<F: Future + Send + 'static> Detachable<F>
where
    F::Output: Send,
{
    pub(super) fn new(tasks: &TaskTracker, fut: F) -> Self {
        Self {
            running: Some((Box::pin(fut), tasks.token())),
        }
    }
}

impl<F: Future + Send + 'static> Future for Detachable<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some((fut, _)) = self.running.as_mut() else {
            // Polled after completion: a caller bug; never ready again.
            return Poll::Pending;
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.running = None;
        Poll::Ready(out)
    }
}

impl<F: Future + Send + 'static> Drop for Detachable<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        let Some((fut, token)) = self.running.take() else {
            return;
        };
        // Outside a runtime (it is shutting down) the future is dropped here instead: its guards
        // abandon the claim, and the lease bounds how long the key stays blocked.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _token = token;
                fut.await;
            });
        }
    }
}

/// Abandons a claim whose task ended without completing or releasing it (a panic): the lease then
/// bounds how long the key stays blocked, exactly as if the process had died.
pub(super) struct AbandonGuard {
    pub(super) store: Arc<dyn Store>,
    pub(super) token: u64,
    pub(super) armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if self.armed {
            self.store.abandon(self.token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    #[tokio::test]
    async fn finishes_inline_or_in_a_task_of_its_own_when_dropped() {
        let tasks = TaskTracker::new();
        // Inline: the output comes back and nothing is left running.
        assert_eq!(Detachable::new(&tasks, async { 7 }).await, 7);
        assert!(tasks.is_empty());

        // Dropped half-way: the rest runs to its end, and the tracker waits for it.
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        let mut work = Box::pin(Detachable::new(&tasks, async move {
            let _ = go_rx.await;
            d.store(true, Ordering::SeqCst);
        }));
        let pending = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx).is_pending()));
        assert!(pending.await);
        assert_eq!(tasks.len(), 1);
        drop(work);
        assert_eq!(tasks.len(), 1, "detached, still tracked");
        go_tx.send(()).unwrap();
        tasks.close();
        tasks.wait().await;
        assert!(done.load(Ordering::SeqCst));
    }
}
