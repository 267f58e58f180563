//! Soak: a bounded run of mixed traffic with short TTLs (`ttl = "1s"`, `store.sweep_interval = "200ms"`)
//! against the real binary, sampling its resident memory (`VmRSS`), open file descriptors and the data
//! dir's size on disk.
//!
//! "Flat": after a warm-up (the first quarter of the run), the samples are split into thirds; for every
//! figure, the last third's maximum must be at most 1.5 × the first third's maximum (plus a small absolute
//! slack for tiny values: 8 MiB of RSS, 16 fds, 4 MiB of disk). Why this bound: with 1 s TTLs the live
//! set is reached within a second or two, so once the warm-up is over a healthy process only wobbles
//! (allocator, sled segment reuse). Anything that grows with the number of requests served — a record
//! never swept, a task or connection never freed — keeps growing through all three thirds, and the run
//! serves several times more requests after the first third than before its end; over the long form
//! (minutes, hundreds of thousands of requests) such growth crosses 1.5× long before the end. The bound is
//! loose on purpose: the CI machine is shared, and a flaky soak is worse than none.
//!
//! sled's page cache is set to 8 MiB (`store.cache_capacity`; default 16 MiB): the cache grows by design up
//! to its capacity, and a small one reaches that plateau within the warm-up.
//!
//! Short form: 20 s. Longer: `IDEMPROXY_SOAK_SECS=300`. `IDEMPROXY_SOAK_MIX=unique,burst` (any of
//! `unique,pool,burst,mismatch,noise`) narrows the traffic down when a figure needs explaining.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::keyed::KeyedUpstream;
use common::rng::Rng;
use common::{eventually, metrics, procstat, try_send, Proxy};

const TEXT: (&str, &str) = ("Content-Type", "text/plain");

/// The traffic mix as slots of 0..10 (see [`worker`]); `IDEMPROXY_SOAK_MIX` (comma-separated subset of
/// `unique,pool,burst,mismatch,noise`) narrows it down when investigating a figure.
fn soak_mix() -> Vec<u64> {
    let Ok(names) = std::env::var("IDEMPROXY_SOAK_MIX") else {
        return (0..10).collect();
    };
    let mut slots = Vec::new();
    for n in names.split(',').map(str::trim) {
        slots.extend(match n {
            "unique" => &[0u64, 1, 2, 3, 4][..],
            "pool" => &[5, 6],
            "burst" => &[7],
            "mismatch" => &[8],
            "noise" => &[9],
            other => panic!("IDEMPROXY_SOAK_MIX: unknown traffic {other:?}"),
        });
    }
    eprintln!("[soak] traffic mix {names:?}");
    slots
}

fn soak_secs() -> u64 {
    std::env::var("IDEMPROXY_SOAK_SECS")
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("IDEMPROXY_SOAK_SECS={v:?}"))
        })
        .unwrap_or(20)
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    /// Pooled-key requests that were forwarded (not replayed): the records that do not expire during the
    /// run (`ttl = "1h"` on `/p`); every other record must be swept.
    pool_forwarded: AtomicU64,
    errors: AtomicU64,
    unexpected: AtomicU64,
}

impl Counters {
    fn note_pool(&self, r: &Result<common::Resp, String>) {
        if matches!(r, Ok(r) if r.status == 201 && !r.replayed()) {
            self.pool_forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn note(&self, r: &Result<common::Resp, String>, ok: &[u16]) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(r) if ok.contains(&r.status) => {}
            Ok(r) => {
                if self.unexpected.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("[soak] unexpected answer {} {:?}", r.status, r.text());
                }
            }
            Err(e) => {
                if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("[soak] request failed: {e}");
                }
            }
        }
    }
}

