//! Serving HTTP: the accept loop, optional TLS termination ([`tls`]), per-connection hyper setup
//! (HTTP/1.1 and h2 via the auto builder: h2c by prior knowledge, or ALPN on TLS; HTTP/1.1 upgrades
//! enabled), and graceful drain. Knows nothing about idempotency: it runs any [`Handler`].
//!
//! Every request handed to a [`Handler`] carries, as an [`http::uri::Scheme`] extension, the scheme the
//! client connected with (`https` on a TLS listener): the one trustworthy source for
//! `X-Forwarded-Proto` (an h2 client's `:scheme` is whatever the client claims).
//!
//! Drain: when `shutdown` resolves the listener closes, pending TLS handshakes are abandoned at once
//! (a client that never finishes its handshake must not hold up the exit), and open connections finish
//! the request they serve. Upgraded connections (tunnels) have left hyper by then and are not waited for.
//!
//! Limits (contract "Limits and hostile input"): at most `max_connections` connections are served at
//! once (beyond it the accept loop stops accepting and new ones wait in the kernel's backlog); a
//! connection with no request in flight for `idle_timeout` is closed, HTTP/1 keep-alive and HTTP/2
//! alike (see `conn`), which also bounds an HTTP/2 client that never finishes its headers; HTTP/2
//! connections are pinged, so a vanished client is noticed while a long request runs.

mod conn;
pub mod shutdown;
pub mod tls;
mod workers;

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};
use tokio_util::task::TaskTracker;

use conn::{Conn, ConnSlot};

use crate::body::Body;

pub use tls::ServerTls;
pub use workers::Workers;

/// A boxed response future.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from `peer`.
    fn call(&self, req: Request<Incoming>, peer: SocketAddr) -> ResponseFuture;
}

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Bound on reading request headers (HTTP/1).
    pub header_read_timeout: Duration,
    /// How long the drain waits for open requests once shutdown begins.
    pub grace: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Which listener this is, for the `idemproxy_connections{listener}` gauge.
    pub listener: &'static str,
}

impl ServeOptions {
    /// Options with the built-in defaults for the limits (tests, the demo).
    pub fn new(header_read_timeout: Duration, grace: Duration) -> Self {
        Self {
            header_read_timeout,
            grace,
            idle_timeout: crate::config::defaults::DEFAULT_IDLE_TIMEOUT,
            max_connections: crate::config::defaults::DEFAULT_MAX_CONNECTIONS as usize,
            listener: "proxy",
        }
    }
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished its requests.
    Complete,
    /// The grace period ran out with connections still open.
    TimedOut,
}

/// Accepts plain-HTTP connections until `shutdown` resolves, then stops accepting and drains open
/// connections (each finishes the request it is serving; idle keep-alive connections are closed).
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    serve_with(listener, None, handler, opts, shutdown).await
}

/// Like [`serve`], with TLS termination when `tls` is set.
pub async fn serve_with(
    listener: TcpListener,
    tls: Option<ServerTls>,
    handler: Arc<dyn Handler>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    serve_on(listener, tls, handler, opts, None, shutdown).await
}

/// Like [`serve_with`]; with `workers`, each connection is served on one of the worker threads
/// (see [`Workers`]) instead of the calling runtime.
pub async fn serve_on(
    listener: TcpListener,
    tls: Option<ServerTls>,
    handler: Arc<dyn Handler>,
    opts: ServeOptions,
    workers: Option<Arc<Workers>>,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // A client that vanished without a FIN is noticed while its requests run.
        .keep_alive_interval(Some(opts.idle_timeout.min(Duration::from_secs(30))))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    // Tells connections to finish (drain), and tasks still in their TLS handshake to give up.
    let (stopping_tx, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the cap, stop accepting and leave new connections in the backlog.
        let slot = tokio::select! {
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = Conn {
                    builder: Arc::clone(&builder),
                    handler: Arc::clone(&handler),
                    peer,
                    opts,
                    stopping: stopping.clone(),
                    _slot: ConnSlot::new(slot, opts.listener),
                };
                let serve = {
                    let tls = tls.clone();
                    move |stream: tokio::net::TcpStream| -> Pin<Box<dyn Future<Output = ()> + Send>> {
                        match tls {
                            None => Box::pin(conn.plain(stream)),
                            Some(tls) => Box::pin(conn.handshake(stream, tls)),
                        }
                    }
                };
                match &workers {
                    None => {
                        tracker.spawn(serve(stream));
                    }
                    Some(w) => {
                        // Handed over as a std socket: the worker registers it with its own reactor.
                        let Ok(std_stream) = stream.into_std() else { continue };
                        // Counted by the drain from now on, not from when its thread picks it up.
                        let token = tracker.token();
                        let job: workers::Job = Box::new(move || {
                            Box::pin(async move {
                                match tokio::net::TcpStream::from_std(std_stream) {
                                    Ok(s) => serve(s).await,
                                    Err(e) => tracing::warn!(error = %e, "cannot serve an accepted connection"),
                                }
                                drop(token);
                            })
                        });
                        if w.submit(job).is_err() {
                            tracing::warn!("serving threads are stopped: connection dropped");
                        }
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    tracker.close();
    tokio::select! {
        () = tracker.wait() => Drain::Complete,
        () = tokio::time::sleep(opts.grace) => Drain::TimedOut,
    }
}
