//! Launching the real `idemproxy` binary: config in a tempdir, sled data dir beside it, stderr forwarded to the
//! test's own stderr (prefixed) and kept for assertions, readiness taken from the `listening on` log line.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::sync::{mpsc, watch};

use super::client::{send, Resp};

/// Bound on the time from spawn to the `listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on the time from a signal to the process's exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test, with a clean, deterministic environment (no inherited `IDEMPROXY_*`, text logs at
/// info level unless `IDEMPROXY_TEST_LOG` says otherwise, no colours).
pub fn base_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_idemproxy"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("IDEMPROXY_") {
            c.env_remove(k);
        }
    }
    // IDEMPROXY_TEST_LOG (read here, never passed on) sets the child's RUST_LOG for debugging a test.
    let level = std::env::var("IDEMPROXY_TEST_LOG").unwrap_or_else(|_| "info".to_string());
    c.env("RUST_LOG", level)
        .env("NO_COLOR", "1")
        .env("IDEMPROXY_LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Remove ANSI escape sequences (in case the logger colours its output anyway).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Forward every line of `src` to the test's stderr as `[idemproxy PID NAME] line`, into `logs`, and into `tx`;
/// `changed` (if any) is bumped after each line is stored.
fn forward_lines(
    src: impl Read + Send + 'static,
    pid: u32,
    name: &'static str,
    logs: Arc<Mutex<Vec<String>>>,
    tx: Option<mpsc::UnboundedSender<String>>,
    changed: Option<Arc<watch::Sender<u64>>>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = strip_ansi(String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']));
            eprintln!("[idemproxy {pid} {name}] {line}");
            logs.lock().unwrap().push(line.clone());
            if let Some(changed) = &changed {
                changed.send_modify(|n| *n += 1);
            }
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
}

/// The socket address printed after `marker` on `line`, if any.
fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let word = rest.split_whitespace().next()?;
    let word = word.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '[' || c == ']'));
    word.parse().ok()
}

/// Config sections and launch options for one proxy. Every `[section]` gets the harness's own lines first
/// (`listen = "127.0.0.1:0"`, the upstream URL, the data dir) and then the test's lines.
#[derive(Debug, Clone)]
pub struct ProxyBuilder {
    upstream_url: String,
    listen: String,
    server: Vec<String>,
    upstream: Vec<String>,
    store: Vec<String>,
    defaults: Vec<String>,
    admin: Vec<String>,
    extra: Vec<String>,
    raw: Option<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    subcommand: bool,
}

impl ProxyBuilder {
    pub fn new(upstream_url: impl Into<String>) -> Self {
        ProxyBuilder {
            upstream_url: upstream_url.into(),
            listen: "127.0.0.1:0".to_string(),
            server: Vec::new(),
            upstream: Vec::new(),
            store: Vec::new(),
            defaults: Vec::new(),
            admin: Vec::new(),
            extra: Vec::new(),
            raw: None,
            args: Vec::new(),
            envs: Vec::new(),
            subcommand: true,
        }
    }

    /// A line (or lines) for `[server]`.
    pub fn server(mut self, toml: &str) -> Self {
        self.server.push(toml.to_string());
        self
    }

    /// The `[server] listen` value written to the file (default `127.0.0.1:0`).
    pub fn listen_in_file(mut self, addr: &str) -> Self {
        self.listen = addr.to_string();
        self
    }

    /// A line (or lines) for `[upstream]`.
    pub fn upstream(mut self, toml: &str) -> Self {
        self.upstream.push(toml.to_string());
        self
    }

    /// A line (or lines) for `[store]`.
    pub fn store(mut self, toml: &str) -> Self {
        self.store.push(toml.to_string());
        self
    }

    /// A line (or lines) for `[defaults]`.
    pub fn defaults(mut self, toml: &str) -> Self {
        self.defaults.push(toml.to_string());
        self
    }

    /// A line (or lines) for `[admin]` (after the harness's `listen = "127.0.0.1:0"`), e.g. a `token`.
    pub fn admin(mut self, toml: &str) -> Self {
        self.admin.push(toml.to_string());
        self
    }

