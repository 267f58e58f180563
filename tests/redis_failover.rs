//! Exactly-once across a Redis failover, Jepsen-style, with real parts: two `idemproxy run` processes
//! share a Redis primary with two replicas, reached through a switchable TCP forwarder (the "virtual
//! IP" a failover moves). Keyed requests stream through both proxies; at a random point the primary is
//! killed with SIGKILL, the most up-to-date replica is promoted (`REPLICAOF NO ONE`, as Sentinel
//! picks it: the largest replication offset), the other follows it, and the forwarder moves. Every key
//! is then retried on the other proxy until it gets a final answer, and the upstream counts the keys
//! it ran twice. Each replica reaches its primary over a link that delays every byte by
//! [`LINK_DELAY`] each way, as a network between hosts would: on loopback a replica is microseconds
//! behind, and no crash would ever land in the window.
//!
//! - `redis_min_replicas = 0` (Redis replication is asynchronous): a claim or result the primary
//!   acknowledged may die with it, and its retry runs again. The test prints the rate.
//! - `redis_min_replicas = 1`: every claim and result waits for `WAIT 1` before the proxy acts on it;
//!   the test asserts that no key ran twice over all rounds.
//!
//! Rounds: `IDEMPROXY_FAILOVER_ROUNDS` (default 20); the random points come from a printed seed
//! (`IDEMPROXY_TEST_SEED` replays a run).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::keyed::KeyedUpstream;
use common::redis::RedisServer;
use common::rng::Rng;
use common::{eventually, try_send, Proxy, Resp};
use idemproxy::key::{Fingerprint, StoreKey};
use idemproxy::store::redis::{RedisOptions, RedisStore};
use idemproxy::store::{ClaimOutcome, Committed, NewResult, Store, StoreAdmin};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// A TCP forwarder whose target can move: what clients see as "the Redis address".
struct Vip {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Vip {
    async fn start(target: SocketAddr) -> Vip {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let conns = Arc::new(Mutex::new(Vec::<AbortHandle>::new()));
        let (t, c) = (Arc::clone(&target), Arc::clone(&conns));
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = *t.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Vip {
            addr,
            target,
            conns,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// New connections go to `to`; the open ones are cut (their clients reconnect).
    fn switch(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = to;
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Vip {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// The one-way delay of the link between a replica and its primary.
const LINK_DELAY: Duration = Duration::from_millis(5);

/// A TCP forwarder that delivers every chunk [`LINK_DELAY`] after it arrived, in order, both ways.
struct Link {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Link {
    async fn start(to: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(delayed(cr, sw), delayed(sr, cw));
                });
            }
        });
        Link { addr, accept }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, each chunk held until [`LINK_DELAY`] after it was read.
async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at + LINK_DELAY).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                    .is_err()
            {
                return;
            }
        }
    };
    tokio::join!(writer, reader);
}

/// A field of `INFO replication`.
fn info(r: &RedisServer, field: &str) -> Option<String> {
    r.command("INFO replication").lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_owned())
    })
}

/// A node that serves a replica at once (Redis waits 5 s for more replicas before a full sync by
/// default).
fn node() -> RedisServer {
    RedisServer::start_with(&["--repl-diskless-sync-delay", "0"])
}

/// Starts a replica of `primary` and waits until its link is up.
async fn replica_of(primary: &RedisServer) -> RedisServer {
    replica_at(primary, primary.addr()).await
}

/// Starts a replica of `primary` reached at `via`, and waits until its link is up.
async fn replica_at(primary: &RedisServer, via: SocketAddr) -> RedisServer {
    let _ = primary;
    let port = via.port().to_string();
    let r = RedisServer::start_with(&[
        "--repl-diskless-sync-delay",
        "0",
        "--replicaof",
        "127.0.0.1",
        &port,
    ]);
    eventually(Duration::from_secs(10), "the replica to sync", || async {
        (info(&r, "master_link_status").as_deref() == Some("up")).then_some(())
    })
    .await;
    r
}

fn options(url: &str, min_replicas: u32) -> RedisOptions {
    let mut o = RedisOptions::new(url, "failover:");
    o.op_timeout = Duration::from_secs(1);
    o.min_replicas = min_replicas;
    o
}

fn key(n: u8) -> StoreKey {
    StoreKey {
        id: [n; 32],
        scope: [0; 32],
    }
}

