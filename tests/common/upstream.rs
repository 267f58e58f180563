//! A hit-counting upstream: a real hyper 1 HTTP/1.1 server on 127.0.0.1, on its own thread and runtime (so
//! a test blocked on the proxy never stalls it).
//!
//! Routes (the anyonce fixture contract first, then test helpers):
//! - `POST /echo` → 201, the body's bytes and the request's `Content-Type` (`application/octet-stream` if none).
//! - `POST /status/{code}` → `{code}`, `text/plain` body `status:{code}`.
//! - `POST /slow?ms=N` → after N ms, 200 `slept:N`.
//! - `POST /large?bytes=N` → 200, N bytes of `x` (`application/octet-stream`).
//! - `GET /counter` → `{"count": n}`, n = hits on the four routes above since the last reset.
//! - `POST /reset` → 204, counter = 0.
//! - `POST /gate/{name}` → held until the test releases it ([`Upstream::release`]) or opens the gate
//!   ([`Upstream::open`]); body `gate:{name}#{arrival}` (1-based arrival number on that gate).
//! - `* /headers` → 200, JSON object: lowercase header name → array of values, as received.
//! - `POST /cookie` → 200 with `Set-Cookie` and `X-Cookie-Route: 1`, body `cookie`.
//! - `POST /hop` → 200 with hop-by-hop response headers (`Connection: X-Hop`, `X-Hop`, `Keep-Alive`) and
//!   `X-End: kept`, body `hop`.
//! - anything else → 200 `text/plain` body `hit {n} {METHOD} {path}` (n = hits on that path so far).
//!
//! Every request is recorded (after its body was read) before it is answered; tests can await conditions on
//! the record ([`Upstream::wait_for`]) instead of sleeping.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{oneshot, watch};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lowercase names, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Gate {
    open: bool,
    arrivals: u64,
    waiting: VecDeque<oneshot::Sender<u16>>,
}

struct State {
    counter: Mutex<u64>,
    requests: Mutex<Vec<Received>>,
    gates: Mutex<HashMap<String, Gate>>,
    /// Bumped after every change a test may wait on.
    changed: watch::Sender<u64>,
}