    /// TOML appended after `[defaults]` (e.g. `[[routes]]` tables).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push(toml.to_string());
        self
    }

    /// Use this config text verbatim instead (`{DATA}` is replaced by the data dir path).
    pub fn raw_config(mut self, toml: &str) -> Self {
        self.raw = Some(toml.to_string());
        self
    }

    /// Extra command-line arguments after `run --config FILE`.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.to_string(), v.to_string()));
        self
    }

    /// Launch as bare `idemproxy --config FILE` (no `run` subcommand).
    pub fn bare(mut self) -> Self {
        self.subcommand = false;
        self
    }

    /// The config file text for a given data dir.
    pub fn config_text(&self, data_dir: &Path) -> String {
        let data = data_dir.display().to_string();
        if let Some(raw) = &self.raw {
            return raw.replace("{DATA}", &data);
        }
        let join = |v: &Vec<String>| v.join("\n");
        format!(
            "[server]\nlisten = \"{listen}\"\n{server}\n\n\
             [upstream]\nurl = \"{url}\"\n{upstream}\n\n\
             [store]\npath = '{data}'\n{store}\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n\n\
             [defaults]\n{defaults}\n\n{extra}\n",
            listen = self.listen,
            server = join(&self.server),
            url = self.upstream_url,
            upstream = join(&self.upstream),
            store = join(&self.store),
            defaults = join(&self.defaults),
            admin = join(&self.admin),
            extra = join(&self.extra),
        )
    }

    /// Write the config, spawn the binary and wait (bounded) until it is listening. Panics with the
    /// process's output if it exits or stays silent.
    pub async fn start(self) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("idemproxy-test-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let config = dir.path().join("idemproxy.toml");
        std::fs::write(&config, self.config_text(&data)).unwrap();
        let mut args = Vec::new();
        if self.subcommand {
            args.push("run".to_string());
        }
        args.push("--config".to_string());
        args.push(config.display().to_string());
        args.extend(self.args.iter().cloned());
        let mut proxy = Proxy {
            addr: dead_placeholder(),
            admin: dead_placeholder(),
            child: None,
            dir,
            args,
            envs: self.envs,
            logs: Arc::new(Mutex::new(Vec::new())),
            log_changed: Arc::new(watch::channel(0).0),
        };
        proxy.launch().await;
        proxy
    }
}

fn dead_placeholder() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

/// A running (or stopped) `idemproxy run` process. SIGKILLed on drop.
#[derive(Debug)]
pub struct Proxy {
    /// The proxy listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    child: Option<Child>,
    dir: TempDir,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    logs: Arc<Mutex<Vec<String>>>,
    /// Bumped after every stderr line (for [`Proxy::wait_log`]).
    log_changed: Arc<watch::Sender<u64>>,
}

impl Proxy {
    pub fn builder(upstream_url: impl Into<String>) -> ProxyBuilder {
        ProxyBuilder::new(upstream_url)
    }

    /// Launch the binary with exactly `args` and `envs` (on top of [`base_command`]'s clean environment) and
    /// wait for readiness like [`ProxyBuilder::start`]. No config is written; `dir` (a tempdir the caller
    /// made, so `args`/`envs` can name paths in it) becomes [`Proxy::dir`].
    pub async fn start_in(dir: TempDir, args: Vec<String>, envs: Vec<(String, String)>) -> Proxy {
        let mut proxy = Proxy {
            addr: dead_placeholder(),
            admin: dead_placeholder(),
            child: None,
            dir,
            args,
            envs,
            logs: Arc::new(Mutex::new(Vec::new())),
            log_changed: Arc::new(watch::channel(0).0),
        };
        proxy.launch().await;
        proxy
    }

