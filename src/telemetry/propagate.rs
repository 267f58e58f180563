//! W3C Trace Context on the request path: the client's `traceparent` (and `tracestate`) become the
//! parent of the request's span, and the upstream gets a `traceparent` naming the proxy's own
//! `upstream` span. Nothing happens while traces are off: the client's headers then pass through
//! untouched, as any end-to-end header does.

use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ON: AtomicBool = AtomicBool::new(false);

pub(super) fn turn_on() {
    ON.store(true, Ordering::Relaxed);
}

fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Makes `span` continue the trace of the client's `traceparent`, if it sent a valid one.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !on() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Fails only for a span that is not exported (disabled): then there is nothing to continue.
    let _ = span.set_parent(cx);
}

/// Sets `traceparent` (and `tracestate`) of a request to the upstream to `span`, replacing the
/// client's (the upstream's parent is the proxy's exchange, whose parent is the client's span).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if !on() || span.is_disabled() {
        return;
    }
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}
