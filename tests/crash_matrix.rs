//! Crash matrix: the real binary under concurrent load is SIGKILLed at random moments and restarted on the
//! same sled data dir, round after round. The load mixes unique keys (with immediate retries and
//! fingerprint-mismatch probes), same-key storms on a `reject` route and on a `wait` route, and unprotected
//! noise (POSTs without a key, GETs).
//!
//! After each kill, with the upstream idle (every request the dead proxy sent has been counted):
//! - every key's upstream count is at most 1 (at most once, acknowledged or not);
//! - every request whose full response reached its client (a result: forwarded or replayed) is re-sent and
//!   must be replayed (`Idempotent-Replayed: true`, the same status and body), and its key's upstream count
//!   must stay exactly 1;
//! - every key that got no result (its requests died with the proxy, or got 409) is re-sent until it is no
//!   longer held by a claim (lease 1 s): it is replayed (the result was recorded before the crash), or
//!   forwarded — for the first time, or again if the dead proxy had forwarded it (allowed: nobody was told
//!   it happened; counted separately).
//!
//! Short form (plain `cargo test`): 5 rounds. Longer: `IDEMPROXY_CRASH_ROUNDS=200`. Reproduce a run with
//! `IDEMPROXY_TEST_SEED=<printed seed>`. `IDEMPROXY_CRASH_SYNC=periodic` runs the same matrix against the
//! weaker durability mode, to show that the matrix does catch lost results (it fails there).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::keyed::KeyedUpstream;
use common::rng::Rng;
use common::{eventually, try_send, within, Proxy, Resp};
use tokio::sync::watch;
use tokio::task::JoinSet;

const TEXT: (&str, &str) = ("Content-Type", "text/plain");
/// Lease of every route: long enough for the slowest upstream call here (40 ms), short enough that a
/// claim left by a crash frees quickly for the re-send phase.
const LEASE: Duration = Duration::from_secs(1);

fn rounds() -> usize {
    std::env::var("IDEMPROXY_CRASH_ROUNDS")
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("IDEMPROXY_CRASH_ROUNDS={v:?}"))
        })
        .unwrap_or(5)
}

/// One request of the load: always a POST with a key and a text body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Req {
    key: String,
    /// Path and query as sent.
    target: String,
    body: String,
}

impl Req {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }

    /// The body the keyed upstream answers on the `n`th execution of this request.
    fn executed_body(&self, n: u64) -> String {
        format!("{n} POST {} {} {}", self.path(), self.key, self.body)
    }

    async fn send(&self, addr: SocketAddr) -> Result<Resp, String> {
        try_send(
            addr,
            "POST",
            &self.target,
            &[("Idempotency-Key", self.key.as_str()), TEXT],
            &self.body,
        )
        .await
    }
}

/// Everything that happened to one key during a round.
#[derive(Debug)]
struct KeyLog {
    req: Req,
    /// Requests sent with this exact request (retries and storm members included).
    sent: u64,
    /// Result responses (forwarded or replayed): (status, body, replayed).
    results: Vec<(u16, bytes::Bytes, bool)>,
    /// 409 in-flight answers.
    refused: u64,
    /// Requests that got no (full) response.
    lost: u64,
}

#[derive(Debug, Default)]
struct Journal {
    keys: Mutex<HashMap<String, KeyLog>>,
    anomalies: Mutex<Vec<String>>,
    mismatch_probes: Mutex<(u64, u64)>,
    /// Result responses so far (drives the kill trigger).
    results: watch::Sender<u64>,
    /// Unprotected requests answered.
    noise: Mutex<u64>,
}

impl Journal {
    fn anomaly(&self, what: String) {
        eprintln!("[crash-matrix] ANOMALY: {what}");
        self.anomalies.lock().unwrap().push(what);
    }