impl State {
    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// The running upstream. Dropping it stops the server.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Upstream {
    /// Bind 127.0.0.1:0 and serve on a dedicated thread.
    pub fn start() -> Upstream {
        let (changed, _) = watch::channel(0);
        let state = Arc::new(State {
            counter: Mutex::new(0),
            requests: Mutex::new(Vec::new()),
            gates: Mutex::new(HashMap::new()),
            changed,
        });
        let st = state.clone();
        let (addr, stop_tx) = super::server::spawn("upstream", move |stream| {
            let st = st.clone();
            async move {
                let svc = service_fn(move |req| handle(st.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        });
        Upstream {
            addr,
            state,
            stop: Some(stop_tx),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn hits_total(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Requests whose path (query excluded) is `path`.
    pub fn hits_path(&self, path: &str) -> usize {
        self.count(|r| r.path == path)
    }

    /// Requests that carried `Idempotency-Key: {key}` exactly (the raw value as forwarded).
    pub fn hits_key(&self, key: &str) -> usize {
        self.count(|r| r.header("idempotency-key") == Some(key))
    }

    pub fn count(&self, pred: impl Fn(&Received) -> bool) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| pred(r))
            .count()
    }

    /// The fixture counter (what `GET /counter` reports).
    pub fn counter(&self) -> u64 {
        *self.state.counter.lock().unwrap()
    }

    /// Requests that have arrived on gate `name` (held or not).
    pub fn gate_arrivals(&self, name: &str) -> u64 {
        self.state
            .gates
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |g| g.arrivals)
    }

    /// Requests currently held on gate `name`.
    pub fn gate_waiting(&self, name: &str) -> usize {
        self.state
            .gates
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |g| g.waiting.len())
    }

    /// Event-driven wait (bounded by `limit`) until `cond` holds on this upstream; panics with `what` otherwise.
    pub async fn wait_for(&self, limit: Duration, what: &str, cond: impl Fn(&Upstream) -> bool) {
        let mut rx = self.state.changed.subscribe();
        let fut = async {
            loop {
                if cond(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    panic!("upstream stopped while waiting for {what}");
                }
            }
        };
        if tokio::time::timeout(limit, fut).await.is_err() {
            panic!(
                "timed out after {limit:?} waiting for upstream condition: {what}; requests so far: {:?}",
                self.requests()
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect::<Vec<_>>()
            );
        }
    }

    /// Wait until at least `n` requests have arrived on gate `name`.
    pub async fn wait_gate_arrivals(&self, name: &str, n: u64) {
        self.wait_for(
            Duration::from_secs(15),
            &format!("{n} arrival(s) on gate {name}"),
            |u| u.gate_arrivals(name) >= n,
        )
        .await;
    }

    /// Answer the oldest request held on gate `name` with `status`; panics if none is held.
    pub fn release(&self, name: &str, status: u16) {
        let tx = {
            let mut gates = self.state.gates.lock().unwrap();
            gates
                .get_mut(name)
                .and_then(|g| g.waiting.pop_front())
                .unwrap_or_else(|| panic!("no request held on gate {name}"))
        };
        let _ = tx.send(status);
        self.state.bump();
    }

    /// Open gate `name`: every held and every future request on it is answered 200 at once.
    pub fn open(&self, name: &str) {
        let waiting: Vec<_> = {
            let mut gates = self.state.gates.lock().unwrap();
            let g = gates.entry(name.to_string()).or_default();
            g.open = true;
            g.waiting.drain(..).collect()
        };
        for tx in waiting {
            let _ = tx.send(200);
        }
        self.state.bump();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An address with nothing listening on it (bound once to get a free port, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

type Resp = Response<Full<Bytes>>;

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap()
}

fn query_param(query: Option<&str>, name: &str) -> Option<u64> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k == name {
            v.parse().ok()
        } else {
            None
        }
    })
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(reply(400, "text/plain", format!("bad body: {e}"))),
    };
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let content_type = parts
        .headers
        .get("content-type")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());

    let is_fixture =
        path == "/echo" || path.starts_with("/status/") || path == "/slow" || path == "/large";
    if is_fixture {
        *st.counter.lock().unwrap() += 1;
    }
    let path_hits = {
        let mut reqs = st.requests.lock().unwrap();
        reqs.push(Received {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            headers: headers.clone(),
            body: body.clone(),
        });
        reqs.iter().filter(|r| r.path == path).count()
    };

    // Gates register their arrival themselves, so that the arrival event and the held state are one change.
    if let Some(name) = path.strip_prefix("/gate/") {
        let name = name.to_string();
        let (arrival, rx) = {
            let mut gates = st.gates.lock().unwrap();
            let g = gates.entry(name.clone()).or_default();
            g.arrivals += 1;
            if g.open {
                (g.arrivals, None)
            } else {
                let (tx, rx) = oneshot::channel();
                g.waiting.push_back(tx);
                (g.arrivals, Some(rx))
            }
        };
        st.bump();
        let status = match rx {
            None => 200,
            Some(rx) => rx.await.unwrap_or(500),
        };
        return Ok(reply(
            status,
            "text/plain",
            format!("gate:{name}#{arrival}"),
        ));
    }
    st.bump();

    let resp = match path.as_str() {
        "/echo" => reply(
            201,
            content_type
                .as_deref()
                .unwrap_or("application/octet-stream"),
            body,
        ),
        "/slow" => {
            let ms = query_param(query.as_deref(), "ms").unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            reply(200, "text/plain", format!("slept:{ms}"))
        }
        "/large" => {
            let n = query_param(query.as_deref(), "bytes").unwrap_or(0);
            reply(
                200,
                "application/octet-stream",
                vec![b'x'; usize::try_from(n).unwrap()],
            )
        }
        "/counter" => {
            let n = *st.counter.lock().unwrap();
            reply(
                200,
                "application/json",
                serde_json::json!({ "count": n }).to_string(),
            )
        }
        "/reset" => {
            *st.counter.lock().unwrap() = 0;
            Response::builder()
                .status(204)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
        "/headers" => {
            let mut map = serde_json::Map::new();
            for (n, v) in &headers {
                map.entry(n.clone())
                    .or_insert_with(|| serde_json::Value::Array(Vec::new()))
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::Value::String(v.clone()));
            }
            reply(
                200,
                "application/json",
                serde_json::Value::Object(map).to_string(),
            )
        }
        "/cookie" => Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("set-cookie", "session=s3cr3t; Path=/; HttpOnly")
            .header("x-cookie-route", "1")
            .body(Full::new(Bytes::from_static(b"cookie")))
            .unwrap(),
        "/hop" => Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("connection", "X-Hop")
            .header("x-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("x-end", "kept")
            .body(Full::new(Bytes::from_static(b"hop")))
            .unwrap(),
        p => {
            if let Some(code) = p.strip_prefix("/status/") {
                match code.parse::<u16>() {
                    Ok(c) if (200..=599).contains(&c) => {
                        reply(c, "text/plain", format!("status:{c}"))
                    }
                    _ => reply(400, "text/plain", "bad status"),
                }
            } else {
                reply(200, "text/plain", format!("hit {path_hits} {method} {p}"))
            }
        }
    };
    Ok(resp)
}
