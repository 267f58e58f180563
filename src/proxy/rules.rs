//! Route selection: the first `[[routes]]` entry whose path glob matches wins; otherwise `[defaults]`
//! under the route name `default`.

use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};

use crate::{
    admin::metrics::RouteCounters,
    config::{defaults::DEFAULT_ROUTE_NAME, Config, Rule},
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

    /// The rules for a request path (query excluded).
    pub fn select(&self, path: &str) -> &RouteRules {
        self.routes
            .iter()
            .find(|r| r.matcher.as_ref().is_some_and(|m| m.is_match(path)))
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
}
