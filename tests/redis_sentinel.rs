//! The Redis backend through Sentinel, with real parts: a primary, its replica and a sentinel
//! (`redis-server --sentinel`) monitoring them, and one `idemproxy run` with `[store] redis_sentinels`
//! and `redis_master_name`. The primary is killed with SIGKILL; the sentinel promotes the replica; the
//! same proxy process, not restarted, answers again from the new primary: what was recorded before is
//! replayed, and new keys are claimed there.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::keyed::KeyedUpstream;
use common::redis::RedisServer;
use common::{eventually, try_send, Proxy, Resp};

const MASTER: &str = "mymaster";

/// A sentinel monitoring `primary` (quorum 1, down after 500 ms); killed on drop.
struct Sentinel {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(primary: &RedisServer) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {MASTER} 500\n\
                 sentinel failover-timeout {MASTER} 3000\n",
                dir.path().display(),
                primary.port()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server --sentinel");
        Sentinel {
            port,
            child,
            _dir: dir,
        }
    }

    fn ask(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The port the sentinel names as the primary's.
    fn master_port(&self) -> Option<u16> {
        self.ask(&["SENTINEL", "get-master-addr-by-name", MASTER])
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn info(r: &RedisServer, field: &str) -> Option<String> {
    r.command("INFO replication").lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_owned())
    })
}

async fn post(p: &Proxy, key: &str) -> Result<Resp, String> {
    try_send(
        p.addr,
        "POST",
        "/pay",
        &[("Idempotency-Key", key), ("Content-Type", "text/plain")],
        "amount=100",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_follows_a_sentinel_failover_without_a_restart() {
    let mut primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    eventually(Duration::from_secs(15), "the replica to sync", || async {
        (info(&replica, "master_link_status").as_deref() == Some("up")).then_some(())
    })
    .await;
    let sentinel = Sentinel::start(&primary);
    let replica_port = replica.port().to_string();
    eventually(
        Duration::from_secs(15),
        "the sentinel to know the replica",
        || async {
            sentinel
                .ask(&["SENTINEL", "replicas", MASTER])
                .contains(&replica_port)
                .then_some(())
        },
    )
    .await;

    let up = KeyedUpstream::start();
    let proxy = Proxy::builder(up.url())
        .store(&format!(
            "backend = \"redis\"\nredis_sentinels = [\"redis://127.0.0.1:{}\"]\n\
             redis_master_name = \"{MASTER}\"\nkey_prefix = \"sentinel:\"\ntimeout = \"2s\"\n",
            sentinel.port
        ))
        .start()
        .await;
    let first = post(&proxy, "before-1").await.unwrap();
    assert!(first.status < 300 && !first.replayed(), "{first:?}");
    assert!(post(&proxy, "before-1").await.unwrap().replayed());
    // The record is on the replica before the primary dies (asynchronous replication: wait for it).
    eventually(
        Duration::from_secs(10),
        "the replica to catch up",
        || async {
            let (p, r) = (
                info(&primary, "master_repl_offset"),
                info(&replica, "master_repl_offset"),
            );
            (p.is_some() && p == r).then_some(())
        },
    )
    .await;
    let pid = proxy.pid();

    primary.stop();
    eventually(
        Duration::from_secs(30),
        "the sentinel to promote the replica",
        || async { (sentinel.master_port() == Some(replica.port())).then_some(()) },
    )
    .await;
    // The same process answers again, from the new primary.
    let fresh = eventually(
        Duration::from_secs(30),
        "a new key to be claimed again",
        || async {
            post(&proxy, "after-1")
                .await
                .ok()
                .filter(|r| r.status < 300)
        },
    )
    .await;
    assert!(!fresh.replayed(), "{fresh:?}");
    assert_eq!(proxy.pid(), pid);
    let again = post(&proxy, "before-1").await.unwrap();
    assert!(
        again.replayed(),
        "the record from before the failover: {again:?}"
    );
    assert_eq!(up.hits("before-1"), 1);
    assert_eq!(up.hits("after-1"), 1);
    assert_eq!(info(&replica, "role").as_deref(), Some("master"));
}
