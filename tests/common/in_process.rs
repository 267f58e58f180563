//! [`InProcess`] serves a `Proxy` built on a store of the test's choosing (usually a
//! [`FailingStore`]), in the test's own runtime, exactly as `idemproxy run` would (same handler, same
//! `server::serve`), minus the admin listener and the sweeper.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use idemproxy::{
    app::ProxyHandler,
    config::{Config, Overrides},
    proxy::Proxy,
    server::{self, Drain, ServeOptions},
    store::Store,
};
use tokio::sync::oneshot;

/// A proxy served in-process on 127.0.0.1:0 over a store of the test's choosing. Stopped on drop.
#[derive(Debug)]
pub struct InProcess {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Drain>>,
}

impl InProcess {
    /// Parses `config` (TOML; must be valid), builds the proxy over `store` and serves it.
    pub async fn start(config: &str, store: Arc<dyn Store>) -> InProcess {
        let config = Config::parse(config, &Overrides::default())
            .unwrap_or_else(|e| panic!("invalid test config:\n{e}\n---\n{config}"));
        let proxy = Arc::new(Proxy::new(&config, store).expect("building the proxy"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = ServeOptions {
            grace: Duration::from_secs(5),
            ..ServeOptions::new(config.server.header_read_timeout, Duration::from_secs(5))
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            listener,
            Arc::new(ProxyHandler(Arc::clone(&proxy))),
            opts,
            async move {
                let _ = rx.await;
            },
        ));
        InProcess {
            addr,
            proxy,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops accepting, drains, and waits for the detached exchanges (bounded).
    pub async fn stop(mut self) -> Drain {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("stopped twice");
        let drain = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("in-process proxy did not stop within 15 s")
            .expect("serve task panicked");
        tokio::time::timeout(Duration::from_secs(15), self.proxy.drain_tasks())
            .await
            .expect("detached exchanges did not finish within 15 s");
        drain
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
