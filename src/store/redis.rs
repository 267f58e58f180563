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
//! ever touched alone. Hence the prefix must not contain `{` or `}`. (The store itself connects to one
//! endpoint — a standalone Redis, a primary, or a proxy in front of a cluster; a cluster client is not
//! wired in yet. The layout is what a cluster needs.)
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
//! and `e` with the server's now, so nothing lapsed is ever acted on; [`Store::sweep`] has nothing to do.
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
//! in-process waiters of the key named in each message. Messages can be lost while that connection is
//! down: each time it (re)subscribes, every waiter is woken to look again. The proxy's own timer (the
//! lease left) stays as a last resort. Every replica receives every change message of its prefix; they
//! are small, but at very high rates per-key subscriptions would scale better.
//!
//! # Failure
//! Connections go through [`ConnectionManager`] (reconnects by itself) with bounded connect and response
//! timeouts, and every operation has a deadline: with Redis down, operations fail fast with
//! [`StoreError::Backend`] (`backend = "redis"`), and recover without a restart once it is back.
//! Durability is Redis's own (`appendonly`/`appendfsync`): `flush` has nothing to add.

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use ::redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Client, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, RedisError, Script,
    ScriptInvocation, Value,
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

// === Lua ===

/// Helpers shared by the scripts. `now_ms(pin)`: the server's clock in unix ms, unless the caller pins
/// the time (tests only; the proxy never does).
const PRELUDE: &str = r"
local function now_ms(pin)
  if pin ~= '' then return tonumber(pin) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(n) return string.format('%d', n) end
local function keep(k, px)
  if redis.call('PTTL', k) < px then redis.call('PEXPIRE', k, px) end
end
local function fields(k)
  local f = redis.call('HMGET', k, 's', 't', 'c', 'd', 'e', 'f', 'r')
  for i = 1, 7 do f[i] = f[i] or '' end
  return f
end
local function reply(head, now, f)
  local out = {head, fmt(now)}
  for i = 1, 7 do out[#out + 1] = f[i] end
  return out
end
";

/// KEYS: record, index. ARGV: lease ms, token, live token ('' if none), pin, scope, fingerprint,
/// margin ms.
const CLAIM: &str = r"
local rec, idx = KEYS[1], KEYS[2]
local lease, token = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms(ARGV[4])
local f = fields(rec)
if f[1] == 'f' then
  if tonumber(f[4]) > now or f[2] == ARGV[3] then return reply('rec', now, f) end
  if tonumber(f[2]) >= token then return {'low', f[2]} end
elseif f[1] == 'c' then
  if tonumber(f[5]) > now then return reply('rec', now, f) end
elseif f[1] ~= '' then
  return reply('rec', now, f)
end
redis.call('DEL', rec)
redis.call('HSET', rec, 's', 'f', 't', ARGV[2], 'c', fmt(now), 'd', fmt(now + lease), 'f', ARGV[6])
local px = lease + tonumber(ARGV[7])
redis.call('PEXPIRE', rec, px)
redis.call('SADD', idx, ARGV[5])
keep(idx, px)
return {'claimed'}
";

/// KEYS: record, index. ARGV: token, lease ms, pin, margin ms.
const RENEW: &str = r"
local f = redis.call('HMGET', KEYS[1], 's', 't')
if f[1] ~= 'f' or f[2] ~= ARGV[1] then return 0 end
local lease = tonumber(ARGV[2])
local px = lease + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'd', fmt(now_ms(ARGV[3]) + lease))
redis.call('PEXPIRE', KEYS[1], px)
keep(KEYS[2], px)
return 1
";

