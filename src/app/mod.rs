//! Wiring for `idemproxy run`: open the store, build the proxy, bind both listeners, serve until a
//! signal, then drain in order — `/readyz` turns 503, stop accepting, let requests in flight finish and
//! be recorded (bounded by `shutdown_grace`), flush the store, stop the admin listener. SIGHUP reloads
//! the config file (see [`reload`]).

mod admin_listener;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Instant};

use admin_listener::AdminListener;

use arc_swap::ArcSwap;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    admin::{Admin, AdminSettings, Readiness},
    clock::SystemClock,
    config::{defaults::DEFAULT_PERIODIC_FLUSH, Backend, Config, Overrides},
    metrics,
    proxy::{self, Proxy},
    server::{self, shutdown::Hangups, Drain, Handler, ResponseFuture, ServeOptions},
    store::{
        instrumented::Instrumented,
        redis::{RedisOptions, RedisStore},
        sled::{SledOptions, SledStore},
        Store, StoreError,
    },
};

/// Where the running config came from, so SIGHUP can read it again.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file (`None`: built-in defaults, nothing to reload).
    pub path: Option<PathBuf>,
    /// Command-line and environment overrides, applied again on reload.
    pub overrides: Overrides,
}

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
    /// The TLS listener's certificate, key or client CA could not be loaded.
    #[error(transparent)]
    Tls(#[from] server::tls::TlsError),
    /// The serving threads could not be started.
    #[error("cannot start the serving threads: {0}")]
    Threads(#[source] std::io::Error),
}

/// The proxy as a [`Handler`] for [`server::serve`] (public so tests can serve a proxy built on a store
/// of their own, e.g. one that injects faults).
#[derive(Debug)]
pub struct ProxyHandler(pub Arc<Proxy>);

impl Handler for ProxyHandler {
    fn call(&self, req: http::Request<hyper::body::Incoming>, peer: SocketAddr) -> ResponseFuture {
        let proxy = Arc::clone(&self.0);
        Box::pin(async move { proxy.handle(req, peer).await.0 })
    }
}

/// Opens the configured store.
fn open_store(config: &Config) -> Result<Arc<dyn Store>, AppError> {
    let backend: Arc<dyn Store> = match config.store.backend {
        Backend::Redis => {
            // Validation guarantees a URL, cluster seed nodes or sentinels with backend = "redis".
            let url = config
                .store
                .redis_url
                .as_deref()
                .or(config.store.redis_cluster.first().map(String::as_str))
                .or(config.store.redis_sentinels.first().map(String::as_str))
                .unwrap_or_default();
            let mut opts = RedisOptions::new(url, &config.store.key_prefix);
            // A frozen Redis is a store error within `[store] timeout` (rule 14).
            opts.op_timeout = config.store.timeout;
            opts.min_replicas = config.store.redis_min_replicas;
            opts.cluster = config.store.redis_cluster.clone();
            opts.sentinels = config.store.redis_sentinels.clone();
            opts.master_name = config.store.redis_master_name.clone();
            Arc::new(RedisStore::open(&opts).map_err(|source| AppError::Store {
                path: crate::config::redact_url(url),
                source,
            })?)
        }
        Backend::Sled => {
            let opts = SledOptions {
                path: config.store.path.clone(),
                sync: config.store.sync,
                cache_capacity: config.store.cache_capacity,
                periodic_flush: DEFAULT_PERIODIC_FLUSH,
                max_size: config.store.max_size,
            };
            Arc::new(
                SledStore::open(&opts, Arc::new(SystemClock)).map_err(|source| {
                    AppError::Store {
                        path: config.store.path.display().to_string(),
                        source,
                    }
                })?,
            )
        }
    };
    // Every backend gets the same bounds, metrics and sweeper.
    Ok(Instrumented::start(
        backend,
        config.store.timeout,
        config.store.sweep_interval,
    ))
}

/// Runs the proxy until `shutdown` resolves (normally [`server::shutdown::signal_then_force`]); returns how the
/// drain went.
pub async fn run(
    config: Config,
    source: Option<ConfigSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<Drain, AppError> {
    // Certificates are read before anything is opened or bound: a bad file fails the start at once.
    let tls = config
        .server
        .tls
        .as_ref()
        .map(server::ServerTls::load)
        .transpose()?;
    // SIGHUP's default action kills the process: listen for it before anything is bound or announced.
    let hangups = Hangups::new();
    metrics::install();
    let store = open_store(&config)?;
    let proxy = Arc::new(Proxy::new(&config, Arc::clone(&store))?);
    let readiness = Arc::new(Readiness::default());
    let listener = bind(config.server.listen).await?;
    let admin_listener = bind(config.admin.listen).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let upkeep = tokio::spawn(upkeep_loop(config.store.sweep_interval, stop_rx.clone()));

    let opts = ServeOptions {
        header_read_timeout: config.server.header_read_timeout,
        grace: config.server.shutdown_grace,
        idle_timeout: config.server.idle_timeout,
        max_connections: config.server.max_connections,
        listener: "proxy",
    };
    let settings = Arc::new(ArcSwap::from_pointee(AdminSettings::from_config(&config)));
    let admin = Arc::new(Admin::new(
        Arc::clone(&store),
        Arc::clone(&readiness),
        Arc::clone(&settings),
    ));
    let admin_addr = local_addr(&admin_listener, config.admin.listen);
    let admin_opts = ServeOptions {
        listener: "admin",
        ..opts
    };
    let admin_listener = Arc::new(AdminListener::start(
        admin_listener,
        config.admin.listen,
        admin,
        admin_opts,
        stop_rx.clone(),
    ));
    let reloader = source.map(|src| {
        let live = Reloadable {
            proxy: Arc::clone(&proxy),
            settings: Arc::clone(&settings),
            admin: Arc::clone(&admin_listener),
        };
        tokio::spawn(reload_loop(
            src,
            config.clone(),
            live,
            tls.clone(),
            hangups,
            stop_rx.clone(),
        ))
    });

    let addr = local_addr(&listener, config.server.listen);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        backend = store.backend(),
        upstream = %config.upstream.url,
        routes = config.routes.len(),
        "idemproxy starting"
    );
    for w in config.warnings() {
        tracing::warn!("config: {w}");
    }
    tracing::info!("admin listener on {admin_addr}");
    if let Some(t) = &tls {
        tracing::info!(
            handshake_timeout = ?t.handshake_timeout(),
            client_certificates = if t.client_auth() { "required" } else { "not requested" },
            "TLS enabled (ALPN h2, http/1.1)"
        );
    }
    tracing::info!("listening on {addr}");

    let draining = Arc::clone(&readiness);
    let started = Instant::now();
    // Connections are served on one thread per core (see `server::Workers`).
    let workers =
        Arc::new(server::Workers::start(server::Workers::per_core()).map_err(AppError::Threads)?);
    let drain = server::serve_on(
        listener,
        tls,
        Arc::new(ProxyHandler(Arc::clone(&proxy))),
        opts,
        Some(Arc::clone(&workers)),
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
    // Nothing that matters runs on the serving threads any more (idle upstream connections).
    let _ = tokio::task::spawn_blocking(move || workers.shutdown()).await;
    let drain = if drain == Drain::TimedOut || tasks.is_err() {
        tracing::warn!(
            "grace period over with requests still in flight; their claims end with their lease"
        );
        Drain::TimedOut
    } else {
        Drain::Complete
    };
    let _ = stop_tx.send(true);
    if let Some(r) = reloader {
        let _ = r.await;
    }
    if let Ok(a) = Arc::try_unwrap(admin_listener) {
        a.stopped().await;
    }
    let _ = upkeep.await;
    if let Err(e) = store.flush().await {
        tracing::error!(error = %e, "final flush failed");
    }
    // Clean only when nothing can write any more (a claim still running after the grace would).
    store.close(drain == Drain::Complete).await;
    tracing::info!("stopped");
    Ok(drain)
}

/// Connections the kernel queues for a listener while the accept loop is at `max_connections` (the
/// usual default of 128 would refuse the rest of a burst); Linux caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    };
    socket
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(LISTEN_BACKLOG)
        })
        .map_err(|source| AppError::Bind { addr, source })
}

