//! The store: where claims and results live, behind one [`Store`] trait.
//!
//! # Record state machine (one per [`StoreKey`])
//! ```text
//!              claim (atomic)                 complete(token) — token must match
//!   Absent ───────────────────▶ InFlight ─────────────────────────────▶ Completed
//!     ▲                          │   │  ▲                                   │
//!     │  release(token), or the  │   │  │ claim after the lease deadline,   │
//!     │  claim call dropped      │   │  │ owner gone: takeover, NEW token   │
//!     │  before it returned      │   │  │                                   │
//!     ├──────────────────────────┘   │  │                                   │
//!     │                              └──┘                                   │
//!     │            TTL passed (reads treat it as Absent; the sweeper deletes)│
//!     └─────────────────────────────────────────────────────────────────────┘
//!     ▲                          │
//!     └──────────────────────────┘ sweeper: lease deadline passed and no live owner in this
//!                                   process (abandoned, or left by a crash)
//! ```
//! - `claim` is the only way in, and it is atomic (a compare-and-swap: under the key's lock in the sled
//!   store, a Lua script in Redis): of any number of concurrent claimers exactly one gets
//!   [`ClaimOutcome::Claimed`].
//! - Every claim gets a fresh fencing token, larger than any before it. `complete` and `release` with a
//!   token that is no longer the record's (the lease expired and someone took over) change nothing and
//!   answer [`Committed::Stale`]: a late owner can never overwrite the taker's result.
//! - A live owner keeps its claim however long its upstream call runs: the store remembers which tokens
//!   belong to live owners of this process ([`Store::abandon`] forgets one). The lease deadline, which is
//!   persisted, only bounds how long a claim outlives a dead owner, e.g. across a crash and restart.
//! - A completed record past its TTL is never returned: reads check `expires_ms`; the sweeper removes it
//!   from disk later.
//! - With [`crate::config::SyncPolicy::Always`] a claim is durable before `claim` returns and a result
//!   before `complete` returns, and a `claim` that finds a result whose flush is still pending waits for
//!   it before answering [`ClaimOutcome::Completed`] (a replay never shows what a crash could take back).

pub mod instrumented;
pub mod memory;
pub mod record;
pub mod redis;
pub mod shared_bytes;
pub mod sled;
mod sweeper;
mod watch;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::{fmt::Debug, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use crate::key::{Fingerprint, StoreKey};
pub use record::{Completed, DecodeError, InFlight, Record};
pub use watch::KeyWatch;

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key is ours: forward, then `complete` or `release` with this token.
    Claimed {
        /// Fencing token of this claim.
        token: u64,
    },
    /// Another request holds the key.
    InFlight {
        /// Fingerprint of the request that holds it.
        fingerprint: Fingerprint,
        /// Time left on its lease (at least 1 s when the owner is alive past its deadline).
        retry_after: Duration,
    },
    /// The key has a recorded result.
    Completed(Completed),
}

/// Whether a `complete`/`release` took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// It did.
    Done,
    /// The token is no longer the record's (taken over, purged or expired): nothing changed.
    Stale,
}

/// A result to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewResult {
    /// Upstream status.
    pub status: u16,
    /// End-to-end headers, `Set-Cookie` removed.
    pub headers: Vec<(String, Bytes)>,
    /// Body (empty when omitted).
    pub body: Bytes,
    /// The body was over `max_response_body`.
    pub body_omitted: bool,
    /// Keep only the fact that the key was seen.
    pub seen_only: bool,
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Expired records deleted.
    pub expired: u64,
    /// Records (or index entries, for a backend with an index) looked at.
    pub scanned: u64,
}

/// A store failure (outer error of every operation; expected outcomes are in the `Ok` value).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, connection).
    #[error("{backend} store failed: {source}")]
    Backend {
        /// `sled`, `redis`, …
        backend: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(#[from] DecodeError),
    /// The store is shut down.
    #[error("the store is closed")]
    Closed,
    /// The store did not answer within `[store] timeout`.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store is full (`[store] max_size` reached, or Redis's `maxmemory`): no new key is taken
    /// until expired records are swept.
    #[error("the store is full: {0}")]
    Full(String),
}

/// The store behind the proxy: the hot path every keyed request takes (claim, then complete or
/// release), with what operators ask of it ([`StoreAdmin`]) and what keeps it running
/// ([`StoreUpkeep`]) in traits of their own. Implementations: [`memory::MemoryStore`] (reference
/// model, tests), [`sled::SledStore`] (embedded, durable) and [`redis::RedisStore`] (shared); see
/// the module docs for the state machine every one follows; `testing::conformance` checks it on each.
#[async_trait]
pub trait Store: StoreAdmin + StoreUpkeep + Send + Sync + Debug + 'static {
    /// Atomically claims `key` for a request with fingerprint `fp`, or says who has it (and, for a
    /// completed key, its result: the replay needs no second read). A call dropped before it returns
    /// (the client went away) leaves no claim behind once the store has caught up: nothing acted on it.
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError>;

    /// Records the result of the claim `token`, kept for `ttl`.
    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError>;

    /// Frees the key held by `token`, so the next request with it is forwarded.
    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError>;

    /// A watch that fires when `key` is completed, released or purged. Subscribe *before* the claim
    /// whose outcome you will wait on, so no change can slip between the two.
    fn watch(&self, key: &StoreKey) -> KeyWatch;

    /// The owner of `token` is gone without completing or releasing (it crashed): from now on its claim
    /// lives only until its lease deadline.
    fn abandon(&self, token: u64);
}

/// What the admin API asks of a store: reading and purging records by key.
#[async_trait]
pub trait StoreAdmin {
    /// The live record of `key` (never an expired completed one).
    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError>;

    /// Every live record of a (route, key) digest, one per scope.
    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError>;

    /// Deletes every record of a (route, key) digest; returns how many there were.
    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError>;
}

/// What keeps a store running: sweeping, flushing, health, counters and the final close.
#[async_trait]
pub trait StoreUpkeep {
    /// Deletes expired records (completed past TTL, claims past their lease whose owner is gone).
    async fn sweep(&self) -> Result<SweepStats, StoreError>;

    /// Makes every write so far durable.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Checks that the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Backend name for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Size and durability counters, where the backend has them.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// Stops the store's background work (its sweeper first) and leaves its data ready for the next
    /// open (called once, at shutdown, after the last flush). `clean`: nothing writes any more.
    /// Backends whose tasks stop on drop have nothing to do.
    async fn close(&self, clean: bool) {
        let _ = clean;
    }
}

/// What a backend reports about itself (exported as gauges, see `metrics`).
pub use crate::metrics::BackendStats;

/// Seconds to tell a client to wait: time left on a lease, rounded up, at least one second.
pub(crate) fn retry_after(deadline_ms: u64, now_ms: u64) -> Duration {
    let left = deadline_ms.saturating_sub(now_ms);
    Duration::from_secs(left.div_ceil(1000).max(1))
}
