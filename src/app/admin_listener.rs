//! The admin listener, which a reload may move: the new address is bound first (a failure keeps the
//! old one and says why), then the old listener stops accepting and finishes its open requests. So
//! `idemproxy health --config FILE` always probes where the process listens.

use std::net::SocketAddr;

use parking_lot::Mutex;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};

use super::{bind, local_addr, AppError};
use crate::{
    admin::Admin,
    server::{self, Drain, ServeOptions},
};
use std::sync::Arc;

/// The running admin listener.
pub(super) struct AdminListener {
    admin: Arc<Admin>,
    opts: ServeOptions,
    /// The whole process is stopping.
    stop: watch::Receiver<bool>,
    current: Mutex<Running>,
}

struct Running {
    /// As configured (`admin.listen`), to tell whether a reload moves it.
    configured: SocketAddr,
    moved: oneshot::Sender<()>,
    task: JoinHandle<Drain>,
}

impl AdminListener {
    /// Serves `admin` on `listener` (bound to `configured`) until the process stops or a reload
    /// moves it.
    pub(super) fn start(
        listener: TcpListener,
        configured: SocketAddr,
        admin: Arc<Admin>,
        opts: ServeOptions,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let running = Self::serve(listener, configured, &admin, opts, &stop);
        Self {
            admin,
            opts,
            stop,
            current: Mutex::new(running),
        }
    }

    fn serve(
        listener: TcpListener,
        configured: SocketAddr,
        admin: &Arc<Admin>,
        opts: ServeOptions,
        stop: &watch::Receiver<bool>,
    ) -> Running {
        let (moved, moved_rx) = oneshot::channel::<()>();
        let mut stop = stop.clone();
        let task = tokio::spawn(server::serve(
            listener,
            Arc::clone(admin) as Arc<dyn server::Handler>,
            opts,
            async move {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    _ = moved_rx => {}
                }
            },
        ));
        Running {
            configured,
            moved,
            task,
        }
    }

    /// Moves the listener to `to` (configured address) if it is elsewhere; the address now served.
    pub(super) async fn move_to(&self, to: SocketAddr) -> Result<Option<SocketAddr>, AppError> {
        if self.current.lock().configured == to {
            return Ok(None);
        }
        let listener = bind(to).await?;
        let addr = local_addr(&listener, to);
        let new = Self::serve(listener, to, &self.admin, self.opts, &self.stop);
        let old = std::mem::replace(&mut *self.current.lock(), new);
        let _ = old.moved.send(());
        // The old listener finishes its open requests on its own (bounded by the drain grace).
        drop(old.task);
        Ok(Some(addr))
    }

    /// Waits for the listener to stop (after the process-wide stop).
    pub(super) async fn stopped(self) {
        let task = self.current.into_inner().task;
        let _ = task.await;
    }
}
