//! The admin listener, apart from client traffic (loopback by default):
//!
//! - `GET /healthz`: 200 while the process runs. (`HEAD` works wherever `GET` does.)
//! - `GET /readyz`: 200 when the store answers and the proxy accepts; 503 while draining or when the
//!   store fails.
//! - `GET /metrics`: Prometheus text (see [`metrics`]).
//! - `GET|DELETE /admin/keys/{route}/{key}`: every record of a client key on a route (one per scope), or
//!   purge them. `Authorization: Bearer <token>` (compared in constant time): none → 401, wrong → 403;
//!   with no token configured `/admin/*` answers 404. The key is never logged whole.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::{
    body::{full, Body},
    clock::rfc3339,
    config::{defaults::DEFAULT_ROUTE_NAME, Config},
    key::{redact, IdempotencyKey, StoreKey},
    metrics,
    server::{Handler, ResponseFuture},
    store::{Record, Store},
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

/// What the admin endpoints need from the config (swapped on reload).
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// Bearer token for `/admin/*`; `None` disables them.
    pub token: Option<String>,
    /// Known route names (`default` included).
    pub routes: Vec<String>,
}

impl AdminSettings {
    /// The settings of a config.
    pub fn from_config(cfg: &Config) -> Self {
        let mut routes: Vec<String> = cfg.routes.iter().map(|r| r.name.clone()).collect();
        routes.push(DEFAULT_ROUTE_NAME.to_owned());
        Self {
            token: cfg.admin.token.clone(),
            routes,
        }
    }
}

/// The admin endpoints.
#[derive(Debug, Clone)]
pub struct Admin {
    store: Arc<dyn Store>,
    readiness: Arc<Readiness>,
    settings: Arc<ArcSwap<AdminSettings>>,
}

impl Admin {
    /// Admin endpoints over a store, a readiness latch and swappable settings.
    pub fn new(
        store: Arc<dyn Store>,
        readiness: Arc<Readiness>,
        settings: Arc<ArcSwap<AdminSettings>>,
    ) -> Self {
        Self {
            store,
            readiness,
            settings,
        }
    }

