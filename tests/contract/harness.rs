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
//!
//! A request whose body must arrive slowly (or never) is built with [`streaming`]: its body comes from
//! a channel the test feeds. The store is read through [`Pipeline::records`] (the admin view) and
//! [`Copying`] wraps a store so that every read is a fresh copy, as with Redis.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use idemproxy::{
    body::{full, Body, RequestBody},
    clock::ManualClock,
    config::{Config, Overrides},
    key::{Fingerprint, StoreKey},
    metrics::Outcome,
    proxy::Proxy,
    store::{
        memory::MemoryStore, BackendStats, ClaimOutcome, Committed, KeyWatch, NewResult, Record,
        Store, StoreAdmin, StoreError, StoreUpkeep, SweepStats,
    },
    upstream::{Forward, ResponseBody, SendFuture, UpstreamError},
};
use tokio::{
    sync::{mpsc, oneshot, Notify},
    task::JoinHandle,
};

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
    pub async fn send<B: RequestBody>(&self, req: Request<B>) -> Reply {
        self.send_from(PEER.parse().unwrap(), req).await
    }

    /// Sends a request from `peer` and reads the whole answer.
    pub async fn send_from<B: RequestBody>(&self, peer: SocketAddr, req: Request<B>) -> Reply {
        let (resp, outcome) = Arc::clone(&self.proxy).handle(req, peer).await;
        Reply::read(resp, outcome).await
    }

    /// Sends a request in a task of its own (for requests that wait); see [`answer`].
    pub fn spawn(self: &Arc<Self>, req: Request<Full<Bytes>>) -> JoinHandle<Reply> {
        let p = Arc::clone(self);
        tokio::spawn(async move { p.send(req).await })
    }

    /// Every live record of client key `key` on route `route` (one per scope), as the admin API
    /// sees them.
    pub async fn records(&self, route: &str, key: &str) -> Vec<(StoreKey, Record)> {
        self.store
            .list(&StoreKey::id_of(route, key))
            .await
            .expect("listing the store")
    }

    /// One sweep of the store: how many expired records it deleted.
    pub async fn sweep(&self) -> u64 {
        self.store
            .sweep()
            .await
            .expect("sweeping the store")
            .expired
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) {
        self.store.flush().await.expect("flushing the store");
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

/// A request whose body the test sends bit by bit through the returned [`BodySender`].
pub fn streaming(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (Request<ChannelBody>, BodySender) {
    let (tx, rx) = mpsc::channel(16);
    let mut b = Request::builder().method(method).uri(path);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    (b.body(ChannelBody(rx)).unwrap(), BodySender(tx))
}

/// A request body fed from a channel: it ends when the [`BodySender`] is dropped, and stalls while
/// the sender is kept and nothing is sent.
#[derive(Debug)]
pub struct ChannelBody(mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// Feeds a [`ChannelBody`].
#[derive(Debug)]
pub struct BodySender(mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>);

impl BodySender {
    /// Sends one chunk of the body (the request may already be answered: then nothing happens).
    pub async fn send(&self, chunk: &str) {
        let _ = self
            .0
            .send(Ok(Frame::data(Bytes::from(chunk.to_owned()))))
            .await;
    }
}

/// The answer of a request sent with [`Pipeline::spawn`] (at most 10 s).
pub async fn answer(h: JoinHandle<Reply>) -> Reply {
    tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .expect("answer within 10 s")
        .expect("request task panicked")
}

/// Lets every other task of a current-thread runtime run until it waits (a request that is
/// answered at once is answered after this).
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
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

    /// Asserts an RFC 9457 problem the proxy made: `status`, `application/problem+json`, and the
    /// members type, title, status, detail and `code`.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{self:?}: {}", self.text());
        assert_eq!(self.code(), code, "{}", self.text());
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(v["status"].as_u64(), Some(u64::from(status)), "{v}");
        for member in ["type", "title", "detail"] {
            let text = v[member].as_str().unwrap_or_default();
            assert!(!text.is_empty(), "no `{member}` in {v}");
        }
    }

    /// The `Retry-After` header in seconds.
    pub fn retry_after(&self) -> u64 {
        self.header("retry-after")
            .parse()
            .unwrap_or_else(|_| panic!("no Retry-After in {self:?}"))
    }

    /// Whether this is a replay (`Idempotent-Replayed: true`).
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == "true"
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
    /// Waits for the gate, then answers this status and body.
    HoldThen(oneshot::Receiver<()>, StatusCode, Bytes),
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

    /// Holds the next request until the returned sender is sent to, then answers `status` and `body`.
    pub fn hold_next_then(&self, status: u16, body: &str) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.then(Script::HoldThen(
            rx,
            StatusCode::from_u16(status).unwrap(),
            Bytes::from(body.to_owned()),
        ));
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
            Some(Script::HoldThen(gate, status, body)) => {
                if tokio::time::timeout(timeout, gate).await.is_err() {
                    return Err(UpstreamError::Timeout);
                }
                (status, Vec::new(), body)
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

/// A store whose every read hands out a fresh copy of the recorded body, as Redis does (it sends
/// the record again for every claim), so that what the proxy itself shares can be told apart from
/// what the store shares.
#[derive(Debug)]
pub struct Copying(pub Arc<dyn Store>);

fn fresh(outcome: ClaimOutcome) -> ClaimOutcome {
    match outcome {
        ClaimOutcome::Completed(mut c) => {
            c.body = Bytes::copy_from_slice(&c.body);
            ClaimOutcome::Completed(c)
        }
        other => other,
    }
}

#[async_trait]
impl Store for Copying {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.0.claim(key, fp, lease).await.map(fresh)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        self.0.complete(key, token, result, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        self.0.release(key, token).await
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.0.watch(key)
    }

    fn abandon(&self, token: u64) {
        self.0.abandon(token);
    }
}

#[async_trait]
impl StoreAdmin for Copying {
    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.0.lookup(key).await
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        self.0.list(id).await
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        self.0.purge(id).await
    }
}

#[async_trait]
impl StoreUpkeep for Copying {
    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        self.0.sweep().await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.0.flush().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().await
    }

    fn backend(&self) -> &'static str {
        "copying"
    }

    fn stats(&self) -> BackendStats {
        self.0.stats()
    }
}
