//! Reading one value of each kind with its TOML path: addresses, file paths, durations and sizes (within
//! their bounds), header names.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use http::{HeaderName, Uri};

use crate::config::{
    bounds::{show_duration, show_size, Bounds},
    file::{Problems, RawSize, Section},
    redact_url,
};

pub(super) fn header_name(s: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(s.as_bytes()).ok()
}

/// An `http://` or `https://` URL with a host, a valid port, no query and no credentials (they would
/// be logged; `instead` says where they belong). The error is the reason, with the URL redacted
/// (rule 17).
pub(super) fn http_url(raw: &str, instead: &str) -> Result<Uri, String> {
    let shown = redact_url(raw);
    match raw.parse::<Uri>() {
        Ok(u) if !matches!(u.scheme_str(), Some("http" | "https")) => {
            Err(format!("\"{shown}\": the scheme must be http or https"))
        }
        Ok(u) if u.authority().is_some_and(|a| a.as_str().contains('@')) => Err(format!(
            "\"{shown}\": credentials in the URL are not allowed (they would be logged and sent in \
             Host); {instead}"
        )),
        Ok(u) if u.authority().is_none() => Err(format!("\"{shown}\": a host is required")),
        Ok(u) if !port_ok(u.authority().map_or("", |a| a.as_str())) => Err(format!(
            "\"{shown}\": the port must be a number from 1 to 65535"
        )),
        Ok(u) if u.query().is_some() => Err(format!("\"{shown}\": a query is not allowed")),
        Ok(u) => Ok(u),
        Err(e) => Err(format!("invalid URL \"{shown}\": {e}")),
    }
}

/// Whether an authority's port, if it has one, is a number from 1 to 65535 (`http::Uri` accepts
/// `host:abc` and then falls back to the scheme's port).
fn port_ok(authority: &str) -> bool {
    let host_end = authority.rfind(']').map_or(0, |i| i + 1);
    match authority[host_end..].rfind(':') {
        None => true,
        Some(i) => authority[host_end + i + 1..]
            .parse::<u16>()
            .is_ok_and(|p| p > 0),
    }
}

pub(super) fn addr(
    s: &mut Section,
    key: &str,
    default: &str,
    p: &mut Problems,
) -> Option<SocketAddr> {
    let raw = s.take_str(key, p).unwrap_or_else(|| default.to_owned());
    match raw.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push(
                s.path_of(key),
                format!("invalid address \"{raw}\" (expected IP:PORT, e.g. \"127.0.0.1:8080\")"),
            );
            None
        }
    }
}

/// A file path (PEM files). The files themselves are read when the proxy starts, where a missing or
/// unparsable one is reported with this key's path.
pub(super) fn file_path(s: &mut Section, key: &str, p: &mut Problems) -> Option<PathBuf> {
    let raw = s.take_str(key, p)?;
    if raw.is_empty() {
        p.push(s.path_of(key), "must not be empty (a path to a PEM file)");
    }
    Some(PathBuf::from(raw))
}

/// A duration within `b`, or `None` when the key is absent (or invalid: the problem is recorded).
pub(super) fn opt_duration(
    s: &mut Section,
    key: &str,
    b: Bounds<Duration>,
    p: &mut Problems,
) -> Option<Duration> {
    let raw = s.take_str(key, p)?;
    let Ok(d) = humantime::parse_duration(&raw) else {
        p.push(s.path_of(key), format!("invalid duration \"{raw}\""));
        return None;
    };
    if d.is_zero() && b.min > Duration::ZERO {
        p.push(s.path_of(key), "must be greater than zero");
        return None;
    }
    if !b.contains(d) {
        p.push(
            s.path_of(key),
            format!(
                "\"{raw}\" is out of range ({} to {})",
                show_duration(b.min),
                show_duration(b.max)
            ),
        );
        return None;
    }
    Some(d)
}

/// A duration within `b`, `default` when absent (or invalid: the problem is recorded).
pub(super) fn duration(
    s: &mut Section,
    key: &str,
    default: Duration,
    b: Bounds<Duration>,
    p: &mut Problems,
) -> Duration {
    opt_duration(s, key, b, p).unwrap_or(default)
}

/// A size within `b`; `default` when absent, `None` when invalid (the problem is recorded).
pub(super) fn size(
    s: &mut Section,
    key: &str,
    default: u64,
    b: Bounds<u64>,
    p: &mut Problems,
) -> Option<u64> {
    let bytes = match s.take_size(key, p) {
        None if s.has(key) => return None,
        None => return Some(default),
        Some(RawSize::Bytes(n)) => u64::try_from(n).ok(),
        Some(RawSize::Text(t)) => parse_size(&t),
    };
    let Some(bytes) = bytes else {
        p.push(
            s.path_of(key),
            "invalid size (expected bytes or a string like \"10MiB\")",
        );
        return None;
    };
    if !b.contains(bytes) {
        p.push(
            s.path_of(key),
            format!(
                "{bytes} bytes is out of range ({} to {})",
                show_size(b.min),
                show_size(b.max)
            ),
        );
        return None;
    }
    Some(bytes)
}

/// A count within `b`; `default` when absent, `None` when invalid (the problem is recorded).
pub(super) fn count(
    s: &mut Section,
    key: &str,
    default: u64,
    b: Bounds<u64>,
    p: &mut Problems,
) -> Option<u64> {
    let Some(n) = s.take_int(key, p) else {
        return (!s.has(key)).then_some(default);
    };
    match u64::try_from(n) {
        Ok(n) if b.contains(n) => Some(n),
        _ => {
            p.push(
                s.path_of(key),
                format!("{n} is out of range ({} to {})", b.min, b.max),
            );
            None
        }
    }
}

/// Parses `"10MiB"`, `"512KB"`, `"1024"`: B, KB/MB/GB (powers of 1000), KiB/MiB/GiB (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "kib" => 1 << 10,
        "mb" | "m" => 1_000_000,
        "mib" => 1 << 20,
        "gb" | "g" => 1_000_000_000,
        "gib" => 1 << 30,
        "tb" | "t" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}
