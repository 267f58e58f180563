//! The shared store on Redis (or Valkey): every proxy replica behind one load balancer sees the same
//! keys, so a retry that lands on another replica is replayed, and a duplicate sent to another replica
//! while the first is in flight is refused (409) or waits.
//!
//! # Key layout
//! `P` is `[store] key_prefix`; `<id>` and `<scope>` are the lowercase hex of the two digests of a
//! [`StoreKey`].
//! ```text
//! P{<id>}:<scope>          HASH    one record: one client key on one route, in one scope
//! P{<id>}:scopes           SET     the <scope>s that have a record of this id (list and purge)
//! Ptoken                   STRING  fencing-token counter (INCRBY; handed out in blocks)
//! Pchanged:<id>:<scope>    channel "this record was completed, released or purged"
//! ```
//! Every key a record script touches carries the hash tag `{<id>}`, so it lives in one Redis Cluster
//! slot (list and purge reach the record keys named in the index: same tag). The token counter is only
//! ever touched alone. Hence the prefix must not contain `{` or `}`. The store connects to one endpoint
//! (a standalone Redis or a primary) or, with `redis_cluster`, to a Redis Cluster through the cluster
//! client, which sends each script to the primary of its key's slot and follows `MOVED`/`ASK` (see
//! `link`).
//!
//! Record fields: `s` state (`f` in flight, `c` completed), `t` fencing token, `c` created, `d` lease
//! deadline (in flight), `e` expiry (completed), `f` fingerprint (32 bytes), and for a completed record
//! `r`: the response encoded by [`super::record`] (schema version in byte 0). The time and fingerprint
//! fields inside `r` are written as zero and taken from the hash fields on read: only the server knows
//! the times, and only the claim knows the fingerprint. Times are unix ms of the **Redis server's
//! clock** (`TIME` inside the scripts), so replicas with skewed clocks agree on leases and TTLs.
//!
//! # Scripts (each is one atomic step on the server, called with EVALSHA)
//! ```text
//! claim     Absent | Completed(e <= now) | InFlight(d <= now, t not a live owner of the caller)
//!             → InFlight{t = token, d = now + lease}, PEXPIRE lease + margin, SADD index  → "claimed"
//!           InFlight being taken over, t >= token            → "low" (caller draws a fresh block)
//!           otherwise                                        → "rec" + the record (409/wait, or replay)
//! renew     InFlight{t = token} → d = now + lease, expiries pushed → 1;  anything else → 0 (stop)
//! complete  InFlight{t = token} → Completed{e = now + ttl}, PEXPIRE ttl, PUBLISH → 1;  else 0 (stale)
//! release   InFlight{t = token} → Absent (DEL, SREM), PUBLISH → 1;  else 0 (stale)
//! lookup    the record and the server's now (the caller hides a completed record past `e`)
//! list      every record named in the index, with now; index entries whose record is gone are pruned
//! purge     DEL every record named in the index, PUBLISH each, DEL the index → the scopes deleted
//! tokens    INCRBY the counter by a block, never ending at or below a floor the caller gives
//! ```
//! Fencing tokens come from one counter, so they are unique across replicas; a takeover always gets a
//! larger token than the claim it replaces (the `low` answer), and within one process tokens increase.
//!
//! # Expiry
//! Every key carries a native expiry as a safety net, so Redis memory stays bounded even if no proxy
//! ever looks at a key again: a completed record expires with its TTL, an in-flight one `lease + margin`
//! after its last renewal, the index when its longest-lived record does. The scripts still compare `d`
//! and `e` with the server's now, so nothing lapsed is ever acted on; [`StoreUpkeep::sweep`](crate::store::StoreUpkeep::sweep) has nothing to do.
//!
//! # Live owners
//! A claim's owner renews its lease every `lease / 3` (a task per claim, started by `claim`, stopped by
//! `complete`, `release` or `abandon`), so a slow upstream call never loses its claim; when the owner
//! dies (or is abandoned) renewals stop and another replica may take the key over once the deadline
//! passes. A claim held by a live owner of *this* process is also never taken over by this process, even
//! if a renewal is late.
//!
//! # Waiting across replicas
//! One pub/sub connection per store (RESP3, so Redis ≥ 6) PSUBSCRIBEs `Pchanged:*` and wakes the
//! in-process waiters of the key named in each message. In a cluster, a classic `PUBLISH` reaches every
//! node, so that one subscription, on any node, hears every primary's changes. Messages can be lost while that connection is
//! down: each time it (re)subscribes, every waiter is woken to look again. The proxy's own timer (the
//! lease left) stays as a last resort. Every replica receives every change message of its prefix; they
//! are small, but at very high rates per-key subscriptions would scale better.
//!
//! # Failure
//! Connections go through [`ConnectionManager`] (reconnects by itself) with bounded connect and response
//! timeouts, and every operation has a deadline: with Redis down, operations fail fast with
//! [`StoreError::Backend`] (`backend = "redis"`), and recover without a restart once it is back.
//! Durability is Redis's own (`appendonly`/`appendfsync`): `flush` has nothing to add.
//!
//! # Replica acknowledgements
//! With `redis_min_replicas = N > 0`, every write (claim, complete, release, renew, purge, tokens) goes
//! in one pipeline with `WAIT N` on the same connection (see `conn`), and a write fewer than N replicas
//! acknowledged is a store error; an unacknowledged claim is released again. `complete` and `release`
//! are sent again when their connection breaks under them, until the operation's deadline: their
//! scripts check the fencing token, so a second run changes nothing, and a write under way during a
//! failover lands on the promoted primary.

