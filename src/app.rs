//! Wiring for `idemproxy run`: open the store, build the proxy, bind both listeners, serve until a
//! signal, then drain in order — stop accepting, let requests in flight finish and be recorded (bounded
//! by `shutdown_grace`), flush the store, stop the admin listener.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Instant};

use tokio::{net::TcpListener, sync::watch};

use crate::{
    admin::{Admin, Readiness},
    clock::SystemClock,
    config::{defaults::DEFAULT_PERIODIC_FLUSH, Backend, Config},
    proxy::{self, Proxy},
    server::{self, Drain, Handler, ResponseFuture, ServeOptions},
    store::{
        sled::{SledOptions, SledStore},
        Store, StoreError,
    },
};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The store could not be opened.
    #[error("cannot open the store at {path}: {source}")]
    Store {
        /// Data directory.
        path: String,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The proxy could not be built.
    #[error(transparent)]
    Setup(#[from] proxy::SetupError),
    /// A configured feature that this build does not serve yet.
    #[error("{0}")]
    Unsupported(&'static str),
}

struct ProxyHandler(Arc<Proxy>);

impl Handler for ProxyHandler {
    fn call(&self, req: http::Request<hyper::body::Incoming>, peer: SocketAddr) -> ResponseFuture {
        Box::pin(Arc::clone(&self.0).handle(req, peer))
    }
}

/// Opens the configured store.
fn open_store(config: &Config) -> Result<(Arc<dyn Store>, Option<SledStore>), AppError> {
    match config.store.backend {
        Backend::Redis => Err(AppError::Unsupported(
            "store.backend = \"redis\" is not available in this build yet; use \"sled\"",
        )),
        Backend::Sled => {
            let opts = SledOptions {
                path: config.store.path.clone(),
                sync: config.store.sync,
                cache_capacity: config.store.cache_capacity,
                periodic_flush: DEFAULT_PERIODIC_FLUSH,
            };
            let s = SledStore::open(&opts, Arc::new(SystemClock)).map_err(|source| {
                AppError::Store {
                    path: config.store.path.display().to_string(),
                    source,
                }
            })?;
            Ok((Arc::new(s.clone()), Some(s)))
        }
    }
}

/// Runs the proxy until `shutdown` resolves (normally [`server::shutdown::signal`]); returns how the
/// drain went.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<Drain, AppError> {
    if config.server.tls.is_some() {
        return Err(AppError::Unsupported(
            "server.tls is not available in this build yet; terminate TLS in front of idemproxy",
        ));
    }
    let (store, sled) = open_store(&config)?;
    let proxy = Arc::new(Proxy::new(&config, Arc::clone(&store))?);
    let readiness = Arc::new(Readiness::default());
    let listener = bind(config.server.listen).await?;
    let admin_listener = bind(config.admin.listen).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let sweeper = tokio::spawn(sweep_loop(
        Arc::clone(&store),
        config.store.sweep_interval,
        stop_rx.clone(),
    ));

    let opts = ServeOptions {
        header_read_timeout: config.server.header_read_timeout,
        grace: config.server.shutdown_grace,
    };
    let admin = Arc::new(Admin::new(Arc::clone(&store), Arc::clone(&readiness)));
    let admin_addr = local_addr(&admin_listener, config.admin.listen);
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(server::serve(admin_listener, admin, opts, async move {
        let _ = admin_stop.wait_for(|s| *s).await;
    }));

    let addr = local_addr(&listener, config.server.listen);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        backend = store.backend(),
        upstream = %config.upstream.url,
        routes = config.routes.len(),
        "idemproxy starting"
    );
    tracing::info!("admin listener on {admin_addr}");
    tracing::info!("listening on {addr}");

    let draining = Arc::clone(&readiness);
    let started = Instant::now();
    let drain = server::serve(
        listener,
        Arc::new(ProxyHandler(Arc::clone(&proxy))),
        opts,
        async move {
            shutdown.await;
            draining.set_draining();
        },
    )
    .await;
    // Exchanges whose client went away still run detached: let them finish and record.
    let left = config
        .server
        .shutdown_grace
        .saturating_sub(started.elapsed().min(config.server.shutdown_grace));
    let tasks = tokio::time::timeout(
        left.max(std::time::Duration::from_millis(100)),
        proxy.drain_tasks(),
    )
    .await;
    let drain = if drain == Drain::TimedOut || tasks.is_err() {
        tracing::warn!(
            "grace period over with requests still in flight; their claims end with their lease"
        );
        Drain::TimedOut
    } else {
        Drain::Complete
    };
    if let Err(e) = store.flush().await {
        tracing::error!(error = %e, "final flush failed");
    }
    if let Some(s) = sled {
        s.close();
    }
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    let _ = sweeper.await;
    tracing::info!("stopped");
    Ok(drain)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })
}

fn local_addr(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}

/// Deletes expired records every `every` until stopped.
async fn sweep_loop(
    store: Arc<dyn Store>,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match store.sweep().await {
            Ok(s) if s.expired > 0 => {
                tracing::debug!(expired = s.expired, scanned = s.scanned, "swept")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
    }
}
