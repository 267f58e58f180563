//! `[upstream] max_concurrency`: the bound on upstream exchanges at once, detached ones included.
//!
//! An exchange takes a slot before anything is sent and keeps it until the upstream's answer has been
//! read (recorded exchanges) or streamed to the client (pass-through and released answers); a claimed
//! request that finds no slot frees its key and gets 503 `upstream-busy`. Without the bound, clients
//! that send a request and disconnect could pile up detached upstream calls without limit (each must
//! finish, to be recorded). `idemproxy_upstream_inflight` counts the slots taken.

use std::sync::Arc;

use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ProxyError;
use crate::body::{Body, Guarded};
use crate::metrics::InflightGuard;

/// The slots of one proxy (kept across config reloads).
#[derive(Debug, Clone)]
pub(crate) struct UpstreamLimit(Arc<Semaphore>);

/// One upstream exchange in progress.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    _gauge: InflightGuard,
}

impl UpstreamLimit {
    pub(crate) fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }

    /// A slot now, or 503 `upstream-busy` (never waits: a queue would only move the pile-up).
    pub(crate) fn try_take(&self) -> Result<Slot, ProxyError> {
        match Arc::clone(&self.0).try_acquire_owned() {
            Ok(permit) => Ok(Slot {
                _permit: permit,
                _gauge: InflightGuard::upstream(),
            }),
            Err(_) => Err(ProxyError::UpstreamBusy),
        }
    }
}

impl Slot {
    /// `body`, holding this slot until it has been sent or dropped.
    pub(crate) fn hold(self, body: Body) -> Body {
        Guarded::new(body, self).boxed()
    }
}
