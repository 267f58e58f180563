//! The pipeline in-process: a [`Pipeline`] is a real [`Proxy`] built from a TOML config, over the
//! memory store on a manual clock (or any store), forwarding to a [`Scripted`] upstream. No socket,
//! no port, no sleep: a request is a function call, and a test costs microseconds.
//!
//! ```ignore
//! let p = Pipeline::new("[defaults]\nrequired = true");
//! let first = p.post("/pay", Some("k1"), "{}").await;
//! let retry = p.post("/pay", Some("k1"), "{}").await;
//! assert_eq!(retry.outcome, Outcome::Replayed);
//! assert_eq!(p.upstream.hits(), 1);
//! ```

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idemproxy::{
    body::{full, Body},
    clock::ManualClock,
    config::{Config, Overrides},
    metrics::Outcome,
    proxy::Proxy,
    store::{memory::MemoryStore, Store},
    upstream::{Forward, ResponseBody, SendFuture, UpstreamError},
};
use tokio::sync::{oneshot, Notify};

/// What every test gets unless it says otherwise: an upstream URL (never dialled) and nothing else.
const BASE: &str = "[upstream]\nurl = \"http://upstream.test:8080\"\n";

/// The peer every request comes from unless a test says otherwise.
pub const PEER: &str = "203.0.113.7:40000";

/// A proxy, its store and its scripted upstream.
pub struct Pipeline {
    pub proxy: Arc<Proxy>,
    pub store: Arc<dyn Store>,
    pub upstream: Arc<Scripted>,
    /// The memory store's clock (unused with [`Pipeline::over`]).
    pub clock: Arc<ManualClock>,
    pub config: Config,
}

impl Pipeline {
    /// A pipeline for `config` (TOML; `[upstream] url` may be left out) over the memory store.
    pub fn new(config: &str) -> Self {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(clock.clone()));
        Self::build(config, store, clock)
    }

    /// A pipeline for `config` over a store of the test's choosing.
    pub fn over(config: &str, store: Arc<dyn Store>) -> Self {
        Self::build(config, store, Arc::new(ManualClock::new(0)))
    }

    fn build(config: &str, store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Self {
        let text = if config.contains("[upstream]") {
            config.to_owned()
        } else {
            format!("{BASE}{config}")
        };
        let config = Config::parse(&text, &Overrides::default())
            .unwrap_or_else(|e| panic!("invalid test config:\n{e}\n---\n{text}"));
        let upstream = Arc::new(Scripted::default());
        let forward: Arc<dyn Forward> = upstream.clone();
        let proxy = Proxy::with_upstream(
            &config,
            Arc::clone(&store),
            Box::new(move |_| Ok(Arc::clone(&forward))),
        )
        .expect("building the proxy");
        Self {
            proxy: Arc::new(proxy),
            store,
            upstream,
            clock,
            config,
        }
    }

    /// Sends a request from [`PEER`] and reads the whole answer.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        self.send_from(PEER.parse().unwrap(), req).await
    }

    /// Sends a request from `peer` and reads the whole answer.
    pub async fn send_from(&self, peer: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
        let (resp, outcome) = Arc::clone(&self.proxy).handle(req, peer).await;
        Reply::read(resp, outcome).await
    }

    /// `POST path` with `Idempotency-Key: key` (when given) and a text body.
    pub async fn post(&self, path: &str, key: Option<&str>, body: &str) -> Reply {
        let mut b = Request::post(path).header("content-type", "text/plain");
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        self.send(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await
    }
}

/// A request: `method path` with `headers` and `body`.
pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

/// A whole answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub outcome: Outcome,
}

impl Reply {
    async fn read(resp: Response<Body>, outcome: Outcome) -> Self {
        let (head, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .expect("response body within 10 s")
            .expect("response body")
            .to_bytes();
        Self {
            status: head.status,
            headers: head.headers,
            body,
            outcome,
        }
    }

    /// A header's value as text ("" if absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or(""))
    }

    /// The body as text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }

    /// The problem+json `code` of an error the proxy made.
    pub fn code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            "application/problem+json",
            "not a problem: {self:?}"
        );
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        v["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// One request as the upstream got it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How the scripted upstream answers one request.
#[derive(Debug)]
pub enum Script {
    /// This status, these headers, this body.
    Answer(StatusCode, Vec<(&'static str, String)>, Bytes),
    /// Could not connect: nothing was sent.
    Unreachable,
    /// Sent, then the exchange broke.
    Broken,
    /// No answer: waits out the exchange's timeout, then times out.
    Stall,
    /// Waits for the gate, then answers as by default.
    Hold(oneshot::Receiver<()>),
}

/// A scripted upstream: answers each request with the next [`Script`] queued, or by default
/// `200` with the body `hit N` (N counting from 1), and keeps every request it got.
#[derive(Debug, Default)]
pub struct Scripted {
    seen: Mutex<Vec<Seen>>,
    script: Mutex<VecDeque<Script>>,
    arrived: Notify,
}

impl Scripted {
    /// Queues how the next unscripted request is answered.
    pub fn then(&self, s: Script) {
        self.script.lock().unwrap().push_back(s);
    }

    /// Queues an answer.
    pub fn then_answer(&self, status: u16, headers: &[(&'static str, &str)], body: &str) {
        self.then(Script::Answer(
            StatusCode::from_u16(status).unwrap(),
            headers.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
            Bytes::from(body.to_owned()),
        ));
    }

    /// Holds the next request until the returned sender is sent to (or dropped).
    pub fn hold_next(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.then(Script::Hold(rx));
        tx
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Every request received, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The last request received.
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request reached the upstream")
    }

    /// Waits (at most 10 s) until `n` requests have arrived.
    pub async fn until_hits(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = self.arrived.notified();
                if self.hits() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} requests did not reach the upstream within 10 s"));
    }

    async fn answer(
        &self,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let script = self.script.lock().unwrap().pop_front();
        if let Some(Script::Unreachable) = script {
            return Err(UpstreamError::Connect(
                "scripted: connection refused".into(),
            ));
        }
        let (head, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map_err(UpstreamError::Failed)?
            .to_bytes();
        let n = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(Seen {
                method: head.method,
                uri: head.uri,
                headers: head.headers,
                body,
            });
            seen.len()
        };
        self.arrived.notify_waiters();
        let (status, headers, body) = match script {
            None => (StatusCode::OK, Vec::new(), Bytes::from(format!("hit {n}"))),
            Some(Script::Answer(s, h, b)) => (s, h, b),
            Some(Script::Unreachable) => unreachable!(),
            Some(Script::Broken) => {
                return Err(UpstreamError::Failed("scripted: connection reset".into()))
            }
            Some(Script::Stall) => {
                tokio::time::sleep(timeout).await;
                return Err(UpstreamError::Timeout);
            }
            Some(Script::Hold(gate)) => {
                if tokio::time::timeout(timeout, gate).await.is_err() {
                    return Err(UpstreamError::Timeout);
                }
                (StatusCode::OK, Vec::new(), Bytes::from(format!("hit {n}")))
            }
        };
        let mut resp = Response::new(ResponseBody::new(full(body)));
        *resp.status_mut() = status;
        for (name, value) in headers {
            resp.headers_mut().append(name, value.parse().unwrap());
        }
        Ok(resp)
    }
}

impl Forward for Scripted {
    fn send(&self, req: Request<Body>, timeout: Duration) -> SendFuture<'_> {
        Box::pin(self.answer(req, timeout))
    }
}