    async fn launch(&mut self) {
        assert!(self.child.is_none(), "launch while a process is running");
        let mut cmd = base_command();
        cmd.args(&self.args);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", env!("CARGO_BIN_EXE_idemproxy")));
        let pid = child.id();
        eprintln!("[harness] spawned idemproxy pid {pid}: {:?}", self.args);
        let (tx, mut rx) = mpsc::unbounded_channel();
        forward_lines(
            child.stderr.take().unwrap(),
            pid,
            "stderr",
            self.logs.clone(),
            Some(tx),
            Some(self.log_changed.clone()),
        );
        forward_lines(
            child.stdout.take().unwrap(),
            pid,
            "stdout",
            Arc::new(Mutex::new(Vec::new())),
            None,
            None,
        );
        self.child = Some(child);

        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        let mut admin = None;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => {
                    self.kill_now();
                    panic!(
                        "idemproxy printed no `listening on` line within {STARTUP_TIMEOUT:?}; log:\n{}",
                        self.logs().join("\n")
                    );
                }
                Ok(None) => {
                    let status = self.wait_exit(Duration::from_secs(10)).await;
                    panic!(
                        "idemproxy exited ({status}) before listening; log:\n{}",
                        self.logs().join("\n")
                    );
                }
                Ok(Some(line)) => {
                    if line.contains("admin listener on") {
                        admin = addr_after(&line, "admin listener on");
                        assert!(admin.is_some(), "unparsable admin listener line {line:?}");
                    } else if line.contains("listening on") {
                        let addr = addr_after(&line, "listening on")
                            .unwrap_or_else(|| panic!("unparsable `listening on` line {line:?}"));
                        self.addr = addr;
                        self.admin = admin.unwrap_or_else(|| {
                            panic!("`listening on` came before any `admin listener on` line")
                        });
                        return;
                    }
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("proxy is not running").id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The sled data dir (`[store] path`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("idemproxy.toml")
    }

    /// Every stderr line so far (all runs of this proxy).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The number of stderr lines so far: a mark to pass to [`Proxy::wait_log`] before causing an event.
    pub fn log_mark(&self) -> usize {
        self.logs.lock().unwrap().len()
    }

    /// Stderr lines after `mark` (see [`Proxy::log_mark`]).
    pub fn logs_since(&self, mark: usize) -> Vec<String> {
        self.logs
            .lock()
            .unwrap()
            .get(mark..)
            .unwrap_or(&[])
            .to_vec()
    }

    /// Wait (event-driven, bounded by `limit`) for a stderr line after `mark` that satisfies `pred`; returns
    /// it. Panics with `what` and the lines seen since `mark` otherwise.
    pub async fn wait_log(
        &self,
        mark: usize,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        match self.try_wait_log(mark, limit, pred).await {
            Some(l) => l,
            None => panic!(
                "timed out after {limit:?} waiting for a log line: {what}; lines since the mark:\n{}",
                self.logs_since(mark).join("\n")
            ),
        }
    }

    /// Like [`Proxy::wait_log`], but `None` when no such line came within `limit`.
    pub async fn try_wait_log(
        &self,
        mark: usize,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let mut rx = self.log_changed.subscribe();
        let fut = async {
            let mut from = mark;
            loop {
                rx.borrow_and_update();
                let lines = self.logs_since(from);
                if let Some(l) = lines.iter().find(|l| pred(l)) {
                    return l.clone();
                }
                from += lines.len();
                if rx.changed().await.is_err() {
                    // Cannot happen while `self` holds the sender; wait for the timeout then.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(limit, fut).await.ok()
    }

    /// Replace the config file (the proxy reads it again on SIGHUP).
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Replace the config file with `builder`'s text for this proxy's data dir.
    pub fn write_config_from(&self, builder: &ProxyBuilder) {
        self.write_config(&builder.config_text(&self.data_dir()));
    }

    /// SIGHUP (config reload), without waiting.
    pub fn sighup(&self) {
        self.signal("HUP");
    }

    /// Send `kill -SIG pid` (e.g. `"TERM"`), without waiting.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args([format!("-{sig}").as_str(), pid.as_str()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{sig} {pid} failed: {status}");
    }

    /// Wait (bounded; panics after `limit`) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().expect("proxy is not running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                self.kill_now();
                panic!("idemproxy did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status if the process has ended (reaped here), `None` while it runs; never waits.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// SIGTERM and wait for the exit status.
    pub async fn sigterm(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(EXIT_TIMEOUT).await
    }

    /// SIGKILL (the crash) and reap.
    pub async fn sigkill(&mut self) {
        let child = self.child.as_mut().expect("proxy is not running");
        child.kill().unwrap();
        self.wait_exit(EXIT_TIMEOUT).await;
    }

    /// Start again on the same config and data dir (the process must have exited). Ports are new.
    pub async fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart() needs a stopped proxy (sigterm/sigkill first)"
        );
        self.launch().await;
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// GET on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Resp {
        send(self.admin, "GET", path, &[], b"").await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// What a one-shot CLI invocation produced.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lines().map(strip_ansi).collect()
    }
}

/// Run the binary with `args` and `envs` to completion, killing it (and panicking) after `limit`.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> CliOutput {
    let mut cmd = base_command();
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap();
            panic!("idemproxy {args:?} still running after {limit:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    eprintln!("[harness] idemproxy {args:?} exited {status}\n--- stderr ---\n{stderr}--- stdout ---\n{stdout}");
    CliOutput {
        status,
        stdout,
        stderr,
    }
}
