//! Config bounds and backend selection against the real binary (contract rules 13 and 17, and the
//! "Limits and hostile input" keys).
//!
//! What this pins (each case behaved otherwise before): a Redis URL next to `backend = "sled"` was silently
//! ignored (now exit 2 naming both, whether the URL comes from the file, `--redis-url` or
//! `IDEMPROXY_REDIS_URL`); `check` ignored `run`'s flags and environment (so it passed configs `run` then
//! refused); a Redis-only key with sled was ignored; a Redis URL alone did not select Redis; zero or absurd
//! durations, sizes and counts were accepted (and could make the proxy panic on deadline arithmetic);
//! credentials in `[upstream] url` were accepted and printed; a rule that records responses with no scope
//! passed without a word; cookies could not scope keys; and 401/403 answers were recorded, so a forged
//! request burned the genuine client's key.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::redis::RedisServer;
use common::{post_key, run_cli, send, CliOutput, Proxy, Upstream};

const CLI_TIMEOUT: Duration = Duration::from_secs(20);
const TEXT: (&str, &str) = ("Content-Type", "text/plain");
const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// A valid config with one route, plus `extra` lines for each section (`section` is `server`,
/// `upstream`, `store`, `defaults` or `routes[0]`).
fn config(extra: &[(&str, &str)]) -> String {
    let lines = |section: &str| {
        extra
            .iter()
            .filter(|(s, _)| *s == section)
            .map(|(_, l)| format!("{l}\n"))
            .collect::<String>()
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n\
         [upstream]\nurl = \"http://127.0.0.1:3000\"\n{}\n\
         [store]\n{}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [defaults]\n{}\n\
         [[routes]]\nname = \"r\"\npath = \"/r/**\"\n{}",
        lines("server"),
        lines("upstream"),
        lines("store"),
        lines("defaults"),
        lines("routes[0]"),
    )
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `idemproxy check --config FILE ARGS...` with `envs`.
fn check(cfg: &Path, args: &[&str], envs: &[(&str, &str)]) -> CliOutput {
    let mut all = vec!["check", "--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    run_cli(&all, envs, CLI_TIMEOUT)
}

/// `check` on `text` with no flags.
fn check_text(text: &str) -> CliOutput {
    let dir = tempfile::tempdir().unwrap();
    check(&write(dir.path(), text), &[], &[])
}

/// Exit 2 and a stderr line `path: reason`; returns that line.
fn assert_problem(out: &CliOutput, path: &str, what: &str) -> String {
    assert_eq!(
        out.code(),
        Some(2),
        "{what}: expected exit 2\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let prefix = format!("{path}: ");
    out.stderr_lines()
        .into_iter()
        .find(|l| l.trim_start().starts_with(&prefix))
        .unwrap_or_else(|| panic!("{what}: no `{prefix}...` line on stderr:\n{}", out.stderr))
}

#[test]
fn the_base_config_passes_check() {
    let out = check_text(&config(&[]));
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
}

/// Rule 13: a Redis URL next to `backend = "sled"` is an error naming both, wherever the URL comes from
/// (file, `--redis-url`, `IDEMPROXY_REDIS_URL`); `check` applies the same flags and environment as `run`.
#[test]
fn a_redis_url_next_to_backend_sled_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let url_line = format!("redis_url = \"{REDIS_URL}\"");
    let in_file = write(
        dir.path(),
        &config(&[("store", "backend = \"sled\""), ("store", &url_line)]),
    );
    let out = check(&in_file, &[], &[]);
    let line = assert_problem(&out, "store.backend", "redis_url in the file");
    assert!(line.contains("redis_url"), "{line}");

    let sled_dir = tempfile::tempdir().unwrap();
    let sled = write(sled_dir.path(), &config(&[("store", "backend = \"sled\"")]));
    let ok = check(&sled, &[], &[]);
    assert_eq!(ok.code(), Some(0), "sled alone: {}", ok.stderr);

    let out = check(&sled, &[], &[("IDEMPROXY_REDIS_URL", REDIS_URL)]);
    let line = assert_problem(&out, "store.backend", "IDEMPROXY_REDIS_URL");
    assert!(line.contains("redis_url"), "{line}");

    let out = check(&sled, &["--redis-url", REDIS_URL], &[]);
    let line = assert_problem(&out, "store.backend", "--redis-url");
    assert!(line.contains("redis_url"), "{line}");
}

/// Rule 13: `run` refuses the same conflict with exit 2, before listening.
#[test]
fn run_refuses_a_redis_url_next_to_backend_sled() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("path = '{}'", dir.path().join("data").display());
    let sled = write(
        dir.path(),
        &config(&[("store", "backend = \"sled\""), ("store", &data)]),
    );
    let out = run_cli(
        &[
            "run",
            "--config",
            sled.to_str().unwrap(),
            "--redis-url",
            REDIS_URL,
        ],
        &[],
        CLI_TIMEOUT,
    );
    let line = assert_problem(&out, "store.backend", "run --redis-url");
    assert!(line.contains("redis_url"), "{line}");
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
}

/// Rule 13: `check` applies `run`'s overrides, so a bad `IDEMPROXY_LISTEN` or `--listen` fails it.
#[test]
fn check_applies_the_listen_override() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), &config(&[]));
    let out = check(&cfg, &[], &[("IDEMPROXY_LISTEN", "garbage")]);
    assert_problem(&out, "server.listen", "IDEMPROXY_LISTEN=garbage");
    let out = check(&cfg, &["--listen", "garbage"], &[]);
    assert_problem(&out, "server.listen", "--listen garbage");
}