    /// Sends `req` and records the outcome; `false` when no response came (the proxy is gone).
    async fn send(&self, addr: SocketAddr, req: &Req) -> bool {
        let outcome = req.send(addr).await;
        if matches!(&outcome, Err(e) if e.starts_with("connect:")) {
            // Never reached the proxy (it is dead): not a request of this round.
            return false;
        }
        let mut keys = self.keys.lock().unwrap();
        let log = keys.entry(req.key.clone()).or_insert_with(|| KeyLog {
            req: req.clone(),
            sent: 0,
            results: Vec::new(),
            refused: 0,
            lost: 0,
        });
        assert_eq!(&log.req, req, "one request per key in this matrix");
        log.sent += 1;
        match outcome {
            Err(_) => {
                log.lost += 1;
                false
            }
            Ok(r) if r.status == 409 => {
                log.refused += 1;
                true
            }
            Ok(r) if r.status == 201 => {
                let replayed = r.replayed();
                let want = req.executed_body(1);
                if r.body != want.as_bytes() {
                    drop(keys);
                    self.anomaly(format!(
                        "{}: result body {:?}, expected the first execution's {want:?}",
                        req.key,
                        r.text()
                    ));
                    return true;
                }
                log.results.push((r.status, r.body, replayed));
                let forwarded = log.results.iter().filter(|(_, _, rep)| !rep).count();
                drop(keys);
                if forwarded > 1 {
                    self.anomaly(format!(
                        "{}: {forwarded} non-replayed results for one key",
                        req.key
                    ));
                }
                self.results.send_modify(|n| *n += 1);
                true
            }
            Ok(r) => {
                drop(keys);
                self.anomaly(format!(
                    "{}: unexpected answer {} {:?}",
                    req.key,
                    r.status,
                    r.text()
                ));
                true
            }
        }
    }

    /// Same key, different body: must be 422 (and never forwarded); `false` when no response came.
    async fn probe_mismatch(&self, addr: SocketAddr, req: &Req) -> bool {
        let probe = Req {
            body: format!("{}-changed", req.body),
            ..req.clone()
        };
        match probe.send(addr).await {
            Err(_) => false,
            Ok(r) if r.status == 422 => {
                self.mismatch_probes.lock().unwrap().0 += 1;
                true
            }
            Ok(r) => {
                self.mismatch_probes.lock().unwrap().1 += 1;
                self.anomaly(format!(
                    "{}: mismatch probe got {} {:?}, expected 422",
                    req.key,
                    r.status,
                    r.text()
                ));
                true
            }
        }
    }
}

/// Sequential unique keys; after an answer, sometimes an immediate retry (must replay) and sometimes a
/// mismatch probe (must be 422).
async fn unique_worker(addr: SocketAddr, j: Arc<Journal>, round: usize, w: u64, mut rng: Rng) {
    for i in 0.. {
        let req = Req {
            key: format!("r{round}-u{w}-{i}"),
            target: format!("/u/{w}"),
            body: format!("pay-{}", rng.next_u64() % 1_000_000),
        };
        if !j.send(addr, &req).await {
            return;
        }
        if rng.chance(15) && !j.send(addr, &req).await {
            return;
        }
        if rng.chance(15) && !j.probe_mismatch(addr, &req).await {
            return;
        }
    }
}

/// Storms: several concurrent requests with one key on `/{mode}/s` (`r`: reject route, `w`: wait route)
/// against a slow upstream answer, so that most of them meet the claim in flight.
async fn storm_driver(addr: SocketAddr, j: Arc<Journal>, round: usize, mode: &str, mut rng: Rng) {
    for i in 0.. {
        let req = Req {
            key: format!("r{round}-{mode}{i}"),
            target: format!("/{mode}/s?ms={}", rng.range(5, 40)),
            body: format!("storm-{}", rng.next_u64() % 1_000_000),
        };
        let n = rng.range(3, 9);
        let mut set = JoinSet::new();
        for _ in 0..n {
            let (j, req) = (j.clone(), req.clone());
            set.spawn(async move { j.send(addr, &req).await });
        }
        let mut any = false;
        while let Some(r) = set.join_next().await {
            any |= r.unwrap();
        }
        if !any {
            return;
        }
    }
}

