//! A [`Store`] wrapper that times every operation and counts failures (`idemproxy_store_*` metrics).
//! It is also the seam where tests inject store faults: it wraps any `Arc<dyn Store>`.

use std::{future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{
    BackendStats, ClaimOutcome, Committed, KeyWatch, NewResult, Record, Store, StoreError,
    SweepStats,
};
use crate::{
    admin::metrics,
    key::{Fingerprint, StoreKey},
};

/// Times and counts the operations of an inner store.
#[derive(Debug)]
pub struct Instrumented(pub Arc<dyn Store>);

async fn timed<T>(
    op: &'static str,
    f: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let start = std::time::Instant::now();
    let r = f.await;
    metrics::store_op(op, start.elapsed(), r.is_ok());
    r
}

#[async_trait]
impl Store for Instrumented {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        timed("claim", self.0.claim(key, fp, lease)).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let r = timed("complete", self.0.complete(key, token, result, ttl)).await;
        if matches!(r, Ok(Committed::Done)) {
            metrics::record_stored();
        }
        r
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        timed("release", self.0.release(key, token)).await
    }

    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        timed("lookup", self.0.lookup(key)).await
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        timed("list", self.0.list(id)).await
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        timed("purge", self.0.purge(id)).await
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.0.watch(key)
    }

    fn abandon(&self, token: u64) {
        self.0.abandon(token);
    }

    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        let r = timed("sweep", self.0.sweep()).await;
        if let Ok(s) = &r {
            metrics::swept(s.expired);
        }
        let st = self.0.stats();
        metrics::store_stats(st.size_on_disk, st.flushes, st.durable_writes);
        r
    }

    async fn flush(&self) -> Result<(), StoreError> {
        timed("flush", self.0.flush()).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed("ping", self.0.ping()).await
    }

    fn backend(&self) -> &'static str {
        self.0.backend()
    }

    fn stats(&self) -> BackendStats {
        self.0.stats()
    }
}
