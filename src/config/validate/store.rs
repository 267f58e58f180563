//! `[store]`: the backend, and the settings of each.
//!
//! No setting is silently ignored (contract rule 13): a Redis URL — from the file, `--redis-url` or
//! `IDEMPROXY_REDIS_URL` — selects the Redis backend, and next to an explicit `backend = "sled"` it is an
//! error naming both; a Redis-only key with sled is an error; a sled-only key with Redis is a warning
//! (a container image may set `IDEMPROXY_DATA_DIR` for every deployment).

use std::path::PathBuf;

use super::values::{count, duration, size};
use crate::config::{
    bounds,
    defaults::*,
    file::{Problems, Section},
    redact_url, Backend, ConfigError, Overrides, StoreConfig, SyncPolicy,
};

/// Keys only the sled backend reads.
const SLED_ONLY: [&str; 4] = ["path", "sync", "cache_capacity", "max_size"];
/// Keys only the Redis backend reads.
const REDIS_ONLY: [&str; 6] = [
    "redis_url",
    "redis_cluster",
    "redis_sentinels",
    "redis_master_name",
    "key_prefix",
    "redis_min_replicas",
];

pub(super) fn read_store(mut s: Section, o: &Overrides, p: &mut Problems) -> Option<StoreConfig> {
    let given: Vec<&str> = SLED_ONLY
        .iter()
        .chain(&REDIS_ONLY)
        .copied()
        .filter(|k| s.has(k))
        .collect();
    let explicit = s.take_str("backend", p);
    let redis_url = s.take_str("redis_url", p);
    let redis_cluster = s.take_str_list("redis_cluster", p).unwrap_or_default();
    let redis_sentinels = s.take_str_list("redis_sentinels", p).unwrap_or_default();
    let redis_master_name = s.take_str("redis_master_name", p);
    // One way to reach Redis: an endpoint, cluster seed nodes, or sentinels.
    let ways = [
        ("redis_url", redis_url.is_some()),
        ("redis_cluster", !redis_cluster.is_empty()),
        ("redis_sentinels", !redis_sentinels.is_empty()),
    ];
    let given_ways: Vec<&str> = ways.iter().filter(|(_, g)| *g).map(|(k, _)| *k).collect();
    for extra in given_ways.iter().skip(1) {
        p.push(
            s.path_of(extra),
            format!(
                "conflicts with store.{}: give one of redis_url, redis_cluster or redis_sentinels",
                given_ways[0]
            ),
        );
    }
    match (&redis_master_name, redis_sentinels.is_empty()) {
        (None, false) => p.push(
            s.path_of("redis_master_name"),
            "missing: redis_sentinels needs the name the sentinels monitor the primary under",
        ),
        (Some(_), true) => p.push(
            s.path_of("redis_master_name"),
            "needs redis_sentinels (the sentinels to ask for this primary)",
        ),
        (Some(n), false) if n.is_empty() => {
            p.push(s.path_of("redis_master_name"), "must not be empty")
        }
        _ => {}
    }
    // Each of the three selects Redis; the first given is named in errors.
    let redis_given = given_ways.first().copied();
    let url_source = if o.redis_url.is_some() {
        " (from --redis-url or IDEMPROXY_REDIS_URL)"
    } else {
        ""
    };
    let backend = match (explicit.as_deref(), redis_given) {
        (None, Some(_)) | (Some("redis"), Some(_)) => Some(Backend::Redis),
        (None, None) | (Some("sled"), None) => Some(Backend::Sled),
        (Some("sled"), Some(key)) => {
            let from = if key == "redis_url" { url_source } else { "" };
            p.push(
                s.path_of("backend"),
                format!(
                    "\"sled\" conflicts with store.{key}{from}: a Redis URL selects the \
                     Redis backend; remove one of the two"
                ),
            );
            None
        }
        (Some("redis"), None) => {
            p.push(
                s.path_of("redis_url"),
                "missing: backend = \"redis\" needs redis_url, redis_cluster or redis_sentinels \
                 (or --redis-url / IDEMPROXY_REDIS_URL)",
            );
            None
        }
        (Some(other), _) => {
            p.push(
                s.path_of("backend"),
                format!("\"{other}\": expected \"sled\" or \"redis\""),
            );
            None
        }
    };
    // Every Redis URL, with its TOML path.
    let list = |key: &str, urls: &[String]| -> Vec<(String, String)> {
        let base = s.path_of(key);
        urls.iter()
            .enumerate()
            .map(|(i, u)| (format!("{base}[{i}]"), u.clone()))
            .collect()
    };
    let urls: Vec<(String, String)> = redis_url
        .iter()
        .map(|u| (s.path_of("redis_url"), u.clone()))
        .chain(list("redis_cluster", &redis_cluster))
        .chain(list("redis_sentinels", &redis_sentinels))
        .collect();
    for (path, u) in &urls {
        use redis::IntoConnectionInfo;
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            p.push(
                path,
                format!("\"{}\": expected redis:// or rediss://", redact_url(u)),
            );
        } else if let Err(e) = u.as_str().into_connection_info() {
            // What `run` would refuse when it connects, refused here (and by `check`) with exit 2.
            p.push(
                path,
                format!(
                    "\"{}\": {}",
                    redact_url(u),
                    e.detail().unwrap_or("invalid Redis URL")
                ),
            );
        }
    }
    let mut warnings = Vec::new();
    match backend {
        Some(Backend::Sled) => {
            for k in REDIS_ONLY.iter().filter(|k| given.contains(k)) {
                p.push(
                    s.path_of(k),
                    "a Redis setting, but the store is sled (set redis_url to use Redis)",
                );
            }
        }
        Some(Backend::Redis) => {
            let flag = o.data_dir.is_some().then_some("path");
            for k in SLED_ONLY.iter().filter(|k| given.contains(k)) {
                let from = if Some(*k) == flag {
                    " (from --data-dir or IDEMPROXY_DATA_DIR)"
                } else {
                    ""
                };
                let mut reason = format!("a sled setting{from}, ignored: the store is Redis");
                if *k == "max_size" {
                    reason.push_str(
                        " (cap Redis with maxmemory and maxmemory-policy noeviction: its OOM \
                         answers become 503 store-full)",
                    );
                }
                warnings.push(ConfigError {
                    path: s.path_of(k),
                    reason,
                });
            }
        }
        None => {}
    }
    let path = s
        .take_str("path", p)
        .unwrap_or_else(|| DEFAULT_STORE_PATH.to_owned());
    if path.is_empty() {
        p.push(s.path_of("path"), "must not be empty");
    }
    let sync = match s.take_str("sync", p).as_deref() {
        None | Some("always") => Some(SyncPolicy::Always),
        Some("periodic") => Some(SyncPolicy::Periodic),
        Some(other) => {
            p.push(
                s.path_of("sync"),
                format!("\"{other}\": expected \"always\" or \"periodic\""),
            );
            None
        }
    };
    let cache_capacity = size(
        &mut s,
        "cache_capacity",
        DEFAULT_CACHE_CAPACITY,
        bounds::CACHE_CAPACITY,
        p,
    );
    let sweep_interval = duration(
        &mut s,
        "sweep_interval",
        DEFAULT_SWEEP_INTERVAL,
        bounds::SWEEP_INTERVAL,
        p,
    );
    let max_size = size(&mut s, "max_size", DEFAULT_MAX_SIZE, bounds::MAX_SIZE, p);
    let timeout = duration(
        &mut s,
        "timeout",
        DEFAULT_STORE_TIMEOUT,
        bounds::STORE_TIMEOUT,
        p,
    );
    let key_prefix = s
        .take_str("key_prefix", p)
        .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
    let redis_min_replicas = count(
        &mut s,
        "redis_min_replicas",
        DEFAULT_REDIS_MIN_REPLICAS,
        bounds::REDIS_MIN_REPLICAS,
        p,
    );
    s.finish(p);
    Some(StoreConfig {
        backend: backend?,
        path: PathBuf::from(path),
        sync: sync?,
        cache_capacity: cache_capacity?,
        sweep_interval,
        max_size: max_size?,
        timeout,
        redis_url,
        redis_cluster,
        redis_sentinels,
        redis_master_name: redis_master_name.unwrap_or_default(),
        key_prefix,
        redis_min_replicas: u32::try_from(redis_min_replicas?).ok()?,
        warnings,
    })
}