use std::{collections::HashMap, convert::Infallible, fmt, sync::Arc, time::Duration};

use parking_lot::Mutex;

use ::redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Client, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, RedisError, Value,
};
use async_trait::async_trait;
use tokio::{
    sync::{watch, Notify},
    task::{AbortHandle, JoinHandle},
};

use super::{
    retry_after, watch::Watchers, ClaimOutcome, Committed, Completed, DecodeError, InFlight,
    KeyWatch, NewResult, Record, Store, StoreError, SweepStats,
};
use crate::{
    clock::Clock,
    key::{Fingerprint, StoreKey},
};

mod conn;
mod link;
mod names;
mod ops;
mod owners;
mod pubsub;
mod reply;
mod scripts;
#[cfg(test)]
mod tests;

use conn::{Conn, Written};
use names::Names;
use pubsub::{on_push, subscribe_loop};
use reply::*;
use scripts::Scripts;

const BACKEND: &str = "redis";

/// Bound on establishing one connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one command's answer (a completed record may carry a 10 MiB body).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one store operation, reconnecting included.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(4);
/// How long an in-flight record outlives its lease deadline before Redis drops it by itself.
pub const DEFAULT_EXPIRY_MARGIN: Duration = Duration::from_secs(5);

/// Tokens drawn from the shared counter at once.
const TOKEN_BLOCK: u64 = 128;
/// How often the pub/sub connection is checked while idle.
const PUBSUB_HEARTBEAT: Duration = Duration::from_secs(1);
/// Retry delays of the pub/sub (re)subscription.
const PUBSUB_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// How the Redis store connects.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URL (user, password and database number included).
    pub url: String,
    /// Redis Cluster seed nodes (`redis://` URLs); when not empty, the store is a cluster client and
    /// `url` is not used.
    pub cluster: Vec<String>,
    /// Sentinels (`redis://host:26379` URLs) to ask for the primary named `master_name`; when not
    /// empty, `url` is not used (the primary is reached with the first sentinel URL's credentials,
    /// database and TLS setting).
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub master_name: String,
    /// Prefix of every key and channel; must not contain `{` or `}`.
    pub key_prefix: String,
    /// Bound on establishing one connection.
    pub connect_timeout: Duration,
    /// Bound on one command's answer.
    pub response_timeout: Duration,
    /// Bound on one store operation.
    pub op_timeout: Duration,
    /// How long an in-flight record outlives its lease deadline in Redis.
    pub expiry_margin: Duration,
    /// Replicas that must acknowledge every write (`WAIT`) before the proxy acts on it.
    pub min_replicas: u32,
}

impl RedisOptions {
    /// Options with the default timeouts.
    pub fn new(url: &str, key_prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            cluster: Vec::new(),
            sentinels: Vec::new(),
            master_name: String::new(),
            key_prefix: key_prefix.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            op_timeout: DEFAULT_OP_TIMEOUT,
            expiry_margin: DEFAULT_EXPIRY_MARGIN,
            min_replicas: 0,
        }
    }
}

