//! The operations surface against a real Prometheus (Debian's `prometheus` and `promtool`):
//!
//! - `docker/alerts.yml` passes `promtool check rules`, and its unit tests (`docker/alerts.test.yml`)
//!   pass `promtool test rules`; `docker/prometheus.yml` passes `promtool check config`.
//! - A real Prometheus, started with `docker/prometheus.yml` (the target pointed at a live proxy's
//!   admin listener, a 1 s scrape interval), scrapes the proxy; `idemproxy_requests_total` is queried
//!   through its HTTP API and shows the requests the test sent, and the alert rules are loaded.
//! - Every query of the Grafana dashboard (`docker/grafana-dashboard.json`) names metrics that
//!   `/metrics` really exports, and runs on that Prometheus without an error.
//! - With matplotlib installed (`scripts/test.sh` installs it), `docker/render_dashboard.py` renders
//!   the dashboard from that Prometheus into a PNG.
//!
//! Prometheus must be installed (`scripts/test.sh` installs it as root on Debian); without it these
//! tests fail, they never skip.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, post_key, send, Proxy, Upstream};

const DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker");

fn promtool(args: &[&str]) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(DOCKER)
        .output()
        .expect("running promtool (Debian's prometheus package)")
}

#[test]
fn alert_rules_and_the_scrape_config_pass_promtool() {
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"],
        &["check", "config", "prometheus.yml"],
    ] {
        let out = promtool(args);
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus on 127.0.0.1 scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let shipped = std::fs::read_to_string(Path::new(DOCKER).join("prometheus.yml")).unwrap();
        assert!(
            shipped.contains("idemproxy:9090"),
            "docker/prometheus.yml lost its target"
        );
        let config = shipped
            .replace("idemproxy:9090", &target.to_string())
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        std::fs::copy(
            Path::new(DOCKER).join("alerts.yml"),
            dir.path().join("alerts.yml"),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus (Debian's prometheus package)");
        let url = format!("http://127.0.0.1:{port}");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually(
            Duration::from_secs(30),
            "prometheus to be ready",
            || async move {
                let r = common::try_send(addr, "GET", "/-/ready", &[], "")
                    .await
                    .ok()?;
                (r.status == 200).then_some(())
            },
        )
        .await;
        Prometheus { child, url, dir }
    }

    fn addr(&self) -> SocketAddr {
        self.url.trim_start_matches("http://").parse().unwrap()
    }

    /// `GET /api/v1/query?query=...`: the `data` of a successful answer.
    async fn query(&self, expr: &str) -> serde_json::Value {
        let q: String = url_encode(expr);
        let r = send(
            self.addr(),
            "GET",
            &format!("/api/v1/query?query={q}"),
            &[],
            "",
        )
        .await;
        let v = r.json();
        assert_eq!(v["status"], "success", "query {expr}: {v}");
        v["data"].clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `idemproxy_*` metric name in `expr`, histograms by their base name.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("idemproxy_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_proxy_and_the_dashboard_queries_its_metrics() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    for i in 0..5 {
        let key = format!("prom-{i}");
        post_key(p.addr, "/echo", &key, "x").await;
        post_key(p.addr, "/echo", &key, "x").await;
    }
    let prom = Prometheus::start(p.admin).await;

    // Scraped: the 5 forwarded and 5 replayed requests are there.
    let found =
        eventually(
            Duration::from_secs(30),
            "prometheus to scrape the proxy",
            || async {
                let data = prom
            .query("sum by (outcome) (idemproxy_requests_total{outcome=~\"forwarded|replayed\"})")
            .await;
                let got: Vec<(String, f64)> = data["result"]
                    .as_array()?
                    .iter()
                    .map(|s| {
                        (
                            s["metric"]["outcome"].as_str().unwrap_or("").to_owned(),
                            s["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0.0),
                        )
                    })
                    .collect();
                (got.len() == 2 && got.iter().all(|(_, v)| *v >= 5.0)).then_some(got)
            },
        )
        .await;
    assert_eq!(found.len(), 2, "{found:?}");

    // The alert rules are loaded and evaluated.
    let rules = send(prom.addr(), "GET", "/api/v1/rules", &[], "")
        .await
        .json();
    let names: Vec<&str> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names.len(), 5, "{rules}");

    // Every dashboard query names exported metrics and runs.
    let exported = p.admin_get("/metrics").await.text();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(DOCKER).join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            exprs += 1;
            for name in metric_names(expr) {
                assert!(
                    exported
                        .lines()
                        .any(|l| !l.starts_with('#') && l.starts_with(&name)),
                    "panel {:?}: {name} is not exported by /metrics",
                    panel["title"]
                );
            }
            prom.query(expr).await;
        }
    }
    assert!(exprs >= 10, "{exprs} queries");

    // The PNG, from real data, where matplotlib is installed.
    let have_matplotlib = Command::new("python3")
        .args(["-c", "import matplotlib"])
        .status()
        .is_ok_and(|s| s.success());
    if have_matplotlib {
        let png: PathBuf = prom.dir.path().join("dashboard.png");
        let out = Command::new("python3")
            .arg(Path::new(DOCKER).join("render_dashboard.py"))
            .args(["--prometheus", &prom.url, "--minutes", "1", "--step", "1"])
            .arg("--out")
            .arg(&png)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "render_dashboard.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    } else {
        eprintln!("matplotlib not installed: the dashboard PNG was not rendered");
    }
}
