//! Where a request stands, so that a timeout can say whose fault it was (contract rule 15): a client
//! whose body stalls gets 408 `request-timeout`, a slow upstream 504 `upstream-timeout`, a stuck store
//! 503 `store-unavailable`, and a duplicate still waiting for its first request 409 `in-flight`.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::error::ProxyError;
use crate::body::{Body, BoxError, RequestBody};
use crate::store::StoreError;

/// The phase a request is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Reading the client's request body.
    Body = 0,
    /// Waiting for the store.
    Store = 1,
    /// A duplicate waiting for the first request with its key.
    Waiting = 2,
    /// At the upstream (the whole request body has been read).
    Upstream = 3,
}

/// The phase of one request, shared with the bodies and tasks working on it, and when its
/// `request_timeout` runs out.
#[derive(Debug, Clone)]
pub(crate) struct Progress(Arc<(AtomicU8, tokio::time::Instant)>);

impl Progress {
    /// A request that must be answered by `deadline`.
    pub(crate) fn new(deadline: tokio::time::Instant) -> Self {
        Self(Arc::new((AtomicU8::new(Phase::Body as u8), deadline)))
    }

    /// Time left before the request's `request_timeout` runs out.
    pub(crate) fn left(&self) -> Duration {
        self.0
             .1
            .saturating_duration_since(tokio::time::Instant::now())
    }

    pub(crate) fn set(&self, p: Phase) {
        self.0 .0.store(p as u8, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Phase {
        match self.0 .0.load(Ordering::Relaxed) {
            0 => Phase::Body,
            1 => Phase::Store,
            2 => Phase::Waiting,
            _ => Phase::Upstream,
        }
    }

    /// The error of a request whose `request_timeout` ran out in the current phase.
    pub(crate) fn timed_out(&self, limit: Duration) -> ProxyError {
        match self.get() {
            Phase::Body => ProxyError::RequestTimeout(limit),
            Phase::Store => ProxyError::StoreUnavailable(StoreError::Timeout(limit)),
            Phase::Waiting => ProxyError::InFlight {
                retry_after: Duration::from_secs(1),
            },
            Phase::Upstream => ProxyError::UpstreamTimeout,
        }
    }

    /// A streamed request body that moves the request to [`Phase::Upstream`] once it has been read
    /// to its end (pass-through: the upstream exchange and the upload overlap).
    pub(crate) fn stream_request(&self, body: impl RequestBody) -> Body {
        use http_body_util::BodyExt;
        if body.is_end_stream() {
            self.set(Phase::Upstream);
        }
        Tracked {
            inner: body,
            progress: self.clone(),
        }
        .boxed()
    }
}

/// See [`Progress::stream_request`].
struct Tracked<B> {
    inner: B,
    progress: Progress,
}

impl<B: RequestBody> HttpBody for Tracked<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.progress.set(Phase::Upstream);
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
