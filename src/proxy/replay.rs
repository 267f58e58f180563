//! A recorded result → the response every retry gets: the stored status, headers and body, marked
//! `Idempotent-Replayed: true` (Stripe's header).

use http::{HeaderName, HeaderValue, Response, StatusCode};

use crate::body::{empty, full, Body};
use crate::store::Completed;

/// Marks every replayed response.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Set on a replay whose body was too large to record.
pub const REPLAY_OMITTED: HeaderName = HeaderName::from_static("idempotency-replay");

/// The response for a retry of a completed request.
pub fn replay(rec: &Completed, duplicate_status: StatusCode) -> Response<Body> {
    if rec.seen_only {
        let mut resp = Response::new(empty());
        *resp.status_mut() = duplicate_status;
        resp.headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
        return resp;
    }
    let body = if rec.body_omitted {
        empty()
    } else {
        full(rec.body.clone())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(rec.status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    for (name, value) in &rec.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            h.append(n, v);
        }
    }
    h.insert(REPLAYED, HeaderValue::from_static("true"));
    if rec.body_omitted {
        h.insert(REPLAY_OMITTED, HeaderValue::from_static("omitted"));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    resp
}