fn result() -> NewResult {
    NewResult {
        status: 201,
        headers: Vec::new(),
        body: bytes::Bytes::from_static(b"done"),
        body_omitted: false,
        seen_only: false,
    }
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

/// `redis_min_replicas = 1`: claims and results are on the replica when the proxy acts on them; with
/// the replica frozen, a claim is a store error within the timeout and its key is free again.
#[tokio::test]
async fn writes_wait_for_a_replica_and_fail_without_one() {
    let primary = node();
    let replica = replica_of(&primary).await;
    // The primary counts the replica for WAIT once it has it online.
    eventually(
        Duration::from_secs(10),
        "the primary to have its replica online",
        || async {
            info(&primary, "slave0")
                .is_some_and(|v| v.contains("state=online"))
                .then_some(())
        },
    )
    .await;
    // Room for a replica slowed by tests running beside this one (WAIT gets 3/4 of it).
    let mut opts = options(&primary.url(), 1);
    opts.op_timeout = Duration::from_secs(2);
    let store = RedisStore::open(&opts).unwrap();
    let on_replica = RedisStore::open(&options(&replica.url(), 0)).unwrap();

    let ClaimOutcome::Claimed { token } = store
        .claim(&key(1), Fingerprint([1; 32]), LEASE)
        .await
        .unwrap()
    else {
        panic!("not claimed");
    };
    // Acknowledged means on the replica, right when the call returns.
    assert!(matches!(
        on_replica.lookup(&key(1)).await.unwrap(),
        Some(idemproxy::store::Record::InFlight(_))
    ));
    assert_eq!(
        store.complete(&key(1), token, result(), TTL).await.unwrap(),
        Committed::Done
    );
    assert!(matches!(
        on_replica.lookup(&key(1)).await.unwrap(),
        Some(idemproxy::store::Record::Completed(_))
    ));

    // The replica frozen: a new claim cannot be acknowledged, so it is refused, and freed again.
    let pid = replica.pid().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let started = std::time::Instant::now();
    let refused = store.claim(&key(2), Fingerprint([2; 32]), LEASE).await;
    let took = started.elapsed();
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let e = refused.expect_err("a claim no replica acknowledged must fail");
    assert!(e.to_string().contains("replicas required"), "{e}");
    assert!(took < Duration::from_secs(4), "refused after {took:?}");
    match store
        .claim(&key(2), Fingerprint([2; 32]), LEASE)
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed { .. } => {}
        other => panic!("the refused claim still holds its key: {other:?}"),
    }

    // No replica at all: nothing is acknowledged.
    let alone = RedisServer::start();
    let store = RedisStore::open(&options(&alone.url(), 1)).unwrap();
    assert!(store
        .claim(&key(3), Fingerprint([3; 32]), LEASE)
        .await
        .is_err());
    // With 0, the same server takes it.
    let store = RedisStore::open(&options(&alone.url(), 0)).unwrap();
    assert!(matches!(
        store
            .claim(&key(3), Fingerprint([3; 32]), LEASE)
            .await
            .unwrap(),
        ClaimOutcome::Claimed { .. }
    ));
}

/// What one run of rounds saw.
#[derive(Debug, Default)]
struct Tally {
    keys: usize,
    acknowledged: usize,
    duplicates: Vec<String>,
}

async fn post(addr: SocketAddr, key: &str) -> Result<Resp, String> {
    try_send(
        addr,
        "POST",
        "/pay",
        &[("Idempotency-Key", key), ("Content-Type", "text/plain")],
        key,
    )
    .await
}

