//! One accepted connection: the TLS handshake or the wait for a first request byte, then hyper
//! (HTTP/1.1 or h2), driven until it ends, drains, or stays idle for `idle_timeout`.
//!
//! Idle means no request in flight: a request counts from the moment hyper hands it to the handler
//! until its response body has been sent (or dropped). Once a connection has been idle for
//! `idle_timeout` it is shut down gracefully (HTTP/1: closed; HTTP/2: GOAWAY). If it is still open
//! `header_read_timeout` later with nothing in flight — an HTTP/2 client that never finishes a header
//! block is such a case, it has no request yet — it is dropped, which closes the socket.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;

use http::{uri::Scheme, Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{watch, Notify, OwnedSemaphorePermit},
    time::Instant,
};

use super::{Handler, ServeOptions, ServerTls};
use crate::body::Guarded;

/// A place among the `max_connections`; counted in `idemproxy_connections` while held.
#[derive(Debug)]
pub(super) struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
}

impl ConnSlot {
    pub(super) fn new(permit: OwnedSemaphorePermit, listener: &'static str) -> Self {
        crate::metrics::connection_opened(listener);
        Self {
            _permit: permit,
            listener,
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        crate::metrics::connection_closed(self.listener);
    }
}

/// One accepted connection, before hyper takes it over.
pub(super) struct Conn {
    pub(super) builder: Arc<auto::Builder<TokioExecutor>>,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) peer: SocketAddr,
    pub(super) opts: ServeOptions,
    /// Becomes `true` when the server drains.
    pub(super) stopping: watch::Receiver<bool>,
    /// Released when the connection ends.
    pub(super) _slot: ConnSlot,
}

impl Conn {
    /// TLS handshake (bounded by the handshake timeout, abandoned on shutdown), then HTTP.
    pub(super) async fn handshake(mut self, tcp: TcpStream, tls: ServerTls) {
        let peer = self.peer;
        let stream = tokio::select! {
            r = tls.accept(tcp) => match r {
                Ok(s) => s,
                Err(e) => {
                    // Scanners, wrong CAs and clients that give up: client noise, not our failure.
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            },
            _ = self.stopping.wait_for(|s| *s) => return,
        };
        self.serve(stream, Scheme::HTTPS).await;
    }

    /// Plain HTTP: waits, bounded by the header read timeout (and abandoned on shutdown), until the
    /// client has sent enough to tell HTTP/1 from the HTTP/2 preface, then serves. hyper's header timer
    /// only starts after the auto builder has read those bytes, so without this a connection that sends
    /// nothing (or half a preface) would stay open forever (hyperium/hyper#3756).
    pub(super) async fn plain(mut self, tcp: TcpStream) {
        let peer = self.peer;
        let limit = self.opts.header_read_timeout;
        let ready = tokio::select! {
            r = tokio::time::timeout(limit, first_bytes(&tcp)) => matches!(r, Ok(true)),
            _ = self.stopping.wait_for(|s| *s) => false,
        };
        if !ready {
            tracing::debug!(%peer, "connection closed: no request within header_read_timeout");
            return;
        }
        self.serve(tcp, Scheme::HTTP).await;
    }

    /// Serves HTTP on an established connection until it closes, drains or idles out.
    async fn serve<S>(self, io: S, scheme: Scheme)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            builder,
            handler,
            peer,
            opts,
            mut stopping,
            _slot,
        } = self;
        let activity = Activity::new();
        let track = Arc::clone(&activity);
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(scheme.clone());
            let busy = Busy::new(Arc::clone(&track));
            let fut = handler.call(req, peer);
            async move {
                let (head, body) = fut.await.into_parts();
                // The request counts as in flight until its response body is sent or dropped.
                Ok::<_, Infallible>(Response::from_parts(head, Guarded::new(body, busy)))
            }
        });
        // With upgrades: a handler may answer 101 and take the connection over (WebSocket tunnels).
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        tokio::pin!(conn);
        // Set once the connection was asked to shut down: a deadline to drop it if it stays idle.
        let mut closing: Option<Instant> = None;
        let result = loop {
            let drop_at = closing.map(|at| at + opts.header_read_timeout);
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = stopping.wait_for(|s| *s), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                () = activity.idle_for(opts.idle_timeout), if closing.is_none() => {
                    tracing::debug!(%peer, "connection closed: idle for idle_timeout");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                () = sleep_until(drop_at), if drop_at.is_some() => {
                    if activity.active() == 0 {
                        tracing::debug!(%peer, "connection dropped: still open after its shutdown");
                        return;
                    }
                    // Requests still run (bounded by request_timeout): look again later.
                    closing = Some(Instant::now());
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether the client sent enough bytes to choose a protocol: anything that is not a prefix of the
/// HTTP/2 preface, or the whole preface. `false` on EOF or error.
async fn first_bytes(tcp: &TcpStream) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        match tcp.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n >= PREFACE.len() || !PREFACE.starts_with(&buf[..n]) => return true,
            // Part of the preface: `peek` would return at once again; wait a little for the rest.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Requests in flight on one connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    active: AtomicUsize,
    since: Mutex<Instant>,
    changed: Notify,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            since: Mutex::new(Instant::now()),
            changed: Notify::new(),
        })
    }

    fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Resolves once no request has been in flight for `limit`. One timer per `limit` at most, not
    /// one per request: it fires, then looks at when the connection last went idle.
    async fn idle_for(&self, limit: Duration) {
        let timer = tokio::time::sleep(limit);
        tokio::pin!(timer);
        loop {
            timer.as_mut().await;
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                // Registered before the state is read, so the last request's end is not missed.
                changed.as_mut().enable();
                if self.active() == 0 {
                    break;
                }
                changed.await;
            }
            let since = *self.since.lock();
            let at = since + limit;
            if Instant::now() >= at {
                return;
            }
            timer.as_mut().reset(at);
        }
    }
}

/// One request in flight; dropped with its response body.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: Arc<Activity>) -> Self {
        // No wake-up: an idle timer that fires meanwhile sees the request and waits for it to end.
        a.active.fetch_add(1, Ordering::SeqCst);
        Self(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.since.lock() = Instant::now();
        // Only the last request to end starts the idle clock.
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}
