//! How the store reaches Redis: one endpoint (a standalone Redis or a primary), through one or more
//! [`ConnectionManager`]s, or a Redis Cluster, through the cluster client's connection, which routes
//! every command to the primary of its key's slot and follows `MOVED`/`ASK` redirections and
//! topology changes by itself. Either way an operation gets an [`AnyConn`].
//!
//! The cluster connection is made on first use (and again after a failed attempt), so a cluster
//! that is down when the proxy starts makes operations fail until it answers, as with one endpoint.

use ::redis::{
    aio::ConnectionLike, cluster::ClusterClient, cluster_async::ClusterConnection, Cmd, Pipeline,
    RedisFuture,
};
use tokio::sync::OnceCell;

use super::*;

/// The connections of a store.
#[derive(Clone)]
pub(super) enum Link {
    /// One endpoint; several connections when writes wait for replicas (see `conn`).
    Single(Arc<[ConnectionManager]>),
    /// A Redis Cluster.
    Cluster(Arc<ClusterLink>),
}

/// A Redis Cluster client and its connection, once made.
pub(super) struct ClusterLink {
    pub(super) client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

impl ClusterLink {
    pub(super) fn new(client: ClusterClient) -> Self {
        Self {
            client,
            conn: OnceCell::new(),
        }
    }
}

impl Link {
    /// The `n`-th connection (they are taken in turn).
    pub(super) async fn get(&self, n: usize) -> Result<AnyConn, RedisError> {
        match self {
            Self::Single(m) => Ok(AnyConn::Single(m[n % m.len()].clone())),
            Self::Cluster(c) => {
                let conn = c
                    .conn
                    .get_or_try_init(|| c.client.get_async_connection())
                    .await?;
                Ok(AnyConn::Cluster(conn.clone()))
            }
        }
    }

    /// Connections to take in turn.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::Single(m) => m.len(),
            Self::Cluster(_) => 1,
        }
    }
}

/// One connection of either kind.
pub(super) enum AnyConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The pub/sub connection: change messages are published with classic `PUBLISH`, which a cluster
/// delivers on every node, so one subscription anywhere hears them all.
pub(super) enum Sub {
    Single(ConnectionManager),
    Cluster {
        client: Box<ClusterClient>,
        conn: Option<ClusterConnection>,
    },
}

impl Sub {
    pub(super) async fn psubscribe(&mut self, pattern: &str) -> Result<(), RedisError> {
        match self {
            Self::Single(c) => c.psubscribe(pattern).await,
            Self::Cluster { client, conn } => {
                if conn.is_none() {
                    *conn = Some(client.get_async_connection().await?);
                }
                match conn.as_mut() {
                    Some(c) => c.psubscribe(pattern).await,
                    None => Ok(()),
                }
            }
        }
    }

    pub(super) async fn ping(&mut self) -> Result<(), RedisError> {
        let ping = ::redis::cmd("PING");
        match self {
            Self::Single(c) => ping.query_async::<Value>(c).await.map(drop),
            Self::Cluster { conn: Some(c), .. } => ping.query_async::<Value>(c).await.map(drop),
            Self::Cluster { conn: None, .. } => Ok(()),
        }
    }
}
