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
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use proptest::{prelude::*, test_runner::TestRunner};

use super::{
    memory::MemoryStore,
    redis::{RedisOptions, RedisStore},
    sled::open_default,
    ClaimOutcome, Committed, NewResult, Record, Store, StoreError,
};
use crate::{
    clock::{Clock, ManualClock},
    config::SyncPolicy,
    key::{Fingerprint, StoreKey},
};

#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/common/redis.rs"]
mod redis_server;

use redis_server::RedisServer;

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
enum Guard {
    Nothing,
    Dir(tempfile::TempDir),
    Redis(Arc<RedisServer>),
}

/// A fresh store of each kind, with its clock.
type Fixture = (Arc<dyn Store>, Arc<ManualClock>, Guard);

fn stores() -> Vec<Fixture> {
    let mut out: Vec<Fixture> = Vec::new();
    let c = Arc::new(ManualClock::new(1_000_000));
    out.push((Arc::new(MemoryStore::new(c.clone())), c, Guard::Nothing));
    for sync in [SyncPolicy::Always, SyncPolicy::Periodic] {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(ManualClock::new(1_000_000));
        let s = open_default(dir.path(), sync, c.clone()).unwrap();
        out.push((Arc::new(s), c, Guard::Dir(dir)));
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

/// The `redis-server` of this test binary: started by the first test that needs it, shared by every
/// test running meanwhile, killed when the last of them drops it.
fn shared_redis() -> Arc<RedisServer> {
    static SHARED: Mutex<Weak<RedisServer>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
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

#[tokio::test]
async fn claim_complete_replay() {
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

#[tokio::test]
async fn release_frees_the_key_and_stale_release_does_nothing() {
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

#[tokio::test]
async fn live_owner_keeps_its_claim_past_the_lease() {
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

#[tokio::test]
async fn takeover_after_lease_and_late_owner_is_fenced() {
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

#[tokio::test]
async fn ttl_expiry_and_sweep() {
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

#[tokio::test]
async fn scopes_are_separate_and_purge_takes_all() {
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

#[tokio::test]
async fn watch_fires_on_complete_and_release() {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_exactly_one_wins() {
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

#[tokio::test]
async fn sled_keeps_records_across_reopen_and_claims_survive_with_their_deadline() {
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

#[tokio::test]
async fn sweeper_keeps_disk_bounded_under_churn() {
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

/// Operations of the model-based test.
#[derive(Debug, Clone)]
enum Op {
    Claim(u8),
    Complete(u8),
    Release(u8),
    StaleComplete(u8),
    Abandon(u8),
    Advance(u16),
    Purge(u8),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3).prop_map(Op::Claim),
        (0u8..3).prop_map(Op::Complete),
        (0u8..3).prop_map(Op::Release),
        (0u8..3).prop_map(Op::StaleComplete),
        (0u8..3).prop_map(Op::Abandon),
        (0u16..15_000).prop_map(Op::Advance),
        (0u8..3).prop_map(Op::Purge),
        Just(Op::Sweep),
    ]
}

/// The model: per key, nothing, a claim (token, deadline, owner alive) or a result (body, expiry).
#[derive(Debug, Clone, Copy, PartialEq)]
enum M {
    Absent,
    InFlight {
        token: u64,
        deadline: u64,
        alive: bool,
    },
    Done {
        body: u8,
        expires: u64,
    },
}

#[test]
fn model_based() {
    // One redis-server for all cases (a runner instead of `proptest!` so it outlives them).
    let _redis = shared_redis();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let outcome = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        run_model(&ops);
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

fn run_model(ops: &[Op]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (s, clock, _d) in stores() {
            let mut model = [M::Absent; 3];
            let mut stale = [0u64; 3];
            let mut seq = 0u8;
            for op in ops {
                let now = clock.now_ms();
                match *op {
                    Op::Claim(i) => {
                        let k = key(i, 0);
                        let got = s.claim(&k, Fingerprint([1; 32]), LEASE).await.unwrap();
                        let m = &mut model[i as usize];
                        let free = match *m {
                            M::Absent => true,
                            M::InFlight {
                                deadline, alive, ..
                            } => deadline <= now && !alive,
                            M::Done { expires, .. } => expires <= now,
                        };
                        match (free, got) {
                            (true, ClaimOutcome::Claimed { token }) => {
                                if let M::InFlight { token: old, .. } = *m {
                                    stale[i as usize] = old;
                                }
                                *m = M::InFlight {
                                    token,
                                    deadline: now + LEASE.as_millis() as u64,
                                    alive: true,
                                };
                            }
                            (false, ClaimOutcome::InFlight { .. }) => {
                                assert!(matches!(m, M::InFlight { .. }))
                            }
                            (false, ClaimOutcome::Completed(c)) => {
                                assert!(
                                    matches!(*m, M::Done { body, .. } if c.body.as_ref() == [body])
                                );
                            }
                            (free, got) => {
                                panic!("{}: free={free} model={m:?} got={got:?}", s.backend())
                            }
                        }
                    }
                    Op::Complete(i) | Op::StaleComplete(i) => {
                        let k = key(i, 0);
                        let m = &mut model[i as usize];
                        let t = match (op, *m) {
                            (Op::Complete(_), M::InFlight { token, .. }) => token,
                            _ => stale[i as usize],
                        };
                        seq = seq.wrapping_add(1);
                        let r = NewResult {
                            body: Bytes::from(vec![seq]),
                            ..result("")
                        };
                        let got = s.complete(&k, t, r, TTL).await.unwrap();
                        let want = matches!(*m, M::InFlight { token, .. } if token == t && t != 0);
                        assert_eq!(
                            got == Committed::Done,
                            want,
                            "{}: complete {op:?} model={m:?}",
                            s.backend()
                        );
                        if want {
                            *m = M::Done {
                                body: seq,
                                expires: now + TTL.as_millis() as u64,
                            };
                        }
                    }
                    Op::Release(i) => {
                        let k = key(i, 0);
                        let m = &mut model[i as usize];
                        let t = match *m {
                            M::InFlight { token, .. } => token,
                            _ => stale[i as usize],
                        };
                        let got = s.release(&k, t).await.unwrap();
                        let want = matches!(*m, M::InFlight { token, .. } if token == t && t != 0);
                        assert_eq!(got == Committed::Done, want, "{}", s.backend());
                        if want {
                            *m = M::Absent;
                        }
                    }
                    Op::Abandon(i) => {
                        if let M::InFlight {
                            token,
                            ref mut alive,
                            ..
                        } = model[i as usize]
                        {
                            s.abandon(token);
                            *alive = false;
                        }
                    }
                    Op::Advance(ms) => clock.advance(u64::from(ms)),
                    Op::Purge(i) => {
                        let n = s.purge(&key(i, 0).id).await.unwrap();
                        let m = &mut model[i as usize];
                        assert_eq!(n > 0, *m != M::Absent, "{}", s.backend());
                        if let M::InFlight { token, .. } = *m {
                            stale[i as usize] = token;
                        }
                        *m = M::Absent;
                    }
                    Op::Sweep => {
                        s.sweep().await.unwrap();
                        // Redis expires natively, in real time (far beyond a test case): its
                        // sweep removes nothing, and reads already hide what lapsed.
                        let swept = if s.backend() == "redis" {
                            &mut [][..]
                        } else {
                            &mut model[..]
                        };
                        for m in swept {
                            let gone = match *m {
                                M::InFlight {
                                    deadline, alive, ..
                                } => deadline <= now && !alive,
                                M::Done { expires, .. } => expires <= now,
                                M::Absent => false,
                            };
                            if gone {
                                *m = M::Absent;
                            }
                        }
                    }
                }
                // Reads agree with the model after every step.
                for i in 0..3u8 {
                    let now = clock.now_ms();
                    let got = s.lookup(&key(i, 0)).await.unwrap();
                    match (model[i as usize], &got) {
                        (M::Done { body, expires }, Some(Record::Completed(c)))
                            if expires > now =>
                        {
                            assert_eq!(c.body.as_ref(), [body]);
                        }
                        (M::Done { expires, .. }, None) if expires <= now => {}
                        (M::InFlight { token, .. }, Some(Record::InFlight(f))) => {
                            assert_eq!(f.token, token)
                        }
                        (M::Absent, None) => {}
                        (m, g) => panic!("{}: model {m:?} store {g:?} after {op:?}", s.backend()),
                    }
                }
            }
        }
    });
}

// === Redis only: the server's clock, real (short) leases and TTLs, several replicas ===

/// A store as a proxy opens it (server clock), under `prefix`: two with one prefix are two replicas.
fn replica(server: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::open(&RedisOptions::new(&server.url(), prefix)).unwrap()
}

/// Claims `k` on `s` until it is ours (bounded by `limit`); the token.
async fn claimed_within(s: &RedisStore, k: &StoreKey, lease: Duration, limit: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let ClaimOutcome::Claimed { token } =
            s.claim(k, Fingerprint([4; 32]), lease).await.unwrap()
        {
            return token;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not claimable within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `PTTL name` through a raw connection.
fn pttl(server: &RedisServer, name: &str) -> i64 {
    let reply = server.command(&format!("PTTL {name}"));
    reply
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap_or_else(|_| panic!("PTTL reply {reply:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_live_owner_renews_and_a_dead_owner_is_taken_over_by_another_replica() {
    let server = shared_redis();
    let prefix = unique_prefix();
    let (a, b) = (replica(&server, &prefix), replica(&server, &prefix));
    let lease = Duration::from_millis(500);
    let k = key(30, 0);
    let fp = Fingerprint([4; 32]);
    let t1 = token(a.claim(&k, fp, lease).await.unwrap());
    // For three leases the other replica sees the claim held: the live owner renews its deadline.
    let hold = tokio::time::Instant::now() + lease * 3;
    while tokio::time::Instant::now() < hold {
        match b.claim(&k, fp, lease).await.unwrap() {
            ClaimOutcome::InFlight {
                fingerprint,
                retry_after,
            } => {
                assert_eq!(fingerprint, fp);
                assert_eq!(retry_after, Duration::from_secs(1));
            }
            o => panic!("a live owner's claim was lost: {o:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The owner dies: renewals stop, and after its deadline the other replica takes the key over.
    a.abandon(t1);
    let t2 = claimed_within(&b, &k, lease, Duration::from_secs(5)).await;
    assert!(t2 > t1, "takeover token {t2} after {t1}");
    // The late first owner can neither record nor release; the taker records.
    assert_eq!(
        a.complete(&k, t1, result("late"), TTL).await.unwrap(),
        Committed::Stale
    );
    assert_eq!(a.release(&k, t1).await.unwrap(), Committed::Stale);
    assert_eq!(
        b.complete(&k, t2, result("taker"), TTL).await.unwrap(),
        Committed::Done
    );
    assert!(
        matches!(a.claim(&k, fp, lease).await.unwrap(), ClaimOutcome::Completed(c) if c.body == "taker")
    );
    match a.lookup(&k).await.unwrap() {
        Some(Record::Completed(c)) => assert_eq!((c.status, &c.body[..]), (201, &b"taker"[..])),
        o => panic!("{o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_claimers_on_two_replicas_exactly_one_wins() {
    let server = shared_redis();
    let prefix = unique_prefix();
    let replicas = [replica(&server, &prefix), replica(&server, &prefix)];
    let k = key(31, 0);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = replicas[i % 2].clone();
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
    assert_eq!(winners, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_watch_fires_when_another_replica_completes_releases_or_purges() {
    let server = shared_redis();
    let prefix = unique_prefix();
    let (a, b) = (replica(&server, &prefix), replica(&server, &prefix));
    assert!(
        b.wait_subscribed(Duration::from_secs(10)).await,
        "pub/sub never subscribed"
    );
    let fp = Fingerprint([1; 32]);
    for (n, how) in [(32, "complete"), (33, "release"), (34, "purge")] {
        let k = key(n, 0);
        let t = token(a.claim(&k, fp, LEASE).await.unwrap());
        let mut w = b.watch(&k);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), w.changed())
                .await
                .is_err(),
            "{how}: the watch fired before anything changed"
        );
        match how {
            "complete" => assert_eq!(
                a.complete(&k, t, result("a"), TTL).await.unwrap(),
                Committed::Done
            ),
            "release" => assert_eq!(a.release(&k, t).await.unwrap(), Committed::Done),
            _ => assert_eq!(a.purge(&k.id).await.unwrap(), 1),
        }
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .unwrap_or_else(|_| panic!("{how} on one replica did not wake a waiter on the other"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_records_carry_a_native_expiry_and_ttls_use_the_server_clock() {
    let server = shared_redis();
    let s = replica(&server, &unique_prefix());
    let k = key(35, 0);
    let fp = Fingerprint([1; 32]);
    let lease = Duration::from_millis(500);
    let t = token(s.claim(&k, fp, lease).await.unwrap());
    let (record, index) = s.key_names(&k);
    let margin = super::redis::DEFAULT_EXPIRY_MARGIN.as_millis() as i64;
    let p = pttl(&server, &record);
    assert!((1..=500 + margin).contains(&p), "in-flight PTTL {p}");
    assert!(pttl(&server, &index) > 0, "the index has no expiry");
    let ttl = Duration::from_millis(300);
    s.complete(&k, t, result("a"), ttl).await.unwrap();
    let p = pttl(&server, &record);
    assert!((1..=300).contains(&p), "completed PTTL {p}");
    assert!(s.lookup(&k).await.unwrap().is_some());
    // After the TTL, on the server's clock, the record is gone from reads and from Redis itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.command(&format!("EXISTS {record}")).trim() != ":0" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "record still in Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.lookup(&k).await.unwrap(), None);
    assert!(s.list(&k.id).await.unwrap().is_empty());
    token(s.claim(&k, fp, lease).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_then_recovers_and_wakes_waiters() {
    // A server of its own: this test kills it.
    let mut server = RedisServer::start();
    let s = replica(&server, "outage:");
    assert!(s.wait_subscribed(Duration::from_secs(10)).await);
    s.ping().await.unwrap();
    let k = key(36, 0);
    let fp = Fingerprint([1; 32]);
    let mut w = s.watch(&k);

    server.stop();
    for _ in 0..3 {
        let started = tokio::time::Instant::now();
        match s.claim(&k, fp, LEASE).await {
            Err(StoreError::Backend {
                backend: "redis", ..
            }) => {}
            o => panic!("claim with Redis down: {o:?}"),
        }
        assert!(s.ping().await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    server.restart();
    // Recovery without reopening the store; the resubscription wakes the waiter (changes made while
    // nobody listened were not heard).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.ping().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store did not recover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), w.changed())
        .await
        .expect("waiter woken after the pub/sub connection came back");
    let t = token(s.claim(&k, fp, LEASE).await.unwrap());
    assert_eq!(
        s.complete(&k, t, result("after"), TTL).await.unwrap(),
        Committed::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_every_script_stays_in_one_cluster_slot() {
    // A one-node Redis Cluster that owns every slot: Redis 7 refuses a strict (`#!lua`) script that
    // touches keys of two slots, so each operation below proves its script is single-slot.
    let server = RedisServer::start_with(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ]);
    let added = server.command("CLUSTER ADDSLOTSRANGE 0 16383");
    assert!(added.starts_with("+OK"), "{added}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !server.command("CLUSTER INFO").contains("cluster_state:ok") {
        assert!(tokio::time::Instant::now() < deadline, "cluster not ok");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The check is on: a strict script touching `a` and `b` (two slots) fails.
    let cross = server.command_args(&[
        "EVAL",
        "#!lua\nredis.call('SET','a',1) redis.call('SET','b',1)",
        "0",
    ]);
    assert!(cross.contains("same slot"), "{cross}");

    let strict = || RedisStore::open_strict(&RedisOptions::new(&server.url(), "cluster:")).unwrap();
    let (a, b) = (strict(), strict());
    let fp = Fingerprint([1; 32]);
    let (k1, k2) = (key(40, 1), key(40, 2));
    // claim + renew: a 60 ms lease is renewed every 20 ms; the claim still holds after 300 ms.
    let lease = Duration::from_millis(60);
    let t1 = token(a.claim(&k1, fp, lease).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        b.claim(&k1, fp, lease).await.unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    let t2 = token(a.claim(&k2, fp, LEASE).await.unwrap());
    // takeover after an abandoned claim (tokens script, `low` path possible)
    a.abandon(t1);
    let t3 = claimed_within(&b, &k1, LEASE, Duration::from_secs(5)).await;
    assert!(t3 > t1);
    assert_eq!(
        b.complete(&k1, t3, result("one"), TTL).await.unwrap(),
        Committed::Done
    );
    assert_eq!(a.release(&k2, t2).await.unwrap(), Committed::Done);
    assert!(a.lookup(&k1).await.unwrap().is_some());
    let t4 = token(a.claim(&k2, fp, LEASE).await.unwrap());
    assert_eq!(
        a.complete(&k2, t4, result("two"), TTL).await.unwrap(),
        Committed::Done
    );
    assert_eq!(b.list(&k1.id).await.unwrap().len(), 2);
    assert_eq!(b.purge(&k1.id).await.unwrap(), 2);
    assert!(a.list(&k1.id).await.unwrap().is_empty());
}
