//! One test suite, run against every [`Store`] implementation: the state machine of `store/mod.rs`,
//! fencing, leases, TTL, sweeping, watches, and a model-based random test against a plain model.
//!
//! Redis runs in the suite on a real `redis-server` (one per test binary while any test needs it, each
//! store under its own key prefix), with its scripts' clock pinned to the suite's `ManualClock` so the
//! time-dependent tests stay exact. The Redis-only tests at the end use the server's own clock and real
//! (short) leases and TTLs: renewal by a live owner, takeover from a dead one across two replicas,
//! pub/sub wake-ups across replicas, native expiry, an outage and its recovery, and every script on a
//! one-node Redis Cluster that refuses cross-slot access.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use parking_lot::Mutex;

use bytes::Bytes;
use proptest::{prelude::*, test_runner::TestRunner};

use crate::store::{
    memory::MemoryStore,
    redis::{RedisOptions, RedisStore},
    sled::open_default,
    ClaimOutcome, Committed, KeyWatch, NewResult, Record, Store, StoreError,
};
use crate::{
    clock::{Clock, ManualClock},
    config::SyncPolicy,
    key::{Fingerprint, StoreKey},
};

use super::redis_server::{self, RedisServer};
use crate::store::StoreUpkeep;

mod model;
mod redis;

pub use model::model_based;
pub use redis::*;

const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);

fn key(n: u8, scope: u8) -> StoreKey {
    StoreKey {
        id: [n; 32],
        scope: [scope; 32],
    }
}

fn result(body: &'static str) -> NewResult {
    NewResult {
        status: 201,
        headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
        body: Bytes::from_static(body.as_bytes()),
        body_omitted: false,
        seen_only: false,
    }
}

/// What a fixture keeps alive as long as its store: a sled dir, or the Redis server.
#[allow(dead_code)]
#[derive(Debug)]
pub enum Guard {
    Nothing,
    Dir(tempfile::TempDir),
    Redis(Arc<RedisServer>),
}

/// A fresh store of each kind, with its clock.
pub type Fixture = (Arc<dyn Store>, Arc<ManualClock>, Guard);

pub fn stores() -> Vec<Fixture> {
    let mut out: Vec<Fixture> = Vec::new();
    let c = Arc::new(ManualClock::new(1_000_000));
    out.push((Arc::new(MemoryStore::new(c.clone())), c, Guard::Nothing));
    for sync in [SyncPolicy::Always, SyncPolicy::Periodic] {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(ManualClock::new(1_000_000));
        let s = open_default(dir.path(), sync, c.clone()).unwrap();
        out.push((Arc::new(s), c, Guard::Dir(dir)));
    }
    if skip_redis() {
        return out;
    }
    let server = shared_redis();
    let c = Arc::new(ManualClock::new(1_000_000));
    let s = RedisStore::open_pinned(
        &RedisOptions::new(&server.url(), &unique_prefix()),
        c.clone(),
    )
    .unwrap();
    out.push((Arc::new(s), c, Guard::Redis(server)));
    out
}

/// Without `redis-server` on the PATH the Redis cases are skipped (and say so); the others run.
fn skip_redis() -> bool {
    let skip = !redis_server::available();
    if skip {
        eprintln!("redis-server is not on the PATH: the Redis cases of the store conformance suite are skipped");
    }
    skip
}

/// The `redis-server` of this test binary: started by the first test that needs it, shared by every
/// test running meanwhile, killed when the last of them drops it.
fn shared_redis() -> Arc<RedisServer> {
    static SHARED: Mutex<Weak<RedisServer>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock();
    if let Some(s) = shared.upgrade() {
        return s;
    }
    let s = Arc::new(RedisServer::start());
    *shared = Arc::downgrade(&s);
    s
}