/// One failover round: a fresh primary with two replicas behind `vip`, load through both proxies, a
/// SIGKILL of the primary at a random point, the promotion, and every key retried to a final answer.
async fn round(
    n: usize,
    proxies: &[SocketAddr; 2],
    up: &KeyedUpstream,
    vip: &Vip,
    rng: &mut Rng,
    tally: &mut Tally,
) {
    let mut primary = node();
    let links = [
        Link::start(primary.addr()).await,
        Link::start(primary.addr()).await,
    ];
    let replicas = [
        replica_at(&primary, links[0].addr).await,
        replica_at(&primary, links[1].addr).await,
    ];
    vip.switch(primary.addr());
    for p in proxies {
        let probe = format!("probe-{n}-{p}");
        eventually(
            Duration::from_secs(15),
            "the proxies to reach the new primary",
            || {
                let probe = probe.clone();
                async move {
                    post(*p, &probe)
                        .await
                        .ok()
                        .filter(|r| r.status == 200 || r.status == 201)
                }
            },
        )
        .await;
    }

    // Load: 8 clients, each sending fresh keys one after the other, alternating proxies.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(BTreeMap::<String, u16>::new()));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (stop, sent, proxies) = (Arc::clone(&stop), Arc::clone(&sent), *proxies);
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) && i < 400 {
                    let k = format!("r{n}-c{c}-{i}");
                    let status = post(proxies[(c + i) % 2], &k).await.map_or(0, |r| r.status);
                    sent.lock().unwrap().insert(k, status);
                    i += 1;
                }
            })
        })
        .collect();

    // The fault, at a random point of the load.
    tokio::time::sleep(Duration::from_millis(rng.range(20, 200))).await;
    primary.stop();
    let offset = |r: &RedisServer| {
        info(r, "master_repl_offset")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let best = usize::from(offset(&replicas[1]) > offset(&replicas[0]));
    let (promoted, other) = (&replicas[best], &replicas[1 - best]);
    assert_eq!(promoted.command("REPLICAOF NO ONE"), "+OK");
    let port = promoted.port().to_string();
    assert_eq!(
        other.command_args(&["REPLICAOF", "127.0.0.1", &port]),
        "+OK"
    );
    vip.switch(promoted.addr());
    tokio::time::sleep(Duration::from_millis(rng.range(20, 100))).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("a client did not finish within 30 s")
            .unwrap();
    }

    // Every key retried on the other proxy until it gets a final answer (409: still in flight).
    let keys: Vec<(String, u16)> = sent.lock().unwrap().clone().into_iter().collect();
    tally.keys += keys.len();
    tally.acknowledged += keys.iter().filter(|(_, s)| (200..300).contains(s)).count();
    let retries: Vec<_> = keys
        .chunks(keys.len().div_ceil(8).max(1))
        .map(|chunk| {
            let (chunk, proxies) = (chunk.to_vec(), *proxies);
            tokio::spawn(async move {
                for (i, (k, _)) in chunk.iter().enumerate() {
                    let to = proxies[(i + 1) % 2];
                    eventually(
                        Duration::from_secs(20),
                        "a final answer to the retry",
                        || async {
                            post(to, k)
                                .await
                                .ok()
                                .filter(|r| r.status != 409 && r.status != 503)
                        },
                    )
                    .await;
                }
            })
        })
        .collect();
    for r in retries {
        r.await.unwrap();
    }
    let hits: HashMap<String, u64> = up.snapshot();
    tally.duplicates.extend(
        keys.iter()
            .filter(|(k, _)| hits.get(k).copied().unwrap_or(0) > 1)
            .map(|(k, _)| k.clone()),
    );
}

async fn run_rounds(min_replicas: u32) -> Tally {
    let rounds: usize = std::env::var("IDEMPROXY_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut rng = Rng::from_env(&format!("failover, redis_min_replicas = {min_replicas}"));
    let up = KeyedUpstream::start();
    let seed = RedisServer::start();
    let vip = Vip::start(seed.addr()).await;
    let store = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"failover:\"\n\
         redis_min_replicas = {min_replicas}\ntimeout = \"3s\"\n",
        vip.url()
    );
    let a = Proxy::builder(up.url())
        .store(&store)
        .defaults("lease = \"3s\"\n")
        .start()
        .await;
    let b = Proxy::builder(up.url())
        .store(&store)
        .defaults("lease = \"3s\"\n")
        .start()
        .await;
    let mut tally = Tally::default();
    for n in 0..rounds {
        round(n, &[a.addr, b.addr], &up, &vip, &mut rng, &mut tally).await;
    }
    eprintln!(
        "[failover, redis_min_replicas = {min_replicas}] {rounds} rounds: {} keys, {} acknowledged \
         before or during the failover, {} forwarded twice ({:.2}%)",
        tally.keys,
        tally.acknowledged,
        tally.duplicates.len(),
        100.0 * tally.duplicates.len() as f64 / tally.keys.max(1) as f64
    );
    tally
}

/// Asynchronous replication: measured, not asserted (the figure goes in the README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_asynchronous_replication_reports_its_duplicate_rate() {
    let t = run_rounds(0).await;
    assert!(t.keys > 0);
}

/// `redis_min_replicas = 1`: no key runs twice, whatever the point of the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_one_replica_acknowledging_runs_no_key_twice() {
    let t = run_rounds(1).await;
    assert!(t.keys > 0);
    assert!(
        t.duplicates.is_empty(),
        "{} keys ran twice across the failovers: {:?}",
        t.duplicates.len(),
        &t.duplicates[..t.duplicates.len().min(20)]
    );
}
