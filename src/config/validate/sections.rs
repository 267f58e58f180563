//! `[server]`, `[upstream]`, `[admin]` and `[telemetry]`.

use std::net::IpAddr;

use ipnet::IpNet;

use super::values::{addr, count, duration, file_path, http_url, size};
use crate::config::{
    bounds,
    defaults::*,
    file::{Problems, Section},
    AdminConfig, CertKey, ServerConfig, TelemetryConfig, TlsConfig, UpstreamConfig,
};

pub(super) fn read_server(mut s: Section, p: &mut Problems) -> Option<ServerConfig> {
    let listen = addr(&mut s, "listen", DEFAULT_LISTEN, p);
    let max_request_body = size(
        &mut s,
        "max_request_body",
        DEFAULT_MAX_REQUEST_BODY,
        bounds::MAX_REQUEST_BODY,
        p,
    );
    let max_response_body = size(
        &mut s,
        "max_response_body",
        DEFAULT_MAX_RESPONSE_BODY,
        bounds::MAX_RESPONSE_BODY,
        p,
    );
    let request_timeout = duration(
        &mut s,
        "request_timeout",
        DEFAULT_REQUEST_TIMEOUT,
        bounds::REQUEST_TIMEOUT,
        p,
    );
    let header_read_timeout = duration(
        &mut s,
        "header_read_timeout",
        DEFAULT_HEADER_READ_TIMEOUT,
        bounds::HEADER_READ_TIMEOUT,
        p,
    );
    let shutdown_grace = duration(
        &mut s,
        "shutdown_grace",
        DEFAULT_SHUTDOWN_GRACE,
        bounds::SHUTDOWN_GRACE,
        p,
    );
    let idle_timeout = duration(
        &mut s,
        "idle_timeout",
        DEFAULT_IDLE_TIMEOUT,
        bounds::IDLE_TIMEOUT,
        p,
    );
    let max_connections = count(
        &mut s,
        "max_connections",
        DEFAULT_MAX_CONNECTIONS,
        bounds::MAX_CONNECTIONS,
        p,
    );
    let trusted_proxies = trusted_proxies(&mut s, p);
    let tls = s.take_table("tls", p).and_then(|mut t| {
        let cert = file_path(&mut t, "cert", p);
        let key = file_path(&mut t, "key", p);
        let client_ca = file_path(&mut t, "client_ca", p);
        let handshake_timeout = duration(
            &mut t,
            "handshake_timeout",
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            bounds::HANDSHAKE_TIMEOUT,
            p,
        );
        if cert.is_none() {
            p.push(t.path_of("cert"), "missing: TLS needs both cert and key");
        }
        if key.is_none() {
            p.push(t.path_of("key"), "missing: TLS needs both cert and key");
        }
        t.finish(p);
        Some(TlsConfig {
            cert: cert?,
            key: key?,
            client_ca,
            handshake_timeout,
        })
    });
    s.finish(p);
    Some(ServerConfig {
        listen: listen?,
        max_request_body: max_request_body?,
        max_response_body: max_response_body?,
        request_timeout,
        header_read_timeout,
        shutdown_grace,
        idle_timeout,
        max_connections: usize::try_from(max_connections?).ok()?,
        trusted_proxies: trusted_proxies?,
        tls,
    })
}

/// `trusted_proxies`: CIDR blocks (`10.0.0.0/8`) or single addresses.
fn trusted_proxies(s: &mut Section, p: &mut Problems) -> Option<Vec<IpNet>> {
    let Some(list) = s.take_str_list("trusted_proxies", p) else {
        return (!s.has("trusted_proxies")).then(Vec::new);
    };
    let mut out = Vec::with_capacity(list.len());
    let mut ok = true;
    for (i, item) in list.iter().enumerate() {
        let net = item
            .parse::<IpNet>()
            .or_else(|_| item.parse::<IpAddr>().map(IpNet::from));
        match net {
            Ok(n) => out.push(n.trunc()),
            Err(_) => {
                ok = false;
                p.push(
                    format!("{}[{i}]", s.path_of("trusted_proxies")),
                    format!("\"{item}\" is not an IP address or CIDR block (e.g. \"10.0.0.0/8\")"),
                );
            }
        }
    }
    ok.then_some(out)
}

pub(super) fn read_upstream(mut s: Section, p: &mut Problems) -> Option<UpstreamConfig> {
    let raw = s
        .take_str("url", p)
        .unwrap_or_else(|| DEFAULT_UPSTREAM.to_owned());
    // Never echoed with its credentials (rule 17): `http_url`'s errors show the URL redacted.
    let url = match http_url(&raw, "have the client send Authorization instead") {
        Ok(u) => Some(u),
        Err(e) => {
            p.push(s.path_of("url"), e);
            None
        }
    };
    let connect_timeout = duration(
        &mut s,
        "connect_timeout",
        DEFAULT_CONNECT_TIMEOUT,
        bounds::CONNECT_TIMEOUT,
        p,
    );
    let timeout = duration(
        &mut s,
        "timeout",
        DEFAULT_UPSTREAM_TIMEOUT,
        bounds::UPSTREAM_TIMEOUT,
        p,
    );
    let max_concurrency = count(
        &mut s,
        "max_concurrency",
        DEFAULT_MAX_CONCURRENCY,
        bounds::MAX_CONCURRENCY,
        p,
    );
    let ca_file = file_path(&mut s, "ca_file", p);
    let client_cert = file_path(&mut s, "client_cert", p);
    let client_key = file_path(&mut s, "client_key", p);
    let client_auth = match (client_cert, client_key) {
        (Some(cert), Some(key)) => Some(CertKey { cert, key }),
        (Some(_), None) => {
            p.push(
                s.path_of("client_key"),
                "missing: client_cert needs client_key (both or neither)",
            );
            None
        }
        (None, Some(_)) => {
            p.push(
                s.path_of("client_cert"),
                "missing: client_key needs client_cert (both or neither)",
            );
            None
        }
        (None, None) => None,
    };
    s.finish(p);
    Some(UpstreamConfig {
        url: url?,
        connect_timeout,
        timeout,
        max_concurrency: usize::try_from(max_concurrency?).ok()?,
        ca_file,
        client_auth,
    })
}

pub(super) fn read_admin(mut s: Section, p: &mut Problems) -> Option<AdminConfig> {
    let listen = addr(&mut s, "listen", DEFAULT_ADMIN_LISTEN, p);
    let token = s.take_str("token", p);
    if token.as_deref() == Some("") {
        p.push(
            s.path_of("token"),
            "must not be empty (leave it out to disable /admin/*)",
        );
    }
    s.finish(p);
    Some(AdminConfig {
        listen: listen?,
        token: token.filter(|t| !t.is_empty()),
    })
}

pub(super) fn read_telemetry(mut s: Section, p: &mut Problems) -> Option<TelemetryConfig> {
    let raw = s.take_str("otlp_endpoint", p);
    let path = s.path_of("otlp_endpoint");
    s.finish(p);
    let Some(raw) = raw else {
        return Some(TelemetryConfig::default());
    };
    match http_url(&raw, "set OTEL_EXPORTER_OTLP_HEADERS instead") {
        Ok(_) => Some(TelemetryConfig {
            otlp_endpoint: Some(raw.trim_end_matches('/').to_owned()),
        }),
        Err(e) => {
            p.push(path, e);
            None
        }
    }
}
