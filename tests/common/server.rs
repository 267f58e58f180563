//! The skeleton the test servers share: bind 127.0.0.1:0, serve on a thread of its own with a
//! current-thread runtime, hand every accepted connection to `on_conn` in a task, stop when the
//! returned sender fires or is dropped.

use std::{future::Future, net::SocketAddr};

use tokio::{net::TcpStream, sync::oneshot};

/// Starts a server named `name` (the thread is `name-ADDR`); its address and its stop signal.
pub fn spawn<F, Fut>(name: &str, on_conn: F) -> (SocketAddr, oneshot::Sender<()>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind test server");
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("{name}-{addr}"))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            tokio::spawn(on_conn(stream));
                        }
                    }
                }
            });
            rt.shutdown_background();
        })
        .unwrap();
    (addr, stop_tx)
}
