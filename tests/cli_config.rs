//! The command line and the config file of the real `idemproxy` binary: `check` accepts every example under
//! `config/`, reports every problem of a broken file as `PATH: message` (0-based TOML paths) and exits 2, also
//! for TOML syntax errors and missing files; `run` with a broken config exits 2 without listening;
//! `--listen`/`--upstream`/`--data-dir` and `IDEMPROXY_LISTEN`/`IDEMPROXY_UPSTREAM` override the file; bare
//! `idemproxy --config FILE` runs like `run`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{dead_addr, post_key, run_cli, CliOutput, Proxy, Upstream};

const CLI_TIMEOUT: Duration = Duration::from_secs(20);

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check(path: &Path) -> CliOutput {
    run_cli(
        &["check", "--config", path.to_str().unwrap()],
        &[],
        CLI_TIMEOUT,
    )
}

/// The stderr line that starts with `path: ` (the problem format), or a panic listing stderr.
fn problem_line(out: &CliOutput, path: &str) -> String {
    let prefix = format!("{path}: ");
    out.stderr_lines()
        .into_iter()
        .find(|l| l.trim_start().starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}...` line on stderr:\n{}", out.stderr))
}

#[test]
fn check_accepts_every_example_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no example configs in {}", dir.display());
    for f in files {
        let out = check(&f);
        assert_eq!(
            out.code(),
            Some(0),
            "check {} failed:\n{}",
            f.display(),
            out.stderr
        );
    }
}

#[test]
fn check_accepts_a_minimal_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        r#"
[server]
listen = "127.0.0.1:0"
max_request_body = "1KiB"

[upstream]
url = "http://127.0.0.1:3000"

[store]
path = "data"
sync = "always"

[defaults]
ttl = "1s"
on_in_flight = "wait"
release_statuses = [503]

[[routes]]
name = "payments"
path = "/v1/payments/**"
methods = ["POST"]
required = true
"#,
    );
    let out = check(&cfg);
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
}

#[test]
fn check_reports_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        r#"
[server]
listen = "127.0.0.1:0"
lisen = "127.0.0.1:8081"

[upstream]
url = "http://127.0.0.1:3000"

[defaults]
on_in_flight = "sometimes"

[[routes]]
name = "a"
path = "/a/**"

[[routes]]
name = "b"
path = "/b/**"
ttl = "1x"
"#,
    );
    let out = check(&cfg);
    assert_eq!(out.code(), Some(2), "stderr:\n{}", out.stderr);
    assert!(
        problem_line(&out, "server.lisen").contains("unknown key"),
        "{}",
        out.stderr
    );
    problem_line(&out, "defaults.on_in_flight");
    let ttl = problem_line(&out, "routes[1].ttl");
    assert!(
        ttl.contains(r#"routes[1].ttl: invalid duration "1x""#),
        "ttl line: {ttl}"
    );
    assert!(
        out.stderr_lines()
            .iter()
            .all(|l| !l.trim_start().starts_with("routes[0]")),
        "the first route is valid:\n{}",
        out.stderr
    );
}

#[test]
fn check_reports_problems_across_sections() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        r#"
[server]
max_request_body = "lots"

[upstream]
url = "not a url"

[store]
sync = "sometimes"

[[routes]]
name = "a"
path = "/a/**"
on_in_flight = "maybe"
"#,
    );
    let out = check(&cfg);
    assert_eq!(out.code(), Some(2), "stderr:\n{}", out.stderr);
    for path in [
        "server.max_request_body",
        "upstream.url",
        "store.sync",
        "routes[0].on_in_flight",
    ] {
        problem_line(&out, path);
    }
}

#[test]
fn check_rejects_a_toml_syntax_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[server\nlisten = \"127.0.0.1:0\"\n");
    let out = check(&cfg);
    assert_eq!(out.code(), Some(2), "stderr:\n{}", out.stderr);
    assert!(!out.stderr.trim().is_empty(), "no diagnostic printed");
}

#[test]
fn check_rejects_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&dir.path().join("nope.toml"));
    assert_eq!(out.code(), Some(2), "stderr:\n{}", out.stderr);
    assert!(!out.stderr.trim().is_empty(), "no diagnostic printed");
}

#[test]
fn run_with_an_invalid_config_exits_2_without_listening() {
    let dir = tempfile::tempdir().unwrap();
    let listen = dead_addr();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[server]\nlisten = \"{listen}\"\n\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n\
             [store]\npath = '{}'\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [defaults]\nttl = \"1x\"\n",
            dir.path().join("data").display()
        ),
    );
    let out = run_cli(
        &["run", "--config", cfg.to_str().unwrap()],
        &[],
        CLI_TIMEOUT,
    );
    assert_eq!(out.code(), Some(2), "stderr:\n{}", out.stderr);
    problem_line(&out, "defaults.ttl");
    assert!(
        !out.stderr.contains("listening on"),
        "listened with an invalid config:\n{}",
        out.stderr
    );
}

/// The upstream and listen address in the file are both wrong; the overrides must win.
fn misconfigured(held: &std::net::TcpListener) -> common::ProxyBuilder {
    Proxy::builder(format!("http://{}", dead_addr()))
        .listen_in_file(&held.local_addr().unwrap().to_string())
}

#[tokio::test]
async fn listen_and_upstream_flags_override_the_file() {
    let up = Upstream::start();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = misconfigured(&held)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--upstream")
        .arg(&up.url())
        .start()
        .await;
    assert_ne!(p.addr, held.local_addr().unwrap());
    post_key(p.addr, "/echo", "flags-1", "via flags")
        .await
        .assert_forwarded(201, b"via flags");
    assert_eq!(up.hits_key("flags-1"), 1);
}

#[tokio::test]
async fn listen_and_upstream_env_vars_override_the_file() {
    let up = Upstream::start();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = misconfigured(&held)
        .env("IDEMPROXY_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_UPSTREAM", &up.url())
        .start()
        .await;
    assert_ne!(p.addr, held.local_addr().unwrap());
    post_key(p.addr, "/echo", "env-1", "via env")
        .await
        .assert_forwarded(201, b"via env");
    assert_eq!(up.hits_key("env-1"), 1);
}

#[tokio::test]
async fn bare_config_flag_runs_like_run() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).bare().start().await;
    post_key(p.addr, "/echo", "bare-1", "bare")
        .await
        .assert_forwarded(201, b"bare");
    post_key(p.addr, "/echo", "bare-1", "bare")
        .await
        .assert_replay(201, b"bare");
    assert_eq!(p.admin_get("/healthz").await.status, 200);
    assert_eq!(up.hits_key("bare-1"), 1);
}

#[tokio::test]
async fn data_dir_flag_overrides_the_store_path() {
    let up = Upstream::start();
    let elsewhere = tempfile::tempdir().unwrap();
    let data = elsewhere.path().join("flag-data");
    let mut p = Proxy::builder(up.url())
        .arg("--data-dir")
        .arg(data.to_str().unwrap())
        .start()
        .await;
    post_key(p.addr, "/echo", "dd-1", "x")
        .await
        .assert_forwarded(201, b"x");
    assert!(p.sigterm().await.success());
    assert!(
        std::fs::read_dir(&data).is_ok_and(|mut d| d.next().is_some()),
        "nothing stored in --data-dir {}",
        data.display()
    );
    assert!(
        !p.data_dir().exists(),
        "the file's [store] path was used despite --data-dir"
    );
}

/// `demo` on a taken port says so before printing its banner, and an error's cause is said once.
#[test]
fn demo_on_a_taken_port_fails_before_its_banner_and_says_the_cause_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = common::run_cli(&["demo", "--listen", &addr], &[], Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        !out.stdout.contains("curl"),
        "the banner was printed: {}",
        out.stdout
    );
    let last = out
        .stderr_lines()
        .into_iter()
        .rfind(|l| l.starts_with("idemproxy:"))
        .unwrap_or_default();
    assert!(
        last.contains(&format!("cannot listen on {addr}")),
        "{}",
        out.stderr
    );
    let said = last.matches("already in use").count();
    assert_eq!(said, 1, "the cause is said {said} times: {last}");
}
