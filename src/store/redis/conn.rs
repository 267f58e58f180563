//! The command connections: every operation with its deadline, and writes that wait for replicas.
//!
//! With `[store] redis_min_replicas = N > 0`, a script that writes is sent in one pipeline with
//! `WAIT N ms` on the same connection, so the `WAIT` covers that write; fewer than N replica
//! acknowledgements is a [`Written::Unacked`] answer, which the operation turns into a store error.
//! `WAIT` blocks the connection it runs on, so writes then spread over [`ACKED_CONNECTIONS`]
//! connections instead of one. (In a cluster, the pipeline goes to the primary of the script's key,
//! and `WAIT` counts that primary's replicas.)

use std::sync::atomic::{AtomicUsize, Ordering};

use ::redis::{ErrorKind, ServerErrorKind};

use super::*;
use link::{AnyConn, Link};
use scripts::Call;

/// Connections used when writes wait for replicas (a `WAIT` holds its connection until it returns).
pub(super) const ACKED_CONNECTIONS: usize = 8;
/// Pause between two tries of a write whose connection broke (a failover in progress).
const WRITE_RETRY: Duration = Duration::from_millis(50);

/// What a write got from the server.
#[derive(Debug)]
pub(super) enum Written {
    /// The script's answer; with `redis_min_replicas`, acknowledged by that many replicas.
    Acked(Value),
    /// The script ran on the primary, but fewer replicas than required acknowledged it in time.
    Unacked {
        /// The script's answer.
        value: Value,
        /// Replicas that acknowledged.
        got: i64,
    },
}

/// The command connections with the per-operation deadline.
#[derive(Clone)]
pub(super) struct Conn {
    link: Link,
    next: Arc<AtomicUsize>,
    pub(super) op_timeout: Duration,
    /// `[store] redis_min_replicas`.
    pub(super) min_replicas: u32,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("connections", &self.link.len())
            .field("op_timeout", &self.op_timeout)
            .field("min_replicas", &self.min_replicas)
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub(super) fn new(link: Link, op_timeout: Duration, min_replicas: u32) -> Self {
        Self {
            link,
            next: Arc::default(),
            op_timeout,
            min_replicas,
        }
    }

