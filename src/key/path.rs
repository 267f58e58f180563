//! Request paths as idemproxy compares them (contract rule 13).
//!
//! Two spellings of one resource must never look like two resources: the upstream, like most
//! frameworks, treats `/v1//payments/a`, `/v1/%70ayments/a` and `/v1/x/../payments/a` as
//! `/v1/payments/a`, so a proxy that compared raw paths would let a retry bypass a route (and its
//! `required` key) or run twice under two store keys.
//!
//! - [`normalize`] is RFC 3986 §6.2.2 normalization: percent-encoded unreserved characters decoded, other
//!   escapes upper-cased, `//` merged, `.` and `..` segments resolved. The fingerprint uses it (the store
//!   key never contains the path, except through a `key = "fingerprint"` fingerprint). A malformed escape
//!   or an encoded NUL is refused (`invalid-path`): such a path cannot be compared safely.
//! - [`match_forms`] adds, for route matching only, a looser reading: every escape decoded (`%2F` is a
//!   `/` to many frameworks), `\` read as `/`, `;params` dropped from segments, and no trailing `/`.
//!   Globs are matched case-insensitively against each form, so a route that matches too much only adds
//!   protection, while the upstream still receives the path exactly as the client sent it.

use std::borrow::Cow;

/// Why a request path was refused (400 `invalid-path`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    /// `%00`: an encoded NUL byte.
    #[error("the path encodes a NUL byte")]
    EncodedNul,
    /// Read strictly and loosely (`%2F` as `/`, `;params`, `\`), the path falls under two different
    /// routes, one of which would protect the request.
    #[error(
        "the path reads as two different routes (an encoded '/', a ';' or a '\\'); send it plainly"
    )]
    Ambiguous,
}

/// The RFC 3986 §6.2.2 normal form of a path (no query). Paths that are not absolute (`*`) are returned
/// as they are.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    // The common case costs one scan and no allocation.
    if !path.contains('%') && !has_dot_or_empty_segment(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&merge_slashes(&decoded))))
}

/// The forms of a normalized path that route globs are matched against (case-insensitively): the
/// normal form and the loose one (see the module docs), each without a trailing `/` (except the root).
pub fn match_forms(normal: &str) -> [String; 2] {
    let strict = trim_slash(normal).to_owned();
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(normal).collect();
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let no_params: String = decoded
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/");
    let loose = remove_dot_segments(&merge_slashes(&no_params));
    [strict, trim_slash(&loose).to_owned()]
}

/// The path as a `key = "fingerprint"` key sees it: the loose form of [`match_forms`], lower-cased,
/// so that every spelling route matching folds together is one key.
pub fn key_form(normal: &str) -> String {
    let [_, loose] = match_forms(normal);
    loose.to_lowercase()
}

/// `p` without a trailing `/` (the root stays `/`).
pub fn trim_slash(p: &str) -> &str {
    match p.strip_suffix('/') {
        Some(rest) if !rest.is_empty() => rest,
        _ => p,
    }
}

/// Whether the path has a `.`/`..` segment or an empty one (`//`).
fn has_dot_or_empty_segment(path: &str) -> bool {
    path.contains("//") || path.split('/').any(|seg| seg == "." || seg == "..")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes escapes of unreserved characters and upper-cases the others (RFC 3986 §6.2.2.1–2).
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            // A `&str` cut at ASCII bytes stays valid UTF-8: copy up to the next `%`.
            let end = b[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(b.len(), |n| i + n);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let byte = hi << 4 | lo;
        if byte == 0 {
            return Err(PathError::EncodedNul);
        }
        if is_unreserved(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
        }
        i += 3;
    }
    Ok(out)
}

fn merge_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// RFC 3986 §5.2.4 on an absolute path whose slashes are already merged: `.` segments dropped, `..`
/// removes the segment before it (never above the root). A trailing `.` or `..` leaves a trailing `/`.
fn remove_dot_segments(p: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    let parts: Vec<&str> = p.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in parts.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                segs.pop();
                trailing_slash = i == last;
            }
            s => {
                segs.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(p.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p).unwrap().into_owned()
    }

    #[test]
    fn rfc3986_normal_form() {
        assert_eq!(n("/v1/payments/a"), "/v1/payments/a");
        assert_eq!(n("/v1//payments/a"), "/v1/payments/a");
        assert_eq!(n("/v1/%70ayments/a"), "/v1/payments/a");
        assert_eq!(n("/v1/./payments/a"), "/v1/payments/a");
        assert_eq!(n("/v1/x/../payments/a"), "/v1/payments/a");
        assert_eq!(n("/v1/%2E%2E/v1/payments/a"), "/v1/payments/a");
        assert_eq!(n("/../../a"), "/a");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/."), "/a/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("//"), "/");
        assert_eq!(n("/a%2fb"), "/a%2Fb", "reserved escapes stay, upper-cased");
        assert_eq!(n("/%7e%41"), "/~A");
        assert_eq!(n("/caf%C3%A9"), "/caf%C3%A9");
        assert_eq!(
            n("/a/"),
            "/a/",
            "the trailing slash is part of the normal form"
        );
        assert_eq!(n("*"), "*");
    }

    #[test]
    fn unnormalizable_paths_are_refused() {
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%00b"), Err(PathError::EncodedNul));
    }

    #[test]
    fn normal_paths_are_not_copied() {
        assert!(matches!(
            normalize("/v1/payments/a-b_c~d.e"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize("/v1/payments/"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/v1//x"), Ok(Cow::Owned(_))));
    }

    #[test]
    fn match_forms_are_loose() {
        assert_eq!(
            match_forms("/v1/payments/a/"),
            ["/v1/payments/a", "/v1/payments/a"]
        );
        assert_eq!(match_forms("/"), ["/", "/"]);
        assert_eq!(match_forms("/v1%2Fpayments%2Fa")[1], "/v1/payments/a");
        assert_eq!(
            match_forms("/v1/payments;jsessionid=1/a")[1],
            "/v1/payments/a"
        );
        assert_eq!(match_forms("/v1\\payments\\a")[1], "/v1/payments/a");
        assert_eq!(match_forms("/x/%2E%2E%2Fv1/payments")[1], "/v1/payments");
    }

    #[test]
    fn spellings_of_one_path_have_one_key_form() {
        let want = key_form("/fp/a");
        for p in [
            "/fp/a/", "/FP/a", "/fp/A", "/fp%2Fa", "/fp/a;x", "/fp\\a", "/fp//a", "/fp/%61",
        ] {
            assert_eq!(key_form(&n(p)), want, "{p}");
        }
        assert_ne!(key_form("/fp/b"), want);
    }

    proptest::proptest! {
        /// Normalizing twice changes nothing, and the result never keeps a dot segment or `//`.
        #[test]
        fn normalize_is_idempotent(p in "/[a-zA-Z0-9./%~_;-]{0,40}") {
            if let Ok(once) = normalize(&p) {
                let twice = normalize(&once).unwrap().into_owned();
                proptest::prop_assert_eq!(&twice, &*once);
                proptest::prop_assert!(!once.contains("//"));
                proptest::prop_assert!(!once.split('/').any(|s| s == "." || s == ".."));
            }
        }
    }
}
