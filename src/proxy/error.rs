//! The one place where the proxy's own failures become HTTP answers: [`ProxyError`] → status, stable
//! `code`, and an RFC 9457 `application/problem+json` body.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{full, Body};
use crate::metrics::Outcome;
use crate::{
    key::{path::PathError, JsonKeyError, KeyError},
    store::StoreError,
};

/// Base of the `type` URI of every problem.
const TYPE_BASE: &str = "https://github.com/idemproxy/idemproxy/blob/main/README.md#error-";

/// A request the proxy answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `required = true` and no key.
    #[error("this route requires an idempotency key")]
    MissingKey,
    /// The key is malformed.
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    /// `key = "json"` and the body does not yield a key.
    #[error(transparent)]
    InvalidJsonKey(#[from] JsonKeyError),
    /// The key was used before with another request.
    #[error("this idempotency key was already used with a different request")]
    FingerprintMismatch,
    /// The key's first request is still running.
    #[error("a request with this idempotency key is still in progress")]
    InFlight {
        /// Time left on its lease.
        retry_after: Duration,
    },
    /// The request body is over `max_request_body`.
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The request body could not be read.
    #[error("the request body could not be read")]
    BadRequestBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// `[store] max_size` is reached: new keys are refused until the sweeper frees room.
    #[error("the idempotency store is full; new keys are refused until expired records are swept")]
    StoreFull,
    /// `[upstream] max_concurrency` exchanges are running: nothing was sent and the key is free.
    #[error("the upstream has too many requests in flight; nothing was sent")]
    UpstreamBusy,
    /// The client did not send its request body within `request_timeout`: nothing was forwarded.
    #[error("the request body did not arrive within {0:?}; nothing was forwarded")]
    RequestTimeout(Duration),
    /// The store failed and `on_store_error = "reject"`.
    #[error("the idempotency store is unavailable")]
    StoreUnavailable(#[source] StoreError),
    /// Nothing was sent: the upstream could not be reached.
    #[error("the upstream could not be reached")]
    UpstreamUnreachable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The upstream did not answer in time (it may have seen the request).
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// The exchange broke after the request was sent (it may have been processed).
    #[error("the upstream connection failed during the exchange")]
    UpstreamFailed(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A protocol upgrade (e.g. WebSocket) asked for on a request under idempotency rules.
    #[error("{method} requests under idempotency rules cannot upgrade the connection (Upgrade header); open WebSockets with GET or on a route that is not protected")]
    UpgradeNotAllowed {
        /// The request's method.
        method: http::Method,
    },
    /// The request path cannot be normalized (a malformed escape, an encoded NUL).
    #[error(transparent)]
    InvalidPath(#[from] PathError),
    /// A bug: a task that should have answered did not.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey
            | Self::InvalidKey(_)
            | Self::InvalidJsonKey(_)
            | Self::BadRequestBody(_)
            | Self::UpgradeNotAllowed { .. }
            | Self::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Self::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight { .. } => StatusCode::CONFLICT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::StoreUnavailable(_) | Self::StoreFull | Self::UpstreamBusy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamUnreachable(_) | Self::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable `code` member.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingKey => "missing-key",
            Self::InvalidKey(_) => "invalid-key",
            Self::InvalidJsonKey(_) => "invalid-json-key",
            Self::FingerprintMismatch => "fingerprint-mismatch",
            Self::InFlight { .. } => "in-flight",
            Self::BodyTooLarge { .. } => "body-too-large",
            Self::BadRequestBody(_) => "invalid-body",
            Self::StoreUnavailable(_) => "store-unavailable",
            Self::StoreFull => "store-full",
            Self::UpstreamBusy => "upstream-busy",
            Self::RequestTimeout(_) => "request-timeout",
            Self::UpstreamUnreachable(_) => "upstream-unreachable",
            Self::UpstreamTimeout => "upstream-timeout",
            Self::UpstreamFailed(_) => "upstream-failed",
            Self::UpgradeNotAllowed { .. } => "upgrade-not-allowed",
            Self::InvalidPath(_) => "invalid-path",
            Self::Internal => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency key missing",
            Self::InvalidKey(_) => "Invalid idempotency key",
            Self::InvalidJsonKey(_) => "Invalid idempotency key in JSON body",
            Self::FingerprintMismatch => "Idempotency key reused with a different request",
            Self::InFlight { .. } => "Request in progress",
            Self::BodyTooLarge { .. } => "Request body too large",
            Self::BadRequestBody(_) => "Unreadable request body",
            Self::StoreUnavailable(_) => "Idempotency store unavailable",
            Self::StoreFull => "Idempotency store full",
            Self::UpstreamBusy => "Upstream busy",
            Self::RequestTimeout(_) => "Request timeout",
            Self::UpstreamUnreachable(_) => "Upstream unreachable",
            Self::UpstreamTimeout => "Upstream timeout",
            Self::UpstreamFailed(_) => "Upstream failed",
            Self::UpgradeNotAllowed { .. } => "Protocol upgrade not allowed",
            Self::InvalidPath(_) => "Invalid request path",
            Self::Internal => "Internal error",
        }
    }

    /// Seconds the client should wait before retrying, when that is known.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::InFlight { retry_after } => Some(*retry_after),
            Self::StoreUnavailable(_) | Self::UpstreamBusy => Some(Duration::from_secs(1)),
            Self::StoreFull => Some(Duration::from_secs(5)),
            _ => None,
        }
    }

    /// Whether this is the client's doing (logged at debug) rather than the proxy's or upstream's.
    pub fn is_client_error(&self) -> bool {
        self.status().is_client_error()
    }

    /// The RFC 9457 body.
    pub fn problem_body(&self) -> Bytes {
        /// The members, in this order (serialised straight from the struct: 409s come in bursts).
        #[derive(serde::Serialize)]
        struct Problem<'a> {
            #[serde(rename = "type")]
            kind: String,
            title: &'a str,
            status: u16,
            detail: String,
            code: &'a str,
        }
        let code = self.code();
        let body = Problem {
            kind: format!("{TYPE_BASE}{code}"),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            code,
        };
        serde_json::to_vec(&body)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// The problem+json response.
    pub fn response(&self) -> Response<Body> {
        let status = self.status();
        let mut resp = Response::new(full(self.problem_body()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(d) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(d.as_secs().max(1)));
        }
        resp
    }

    /// The metrics outcome of a request that ended in this error (errors of claimed requests are
    /// settled, and counted, in `flow`).
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Self::FingerprintMismatch => Outcome::Mismatch,
            Self::InFlight { .. } => Outcome::Conflict,
            Self::RequestTimeout(_) => Outcome::RequestTimeout,
            Self::UpstreamTimeout => Outcome::UpstreamTimeout,
            Self::StoreUnavailable(_) => Outcome::StoreUnavailable,
            Self::UpstreamUnreachable(_) | Self::UpstreamFailed(_) => Outcome::Passthrough,
            _ => Outcome::Rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn every_error_maps_to_its_status_and_code() {
        let io =
            || -> Box<dyn std::error::Error + Send + Sync> { Box::new(std::io::Error::other("x")) };
        let cases: Vec<(ProxyError, u16, &str)> = vec![
            (ProxyError::MissingKey, 400, "missing-key"),
            (ProxyError::InvalidKey(KeyError::Empty), 400, "invalid-key"),
            (
                ProxyError::InvalidJsonKey(JsonKeyError::NotJson),
                400,
                "invalid-json-key",
            ),
            (ProxyError::FingerprintMismatch, 422, "fingerprint-mismatch"),
            (
                ProxyError::InFlight {
                    retry_after: Duration::from_secs(3),
                },
                409,
                "in-flight",
            ),
            (ProxyError::BodyTooLarge { limit: 1 }, 413, "body-too-large"),
            (ProxyError::BadRequestBody(io()), 400, "invalid-body"),
            (
                ProxyError::StoreUnavailable(StoreError::Closed),
                503,
                "store-unavailable",
            ),
            (
                ProxyError::UpstreamUnreachable(io()),
                502,
                "upstream-unreachable",
            ),
            (ProxyError::UpstreamTimeout, 504, "upstream-timeout"),
            (ProxyError::UpstreamFailed(io()), 502, "upstream-failed"),
            (
                ProxyError::UpgradeNotAllowed {
                    method: http::Method::POST,
                },
                400,
                "upgrade-not-allowed",
            ),
            (
                ProxyError::InvalidPath(PathError::BadEscape),
                400,
                "invalid-path",
            ),
            (ProxyError::StoreFull, 503, "store-full"),
            (ProxyError::UpstreamBusy, 503, "upstream-busy"),
            (
                ProxyError::RequestTimeout(Duration::from_secs(1)),
                408,
                "request-timeout",
            ),
            (ProxyError::Internal, 500, "internal"),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.code(), code);
        }
    }

    #[tokio::test]
    async fn problem_body_and_retry_after() {
        let resp = ProxyError::InFlight {
            retry_after: Duration::from_secs(7),
        }
        .response();
        assert_eq!(resp.status(), 409);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "in-flight");
        assert_eq!(v["status"], 409);
        assert!(v["type"].as_str().unwrap().ends_with("in-flight"));
    }
}
