//! Store faults through the `Store` seam: [`FailingStore`] wraps any store and fails `claim`, `complete`
//! or `release` on demand (a full disk, a Redis gone), counting calls, injected failures and abandons.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    key::{Fingerprint, StoreKey},
    store::{
        BackendStats, ClaimOutcome, Committed, KeyWatch, NewResult, Record, Store, StoreAdmin,
        StoreError, StoreUpkeep, SweepStats,
    },
};

/// An operation that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Claim,
    Complete,
    Release,
}

const OPS: usize = 3;

fn idx(op: Op) -> usize {
    match op {
        Op::Claim => 0,
        Op::Complete => 1,
        Op::Release => 2,
    }
}

/// A store that fails chosen operations a chosen number of times.
#[derive(Debug)]
pub struct FailingStore {
    inner: Arc<dyn Store>,
    /// Failures still to inject, per op (`u32::MAX`: until healed).
    remaining: [AtomicU32; OPS],
    /// Failures injected so far, per op.
    injected: [AtomicU64; OPS],
    /// Calls seen, per op.
    calls: [AtomicU64; OPS],
    /// `complete` fails *after* the inner store did it (like a flush that failed after the write).
    complete_after: AtomicBool,
    abandoned: AtomicU64,
}

fn injected_error(op: Op) -> StoreError {
    StoreError::Backend {
        backend: "failing",
        source: Box::new(std::io::Error::other(format!("injected {op:?} failure"))),
    }
}

impl FailingStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<FailingStore> {
        Arc::new(FailingStore {
            inner,
            remaining: Default::default(),
            injected: Default::default(),
            calls: Default::default(),
            complete_after: AtomicBool::new(false),
            abandoned: AtomicU64::new(0),
        })
    }

    /// Fail the next `times` calls of `op` (`u32::MAX`: every call until [`FailingStore::heal`]).
    pub fn fail(&self, op: Op, times: u32) {
        self.remaining[idx(op)].store(times, Ordering::SeqCst);
    }

    /// Make failing `complete`s perform the write first and fail afterwards.
    pub fn complete_fails_after_write(&self, after: bool) {
        self.complete_after.store(after, Ordering::SeqCst);
    }

    /// No more failures.
    pub fn heal(&self) {
        for r in &self.remaining {
            r.store(0, Ordering::SeqCst);
        }
    }

    pub fn injected(&self, op: Op) -> u64 {
        self.injected[idx(op)].load(Ordering::SeqCst)
    }

    pub fn calls(&self, op: Op) -> u64 {
        self.calls[idx(op)].load(Ordering::SeqCst)
    }

    /// `abandon` calls seen.
    pub fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// Counts the call; `true` if this one must fail.
    fn trip(&self, op: Op) -> bool {
        self.calls[idx(op)].fetch_add(1, Ordering::SeqCst);
        let r = &self.remaining[idx(op)];
        let hit = r
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u32::MAX => Some(u32::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        if hit {
            self.injected[idx(op)].fetch_add(1, Ordering::SeqCst);
        }
        hit
    }
}

#[async_trait]
impl Store for FailingStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        if self.trip(Op::Claim) {
            return Err(injected_error(Op::Claim));
        }
        self.inner.claim(key, fp, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        if self.trip(Op::Complete) {
            if self.complete_after.load(Ordering::SeqCst) {
                let _ = self.inner.complete(key, token, result, ttl).await;
            }
            return Err(injected_error(Op::Complete));
        }
        self.inner.complete(key, token, result, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        if self.trip(Op::Release) {
            return Err(injected_error(Op::Release));
        }
        self.inner.release(key, token).await
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.inner.watch(key)
    }

    fn abandon(&self, token: u64) {
        self.abandoned.fetch_add(1, Ordering::SeqCst);
        self.inner.abandon(token);
    }
}

#[async_trait]
impl StoreAdmin for FailingStore {
    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.inner.lookup(key).await
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        self.inner.list(id).await
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        self.inner.purge(id).await
    }
}

#[async_trait]
impl StoreUpkeep for FailingStore {
    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        self.inner.sweep().await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    fn backend(&self) -> &'static str {
        "failing"
    }

    async fn close(&self, clean: bool) {
        self.inner.close(clean).await;
    }

    fn stats(&self) -> BackendStats {
        self.inner.stats()
    }
}
