//! Route selection: the first `[[routes]]` entry whose path glob matches wins; otherwise `[defaults]`
//! under the route name `default`.
//!
//! Globs are matched against the normalized path (contract rule 13), ignoring letter case and a
//! trailing `/`, and against a looser reading of it (every escape decoded, `;params` dropped, `\` as
//! `/`: see [`crate::key::path`]): a route that matches too much only adds protection, one that matches
//! too little lets a retry through unprotected.

use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};

use crate::{
    admin::metrics::RouteCounters,
    config::{defaults::DEFAULT_ROUTE_NAME, Config, Rule},
    key::path::match_forms,
};

/// A route ready for matching.
#[derive(Debug)]
pub struct RouteRules {
    /// Route name (part of every store key).
    pub name: Arc<str>,
    /// The resolved rules.
    pub rule: Rule,
    /// Its request counters.
    pub counters: RouteCounters,
    matcher: Option<GlobMatcher>,
}

/// Every route, in order, plus the default.
#[derive(Debug)]
pub struct Rules {
    routes: Vec<RouteRules>,
    default: RouteRules,
}

impl Rules {
    /// Compiles the routes of a validated config.
    pub fn new(cfg: &Config) -> Result<Self, globset::Error> {
        let routes = cfg
            .routes
            .iter()
            .map(|r| {
                Ok(RouteRules {
                    name: Arc::from(r.name.as_str()),
                    rule: r.rule.clone(),
                    counters: RouteCounters::new(&r.name),
                    matcher: Some(
                        GlobBuilder::new(&r.path)
                            .literal_separator(true)
                            .case_insensitive(true)
                            .build()?
                            .compile_matcher(),
                    ),
                })
            })
            .collect::<Result<_, globset::Error>>()?;
        Ok(Self {
            routes,
            default: RouteRules {
                name: Arc::from(DEFAULT_ROUTE_NAME),
                rule: cfg.defaults.clone(),
                counters: RouteCounters::new(DEFAULT_ROUTE_NAME),
                matcher: None,
            },
        })
    }

    /// The rules of requests that match no route.
    pub fn default_route(&self) -> &RouteRules {
        &self.default
    }

    /// The rules for a normalized request path (query excluded; see [`crate::key::path::normalize`]).
    pub fn select(&self, normal_path: &str) -> &RouteRules {
        if self.routes.is_empty() {
            return &self.default;
        }
        let [strict, loose] = match_forms(normal_path);
        let with_slash = |p: &str| {
            let mut s = String::with_capacity(p.len() + 1);
            s.push_str(p);
            if !p.ends_with('/') {
                s.push('/');
            }
            s
        };
        let mut forms = vec![with_slash(&strict), strict];
        if forms[1] != loose {
            forms.push(with_slash(&loose));
            forms.push(loose);
        }
        self.routes
            .iter()
            .find(|r| {
                r.matcher
                    .as_ref()
                    .is_some_and(|m| forms.iter().any(|f| m.is_match(f)))
            })
            .unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn first_match_wins_and_default_catches_the_rest() {
        let cfg = Config::parse(
            r#"
            [[routes]]
            name = "one"
            path = "/v1/payments/*/refunds"
            [[routes]]
            name = "payments"
            path = "/v1/payments/**"
            [[routes]]
            name = "root"
            path = "/*"
            "#,
            &Overrides::default(),
        )
        .unwrap();
        let r = Rules::new(&cfg).unwrap();
        assert_eq!(&*r.select("/v1/payments/p1/refunds").name, "one");
        assert_eq!(&*r.select("/v1/payments/p1/x/refunds").name, "payments");
        assert_eq!(&*r.select("/v1/payments/p1").name, "payments");
        assert_eq!(&*r.select("/health").name, "root");
        assert_eq!(&*r.select("/a/b").name, "default");
    }

    /// Rule 13: letter case, a trailing slash and spellings the upstream reads as the same path do not
    /// escape a route.
    #[test]
    fn spellings_of_a_path_select_its_route() {
        let cfg = Config::parse(
            r#"
            [[routes]]
            name = "payments"
            path = "/v1/payments/**"
            [[routes]]
            name = "exact"
            path = "/v1/orders"
            "#,
            &Overrides::default(),
        )
        .unwrap();
        let r = Rules::new(&cfg).unwrap();
        let select = |raw: &str| {
            let normal = crate::key::path::normalize(raw).unwrap();
            r.select(&normal).name.to_string()
        };
        for p in [
            "/v1/payments/a",
            "/v1//payments/a",
            "/v1/%70ayments/a",
            "/v1/./payments/a",
            "/v1/x/../payments/a",
            "/v1/payments/a/",
            "/V1/PAYMENTS/a",
            "/v1%2Fpayments%2Fa",
            "/v1/payments;x=1/a",
            "/v1\\payments\\a",
        ] {
            assert_eq!(select(p), "payments", "{p}");
        }
        for p in ["/v1/orders", "/v1/orders/", "/V1/Orders", "/v1//orders/."] {
            assert_eq!(select(p), "exact", "{p}");
        }
        assert_eq!(select("/v1/paymentsx/a"), "default");
        assert_eq!(select("/v1/orders/1"), "default");
    }
}