/// A key prefix no other store of this run uses.
fn unique_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn token(o: ClaimOutcome) -> u64 {
    match o {
        ClaimOutcome::Claimed { token } => token,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

pub async fn claim_complete_replay() {
    for (s, _, _d) in stores() {
        let k = key(1, 0);
        let fp = Fingerprint([9; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        match s.claim(&k, fp, LEASE).await.unwrap() {
            ClaimOutcome::InFlight {
                fingerprint,
                retry_after,
            } => {
                assert_eq!(fingerprint, fp);
                assert_eq!(retry_after, LEASE);
            }
            o => panic!("{}: {o:?}", s.backend()),
        }
        assert_eq!(
            s.complete(&k, t, result("a"), TTL).await.unwrap(),
            Committed::Done
        );
        match s.claim(&k, fp, LEASE).await.unwrap() {
            ClaimOutcome::Completed(c) => {
                assert_eq!(c.body, Bytes::from_static(b"a"));
                assert_eq!(c.fingerprint, fp);
                assert_eq!(c.status, 201);
            }
            o => panic!("{}: {o:?}", s.backend()),
        }
        // A second complete with the same token is stale: the record is no longer in flight.
        assert_eq!(
            s.complete(&k, t, result("b"), TTL).await.unwrap(),
            Committed::Stale
        );
        assert!(matches!(s.lookup(&k).await.unwrap(), Some(Record::Completed(c)) if c.body == "a"));
    }
}

pub async fn release_frees_the_key_and_stale_release_does_nothing() {
    for (s, _, _d) in stores() {
        let k = key(2, 0);
        let fp = Fingerprint([1; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        assert_eq!(s.release(&k, t + 1000).await.unwrap(), Committed::Stale);
        assert!(matches!(
            s.lookup(&k).await.unwrap(),
            Some(Record::InFlight(_))
        ));
        assert_eq!(s.release(&k, t).await.unwrap(), Committed::Done);
        assert_eq!(s.lookup(&k).await.unwrap(), None);
        let t2 = token(s.claim(&k, fp, LEASE).await.unwrap());
        assert!(t2 > t, "{}: tokens must increase", s.backend());
    }
}

pub async fn live_owner_keeps_its_claim_past_the_lease() {
    for (s, clock, _d) in stores() {
        let k = key(3, 0);
        let fp = Fingerprint([1; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        clock.advance(LEASE.as_millis() as u64 * 5);
        match s.claim(&k, fp, LEASE).await.unwrap() {
            ClaimOutcome::InFlight { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(1))
            }
            o => panic!("{}: {o:?}", s.backend()),
        }
        assert_eq!(s.sweep().await.unwrap().expired, 0, "{}", s.backend());
        assert_eq!(
            s.complete(&k, t, result("a"), TTL).await.unwrap(),
            Committed::Done
        );
    }
}

pub async fn takeover_after_lease_and_late_owner_is_fenced() {
    for (s, clock, _d) in stores() {
        let k = key(4, 0);
        let fp = Fingerprint([1; 32]);
        let t1 = token(s.claim(&k, fp, LEASE).await.unwrap());
        s.abandon(t1); // the owner dies
        clock.advance(LEASE.as_millis() as u64 - 1);
        assert!(matches!(
            s.claim(&k, fp, LEASE).await.unwrap(),
            ClaimOutcome::InFlight { .. }
        ));
        clock.advance(1);
        let t2 = token(s.claim(&k, fp, LEASE).await.unwrap());
        assert!(t2 > t1);
        // The late first owner can neither record nor release.
        assert_eq!(
            s.complete(&k, t1, result("late"), TTL).await.unwrap(),
            Committed::Stale
        );
        assert_eq!(s.release(&k, t1).await.unwrap(), Committed::Stale);
        assert_eq!(
            s.complete(&k, t2, result("taker"), TTL).await.unwrap(),
            Committed::Done
        );
        assert_eq!(
            s.complete(&k, t1, result("late"), TTL).await.unwrap(),
            Committed::Stale
        );
        match s.lookup(&k).await.unwrap() {
            Some(Record::Completed(c)) => assert_eq!(c.body, "taker"),
            o => panic!("{}: {o:?}", s.backend()),
        }
    }
}

pub async fn ttl_expiry_and_sweep() {
    for (s, clock, _d) in stores() {
        let k = key(5, 0);
        let fp = Fingerprint([1; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        s.complete(&k, t, result("a"), TTL).await.unwrap();
        clock.advance(TTL.as_millis() as u64 - 1);
        assert!(s.lookup(&k).await.unwrap().is_some());
        clock.advance(1);
        // Expired but not yet swept: never replayed.
        assert_eq!(s.lookup(&k).await.unwrap(), None);
        assert!(s.list(&k.id).await.unwrap().is_empty());
        let stats = s.sweep().await.unwrap();
        // Redis expires records by itself (in real time); its sweep has nothing to do.
        let want = if s.backend() == "redis" { 0 } else { 1 };
        assert_eq!(stats.expired, want, "{}", s.backend());
        token(s.claim(&k, fp, LEASE).await.unwrap());
    }
}

pub async fn scopes_are_separate_and_purge_takes_all() {
    for (s, _, _d) in stores() {
        let (a, b) = (key(6, 1), key(6, 2));
        let fp = Fingerprint([1; 32]);
        let ta = token(s.claim(&a, fp, LEASE).await.unwrap());
        let tb = token(s.claim(&b, fp, LEASE).await.unwrap());
        s.complete(&a, ta, result("A"), TTL).await.unwrap();
        s.complete(&b, tb, result("B"), TTL).await.unwrap();
        assert_eq!(s.list(&a.id).await.unwrap().len(), 2);
        assert!(s.list(&[7; 32]).await.unwrap().is_empty());
        assert_eq!(s.purge(&a.id).await.unwrap(), 2);
        assert_eq!(s.lookup(&a).await.unwrap(), None);
        token(s.claim(&b, fp, LEASE).await.unwrap());
    }
}

pub async fn watch_fires_on_complete_and_release() {
    for (s, _, _d) in stores() {
        let k = key(8, 0);
        let fp = Fingerprint([1; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        let mut w = s.watch(&k);
        let s2 = Arc::clone(&s);
        let done = tokio::spawn(async move { s2.complete(&k, t, result("a"), TTL).await.unwrap() });
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("watch fired");
        assert_eq!(done.await.unwrap(), Committed::Done);
        let k2 = key(9, 0);
        let t = token(s.claim(&k2, fp, LEASE).await.unwrap());
        let mut w = s.watch(&k2);
        s.release(&k2, t).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("watch fired");
    }
}

/// A claim whose call is dropped before it returns (the client went away while the claim waited for
/// its sync, or for Redis) was never acted on: the key is free again, and a retry takes it at once
/// (sled), or as soon as the dropped claim's release reaches Redis, instead of after the lease.
pub async fn a_claim_dropped_before_it_returns_leaves_the_key_free() {
    let mut dropped = 0;
    for (s, _, _d) in stores() {
        let fp = Fingerprint([1; 32]);
        for n in 0..8 {
            let k = key(20 + n, 0);
            let w = s.watch(&k);
            let first = {
                let mut claim = s.claim(&k, fp, LEASE);
                // One poll, then the call is dropped if it has not returned.
                tokio::select! {
                    biased;
                    o = &mut claim => Some(o),
                    () = std::future::ready(()) => None,
                }
            };
            if let Some(o) = first {
                // Nothing to wait for (memory, sled "periodic"): the claim was returned.
                token(o.unwrap());
                continue;
            }
            dropped += 1;
            claimed_once_freed(&*s, &k, w).await;
        }
    }
    assert!(dropped > 0, "no claim call was dropped before it returned");
}

/// Claims `k` until it is ours, within 5 s: a claim that finds it in flight waits for `w` (subscribed
/// before the claim that was dropped) to say the key changed, then tries again.
async fn claimed_once_freed(s: &dyn Store, k: &StoreKey, mut w: KeyWatch) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match s.claim(k, Fingerprint([1; 32]), LEASE).await.unwrap() {
            ClaimOutcome::Claimed { .. } => return,
            ClaimOutcome::InFlight { .. } => {
                tokio::time::timeout_at(deadline, w.changed())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("{}: the dropped claim still holds the key", s.backend())
                    });
                w = s.watch(k);
            }
            o => panic!("{}: {o:?}", s.backend()),
        }
    }
}

pub async fn concurrent_claimers_exactly_one_wins() {
    for (s, _, _d) in stores() {
        let k = key(10, 0);
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let s = Arc::clone(&s);
            tasks.push(tokio::spawn(async move {
                s.claim(&k, Fingerprint([1; 32]), LEASE).await.unwrap()
            }));
        }
        let mut winners = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), ClaimOutcome::Claimed { .. }) {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "{}", s.backend());
    }
}

pub async fn sled_keeps_records_across_reopen_and_claims_survive_with_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(5_000_000));
    let (k, inflight) = (key(11, 0), key(12, 0));
    let fp = Fingerprint([1; 32]);
    {
        let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        s.complete(&k, t, result("kept"), TTL).await.unwrap();
        token(s.claim(&inflight, fp, LEASE).await.unwrap());
        s.close(true);
    }
    let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
    assert!(
        matches!(s.claim(&k, fp, LEASE).await.unwrap(), ClaimOutcome::Completed(c) if c.body == "kept")
    );
    // The dead process's claim holds until its recorded deadline, then can be taken over.
    assert!(matches!(
        s.claim(&inflight, fp, LEASE).await.unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    clock.advance(LEASE.as_millis() as u64);
    token(s.claim(&inflight, fp, LEASE).await.unwrap());
}

pub async fn sweeper_keeps_disk_bounded_under_churn() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let s = open_default(dir.path(), SyncPolicy::Periodic, clock.clone()).unwrap();
    for round in 0..5u8 {
        for i in 0..200u8 {
            let k = StoreKey {
                id: [round; 32],
                scope: [i; 32],
            };
            let t = token(s.claim(&k, Fingerprint([1; 32]), LEASE).await.unwrap());
            s.complete(&k, t, result("x"), Duration::from_secs(1))
                .await
                .unwrap();
        }
        clock.advance(1_000);
        let st = s.sweep().await.unwrap();
        assert_eq!(st.expired, 200);
        assert_eq!(s.len(), 0);
    }
}
