//! One test per rule of the contract's HTTP semantics and limits: rule 1 here, the others by theme in
//! `rules/` (keys and their lifetime, replays and failures, routing and headers, limits).

mod keys;
mod limits;
mod replay;
mod routing;

use http::StatusCode;
use idemproxy::metrics::Outcome;

use crate::harness::{request, Pipeline};

/// Rule 1: key missing — `required` → 400 `missing-key`; otherwise forwarded as is, every time.
#[tokio::test]
async fn rule_01_a_missing_key_is_400_when_required_and_forwarded_every_time_when_optional() {
    let strict = Pipeline::new("[defaults]\nrequired = true\n");
    let r = strict.post("/pay", None, "{}").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "missing-key");
    assert_eq!(strict.upstream.hits(), 0, "nothing forwarded");

    let lax = Pipeline::new("[defaults]\nrequired = false\n");
    for n in 1..=3 {
        let r = lax.post("/pay", None, "{}").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), format!("hit {n}"), "forwarded every time");
        assert_eq!(r.outcome, Outcome::Passthrough);
    }
    // A GET is not under the rules at all.
    let r = strict.send(request("GET", "/pay", &[], "")).await;
    assert_eq!(r.outcome, Outcome::Passthrough);
}
