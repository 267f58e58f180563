//! A per-key counting upstream for crash and soak runs: a real hyper HTTP/1.1 server on 127.0.0.1, on its
//! own thread and runtime, that counts every request by its `Idempotency-Key` (O(1) per request, so runs
//! with tens of thousands of keys stay cheap) and tracks its open connections (so a test can wait until a
//! killed proxy's connections are gone before it reads the counts).
//!
//! Every request: body read, then counted (`n` = hits of that key so far, 1-based; requests without a key
//! count under `""`), then an optional delay (`?ms=N` in the query), then `201 text/plain` with the body
//! `{n} {METHOD} {path} {key} {request body}`. A request forwarded twice therefore also gets a different
//! body the second time (`2 …`), which a replay comparison notices on its own.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::{oneshot, watch};

struct State {
    hits: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
    /// Open connections.
    conns: watch::Sender<usize>,
}

/// The running upstream; dropping it stops the server.
pub struct KeyedUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for KeyedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedUpstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl KeyedUpstream {
    /// Bind 127.0.0.1:0 and serve on a dedicated thread.
    pub fn start() -> KeyedUpstream {
        let state = Arc::new(State {
            hits: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
            conns: watch::channel(0).0,
        });
        let st = state.clone();
        let (addr, stop_tx) = super::server::spawn("keyed-upstream", move |stream| {
            let _ = stream.set_nodelay(true);
            let st = st.clone();
            st.conns.send_modify(|n| *n += 1);
            async move {
                let st2 = st.clone();
                let svc = service_fn(move |req| handle(st2.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                st.conns.send_modify(|n| *n -= 1);
            }
        });
        KeyedUpstream {
            addr,
            state,
            stop: Some(stop_tx),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received with `Idempotency-Key: key` (the raw value as forwarded).
    pub fn hits(&self, key: &str) -> u64 {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// A copy of every key's count.
    pub fn snapshot(&self) -> HashMap<String, u64> {
        self.state.hits.lock().unwrap().clone()
    }

    /// Every request received.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        *self.state.conns.borrow()
    }

    /// Event-driven wait (bounded) until no connection is open: after a proxy is killed, every request it
    /// had sent has then been counted. Panics after `limit`.
    pub async fn wait_idle(&self, limit: Duration) {
        let mut rx = self.state.conns.subscribe();
        if tokio::time::timeout(limit, rx.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            panic!(
                "keyed upstream still has {} open connection(s) after {limit:?}",
                self.open_connections()
            );
        }
    }
}

impl Drop for KeyedUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn delay_ms(query: Option<&str>) -> u64 {
    query
        .and_then(|q| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == "ms").then(|| v.parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

async fn handle(
    st: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(Response::builder()
            .status(400)
            .body(Full::new(Bytes::from_static(b"bad body")))
            .unwrap());
    };
    let key = parts
        .headers
        .get("idempotency-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let n = {
        let mut hits = st.hits.lock().unwrap();
        let n = hits.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    st.total.fetch_add(1, Ordering::SeqCst);
    let ms = delay_ms(parts.uri.query());
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut text = format!("{n} {} {} {key} ", parts.method, parts.uri.path()).into_bytes();
    text.extend_from_slice(&body);
    Ok(Response::builder()
        .status(201)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(text)))
        .unwrap())
}
