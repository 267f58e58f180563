//! The admin listener: `GET /healthz` (the process runs) and `GET /readyz` (the store answers and the
//! proxy is not draining). It listens apart from client traffic (loopback by default).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::{
    proxy::body::{full, Body},
    server::{Handler, ResponseFuture},
    store::Store,
};

/// Readiness shared between the proxy and the admin listener.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    /// Marks the proxy as draining: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// The admin endpoints.
#[derive(Debug)]
pub struct Admin {
    store: Arc<dyn Store>,
    readiness: Arc<Readiness>,
}

impl Admin {
    /// Admin endpoints over a store and a readiness latch.
    pub fn new(store: Arc<dyn Store>, readiness: Arc<Readiness>) -> Self {
        Self { store, readiness }
    }

    async fn route(&self, method: Method, path: &str) -> Response<Body> {
        match (method, path) {
            (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (Method::GET, "/readyz") => {
                if self.readiness.is_draining() {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
                }
                match self.store.ping().await {
                    Ok(()) => text(StatusCode::OK, "ready\n"),
                    Err(e) => {
                        tracing::warn!(error = %e, "readiness: store does not answer");
                        text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
                    }
                }
            }
            (_, "/healthz" | "/readyz") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

impl Handler for Admin {
    fn call(&self, req: Request<Incoming>, _peer: SocketAddr) -> ResponseFuture {
        let store = Arc::clone(&self.store);
        let readiness = Arc::clone(&self.readiness);
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        Box::pin(async move { Admin { store, readiness }.route(method, &path).await })
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
