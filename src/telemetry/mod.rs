//! Logs and traces.
//!
//! - Logs: `tracing` to stderr, text by default or JSON with `IDEMPROXY_LOG_FORMAT=json`; the level
//!   comes from `RUST_LOG` (default `info`).
//! - Traces (off by default): the `request` span of each request and its children (`claim`,
//!   `upstream`, `record`, `release`) exported over OTLP/HTTP (`otlp.rs`) when `[telemetry]
//!   otlp_endpoint` or `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set; a client's W3C `traceparent`
//!   is continued and the upstream gets its own (`propagate.rs`).
//!
//! The spans are at debug level: with traces off and `RUST_LOG` at `info` they are never created, so
//! they cost nothing on the request path. With traces on, only the exporter sees them (the log filter
//! still applies to the log lines).

mod otlp;
mod propagate;

pub use otlp::TelemetryError;
pub use propagate::{continue_trace, inject};

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::{
    filter::filter_fn, fmt, layer::SubscriberExt, registry::LookupSpan, util::SubscriberInitExt,
    EnvFilter, Layer,
};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What [`init`] set up. [`Telemetry::shutdown`] sends the spans still queued.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// How long [`Telemetry::shutdown`] waits for the last spans to be sent.
const SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

impl Telemetry {
    /// Exports the spans still queued (bounded; a dead collector does not hold up the exit).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(SHUTDOWN_BOUND, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "could not send the last spans"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not send the last spans"),
            Err(_) => tracing::warn!("the last spans were not sent within {SHUTDOWN_BOUND:?}"),
        }
    }
}

/// Installs the global subscriber: logs, and traces when `otlp_endpoint` (or an `OTEL_*` endpoint
/// variable) asks for them. With traces on it must be called within a Tokio runtime, which sends them.
/// A second call installs nothing (the first subscriber stays) and exports nothing.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let Some((provider, url)) = otlp::provider(otlp_endpoint)? else {
        // The filter as a global one: spans and events it disables are never created.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(logs(format))
            .try_init();
        return Ok(Telemetry { provider: None });
    };
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "idemproxy");
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Per-span extras off: source locations, targets, busy/idle times and the thread-local
        // context each enter would set (nothing here reads `Context::current()`); together they were
        // most of the exporter's cost per request.
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(filter_fn(exported));
    let installed = tracing_subscriber::registry()
        .with(logs(format).with_filter(filter))
        .with(traces)
        .try_init();
    if installed.is_err() {
        // Another subscriber is in place: these spans would go nowhere.
        let _ = provider.shutdown();
        return Ok(Telemetry { provider: None });
    }
    propagate::turn_on();
    tracing::info!(endpoint = %url, "exporting traces over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The log lines, to stderr.
fn logs<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
    }
}

/// What the exporter sees: this crate's spans (they are at debug level), and events at info or above
/// (they become events of the span they happen in).
fn exported(meta: &Metadata<'_>) -> bool {
    if meta.is_span() {
        meta.target().starts_with("idemproxy")
    } else {
        *meta.level() <= Level::INFO
    }
}
