//! Turns the raw TOML table into a typed [`Config`], collecting every problem with its path.
//!
//! Each key is read and checked once ([`Section`] reports unknown keys and wrong types); `[defaults]` is
//! resolved over the built-in defaults, then each `[[routes]]` entry over `[defaults]`, and cross-field rules
//! (`key = "json"` needs `json_pointer`, unique route names, …) are checked on the merged result.
//!
//! One file per part of the file: `sections` (`[server]`, `[upstream]`, `[admin]`), `store`
//! (`[store]` and the choice of backend), `rules` (`[defaults]` and `[[routes]]`), and `values` (how
//! one value of each kind is read: addresses, durations and sizes within their bounds, header names).

mod rules;
mod sections;
mod store;
mod values;

use std::collections::HashSet;

use globset::GlobBuilder;

pub use values::parse_size;

use super::{
    defaults::*,
    file::{Problems, Section},
    Config, ConfigErrors, Overrides, Route,
};
use rules::{builtin_rule, read_rule};
use sections::{read_admin, read_server, read_telemetry, read_upstream};
use store::read_store;

/// Builds the typed config, or every problem found.
pub(super) fn build(mut table: toml::Table, o: &Overrides) -> Result<Config, ConfigErrors> {
    apply_overrides(&mut table, o);
    let mut p = Problems::default();
    let mut root = Section::new("", table);

    let server = root.take_table("server", &mut p);
    let upstream = root.take_table("upstream", &mut p);
    let store = root.take_table("store", &mut p);
    let admin = root.take_table("admin", &mut p);
    let telemetry = root.take_table("telemetry", &mut p);
    let defaults = root.take_table("defaults", &mut p);
    let routes = root.take_table_list("routes", &mut p);
    root.finish(&mut p);

    let server = read_server(
        server.unwrap_or_else(|| Section::new("server", Default::default())),
        &mut p,
    );
    let upstream = read_upstream(
        upstream.unwrap_or_else(|| Section::new("upstream", Default::default())),
        &mut p,
    );
    let store = read_store(
        store.unwrap_or_else(|| Section::new("store", Default::default())),
        o,
        &mut p,
    );
    let admin = read_admin(
        admin.unwrap_or_else(|| Section::new("admin", Default::default())),
        &mut p,
    );
    let telemetry = read_telemetry(
        telemetry.unwrap_or_else(|| Section::new("telemetry", Default::default())),
        &mut p,
    );

    let builtin = builtin_rule();
    let mut dsec = defaults.unwrap_or_else(|| Section::new("defaults", Default::default()));
    let dpart = read_rule(&mut dsec, &mut p, false);
    dsec.finish(&mut p);
    let defaults = dpart.merge_onto(&builtin, "defaults", &mut p);

    let mut names = HashSet::new();
    let mut out_routes = Vec::with_capacity(routes.len());
    for mut sec in routes {
        let name = sec.take_str("name", &mut p);
        let path = sec.take_str("path", &mut p);
        let part = read_rule(&mut sec, &mut p, true);
        let base = sec.path_of("");
        let base = base.trim_end_matches('.').to_owned();
        let rule = part.merge_onto(&defaults, &base, &mut p);
        let name = match name {
            None => {
                p.push(
                    format!("{base}.name"),
                    "missing: every route needs a unique name",
                );
                None
            }
            Some(n) if n.is_empty() => {
                p.push(format!("{base}.name"), "must not be empty");
                None
            }
            Some(n) if n == DEFAULT_ROUTE_NAME => {
                p.push(
                    format!("{base}.name"),
                    "\"default\" is reserved for [defaults]",
                );
                None
            }
            Some(n) if !names.insert(n.clone()) => {
                p.push(
                    format!("{base}.name"),
                    format!("duplicate route name \"{n}\""),
                );
                None
            }
            Some(n) => Some(n),
        };
        let path = match path {
            None => {
                p.push(
                    format!("{base}.path"),
                    "missing: a glob such as \"/v1/payments/**\"",
                );
                None
            }
            Some(g) if !g.starts_with('/') => {
                p.push(format!("{base}.path"), format!("\"{g}\" must start with /"));
                None
            }
            Some(g) if g.contains(['?', '#']) => {
                p.push(
                    format!("{base}.path"),
                    format!("\"{g}\": a route matches the path only; `?` and `#` are not allowed"),
                );
                None
            }
            Some(g) => match GlobBuilder::new(&g).literal_separator(true).build() {
                Ok(_) => Some(g),
                Err(e) => {
                    p.push(format!("{base}.path"), format!("invalid glob \"{g}\": {e}"));
                    None
                }
            },
        };
        sec.finish(&mut p);
        if let (Some(name), Some(path)) = (name, path) {
            out_routes.push(Route { name, path, rule });
        }
    }

    if !p.0.is_empty() {
        return Err(ConfigErrors(p.0));
    }
    match (server, upstream, store, admin, telemetry) {
        (Some(server), Some(upstream), Some(store), Some(admin), Some(telemetry)) => Ok(Config {
            server,
            upstream,
            store,
            admin,
            telemetry,
            defaults,
            routes: out_routes,
            notes: p.1,
        }),
        // A section reader returns None only after recording a problem.
        _ => Err(ConfigErrors(vec![super::ConfigError {
            path: "config".into(),
            reason: "invalid".into(),
        }])),
    }
}

