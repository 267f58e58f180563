//! Errors of the Redis store and the parsing of script replies into records.

use super::*;

pub(super) fn backend_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        source: Box::new(e),
    }
}

/// A Redis error; `OOM` (`maxmemory` reached under `noeviction`) is the store being full, which the
/// proxy answers with 503 `store-full` (the Redis counterpart of `[store] max_size`).
pub(super) fn redis_err(e: RedisError) -> StoreError {
    if e.code() == Some("OOM") {
        return StoreError::Full(format!("Redis refused the write: {e}"));
    }
    backend_err(e)
}

pub(super) fn other_err(msg: String) -> StoreError {
    backend_err(std::io::Error::other(msg))
}

pub(super) fn unexpected(what: &str) -> StoreError {
    other_err(format!("unexpected reply from redis: {what}"))
}

/// A reply that has the wrong shape, described briefly (it may hold a whole response body).
pub(super) fn unexpected_value(v: &Value) -> StoreError {
    let described: String = format!("{v:?}").chars().take(120).collect();
    unexpected(&described)
}

pub(super) fn corrupt(what: &'static str) -> StoreError {
    StoreError::Corrupt(DecodeError::Corrupt(what))
}

/// A reply as bytes (the scripts answer strings, arrays of strings, or integers).
pub(super) fn bytes(v: Value) -> Result<Vec<u8>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(n) => Ok(n.to_string().into_bytes()),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected_value(&other)),
    }
}

pub(super) fn strings(v: Value) -> Result<Vec<Vec<u8>>, StoreError> {
    match v {
        Value::Array(items) => items.into_iter().map(bytes).collect(),
        other => Err(unexpected_value(&other)),
    }
}

pub(super) fn int(v: Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(n) => Ok(n),
        other => Err(unexpected_value(&other)),
    }
}

pub(super) fn num(b: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("number field of a redis record"))
}

/// The record in fields `s t c d e f r` as the scripts return them (`s` empty: no record).
pub(super) fn record(f: &[Vec<u8>]) -> Result<Option<Record>, StoreError> {
    let [s, t, c, d, e, fp, r] = f else {
        return Err(unexpected("record with a wrong number of fields"));
    };
    let fingerprint = || {
        <[u8; 32]>::try_from(fp.as_slice())
            .map(Fingerprint)
            .map_err(|_| corrupt("fingerprint field of a redis record"))
    };
    match s.as_slice() {
        b"" => Ok(None),
        b"f" => Ok(Some(Record::InFlight(InFlight {
            token: num(t)?,
            created_ms: num(c)?,
            deadline_ms: num(d)?,
            fingerprint: fingerprint()?,
        }))),
        b"c" => match Record::decode(r)? {
            Record::Completed(done) => Ok(Some(Record::Completed(Completed {
                created_ms: num(c)?,
                expires_ms: num(e)?,
                fingerprint: fingerprint()?,
                ..done
            }))),
            Record::InFlight(_) => Err(corrupt("completed redis record holds a claim")),
        },
        _ => Err(corrupt("unknown state of a redis record")),
    }
}

pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn pin_arg(pin: Option<&Arc<dyn Clock>>) -> String {
    pin.map(|c| c.now_ms().to_string()).unwrap_or_default()
}
