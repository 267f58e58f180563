//! `idemproxy health`: a health probe for container runtimes that have no shell or curl in the image
//! (the distroless image's `HEALTHCHECK CMD ["/usr/local/bin/idemproxy", "health"]`).
//!
//! It sends one `GET` to the admin listener's `/healthz` and exits `0` when the answer is `200`, `1` for
//! anything else: another status, a refused or reset connection, no answer within the timeout, or a URL
//! or config it cannot use. It never exits `2`, which Docker reserves.
//!
//! Which URL is probed, first match wins:
//! 1. `--url` / `IDEMPROXY_HEALTH_URL`, verbatim (plain `http://` only: the admin listener has no TLS);
//! 2. `http://ADDR/healthz` with ADDR from `--admin-listen` / `IDEMPROXY_ADMIN_LISTEN`;
//! 3. the same with `admin.listen` of `--config` / `IDEMPROXY_CONFIG` (the image sets that variable, so a
//!    config that moves the admin port keeps its health check working);
//! 4. `http://127.0.0.1:9090/healthz`, the built-in admin address.
//!
//! A wildcard listen address (`0.0.0.0`, `[::]`) is probed on the matching loopback address.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use bytes::Bytes;
use clap::Args;
use http::{header, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::defaults::DEFAULT_ADMIN_LISTEN;

/// Bound on the whole probe (connect, request, response head) when `--timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The admin endpoint probed when only an address is known.
pub const HEALTH_PATH: &str = "/healthz";

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL, timeout or config could not be used.
    #[error("{0}")]
    Setup(String),
    /// No TCP connection (refused, unreachable, name not resolved).
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// `host:port` that was dialled.
        target: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The connection was made but the HTTP exchange failed.
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    /// Nothing complete within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Options of `idemproxy health` (see [`target`] for how the URL is chosen).
#[derive(Debug, Args, Clone)]
pub struct HealthArgs {
    /// URL to GET [default: /healthz on the admin listener of --config, else http://127.0.0.1:9090/healthz].
    #[arg(long, env = "IDEMPROXY_HEALTH_URL")]
    pub url: Option<String>,
    /// Bound on the whole probe, e.g. 500ms [default: 2s].
    #[arg(long, env = "IDEMPROXY_HEALTH_TIMEOUT")]
    pub timeout: Option<String>,
    /// Config whose admin.listen is probed when no URL is given.
    #[arg(long, short, env = "IDEMPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin address to probe when no URL is given (overrides admin.listen).
    #[arg(long, env = "IDEMPROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
}

/// Runs `idemproxy health`: probe, print one line, and map the outcome to the exit code.
pub fn main(args: &HealthArgs) -> ExitCode {
    let outcome = match target(args) {
        Ok((url, timeout)) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(probe(&url, timeout)).map(|s| (url, s)),
            Err(e) => Err(ProbeError::Setup(format!("cannot start the runtime: {e}"))),
        },
        Err(e) => Err(e),
    };
    match outcome {
        Ok((url, status)) if status == StatusCode::OK => {
            println!("healthy: GET {url} answered {status}");
            ExitCode::SUCCESS
        }
        Ok((url, status)) => {
            eprintln!("unhealthy: GET {url} answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The URL to probe and the timeout, from the arguments (see the module docs for the order).
pub fn target(args: &HealthArgs) -> Result<(Uri, Duration), ProbeError> {
    let timeout = parse_timeout(args.timeout.as_deref())?;
    let url = match non_empty(args.url.as_deref()) {
        Some(u) => parse_url(u)?,
        None => {
            let listen = match non_empty(args.admin_listen.as_deref()) {
                Some(a) => a.to_owned(),
                None => match args.config.as_deref().filter(|p| !p.as_os_str().is_empty()) {
                    Some(path) => admin_listen_in(path)?,
                    None => DEFAULT_ADMIN_LISTEN.to_owned(),
                },
            };
            let addr: SocketAddr = listen.parse().map_err(|_| {
                ProbeError::Setup(format!(
                    "admin address \"{listen}\" is not IP:PORT; pass --url instead"
                ))
            })?;
            url_for(addr)?
        }
    };
    Ok((url, timeout))
}

/// `http://ADDR/healthz` for an admin listen address; wildcard addresses become loopback.
pub fn url_for(listen: SocketAddr) -> Result<Uri, ProbeError> {
    if listen.port() == 0 {
        return Err(ProbeError::Setup(format!(
            "admin address {listen} has port 0 (chosen at start); pass --url with the real port"
        )));
    }
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    parse_url(&format!(
        "http://{}{HEALTH_PATH}",
        SocketAddr::new(ip, listen.port())
    ))
}

/// A probe URL: `http://HOST[:PORT][/PATH]`.
pub fn parse_url(raw: &str) -> Result<Uri, ProbeError> {
    let url: Uri = raw
        .parse()
        .map_err(|e| ProbeError::Setup(format!("invalid URL \"{raw}\": {e}")))?;
    let problem = match url.scheme_str() {
        Some("http") => None,
        Some(other) => Some(format!(
            "scheme {other} is not supported; the admin listener speaks plain http"
        )),
        None => Some("needs http:// and a host, e.g. http://127.0.0.1:9090/healthz".to_owned()),
    };
    if let Some(p) = problem {
        return Err(ProbeError::Setup(format!("URL \"{raw}\": {p}")));
    }
    if url.host().is_none_or(str::is_empty) {
        return Err(ProbeError::Setup(format!("URL \"{raw}\" has no host")));
    }
    Ok(url)
}

/// Sends `GET url` over a new connection and returns the response status; the whole exchange (name
/// lookup, connect, request, response head) is bounded by `timeout`. The body is not read.
pub async fn probe(url: &Uri, timeout: Duration) -> Result<StatusCode, ProbeError> {
    match tokio::time::timeout(timeout, exchange(url)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn exchange(url: &Uri) -> Result<StatusCode, ProbeError> {
    let authority = url
        .authority()
        .ok_or_else(|| ProbeError::Setup(format!("URL {url} has no host")))?;
    // `host()` keeps the brackets of an IPv6 literal.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let target = format!("{}:{port}", authority.host());
    let stream = match host.parse::<IpAddr>() {
        Ok(ip) => TcpStream::connect(SocketAddr::new(ip, port)).await,
        Err(_) => TcpStream::connect((host, port)).await,
    }
    .map_err(|source| ProbeError::Connect {
        target: target.clone(),
        source,
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task ends with the probe (this runtime is dropped right after).
    let conn = tokio::spawn(conn);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(
            header::USER_AGENT,
            concat!("idemproxy-health/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeError::Setup(format!("cannot build a request for {url}: {e}")))?;
    let resp = sender.send_request(req).await?;
    conn.abort();
    Ok(resp.status())
}

fn parse_timeout(raw: Option<&str>) -> Result<Duration, ProbeError> {
    let Some(raw) = non_empty(raw) else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match humantime::parse_duration(raw) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(ProbeError::Setup(format!(
            "invalid timeout \"{raw}\" (expected a duration such as \"2s\" or \"500ms\")"
        ))),
    }
}

/// `admin.listen` of a config file, or the built-in default when the file does not set it. Only that key is
/// read, so a problem elsewhere in the file does not fail the probe (`idemproxy check` reports those).
fn admin_listen_in(path: &Path) -> Result<String, ProbeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ProbeError::Setup(format!("cannot read config {}: {e}", path.display())))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ProbeError::Setup(format!(
            "config {} is not valid TOML: {}",
            path.display(),
            e.to_string().trim_end().replace('\n', " ")
        ))
    })?;
    match table.get("admin").and_then(|a| a.get("listen")) {
        None => Ok(DEFAULT_ADMIN_LISTEN.to_owned()),
        Some(toml::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ProbeError::Setup(format!(
            "config {}: admin.listen is {}, expected a string",
            path.display(),
            other.type_str()
        ))),
    }
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: Option<&str>, admin: Option<&str>, config: Option<&Path>) -> HealthArgs {
        HealthArgs {
            url: url.map(str::to_owned),
            timeout: None,
            config: config.map(Path::to_path_buf),
            admin_listen: admin.map(str::to_owned),
        }
    }

    #[test]
    fn default_is_the_builtin_admin_address() {
        let (url, timeout) = target(&args(None, None, None)).unwrap();
        assert_eq!(url.to_string(), "http://127.0.0.1:9090/healthz");
        assert_eq!(timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn explicit_url_wins_over_everything() {
        let (url, _) = target(&args(
            Some("http://10.0.0.1:1234/x?y=1"),
            Some("0.0.0.0:9999"),
            Some(Path::new("/nonexistent.toml")),
        ))
        .unwrap();
        assert_eq!(url.to_string(), "http://10.0.0.1:1234/x?y=1");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let (url, _) = target(&args(Some(" "), Some(""), None)).unwrap();
        assert_eq!(url.to_string(), "http://127.0.0.1:9090/healthz");
    }

    #[test]
    fn wildcard_addresses_are_probed_on_loopback() {
        let (v4, _) = target(&args(None, Some("0.0.0.0:9191"), None)).unwrap();
        assert_eq!(v4.to_string(), "http://127.0.0.1:9191/healthz");
        let (v6, _) = target(&args(None, Some("[::]:9191"), None)).unwrap();
        assert_eq!(v6.to_string(), "http://[::1]:9191/healthz");
        let (specific, _) = target(&args(None, Some("10.1.2.3:9090"), None)).unwrap();
        assert_eq!(specific.to_string(), "http://10.1.2.3:9090/healthz");
    }

    #[test]
    fn admin_listen_comes_from_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let with = dir.path().join("with.toml");
        std::fs::write(&with, "[admin]\nlisten = \"0.0.0.0:9444\"\n").unwrap();
        let (url, _) = target(&args(None, None, Some(&with))).unwrap();
        assert_eq!(url.to_string(), "http://127.0.0.1:9444/healthz");
        // The variable beats the file, as it does for `run`.
        let (url, _) = target(&args(None, Some("127.0.0.1:9555"), Some(&with))).unwrap();
        assert_eq!(url.to_string(), "http://127.0.0.1:9555/healthz");
        let without = dir.path().join("without.toml");
        std::fs::write(&without, "[server]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
        let (url, _) = target(&args(None, None, Some(&without))).unwrap();
        assert_eq!(url.to_string(), "http://127.0.0.1:9090/healthz");
    }

    #[test]
    fn unusable_inputs_are_errors() {
        for (url, admin) in [
            (Some("https://127.0.0.1:9090/healthz"), None),
            (Some("127.0.0.1:9090/healthz"), None),
            (Some("not a url"), None),
            (None, Some("localhost:9090")),
            (None, Some("127.0.0.1:0")),
        ] {
            assert!(
                matches!(target(&args(url, admin, None)), Err(ProbeError::Setup(_))),
                "{url:?} {admin:?} should be refused"
            );
        }
        let missing = target(&args(
            None,
            None,
            Some(Path::new("/nonexistent/idemproxy.toml")),
        ));
        assert!(matches!(missing, Err(ProbeError::Setup(_))));
        let mut bad_timeout = args(None, None, None);
        bad_timeout.timeout = Some("soon".into());
        assert!(matches!(target(&bad_timeout), Err(ProbeError::Setup(_))));
        bad_timeout.timeout = Some("0s".into());
        assert!(matches!(target(&bad_timeout), Err(ProbeError::Setup(_))));
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = parse_url(&format!("http://127.0.0.1:{port}/healthz")).unwrap();
        let r = probe(&url, Duration::from_secs(5)).await;
        assert!(matches!(r, Err(ProbeError::Connect { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout() {
        // Accepts (the kernel backlog does) but never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = parse_url(&format!(
            "http://{}/healthz",
            listener.local_addr().unwrap()
        ))
        .unwrap();
        let r = probe(&url, Duration::from_millis(300)).await;
        assert!(matches!(r, Err(ProbeError::Timeout(_))), "{r:?}");
    }
}
