//! `idemproxy demo`: a tiny counting upstream on a free loopback port, the proxy in front of it, and the
//! curl commands that show a replay. For a newcomer with nothing else running.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::{
    app::{self, AppError},
    body::{full, Body},
    config::{Config, Overrides},
    server::{self, Drain, Handler, ResponseFuture, ServeOptions},
};

/// The demo upstream: counts every request it serves; `GET /hits` reports the count.
#[derive(Debug, Default)]
pub struct CountingUpstream {
    hits: AtomicU64,
}

impl CountingUpstream {
    async fn answer(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.method() == Method::GET && req.uri().path() == "/hits" {
            let n = self.hits.load(Ordering::SeqCst);
            return json(StatusCode::OK, serde_json::json!({ "hits": n }));
        }
        let n = self.hits.fetch_add(1, Ordering::SeqCst) + 1;
        let method = req.method().to_string();
        let path = req.uri().path().to_owned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let shown = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
        json(
            StatusCode::CREATED,
            serde_json::json!({ "hit": n, "method": method, "path": path, "received": shown }),
        )
    }
}

impl Handler for Arc<CountingUpstream> {
    fn call(&self, req: Request<Incoming>, _peer: SocketAddr) -> ResponseFuture {
        Box::pin(Arc::clone(self).answer(req))
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(&v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(
    listen: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Drain, DemoError> {
    let up = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Upstream)?;
    let up_addr = up.local_addr().map_err(DemoError::Upstream)?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let opts = ServeOptions::new(Duration::from_secs(10), Duration::from_secs(5));
    let upstream = tokio::spawn(server::serve(
        up,
        Arc::new(Arc::new(CountingUpstream::default())),
        opts,
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    let dir = std::env::temp_dir().join(format!("idemproxy-demo-{}", std::process::id()));
    let text = format!(
        "[server]\nlisten = {listen:?}\n[upstream]\nurl = \"http://{up_addr}\"\n[store]\npath = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        dir.display().to_string()
    );
    let config = Config::parse(&text, &Overrides::default())
        .map_err(|e| DemoError::Config(e.to_string()))?;
    let p = config.server.listen;
    // A taken port is said before the banner invites anyone to curl it.
    if let Err(source) = std::net::TcpListener::bind(p) {
        let _ = stop_tx.send(true);
        let _ = upstream.await;
        return Err(DemoError::Listen { addr: p, source });
    }
    println!(
        "\nidemproxy demo: a counting upstream on http://{up_addr}, the proxy on http://{p}\n\
         Send the same payment twice; the second answer is replayed, the upstream runs once:\n\n  \
         curl -i -X POST http://{p}/payments -H 'Idempotency-Key: order-42' -H 'Content-Type: application/json' -d '{{\"amount\":100}}'\n  \
         curl -i -X POST http://{p}/payments -H 'Idempotency-Key: order-42' -H 'Content-Type: application/json' -d '{{\"amount\":100}}'\n\n\
         The second shows `Idempotent-Replayed: true` and the same \"hit\" number. Then:\n\n  \
         curl -s http://{p}/hits                     # upstream hit count (GET passes through)\n  \
         curl -i -X POST http://{p}/payments -H 'Idempotency-Key: order-42' -d '{{\"amount\":999}}'   # 422: same key, other payload\n\n\
         Ctrl-C stops the demo (its data dir {} is removed).\n",
        dir.display()
    );
    let result = app::run(config, None, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = upstream.await;
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(DemoError::App)
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The demo upstream could not listen.
    #[error("demo upstream: {0}")]
    Upstream(#[source] std::io::Error),
    /// The proxy's address is taken (or not ours to bind).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// `--listen`.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The generated config was refused (e.g. a bad --listen).
    #[error("demo config: {0}")]
    Config(String),
    /// The proxy failed.
    #[error(transparent)]
    App(#[from] AppError),
}