/// Rule 13: a setting only Redis uses is an error with sled.
#[test]
fn a_redis_setting_with_sled_fails_check() {
    let out = check_text(&config(&[("store", "key_prefix = \"x:\"")]));
    assert_problem(&out, "store.key_prefix", "key_prefix with sled");
}

/// Rule 13: a Redis URL alone selects Redis: `check` passes, and `run` starts on Redis (its startup log
/// says so), forwards a keyed POST, replays it, and the record is in Redis.
#[tokio::test]
async fn a_redis_url_alone_selects_the_redis_backend() {
    let url_line = format!("redis_url = \"{REDIS_URL}\"");
    let out = check_text(&config(&[("store", &url_line)]));
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);

    let redis = RedisServer::start();
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .store(&format!("redis_url = \"{}\"", redis.url()))
        .start()
        .await;
    let started = p
        .logs()
        .into_iter()
        .find(|l| l.contains("idemproxy starting"))
        .unwrap_or_else(|| panic!("no startup line:\n{}", p.logs().join("\n")));
    assert!(
        started.contains("backend=\"redis\""),
        "startup line does not name the Redis backend: {started}"
    );
    post_key(p.addr, "/pay", "redis-alone-1", "x")
        .await
        .assert_forwarded(200, b"hit 1 POST /pay");
    post_key(p.addr, "/pay", "redis-alone-1", "x")
        .await
        .assert_replay(200, b"hit 1 POST /pay");
    assert_eq!(up.hits_key("redis-alone-1"), 1);
    let keys: u64 = redis
        .command("DBSIZE")
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(keys > 0, "nothing was written to Redis");
}

/// Rule 17: every duration has bounds; zero and absurdly large values fail `check` with their path.
#[test]
fn zero_or_out_of_range_durations_fail_check_with_their_path() {
    let keys = [
        "server.request_timeout",
        "server.header_read_timeout",
        "server.shutdown_grace",
        "server.idle_timeout",
        "upstream.connect_timeout",
        "upstream.timeout",
        "store.sweep_interval",
        "store.timeout",
        "defaults.ttl",
        "defaults.lease",
        "defaults.wait_timeout",
        "routes[0].ttl",
    ];
    for path in keys {
        let (section, key) = path.rsplit_once('.').unwrap();
        for value in ["0s", "1000000000y"] {
            let line = format!("{key} = \"{value}\"");
            let out = check_text(&config(&[(section, &line)]));
            assert_problem(&out, path, &format!("{path} = {value:?}"));
        }
        // Control: an ordinary value of the same key passes.
        let line = format!("{key} = \"2s\"");
        let out = check_text(&config(&[(section, &line)]));
        assert_eq!(
            out.code(),
            Some(0),
            "{path} = \"2s\" must pass:\n{}",
            out.stderr
        );
    }
}

/// Rule 17: sizes and counts have bounds too.
#[test]
fn out_of_range_sizes_and_counts_fail_check_with_their_path() {
    for (path, value) in [
        ("server.max_request_body", "\"2GiB\""),
        ("store.max_size", "0"),
        ("server.max_connections", "0"),
        ("upstream.max_concurrency", "0"),
    ] {
        let (section, key) = path.rsplit_once('.').unwrap();
        let line = format!("{key} = {value}");
        let out = check_text(&config(&[(section, &line)]));
        assert_problem(&out, path, &format!("{path} = {value}"));
    }
}

/// Rule 17: credentials in `[upstream] url` are refused, and never printed.
#[test]
fn upstream_url_credentials_are_refused_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("path = '{}'", dir.path().join("data").display());
    let text = config(&[("store", &data)]).replace(
        "url = \"http://127.0.0.1:3000\"",
        "url = \"http://user:secret@127.0.0.1:3000\"",
    );
    assert!(text.contains("secret"));
    let cfg = write(dir.path(), &text);
    let out = check(&cfg, &[], &[]);
    assert_problem(&out, "upstream.url", "credentials in upstream.url");
    let run = run_cli(
        &["run", "--config", cfg.to_str().unwrap()],
        &[],
        CLI_TIMEOUT,
    );
    assert_problem(&run, "upstream.url", "run with credentials in upstream.url");
    for (what, o) in [("check", &out), ("run", &run)] {
        assert!(
            !o.stdout.contains("secret") && !o.stderr.contains("secret"),
            "{what} printed the password:\nstdout:\n{}\nstderr:\n{}",
            o.stdout,
            o.stderr
        );
    }
}

