//! Contract rule 9 in the logs: each request runs in one `request` span carrying its method, route,
//! outcome and a redacted key, and no span or event shows a whole key. The pipeline runs in-process
//! (a real `Proxy` over the memory store, an upstream that answers or breaks), with a `tracing` layer
//! that captures every span and event.
//!
//! One test in a binary of its own: `tracing` caches per call site whether anyone listens, and a
//! test thread that reaches a call site while another installs its capturing subscriber can cache
//! "no one" for good.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idemproxy::{
    body::{full, Body},
    clock::ManualClock,
    config::{Config, Overrides},
    metrics::Outcome,
    proxy::Proxy,
    store::memory::MemoryStore,
    upstream::{Forward, ResponseBody, SendFuture, UpstreamError},
};
use std::sync::Arc;

/// Answers `200 ok`, or breaks after sending for requests whose path ends in `/broken`.
#[derive(Debug)]
struct Upstream;

impl Forward for Upstream {
    fn send(&self, req: Request<Body>, _timeout: Duration) -> SendFuture<'_> {
        Box::pin(async move {
            if req.uri().path().ends_with("/broken") {
                return Err(UpstreamError::Failed("connection reset".into()));
            }
            Ok(Response::new(ResponseBody::new(full("ok"))))
        })
    }
}

struct Pipeline(Arc<Proxy>);

impl Pipeline {
    fn new(config: &str) -> Self {
        let config = Config::parse(config, &Overrides::default()).unwrap();
        let store = Arc::new(MemoryStore::new(Arc::new(ManualClock::new(1_000))));
        let proxy =
            Proxy::with_upstream(&config, store, Box::new(|_| Ok(Arc::new(Upstream)))).unwrap();
        Self(Arc::new(proxy))
    }

    async fn post(&self, path: &str, key: &str) -> (StatusCode, Outcome) {
        let req = Request::post(path)
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let (resp, outcome) = Arc::clone(&self.0)
            .handle(req, "203.0.113.7:40000".parse().unwrap())
            .await;
        let status = resp.status();
        resp.into_body().collect().await.unwrap();
        (status, outcome)
    }
}

/// Rule 9: keys never appear whole in logs. Each request runs in one `request` span carrying its
/// method, route, outcome and the key's first 8 characters at most; no span or event shows more,
/// also when the upstream fails and the proxy warns about it.
#[tokio::test]
async fn rule_09_each_request_has_one_span_with_route_outcome_and_a_redacted_key_never_the_whole_key(
) {
    let (logs, _guard) = Logs::capture();
    let p = Pipeline::new(
        "[[routes]]\nname = \"payments\"\npath = \"/pay/**\"\nrelease_statuses = []\n",
    );
    let key = "sk_live_secret_0123456789";
    assert_eq!(p.post("/pay/ok", key).await.1, Outcome::Forwarded);
    assert_eq!(p.post("/pay/ok", key).await.1, Outcome::Replayed);
    let broken = p.post("/pay/broken", "another_secret_key_42").await;
    assert_eq!(broken.0, StatusCode::BAD_GATEWAY);

    let spans = logs.spans("request");
    assert_eq!(
        spans.len(),
        3,
        "one span per request: {spans:?}\n{}",
        logs.text()
    );
    for (span, outcome) in spans.iter().zip(["forwarded", "replayed", "forwarded"]) {
        assert_eq!(span["route"], "payments", "{span:?}");
        assert_eq!(span["method"], "POST", "{span:?}");
        assert_eq!(span["outcome"], outcome, "{span:?}");
        assert!(
            span["key"].len() <= 8,
            "more than 8 characters of the key: {span:?}"
        );
    }
    assert!(key.starts_with(&spans[0]["key"]) && !spans[0]["key"].is_empty());
    let text = logs.text();
    assert!(
        text.contains("upstream failed"),
        "the failure was not logged: {text}"
    );
    for secret in [key, "another_secret_key_42", "sk_live_s", "another_s"] {
        assert!(
            !text.contains(secret),
            "{secret:?} appears in the logs:\n{text}"
        );
    }
}

mod logs {
    use std::{
        collections::HashMap,
        fmt::Debug,
        sync::{Arc, Mutex},
    };

    use tracing::{
        field::{Field, Visit},
        span, Event, Subscriber,
    };
    use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan, Layer};

    /// Spans (name → fields, the last one of each name) and events (all fields as `name=value` text).
    #[derive(Debug, Default, Clone)]
    pub struct Logs(Arc<Mutex<Captured>>);

    #[derive(Debug, Default)]
    struct Captured {
        spans: HashMap<u64, (String, HashMap<String, String>)>,
        closed: Vec<(String, HashMap<String, String>)>,
        events: Vec<String>,
    }

    struct Fields<'a>(&'a mut HashMap<String, String>);

    impl Visit for Fields<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().to_owned(), value.to_owned());
        }
        fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
            self.0.insert(field.name().to_owned(), format!("{value:?}"));
        }
    }

    impl Logs {
        /// Captures everything logged on this thread until the guard is dropped.
        pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
            let logs = Self::default();
            let subscriber = tracing_subscriber::registry().with(Capture(logs.clone()));
            (logs, tracing::subscriber::set_default(subscriber))
        }

        /// The fields of every closed span named `name`, in the order they closed.
        pub fn spans(&self, name: &str) -> Vec<HashMap<String, String>> {
            let c = self.0.lock().unwrap();
            c.closed
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, f)| f.clone())
                .collect()
        }

        /// Everything logged, spans and events, as one text.
        pub fn text(&self) -> String {
            let c = self.0.lock().unwrap();
            let spans = c
                .closed
                .iter()
                .chain(c.spans.values())
                .map(|(n, f)| format!("{n}{f:?}"));
            spans
                .chain(c.events.iter().cloned())
                .collect::<Vec<_>>()
                .join("\n")
        }
    }

    struct Capture(Logs);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
        fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, _: Context<'_, S>) {
            let mut fields = HashMap::new();
            attrs.record(&mut Fields(&mut fields));
            let name = attrs.metadata().name().to_owned();
            self.0
                 .0
                .lock()
                .unwrap()
                .spans
                .insert(id.into_u64(), (name, fields));
        }

        fn on_record(&self, id: &span::Id, values: &span::Record<'_>, _: Context<'_, S>) {
            if let Some((_, fields)) = self.0 .0.lock().unwrap().spans.get_mut(&id.into_u64()) {
                values.record(&mut Fields(fields));
            }
        }

        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut fields = HashMap::new();
            event.record(&mut Fields(&mut fields));
            self.0 .0.lock().unwrap().events.push(format!("{fields:?}"));
        }

        fn on_close(&self, id: span::Id, _: Context<'_, S>) {
            let mut c = self.0 .0.lock().unwrap();
            if let Some(span) = c.spans.remove(&id.into_u64()) {
                c.closed.push(span);
            }
        }
    }
}

use logs::Logs;