/// KEYS: record, index. ARGV: token, ttl ms, pin, response, scope, channel.
const COMPLETE: &str = r"
local f = redis.call('HMGET', KEYS[1], 's', 't')
if f[1] ~= 'f' or f[2] ~= ARGV[1] then return 0 end
local ttl = math.max(tonumber(ARGV[2]), 1)
redis.call('HDEL', KEYS[1], 'd')
redis.call('HSET', KEYS[1], 's', 'c', 'e', fmt(now_ms(ARGV[3]) + ttl), 'r', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SADD', KEYS[2], ARGV[5])
keep(KEYS[2], ttl)
redis.call('PUBLISH', ARGV[6], 'completed')
return 1
";

/// KEYS: record, index. ARGV: token, scope, channel.
const RELEASE: &str = r"
local f = redis.call('HMGET', KEYS[1], 's', 't')
if f[1] ~= 'f' or f[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'released')
return 1
";

/// KEYS: record. ARGV: pin.
const LOOKUP: &str = r"
return reply('rec', now_ms(ARGV[1]), fields(KEYS[1]))
";

/// KEYS: index. ARGV: pin, record-key prefix (the record key is prefix .. scope).
const LIST: &str = r"
local out = {fmt(now_ms(ARGV[1]))}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = fields(ARGV[2] .. m)
  if f[1] == '' then
    redis.call('SREM', KEYS[1], m)
  else
    out[#out + 1] = m
    for i = 1, 7 do out[#out + 1] = f[i] end
  end
end
return out
";

/// KEYS: index. ARGV: record-key prefix, channel prefix.
const PURGE: &str = r"
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('DEL', ARGV[1] .. m) == 1 then
    out[#out + 1] = m
    redis.call('PUBLISH', ARGV[2] .. m, 'purged')
  end
end
redis.call('DEL', KEYS[1])
return out
";

/// KEYS: counter. ARGV: block size, floor. Returns the last token of the block.
const TOKENS: &str = r"
local n, floor = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('INCRBY', KEYS[1], n)
if v - n < floor then
  v = floor + n
  redis.call('SET', KEYS[1], fmt(v))
end
return fmt(v)
";

/// The scripts, compiled once per store (their SHA1 is what EVALSHA sends; a server that lost its
/// script cache, e.g. after a restart, gets the source again).
#[derive(Debug)]
struct Scripts {
    claim: Script,
    renew: Script,
    complete: Script,
    release: Script,
    lookup: Script,
    list: Script,
    purge: Script,
    tokens: Script,
}

impl Scripts {
    /// `strict`: with a `#!lua` first line, so Redis 7+ enforces the rules of scripts that declare
    /// themselves (e.g. in a cluster, every key touched must hash to one slot). Redis 6 does not know
    /// that line, so the proxy sends plain scripts; tests send strict ones to prove the layout.
    fn new(strict: bool) -> Self {
        let head = if strict { "#!lua\n" } else { "" };
        let s = |body: &str| Script::new(&format!("{head}{PRELUDE}{body}"));
        Self {
            claim: s(CLAIM),
            renew: s(RENEW),
            complete: s(COMPLETE),
            release: s(RELEASE),
            lookup: s(LOOKUP),
            list: s(LIST),
            purge: s(PURGE),
            tokens: s(TOKENS),
        }
    }
}

// === Options and names ===

/// How the Redis store connects.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URL (user, password and database number included).
    pub url: String,
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
}

impl RedisOptions {
    /// Options with the default timeouts.
    pub fn new(url: &str, key_prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            key_prefix: key_prefix.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            op_timeout: DEFAULT_OP_TIMEOUT,
            expiry_margin: DEFAULT_EXPIRY_MARGIN,
        }
    }
}

/// Key and channel names (see the module docs).
#[derive(Debug, Clone)]
struct Names {
    prefix: String,
}

impl Names {
    fn record_prefix(&self, id: &[u8; 32]) -> String {
        format!("{}{{{}}}:", self.prefix, hex::encode(id))
    }
    fn record(&self, key: &StoreKey) -> String {
        format!("{}{}", self.record_prefix(&key.id), hex::encode(key.scope))
    }
    fn index(&self, id: &[u8; 32]) -> String {
        format!("{}scopes", self.record_prefix(id))
    }
    fn channel_prefix(&self, id: &[u8; 32]) -> String {
        format!("{}changed:{}:", self.prefix, hex::encode(id))
    }
    fn channel(&self, key: &StoreKey) -> String {
        format!("{}{}", self.channel_prefix(&key.id), hex::encode(key.scope))
    }
    fn tokens(&self) -> String {
        format!("{}token", self.prefix)
    }
    /// The PSUBSCRIBE pattern that matches every channel of this prefix (glob characters escaped).
    fn pattern(&self) -> String {
        let mut p = String::with_capacity(self.prefix.len() + 10);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                p.push('\\');
            }
            p.push(c);
        }
        p.push_str("changed:*");
        p
    }
    /// The key a channel name stands for.
    fn parse_channel(&self, channel: &[u8]) -> Option<StoreKey> {
        let rest = channel
            .strip_prefix(self.prefix.as_bytes())?
            .strip_prefix(b"changed:")?;
        if rest.len() != 129 || rest[64] != b':' {
            return None;
        }
        let mut key = StoreKey {
            id: [0; 32],
            scope: [0; 32],
        };
        hex::decode_to_slice(&rest[..64], &mut key.id).ok()?;
        hex::decode_to_slice(&rest[65..], &mut key.scope).ok()?;
        Some(key)
    }
}

