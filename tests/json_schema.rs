//! `idemproxy.schema.json` (the JSON Schema editors use to complete and check `idemproxy.toml`) is
//! exactly what `config::json_schema` renders from the declared config, and it accepts every example
//! config shipped in `config/` while refusing keys the proxy does not know.
//! `UPDATE_SCHEMA=1 cargo test --test json_schema` rewrites the file.

#![allow(clippy::unwrap_used)]

use serde_json::Value;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/idemproxy.schema.json");

#[test]
fn the_checked_in_schema_is_the_rendered_one() {
    let rendered = serde_json::to_string_pretty(&idemproxy::config::json_schema::json_schema())
        .unwrap()
        + "\n";
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(PATH, &rendered).unwrap();
    }
    let on_disk = std::fs::read_to_string(PATH).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "idemproxy.schema.json differs from config::schema (UPDATE_SCHEMA=1 cargo test --test json_schema rewrites it)"
    );
}

/// The subset of JSON Schema the rendered schema uses: type, properties, additionalProperties,
/// required, items, enum, minimum, maximum, oneOf. Returns every problem with its path.
fn check(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(alts) = schema["oneOf"].as_array() {
        let ok = alts.iter().filter(|a| {
            let mut e = Vec::new();
            check(a, v, path, &mut e);
            e.is_empty()
        });
        if ok.count() != 1 {
            out.push(format!("{path}: matches no alternative"));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let fits = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !fits {
        out.push(format!("{path}: not a {ty}"));
        return;
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            out.push(format!("{path}: {v} not one of {e:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), v.as_f64()) {
        if n < min {
            out.push(format!("{path}: below {min}"));
        }
    }
    if let (Some(max), Some(n)) = (schema["maximum"].as_f64(), v.as_f64()) {
        if n > max {
            out.push(format!("{path}: above {max}"));
        }
    }
    if let Some(items) = v.as_array() {
        for (i, item) in items.iter().enumerate() {
            check(&schema["items"], item, &format!("{path}[{i}]"), out);
        }
    }
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            let sub = &schema["properties"][k];
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            if sub.is_null() {
                if schema["additionalProperties"] == Value::Bool(false) {
                    out.push(format!("{p}: not allowed"));
                }
            } else {
                check(sub, val, &p, out);
            }
        }
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                out.push(format!("{path}.{r}: required"));
            }
        }
    }
}

fn problems(toml_text: &str) -> Vec<String> {
    let schema = idemproxy::config::json_schema::json_schema();
    let table: toml::Table = toml_text.parse().unwrap();
    let v = serde_json::to_value(table).unwrap();
    let mut out = Vec::new();
    check(&schema, &v, "", &mut out);
    out
}

#[test]
fn the_schema_accepts_every_example_config_and_refuses_unknown_keys() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("#:schema ../idemproxy.schema.json"),
                "{} does not point editors at the schema",
                path.display()
            );
            assert_eq!(problems(&text), Vec::<String>::new(), "{}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 3, "only {seen} example configs");
    let bad = problems(
        "[server]\nlisten = \"127.0.0.1:8080\"\nlistne = 1\n[[routes]]\nname = \"a\"\nttl = 5\n",
    );
    assert!(
        bad.iter().any(|p| p.starts_with("server.listne")),
        "{bad:?}"
    );
    assert!(
        bad.iter().any(|p| p.starts_with("routes[0].ttl")),
        "{bad:?}"
    );
    assert!(bad.iter().any(|p| p.contains("path: required")), "{bad:?}");
}
