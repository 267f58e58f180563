//! The command connection: every operation with its deadline.

use super::*;

/// The command connection with the per-operation deadline.
#[derive(Clone)]
pub(super) struct Conn {
    pub(super) manager: ConnectionManager,
    pub(super) op_timeout: Duration,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub(super) async fn eval(&self, inv: &ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut c = self.manager.clone();
        self.bounded(async move {
            match inv.invoke_async::<Value>(&mut c).await {
                // Refused: nothing was sent and the manager has started to reconnect; once Redis is
                // back, the first request after an outage should not be the one that fails.
                Err(e) if e.is_connection_refusal() => inv.invoke_async::<Value>(&mut c).await,
                r => r,
            }
        })
        .await
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.manager.clone();
        self.bounded(async move {
            let ping = ::redis::cmd("PING");
            match ping.query_async::<Value>(&mut c).await {
                Err(e) if e.is_connection_refusal() => ping.query_async::<Value>(&mut c).await,
                r => r,
            }
        })
        .await
        .map(drop)
    }

    pub(super) async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(redis_err),
            Err(_) => Err(backend_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.op_timeout),
            ))),
        }
    }
}