// === Errors and replies ===

fn backend_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        source: Box::new(e),
    }
}

/// A Redis error; `OOM` (`maxmemory` reached under `noeviction`) is the store being full, which the
/// proxy answers with 503 `store-full` (the Redis counterpart of `[store] max_size`).
fn redis_err(e: RedisError) -> StoreError {
    if e.code() == Some("OOM") {
        return StoreError::Full(format!("Redis refused the write: {e}"));
    }
    backend_err(e)
}

fn other_err(msg: String) -> StoreError {
    backend_err(std::io::Error::other(msg))
}

fn unexpected(what: &str) -> StoreError {
    other_err(format!("unexpected reply from redis: {what}"))
}

/// A reply that has the wrong shape, described briefly (it may hold a whole response body).
fn unexpected_value(v: &Value) -> StoreError {
    let described: String = format!("{v:?}").chars().take(120).collect();
    unexpected(&described)
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::Corrupt(DecodeError::Corrupt(what))
}

/// A reply as bytes (the scripts answer strings, arrays of strings, or integers).
fn bytes(v: Value) -> Result<Vec<u8>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(n) => Ok(n.to_string().into_bytes()),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected_value(&other)),
    }
}

fn strings(v: Value) -> Result<Vec<Vec<u8>>, StoreError> {
    match v {
        Value::Array(items) => items.into_iter().map(bytes).collect(),
        other => Err(unexpected_value(&other)),
    }
}

fn int(v: Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(n) => Ok(n),
        other => Err(unexpected_value(&other)),
    }
}

fn num(b: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("number field of a redis record"))
}