/// The Redis store. Cheap to clone (shared inside); background tasks stop when the last clone drops.
#[derive(Debug, Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// Live owners of this process: their renewal tasks, and which key each holds.
#[derive(Debug, Default)]
struct Owners {
    by_token: HashMap<u64, (StoreKey, AbortHandle)>,
    by_key: HashMap<StoreKey, u64>,
}

impl Owners {
    fn remove(&mut self, token: u64) {
        if let Some((key, renewal)) = self.by_token.remove(&token) {
            renewal.abort();
            if self.by_key.get(&key) == Some(&token) {
                self.by_key.remove(&key);
            }
        }
    }
}

/// The block of fencing tokens this process hands out: `next..=last`.
#[derive(Debug, Default)]
struct Tokens {
    next: u64,
    last: u64,
    /// The largest token handed out so far: a new block always starts above it, even if the counter
    /// went back (a Redis that lost its data).
    high: u64,
}

#[derive(Debug)]
struct Inner {
    conn: Conn,
    names: Names,
    scripts: Arc<Scripts>,
    tokens: tokio::sync::Mutex<Tokens>,
    owners: Mutex<Owners>,
    watchers: Arc<Watchers>,
    expiry_margin: Duration,
    /// Tests only: a clock that replaces the server's in the scripts.
    pin: Option<Arc<dyn Clock>>,
    /// `true` while the pub/sub connection is subscribed.
    #[cfg_attr(not(test), allow(dead_code))]
    subscribed: watch::Receiver<bool>,
    pubsub: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.pubsub.abort();
        for (_, (_, renewal)) in self.owners.lock().by_token.drain() {
            renewal.abort();
        }
    }
}

impl RedisStore {
    /// Builds the store and starts its pub/sub task; must run inside a tokio runtime. Connecting is
    /// lazy: an unreachable Redis makes operations (and readiness) fail until it answers, not `open`.
    pub fn open(opts: &RedisOptions) -> Result<Self, StoreError> {
        Self::build(opts, None, false)
    }

    /// A store whose scripts use `clock` instead of the server's `TIME` (deterministic tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn open_pinned(opts: &RedisOptions, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Self::build(opts, Some(clock), false)
    }

    /// A store whose scripts are sent in Redis 7's strict form (see `Scripts::new`).
    #[cfg(any(test, feature = "testing"))]
    pub fn open_strict(opts: &RedisOptions) -> Result<Self, StoreError> {
        Self::build(opts, None, true)
    }

    fn build(
        opts: &RedisOptions,
        pin: Option<Arc<dyn Clock>>,
        strict: bool,
    ) -> Result<Self, StoreError> {
        if opts.key_prefix.contains(['{', '}']) {
            return Err(other_err(format!(
                "key_prefix {:?} must not contain '{{' or '}}' (it would move the Redis Cluster hash tag)",
                opts.key_prefix
            )));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(other_err("the redis store needs a tokio runtime".into()));
        }
        let tls = std::iter::once(&opts.url)
            .chain(&opts.cluster)
            .chain(&opts.sentinels)
            .any(|u| u.starts_with("rediss://"));
        if tls {
            // redis-rs builds its TLS config with rustls' process-wide default provider; make sure
            // there is exactly one (Err: one is already installed, which is just as good).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let names = Names {
            prefix: opts.key_prefix.clone(),
        };
        let watchers = Arc::<Watchers>::default();
        let lost = Arc::new(Notify::new());
        let on_push = {
            let (names, watchers, lost) = (names.clone(), Arc::clone(&watchers), Arc::clone(&lost));
            move |push: PushInfo| -> Result<(), Infallible> {
                on_push(&names, &watchers, &lost, push);
                Ok(())
            }
        };
        let (link, sub) = if !opts.cluster.is_empty() {
            cluster_link(opts, on_push)?
        } else if !opts.sentinels.is_empty() {
            sentinel_link(opts, Arc::new(on_push))?
        } else {
            single_link(opts, on_push)?
        };
        let (subscribed_tx, subscribed) = watch::channel(false);
        let pubsub = tokio::spawn(subscribe_loop(
            sub,
            names.pattern(),
            Arc::clone(&watchers),
            lost,
            subscribed_tx,
            opts.op_timeout,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Conn::new(link, opts.op_timeout, opts.min_replicas),
                names,
                scripts: Arc::new(Scripts::new(strict)),
                tokens: tokio::sync::Mutex::default(),
                owners: Mutex::default(),
                watchers,
                expiry_margin: opts.expiry_margin,
                pin,
                subscribed,
                pubsub,
            }),
        })
    }

    /// Waits (at most `limit`) until the pub/sub connection is subscribed; whether it is.
    #[cfg(any(test, feature = "testing"))]
    pub async fn wait_subscribed(&self, limit: Duration) -> bool {
        let mut rx = self.inner.subscribed.clone();
        let subscribed = tokio::time::timeout(limit, rx.wait_for(|s| *s)).await;
        matches!(subscribed, Ok(Ok(_)))
    }

    /// The names of the keys of `key` (tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn key_names(&self, key: &StoreKey) -> (String, String) {
        (
            self.inner.names.record(key),
            self.inner.names.index(&key.id),
        )
    }
}

