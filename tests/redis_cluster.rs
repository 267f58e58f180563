//! The Redis backend on a real Redis Cluster: three primaries started locally (`redis-server
//! --cluster-enabled yes`, joined by `redis-cli --cluster create`), two `idemproxy run` processes with
//! `[store] redis_cluster` naming them as seed nodes.
//!
//! - A storm of one key across both proxies reaches the upstream once; the rest are 409 or replays.
//! - Keys spread over every primary (each record's keys share one hash slot, so the scripts stay
//!   atomic), and retries on the other proxy are replayed.
//! - Slots moved between primaries under load (`redis-cli --cluster reshard`, so clients see `MOVED`
//!   and `ASK`): no key runs twice, and every retry after the move is replayed.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::keyed::KeyedUpstream;
use common::{try_send, Proxy, Resp};
use idemproxy::store::testing::redis_cluster::RedisCluster;

async fn proxy(up: &KeyedUpstream, cluster: &RedisCluster) -> Proxy {
    let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("\"{s}\"")).collect();
    Proxy::builder(up.url())
        .store(&format!(
            "backend = \"redis\"\nredis_cluster = [{}]\nkey_prefix = \"cluster:\"\n",
            seeds.join(", ")
        ))
        .start()
        .await
}

async fn post(addr: SocketAddr, key: &str) -> Resp {
    try_send(
        addr,
        "POST",
        "/pay",
        &[("Idempotency-Key", key), ("Content-Type", "text/plain")],
        "amount=100",
    )
    .await
    .unwrap_or_else(|e| panic!("{key}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_one_key_across_two_proxies_reaches_the_upstream_once() {
    let cluster = RedisCluster::start(3);
    let up = KeyedUpstream::start();
    let (a, b) = (proxy(&up, &cluster).await, proxy(&up, &cluster).await);
    let storm: Vec<_> = (0..60)
        .map(|i| {
            let to = if i % 2 == 0 { a.addr } else { b.addr };
            tokio::spawn(async move { post(to, "storm-1").await })
        })
        .collect();
    let mut statuses = Vec::new();
    for s in storm {
        statuses.push(s.await.unwrap().status);
    }
    assert_eq!(up.hits("storm-1"), 1, "statuses: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 200 || *s == 409),
        "{statuses:?}"
    );
    // After it, both proxies replay it.
    assert!(post(a.addr, "storm-1").await.replayed());
    assert!(post(b.addr, "storm-1").await.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_primary_and_replay_on_the_other_proxy() {
    let cluster = RedisCluster::start(3);
    let up = KeyedUpstream::start();
    let (a, b) = (proxy(&up, &cluster).await, proxy(&up, &cluster).await);
    for k in 0..150 {
        let key = format!("spread-{k}");
        let first = post(a.addr, &key).await;
        assert!(first.status < 300 && !first.replayed(), "{key}: {first:?}");
        assert!(post(b.addr, &key).await.replayed(), "{key} not replayed");
        assert_eq!(up.hits(&key), 1);
    }
    for n in &cluster.nodes {
        let size: u64 = n.command("DBSIZE").trim_start_matches(':').parse().unwrap();
        assert!(size > 0, "no record on the primary at {}", n.addr());
    }
}

/// The node id of `node` (`CLUSTER MYID`).
fn node_id(cluster: &RedisCluster, i: usize) -> String {
    cluster.nodes[i].command("CLUSTER MYID")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_slots_under_load_runs_no_key_twice_and_replays_every_retry() {
    let cluster = RedisCluster::start(3);
    let up = KeyedUpstream::start();
    let (a, b) = (proxy(&up, &cluster).await, proxy(&up, &cluster).await);

    // Load: 6 clients, each sending fresh keys, alternating proxies, until the move is over.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::<(String, u16)>::new()));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (stop, sent, to) = (Arc::clone(&stop), Arc::clone(&sent), [a.addr, b.addr]);
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("move-{c}-{i}");
                    let r = post(to[(c + i) % 2], &key).await;
                    sent.lock().unwrap().push((key, r.status));
                    i += 1;
                }
            })
        })
        .collect();

    // Move a third of the first primary's slots to the second, then some to the third.
    let from = cluster.nodes[0].addr().to_string();
    for (src, dst) in [(0, 1), (1, 2)] {
        let out = tokio::task::spawn_blocking({
            let (f, t, seed) = (node_id(&cluster, src), node_id(&cluster, dst), from.clone());
            move || {
                Command::new("redis-cli")
                    .args(["--cluster", "reshard", &seed])
                    .args(["--cluster-from", &f, "--cluster-to", &t])
                    .args(["--cluster-slots", "1500", "--cluster-yes"])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "reshard failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cluster.wait_ok(Duration::from_secs(20));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("a client did not finish")
            .unwrap();
    }

    let sent = sent.lock().unwrap().clone();
    assert!(sent.len() > 50, "too little load: {} requests", sent.len());
    let failed: Vec<_> = sent.iter().filter(|(_, s)| *s >= 300).collect();
    // Every key, retried on the other proxy after the move: replayed, or forwarded for the first time
    // if its first try failed; never a second run.
    for (i, (key, status)) in sent.iter().enumerate() {
        let r = post([b.addr, a.addr][i % 2], key).await;
        if *status < 300 {
            assert!(r.replayed(), "{key}: {r:?}");
        }
        assert!(up.hits(key) <= 1, "{key} ran {} times", up.hits(key));
    }
    eprintln!(
        "[cluster reshard] {} keys under load, {} answered with an error during the move",
        sent.len(),
        failed.len()
    );
}

/// Waiters are woken across the cluster: a record completed through one store (on whichever primary
/// owns its slot) wakes a watch on another store, whose subscription sits on some other node, long
/// before any lease timer would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_on_any_primary_wakes_waiters_on_another_store() {
    use idemproxy::key::{Fingerprint, StoreKey};
    use idemproxy::store::redis::{RedisOptions, RedisStore};
    use idemproxy::store::{ClaimOutcome, Committed, NewResult, Store};

    let cluster = RedisCluster::start(3);
    let open = || {
        let mut o = RedisOptions::new("", "wake:");
        o.cluster = cluster.seeds();
        RedisStore::open(&o).unwrap()
    };
    let (writer, waiter) = (open(), open());
    assert!(waiter.wait_subscribed(Duration::from_secs(10)).await);
    for n in 0..12u8 {
        let key = StoreKey {
            id: [n; 32],
            scope: [0; 32],
        };
        let mut watch = waiter.watch(&key);
        let ClaimOutcome::Claimed { token } = writer
            .claim(&key, Fingerprint([n; 32]), Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("not claimed");
        };
        let result = NewResult {
            status: 201,
            headers: Vec::new(),
            body: bytes::Bytes::from_static(b"ok"),
            body_omitted: false,
            seen_only: false,
        };
        assert_eq!(
            writer
                .complete(&key, token, result, Duration::from_secs(60))
                .await
                .unwrap(),
            Committed::Done
        );
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .unwrap_or_else(|_| panic!("key {n}: the other store was not woken within 5 s"));
    }
}
