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

pub mod shutdown;
pub mod tls;

use std::{
    convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration,
};

use http::{uri::Scheme, Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::proxy::Body;

pub use tls::ServerTls;

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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    // Tells tasks still in their TLS handshake to give up (they are not hyper connections yet, so the
    // graceful shutdown cannot reach them, and their watcher would hold up its completion).
    let (stopping_tx, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
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
                    watcher: graceful.watcher(),
                    peer,
                };
                match &tls {
                    None => {
                        tokio::spawn(conn.plain(stream, opts.header_read_timeout, stopping.clone()));
                    }
                    Some(tls) => {
                        tokio::spawn(conn.handshake(stream, tls.clone(), stopping.clone()));
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    tokio::select! {
        () = graceful.shutdown() => Drain::Complete,
        () = tokio::time::sleep(opts.grace) => Drain::TimedOut,
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

/// One accepted connection, before hyper takes it over.
struct Conn {
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: Arc<dyn Handler>,
    /// Taken before the handshake, so a connection that completes it after shutdown began is closed
    /// gracefully at once instead of being served.
    watcher: Watcher,
    peer: SocketAddr,
}

impl Conn {
    /// TLS handshake (bounded by the handshake timeout, abandoned on shutdown), then HTTP.
    async fn handshake(self, tcp: TcpStream, tls: ServerTls, mut stopping: watch::Receiver<bool>) {
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
            _ = stopping.wait_for(|s| *s) => return,
        };
        self.serve(stream, Scheme::HTTPS).await;
    }

    /// Plain HTTP: waits, bounded by the header read timeout (and abandoned on shutdown), until the
    /// client has sent enough to tell HTTP/1 from the HTTP/2 preface, then serves. hyper's header timer
    /// only starts after the auto builder has read those bytes, so without this a connection that sends
    /// nothing (or half a preface) would stay open forever (hyperium/hyper#3756).
    async fn plain(self, tcp: TcpStream, limit: Duration, mut stopping: watch::Receiver<bool>) {
        let peer = self.peer;
        let ready = tokio::select! {
            r = tokio::time::timeout(limit, first_bytes(&tcp)) => matches!(r, Ok(true)),
            _ = stopping.wait_for(|s| *s) => false,
        };
        if !ready {
            tracing::debug!(%peer, "connection closed: no request within header_read_timeout");
            return;
        }
        self.serve(tcp, Scheme::HTTP).await;
    }

    /// Serves HTTP on an established connection until it closes (or drains).
    async fn serve<S>(self, io: S, scheme: Scheme)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            builder,
            handler,
            watcher,
            peer,
        } = self;
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(scheme.clone());
            let fut = handler.call(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        // With upgrades: a handler may answer 101 and take the connection over (WebSocket tunnels).
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}
