//! HTTP clients with a bounded time on every request: a hyper HTTP/1.1 client (one fresh TCP connection per
//! request) and a raw-TCP client for requests hyper would not send or for observing when a request was written.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Default bound on one request/response exchange.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A complete response: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The first value of header `name`, if it is valid text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }

    /// `Idempotent-Replayed: true` present.
    pub fn replayed(&self) -> bool {
        match self.header("idempotent-replayed") {
            None => false,
            Some("true") => true,
            Some(other) => panic!("unexpected Idempotent-Replayed value {other:?} in {self:?}"),
        }
    }

    /// A first answer forwarded from the upstream: `status`, `body`, and no replay marker.
    pub fn assert_forwarded(&self, status: u16, body: &[u8]) {
        assert_eq!(self.status, status, "status of forwarded response {self:?}");
        assert_eq!(
            &self.body[..],
            body,
            "body of forwarded response {self:?} (text {:?})",
            self.text()
        );
        assert!(
            !self.replayed(),
            "a first answer must not be marked replayed: {self:?}"
        );
    }

    /// A replay: `status`, `body`, and `Idempotent-Replayed: true`.
    pub fn assert_replay(&self, status: u16, body: &[u8]) {
        assert_eq!(self.status, status, "status of replay {self:?}");
        assert_eq!(
            &self.body[..],
            body,
            "body of replay {self:?} (text {:?})",
            self.text()
        );
        assert!(
            self.replayed(),
            "expected Idempotent-Replayed: true on {self:?}"
        );
    }

    /// An error the proxy made itself: RFC 9457 problem+json with `status` and `code`. Returns the JSON.
    pub fn assert_problem(&self, status: u16, code: &str) -> serde_json::Value {
        assert_eq!(
            self.status,
            status,
            "expected a {status} {code} problem, got {self:?} (body {:?})",
            self.text()
        );
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.starts_with("application/problem+json"),
            "problem Content-Type is {ct:?} in {self:?}"
        );
        let v = self.json();
        assert_eq!(v["code"], code, "problem code in {v}");
        assert_eq!(v["status"], status, "problem status member in {v}");
        for member in ["type", "title", "detail"] {
            assert!(
                v[member].is_string(),
                "problem member {member:?} missing or not a string in {v}"
            );
        }
        assert!(
            !self.replayed(),
            "a proxy-made error must not be marked replayed: {self:?}"
        );
        v
    }

    /// `Retry-After` as whole seconds; panics if absent or not delta-seconds.
    pub fn retry_after(&self) -> u64 {
        let v = self
            .header("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After in {self:?}"));
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After {v:?} is not delta-seconds in {self:?}"))
    }
}

/// Send one request over a new TCP connection and read the whole response; panics on any error or after
/// [`REQUEST_TIMEOUT`]. `Host` is set to `addr` unless given in `headers`.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl AsRef<[u8]>,
) -> Resp {
    match try_send(addr, method, path, headers, body).await {
        Ok(r) => r,
        Err(e) => panic!("{method} {path} to {addr} failed: {e}"),
    }
}

/// Like [`send`], but an error (connection refused, reset, timeout) is returned instead of panicking.
pub async fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl AsRef<[u8]>,
) -> Result<Resp, String> {
    let body = Bytes::copy_from_slice(body.as_ref());
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(addr, method, path, headers, body)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {REQUEST_TIMEOUT:?}")),
    }
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Resp, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut builder = hyper::Request::builder().method(method).uri(path);
    let mut has_host = false;
    for (n, v) in headers {
        has_host |= n.eq_ignore_ascii_case("host");
        let value = HeaderValue::from_bytes(v.as_bytes())
            .map_err(|e| format!("header {n}: {v:?} not sendable: {e}"))?;
        builder = builder.header(*n, value);
    }
    if !has_host {
        builder = builder.header("host", addr.to_string());
    }
    let req = builder
        .body(Full::new(body))
        .map_err(|e| format!("build request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading body: {e}"))?
        .to_bytes();
    drop(sender);
    conn.abort();
    Ok(Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// A raw TCP connection: write bytes exactly as given, then parse one HTTP/1.1 response by hand.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = super::wait::within(REQUEST_TIMEOUT, "raw connect", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("raw connect to {addr}: {e}"));
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Write `bytes`; when this returns, the request is in the kernel's hands (the server can read it).
    pub async fn write(&mut self, bytes: &[u8]) {
        super::wait::within(REQUEST_TIMEOUT, "raw write", async {
            self.stream.write_all(bytes).await.unwrap();
            self.stream.flush().await.unwrap();
        })
        .await;
    }

    /// Read one response (Content-Length, chunked, or until EOF).
    pub async fn read_response(&mut self) -> Resp {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.read_response_inner()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("raw response: {e}"),
            Err(_) => panic!("raw response: timed out after {REQUEST_TIMEOUT:?}"),
        }
    }

    async fn fill(&mut self) -> Result<usize, String> {
        let mut chunk = [0u8; 8192];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn read_line(&mut self) -> Result<String, String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(format!(
                    "EOF inside a line; have {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
        }
    }

    async fn read_exact_buf(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(format!("EOF after {} of {n} body bytes", self.buf.len()));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn read_response_inner(&mut self) -> Result<Resp, String> {
        let status_line = self.read_line().await?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(format!("bad status line {status_line:?}"));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut headers = HeaderMap::new();
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                break;
            }
            let (n, v) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header line {line:?}"))?;
            headers.append(
                HeaderName::from_bytes(n.trim().as_bytes()).map_err(|e| e.to_string())?,
                HeaderValue::from_str(v.trim()).map_err(|e| e.to_string())?,
            );
        }
        let chunked = headers
            .get("transfer-encoding")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if status == 204 || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else if chunked {
            let mut body = Vec::new();
            loop {
                let size_line = self.read_line().await?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .map_err(|e| format!("bad chunk size {size_line:?}: {e}"))?;
                if size == 0 {
                    // trailers until the empty line
                    while !self.read_line().await?.is_empty() {}
                    break;
                }
                body.extend(self.read_exact_buf(size).await?);
                self.read_line().await?;
            }
            body
        } else if let Some(len) = headers.get("content-length") {
            let len: usize = len
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| format!("bad content-length {len:?}"))?;
            self.read_exact_buf(len).await?
        } else {
            while self.fill().await? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(Resp {
            status,
            headers,
            body: Bytes::from(body),
        })
    }
}

/// Write `request` verbatim on a new connection and read one response.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Resp {
    let mut c = RawConn::connect(addr).await;
    c.write(request).await;
    c.read_response().await
}

/// Build the bytes of a simple HTTP/1.1 request with a Content-Length body.
pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n").into_bytes();
    for (n, v) in headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}
