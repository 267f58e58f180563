//! Prometheus metrics: names, help texts and buckets in one place, recorded through the `metrics` facade
//! and rendered by the admin listener's `GET /metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `idemproxy_requests_total` | counter | `route`, `outcome` (forwarded, replayed, conflict, mismatch, rejected, passthrough, released, request_timeout, upstream_timeout, store_unavailable) |
//! | `idemproxy_upstream_duration_seconds` | histogram | `route` |
//! | `idemproxy_store_duration_seconds` | histogram | `op` (claim, complete, release, lookup, list, purge, sweep, ping; flush: the final one at shutdown) |
//! | `idemproxy_store_errors_total` | counter | `op` |
//! | `idemproxy_inflight` | gauge | requests being handled |
//! | `idemproxy_upstream_inflight` | gauge | upstream exchanges running, detached ones (client gone) included |
//! | `idemproxy_connections` | gauge | `listener` (proxy, admin): connections open |
//! | `idemproxy_waiting` | gauge | duplicates waiting for their first request (`on_in_flight = "wait"`) |
//! | `idemproxy_records_stored_total` | counter | results recorded |
//! | `idemproxy_sweeper_runs_total`, `idemproxy_records_expired_total` | counter | |
//! | `idemproxy_store_size_bytes` | gauge | bytes on disk (sled) |
//! | `idemproxy_store_live_bytes`, `idemproxy_store_max_size_bytes` | gauge | bytes of live records, and `[store] max_size` (sled) |
//! | `idemproxy_store_flushes_total`, `idemproxy_store_durable_writes_total` | counter | group commit: syncs of the store's log, and entries appended |
//! | `idemproxy_store_fsync_duration_seconds` | histogram | one write + `fdatasync` of the store's log (sled) |