async fn post(
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Result<common::Resp, String> {
    let mut headers = vec![TEXT];
    if let Some(k) = key {
        headers.push(("Idempotency-Key", k));
    }
    try_send(addr, "POST", path, &headers, body).await
}

/// Mixed traffic until `stop`: unique keys with bodies of a few hundred bytes (record churn, 1 s TTL), a
/// small pool of reused keys (replays; 1 h TTL), same-key bursts on a wait route, fingerprint mismatches
/// on the pool, and unprotected requests.
async fn worker(
    addr: SocketAddr,
    w: u64,
    mut rng: Rng,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
    mix: Arc<Vec<u64>>,
) {
    let pad = "p".repeat(rng.range(100, 600) as usize);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        match mix[rng.range(0, mix.len() as u64) as usize] {
            0..=4 => {
                let key = format!("soak-{w}-{i}");
                let r = post(addr, "/u", Some(&key), &format!("{key}{pad}")).await;
                c.note(&r, &[201]);
            }
            5 | 6 => {
                let key = format!("pool-{w}-{}", rng.range(0, 20));
                // 422 when the key's live record came from the mismatching request below.
                let r = post(addr, "/p", Some(&key), "pooled").await;
                c.note_pool(&r);
                c.note(&r, &[201, 409, 422]);
            }
            7 => {
                let key = format!("burst-{w}-{i}");
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..4 {
                    let key = key.clone();
                    set.spawn(async move { post(addr, "/w/b?ms=5", Some(&key), "burst").await });
                }
                while let Some(r) = set.join_next().await {
                    c.note(&r.unwrap(), &[201]);
                }
            }
            8 => {
                let key = format!("pool-{w}-{}", rng.range(0, 20));
                let r = post(addr, "/p", Some(&key), "a different body").await;
                c.note_pool(&r);
                c.note(&r, &[201, 409, 422]);
            }
            _ => {
                let r = post(addr, "/n", None, "unprotected").await;
                c.note(&r, &[201]);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    requests: u64,
    rss: u64,
    fds: u64,
    disk: u64,
    disk_apparent: u64,
}

/// (first third max, last third max) of a figure over the post-warm-up samples.
fn thirds(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> (u64, u64, u64) {
    let n = samples.len() / 3;
    let max = |s: &[Sample]| s.iter().map(&f).max().unwrap_or(0);
    (
        max(&samples[..n]),
        max(&samples[n..samples.len() - n]),
        max(&samples[samples.len() - n..]),
    )
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_stay_flat_under_key_churn_with_short_ttls() {
    let secs = soak_secs();
    let total = Duration::from_secs(secs);
    let warmup = total / 4;
    let mut rng = Rng::from_env("soak");
    let up = KeyedUpstream::start();
    let p = Proxy::builder(up.url())
        // sled's page cache grows by design up to `cache_capacity` (16 MiB by default); a small cache
        // reaches that plateau during the warm-up, so growth after it is not the cache filling up.
        .store("sweep_interval = \"200ms\"\ncache_capacity = \"8MiB\"")
        .defaults("ttl = \"1s\"\nlease = \"2s\"\non_in_flight = \"reject\"")
        .extra(
            "[[routes]]\nname = \"wait\"\npath = \"/w/**\"\non_in_flight = \"wait\"\n\n\
             [[routes]]\nname = \"pool\"\npath = \"/p\"\nttl = \"1h\"",
        )
        .start()
        .await;
    let pid = p.pid();
    let data = p.data_dir();
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let mut workers = tokio::task::JoinSet::new();
    let mix = Arc::new(soak_mix());
    for w in 0..3 {
        workers.spawn(worker(
            p.addr,
            w,
            rng.fork(),
            stop.clone(),
            counters.clone(),
            mix.clone(),
        ));
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while started.elapsed() < total {
        tick.tick().await;
        samples.push(Sample {
            at: started.elapsed(),
            requests: counters.requests.load(Ordering::Relaxed),
            rss: procstat::rss_bytes(pid).expect("the proxy is gone"),
            fds: procstat::fd_count(pid).expect("the proxy is gone") as u64,
            disk: procstat::dir_allocated_bytes(&data),
            disk_apparent: procstat::dir_bytes(&data),
        });
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = workers.join_next().await {
        r.unwrap();
    }
    let requests = counters.requests.load(Ordering::Relaxed);

    // The sweeper catches up: with traffic stopped, every record but the pooled ones (1 h TTL) expires
    // within its 1 s TTL and is deleted by one of the next sweeps.
    let stored = metrics::scrape(&p, "idemproxy_records_stored_total").await;
    let pooled = counters.pool_forwarded.load(Ordering::Relaxed) as f64;
    let caught_up = Instant::now();
    let expired_after = eventually(
        Duration::from_secs(15),
        "the sweeper to delete every record that was not replaced",
        || async {
            let n = metrics::scrape(&p, "idemproxy_records_expired_total").await;
            (n >= stored - pooled).then_some(n)
        },
    )
    .await;
    let caught_up = caught_up.elapsed();

    let measured: Vec<Sample> = samples.iter().copied().filter(|s| s.at >= warmup).collect();
    assert!(
        measured.len() >= 9,
        "too few samples ({}) for a {secs} s run",
        measured.len()
    );
    let rss = thirds(&measured, |s| s.rss);
    let fds = thirds(&measured, |s| s.fds);
    let disk = thirds(&measured, |s| s.disk);
    let first = measured.first().unwrap();
    let last = measured.last().unwrap();
    let rate = (last.requests - first.requests) as f64 / (last.at - first.at).as_secs_f64();
    eprintln!(
        "[soak] {secs} s, {requests} requests ({rate:.0}/s after warm-up), {} errors, {} unexpected; \
         records stored {stored}, of which {pooled} pooled (1 h TTL); expired and swept {expired_after}, \
         all of the others {caught_up:?} after the traffic stopped\n\
         [soak] max per third after {warmup:?} warm-up (first / middle / last):\n\
         [soak]   RSS   {} / {} / {}\n\
         [soak]   fds   {} / {} / {}\n\
         [soak]   disk  {} / {} / {}",
        counters.errors.load(Ordering::Relaxed),
        counters.unexpected.load(Ordering::Relaxed),
        mib(rss.0),
        mib(rss.1),
        mib(rss.2),
        fds.0,
        fds.1,
        fds.2,
        mib(disk.0),
        mib(disk.1),
        mib(disk.2),
    );
    for s in samples.iter().step_by(4) {
        eprintln!(
            "[soak] t={:>5.1}s requests={:>7} rss={:>9} fds={:>4} disk={:>9} (apparent {})",
            s.at.as_secs_f64(),
            s.requests,
            mib(s.rss),
            s.fds,
            mib(s.disk),
            mib(s.disk_apparent)
        );
    }

    assert_eq!(
        counters.errors.load(Ordering::Relaxed),
        0,
        "failed requests"
    );
    assert_eq!(
        counters.unexpected.load(Ordering::Relaxed),
        0,
        "unexpected answers"
    );
    assert!(expired_after > 0.0, "the sweeper never deleted anything");
    let flat = |name: &str, (a, _, c): (u64, u64, u64), slack: u64| {
        assert!(
            c as f64 <= a as f64 * 1.5 + slack as f64,
            "{name} grew: last third's max {c} > 1.5 × first third's max {a} (+{slack})"
        );
    };
    flat("RSS", rss, 8 << 20);
    flat("open fds", fds, 16);
    flat("data dir size", disk, 4 << 20);
}
