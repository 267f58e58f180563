//! A [`Store`] wrapper that bounds every operation by `[store] timeout`, times it and counts failures
//! (`idemproxy_store_*` metrics). It is also the seam where tests inject store faults: it wraps any
//! `Arc<dyn Store>`.
//!
//! The bound is what turns a stuck store (a full disk under sled, a frozen Redis) into a prompt 503
//! `store-unavailable` instead of a request that hangs until its own timeout (contract rule 14). A
//! claim cut short is dropped, and the backend abandons it to its lease (see `Store::abandon`).
//!
//! Every store the app opens is wrapped here, and the wrapper owns the store's sweeper (see
//! `sweeper`): started by [`Instrumented::start`], stopped by `close()` or when the store is dropped.

use std::{future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{
    sweeper::Sweeper, BackendStats, ClaimOutcome, Committed, KeyWatch, NewResult, Record, Store,
    StoreAdmin, StoreError, StoreUpkeep, SweepStats,
};
use crate::{
    key::{Fingerprint, StoreKey},
    metrics,
};

/// Bounds, times and counts the operations of an inner store.
#[derive(Debug)]
pub struct Instrumented {
    inner: Arc<dyn Store>,
    timeout: Duration,
    /// Running from [`Instrumented::start`] until `close()`.
    sweeper: Option<Sweeper>,
}

impl Instrumented {
    /// Wraps `inner`; each operation fails with [`StoreError::Timeout`] after `timeout`. No sweeper.
    pub fn new(inner: Arc<dyn Store>, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sweeper: None,
        }
    }

    /// Wraps `inner` as [`Instrumented::new`] does, and sweeps it every `sweep_interval` until
    /// `close()` (needs a Tokio runtime).
    pub fn start(inner: Arc<dyn Store>, timeout: Duration, sweep_interval: Duration) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            inner,
            timeout,
            sweeper: Some(Sweeper::start(me.clone(), sweep_interval)),
        })
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = std::time::Instant::now();
        let r = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        metrics::store_op(op, start.elapsed(), r.is_ok());
        r
    }
}

#[async_trait]
impl Store for Instrumented {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.timed("claim", self.inner.claim(key, fp, lease)).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let r = self
            .timed("complete", self.inner.complete(key, token, result, ttl))
            .await;
        if matches!(r, Ok(Committed::Done)) {
            metrics::record_stored();
        }
        r
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        self.timed("release", self.inner.release(key, token)).await
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.inner.watch(key)
    }

    fn abandon(&self, token: u64) {
        self.inner.abandon(token);
    }
}

#[async_trait]
impl StoreAdmin for Instrumented {
    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.timed("lookup", self.inner.lookup(key)).await
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        self.timed("list", self.inner.list(id)).await
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        self.timed("purge", self.inner.purge(id)).await
    }
}

#[async_trait]
impl StoreUpkeep for Instrumented {
    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        let r = self.timed("sweep", self.inner.sweep()).await;
        if let Ok(s) = &r {
            metrics::swept(s.expired);
        }
        let st = self.inner.stats();
        metrics::store_stats(&st);
        r
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.timed("flush", self.inner.flush()).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn stats(&self) -> BackendStats {
        self.inner.stats()
    }

    async fn close(&self, clean: bool) {
        if let Some(s) = &self.sweeper {
            s.stop().await;
        }
        self.inner.close(clean).await;
    }
}
