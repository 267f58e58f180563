//! The key-affinity recipe for replicas without a shared store, run for real: Debian's nginx, started
//! with `docker/nginx-affinity.conf` itself (its two replica addresses and its port substituted), in
//! front of two `idemproxy run` processes that each keep their own sled store, and an upstream that
//! counts requests per key.
//!
//! - With the file as shipped (`hash $idempotency_key consistent`), every retry of a key lands on the
//!   replica that saw it first and is replayed: each key runs once, and both replicas get keys.
//! - The same file without its `hash` line (nginx's round robin) sends a retry to the other replica,
//!   which never saw the key: it runs again. This is what the recipe is for, and it shows the test can
//!   tell the two apart.
//!
//! nginx must be installed (`scripts/test.sh` installs it as root on Debian); without it these tests
//! fail, they never skip.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::keyed::KeyedUpstream;
use common::{eventually, metrics, try_send, Proxy};

const RECIPE: &str = include_str!("../docker/nginx-affinity.conf");
const HASH_LINE: &str = "hash $idemproxy_affinity consistent;";

/// nginx serving `snippet` (an http-level config) on 127.0.0.1:`port`; stopped on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn nginx_binary() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    PathBuf::from("nginx")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nginx {
    async fn start(snippet: &str, port: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             {snippet}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let mut cmd = Command::new(nginx_binary());
        cmd.arg("-p").arg(dir.path()).arg("-c").arg(&path);
        if rustix::process::geteuid().is_root() {
            // Workers as root can read the tempdir; as anyone else nginx keeps the caller's user.
            cmd.arg("-g").arg("user root;");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting nginx ({:?}): {e}", nginx_binary()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        eventually(Duration::from_secs(10), "nginx to listen", || async move {
            tokio::net::TcpStream::connect(addr).await.ok().map(drop)
        })
        .await;
        Nginx {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The recipe with the replicas' addresses and a listen port of the test's.
fn recipe(a: SocketAddr, b: SocketAddr, port: u16, hashed: bool) -> String {
    assert!(
        RECIPE.contains(HASH_LINE),
        "the recipe no longer hashes on the key"
    );
    let text = RECIPE
        .replace("idemproxy-a:8080", &a.to_string())
        .replace("idemproxy-b:8080", &b.to_string())
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    if hashed {
        text
    } else {
        text.replace(HASH_LINE, "")
    }
}

/// Two replicas with their own sled stores behind nginx: sends every key `sends` times in a row and
/// returns (keys that ran more than once, requests each replica counted).
async fn run(hashed: bool, keys: usize, sends: usize) -> (Vec<String>, [f64; 2]) {
    let up = KeyedUpstream::start();
    let a = Proxy::builder(up.url()).start().await;
    let b = Proxy::builder(up.url()).start().await;
    let port = free_port();
    let nginx = Nginx::start(&recipe(a.addr, b.addr, port, hashed), port).await;
    for k in 0..keys {
        let key = format!("order-{k}");
        for n in 0..sends {
            let r = try_send(
                nginx.addr,
                "POST",
                "/pay",
                &[("Idempotency-Key", &key), ("Content-Type", "text/plain")],
                "amount=100",
            )
            .await
            .unwrap_or_else(|e| panic!("{key} send {n}: {e}"));
            assert!(r.status < 300, "{key} send {n}: {r:?}");
            if hashed && n > 0 {
                assert!(r.replayed(), "{key} send {n} was not replayed: {r:?}");
            }
        }
    }
    let dup = (0..keys)
        .map(|k| format!("order-{k}"))
        .filter(|k| up.hits(k) > 1)
        .collect();
    let counted = [
        metrics::scrape(&a, "idemproxy_requests_total").await,
        metrics::scrape(&b, "idemproxy_requests_total").await,
    ];
    (dup, counted)
}

#[tokio::test]
async fn with_the_recipe_every_retry_lands_on_the_replica_that_saw_its_key() {
    let (dup, counted) = run(true, 40, 3).await;
    assert!(dup.is_empty(), "keys that ran twice: {dup:?}");
    assert!(
        counted.iter().all(|&n| n > 0.0),
        "every key went to one replica: {counted:?}"
    );
    assert_eq!(counted[0] + counted[1], 120.0, "{counted:?}");
}

#[tokio::test]
async fn without_the_hash_a_retry_reaches_the_other_replica_and_runs_again() {
    let (dup, _) = run(false, 10, 2).await;
    assert_eq!(
        dup.len(),
        10,
        "round robin should send every retry to the other replica: {dup:?}"
    );
}