fn local_addr(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}

/// Folds metric samples (see [`metrics::upkeep`]) every `every` until stopped (a scrape does it too;
/// this bounds their memory when nothing scrapes).
async fn upkeep_loop(every: std::time::Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        metrics::upkeep();
    }
}

/// On each SIGHUP: read the file again; if valid, apply it to new requests (routes, rules, upstream,
/// limits, admin token) and name the settings that need a restart; if not, keep the running config and
/// log every problem.
/// What a reload changes in the running process.
struct Reloadable {
    proxy: Arc<Proxy>,
    settings: Arc<ArcSwap<AdminSettings>>,
    admin: Arc<AdminListener>,
}

async fn reload_loop(
    src: ConfigSource,
    mut current: Config,
    live: Reloadable,
    tls: Option<server::ServerTls>,
    mut hangups: Hangups,
    mut stop: watch::Receiver<bool>,
) {
    // What the process started with: settings that wait for a restart are compared with it, so
    // putting one back is not reported as a change.
    let started = current.clone();
    loop {
        tokio::select! {
            () = hangups.next() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(path) = src.path.as_deref() else {
            tracing::warn!("SIGHUP: no config file to reload (started without --config)");
            continue;
        };
        match reload(path, &src.overrides, &started) {
            Err(problems) => {
                for p in &problems {
                    tracing::error!("reload: {p}");
                }
                tracing::error!(
                    problems = problems.len(),
                    "reload failed: the running config is kept"
                );
            }
            Ok((new, restart)) => match live.proxy.reload(&new) {
                Ok(()) => {
                    live.settings
                        .store(Arc::new(AdminSettings::from_config(&new)));
                    match live.admin.move_to(new.admin.listen).await {
                        Ok(Some(addr)) => tracing::info!("admin listener moved to {addr}"),
                        Ok(None) => {}
                        Err(e) => tracing::error!(
                            "reload: admin.listen: {e}; the admin listener stays where it is"
                        ),
                    }
                    for field in &restart {
                        tracing::warn!("reload: {field} changed; it takes effect after a restart");
                    }
                    for w in new.warnings() {
                        tracing::warn!("config: {w}");
                    }
                    tracing::info!(routes = new.routes.len(), "config reloaded");
                    current = new;
                }
                Err(e) => tracing::error!(error = %e, "reload failed: the running config is kept"),
            },
        }
        // Certificate files are read again on every SIGHUP (rotation), even when the config file is
        // unchanged or invalid; the paths are those of the running config.
        if let (Some(t), Some(cfg)) = (&tls, &current.server.tls) {
            match t.reload(cfg) {
                Ok(()) => tracing::info!(cert = %cfg.cert.display(), "TLS certificates reloaded"),
                Err(e) => {
                    tracing::error!("TLS reload failed: {e}; the current certificates stay in use")
                }
            }
        }
    }
}

/// Loads the file again: the new config, and the settings that differ from what the process runs
/// (`current`: the config it started with) but only apply after a restart.
pub fn reload(
    path: &std::path::Path,
    overrides: &Overrides,
    current: &Config,
) -> Result<(Config, Vec<&'static str>), Vec<String>> {
    let new = Config::load(Some(path), overrides)
        .map_err(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let mut restart = Vec::new();
    if new.server.listen != current.server.listen {
        restart.push("server.listen");
    }
    // Certificate, key and client CA paths apply on reload; switching TLS on or off does not.
    match (&new.server.tls, &current.server.tls) {
        (Some(a), Some(b)) if a.handshake_timeout != b.handshake_timeout => {
            restart.push("server.tls.handshake_timeout");
        }
        (Some(_), Some(_)) | (None, None) => {}
        _ => restart.push("server.tls"),
    }
    if new.server.header_read_timeout != current.server.header_read_timeout {
        restart.push("server.header_read_timeout");
    }
    if new.server.shutdown_grace != current.server.shutdown_grace {
        restart.push("server.shutdown_grace");
    }
    if new.server.idle_timeout != current.server.idle_timeout {
        restart.push("server.idle_timeout");
    }
    if new.server.max_connections != current.server.max_connections {
        restart.push("server.max_connections");
    }
    if new.upstream.max_concurrency != current.upstream.max_concurrency {
        restart.push("upstream.max_concurrency");
    }
    // The exporter is built once, at start.
    if new.telemetry != current.telemetry {
        restart.push("telemetry.otlp_endpoint");
    }
    // The store is opened once: every one of its settings waits for a restart.
    let (a, b) = (&new.store, &current.store);
    let store_keys = [
        ("store.backend", a.backend != b.backend),
        ("store.path", a.path != b.path),
        ("store.sync", a.sync != b.sync),
        ("store.cache_capacity", a.cache_capacity != b.cache_capacity),
        ("store.sweep_interval", a.sweep_interval != b.sweep_interval),
        ("store.max_size", a.max_size != b.max_size),
        ("store.timeout", a.timeout != b.timeout),
        ("store.redis_url", a.redis_url != b.redis_url),
        ("store.redis_cluster", a.redis_cluster != b.redis_cluster),
        (
            "store.redis_sentinels",
            a.redis_sentinels != b.redis_sentinels,
        ),
        (
            "store.redis_master_name",
            a.redis_master_name != b.redis_master_name,
        ),
        ("store.key_prefix", a.key_prefix != b.key_prefix),
        (
            "store.redis_min_replicas",
            a.redis_min_replicas != b.redis_min_replicas,
        ),
    ];
    restart.extend(
        store_keys
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(k, _)| *k),
    );
    Ok((new, restart))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(dir: &std::path::Path, name: &str, toml: &str) -> (std::path::PathBuf, Config) {
        let path = dir.join(name);
        std::fs::write(&path, toml).unwrap();
        let cfg = Config::load(Some(&path), &Overrides::default()).unwrap();
        (path, cfg)
    }

    #[test]
    fn a_reload_names_each_store_key_that_waits_for_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let base = "[upstream]\nurl = \"http://127.0.0.1:9\"\n[store]\ntimeout = \"2s\"\n";
        let (path, current) = load(dir.path(), "a.toml", base);
        let (_, restart) = reload(&path, &Overrides::default(), &current).unwrap();
        assert!(restart.is_empty(), "{restart:?}");

        let changed = "[upstream]\nurl = \"http://127.0.0.1:9\"\n[store]\ntimeout = \"3s\"\ncache_capacity = \"32MiB\"\n";
        std::fs::write(&path, changed).unwrap();
        let (_, restart) = reload(&path, &Overrides::default(), &current).unwrap();
        assert_eq!(restart, ["store.cache_capacity", "store.timeout"]);
    }
}
