//! The pub/sub connection that wakes in-process waiters when a record changes on any replica.

use super::*;
use link::Sub;

/// Handles one push of the pub/sub connection (runs on the connection's task: must not block).
pub(super) fn on_push(names: &Names, watchers: &Watchers, lost: &Notify, push: PushInfo) {
    let channel = match push.kind {
        PushKind::PMessage => push.data.get(1),
        PushKind::Message => push.data.first(),
        PushKind::Disconnection => {
            lost.notify_one();
            return;
        }
        _ => return,
    };
    let name = match channel {
        Some(Value::BulkString(b)) => b.as_slice(),
        Some(Value::SimpleString(s)) => s.as_bytes(),
        _ => return,
    };
    if let Some(key) = names.parse_channel(name) {
        watchers.notify(&key);
    }
}

/// Keeps the pub/sub connection subscribed: (re)subscribes with backoff, then watches the connection
/// (disconnection pushes and a heartbeat). After each (re)subscription every waiter looks again, since
/// changes made while nobody listened were not heard.
pub(super) async fn subscribe_loop(
    mut sub: Sub,
    pattern: String,
    watchers: Arc<Watchers>,
    lost: Arc<Notify>,
    subscribed: watch::Sender<bool>,
    op_timeout: Duration,
) {
    let mut backoff = PUBSUB_BACKOFF.0;
    let mut failing = false;
    loop {
        match tokio::time::timeout(op_timeout, sub.psubscribe(&pattern)).await {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!("redis change notifications are back");
                }
                failing = false;
                backoff = PUBSUB_BACKOFF.0;
                subscribed.send_replace(true);
                watchers.notify_all();
            }
            r => {
                if !failing {
                    let error = match r {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {op_timeout:?}"),
                    };
                    tracing::warn!(
                        %error,
                        "redis change notifications unavailable; waiters fall back to their lease timer"
                    );
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PUBSUB_BACKOFF.1);
                continue;
            }
        }
        loop {
            tokio::select! {
                () = lost.notified() => break,
                () = tokio::time::sleep(PUBSUB_HEARTBEAT) => {
                    let alive = tokio::time::timeout(op_timeout, sub.ping()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        subscribed.send_replace(false);
    }
}