/// The record in fields `s t c d e f r` as the scripts return them (`s` empty: no record).
fn record(f: &[Vec<u8>]) -> Result<Option<Record>, StoreError> {
    let [s, t, c, d, e, fp, r] = f else {
        return Err(unexpected("record with a wrong number of fields"));
    };
    let fingerprint = || {
        <[u8; 32]>::try_from(fp.as_slice())
            .map(Fingerprint)
            .map_err(|_| corrupt("fingerprint field of a redis record"))
    };
    match s.as_slice() {
        b"" => Ok(None),
        b"f" => Ok(Some(Record::InFlight(InFlight {
            token: num(t)?,
            created_ms: num(c)?,
            deadline_ms: num(d)?,
            fingerprint: fingerprint()?,
        }))),
        b"c" => match Record::decode(r)? {
            Record::Completed(done) => Ok(Some(Record::Completed(Completed {
                created_ms: num(c)?,
                expires_ms: num(e)?,
                fingerprint: fingerprint()?,
                ..done
            }))),
            Record::InFlight(_) => Err(corrupt("completed redis record holds a claim")),
        },
        _ => Err(corrupt("unknown state of a redis record")),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn pin_arg(pin: Option<&Arc<dyn Clock>>) -> String {
    pin.map(|c| c.now_ms().to_string()).unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Single inserts/removes: a panic while holding the lock cannot leave the maps inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === Connection ===

/// The command connection with the per-operation deadline.
#[derive(Clone)]
struct Conn {
    manager: ConnectionManager,
    op_timeout: Duration,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl Conn {
    async fn eval(&self, inv: &ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut c = self.manager.clone();
        self.bounded(async move {
            match inv.invoke_async::<Value>(&mut c).await {
                // Refused: nothing was sent and the manager has started to reconnect; once Redis is
                // back, the first request after an outage should not be the one that fails.
                Err(e) if e.is_connection_refusal() => inv.invoke_async::<Value>(&mut c).await,
                r => r,
            }
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.manager.clone();
        self.bounded(async move {
            let ping = ::redis::cmd("PING");
            match ping.query_async::<Value>(&mut c).await {
                Err(e) if e.is_connection_refusal() => ping.query_async::<Value>(&mut c).await,
                r => r,
            }
        })
        .await
        .map(drop)
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(redis_err),
            Err(_) => Err(backend_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.op_timeout),
            ))),
        }
    }
}

// === The store ===

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
        for (_, (_, renewal)) in lock(&self.owners).by_token.drain() {
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
    #[cfg(test)]
    pub(crate) fn open_pinned(
        opts: &RedisOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        Self::build(opts, Some(clock), false)
    }

    /// A store whose scripts are sent in Redis 7's strict form (see `Scripts::new`).
    #[cfg(test)]
    pub(crate) fn open_strict(opts: &RedisOptions) -> Result<Self, StoreError> {
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
        if opts.url.starts_with("rediss://") {
            // redis-rs builds its TLS config with rustls' process-wide default provider; make sure
            // there is exactly one (Err: one is already installed, which is just as good).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let info = opts
            .url
            .as_str()
            .into_connection_info()
            .map_err(backend_err)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.response_timeout))
            // One attempt per reconnect: callers fail fast and the next operation tries again.
            .set_number_of_retries(0);
        let client = Client::open(info.clone()).map_err(backend_err)?;
        let manager =
            ConnectionManager::new_lazy_with_config(client, config.clone()).map_err(backend_err)?;

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
        // Pub/sub messages arrive as RESP3 pushes on a connection of their own.
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let sub_client = Client::open(info.set_redis_settings(resp3)).map_err(backend_err)?;
        let sub =
            ConnectionManager::new_lazy_with_config(sub_client, config.set_push_sender(on_push))
                .map_err(backend_err)?;
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
                conn: Conn {
                    manager,
                    op_timeout: opts.op_timeout,
                },
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
    #[cfg(test)]
    pub(crate) async fn wait_subscribed(&self, limit: Duration) -> bool {
        let mut rx = self.inner.subscribed.clone();
        let subscribed = tokio::time::timeout(limit, rx.wait_for(|s| *s)).await;
        matches!(subscribed, Ok(Ok(_)))
    }

    /// The names of the keys of `key` (tests).
    #[cfg(test)]
    pub(crate) fn key_names(&self, key: &StoreKey) -> (String, String) {
        (
            self.inner.names.record(key),
            self.inner.names.index(&key.id),
        )
    }
}

impl Inner {
    fn pin(&self) -> String {
        pin_arg(self.pin.as_ref())
    }

    /// The next fencing token, larger than `floor`.
    async fn token(&self, floor: u64) -> Result<u64, StoreError> {
        let mut t = self.tokens.lock().await;
        if t.next == 0 || t.next > t.last || t.next <= floor {
            let mut inv = self.scripts.tokens.prepare_invoke();
            inv.key(self.names.tokens())
                .arg(TOKEN_BLOCK)
                .arg(floor.max(t.high));
            let last = num(&bytes(self.conn.eval(&inv).await?)?)?;
            t.next = last.saturating_sub(TOKEN_BLOCK) + 1;
            t.last = last;
        }
        let token = t.next;
        t.next += 1;
        t.high = t.high.max(token);
        Ok(token)
    }

    /// Starts renewing the lease of a fresh claim.
    fn own(&self, key: &StoreKey, token: u64, lease: Duration) {
        let renewal = Renewal {
            conn: self.conn.clone(),
            scripts: Arc::clone(&self.scripts),
            record: self.names.record(key),
            index: self.names.index(&key.id),
            token,
            lease,
            margin_ms: ms(self.expiry_margin),
            pin: self.pin.clone(),
        };
        let task = tokio::spawn(renewal.run());
        let mut owners = lock(&self.owners);
        owners.by_key.insert(*key, token);
        owners.by_token.insert(token, (*key, task.abort_handle()));
    }

    fn disown(&self, token: u64) {
        lock(&self.owners).remove(token);
    }

    fn live_token(&self, key: &StoreKey) -> Option<u64> {
        lock(&self.owners).by_key.get(key).copied()
    }
}

/// The task that keeps a live owner's claim: pushes its deadline every `lease / 3`.
struct Renewal {
    conn: Conn,
    scripts: Arc<Scripts>,
    record: String,
    index: String,
    token: u64,
    lease: Duration,
    margin_ms: u64,
    pin: Option<Arc<dyn Clock>>,
}

impl Renewal {
    async fn run(self) {
        let every = (self.lease / 3).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let mut inv = self.scripts.renew.prepare_invoke();
            inv.key(&self.record)
                .key(&self.index)
                .arg(self.token)
                .arg(ms(self.lease))
                .arg(pin_arg(self.pin.as_ref()))
                .arg(self.margin_ms);
            match self.conn.eval(&inv).await.and_then(int) {
                Ok(1) => {}
                Ok(_) => {
                    tracing::debug!(
                        token = self.token,
                        "claim no longer held (taken over, purged or expired): renewal stops"
                    );
                    return;
                }
                // Keep trying: the lease still has two renewals' worth of time left.
                Err(e) => tracing::warn!(token = self.token, error = %e, "could not renew a lease"),
            }
        }
    }
}

/// Handles one push of the pub/sub connection (runs on the connection's task: must not block).
fn on_push(names: &Names, watchers: &Watchers, lost: &Notify, push: PushInfo) {
    let channel = match push.kind {
        PushKind::PMessage => push.data.get(1),
        PushKind::Message => push.data.first(),
        PushKind::Disconnection => {
            lost.notify_one();
            return;
        }
        _ => return,
    };
    let name = match channel {
        Some(Value::BulkString(b)) => b.as_slice(),
        Some(Value::SimpleString(s)) => s.as_bytes(),
        _ => return,
    };
    if let Some(key) = names.parse_channel(name) {
        watchers.notify(&key);
    }
}

/// Keeps the pub/sub connection subscribed: (re)subscribes with backoff, then watches the connection
/// (disconnection pushes and a heartbeat). After each (re)subscription every waiter looks again, since
/// changes made while nobody listened were not heard.
async fn subscribe_loop(
    mut sub: ConnectionManager,
    pattern: String,
    watchers: Arc<Watchers>,
    lost: Arc<Notify>,
    subscribed: watch::Sender<bool>,
    op_timeout: Duration,
) {
    let mut backoff = PUBSUB_BACKOFF.0;
    let mut failing = false;
    loop {
        match tokio::time::timeout(op_timeout, sub.psubscribe(&pattern)).await {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!("redis change notifications are back");
                }
                failing = false;
                backoff = PUBSUB_BACKOFF.0;
                subscribed.send_replace(true);
                watchers.notify_all();
            }
            r => {
                if !failing {
                    let error = match r {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {op_timeout:?}"),
                    };
                    tracing::warn!(
                        %error,
                        "redis change notifications unavailable; waiters fall back to their lease timer"
                    );
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PUBSUB_BACKOFF.1);
                continue;
            }
        }
        loop {
            tokio::select! {
                () = lost.notified() => break,
                () = tokio::time::sleep(PUBSUB_HEARTBEAT) => {
                    let ping = ::redis::cmd("PING");
                    let alive = tokio::time::timeout(op_timeout, ping.query_async::<Value>(&mut sub)).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        subscribed.send_replace(false);
    }
}

impl RedisStore {
    /// The claim itself (see `Store::claim`).
    async fn claim_or_write(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let s = &*self.inner;
        let (record_key, index) = (s.names.record(key), s.names.index(&key.id));
        let scope = hex::encode(key.scope);
        let mut floor = 0;
        // A takeover may need a block above the lapsed claim's token: two tries are enough (the
        // fresh block starts above it), the third guards against a counter that keeps going back.
        for _ in 0..3 {
            let token = s.token(floor).await?;
            let live = s.live_token(key).map(|t| t.to_string()).unwrap_or_default();
            let mut inv = s.scripts.claim.prepare_invoke();
            inv.key(&record_key)
                .key(&index)
                .arg(ms(lease).max(1))
                .arg(token)
                .arg(live)
                .arg(s.pin())
                .arg(&scope)
                .arg(&fp.0[..])
                .arg(ms(s.expiry_margin));
            let reply = strings(s.conn.eval(&inv).await?)?;
            match reply.first().map(Vec::as_slice) {
                Some(b"claimed") => {
                    s.own(key, token, lease);
                    return Ok(ClaimOutcome::Claimed { token });
                }
                Some(b"low") => {
                    floor = num(reply.get(1).map_or(&[][..], Vec::as_slice))?;
                }
                Some(b"rec") if reply.len() == 9 => {
                    let now = num(&reply[1])?;
                    return match record(&reply[2..])? {
                        Some(Record::InFlight(f)) => Ok(ClaimOutcome::InFlight {
                            fingerprint: f.fingerprint,
                            retry_after: retry_after(f.deadline_ms, now),
                        }),
                        Some(Record::Completed(c)) => Ok(ClaimOutcome::Completed(c)),
                        None => Err(unexpected("claim answered an empty record")),
                    };
                }
                _ => return Err(unexpected("claim")),
            }
        }
        Err(other_err(
            "no fencing token above the lapsed claim's could be drawn".into(),
        ))
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        match self.claim_or_write(key, fp, lease).await {
            // Redis refuses writes once `maxmemory` is reached (noeviction), and a claim writes (its
            // token, and the record if the key is new). Retries are still answered from a read:
            // replays and 409s go on, and only a new key gets `store-full`.
            Err(StoreError::Full(why)) => match self.lookup(key).await {
                Ok(Some(Record::Completed(c))) => Ok(ClaimOutcome::Completed(c)),
                Ok(Some(Record::InFlight(f))) => Ok(ClaimOutcome::InFlight {
                    fingerprint: f.fingerprint,
                    retry_after: Duration::from_secs(1),
                }),
                Ok(None) | Err(_) => Err(StoreError::Full(why)),
            },
            other => other,
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let s = &*self.inner;
        // The owner is done whatever happens next: if the write fails, the claim lapses at its deadline.
        s.disown(token);
        let response = Record::Completed(Completed {
            created_ms: 0,
            expires_ms: 0,
            fingerprint: Fingerprint([0; 32]),
            status: result.status,
            headers: result.headers,
            body: result.body,
            body_omitted: result.body_omitted,
            seen_only: result.seen_only,
        })
        .encode();
        let mut inv = s.scripts.complete.prepare_invoke();
        inv.key(s.names.record(key))
            .key(s.names.index(&key.id))
            .arg(token)
            .arg(ms(ttl))
            .arg(s.pin())
            .arg(response)
            .arg(hex::encode(key.scope))
            .arg(s.names.channel(key));
        if int(s.conn.eval(&inv).await?)? != 1 {
            return Ok(Committed::Stale);
        }
        // Waiters in this process need not wait for the round trip through pub/sub.
        s.watchers.notify(key);
        Ok(Committed::Done)
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        let s = &*self.inner;
        s.disown(token);
        let mut inv = s.scripts.release.prepare_invoke();
        inv.key(s.names.record(key))
            .key(s.names.index(&key.id))
            .arg(token)
            .arg(hex::encode(key.scope))
            .arg(s.names.channel(key));
        if int(s.conn.eval(&inv).await?)? != 1 {
            return Ok(Committed::Stale);
        }
        s.watchers.notify(key);
        Ok(Committed::Done)
    }

    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let s = &*self.inner;
        let mut inv = s.scripts.lookup.prepare_invoke();
        inv.key(s.names.record(key)).arg(s.pin());
        let reply = strings(s.conn.eval(&inv).await?)?;
        if reply.len() != 9 {
            return Err(unexpected("lookup"));
        }
        let now = num(&reply[1])?;
        Ok(record(&reply[2..])?
            .filter(|r| !matches!(r, Record::Completed(c) if c.expires_ms <= now)))
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let s = &*self.inner;
        let mut inv = s.scripts.list.prepare_invoke();
        inv.key(s.names.index(id))
            .arg(s.pin())
            .arg(s.names.record_prefix(id));
        let reply = strings(s.conn.eval(&inv).await?)?;
        let Some((now, entries)) = reply.split_first() else {
            return Err(unexpected("list"));
        };
        let now = num(now)?;
        if entries.len() % 8 != 0 {
            return Err(unexpected("list entries"));
        }
        let mut out = Vec::with_capacity(entries.len() / 8);
        for entry in entries.chunks_exact(8) {
            let mut key = StoreKey {
                id: *id,
                scope: [0; 32],
            };
            hex::decode_to_slice(&entry[0], &mut key.scope)
                .map_err(|_| corrupt("scope in a redis index"))?;
            match record(&entry[1..])? {
                Some(Record::Completed(c)) if c.expires_ms <= now => {}
                Some(rec) => out.push((key, rec)),
                None => {}
            }
        }
        out.sort_by_key(|e| e.0);
        Ok(out)
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        let s = &*self.inner;
        let mut inv = s.scripts.purge.prepare_invoke();
        inv.key(s.names.index(id))
            .arg(s.names.record_prefix(id))
            .arg(s.names.channel_prefix(id));
        let scopes = strings(s.conn.eval(&inv).await?)?;
        for scope in &scopes {
            let mut key = StoreKey {
                id: *id,
                scope: [0; 32],
            };
            if hex::decode_to_slice(scope, &mut key.scope).is_ok() {
                s.watchers.notify(&key);
            }
        }
        Ok(scopes.len() as u64)
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.inner.watchers.subscribe(key)
    }

    fn abandon(&self, token: u64) {
        // Renewals stop: the claim now lives only until its deadline, as if this process had died.
        self.inner.disown(token);
    }

    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        // Redis expires every key by itself (see the module docs).
        Ok(SweepStats::default())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Writes are acknowledged by Redis; their durability is its `appendfsync` setting.
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.conn.ping().await
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str) -> Names {
        Names {
            prefix: prefix.into(),
        }
    }

    #[test]
    fn every_key_of_an_id_shares_one_hash_tag() {
        let n = names("idemproxy:");
        let k = StoreKey {
            id: [0xab; 32],
            scope: [0x01; 32],
        };
        let tag = format!("{{{}}}", hex::encode(k.id));
        for name in [n.record(&k), n.index(&k.id)] {
            assert!(name.starts_with("idemproxy:"), "{name}");
            // Redis Cluster hashes the first {…} of a key name.
            let first = &name[name.find('{').unwrap()..=name.find('}').unwrap()];
            assert_eq!(first, tag, "{name}");
        }
        assert_eq!(
            n.record(&k),
            format!("{}{}", n.record_prefix(&k.id), hex::encode(k.scope))
        );
    }

    #[test]
    fn channels_roundtrip_and_the_pattern_is_escaped() {
        let n = names("a*b?[c]:");
        let k = StoreKey {
            id: [7; 32],
            scope: [9; 32],
        };
        assert_eq!(n.parse_channel(n.channel(&k).as_bytes()), Some(k));
        assert_eq!(
            n.channel(&k),
            format!("{}{}", n.channel_prefix(&k.id), hex::encode(k.scope))
        );
        assert_eq!(n.pattern(), r"a\*b\?\[c\]:changed:*");
        assert_eq!(n.parse_channel(b"a*b?[c]:changed:zz"), None);
        assert_eq!(
            names("other:").parse_channel(n.channel(&k).as_bytes()),
            None
        );
    }

    #[test]
    fn bad_prefixes_urls_and_a_missing_runtime_are_errors_not_panics() {
        let open = |url: &str, prefix: &str| RedisStore::open(&RedisOptions::new(url, prefix));
        assert!(matches!(
            open("redis://127.0.0.1:1/0", "a{b}:"),
            Err(StoreError::Backend {
                backend: "redis",
                ..
            })
        ));
        // No tokio runtime here.
        assert!(open("redis://127.0.0.1:1/0", "ok:").is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(open("redis://[nope", "ok:").is_err());
            // Lazy: opening succeeds with nothing listening; operations then fail fast.
            let s = open("redis://127.0.0.1:1/0", "ok:").unwrap();
            assert!(s.ping().await.is_err());
        });
    }

    #[test]
    fn records_are_rebuilt_from_their_fields() {
        let f = |s: &[&[u8]]| s.iter().map(|b| b.to_vec()).collect::<Vec<_>>();
        let fp = [3u8; 32];
        assert_eq!(
            record(&f(&[b"f", b"7", b"10", b"20", b"", &fp, b""])).unwrap(),
            Some(Record::InFlight(InFlight {
                token: 7,
                created_ms: 10,
                deadline_ms: 20,
                fingerprint: Fingerprint(fp),
            }))
        );
        assert_eq!(
            record(&f(&[b"", b"", b"", b"", b"", b"", b""])).unwrap(),
            None
        );
        assert!(matches!(
            record(&f(&[b"x", b"", b"", b"", b"", b"", b""])),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            record(&f(&[b"c", b"1", b"2", b"", b"3", &fp, b"\x09"])),
            Err(StoreError::Corrupt(DecodeError::Version(9)))
        ));
    }
}
