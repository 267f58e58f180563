//! The OTLP/HTTP (protobuf) span exporter, built from `[telemetry] otlp_endpoint` and the standard
//! `OTEL_*` variables.
//!
//! - Endpoint: `otlp_endpoint` + `/v1/traces`; without it `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as is)
//!   or `OTEL_EXPORTER_OTLP_ENDPOINT` (+ `/v1/traces`); with none of them, no traces.
//!   `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turns traces off.
//! - The SDK reads the rest: `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` (the service name is
//!   `idemproxy` unless they set one), `OTEL_TRACES_SAMPLER(_ARG)` (default: follow the client's
//!   sampled flag, sample roots), `OTEL_BSP_*` (batching), `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`;
//!   `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT` (milliseconds, default 10 s) bounds each export.
//!
//! Spans are batched on the SDK's own thread; each export is sent by the process's Tokio runtime over
//! hyper (http or https, the bundled web roots), so an unreachable collector costs a bounded,
//! off-request-path attempt per batch, and a full queue drops spans rather than blocking requests.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use opentelemetry_http::{hyper::HyperClient, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{trace::SdkTracerProvider, Resource};

/// Why traces could not be set up (an `OTEL_*` variable the exporter cannot use).
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces: {0}")]
pub struct TelemetryError(#[from] opentelemetry_otlp::ExporterBuildError);

const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Where spans go: `{otlp_endpoint}/v1/traces` (the config has no trailing `/`), else the standard
/// variables; `None` when none is set.
fn traces_url(otlp_endpoint: Option<&str>) -> Option<String> {
    otlp_endpoint
        .map(|base| format!("{base}/v1/traces"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| {
            env("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
        })
}

/// The tracer provider and the URL it posts to, or `None` when traces are off.
pub(super) fn provider(
    otlp_endpoint: Option<&str>,
) -> Result<Option<(SdkTracerProvider, String)>, TelemetryError> {
    let off = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    let Some(url) = traces_url(otlp_endpoint).filter(|_| !off) else {
        return Ok(None);
    };
    let client = OnRuntime {
        runtime: tokio::runtime::Handle::current(),
        inner: Arc::new(HyperClient::new(connector(), export_timeout(), None)),
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client)
        .with_endpoint(url.clone())
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build();
    Ok(Some((provider, url)))
}

fn resource() -> Resource {
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let builder = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if named {
        builder.build()
    } else {
        builder.with_service_name("idemproxy").build()
    }
}

fn export_timeout() -> Duration {
    env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map_or(DEFAULT_EXPORT_TIMEOUT, Duration::from_millis)
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

fn connector() -> Connector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build()
}

/// Sends each export on the Tokio runtime: the SDK's batch thread has none, and hyper needs one.
#[derive(Debug)]
struct OnRuntime {
    runtime: tokio::runtime::Handle,
    inner: Arc<HyperClient<Connector>>,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let inner = Arc::clone(&self.inner);
        // A runtime already shut down cancels the task: an error, not a panic.
        self.runtime
            .spawn(async move { inner.send_bytes(request).await })
            .await?
    }
}
