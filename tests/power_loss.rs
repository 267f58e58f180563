//! Power loss: with `sync = "always"`, nothing acknowledged is lost when the machine loses power, not
//! only when the process crashes (issue: sled makes its log stable with `sync_file_range`, which a power
//! cut does not respect; the store now `fdatasync`s after every flush and syncs new directory entries).
//!
//! The data dir sits on `tests/support/lazyfs.py`, a FUSE file system that keeps every write in its
//! own cache until the file is `fsync`ed or `fdatasync`ed, and drops whatever is not synced at a
//! simulated power cut (after LazyFS, the tool Jepsen uses). Each round runs keyed requests against
//! the real binary, kills it with SIGKILL at a random point, cuts the power, restarts it on the same
//! data dir and checks that every request whose answer reached its client is replayed with that
//! answer and was forwarded exactly once. Before the fix every acknowledged key was forwarded again
//! after the cut.
//!
//! Needs root, `/dev/fuse`, `python3` with `fusepy` and `libfuse2` (`.ci/run` installs them).
//! `IDEMPROXY_POWER_ROUNDS` sets the rounds (default 5), `IDEMPROXY_TEST_SEED` replays a run, and
//! `IDEMPROXY_POWER_SYNC=periodic` runs the same test against the mode that is not power-safe (it
//! fails: that is the check that the test can fail).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, post_key, rng::Rng, Proxy, Upstream};
use tempfile::TempDir;

/// The lazy file system, mounted for one test; unmounted on drop.
struct LazyFs {
    mnt: TempDir,
    _backing: TempDir,
    child: Child,
}

impl LazyFs {
    async fn mount() -> LazyFs {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/lazyfs.py");
        let probe = Command::new("python3")
            .args(["-c", "import fuse"])
            .output()
            .expect("python3 is needed for the power-loss test");
        assert!(
            probe.status.success(),
            "the power-loss test needs fusepy and libfuse2 (pip install fusepy; apt-get install \
             libfuse2 fuse3): {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        let backing = tempfile::tempdir().unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let child = Command::new("python3")
            .arg(&script)
            .arg(backing.path())
            .arg(mnt.path())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let fs = LazyFs {
            mnt,
            _backing: backing,
            child,
        };
        let point = fs.mnt.path().display().to_string();
        // The mount shows in /proc/mounts; nothing signals it otherwise.
        eventually(Duration::from_secs(15), "the FUSE mount", || {
            let point = point.clone();
            async move {
                let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
                mounts
                    .lines()
                    .any(|l| l.split(' ').nth(1) == Some(point.as_str()))
                    .then_some(())
            }
        })
        .await;
        fs
    }

    fn path(&self) -> PathBuf {
        self.mnt.path().to_owned()
    }

    /// The power cut: every write not yet synced is gone.
    fn cut(&self) {
        let r = std::fs::metadata(self.mnt.path().join(".lazyfs-cut"));
        assert!(r.is_err(), "the cut file never exists");
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let quiet = |cmd: &str, args: &[&str]| {
            let _ = Command::new(cmd)
                .args(args)
                .arg(self.mnt.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet("fusermount", &["-u"]);
        quiet("umount", &["-l"]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_results_survive_a_power_cut() {
    let rounds: u64 = std::env::var("IDEMPROXY_POWER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let sync = std::env::var("IDEMPROXY_POWER_SYNC").unwrap_or_else(|_| "always".into());
    let mut rng = Rng::from_env("power_loss");
    let fs = LazyFs::mount().await;
    let up = Upstream::start();
    let mut p = Proxy::builder(up.url())
        .store(&format!("sync = \"{sync}\""))
        .arg("--data-dir")
        .arg(&fs.path().join("data").display().to_string())
        .start()
        .await;
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let (mut total, mut lost) = (0usize, 0usize);
    for round in 0..rounds {
        // Three workers; the cut comes after a random number of answers.
        let stop_after = rng.range(5, 60) as usize;
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let acked = Arc::clone(&acked);
                let answered = Arc::clone(&answered);
                let done = done_tx.clone();
                let addr = p.addr;
                tokio::spawn(async move {
                    for i in 0.. {
                        let key = format!("r{round}-w{w}-{i}");
                        // Some answers are large enough to be stored in chunks.
                        let body =
                            format!("{key}:{}", "p".repeat(if i % 4 == 0 { 9000 } else { 40 }));
                        let r = common::try_send(
                            addr,
                            "POST",
                            "/echo",
                            &[("Idempotency-Key", &key), ("Content-Type", "text/plain")],
                            &body,
                        )
                        .await;
                        let Ok(r) = r else { break };
                        if r.status == 201 && r.body == body.as_bytes() {
                            acked.lock().unwrap().insert(key, body);
                            let n = answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if n + 1 >= stop_after {
                                let _ = done.send(true);
                            }
                        }
                    }
                })
            })
            .collect();
        let mut done_rx = done_rx;
        tokio::time::timeout(Duration::from_secs(60), done_rx.wait_for(|d| *d))
            .await
            .expect("answers within 60 s")
            .unwrap();
        p.sigkill().await;
        for w in workers {
            let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
        }
        fs.cut();
        p.restart().await;
        let snapshot = acked.lock().unwrap().clone();
        let mut lost_now = 0;
        for (key, body) in &snapshot {
            let r = post_key(p.addr, "/echo", key, body).await;
            let hits = up.hits_key(key);
            if !(r.status == 201 && r.replayed() && r.body == body.as_bytes() && hits == 1) {
                lost_now += 1;
                eprintln!(
                    "{key}: acknowledged before the cut, now {} (replayed: {}), forwarded {hits} times",
                    r.status,
                    r.replayed()
                );
            }
        }
        eprintln!(
            "round {round}: cut after {} answers; {} acknowledged so far, {lost_now} lost",
            answered.load(std::sync::atomic::Ordering::SeqCst),
            snapshot.len()
        );
        // Every key acknowledged so far is checked again after each later cut.
        total = snapshot.len();
        lost += lost_now;
    }
    eprintln!(
        "power loss: {rounds} rounds, sync = {sync}: {total} acknowledged keys, each checked after \
         every later cut; {lost} lost"
    );
    assert_eq!(lost, 0, "acknowledged results lost at a power cut");
}