fn apply_overrides(table: &mut toml::Table, o: &Overrides) {
    fn set(table: &mut toml::Table, section: &str, key: &str, v: &Option<String>) {
        let Some(v) = v else { return };
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if let toml::Value::Table(t) = entry {
            t.insert(key.to_owned(), toml::Value::String(v.clone()));
        }
        // A non-table section stays as it is; validation reports its type.
    }
    set(table, "server", "listen", &o.listen);
    set(table, "upstream", "url", &o.upstream);
    set(table, "store", "path", &o.data_dir);
    set(table, "admin", "listen", &o.admin_listen);
    set(table, "admin", "token", &o.admin_token);
    set(table, "store", "redis_url", &o.redis_url);
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use http::Method;

    use super::*;
    use crate::config::{InFlightMode, SyncPolicy};

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text, &Overrides::default()) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn empty_file_is_builtin_defaults() {
        let c = Config::parse("", &Overrides::default()).unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.defaults.methods, vec![Method::POST, Method::PATCH]);
        assert_eq!(c.defaults.ttl, DEFAULT_TTL);
        assert_eq!(c.store.sync, SyncPolicy::Always);
        assert!(c.routes.is_empty());
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let e = errors(
            r#"
            [server]
            lisen = "x"
            max_request_body = "ten"
            [defaults]
            on_in_flight = "maybe"
            [[routes]]
            name = "a"
            path = "/a/**"
            [[routes]]
            name = "b"
            path = "/b"
            ttl = "1x"
            release_statuses = [503, 999]
            "#,
        );
        assert!(e.contains(&"server.lisen: unknown key".to_owned()), "{e:?}");
        assert!(
            e.iter()
                .any(|l| l.starts_with("server.max_request_body: invalid size")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("defaults.on_in_flight: \"maybe\"")),
            "{e:?}"
        );
        assert!(
            e.contains(&"routes[1].ttl: invalid duration \"1x\"".to_owned()),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("routes[1].release_statuses[1]: 999")),
            "{e:?}"
        );
        assert_eq!(e.len(), 5, "{e:?}");
    }

    #[test]
    fn routes_inherit_defaults() {
        let c = Config::parse(
            r#"
            [defaults]
            ttl = "7d"
            on_in_flight = "wait"
            [[routes]]
            name = "pay"
            path = "/pay/**"
            required = true
            "#,
            &Overrides::default(),
        )
        .unwrap();
        let r = &c.routes[0].rule;
        assert!(r.required);
        assert_eq!(r.ttl, Duration::from_secs(7 * 86400));
        assert_eq!(r.on_in_flight, InFlightMode::Wait);
        assert!(!c.defaults.required);
    }

    #[test]
    fn json_key_needs_pointer_and_route_names_are_checked() {
        let e = errors(
            r#"
            [[routes]]
            name = "w"
            path = "/w"
            key = "json"
            [[routes]]
            name = "w"
            path = "nope"
            [[routes]]
            path = "/x"
            "#,
        );
        assert!(
            e.contains(
                &"routes[0].json_pointer: missing: key = \"json\" needs json_pointer".to_owned()
            ),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.starts_with("routes[1].name: duplicate")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("routes[1].path: \"nope\" must start with /")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.starts_with("routes[2].name: missing")),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_types_and_bad_values() {
        let e = errors(
            r#"
            [upstream]
            url = "ftp://x"
            [store]
            backend = "redis"
            sync = "never"
            [defaults]
            required = "yes"
            methods = ["POST", 3]
            ttl = "0s"
            "#,
        );
        assert!(e.iter().any(|l| l.starts_with("upstream.url:")), "{e:?}");
        assert!(
            e.iter().any(|l| l.starts_with("store.redis_url: missing")),
            "{e:?}"
        );
        assert!(e.iter().any(|l| l.starts_with("store.sync:")), "{e:?}");
        assert!(
            e.contains(&"defaults.required: expected true or false, found string".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"defaults.methods[1]: expected a string, found integer".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"defaults.ttl: must be greater than zero".to_owned()),
            "{e:?}"
        );
    }

    #[test]
    fn overrides_win() {
        let o = Overrides {
            listen: Some("127.0.0.1:1".into()),
            upstream: Some("http://127.0.0.1:2".into()),
            ..Default::default()
        };
        let c = Config::parse("[server]\nlisten = \"127.0.0.1:9\"\n", &o).unwrap();
        assert_eq!(c.server.listen.port(), 1);
        assert_eq!(c.upstream.url.port_u16(), Some(2));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("1KB"), Some(1000));
        assert_eq!(parse_size("42"), Some(42));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn tls_keys_and_upstream_client_identity() {
        let c = Config::parse(
            r#"
            [server]
            tls = { cert = "c.pem", key = "k.pem", client_ca = "ca.pem", handshake_timeout = "3s" }
            [upstream]
            url = "https://api.example"
            ca_file = "up-ca.pem"
            client_cert = "me.pem"
            client_key = "me.key"
            "#,
            &Overrides::default(),
        )
        .unwrap();
        let tls = c.server.tls.unwrap();
        assert_eq!(tls.handshake_timeout, Duration::from_secs(3));
        assert_eq!(tls.client_ca, Some(PathBuf::from("ca.pem")));
        let id = c.upstream.client_auth.unwrap();
        assert_eq!((id.cert, id.key), ("me.pem".into(), "me.key".into()));

        let d = Config::parse(
            "[server]\ntls = { cert = \"c.pem\", key = \"k.pem\" }\n",
            &Overrides::default(),
        )
        .unwrap();
        let tls = d.server.tls.unwrap();
        assert_eq!(tls.handshake_timeout, DEFAULT_TLS_HANDSHAKE_TIMEOUT);
        assert!(tls.client_ca.is_none());
        assert!(d.upstream.client_auth.is_none());

        let e = errors(
            r#"
            [server]
            tls = { cert = "", handshake_timeout = "0s" }
            [upstream]
            client_cert = "me.pem"
            "#,
        );
        assert!(
            e.contains(&"server.tls.cert: must not be empty (a path to a PEM file)".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"server.tls.key: missing: TLS needs both cert and key".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"server.tls.handshake_timeout: must be greater than zero".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(
                &"upstream.client_key: missing: client_cert needs client_key (both or neither)"
                    .to_owned()
            ),
            "{e:?}"
        );
        assert_eq!(e.len(), 4, "{e:?}");
        let e = errors("[upstream]\nclient_key = \"me.key\"\n");
        assert_eq!(
            e,
            vec!["upstream.client_cert: missing: client_key needs client_cert (both or neither)"]
        );
    }

    #[test]
    fn syntax_error_is_one_problem() {
        let e = errors("[server\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("config: invalid TOML"), "{e:?}");
    }

    #[test]
    fn redis_is_reached_one_way_and_sentinels_need_a_master_name() {
        let both =
            errors("[store]\nredis_url = \"redis://a:1\"\nredis_cluster = [\"redis://b:2\"]\n");
        assert!(
            both.iter()
                .any(|e| e.starts_with("store.redis_cluster: conflicts")),
            "{both:?}"
        );
        let no_name = errors("[store]\nredis_sentinels = [\"redis://s:26379\"]\n");
        assert!(
            no_name
                .iter()
                .any(|e| e.starts_with("store.redis_master_name: missing")),
            "{no_name:?}"
        );
        let no_sentinels =
            errors("[store]\nredis_url = \"redis://a:1\"\nredis_master_name = \"m\"\n");
        assert!(
            no_sentinels
                .iter()
                .any(|e| e.starts_with("store.redis_master_name: needs")),
            "{no_sentinels:?}"
        );
        let bad = errors("[store]\nredis_cluster = [\"redis://a:1\", \"http://b:2\"]\n");
        assert!(
            bad.iter().any(|e| e.starts_with("store.redis_cluster[1]:")),
            "{bad:?}"
        );
        let sled = errors("[store]\nbackend = \"sled\"\nredis_sentinels = [\"redis://s:1\"]\nredis_master_name = \"m\"\n");
        assert!(
            !sled.is_empty(),
            "sentinels with backend = sled must be refused"
        );
        let ok = Config::parse(
            "[store]\nredis_sentinels = [\"redis://s:26379\"]\nredis_master_name = \"mymaster\"\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(ok.store.backend, crate::config::Backend::Redis);
        assert_eq!(ok.store.redis_master_name, "mymaster");
        assert_eq!(ok.store.redis_url, None);
    }
}