/// Unprotected traffic: POSTs without a key and GETs, forwarded every time.
async fn noise_worker(addr: SocketAddr, j: Arc<Journal>, round: usize) {
    for i in 0u64.. {
        let (method, headers): (&str, Vec<(&str, String)>) = if i % 2 == 0 {
            ("POST", vec![])
        } else {
            (
                "GET",
                vec![("Idempotency-Key", format!("noise-{round}-{i}"))],
            )
        };
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        match try_send(addr, method, "/n", &headers, "noise").await {
            Ok(r) if r.status == 201 => *j.noise.lock().unwrap() += 1,
            Ok(r) => j.anomaly(format!(
                "noise {method}: unexpected {} {:?}",
                r.status,
                r.text()
            )),
            Err(_) => return,
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    rounds: usize,
    sent: u64,
    acked_requests: u64,
    acked_keys: u64,
    resent: u64,
    duplicates: u64,
    refused_409: u64,
    mismatch_422: u64,
    lost_requests: u64,
    unacked_keys: u64,
    unacked_replayed: u64,
    unacked_forwarded_first: u64,
    unacked_forwarded_again: u64,
    unacked_held_by_lease: u64,
    noise: u64,
    kill_delays_ms: Vec<u64>,
}

/// Re-sends `req` until no claim holds it (bounded), returning the answer and whether a 409 came first.
async fn resend_until_free(addr: SocketAddr, req: Req) -> (Resp, bool) {
    let held = Arc::new(Mutex::new(false));
    let h = held.clone();
    let r = eventually(
        LEASE * 10,
        &format!("{} to be free of its claim", req.key),
        move || {
            let (req, h) = (req.clone(), h.clone());
            async move {
                match req.send(addr).await {
                    Ok(r) if r.status == 409 => {
                        *h.lock().unwrap() = true;
                        None
                    }
                    Ok(r) => Some(r),
                    Err(e) => panic!("re-send of {} failed: {e}", req.key),
                }
            }
        },
    )
    .await;
    let held = *held.lock().unwrap();
    (r, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_never_forwards_an_acknowledged_request_twice() {
    let started = Instant::now();
    let rounds = rounds();
    let sync = std::env::var("IDEMPROXY_CRASH_SYNC").unwrap_or_else(|_| "always".into());
    let mut rng = Rng::from_env("crash-matrix");
    let up = KeyedUpstream::start();
    let mut p = Proxy::builder(up.url())
        .store(&format!("sync = \"{sync}\""))
        .defaults(&format!(
            "lease = \"{}ms\"\non_in_flight = \"reject\"",
            LEASE.as_millis()
        ))
        .extra(&format!(
            "[[routes]]\nname = \"wait\"\npath = \"/w/**\"\non_in_flight = \"wait\"\nwait_timeout = \"10s\"\nlease = \"{}ms\"",
            LEASE.as_millis()
        ))
        .start()
        .await;
    let mut t = Totals::default();
    let mut anomalies = Vec::new();

    for round in 0..rounds {
        let addr = p.addr;
        let j = Arc::new(Journal::default());
        let mut tasks = JoinSet::new();
        for w in 0..3 {
            tasks.spawn(unique_worker(addr, j.clone(), round, w, rng.fork()));
        }
        tasks.spawn(storm_driver(addr, j.clone(), round, "r", rng.fork()));
        tasks.spawn(storm_driver(addr, j.clone(), round, "w", rng.fork()));
        tasks.spawn(noise_worker(addr, j.clone(), round));

        // The kill: after a random number of results, plus a random delay (a moment, not an event).
        let after = rng.range(1, 120);
        let delay = rng.range(0, 40);
        let mut results = j.results.subscribe();
        within(
            Duration::from_secs(60),
            "results before the kill",
            results.wait_for(|n| *n >= after),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        p.sigkill().await;
        t.kill_delays_ms.push(delay);
        within(Duration::from_secs(30), "the load to stop", async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        })
        .await;
        // Every request the dead proxy wrote has been read and counted once its connections are gone.
        up.wait_idle(Duration::from_secs(15)).await;
        let before = up.snapshot();
        p.restart().await;
        let addr = p.addr;

        let keys: Vec<KeyLog> = std::mem::take(&mut *j.keys.lock().unwrap())
            .into_values()
            .collect();
        let (probes_ok, _) = *j.mismatch_probes.lock().unwrap();
        t.mismatch_422 += probes_ok;
        t.noise += *j.noise.lock().unwrap();
        let mut round_acked = 0;
        let mut resends = JoinSet::new();
        let mut unacked = JoinSet::new();
        for k in &keys {
            let hits = before.get(&k.req.key).copied().unwrap_or(0);
            t.sent += k.sent;
            t.refused_409 += k.refused;
            t.lost_requests += k.lost;
            if hits > 1 {
                t.duplicates += 1;
                anomalies.push(format!(
                    "round {round}: {} forwarded {hits} times before the restart ({k:?})",
                    k.req.key
                ));
            }
            if let Some((status, body, _)) = k.results.first() {
                round_acked += 1;
                t.acked_keys += 1;
                t.acked_requests += k.results.len() as u64;
                if hits != 1 {
                    anomalies.push(format!(
                        "round {round}: acknowledged {} has {hits} upstream hits",
                        k.req.key
                    ));
                }
                // Every acknowledged request is re-sent.
                for _ in 0..k.results.len() {
                    let (req, status, body) = (k.req.clone(), *status, body.clone());
                    resends.spawn(async move {
                        let r = req.send(addr).await;
                        (req, status, body, r)
                    });
                }
            } else if k.sent > 0 {
                t.unacked_keys += 1;
                let req = k.req.clone();
                unacked.spawn(async move {
                    let (r, held) = resend_until_free(addr, req.clone()).await;
                    (req, hits, r, held)
                });
            }
        }
        while let Some(res) = resends.join_next().await {
            let (req, status, body, r) = res.unwrap();
            t.resent += 1;
            match r {
                Ok(r) if r.status == status && r.body == body && r.replayed() => {}
                other => anomalies.push(format!(
                    "round {round}: acknowledged {} ({status} {body:?}) was not replayed after the restart: {other:?}",
                    req.key
                )),
            }
        }
        while let Some(res) = unacked.join_next().await {
            let (req, hits, r, held) = res.unwrap();
            t.unacked_held_by_lease += u64::from(held);
            if r.status != 201 {
                anomalies.push(format!(
                    "round {round}: re-sent unacknowledged {} got {} {:?}",
                    req.key,
                    r.status,
                    r.text()
                ));
            } else if r.replayed() {
                t.unacked_replayed += 1;
                if hits != 1 || r.body != req.executed_body(1).as_bytes() {
                    anomalies.push(format!(
                        "round {round}: {} replayed {:?} with {hits} upstream hits",
                        req.key,
                        r.text()
                    ));
                }
            } else {
                if hits == 0 {
                    t.unacked_forwarded_first += 1;
                } else {
                    t.unacked_forwarded_again += 1;
                }
                if r.body != req.executed_body(hits + 1).as_bytes() {
                    anomalies.push(format!(
                        "round {round}: {} forwarded after the restart answered {:?} ({hits} hits before)",
                        req.key,
                        r.text()
                    ));
                }
            }
        }
        // Acknowledged keys are still at exactly one execution after the re-send phase.
        let after_resend = up.snapshot();
        for k in keys.iter().filter(|k| !k.results.is_empty()) {
            let n = after_resend.get(&k.req.key).copied().unwrap_or(0);
            if n != 1 {
                t.duplicates += u64::from(n > 1);
                anomalies.push(format!(
                    "round {round}: acknowledged {} has {n} upstream hits after the re-send",
                    k.req.key
                ));
            }
        }
        anomalies.extend(
            j.anomalies
                .lock()
                .unwrap()
                .iter()
                .map(|a| format!("round {round}: {a}")),
        );
        eprintln!(
            "[crash-matrix] round {round}: killed {delay} ms after result #{after}; {} keys, {round_acked} acknowledged",
            keys.len()
        );
        t.rounds += 1;
    }

    let status = p.sigterm().await;
    eprintln!(
        "[crash-matrix] totals after {:?} (sync = {sync}):\n\
         \x20 rounds                                   {}\n\
         \x20 requests sent                            {}\n\
         \x20 acknowledged requests (results)          {} over {} keys\n\
         \x20 re-sent after restart                    {} (all must replay)\n\
         \x20 duplicates forwarded                     {} (must be 0)\n\
         \x20 409 in-flight answers                    {}\n\
         \x20 422 mismatch probes (never forwarded)    {}\n\
         \x20 requests with no response               {} over {} keys\n\
         \x20   of those keys: replayed (recorded)     {}\n\
         \x20   forwarded for the first time           {}\n\
         \x20   forwarded again (never acknowledged)   {}\n\
         \x20   held by a surviving claim until lease  {}\n\
         \x20 unprotected noise requests               {}",
        started.elapsed(),
        t.rounds,
        t.sent,
        t.acked_requests,
        t.acked_keys,
        t.resent,
        t.duplicates,
        t.refused_409,
        t.mismatch_422,
        t.lost_requests,
        t.unacked_keys,
        t.unacked_replayed,
        t.unacked_forwarded_first,
        t.unacked_forwarded_again,
        t.unacked_held_by_lease,
        t.noise,
    );
    assert!(
        anomalies.is_empty(),
        "{} anomalies (seed printed above; the first 30):\n{}",
        anomalies.len(),
        anomalies[..anomalies.len().min(30)].join("\n")
    );
    assert_eq!(t.duplicates, 0);
    assert!(t.acked_keys > 0, "no request was acknowledged at all");
    assert_eq!(
        status.code(),
        Some(0),
        "clean shutdown after {rounds} crashes"
    );
}
