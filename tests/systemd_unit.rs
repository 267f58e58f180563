//! `packaging/idemproxy.service`, the systemd unit for hosts without containers:
//!
//! - systemd's own judge of its sandboxing, `systemd-analyze security --offline=true`, rates its
//!   exposure 2.0 or lower ("OK": DynamicUser, ProtectSystem=strict, no capabilities, a system-call
//!   filter, ...);
//! - the commands it runs are the real binary's: `ExecStartPre`'s `check` and `ExecStart`'s `run`,
//!   with the packaged config (`config/idemproxy.toml`) and a state directory, pass and serve a replay;
//!   `ExecReload` is a SIGHUP, which the running proxy takes without stopping.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{post_key, Proxy, Upstream};

const UNIT: &str = include_str!("../packaging/idemproxy.service");

/// The value of `key=` in the unit (the first one).
fn directive(key: &str) -> &'static str {
    UNIT.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
}

#[test]
fn systemd_rates_the_units_sandbox_ok() {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("idemproxy.service");
    std::fs::write(&unit, UNIT).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("running systemd-analyze (Debian's systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for idemproxy.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(level <= 2.0, "exposure {level}:\n{text}");
    for must in [
        "DynamicUser=yes",
        "StateDirectory=idemproxy",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(UNIT.lines().any(|l| l == must), "the unit lost {must}");
    }
}

#[tokio::test]
async fn the_units_commands_check_and_run_the_packaged_config() {
    let bin = env!("CARGO_BIN_EXE_idemproxy");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/idemproxy.toml");
    let state = tempfile::tempdir().unwrap();
    let args = |line: &str| -> Vec<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "/usr/bin/idemproxy", "{line}");
        words[1..]
            .iter()
            .map(|w| match *w {
                "/etc/idemproxy/idemproxy.toml" => config.display().to_string(),
                "/var/lib/idemproxy" => state.path().display().to_string(),
                w => w.to_owned(),
            })
            .collect()
    };

    // ExecStartPre: the packaged config passes `check` with the unit's flags.
    let check = args(directive("ExecStartPre"));
    assert_eq!(check[0], "check");
    let out = Command::new(bin).args(&check).output().unwrap();
    assert!(
        out.status.success(),
        "{check:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ExecStart: `run` with the same flags serves (the test's own ports and upstream on top).
    let run = args(directive("ExecStart"));
    assert_eq!(run[0], "run");
    let up = Upstream::start();
    let text = std::fs::read_to_string(&config).unwrap();
    let mut builder = Proxy::builder(up.url()).raw_config(&text);
    for a in &run[3..] {
        builder = builder.arg(a);
    }
    let upstream = up.url();
    for a in [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.as_str(),
    ] {
        builder = builder.arg(a);
    }
    let p = builder.start().await;
    post_key(p.addr, "/echo", "unit-1", "x")
        .await
        .assert_forwarded(201, b"x");
    post_key(p.addr, "/echo", "unit-1", "x")
        .await
        .assert_replay(201, b"x");
    assert!(
        state.path().read_dir().unwrap().next().is_some(),
        "nothing in the state directory"
    );

    // ExecReload: a SIGHUP, taken without stopping.
    assert_eq!(directive("ExecReload"), "/bin/kill -HUP $MAINPID");
    let mark = p.log_mark();
    p.sighup();
    p.wait_log(mark, Duration::from_secs(10), "the reload", |l| {
        l.contains("config reloaded")
    })
    .await;
    post_key(p.addr, "/echo", "unit-1", "x")
        .await
        .assert_replay(201, b"x");
}
