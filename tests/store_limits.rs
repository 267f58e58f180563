//! Contract rule 14 and `[store] max_size`, against the real binary on a real file system that runs
//! out of space: a small tmpfs mounted for the test (root only; CI runs as root).
//!
//! - A full disk gets 503 `store-unavailable` within `[store] timeout`, `/readyz` turns 503, replays
//!   and pass-through go on, and the store takes keys again by itself once space is freed. Before the
//!   fix, keyed requests hung until the upstream timeout and the store never came back.
//! - Filling the disk while requests run (sled then fails a write: it is reopened in place) loses
//!   nothing acknowledged: every key whose answer reached its client replays that answer afterwards,
//!   and was forwarded once.
//! - SIGTERM exits within `shutdown_grace` while the disk is full.
//! - `max_size` refuses new keys with 503 `store-full` while replays go on, keeps its count exact
//!   across a restart, and frees room as records expire.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, metrics::scrape, post_key, send, Proxy, Upstream};
use tempfile::TempDir;

/// A tmpfs of `mib` MiB, unmounted on drop.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("idemproxy-tmpfs-")
            .tempdir()
            .unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "these tests mount a tmpfs and need root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 1 << 20];
        loop {
            match f.write(&block) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // Whatever is left below a block, byte by byte.
        while f.write(&[0u8; 4096]).is_ok_and(|n| n > 0) {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn proxy_on(up: &Upstream, data: &Path, extra_store: &str) -> Proxy {
    Proxy::builder(up.url())
        .store("timeout = \"1s\"")
        .store(extra_store)
        .server("shutdown_grace = \"3s\"")
        .arg("--data-dir")
        .arg(&data.display().to_string())
        .start()
        .await
}

fn body_of(i: usize) -> String {
    // Some answers inline, some large enough to be kept in chunks.
    let len = if i % 3 == 0 { 20_000 } else { 300 };
    format!("{i}:{}", "b".repeat(len))
}

/// Rule 14, a full disk: fast 503s, readiness down, replays and pass-through unaffected, and back by
/// itself when space is freed, with every acknowledged result still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gets_503_at_once_and_the_store_comes_back_by_itself() {
    let disk = Tmpfs::mount(32);
    let up = Upstream::start();
    let p = proxy_on(&up, &disk.path().join("data"), "").await;
    let mut acked = HashMap::new();
    for i in 0..20 {
        let key = format!("before-{i}");
        let r = post_key(p.addr, "/echo", &key, &body_of(i)).await;
        r.assert_forwarded(201, body_of(i).as_bytes());
        acked.insert(key, body_of(i));
    }

    let filler = disk.fill();
    let t0 = Instant::now();
    let r = post_key(p.addr, "/echo", "during-1", "x").await;
    let first_503 = t0.elapsed();
    r.assert_problem(503, "store-unavailable");
    assert!(first_503 < Duration::from_millis(1500), "{first_503:?}");
    assert_eq!(up.hits_key("during-1"), 0, "forwarded without a claim");
    assert_eq!(p.admin_get("/readyz").await.status, 503);
    // Replays need no room, and traffic without a key needs no store.
    post_key(p.addr, "/echo", "before-3", &body_of(3))
        .await
        .assert_replay(201, body_of(3).as_bytes());
    assert_eq!(send(p.addr, "GET", "/plain", &[], "").await.status, 200);

    std::fs::remove_file(filler).unwrap();
    let t1 = Instant::now();
    let addr = p.addr;
    eventually(
        Duration::from_secs(10),
        "keyed requests to be taken again",
        || async move {
            let r = post_key(addr, "/echo", "after-1", "y").await;
            (r.status == 201).then_some(())
        },
    )
    .await;
    let recovered = t1.elapsed();
    assert_eq!(p.admin_get("/readyz").await.status, 200);
    eprintln!("full disk: first 503 after {first_503:?}; keys taken again {recovered:?} after space returned");
    for (key, body) in &acked {
        post_key(p.addr, "/echo", key, body)
            .await
            .assert_replay(201, body.as_bytes());
        assert_eq!(up.hits_key(key), 1, "{key}");
    }
}

/// Rule 14 under load: the disk fills while requests run, several times over. Whatever was
/// acknowledged is replayed afterwards and was forwarded exactly once; the store comes back each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_the_disk_under_load_loses_nothing_acknowledged() {
    let disk = Tmpfs::mount(64);
    let up = Upstream::start();
    let p = proxy_on(&up, &disk.path().join("data"), "").await;
    let acked = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let mut refused = 0;
    for round in 0..4 {
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let acked = Arc::clone(&acked);
                let addr = p.addr;
                tokio::spawn(async move {
                    let mut refused = 0;
                    for i in 0..25 {
                        let key = format!("r{round}-w{w}-{i}");
                        let body = body_of(i);
                        let r = post_key(addr, "/echo", &key, &body).await;
                        match r.status {
                            201 => {
                                assert_eq!(r.body, body.as_bytes());
                                acked.lock().unwrap().insert(key, body);
                            }
                            503 => refused += 1,
                            s => panic!("{key}: unexpected {s}: {r:?}"),
                        }
                    }
                    refused
                })
            })
            .collect();
        let filler = disk.fill();
        for w in workers {
            refused += w.await.unwrap();
        }
        std::fs::remove_file(filler).unwrap();
        let addr = p.addr;
        let probe = format!("probe-{round}");
        eventually(
            Duration::from_secs(15),
            "the store to take keys again",
            || {
                let probe = probe.clone();
                async move {
                    let r = post_key(addr, "/echo", &probe, "p").await;
                    (r.status == 201).then_some(())
                }
            },
        )
        .await;
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "disk filled under load 4 times: {} acknowledged, {refused} refused with 503",
        acked.len()
    );
    assert!(refused > 0, "the disk never filled up");
    for (key, body) in &acked {
        post_key(p.addr, "/echo", key, body)
            .await
            .assert_replay(201, body.as_bytes());
        assert_eq!(up.hits_key(key), 1, "{key} forwarded again");
    }
}

