//! The config's JSON Schema (draft-07), rendered from [`super::schema`]: what editors with TOML schema
//! support (Taplo / Even Better TOML, for example) use to complete and check `idemproxy.toml`. The
//! checked-in `idemproxy.schema.json` is this output (`tests/json_schema.rs` keeps them equal;
//! `UPDATE_SCHEMA=1` rewrites it).

use serde_json::{json, Map, Value};

use super::{
    bounds::Bounds,
    schema::{readable, Key, Kind, Shown, KEYS, ROUTE_KEYS, RULE_KEYS},
};

/// The whole schema.
pub fn json_schema() -> Value {
    let mut root = table(
        "idemproxy configuration: every key is optional (see the README's configuration reference)",
    );
    for k in KEYS {
        insert(&mut root, k.path, property(k));
    }
    let rules = || {
        let mut t = Map::new();
        for k in RULE_KEYS {
            t.insert(k.path.to_owned(), property(k));
        }
        t
    };
    // `[defaults]` has every rule but `enabled` (routes only).
    let mut defaults = rules();
    defaults.remove("enabled");
    if let Some(Value::Object(d)) = root
        .get_mut("properties")
        .and_then(|p| p.get_mut("defaults"))
    {
        d.insert("properties".into(), Value::Object(defaults));
    }
    let mut route = rules();
    for k in ROUTE_KEYS {
        route.insert(k.path.to_owned(), property(k));
    }
    let routes = json!({
        "type": "array",
        "description": "Routes, first match wins: each has a unique `name`, a `path` glob and any rule, inheriting the rest from [defaults].",
        "items": {
            "type": "object",
            "additionalProperties": false,
            "required": ["name", "path"],
            "properties": route,
        },
    });
    if let Value::Object(p) = &mut root["properties"] {
        p.insert("routes".into(), routes);
    }
    root["$schema"] = json!("http://json-schema.org/draft-07/schema#");
    root["$id"] = json!("https://github.com/idemproxy/idemproxy/idemproxy.schema.json");
    root["title"] = json!("idemproxy.toml");
    root
}

/// An object that allows only the properties it lists.
fn table(doc: &str) -> Value {
    json!({ "type": "object", "additionalProperties": false, "description": doc, "properties": {} })
}

/// Puts `value` at the dotted `path` under `root`'s properties (`KEYS` lists each table before its
/// keys, so the tables on the way exist).
fn insert(root: &mut Value, path: &str, value: Value) {
    let (parents, last) = path.rsplit_once('.').map_or(("", path), |(p, l)| (p, l));
    let mut at = root;
    for part in parents.split('.').filter(|p| !p.is_empty()) {
        at = &mut at["properties"][part];
    }
    at["properties"][last] = value;
}

fn property(k: &Key) -> Value {
    let mut v = match k.kind {
        Kind::Table => table(k.doc),
        Kind::Duration(b) => json!({
            "type": "string",
            "pattern": r"^\s*[0-9]+\s*[a-zA-Z]+(\s*[0-9]+\s*[a-zA-Z]+)*\s*$",
            "description": format!("{} — a duration such as \"500ms\", \"60s\", \"24h\"; {}", k.doc, duration_range(b)),
        }),
        Kind::Size(b) => json!({
            "oneOf": [
                { "type": "integer", "minimum": b.min, "maximum": b.max },
                { "type": "string", "pattern": r"^\s*[0-9]+\s*([kKmMgGtT]i?[bB]|[bB])?\s*$" },
            ],
            "description": format!("{} — bytes, or a string such as \"512KiB\", \"10MiB\"; from {} to {} bytes", k.doc, b.min, b.max),
        }),
        Kind::Count(b) => json!({ "type": "integer", "minimum": b.min, "maximum": b.max }),
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::Str | Kind::Path => json!({ "type": "string" }),
        Kind::Address => json!({ "type": "string", "description": format!("{} — IP:PORT", k.doc) }),
        Kind::Url => json!({ "type": "string", "format": "uri" }),
        Kind::OneOf(values) => json!({ "type": "string", "enum": values }),
        Kind::Strings => json!({ "type": "array", "items": { "type": "string" } }),
        Kind::Statuses => {
            json!({ "type": "array", "items": { "type": "integer", "minimum": 100, "maximum": 599 } })
        }
        Kind::Status => json!({ "type": "integer", "minimum": 100, "maximum": 599 }),
    };
    if v.get("description").is_none() {
        v["description"] = json!(k.doc);
    }
    if let Some(d) = default(k.default) {
        v["default"] = d;
    }
    v
}

fn duration_range(b: Bounds<std::time::Duration>) -> String {
    format!("from {} to {}", readable(b.min), readable(b.max))
}

fn default(d: Shown) -> Option<Value> {
    Some(match d {
        Shown::None | Shown::Explained(_) => return None,
        Shown::Duration(d) => json!(readable(d)),
        Shown::Size(n) | Shown::Count(n) => json!(n),
        Shown::Bool(b) => json!(b),
        Shown::Str(s) => json!(s),
        Shown::Strings(v) => json!(v),
        Shown::Statuses(v) => json!(v),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_key_is_a_property_at_its_path() {
        let s = json_schema();
        for k in KEYS {
            let mut at = &s;
            for part in k.path.split('.') {
                at = &at["properties"][part];
            }
            assert!(at.is_object(), "{} missing from the JSON schema", k.path);
        }
        let route = &s["properties"]["routes"]["items"]["properties"];
        for k in RULE_KEYS.iter().chain(ROUTE_KEYS) {
            assert!(route[k.path].is_object(), "routes[].{} missing", k.path);
        }
        assert!(s["properties"]["defaults"]["properties"]["enabled"].is_null());
        assert_eq!(
            s["properties"]["server"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            s["properties"]["defaults"]["properties"]["ttl"]["default"],
            json!("24h")
        );
    }
}
