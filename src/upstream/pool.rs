//! HTTP/1.1 connections to a plain-`http` upstream, pooled per serving thread, on hyper's
//! connection-level client (`hyper::client::conn::http1`).
//!
//! Each serving thread keeps its own idle list (`thread_local`), so a request takes a connection
//! without a lock shared between threads, and the connection's task runs on the thread that made it
//! (see `server::Workers`). A connection goes back to the list of the thread that finishes reading
//! its response body, once the body has ended; a body dropped before its end takes the connection
//! with it (hyper closes it: HTTP/1 cannot abandon one response and go on).
//!
//! ```text
//!  checkout ─▶ ready? ─▶ try_send_request ─▶ response head ─▶ body streamed ─▶ end ─▶ checkin
//!     │ none idle            │ not sent: stale connection, next one
//!     ▼                      ▼ sent, then failed: the upstream may have seen it
//!  connect (TCP_NODELAY, keepalive) + handshake, its task spawned on this thread
//! ```
//!
//! Idle connections are kept at most [`IDLE_TIMEOUT`], newest first; a reaper per thread drops the
//! older ones, and at most [`MAX_IDLE`] are kept per thread.

use std::{
    cell::RefCell,
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use thread_local::ThreadLocal;

use crate::body::{Body, BoxError};

/// How long an idle connection is kept.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most idle connections kept per thread.
pub(super) const MAX_IDLE: usize = 1024;

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

#[derive(Default)]
struct ThreadPool {
    /// Oldest first; taken from the back.
    idle: RefCell<VecDeque<Idle>>,
}

impl ThreadPool {
    fn prune(idle: &mut VecDeque<Idle>, now: Instant) {
        while idle
            .front()
            .is_some_and(|c| c.sender.is_closed() || now.duration_since(c.since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
    }
}

/// The idle connections of every serving thread.
pub(super) struct Pool {
    threads: ThreadLocal<ThreadPool>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            threads: ThreadLocal::new(),
        })
    }

    /// This thread's list; made (and its reaper started) on the thread's first use.
    fn local(self: &Arc<Self>) -> &ThreadPool {
        self.threads.get_or(|| {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(reap(Arc::downgrade(self)));
            }
            ThreadPool::default()
        })
    }

    /// The newest idle connection of this thread that is still open.
    pub(super) fn checkout(self: &Arc<Self>) -> Option<SendRequest<Body>> {
        let mut idle = self.local().idle.borrow_mut();
        // Oldest first: once the lapsed ones are off the front, the rest are young enough.
        ThreadPool::prune(&mut idle, Instant::now());
        std::iter::from_fn(|| idle.pop_back())
            .find(|c| !c.sender.is_closed())
            .map(|c| c.sender)
    }

    /// Keeps a connection whose exchange is over for the next request of this thread.
    fn checkin(self: &Arc<Self>, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.local().idle.borrow_mut();
        let now = Instant::now();
        ThreadPool::prune(&mut idle, now);
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { sender, since: now });
        }
    }

    /// A new connection: TCP (`TCP_NODELAY`, keepalive probes after 60 s) and the HTTP/1 handshake;
    /// the connection's task runs on this thread's runtime.
    pub(super) async fn connect(
        authority: &http::uri::Authority,
    ) -> std::io::Result<SendRequest<Body>> {
        let port = authority.port_u16().unwrap_or(80);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// A response body that gives its connection back to the pool when it ends.
    pub(super) fn body(
        self: &Arc<Self>,
        inner: Incoming,
        sender: SendRequest<Body>,
    ) -> ResponseBody {
        let mut b = ResponseBody {
            inner: Source::Wire(inner),
            back: Some((sender, Arc::clone(self))),
        };
        b.check_end(false);
        b
    }
}

/// Drops this thread's connections that have been idle too long, while the pool lives.
async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 3).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if let Some(local) = pool.threads.get() {
            ThreadPool::prune(&mut local.idle.borrow_mut(), Instant::now());
        }
    }
}

/// The body of an upstream response. From a pooled connection, it returns the connection when it
/// ends; from any other (TLS, HTTP/2), it is the connection's body as is; a forwarder that is not a
/// network client (a scripted test upstream) gives any [`Body`].
pub struct ResponseBody {
    inner: Source,
    back: Option<(SendRequest<Body>, Arc<Pool>)>,
}

enum Source {
    Wire(Incoming),
    Other(Body),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("wire", &matches!(self.inner, Source::Wire(_)))
            .field("pooled", &self.back.is_some())
            .finish()
    }
}

impl ResponseBody {
    /// A body not tied to a pooled connection.
    pub(super) fn unpooled(inner: Incoming) -> Self {
        Self {
            inner: Source::Wire(inner),
            back: None,
        }
    }

    /// A body from anywhere but the network (what a scripted upstream answers).
    pub fn new(body: Body) -> Self {
        Self {
            inner: Source::Other(body),
            back: None,
        }
    }

    /// Gives the connection back once the body has ended (by its length, or its last frame).
    fn check_end(&mut self, ended: bool) {
        if ended || self.is_end_stream() {
            if let Some((sender, pool)) = self.back.take() {
                pool.checkin(sender);
            }
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.inner {
            Source::Wire(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
            Source::Other(b) => Pin::new(b).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => self.check_end(true),
            // A broken body: its connection is not reused.
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Ready(Some(Ok(_))) => self.check_end(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Wire(b) => b.is_end_stream(),
            Source::Other(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Wire(b) => b.size_hint(),
            Source::Other(b) => b.size_hint(),
        }
    }
}
