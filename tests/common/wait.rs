//! Bounded waiting: every future gets a deadline, and truly asynchronous conditions are polled with one.

use std::future::Future;
use std::time::{Duration, Instant};

/// Await `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Poll `probe` (which must itself be bounded in time) until it yields `Some`, at most until `limit` has
/// passed; panics with `what` when the deadline is reached. For conditions no event announces (a TTL running
/// out, a lease expiring, a listener going away).
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(remaining, probe()).await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
