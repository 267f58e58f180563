//! Redis only: the server's clock, real (short) leases and TTLs, several replicas on one server.

use super::*;
use crate::store::{StoreAdmin, StoreUpkeep};

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

pub async fn redis_live_owner_renews_and_a_dead_owner_is_taken_over_by_another_replica() {
    if skip_redis() {
        return;
    }
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

pub async fn redis_concurrent_claimers_on_two_replicas_exactly_one_wins() {
    if skip_redis() {
        return;
    }
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

pub async fn redis_watch_fires_when_another_replica_completes_releases_or_purges() {
    if skip_redis() {
        return;
    }
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

pub async fn redis_records_carry_a_native_expiry_and_ttls_use_the_server_clock() {
    if skip_redis() {
        return;
    }
    let server = shared_redis();
    let s = replica(&server, &unique_prefix());
    let k = key(35, 0);
    let fp = Fingerprint([1; 32]);
    let lease = Duration::from_millis(500);
    let t = token(s.claim(&k, fp, lease).await.unwrap());
    let (record, index) = s.key_names(&k);
    let margin = crate::store::redis::DEFAULT_EXPIRY_MARGIN.as_millis() as i64;
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

pub async fn redis_outage_fails_fast_then_recovers_and_wakes_waiters() {
    if skip_redis() {
        return;
    }
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

pub async fn redis_every_script_stays_in_one_cluster_slot() {
    if skip_redis() {
        return;
    }
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

fn signal(server: &RedisServer, sig: &str) {
    let pid = server.pid().expect("redis-server runs").to_string();
    assert!(std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill runs")
        .success());
}

/// A claim call dropped while Redis holds its request (the client went away) was never acted on: it
/// is released by its token, so the retry takes the key as soon as Redis answers again, not after
/// the lease.
pub async fn redis_a_claim_dropped_while_redis_holds_it_is_released() {
    if skip_redis() {
        return;
    }
    // A server of its own: this test freezes it.
    let server = RedisServer::start();
    let s = replica(&server, "dropped:");
    assert!(s.wait_subscribed(Duration::from_secs(10)).await);
    let fp = Fingerprint([1; 32]);
    // A first claim draws the block of fencing tokens, so the next one sends its script at once.
    token(s.claim(&key(38, 0), fp, LEASE).await.unwrap());
    let k = key(37, 0);
    let w = s.watch(&k);
    signal(&server, "-STOP");
    let dropped = tokio::time::timeout(Duration::from_millis(300), s.claim(&k, fp, LEASE)).await;
    signal(&server, "-CONT");
    assert!(
        dropped.is_err(),
        "a claim returned with Redis frozen: {dropped:?}"
    );
    // Redis now runs the claim, then its release (one connection, in order).
    claimed_once_freed(&s, &k, w).await;
}