    fn turn(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs a script that only reads (or whose writes need no replica), once (again only if nothing
    /// can have been sent: see `not_sent`).
    pub(super) async fn eval(&self, call: &Call<'_>) -> Result<Value, StoreError> {
        self.once(call, None).await.map(|(v, _)| v)
    }

    /// Runs a script that writes, followed by `WAIT` when replicas must acknowledge it, once (again
    /// only if nothing can have been sent).
    pub(super) async fn write(&self, call: &Call<'_>) -> Result<Written, StoreError> {
        let (value, acks) = self.once(call, self.wait()).await?;
        Ok(self.judge(value, acks))
    }

    /// [`Conn::write`], where fewer acknowledgements than required are a store error.
    pub(super) async fn write_acked(&self, call: &Call<'_>) -> Result<Value, StoreError> {
        self.write(call).await.and_then(|w| self.acked(w))
    }

    fn acked(&self, w: Written) -> Result<Value, StoreError> {
        match w {
            Written::Acked(v) => Ok(v),
            Written::Unacked { got, .. } => Err(self.unacked(got)),
        }
    }

    async fn once(
        &self,
        call: &Call<'_>,
        wait: Option<(u32, u64)>,
    ) -> Result<(Value, Option<i64>), StoreError> {
        let (link, n) = (&self.link, self.turn());
        self.bounded(async move {
            let mut c = link.get(n).await?;
            match run(&mut c, call, wait).await {
                // Nothing was sent, and the manager has started to reconnect: once Redis is back (a
                // restart closes every connection), the first request should not be the one that fails.
                Err(e) if not_sent(&e) => run(&mut c, call, wait).await,
                r => r,
            }
        })
        .await
        .inspect_err(|_| self.link.suspect())
    }

    /// Like [`Conn::write`], for a write that may run twice (its script checks the fencing token, so
    /// a second run after a first one whose answer was lost changes nothing): tried again on a broken
    /// connection until the operation's deadline, so that a write under way when the primary fails
    /// over lands on the promoted one.
    /// Fewer acknowledgements than required are a store error.
    pub(super) async fn write_retrying(&self, call: &Call<'_>) -> Result<Value, StoreError> {
        let wait = self.wait();
        let (link, first) = (&self.link, self.turn());
        let (value, acks) = self
            .bounded(async move {
                let mut attempt = 0;
                loop {
                    let tried = match link.get(first + attempt).await {
                        Ok(mut c) => run(&mut c, call, wait).await,
                        Err(e) => Err(e),
                    };
                    match tried {
                        Err(e) if broken(&e) => {
                            link.suspect();
                            attempt += 1;
                            tokio::time::sleep(WRITE_RETRY).await;
                        }
                        r => return r,
                    }
                }
            })
            .await
            .inspect_err(|_| self.link.suspect())?;
        self.acked(self.judge(value, acks))
    }

    /// How long `WAIT` waits: three quarters of the deadline, leaving the rest to get the answer back.
    fn wait_bound(&self) -> Duration {
        self.op_timeout * 3 / 4
    }

    /// `(replicas, ms)` for `WAIT`, when replicas must acknowledge writes.
    fn wait(&self) -> Option<(u32, u64)> {
        (self.min_replicas > 0).then(|| (self.min_replicas, ms(self.wait_bound()).max(1)))
    }

    fn judge(&self, value: Value, acks: Option<i64>) -> Written {
        match acks {
            Some(got) if got < i64::from(self.min_replicas) => Written::Unacked { value, got },
            _ => Written::Acked(value),
        }
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let (link, n) = (&self.link, self.turn());
        self.bounded(async move {
            let mut c = link.get(n).await?;
            let ping = ::redis::cmd("PING");
            match ping.query_async::<Value>(&mut c).await {
                Err(e) if not_sent(&e) => ping.query_async::<Value>(&mut c).await,
                r => r,
            }
        })
        .await
        .inspect_err(|_| self.link.suspect())
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

    /// The store error of a write that replicas did not acknowledge.
    pub(super) fn unacked(&self, got: i64) -> StoreError {
        other_err(format!(
            "the write reached the primary, but {got} of the {} replicas required \
             (redis_min_replicas) acknowledged it within {:?}",
            self.min_replicas,
            self.wait_bound()
        ))
    }
}

/// The command cannot have reached the server: the connection was refused, or found closed before the
/// command was written (a Redis restart closes every connection). Safe to send again, whatever it does.
fn not_sent(e: &RedisError) -> bool {
    // redis-rs does not expose the I/O error's kind: compare with its text (how an `io::Error` of that
    // kind, which is what redis-rs wraps, displays).
    let closed = || {
        let text = e.to_string();
        [
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::NotConnected,
        ]
        .iter()
        .any(|k| text.contains(&std::io::Error::from(*k).to_string()))
    };
    e.is_connection_refusal() || (e.is_connection_dropped() && closed())
}

/// The connection broke (or was refused) under a command: worth trying again on a new one.
fn broken(e: &RedisError) -> bool {
    e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_io_error()
        || e.is_timeout()
        || matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly))
}

/// `EVALSHA` (loading the script first if the server lost it), then `WAIT` in the same pipeline
/// when `wait` says so: the script's answer, and the replicas that acknowledged.
async fn run(
    c: &mut AnyConn,
    call: &Call<'_>,
    wait: Option<(u32, u64)>,
) -> Result<(Value, Option<i64>), RedisError> {
    match once(c, call, wait).await {
        Err(e) if matches!(e.kind(), ErrorKind::Server(ServerErrorKind::NoScript)) => {
            call.load().query_async::<Value>(c).await?;
            once(c, call, wait).await
        }
        r => r,
    }
}

async fn once(
    c: &mut AnyConn,
    call: &Call<'_>,
    wait: Option<(u32, u64)>,
) -> Result<(Value, Option<i64>), RedisError> {
    match wait {
        None => Ok((call.evalsha().query_async::<Value>(c).await?, None)),
        Some((n, ms)) => {
            let mut p = ::redis::pipe();
            p.add_command(call.evalsha()).cmd("WAIT").arg(n).arg(ms);
            let (v, acks): (Value, i64) = p.query_async(c).await?;
            Ok((v, Some(acks)))
        }
    }
}
