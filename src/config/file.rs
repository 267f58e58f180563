//! Raw access to the TOML file: typed reads of each key with its path, and unknown keys reported.
//!
//! A [`Section`] wraps one TOML table. Every `take_*` removes the key it reads, so what is left when
//! [`Section::finish`] runs is unknown and reported as such. Type errors are collected, not returned, so
//! one pass over the file reports every problem (serde's `deny_unknown_fields` would stop at the first).

use toml::{Table, Value};

use super::ConfigError;

/// Every problem found in a config, in file order (`.0`), and settings that are valid but have no
/// effect (`.1`, warnings).
#[derive(Debug, Default)]
pub(crate) struct Problems(pub(crate) Vec<ConfigError>, pub(crate) Vec<ConfigError>);

impl Problems {
    /// A setting that is valid but has no effect.
    pub(crate) fn warn(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.1.push(ConfigError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    pub(crate) fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

/// One TOML table under a path such as `routes[1]` or `server`.
#[derive(Debug)]
pub(crate) struct Section {
    path: String,
    table: Table,
}

/// A size: an integer number of bytes or a string such as `"10MiB"`.
#[derive(Debug, Clone)]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

impl Section {
    pub(crate) fn new(path: impl Into<String>, table: Table) -> Self {
        Self {
            path: path.into(),
            table,
        }
    }

    /// The TOML path of `key` in this section.
    pub(crate) fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        debug_assert!(
            super::schema::declared(&self.path_of(key)),
            "{} is read but not declared in config::schema",
            self.path_of(key)
        );
        self.table.remove(key)
    }

    fn wrong_type(&self, p: &mut Problems, key: &str, want: &str, got: &Value) {
        p.push(
            self.path_of(key),
            format!("expected {want}, found {}", got.type_str()),
        );
    }

    pub(crate) fn take_str(&mut self, key: &str, p: &mut Problems) -> Option<String> {
        match self.take(key)? {
            Value::String(s) => Some(s),
            other => {
                self.wrong_type(p, key, "a string", &other);
                None
            }
        }
    }

    pub(crate) fn take_bool(&mut self, key: &str, p: &mut Problems) -> Option<bool> {
        match self.take(key)? {
            Value::Boolean(b) => Some(b),
            other => {
                self.wrong_type(p, key, "true or false", &other);
                None
            }
        }
    }

    pub(crate) fn take_int(&mut self, key: &str, p: &mut Problems) -> Option<i64> {
        match self.take(key)? {
            Value::Integer(i) => Some(i),
            other => {
                self.wrong_type(p, key, "an integer", &other);
                None
            }
        }
    }

    pub(crate) fn take_size(&mut self, key: &str, p: &mut Problems) -> Option<RawSize> {
        match self.take(key)? {
            Value::Integer(i) => Some(RawSize::Bytes(i)),
            Value::String(s) => Some(RawSize::Text(s)),
            other => {
                self.wrong_type(p, key, "a size (bytes or \"10MiB\")", &other);
                None
            }
        }
    }

    /// An array whose items are all strings; each bad item is reported with its index.
    pub(crate) fn take_str_list(&mut self, key: &str, p: &mut Problems) -> Option<Vec<String>> {
        let items = self.take_array(key, p)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, v) in items.into_iter().enumerate() {
            match v {
                Value::String(s) => out.push(s),
                other => {
                    ok = false;
                    p.push(
                        format!("{}[{i}]", self.path_of(key)),
                        format!("expected a string, found {}", other.type_str()),
                    );
                }
            }
        }
        ok.then_some(out)
    }

    /// An array whose items are all integers.
    pub(crate) fn take_int_list(&mut self, key: &str, p: &mut Problems) -> Option<Vec<i64>> {
        let items = self.take_array(key, p)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, v) in items.into_iter().enumerate() {
            match v {
                Value::Integer(n) => out.push(n),
                other => {
                    ok = false;
                    p.push(
                        format!("{}[{i}]", self.path_of(key)),
                        format!("expected an integer, found {}", other.type_str()),
                    );
                }
            }
        }
        ok.then_some(out)
    }

    fn take_array(&mut self, key: &str, p: &mut Problems) -> Option<Vec<Value>> {
        match self.take(key)? {
            Value::Array(a) => Some(a),
            other => {
                self.wrong_type(p, key, "an array", &other);
                None
            }
        }
    }

    /// A nested table (`[server.tls]` or an inline `tls = { .. }`).
    pub(crate) fn take_table(&mut self, key: &str, p: &mut Problems) -> Option<Section> {
        match self.take(key)? {
            Value::Table(t) => Some(Section::new(self.path_of(key), t)),
            other => {
                self.wrong_type(p, key, "a table", &other);
                None
            }
        }
    }

    /// An array of tables (`[[routes]]`), each with its 0-based index in the path.
    pub(crate) fn take_table_list(&mut self, key: &str, p: &mut Problems) -> Vec<Section> {
        let Some(items) = self.take_array(key, p) else {
            return Vec::new();
        };
        let base = self.path_of(key);
        let mut out = Vec::with_capacity(items.len());
        for (i, v) in items.into_iter().enumerate() {
            match v {
                Value::Table(t) => out.push(Section::new(format!("{base}[{i}]"), t)),
                other => p.push(
                    format!("{base}[{i}]"),
                    format!("expected a table, found {}", other.type_str()),
                ),
            }
        }
        out
    }

    /// Whether `key` is present (without taking it).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Reports every key nobody took as unknown.
    pub(crate) fn finish(self, p: &mut Problems) {
        for key in self.table.keys() {
            p.push(self.path_of(key), "unknown key");
        }
    }
}