/// Rule 14: SIGTERM still exits, within `shutdown_grace`, while the disk is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_while_the_disk_is_full() {
    let disk = Tmpfs::mount(32);
    let up = Upstream::start();
    let mut p = proxy_on(&up, &disk.path().join("data"), "").await;
    post_key(p.addr, "/echo", "k", "v")
        .await
        .assert_forwarded(201, b"v");
    let _filler = disk.fill();
    let r = post_key(p.addr, "/echo", "k2", "v").await;
    r.assert_problem(503, "store-unavailable");
    let t0 = Instant::now();
    let status = p.sigterm().await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(status.code().is_some(), "killed by a signal: {status:?}");
}

/// `max_size`: new keys get 503 `store-full` (with Retry-After) once the live records reach it; replays
/// and pass-through go on; the count is the same after a restart; expired records free room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_size_refuses_new_keys_and_sweeping_frees_room() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let mut p = proxy_on(
        &up,
        &dir.path().join("data"),
        "max_size = \"64KiB\"\nsweep_interval = \"100ms\"",
    )
    .await;
    let mut stored = 0;
    let body = "z".repeat(3000);
    let full = loop {
        let key = format!("fill-{stored}");
        let r = post_key(p.addr, "/echo", &key, &body).await;
        if r.status == 503 {
            break r;
        }
        r.assert_forwarded(201, body.as_bytes());
        stored += 1;
        assert!(stored < 100, "max_size never refused a key");
    };
    full.assert_problem(503, "store-full");
    assert!(full.header("retry-after").is_some());
    // About 20 records of 3 KB fit; near the cap a few more are kept without their body (see
    // `results_past_max_size_are_kept_without_their_body`).
    assert!(
        (15..=40).contains(&stored),
        "{stored} records of 3 KB in 64 KiB"
    );
    // Replays and pass-through go on.
    post_key(p.addr, "/echo", "fill-0", &body)
        .await
        .assert_replay(201, body.as_bytes());
    assert_eq!(send(p.addr, "GET", "/plain", &[], "").await.status, 200);
    let used = scrape(&p, "idemproxy_store_live_bytes").await;
    assert!(used > 0.0 && used <= 64.0 * 1024.0 + 4096.0, "{used}");

    // Exact across a restart: the count is rebuilt from the records.
    p.sigterm().await;
    p.restart().await;
    let after = scrape(&p, "idemproxy_store_live_bytes").await;
    assert_eq!(after, used, "live bytes before and after a restart");
    post_key(p.addr, "/echo", "still-full", "x")
        .await
        .assert_problem(503, "store-full");
}

