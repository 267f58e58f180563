//! Settings that are valid but probably not what the operator meant, each with its TOML path:
//! `check` prints them (and still exits 0), `run` logs them at startup and on reload.

use super::{Config, ConfigError, InFlightMode, Rule};

fn warn(out: &mut Vec<ConfigError>, path: String, reason: impl Into<String>) {
    out.push(ConfigError {
        path,
        reason: reason.into(),
    });
}

/// Every warning of `cfg`.
pub(super) fn of(cfg: &Config) -> Vec<ConfigError> {
    let mut out = cfg.store.warnings.clone();
    out.extend(cfg.notes.iter().cloned());
    let rules = std::iter::once(("defaults".to_owned(), &cfg.defaults, None)).chain(
        cfg.routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("routes[{i}]"), &r.rule, Some(&cfg.defaults))),
    );
    for (path, rule, inherits) in rules {
        // A route is warned about what it sets itself, not about what it inherits from [defaults]
        // (that is warned about once, at [defaults]).
        let own = |f: fn(&Rule) -> bool| inherits.is_none_or(|d| f(rule) != f(d));
        if rule.enabled
            && rule.store_response
            && rule.scope_headers.is_empty()
            && rule.scope_cookies.is_empty()
        {
            warn(
                &mut out,
                format!("{path}.scope_headers"),
                "responses are recorded with no scope (scope_headers and scope_cookies are \
                 empty): any client that sends a known key gets its recorded answer",
            );
        }
        if rule.lease < cfg.upstream.timeout && inherits.is_none_or(|d| rule.lease != d.lease) {
            warn(
                &mut out,
                format!("{path}.lease"),
                format!(
                    "{:?} is shorter than upstream.timeout ({:?}): if the proxy dies while the \
                     upstream still works, a retry may run again before the first call ends",
                    rule.lease, cfg.upstream.timeout
                ),
            );
        }
        if rule.on_in_flight == InFlightMode::Wait
            && rule.wait_timeout >= cfg.server.request_timeout
            && inherits.is_none_or(|d| {
                rule.wait_timeout != d.wait_timeout || d.on_in_flight != InFlightMode::Wait
            })
        {
            warn(
                &mut out,
                format!("{path}.wait_timeout"),
                format!(
                    "{:?} is not shorter than server.request_timeout ({:?}): a duplicate's wait \
                     ends with its request (409), never at wait_timeout",
                    rule.wait_timeout, cfg.server.request_timeout
                ),
            );
        }
        if inherits.is_some() && !rule.enabled && rule.required && own(|r| r.required) {
            warn(
                &mut out,
                format!("{path}.required"),
                "has no effect: the route is disabled (enabled = false), so nothing is required",
            );
        }
    }
    for (j, later) in cfg.routes.iter().enumerate() {
        if let Some(i) = cfg.routes[..j]
            .iter()
            .position(|r| r.path.eq_ignore_ascii_case(&later.path))
        {
            warn(
                &mut out,
                format!("routes[{j}].path"),
                format!(
                    "\"{}\" is routes[{i}]'s path too: the first match wins, so this route never \
                     matches",
                    later.path
                ),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Overrides};

    fn warned(text: &str) -> Vec<String> {
        Config::parse(text, &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .warnings()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn has(w: &[String], prefix: &str) -> bool {
        w.iter().any(|l| l.starts_with(prefix))
    }

    #[test]
    fn combinations_that_cannot_work_are_named_by_their_toml_path() {
        let w = warned(
            "[upstream]\ntimeout = \"30s\"\n[server]\nrequest_timeout = \"10s\"\n\
             [defaults]\nlease = \"5s\"\non_in_flight = \"wait\"\nwait_timeout = \"20s\"\n\
             [[routes]]\nname = \"a\"\npath = \"/pay\"\njson_pointer = \"/id\"\n\
             [[routes]]\nname = \"b\"\npath = \"/PAY\"\nenabled = false\nrequired = true\n",
        );
        assert!(has(&w, "defaults.lease:"), "{w:?}");
        assert!(has(&w, "defaults.wait_timeout:"), "{w:?}");
        assert!(has(&w, "routes[0].json_pointer: ignored"), "{w:?}");
        assert!(has(&w, "routes[1].path:"), "{w:?}");
        assert!(has(&w, "routes[1].required: has no effect"), "{w:?}");
        // Inherited values are warned about once, at [defaults].
        assert!(!has(&w, "routes[0].lease"), "{w:?}");
        assert!(!has(&w, "routes[0].wait_timeout"), "{w:?}");
    }

    #[test]
    fn the_built_in_defaults_warn_about_nothing() {
        assert_eq!(warned(""), Vec::<String>::new());
    }
}