    async fn route(&self, method: Method, uri: &http::Uri, headers: &HeaderMap) -> Response<Body> {
        let path = uri.path();
        if let Some(rest) = path.strip_prefix("/admin/") {
            let force = uri
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "force=true"));
            return self.keys(method, rest, force, headers).await;
        }
        // HEAD is GET without a body (hyper leaves the body out): probes that use HEAD work.
        let method = if method == Method::HEAD {
            Method::GET
        } else {
            method
        };
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
            (Method::GET, "/metrics") => {
                // Store gauges (live bytes, size on disk) as of this scrape, not of the last sweep.
                metrics::store_stats(&self.store.stats());
                let mut r = Response::new(full(metrics::render()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (_, "/healthz" | "/readyz" | "/metrics") => {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                r
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// `/admin/keys/{route}/{key}`.
    /// `force`: `?force=true`, which lets `DELETE` purge a key whose request is still in flight.
    async fn keys(
        &self,
        method: Method,
        rest: &str,
        force: bool,
        headers: &HeaderMap,
    ) -> Response<Body> {
        let settings = self.settings.load();
        let Some(token) = settings.token.as_deref() else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        match bearer(headers) {
            None => {
                let mut r = text(StatusCode::UNAUTHORIZED, "bearer token required\n");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
            Some(given) if !constant_time_eq(given.as_bytes(), token.as_bytes()) => {
                return text(StatusCode::FORBIDDEN, "wrong token\n");
            }
            Some(_) => {}
        }
        let mut parts = rest.splitn(3, '/');
        let (Some("keys"), Some(route), Some(raw_key)) = (parts.next(), parts.next(), parts.next())
        else {
            return text(
                StatusCode::NOT_FOUND,
                "not found: use /admin/keys/{route}/{key}\n",
            );
        };
        let (Some(route), Some(key)) = (percent_decode(route), percent_decode(raw_key)) else {
            return text(StatusCode::BAD_REQUEST, "invalid percent-encoding\n");
        };
        if !settings.routes.contains(&route) {
            return text(StatusCode::NOT_FOUND, "no such route\n");
        }
        let key = match IdempotencyKey::new(&key) {
            Ok(k) => k,
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("invalid key: {e}\n")),
        };
        let id = StoreKey::id_of(&route, key.as_str());
        match method {
            Method::GET => match self.store.list(&id).await {
                Ok(records) if records.is_empty() => {
                    text(StatusCode::NOT_FOUND, "no records for this key\n")
                }
                Ok(records) => json(&serde_json::json!({
                    "route": route,
                    "key": key.as_str(),
                    "records": records.iter().map(|(k, r)| record_json(k, r)).collect::<Vec<_>>(),
                })),
                Err(e) => store_error(&e),
            },
            Method::DELETE if !force => match self.store.list(&id).await {
                // Purging a key whose request is still running would leave that request's result
                // unrecorded (its token no longer holds the key), and its retry would run again.
                Ok(records)
                    if records
                        .iter()
                        .any(|(_, r)| matches!(r, Record::InFlight(_))) =>
                {
                    let mut r = json(&serde_json::json!({
                        "route": route,
                        "key": key.as_str(),
                        "error": "in flight: the request holding this key is still running; \
                                  its result would not be recorded. Wait for it, or DELETE \
                                  with ?force=true",
                        "records": records.iter().map(|(k, r)| record_json(k, r)).collect::<Vec<_>>(),
                    }));
                    *r.status_mut() = StatusCode::CONFLICT;
                    r
                }
                Ok(_) => self.purge(&route, &key, &id).await,
                Err(e) => store_error(&e),
            },
            Method::DELETE => self.purge(&route, &key, &id).await,
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        }
    }

    async fn purge(&self, route: &str, key: &IdempotencyKey, id: &[u8; 32]) -> Response<Body> {
        match self.store.purge(id).await {
            Ok(0) => text(StatusCode::NOT_FOUND, "no records for this key\n"),
            Ok(n) => {
                tracing::info!(route = %route, key = %redact(key.as_str()), purged = n, "purged by admin");
                json(&serde_json::json!({ "route": route, "key": key.as_str(), "purged": n }))
            }
            Err(e) => store_error(&e),
        }
    }
}

fn record_json(k: &StoreKey, r: &Record) -> serde_json::Value {
    let scope = hex::encode(&k.scope[..8]);
    match r {
        Record::InFlight(f) => serde_json::json!({
            "scope": scope,
            "state": "in_flight",
            "status": null,
            "created": rfc3339(f.created_ms),
            "expires": rfc3339(f.deadline_ms),
            "lease_holder": f.token,
        }),
        Record::Completed(c) => serde_json::json!({
            "scope": scope,
            "state": "completed",
            "status": c.status,
            "created": rfc3339(c.created_ms),
            "expires": rfc3339(c.expires_ms),
            "body_omitted": c.body_omitted,
        }),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares in constant time for equal lengths, so the time taken does not reveal how much of a
/// guess was right (`subtle`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a, b))
}

/// Decodes `%XX` escapes (`percent-encoding`); `None` for a malformed escape or bytes that are not
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let well_formed = b.iter().enumerate().all(|(i, &c)| {
        c != b'%'
            || (b
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode(b)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

fn store_error(e: &crate::store::StoreError) -> Response<Body> {
    tracing::warn!(error = %e, "admin: store failed");
    text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
}

impl Handler for Admin {
    fn call(&self, req: Request<Incoming>, _peer: SocketAddr) -> ResponseFuture {
        let this = self.clone();
        Box::pin(async move {
            let (parts, _) = req.into_parts();
            this.route(parts.method, &parts.uri, &parts.headers).await
        })
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(full(body.to_owned()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn decoding_and_bearer() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("bad%2"), None);
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