use std::{sync::OnceLock, time::Duration};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How a request ended, for `idemproxy_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Claimed, forwarded and recorded.
    Forwarded,
    /// Answered from a record.
    Replayed,
    /// 409: the first request is still in flight.
    Conflict,
    /// 422: the key was used with another request.
    Mismatch,
    /// Refused by the proxy (400, 413, 503).
    Rejected,
    /// Not under idempotency rules (or no key on an optional route, or degraded).
    Passthrough,
    /// Claimed and forwarded, then released (release status, or upstream failure).
    Released,
    /// 408: the client's body did not arrive within `request_timeout` (nothing forwarded).
    RequestTimeout,
    /// 504: the upstream did not answer in time.
    UpstreamTimeout,
    /// 503: the store failed or did not answer within `[store] timeout`.
    StoreUnavailable,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::Passthrough => "passthrough",
            Self::Released => "released",
            Self::RequestTimeout => "request_timeout",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::StoreUnavailable => "store_unavailable",
        }
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder (first call only) and returns the handle that renders it. `None` when
/// another recorder was installed first (an embedding application's).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            let _ = HOT.set(Hot::register());
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_counter!(
        "idemproxy_requests_total",
        "Requests handled, by route and outcome"
    );
    describe_histogram!(
        "idemproxy_upstream_duration_seconds",
        Unit::Seconds,
        "Upstream exchange time"
    );
    describe_histogram!(
        "idemproxy_store_duration_seconds",
        Unit::Seconds,
        "Store operation time"
    );
    describe_counter!(
        "idemproxy_store_errors_total",
        "Store operations that failed"
    );
    describe_gauge!("idemproxy_inflight", "Requests being handled");
    describe_gauge!(
        "idemproxy_upstream_inflight",
        "Upstream exchanges running, detached ones included (bounded by upstream.max_concurrency)"
    );
    describe_gauge!(
        "idemproxy_connections",
        "Client connections open (bounded by server.max_connections)"
    );
    describe_gauge!(
        "idemproxy_waiting",
        "Duplicates waiting for the first request with their key"
    );
    describe_counter!("idemproxy_records_stored_total", "Results recorded");
    describe_counter!("idemproxy_sweeper_runs_total", "Sweeps of expired records");
    describe_counter!(
        "idemproxy_records_expired_total",
        "Expired records deleted by the sweeper"
    );
    describe_gauge!(
        "idemproxy_store_size_bytes",
        Unit::Bytes,
        "Store size on disk"
    );
    describe_gauge!(
        "idemproxy_store_live_bytes",
        Unit::Bytes,
        "Bytes of live records (keys, headers, bodies), capped by store.max_size"
    );
    describe_gauge!(
        "idemproxy_store_max_size_bytes",
        Unit::Bytes,
        "store.max_size"
    );
    describe_histogram!(
        "idemproxy_store_fsync_duration_seconds",
        Unit::Seconds,
        "Write and fdatasync of the store's log (what makes a write power-safe)"
    );
    describe_counter!(
        "idemproxy_store_flushes_total",
        "Syncs of the store's log (group commit)"
    );
    describe_counter!(
        "idemproxy_store_durable_writes_total",
        "Entries appended to the store's log"
    );
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    match install() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

/// Folds the histogram samples recorded since the last call into their buckets. The exporter keeps
/// raw samples until then: without this, a proxy that nobody scrapes would keep ~8 bytes per timed
/// operation forever. The app calls it every `sweep_interval`; a scrape calls it too.
pub fn upkeep() {
    if let Some(h) = install() {
        h.run_upkeep();
    }
}

/// Every outcome, in the order of [`RouteCounters`].
const OUTCOMES: [Outcome; 10] = [
    Outcome::Forwarded,
    Outcome::Replayed,
    Outcome::Conflict,
    Outcome::Mismatch,
    Outcome::Rejected,
    Outcome::Passthrough,
    Outcome::Released,
    Outcome::RequestTimeout,
    Outcome::UpstreamTimeout,
    Outcome::StoreUnavailable,
];

/// `idemproxy_requests_total` handles of one route, registered once when the routes are built, so
/// counting a request is one atomic add (no label allocation or registry lookup per request).
#[derive(Clone)]
pub struct RouteCounters {
    requests: [metrics::Counter; 10],
    upstream: metrics::Histogram,
}

impl std::fmt::Debug for RouteCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteCounters")
    }
}

impl RouteCounters {
    /// Registers the counters of `route`.
    pub fn new(route: &str) -> Self {
        Self {
            requests: OUTCOMES.map(|o| {
                counter!("idemproxy_requests_total", "route" => route.to_owned(), "outcome" => o.as_str())
            }),
            upstream: histogram!("idemproxy_upstream_duration_seconds", "route" => route.to_owned()),
        }
    }

    /// Counts one request with this outcome.
    pub fn count(&self, outcome: Outcome) {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        self.requests[i].increment(1);
    }

    /// The route's `idemproxy_upstream_duration_seconds` histogram.
    pub fn upstream_duration(&self) -> metrics::Histogram {
        self.upstream.clone()
    }
}

/// Store operations timed on the request path (their handles are registered once).
const HOT_OPS: [&str; 3] = ["claim", "complete", "release"];

/// Handles of the metrics touched by every request, registered once when the recorder is installed:
/// updating one is then an atomic operation, without building a key and looking it up in the registry.
struct Hot {
    inflight: metrics::Gauge,
    upstream: metrics::Gauge,
    waiting: metrics::Gauge,
    stored: metrics::Counter,
    fsync: metrics::Histogram,
    ops: [(metrics::Histogram, metrics::Counter); 3],
}

impl Hot {
    fn register() -> Self {
        Self {
            inflight: gauge!("idemproxy_inflight"),
            upstream: gauge!("idemproxy_upstream_inflight"),
            waiting: gauge!("idemproxy_waiting"),
            stored: counter!("idemproxy_records_stored_total"),
            fsync: histogram!("idemproxy_store_fsync_duration_seconds"),
            ops: HOT_OPS.map(|op| {
                (
                    histogram!("idemproxy_store_duration_seconds", "op" => op),
                    counter!("idemproxy_store_errors_total", "op" => op),
                )
            }),
        }
    }
}

static HOT: OnceLock<Hot> = OnceLock::new();

/// Records one store operation.
pub fn store_op(op: &'static str, d: Duration, ok: bool) {
    if let (Some(hot), Some(i)) = (HOT.get(), HOT_OPS.iter().position(|o| *o == op)) {
        let (h, errors) = &hot.ops[i];
        h.record(d.as_secs_f64());
        if !ok {
            errors.increment(1);
        }
        return;
    }
    histogram!("idemproxy_store_duration_seconds", "op" => op).record(d.as_secs_f64());
    if !ok {
        counter!("idemproxy_store_errors_total", "op" => op).increment(1);
    }
}

/// One `fdatasync` of the store's log, and how long it took.
pub fn store_fsync(d: Duration) {
    match HOT.get() {
        Some(hot) => hot.fsync.record(d.as_secs_f64()),
        None => histogram!("idemproxy_store_fsync_duration_seconds").record(d.as_secs_f64()),
    }
}

/// One result recorded.
pub fn record_stored() {
    match HOT.get() {
        Some(hot) => hot.stored.increment(1),
        None => counter!("idemproxy_records_stored_total").increment(1),
    }
}

/// One sweep that deleted `expired` records.
pub fn swept(expired: u64) {
    counter!("idemproxy_sweeper_runs_total").increment(1);
    counter!("idemproxy_records_expired_total").increment(expired);
}

/// Counters a backend may expose for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Bytes on disk.
    pub size_on_disk: Option<u64>,
    /// Bytes of live records (what `[store] max_size` caps).
    pub live_bytes: Option<u64>,
    /// `[store] max_size`, where the backend enforces it.
    pub max_size: Option<u64>,
    /// Flushes performed (group commit).
    pub flushes: u64,
    /// Writes that asked to be durable.
    pub durable_writes: u64,
}

/// Store size and group-commit counters (absolute values, sampled).
pub fn store_stats(st: &BackendStats) {
    if let Some(s) = st.size_on_disk {
        gauge!("idemproxy_store_size_bytes").set(s as f64);
    }
    if let Some(s) = st.live_bytes {
        gauge!("idemproxy_store_live_bytes").set(s as f64);
    }
    if let Some(s) = st.max_size {
        gauge!("idemproxy_store_max_size_bytes").set(s as f64);
    }
    counter!("idemproxy_store_flushes_total").absolute(st.flushes);
    counter!("idemproxy_store_durable_writes_total").absolute(st.durable_writes);
}

/// A connection was accepted on `listener` (`proxy` or `admin`).
pub fn connection_opened(listener: &'static str) {
    gauge!("idemproxy_connections", "listener" => listener).increment(1.0);
}

/// A connection on `listener` ended.
pub fn connection_closed(listener: &'static str) {
    gauge!("idemproxy_connections", "listener" => listener).decrement(1.0);
}

/// Counts a request as in flight while alive.
#[derive(Debug)]
pub struct InflightGuard(metrics::Gauge);

impl InflightGuard {
    /// A request being handled.
    pub fn request() -> Self {
        Self::up(
            HOT.get()
                .map_or_else(|| gauge!("idemproxy_inflight"), |h| h.inflight.clone()),
        )
    }

    /// An upstream exchange.
    pub fn upstream() -> Self {
        Self::up(HOT.get().map_or_else(
            || gauge!("idemproxy_upstream_inflight"),
            |h| h.upstream.clone(),
        ))
    }

    /// A duplicate waiting for its first request.
    pub fn waiting() -> Self {
        Self::up(
            HOT.get()
                .map_or_else(|| gauge!("idemproxy_waiting"), |h| h.waiting.clone()),
        )
    }

    fn up(g: metrics::Gauge) -> Self {
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
