//! A real `redis-server` for tests: started on a free 127.0.0.1 port with its data dir in a tempdir, waited
//! for by connecting (bounded), killed (SIGKILL) on drop. It can be stopped and started again on the same
//! port and dir to simulate an outage.
//!
//! Without `redis-server` on the PATH, [`RedisServer::start`] fails and says how to install it; the
//! conformance suite asks [`available`] first and skips only its Redis cases.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on the time from spawn to the first PONG.
pub const REDIS_STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// The binary: `redis-server` from the PATH.
const BINARY: &str = "redis-server";

/// Whether `redis-server` is on the PATH.
pub fn available() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(BINARY).is_file()))
}

/// A running (or stopped) `redis-server`.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one without persistence (`--save '' --appendonly no`).
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts one with extra arguments (e.g. `["--appendonly", "yes"]`, which come after the defaults and
    /// so win over them).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_on(extra, free_port)
    }

    /// Starts a Redis Cluster node (cluster mode on, its bus on port + 10000, so the port is below
    /// 55535 and both ports are free). See `RedisCluster`.
    pub fn start_cluster_node() -> RedisServer {
        Self::start_on(
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--repl-diskless-sync-delay",
                "0",
            ],
            cluster_port,
        )
    }

    fn start_on(extra: &[&str], pick_port: fn() -> u16) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("idemproxy-redis-")
            .tempdir()
            .expect("creating a tempdir for redis-server");
        let mut server = RedisServer {
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        // A free port can be taken by someone else between our probe and redis binding it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = pick_port();
            match server.launch() {
                Ok(()) => return server,
                Err(log) => last = log,
            }
        }
        panic!("redis-server did not start on any of 5 free ports; last log:\n{last}");
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's process id (to freeze it with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills it (SIGKILL: a crash, nothing flushed beyond what its own config writes) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data dir (after [`RedisServer::stop`]).
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart() needs a stopped redis-server"
        );
        if let Err(log) = self.launch() {
            panic!(
                "redis-server did not start again on port {}; log:\n{log}",
                self.port
            );
        }
    }

    /// Sends one command, its words split on whitespace; see [`RedisServer::command_args`].
    pub fn command(&self, cmd: &str) -> String {
        self.command_args(&cmd.split_whitespace().collect::<Vec<_>>())
    }

    /// Sends one command and returns its reply as text: a simple reply, error or integer as its line
    /// (`+OK`, `-ERR …`, `:12`), a bulk string as its content (`$-1` when nil). For test assertions.
    pub fn command_args(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connecting to redis-server on {}: {e}", self.addr()));
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req).expect("writing to redis-server");
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = reply.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&reply[..end]).into_owned();
                let Some(len) = line.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) else {
                    return line;
                };
                let body = end + 2;
                if reply.len() >= body + len {
                    return String::from_utf8_lossy(&reply[body..body + len]).into_owned();
                }
            }
            let n = s.read(&mut buf).expect("reading from redis-server");
            assert!(n > 0, "redis-server closed the connection mid-reply");
            reply.extend_from_slice(&buf[..n]);
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Spawns the process and waits for a PONG; `Err(log)` if it exited (e.g. the port was taken).
    fn launch(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let dir = self.dir.path().display().to_string();
        let log = self.log_path().display().to_string();
        let mut cmd = Command::new(BINARY);
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--dir", &dir, "--logfile", &log])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{BINARY}` is not installed (not found on the PATH). The Redis store tests need a real \
                 redis-server and never skip: install it, e.g. `apt-get install -y redis-server`."
            ),
            Err(e) => panic!("spawning {BINARY}: {e}"),
        };
        eprintln!(
            "[harness] spawned redis-server pid {} on 127.0.0.1:{port}",
            child.id()
        );
        self.child = Some(child);
        let deadline = Instant::now() + REDIS_STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("exited with {status}\n{}", self.log()));
                }
            }
            if pong(self.addr()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                panic!(
                    "redis-server on port {port} did not answer PING within {REDIS_STARTUP_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// A port below 55535 that was free a moment ago, with port + 10000 free too (a cluster node's bus).
fn cluster_port() -> u16 {
    for _ in 0..200 {
        let port = free_port();
        let port = if port < 55_535 { port } else { port - 30_000 };
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a Redis Cluster node");
}

/// Whether a redis answers PING on `addr` (each step bounded).
fn pong(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
