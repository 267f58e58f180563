//! Reading the proxy's Prometheus text (`GET /metrics` on the admin listener) without a parser crate.

use super::proxy::Proxy;

/// The sum of every series of metric `name` (any labels) in Prometheus text; `None` if there is none.
pub fn sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // Exactly this metric: followed by labels or by the value.
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Scrapes `name` from a running proxy (0 when the series does not exist yet).
pub async fn scrape(p: &Proxy, name: &str) -> f64 {
    let r = p.admin_get("/metrics").await;
    assert_eq!(r.status, 200, "GET /metrics: {r:?}");
    sum(&r.text(), name).unwrap_or(0.0)
}
