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
    config::{defaults::DEFAULT_ROUTE_NAME, Config, Rule},
    key::path::{match_forms, trim_slash, PathError},
    metrics::RouteCounters,
};
use http::Method;

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

impl RouteRules {
    /// Whether requests with `method` are under this route's idempotency rules.
    pub fn protects(&self, method: &Method) -> bool {
        self.rule.enabled && self.rule.methods.contains(method)
    }
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

    /// The rules for a normalized request path (query excluded; see [`crate::key::path::normalize`])
    /// and method.
    ///
    /// The path is read strictly and loosely (see [`match_forms`]). `/public/..%2Fv1/payments/a` is
    /// `/public/**` to a strict reader and `/v1/payments/a` to a framework that decodes `%2F`: when the
    /// two readings fall under different routes, the one that protects this method is taken (a named
    /// route before `[defaults]`), so a retry cannot escape its route by its spelling; two named routes
    /// that would both protect it, under different store keys, are refused ([`PathError::Ambiguous`]).
    pub fn select(&self, normal_path: &str, method: &Method) -> Result<&RouteRules, PathError> {
        if self.routes.is_empty() {
            return Ok(&self.default);
        }
        // Without an escape, a `;` or a `\` both readings are one: no second one to compute.
        if !normal_path.contains(['%', ';', '\\']) {
            return Ok(self.first_match(trim_slash(normal_path)));
        }
        let [strict, loose] = match_forms(normal_path);
        let strict_route = self.first_match(&strict);
        if strict == loose {
            return Ok(strict_route);
        }
        let loose_route = self.first_match(&loose);
        if std::ptr::eq(strict_route, loose_route) {
            return Ok(strict_route);
        }
        // A route that matches too much only adds protection: the reading that protects wins, a named
        // route over `[defaults]`; two different named routes that both protect are ambiguous.
        match (strict_route.protects(method), loose_route.protects(method)) {
            (false, false) | (true, false) => Ok(strict_route),
            (false, true) => Ok(loose_route),
            (true, true) if strict_route.matcher.is_none() => Ok(loose_route),
            (true, true) if loose_route.matcher.is_none() => Ok(strict_route),
            (true, true) => Err(PathError::Ambiguous),
        }
    }

    /// The first route matching `form` (or `form` with a trailing `/`), else the default.
    fn first_match(&self, form: &str) -> &RouteRules {
        let mut slashed = String::with_capacity(form.len() + 1);
        slashed.push_str(form);
        if !form.ends_with('/') {
            slashed.push('/');
        }
        self.routes
            .iter()
            .find(|r| {
                r.matcher
                    .as_ref()
                    .is_some_and(|m| m.is_match(form) || m.is_match(&slashed))
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
        let select = |p: &str| r.select(p, &Method::POST).unwrap().name.to_string();
        assert_eq!(select("/v1/payments/p1/refunds"), "one");
        assert_eq!(select("/v1/payments/p1/x/refunds"), "payments");
        assert_eq!(select("/v1/payments/p1"), "payments");
        assert_eq!(select("/health"), "root");
        assert_eq!(select("/a/b"), "default");
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
            r.select(&normal, &Method::POST).unwrap().name.to_string()
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

    /// A path whose strict and loose readings fall under different routes goes to the one that
    /// protects it; two protecting named routes are refused.
    #[test]
    fn a_path_read_as_two_routes_goes_to_the_protecting_one() {
        let cfg = Config::parse(
            r#"
            [[routes]]
            name = "public"
            path = "/public/**"
            enabled = false
            [[routes]]
            name = "payments"
            path = "/v1/payments/**"
            methods = ["POST"]
            "#,
            &Overrides::default(),
        )
        .unwrap();
        let r = Rules::new(&cfg).unwrap();
        let normal = crate::key::path::normalize("/public/..%2Fv1/payments/z").unwrap();
        assert_eq!(
            &*r.select(&normal, &Method::POST).unwrap().name,
            "payments",
            "the protecting reading wins"
        );
        // GET is protected by neither reading: pass-through, as the strict reading says.
        assert_eq!(&*r.select(&normal, &Method::GET).unwrap().name, "public");
        // One reading, one route: no ambiguity.
        assert_eq!(
            &*r.select("/public/a%2Fb", &Method::POST).unwrap().name,
            "public"
        );
        // Both readings under protecting named routes, with different store keys: refused.
        let cfg = Config::parse(
            "[[routes]]\nname = \"a\"\npath = \"/a/**\"\n[[routes]]\nname = \"b\"\npath = \"/b/**\"\n",
            &Overrides::default(),
        )
        .unwrap();
        let r = Rules::new(&cfg).unwrap();
        let normal = crate::key::path::normalize("/a/..%2Fb/x").unwrap();
        assert_eq!(
            r.select(&normal, &Method::POST).unwrap_err(),
            PathError::Ambiguous
        );
    }
}