/// `max_size`: records that expire are swept and their room is taken by new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_free_room_under_max_size() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::builder(up.url())
        .store("max_size = \"64KiB\"\nsweep_interval = \"100ms\"")
        .defaults("ttl = \"1s\"")
        .arg("--data-dir")
        .arg(&dir.path().join("data").display().to_string())
        .start()
        .await;
    let body = "z".repeat(3000);
    let mut i = 0;
    while post_key(p.addr, "/echo", &format!("e-{i}"), &body)
        .await
        .status
        == 201
    {
        i += 1;
        assert!(i < 100);
    }
    let addr = p.addr;
    let body2 = body.clone();
    eventually(
        Duration::from_secs(10),
        "expired records to free room",
        || {
            let body = body2.clone();
            async move {
                let r = post_key(addr, "/echo", "after-expiry", &body).await;
                (r.status == 201).then_some(())
            }
        },
    )
    .await;
    assert!(scrape(&p, "idemproxy_records_expired_total").await >= 1.0);
}

/// Rule 14 with Redis: a frozen Redis (SIGSTOP) gives 503 `store-unavailable` within `[store] timeout`,
/// `/readyz` 503 and pass-through unaffected; once it runs again the proxy takes keys by itself, and
/// what was acknowledged before is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_gets_503_within_the_timeout_and_the_proxy_recovers() {
    let redis = common::redis::RedisServer::start();
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .store("timeout = \"1s\"")
        .arg("--redis-url")
        .arg(&redis.url())
        .start()
        .await;
    post_key(p.addr, "/echo", "before", "b")
        .await
        .assert_forwarded(201, b"b");
    let pid = redis.pid().unwrap().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    let t0 = Instant::now();
    let r = post_key(p.addr, "/echo", "frozen-1", "x").await;
    let waited = t0.elapsed();
    signal("-CONT");
    r.assert_problem(503, "store-unavailable");
    assert!(
        waited < Duration::from_millis(2500),
        "answered after {waited:?}"
    );
    assert_eq!(up.hits_key("frozen-1"), 0);
    signal("-STOP");
    assert_eq!(p.admin_get("/readyz").await.status, 503);
    assert_eq!(send(p.addr, "GET", "/plain", &[], "").await.status, 200);
    signal("-CONT");
    let addr = p.addr;
    eventually(
        Duration::from_secs(10),
        "keys taken again after Redis runs again",
        || async move {
            let r = post_key(addr, "/echo", "thawed", "t").await;
            (r.status == 201).then_some(())
        },
    )
    .await;
    post_key(p.addr, "/echo", "before", "b")
        .await
        .assert_replay(201, b"b");
    eprintln!("frozen Redis: 503 after {waited:?}");
}

/// `max_size` with Redis is Redis's own `maxmemory`: under `noeviction` its OOM answers are 503
/// `store-full` for new keys, while replays go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_is_store_full() {
    let redis = common::redis::RedisServer::start_with(&[
        "--maxmemory",
        "3mb",
        "--maxmemory-policy",
        "noeviction",
    ]);
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .arg("--redis-url")
        .arg(&redis.url())
        .start()
        .await;
    let body = "m".repeat(100_000);
    let mut stored = 0;
    let full = loop {
        let r = post_key(p.addr, "/echo", &format!("oom-{stored}"), &body).await;
        if r.status != 201 {
            break r;
        }
        stored += 1;
        assert!(stored < 200, "maxmemory never refused a write");
    };
    full.assert_problem(503, "store-full");
    post_key(p.addr, "/echo", "oom-0", &body)
        .await
        .assert_replay(201, body.as_bytes());
}

/// `max_size` holds for results too: a result that would take the store past it is recorded without
/// its body (replays say `Idempotency-Replay: omitted`), so concurrent large answers cannot overshoot
/// the cap by their size. (Found by review: six 3 MB answers took a 64 KiB store to 18 MB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_past_max_size_are_kept_without_their_body() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let p = proxy_on(&up, &dir.path().join("data"), "max_size = \"64KiB\"").await;
    let big = "B".repeat(300_000);
    let first = post_key(p.addr, "/echo", "big-1", &big).await;
    first.assert_forwarded(201, big.as_bytes());
    let replay = post_key(p.addr, "/echo", "big-1", &big).await;
    assert_eq!(replay.status, 201);
    assert!(replay.replayed());
    assert_eq!(replay.header("idempotency-replay"), Some("omitted"));
    assert!(replay.body.is_empty());
    let used = scrape(&p, "idemproxy_store_live_bytes").await;
    assert!(used <= 64.0 * 1024.0, "{used} bytes live with a 64 KiB cap");
    assert_eq!(up.hits_key("big-1"), 1);
}
