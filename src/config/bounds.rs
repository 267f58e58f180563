//! The bounds of every duration, size and count in the config, in one table (the README's "Limits"
//! section lists the same). A value outside its bounds — zero timeouts, TTLs and leases included — is a
//! config error with its TOML path. The upper bounds keep every deadline the proxy computes far from
//! overflow (`Instant + Duration`, unix milliseconds in `u64`), so no value can make it panic.

use std::time::Duration;

/// An inclusive range of allowed values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds<T> {
    /// Smallest allowed value.
    pub min: T,
    /// Largest allowed value.
    pub max: T,
}

impl<T: PartialOrd + Copy> Bounds<T> {
    /// Whether `v` is within the bounds.
    pub fn contains(&self, v: T) -> bool {
        self.min <= v && v <= self.max
    }
}

const MS: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

const fn d(min: Duration, max: Duration) -> Bounds<Duration> {
    Bounds { min, max }
}

/// `[server] request_timeout`.
pub const REQUEST_TIMEOUT: Bounds<Duration> = d(MS, DAY);
/// `[server] header_read_timeout`.
pub const HEADER_READ_TIMEOUT: Bounds<Duration> = d(MS, HOUR);
/// `[server] shutdown_grace`.
pub const SHUTDOWN_GRACE: Bounds<Duration> = d(MS, HOUR);
/// `[server] idle_timeout`.
pub const IDLE_TIMEOUT: Bounds<Duration> = d(MS, DAY);
/// `[server.tls] handshake_timeout`.
pub const HANDSHAKE_TIMEOUT: Bounds<Duration> = d(MS, HOUR);
/// `[upstream] connect_timeout`.
pub const CONNECT_TIMEOUT: Bounds<Duration> = d(MS, HOUR);
/// `[upstream] timeout`.
pub const UPSTREAM_TIMEOUT: Bounds<Duration> = d(MS, DAY);
/// `[store] sweep_interval`.
pub const SWEEP_INTERVAL: Bounds<Duration> = d(MS, HOUR);
/// `[store] timeout`.
pub const STORE_TIMEOUT: Bounds<Duration> = d(MS, Duration::from_secs(10 * 60));
/// `ttl` of a rule.
pub const TTL: Bounds<Duration> = d(MS, Duration::from_secs(365 * 86_400));
/// `lease` of a rule.
pub const LEASE: Bounds<Duration> = d(MS, Duration::from_secs(7 * 86_400));
/// `wait_timeout` of a rule.
pub const WAIT_TIMEOUT: Bounds<Duration> = d(MS, HOUR);
/// Every duration, for the tests that check each is enforced: (TOML key, bounds).
pub const DURATIONS: [(&str, Bounds<Duration>); 12] = [
    ("server.request_timeout", REQUEST_TIMEOUT),
    ("server.header_read_timeout", HEADER_READ_TIMEOUT),
    ("server.shutdown_grace", SHUTDOWN_GRACE),
    ("server.idle_timeout", IDLE_TIMEOUT),
    ("server.tls.handshake_timeout", HANDSHAKE_TIMEOUT),
    ("upstream.connect_timeout", CONNECT_TIMEOUT),
    ("upstream.timeout", UPSTREAM_TIMEOUT),
    ("store.sweep_interval", SWEEP_INTERVAL),
    ("store.timeout", STORE_TIMEOUT),
    ("defaults.ttl", TTL),
    ("defaults.lease", LEASE),
    ("defaults.wait_timeout", WAIT_TIMEOUT),
];

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// `[server] max_request_body`: buffered in memory, so at most 1 GiB.
pub const MAX_REQUEST_BODY: Bounds<u64> = Bounds { min: 0, max: GIB };
/// `[server] max_response_body`: recorded in the store, so at most 1 GiB (0: never record a body).
pub const MAX_RESPONSE_BODY: Bounds<u64> = Bounds { min: 0, max: GIB };
/// `[store] cache_capacity` (sled's page cache).
pub const CACHE_CAPACITY: Bounds<u64> = Bounds {
    min: MIB,
    max: 64 * GIB,
};
/// `[store] max_size`.
pub const MAX_SIZE: Bounds<u64> = Bounds {
    min: 64 * KIB,
    max: 64 * TIB,
};
/// Every size: (TOML key, bounds).
pub const SIZES: [(&str, Bounds<u64>); 4] = [
    ("server.max_request_body", MAX_REQUEST_BODY),
    ("server.max_response_body", MAX_RESPONSE_BODY),
    ("store.cache_capacity", CACHE_CAPACITY),
    ("store.max_size", MAX_SIZE),
];

/// `[server] max_connections`.
pub const MAX_CONNECTIONS: Bounds<u64> = Bounds {
    min: 1,
    max: 1_000_000,
};
/// `[upstream] max_concurrency`.
pub const MAX_CONCURRENCY: Bounds<u64> = Bounds {
    min: 1,
    max: 1_000_000,
};
/// `[store] redis_min_replicas` (0: do not wait for replicas).
pub const REDIS_MIN_REPLICAS: Bounds<u64> = Bounds { min: 0, max: 16 };
/// Every count: (TOML key, bounds).
pub const COUNTS: [(&str, Bounds<u64>); 2] = [
    ("server.max_connections", MAX_CONNECTIONS),
    ("upstream.max_concurrency", MAX_CONCURRENCY),
];

/// A duration as the README writes it (`1ms`, `24h`, `365d`).
pub fn show_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A size as the README writes it (`64KiB`, `1GiB`).
pub fn show_size(n: u64) -> String {
    for (unit, name) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if n >= unit && n % unit == 0 {
            return format!("{}{name}", n / unit);
        }
    }
    format!("{n}B")
}
