//! Traces, end to end: the real binary exports its spans over OTLP/HTTP (protobuf) to a real receiver
//! started here, which decodes every export with the protocol's own messages (`opentelemetry-proto`).
//!
//! - a keyed request is one trace: the client's `traceparent` is continued (same trace id, the
//!   client's span is the parent of `request`), `claim`, `upstream` and `record` are children of
//!   `request`, and the upstream gets a `traceparent` naming the proxy's `upstream` span;
//! - the `request` span carries the route, the outcome (forwarded, replayed, mismatch, conflict), the
//!   status and a redacted key, and no export contains a raw key;
//! - a client's "not sampled" decision is followed: the upstream sees it, nothing is exported;
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` and `OTEL_SERVICE_NAME` are honoured without a `[telemetry]` table;
//! - traces off (the default): the client's `traceparent` reaches the upstream untouched;
//! - an unreachable collector costs the requests nothing and SIGTERM still exits 0;
//! - a bad `otlp_endpoint` is a config error with its TOML path (exit 2).

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::{dead_addr, eventually, post_key, run_cli, send, Proxy, Upstream};
use http_body_util::{BodyExt, Full};
use hyper::{server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::{any_value::Value, AnyValue},
    trace::v1::{span::SpanKind, Span},
};
use prost::Message;

const WAIT: Duration = Duration::from_secs(15);
/// Export batches often, so spans arrive soon after each request.
const FAST_BATCHES: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "50");

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }
    fn id(&self) -> String {
        hex::encode(&self.span.span_id)
    }
    fn parent(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }
    fn attr(&self, key: &str) -> Option<String> {
        let v = self.span.attributes.iter().find(|kv| kv.key == key)?;
        match v.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        }
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body, decoded; every raw body is kept.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
    raw: Arc<Mutex<Vec<Bytes>>>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start() -> (Receiver, SocketAddr) {
        let receiver = Receiver::default();
        let r = receiver.clone();
        let (addr, stop) = common::server::spawn("otlp", move |stream| {
            let r = r.clone();
            async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let r = r.clone();
                    async move { Ok::<_, hyper::Error>(r.export(req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        // The receiver lives as long as the test process.
        std::mem::forget(stop);
        (receiver, addr)
    }

    async fn export(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        self.paths.lock().unwrap().push(req.uri().path().to_owned());
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(content_type, "application/x-protobuf", "OTLP/HTTP protobuf");
        let decoded =
            ExportTraceServiceRequest::decode(body.clone()).expect("an OTLP trace export");
        self.raw.lock().unwrap().push(body);
        let mut spans = self.spans.lock().unwrap();
        for rs in decoded.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref() {
                    Some(AnyValue {
                        value: Some(Value::StringValue(s)),
                    }) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        let answer = ExportTraceServiceResponse::default().encode_to_vec();
        Response::builder()
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(answer)))
            .unwrap()
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Every span of trace `trace_id`, once its `request` span has arrived (its children end first).
    async fn trace(&self, trace_id: &str) -> Vec<Got> {
        eventually(WAIT, "the request span of the trace", || async {
            let spans: Vec<Got> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id() == trace_id)
                .collect();
            spans
                .iter()
                .any(|s| s.span.kind == SpanKind::Server as i32)
                .then_some(spans)
        })
        .await
    }

    fn raw_contains(&self, needle: &str) -> bool {
        self.raw
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
    }
}

/// A proxy exporting to `collector` via `[telemetry] otlp_endpoint`, in front of `upstream`.
async fn traced_proxy(upstream: &Upstream, collector: SocketAddr) -> Proxy {
    Proxy::builder(upstream.url())
        .extra(&telemetry_table(collector))
        .env(FAST_BATCHES.0, FAST_BATCHES.1)
        .start()
        .await
}

fn telemetry_table(collector: SocketAddr) -> String {
    format!("[telemetry]\notlp_endpoint = \"http://{collector}\"\n")
}

fn named<'a>(spans: &'a [Got], name: &str) -> &'a Got {
    spans
        .iter()
        .find(|s| s.span.name == name)
        .unwrap_or_else(|| panic!("no `{name}` span in {:#?}", names(spans)))
}

fn names(spans: &[Got]) -> Vec<String> {
    spans.iter().map(|s| s.span.name.clone()).collect()
}

fn traceparent(trace: &str, parent: &str, flags: &str) -> String {
    format!("00-{trace}-{parent}-{flags}")
}

/// The upstream's `traceparent`, split: (trace id, parent span id, flags).
fn upstream_traceparent(upstream: &Upstream, key: &str) -> (String, String, String) {
    let req = upstream
        .requests()
        .into_iter()
        .find(|r| r.header("idempotency-key") == Some(key))
        .expect("the upstream got the request");
    let tp = req.header("traceparent").expect("a traceparent").to_owned();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn a_keyed_request_is_one_trace_continuing_the_clients_and_the_upstream_continues_it() {
    let (collector, addr) = Receiver::start();
    let upstream = Upstream::start();
    let proxy = traced_proxy(&upstream, addr).await;
    let key = "order-7f3a9c-secret-part";
    let tp = traceparent(TRACE_ID, CLIENT_SPAN, "01");
    let headers = [
        ("Idempotency-Key", key),
        ("traceparent", tp.as_str()),
        ("tracestate", "vendor=abc"),
    ];
    send(proxy.addr, "POST", "/echo", &headers, "pay 10")
        .await
        .assert_forwarded(201, b"pay 10");

    let spans = collector.trace(TRACE_ID).await;
    let request = named(&spans, "POST default");
    assert_eq!(request.parent(), CLIENT_SPAN, "continues the client's span");
    assert_eq!(request.span.kind, SpanKind::Server as i32);
    assert_eq!(request.service, "idemproxy");
    assert_eq!(request.attr("route").as_deref(), Some("default"));
    assert_eq!(request.attr("outcome").as_deref(), Some("forwarded"));
    assert_eq!(request.attr("method").as_deref(), Some("POST"));
    assert_eq!(
        request.attr("http.response.status_code").as_deref(),
        Some("201")
    );
    assert_eq!(request.attr("key").as_deref(), Some(&key[..8]), "redacted");
    for child in ["claim", "upstream", "record"] {
        let c = named(&spans, child);
        assert_eq!(
            c.parent(),
            request.id(),
            "`{child}` is a child of `request`"
        );
    }
    let exchange = named(&spans, "upstream");
    assert_eq!(exchange.span.kind, SpanKind::Client as i32);
    assert_eq!(
        exchange.attr("http.response.status_code").as_deref(),
        Some("201")
    );

    // The upstream continues the trace from the proxy's exchange span, sampled, with the tracestate.
    let (trace, parent, flags) = upstream_traceparent(&upstream, key);
    assert_eq!(
        (trace.as_str(), parent.as_str(), flags.as_str()),
        (TRACE_ID, exchange.id().as_str(), "01")
    );
    let sent = upstream.requests();
    let state = sent.iter().find_map(|r| r.header("tracestate"));
    assert_eq!(state, Some("vendor=abc"));

    // The retry is replayed: a trace of its own with no upstream exchange.
    let retry_trace = "0af7651916cd43dd8448eb211c80319c";
    let tp = traceparent(retry_trace, CLIENT_SPAN, "01");
    let headers = [("Idempotency-Key", key), ("traceparent", tp.as_str())];
    send(proxy.addr, "POST", "/echo", &headers, "pay 10")
        .await
        .assert_replay(201, b"pay 10");
    let spans = collector.trace(retry_trace).await;
    assert_eq!(
        named(&spans, "POST default").attr("outcome").as_deref(),
        Some("replayed")
    );
    assert!(
        !names(&spans).contains(&"upstream".to_owned()),
        "{:?}",
        names(&spans)
    );
    assert_eq!(upstream.hits_key(key), 1);

    // A different body under the same key: 422, and the span says so.
    let conflict_trace = "11f7651916cd43dd8448eb211c80319c";
    let tp = traceparent(conflict_trace, CLIENT_SPAN, "01");
    let headers = [("Idempotency-Key", key), ("traceparent", tp.as_str())];
    send(proxy.addr, "POST", "/echo", &headers, "pay 99")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    let spans = collector.trace(conflict_trace).await;
    let request = named(&spans, "POST default");
    assert_eq!(request.attr("outcome").as_deref(), Some("mismatch"));
    assert_eq!(
        request.attr("http.response.status_code").as_deref(),
        Some("422")
    );

    // While a first request holds its key, a duplicate gets 409, and its span says `conflict`; the
    // first one's span ends after its answer, with `forwarded`.
    let held_key = "held-order-1";
    let addr = proxy.addr;
    let first = tokio::spawn(async move { post_key(addr, "/gate/held", held_key, "x").await });
    upstream.wait_gate_arrivals("held", 1).await;
    let conflict_trace = "33f7651916cd43dd8448eb211c80319c";
    let tp = traceparent(conflict_trace, CLIENT_SPAN, "01");
    let headers = [
        ("Idempotency-Key", held_key),
        ("Content-Type", "text/plain"),
        ("traceparent", tp.as_str()),
    ];
    send(proxy.addr, "POST", "/gate/held", &headers, "x")
        .await
        .assert_problem(409, "in-flight");
    let spans = collector.trace(conflict_trace).await;
    assert_eq!(
        named(&spans, "POST default").attr("outcome").as_deref(),
        Some("conflict")
    );
    upstream.release("held", 200);
    assert_eq!(first.await.unwrap().status, 200);

    // Exports went to {endpoint}/v1/traces, and none of them holds the key.
    assert!(collector
        .paths
        .lock()
        .unwrap()
        .iter()
        .all(|p| p == "/v1/traces"));
    assert!(!collector.raw_contains(key), "a raw key was exported");
    assert!(
        !collector.raw_contains(&key[..12]),
        "more than 8 characters of the key"
    );
}

#[tokio::test]
async fn a_request_without_traceparent_starts_a_trace_and_a_not_sampled_one_is_followed() {
    let (collector, addr) = Receiver::start();
    let upstream = Upstream::start();
    let proxy = traced_proxy(&upstream, addr).await;

    // The client says "not sampled": the upstream is told the same, and nothing is exported.
    let unsampled = "22f7651916cd43dd8448eb211c80319c";
    let tp = traceparent(unsampled, CLIENT_SPAN, "00");
    let headers = [
        ("Idempotency-Key", "unsampled-1"),
        ("traceparent", tp.as_str()),
    ];
    send(proxy.addr, "POST", "/echo", &headers, "a")
        .await
        .assert_forwarded(201, b"a");
    let (trace, parent, flags) = upstream_traceparent(&upstream, "unsampled-1");
    assert_eq!((trace.as_str(), flags.as_str()), (unsampled, "00"));
    assert_ne!(
        parent, CLIENT_SPAN,
        "the proxy's own span is the upstream's parent"
    );

    // No traceparent: a new trace, rooted at the proxy, sampled, and sent on to the upstream.
    post_key(proxy.addr, "/echo", "rooted-1", "b")
        .await
        .assert_forwarded(201, b"b");
    let (trace, _, flags) = upstream_traceparent(&upstream, "rooted-1");
    assert_eq!(flags, "01");
    let spans = collector.trace(&trace).await;
    let request = named(&spans, "POST default");
    assert!(request.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(request.attr("key").as_deref(), Some("rooted-1"));

    // Spans are exported in the order they end: the unsampled request's would have come first.
    assert!(
        collector.spans().iter().all(|s| s.trace_id() != unsampled),
        "a not-sampled trace was exported"
    );
}

#[tokio::test]
async fn the_standard_otel_variables_configure_traces_without_a_telemetry_table() {
    let (collector, addr) = Receiver::start();
    let upstream = Upstream::start();
    let proxy = Proxy::builder(upstream.url())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}"))
        .env("OTEL_SERVICE_NAME", "payments-edge")
        .env(FAST_BATCHES.0, FAST_BATCHES.1)
        .start()
        .await;
    let tp = traceparent(TRACE_ID, CLIENT_SPAN, "01");
    let headers = [("Idempotency-Key", "env-1"), ("traceparent", tp.as_str())];
    send(proxy.addr, "POST", "/echo", &headers, "x")
        .await
        .assert_forwarded(201, b"x");
    let spans = collector.trace(TRACE_ID).await;
    assert!(spans.iter().all(|s| s.service == "payments-edge"));
    assert!(collector
        .paths
        .lock()
        .unwrap()
        .iter()
        .all(|p| p == "/v1/traces"));
}

#[tokio::test]
async fn traces_are_off_by_default_and_the_clients_traceparent_passes_through() {
    let upstream = Upstream::start();
    let proxy = Proxy::builder(upstream.url()).start().await;
    let tp = traceparent(TRACE_ID, CLIENT_SPAN, "01");
    let headers = [("Idempotency-Key", "off-1"), ("traceparent", tp.as_str())];
    send(proxy.addr, "POST", "/echo", &headers, "x")
        .await
        .assert_forwarded(201, b"x");
    let (trace, parent, flags) = upstream_traceparent(&upstream, "off-1");
    assert_eq!(traceparent(&trace, &parent, &flags), tp);
    assert!(!proxy.logs().iter().any(|l| l.contains("OTLP")));
}

#[tokio::test]
async fn an_unreachable_collector_costs_requests_nothing_and_the_drain_still_exits_0() {
    let upstream = Upstream::start();
    let mut proxy = Proxy::builder(upstream.url())
        .extra(&telemetry_table(dead_addr()))
        .env(FAST_BATCHES.0, FAST_BATCHES.1)
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "500")
        .start()
        .await;
    for i in 0..20 {
        let key = format!("dead-collector-{i}");
        post_key(proxy.addr, "/echo", &key, "x")
            .await
            .assert_forwarded(201, b"x");
    }
    let status = common::within(WAIT, "the drain", proxy.sigterm()).await;
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_bad_otlp_endpoint_is_a_config_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    for (value, reason) in [
        ("grpc://collector:4317", "the scheme must be http or https"),
        (
            "http://user:pw@collector:4318",
            "credentials in the URL are not allowed",
        ),
        ("http://collector:99999", "the port must be a number"),
        ("http://collector:4318/?a=b", "a query is not allowed"),
    ] {
        let path = dir.path().join("t.toml");
        std::fs::write(&path, format!("[telemetry]\notlp_endpoint = \"{value}\"\n")).unwrap();
        let out = run_cli(
            &["check", "--config", path.to_str().unwrap()],
            &[],
            Duration::from_secs(20),
        );
        assert_eq!(out.code(), Some(2), "{value}: {}", out.stderr);
        assert!(
            out.stderr.contains("telemetry.otlp_endpoint") && out.stderr.contains(reason),
            "{value}: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("pw@"),
            "credentials echoed: {}",
            out.stderr
        );
    }
}
