//! JSON bodies: key extraction by RFC 6901 pointer, and canonical form for fingerprints.

use serde_json::Value;

/// Why a key could not be taken from a JSON body (400 `invalid-json-key`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonKeyError {
    /// The body is not JSON (or nests deeper than the parser allows).
    #[error("the request body is not valid JSON")]
    NotJson,
    /// The pointer names an object, array, boolean, null or a non-integer number.
    #[error("the value at the JSON pointer must be a string or an integer")]
    WrongType,
}

/// The key at `pointer` in a JSON body: `Ok(None)` when the body is JSON but has no such field.
pub fn json_pointer_key(body: &[u8], pointer: &str) -> Result<Option<String>, JsonKeyError> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| JsonKeyError::NotJson)?;
    match doc.pointer(pointer) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(_) => Err(JsonKeyError::WrongType),
    }
}

/// The canonical form of a JSON body (keys sorted, no whitespace), or `None` if it is not JSON.
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    // serde_json's map is a BTreeMap (no `preserve_order`), so serialising sorts keys.
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_values() {
        assert_eq!(
            json_pointer_key(br#"{"id":"evt_1"}"#, "/id"),
            Ok(Some("evt_1".into()))
        );
        assert_eq!(
            json_pointer_key(br#"{"id":42}"#, "/id"),
            Ok(Some("42".into()))
        );
        assert_eq!(
            json_pointer_key(br#"{"a":{"b":"x"}}"#, "/a/b"),
            Ok(Some("x".into()))
        );
        assert_eq!(json_pointer_key(br#"{"other":1}"#, "/id"), Ok(None));
        assert_eq!(
            json_pointer_key(br#"{"id":{}}"#, "/id"),
            Err(JsonKeyError::WrongType)
        );
        assert_eq!(
            json_pointer_key(br#"{"id":true}"#, "/id"),
            Err(JsonKeyError::WrongType)
        );
        assert_eq!(
            json_pointer_key(br#"{"id":1.5}"#, "/id"),
            Err(JsonKeyError::WrongType)
        );
        assert_eq!(
            json_pointer_key(b"not json", "/id"),
            Err(JsonKeyError::NotJson)
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert_eq!(
            json_pointer_key(deep.as_bytes(), "/0"),
            Err(JsonKeyError::NotJson)
        );
        assert_eq!(canonical_json(deep.as_bytes()), None);
    }
}
