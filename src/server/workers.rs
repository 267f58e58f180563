//! Thread-per-core serving: one OS thread per core, each running a current-thread tokio runtime. The
//! accept loop hands each connection to one of them, in turn, and everything that connection does —
//! hyper, the handler, the upstream client's connections (one pool per thread, see
//! `upstream`) — runs on that thread. A request then crosses threads only where it must (the
//! store's syncs), not between work-stealing workers and per-connection tasks on every step, which on
//! two cores cost a quarter of the CPU in the scheduler (see BENCHMARKS.md).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::Duration,
};

use parking_lot::Mutex;

use tokio::sync::mpsc;

/// Work for a thread: runs on it, inside its runtime (so `tokio::spawn` lands there).
pub(super) type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The serving threads.
#[derive(Debug)]
pub struct Workers {
    senders: Mutex<Vec<mpsc::UnboundedSender<Job>>>,
    next: AtomicUsize,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl Workers {
    /// Starts `n` threads (at least one).
    pub fn start(n: usize) -> io::Result<Self> {
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = thread::Builder::new()
                .name(format!("idemproxy-serve-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        while let Some(job) = rx.recv().await {
                            tokio::spawn(job());
                        }
                    });
                    // Whatever is left (idle upstream connections) is dropped; blocking work that
                    // cannot finish must not hold up the exit.
                    rt.shutdown_timeout(Duration::from_millis(100));
                })?;
            senders.push(tx);
            threads.push(handle);
        }
        Ok(Self {
            senders: Mutex::new(senders),
            next: AtomicUsize::new(0),
            threads: Mutex::new(threads),
        })
    }

    /// The number of threads for this machine: one per core.
    pub fn per_core() -> usize {
        thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Runs `job` on the next thread in turn; gives it back if the threads are stopped.
    pub(super) fn submit(&self, job: Job) -> Result<(), Job> {
        let senders = self.senders.lock();
        if senders.is_empty() {
            return Err(job);
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % senders.len();
        senders[i].send(job).map_err(|e| e.0)
    }

    /// Stops the threads once their queues are empty, dropping what still runs on them, and waits.
    /// Call after every connection and task that matters has finished.
    pub fn shutdown(&self) {
        self.senders.lock().clear();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shutdown();
    }
}