/// A rule that records responses with no scope at all passes `check` with a warning naming
/// `scope_headers`; the default config (scoped by `Authorization`) gets no such warning.
#[test]
fn recording_without_any_scope_is_a_warning() {
    let out = check_text(&config(&[("routes[0]", "scope_headers = []")]));
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    let all = format!("{}\n{}", out.stdout, out.stderr);
    let warning = all
        .lines()
        .find(|l| l.contains("routes[0].scope_headers"))
        .unwrap_or_else(|| panic!("no scope_headers warning:\n{all}"));
    assert!(
        warning.to_ascii_lowercase().contains("warn"),
        "not marked as a warning: {warning}"
    );

    let plain = check_text(&config(&[]));
    assert_eq!(plain.code(), Some(0), "stderr:\n{}", plain.stderr);
    let all = format!("{}\n{}", plain.stdout, plain.stderr);
    assert!(
        !all.contains("scope_headers"),
        "the default config got a scope warning:\n{all}"
    );
}

/// `scope_cookies`: the values of the named cookies scope the key like `scope_headers`, so two sessions
/// never share a key, while a retry of one session (other cookies aside) is replayed.
#[tokio::test]
async fn scope_cookies_separate_key_spaces() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .defaults("scope_headers = []\nscope_cookies = [\"session\"]")
        .start()
        .await;
    let addr = p.addr;
    let post = |cookie: &'static str| async move {
        send(
            addr,
            "POST",
            "/order",
            &[("Idempotency-Key", "cookie-1"), ("Cookie", cookie), TEXT],
            "one order",
        )
        .await
    };
    post("session=alice")
        .await
        .assert_forwarded(200, b"hit 1 POST /order");
    post("session=bob")
        .await
        .assert_forwarded(200, b"hit 2 POST /order");
    post("session=alice")
        .await
        .assert_replay(200, b"hit 1 POST /order");
    post("theme=dark; session=bob")
        .await
        .assert_replay(200, b"hit 2 POST /order");
    assert_eq!(up.hits_key("cookie-1"), 2);
}

/// The default `release_statuses` include 401 and 403: such an answer is passed on but not recorded,
/// so the same key is forwarded again (a forged request cannot burn a genuine client's key). A status
/// outside the list (400) is recorded and replayed.
#[tokio::test]
async fn default_release_statuses_include_401_and_403() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    for code in [401u16, 403] {
        let path = format!("/status/{code}");
        let key = format!("auth-{code}");
        let body = format!("status:{code}");
        for _ in 0..2 {
            post_key(p.addr, &path, &key, "x")
                .await
                .assert_forwarded(code, body.as_bytes());
        }
        assert_eq!(up.hits_key(&key), 2, "{code} was recorded");
    }
    for _ in 0..2 {
        let _ = post_key(p.addr, "/status/400", "auth-400", "x").await;
    }
    post_key(p.addr, "/status/400", "auth-400", "x")
        .await
        .assert_replay(400, b"status:400");
    assert_eq!(up.hits_key("auth-400"), 1);
}

/// URLs that `run` could not use are refused by `check` (exit 2), and a password a URL parser would
/// read as a path (`/`), query (`?`) or fragment (`#`) is never printed. (Found by review: a
/// non-numeric port fell back to port 80, and such passwords were logged.)
#[test]
fn malformed_urls_fail_check_without_printing_their_password() {
    let bin = env!("CARGO_BIN_EXE_idemproxy");
    let cases: [(&str, &str); 7] = [
        ("--upstream", "http://127.0.0.1:abc"),
        ("--upstream", "http://user:pa/secret@127.0.0.1:3001"),
        ("--upstream", "http://user:pa?secret@127.0.0.1:3001"),
        ("--upstream", "http://user:pa#secret@127.0.0.1:3001"),
        ("--redis-url", "redis://:secret@127.0.0.1:notaport/0"),
        ("--redis-url", "redis://:secret@127.0.0.1:6390/abc"),
        ("--redis-url", "redis://user:r3d/secret@127.0.0.1:6390/0"),
    ];
    for (flag, url) in cases {
        let out = std::process::Command::new(bin)
            .args(["check", flag, url])
            .env_remove("IDEMPROXY_UPSTREAM")
            .env_remove("IDEMPROXY_REDIS_URL")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{flag} {url}: {text}");
        let key = if flag == "--upstream" {
            "upstream.url"
        } else {
            "store.redis_url"
        };
        assert!(text.contains(key), "{flag} {url}: {text}");
        assert!(
            !text.contains("secret"),
            "{flag} {url} printed its password: {text}"
        );
    }
}
