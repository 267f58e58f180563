//! How the store reaches Redis: one endpoint (a standalone Redis or a primary), through one or more
//! [`ConnectionManager`]s, or a Redis Cluster, through the cluster client's connection, which routes
//! every command to the primary of its key's slot and follows `MOVED`/`ASK` redirections and
//! topology changes by itself. Either way an operation gets an [`AnyConn`].
//!
//! With Sentinel, the primary is asked of the sentinels (`SENTINEL get-master-addr-by-name`) on first
//! use, and again after any operation finds its connection broken or the node read-only (a failover):
//! the proxy follows a failover without a restart.
//!
//! The cluster connection is made on first use (and again after a failed attempt), so a cluster
//! that is down when the proxy starts makes operations fail until it answers, as with one endpoint.

use ::redis::{
    aio::ConnectionLike, cluster::ClusterClient, cluster_async::ClusterConnection, Cmd,
    ConnectionAddr, ConnectionInfo, Pipeline, RedisFuture,
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
    /// The primary that Sentinel names.
    Sentinel(Arc<SentinelLink>),
}

/// The sentinels, and the connections to the primary they named last.
pub(super) struct SentinelLink {
    sentinels: Vec<ConnectionInfo>,
    master: String,
    /// How to reach a primary (its address replaced by what the sentinels say).
    template: ConnectionInfo,
    connections: usize,
    config: ConnectionManagerConfig,
    timeout: Duration,
    current: Mutex<Option<Arc<[ConnectionManager]>>>,
    resolving: tokio::sync::Mutex<()>,
}

impl SentinelLink {
    pub(super) fn new(
        sentinels: Vec<ConnectionInfo>,
        master: String,
        connections: usize,
        config: ConnectionManagerConfig,
        timeout: Duration,
    ) -> Self {
        let template = sentinels[0].clone();
        Self {
            sentinels,
            master,
            template,
            connections,
            config,
            timeout,
            current: Mutex::new(None),
            resolving: tokio::sync::Mutex::new(()),
        }
    }

    /// The primary's connection settings, as the first sentinel that knows `master` names it.
    pub(super) async fn master_info(&self) -> Result<ConnectionInfo, RedisError> {
        let mut last = None;
        for s in &self.sentinels {
            let asked = tokio::time::timeout(self.timeout, async {
                // Sentinels have no databases: the URL's number is the primary's.
                let settings = s.redis_settings().clone().set_db(0);
                let client = Client::open(s.clone().set_redis_settings(settings))?;
                let mut c = client.get_multiplexed_async_connection().await?;
                ::redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master)
                    .query_async::<Option<(String, u16)>>(&mut c)
                    .await
            })
            .await;
            match asked {
                Ok(Ok(Some((host, port)))) => {
                    let addr = match self.template.addr() {
                        ConnectionAddr::TcpTls {
                            insecure,
                            tls_params,
                            ..
                        } => ConnectionAddr::TcpTls {
                            host,
                            port,
                            insecure: *insecure,
                            tls_params: tls_params.clone(),
                        },
                        _ => ConnectionAddr::Tcp(host, port),
                    };
                    return Ok(self.template.clone().set_addr(addr));
                }
                Ok(Ok(None)) => {
                    last = Some(RedisError::from((
                        ::redis::ErrorKind::Io,
                        "the sentinel does not know this master",
                        self.master.clone(),
                    )))
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(RedisError::from((
                        ::redis::ErrorKind::Io,
                        "no answer from the sentinel",
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| RedisError::from((::redis::ErrorKind::Io, "no sentinel"))))
    }

    async fn managers(&self) -> Result<Arc<[ConnectionManager]>, RedisError> {
        if let Some(m) = self.current.lock().clone() {
            return Ok(m);
        }
        let _one = self.resolving.lock().await;
        if let Some(m) = self.current.lock().clone() {
            return Ok(m);
        }
        let info = self.master_info().await?;
        let managers = lazy_managers(&Client::open(info)?, &self.config, self.connections)?;
        *self.current.lock() = Some(Arc::clone(&managers));
        Ok(managers)
    }
}

/// `n` connections on `client`, each made on first use (and made again by itself after a failure).
pub(super) fn lazy_managers(
    client: &Client,
    config: &ConnectionManagerConfig,
    n: usize,
) -> Result<Arc<[ConnectionManager]>, RedisError> {
    (0..n)
        .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map(Into::into)
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
            Self::Sentinel(s) => {
                let m = s.managers().await?;
                Ok(AnyConn::Single(m[n % m.len()].clone()))
            }
        }
    }

    /// An operation found its connection broken, or the node read-only: with Sentinel, the next one
    /// asks the sentinels again which node is the primary.
    pub(super) fn suspect(&self) {
        if let Self::Sentinel(s) = self {
            *s.current.lock() = None;
        }
    }

    /// Connections to take in turn.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::Single(m) => m.len(),
            Self::Cluster(_) => 1,
            Self::Sentinel(s) => s.connections,
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

/// What a pub/sub push is handed to.
pub(super) type PushFn = Arc<dyn Fn(PushInfo) -> Result<(), Infallible> + Send + Sync>;

/// The pub/sub connection: change messages are published with classic `PUBLISH`, which a cluster
/// delivers on every node, so one subscription anywhere hears them all.
pub(super) enum Sub {
    Single(ConnectionManager),
    /// Made again, on the primary the sentinels name, at every (re)subscription.
    Sentinel {
        link: Arc<SentinelLink>,
        on_push: PushFn,
        conn: Option<ConnectionManager>,
    },
    Cluster {
        client: Box<ClusterClient>,
        conn: Option<ClusterConnection>,
    },
}

impl Sub {
    pub(super) async fn psubscribe(&mut self, pattern: &str) -> Result<(), RedisError> {
        match self {
            Self::Single(c) => c.psubscribe(pattern).await,
            Self::Sentinel {
                link,
                on_push,
                conn,
            } => {
                *conn = None;
                let info = link.master_info().await?;
                let resp3 = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let client = Client::open(info.set_redis_settings(resp3))?;
                let f = Arc::clone(on_push);
                let config = link.config.clone().set_push_sender(move |p: PushInfo| f(p));
                let mut c = ConnectionManager::new_lazy_with_config(client, config)?;
                c.psubscribe(pattern).await?;
                *conn = Some(c);
                Ok(())
            }
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
            Self::Single(c) | Self::Sentinel { conn: Some(c), .. } => {
                ping.query_async::<Value>(c).await.map(drop)
            }
            Self::Sentinel { conn: None, .. } => Ok(()),
            Self::Cluster { conn: Some(c), .. } => ping.query_async::<Value>(c).await.map(drop),
            Self::Cluster { conn: None, .. } => Ok(()),
        }
    }
}