/// How connections to one endpoint behave.
fn manager_config(opts: &RedisOptions) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(opts.response_timeout))
        // One attempt per reconnect: callers fail fast and the next operation tries again.
        .set_number_of_retries(0)
}

/// Command connections at once: several when writes wait for replicas (a `WAIT` holds its
/// connection).
fn connections(opts: &RedisOptions) -> usize {
    if opts.min_replicas > 0 {
        conn::ACKED_CONNECTIONS
    } else {
        1
    }
}

/// The primary Sentinel names: asked on first use and after any failed operation.
fn sentinel_link(
    opts: &RedisOptions,
    on_push: link::PushFn,
) -> Result<(link::Link, link::Sub), StoreError> {
    let sentinels = opts
        .sentinels
        .iter()
        .map(|u| u.as_str().into_connection_info())
        .collect::<Result<Vec<_>, _>>()
        .map_err(backend_err)?;
    let link = Arc::new(link::SentinelLink::new(
        sentinels,
        opts.master_name.clone(),
        connections(opts),
        manager_config(opts),
        opts.connect_timeout + opts.response_timeout,
    ));
    Ok((
        link::Link::Sentinel(Arc::clone(&link)),
        link::Sub::Sentinel {
            link,
            on_push,
            conn: None,
        },
    ))
}

/// One endpoint: the command connections (several when writes wait for replicas: a `WAIT` holds its
/// connection) and the RESP3 pub/sub connection.
fn single_link(
    opts: &RedisOptions,
    on_push: impl ::redis::aio::AsyncPushSender + Clone,
) -> Result<(link::Link, link::Sub), StoreError> {
    let info = opts
        .url
        .as_str()
        .into_connection_info()
        .map_err(backend_err)?;
    let config = manager_config(opts);
    let client = Client::open(info.clone()).map_err(backend_err)?;
    let managers = link::lazy_managers(&client, &config, connections(opts)).map_err(backend_err)?;
    // Pub/sub messages arrive as RESP3 pushes on a connection of their own.
    let resp3 = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let sub_client = Client::open(info.set_redis_settings(resp3)).map_err(backend_err)?;
    let sub = ConnectionManager::new_lazy_with_config(sub_client, config.set_push_sender(on_push))
        .map_err(backend_err)?;
    Ok((link::Link::Single(managers), link::Sub::Single(sub)))
}

/// A Redis Cluster: the cluster client's connection for commands, and a second, RESP3 one for
/// pub/sub. Both connect on first use.
fn cluster_link(
    opts: &RedisOptions,
    on_push: impl ::redis::aio::AsyncPushSender + Clone,
) -> Result<(link::Link, link::Sub), StoreError> {
    let seeds = opts
        .cluster
        .iter()
        .map(|u| u.as_str().into_connection_info())
        .collect::<Result<Vec<_>, _>>()
        .map_err(backend_err)?;
    let builder = |seeds: Vec<::redis::ConnectionInfo>| {
        ::redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(opts.connect_timeout)
            .response_timeout(opts.response_timeout)
    };
    let client = builder(seeds.clone()).build().map_err(backend_err)?;
    let sub_client = builder(seeds)
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(on_push)
        .build()
        .map_err(backend_err)?;
    Ok((
        link::Link::Cluster(Arc::new(link::ClusterLink::new(client))),
        link::Sub::Cluster {
            client: Box::new(sub_client),
            conn: None,
        },
    ))
}
