//! Power-safe durability for sled 0.34: the `fdatasync`/`fsync` calls sled itself never makes.
//!
//! sled's `flush()` writes its log with `pwrite` and makes it stable with `sync_file_range` (Linux),
//! which survives a process crash but neither flushes the drive's cache nor the file's metadata (the log
//! grows), so a power cut or a kernel crash can take back what a flush acknowledged. Values too large
//! for a log segment (about 128 KiB, e.g. big recorded responses) go to files under `blobs/` that sled
//! never syncs at all, and new files (blobs, snapshots) need their directory entry synced too.
//!
//! [`DiskSync::after_flush`] runs on the flusher thread right after each successful `Db::flush`, before
//! any waiter is told its write is durable:
//! 1. every blob file created since the last call is `fsync`ed (found by listing `blobs/` whenever the
//!    directory changed recently: a listing is cheap, and mtimes are too coarse to trust alone);
//! 2. the log file `db` is `fdatasync`ed (one call covers every fd of the file, sled's included);
//! 3. `blobs/` and the data directory are `fsync`ed when their entries changed.
//!
//! [`create_private_dir`] and [`make_private`] keep the data dir readable by the proxy's user only
//! (contract rule 17: dirs 0700, files 0600); the binary also sets its umask to 077, so files sled
//! creates later are private from the start.

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// A directory modified less than this long ago is listed again: coarse kernel timestamps can give two
/// changes a few milliseconds apart the same mtime.
const RECENT: Duration = Duration::from_secs(2);

/// The syncs that make a sled data directory power-safe (see the module docs).
#[derive(Debug)]
pub(crate) struct DiskSync {
    dir: PathBuf,
    blobs: PathBuf,
    /// An fd of sled's log file.
    log: File,
    /// Blob files already synced.
    synced_blobs: HashSet<std::ffi::OsString>,
    /// mtimes seen at the last sync (data dir, blobs dir).
    seen: (Option<SystemTime>, Option<SystemTime>),
    /// `fdatasync` calls made, and their total time (for metrics).
    pub(crate) syncs: u64,
    /// The duration of the last `fdatasync` of the log.
    pub(crate) last_sync: Duration,
}

impl DiskSync {
    /// Opens sled's files in `dir` (sled must have opened it already) and syncs everything once, so
    /// files and directories created by the open itself are durable.
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        let mut s = Self {
            dir: dir.to_owned(),
            blobs: dir.join("blobs"),
            log,
            synced_blobs: HashSet::new(),
            seen: (None, None),
            syncs: 0,
            last_sync: Duration::ZERO,
        };
        // Everything present at open is synced once (files of a previous run may never have been).
        for name in ["conf", "db"] {
            let p = dir.join(name);
            if p.exists() {
                File::open(p)?.sync_all()?;
            }
        }
        s.after_flush()?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The data dir's own entry, in case this open created it.
            sync_dir(parent)?;
        }
        Ok(s)
    }

    /// Makes everything the last `Db::flush` wrote power-safe.
    pub(crate) fn after_flush(&mut self) -> io::Result<()> {
        let blobs_mtime = mtime(&self.blobs);
        let new_blobs = if changed(self.seen.1, blobs_mtime) {
            self.sync_new_blobs()?
        } else {
            false
        };
        let started = std::time::Instant::now();
        self.log.sync_data()?;
        self.last_sync = started.elapsed();
        self.syncs += 1;
        if new_blobs || changed(self.seen.1, blobs_mtime) {
            sync_dir(&self.blobs)?;
        }
        let dir_mtime = mtime(&self.dir);
        if changed(self.seen.0, dir_mtime) {
            sync_dir(&self.dir)?;
        }
        self.seen = (dir_mtime, blobs_mtime);
        Ok(())
    }

    /// `fsync`s every blob file not synced before; forgets the ones sled deleted. Whether any was new.
    fn sync_new_blobs(&mut self) -> io::Result<bool> {
        let entries = match fs::read_dir(&self.blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::with_capacity(self.synced_blobs.len());
        let mut any_new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Deleted by sled's blob GC between the listing and the open.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                any_new = true;
            }
            present.insert(name);
        }
        self.synced_blobs = present;
        Ok(any_new)
    }
}

/// The mtime of a directory (`None` when it cannot be read: it is then synced every time).
fn mtime(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Whether a directory may have changed since it was last looked at.
fn changed(before: Option<SystemTime>, now: Option<SystemTime>) -> bool {
    let (Some(before), Some(now)) = (before, now) else {
        return true;
    };
    before != now
        || SystemTime::now()
            .duration_since(now)
            .map_or(true, |age| age < RECENT)
}

/// Creates `dir` (and missing parents) with mode 0700, before sled opens it.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Sets dirs to 0700 and files to 0600 under `dir` (a data dir made by an older version, or by sled
/// without the binary's umask). Entries owned by another user are left alone.
pub(crate) fn make_private(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = rustix::process::geteuid().as_raw();
    let meta = fs::symlink_metadata(dir)?;
    if meta.uid() != me || meta.file_type().is_symlink() {
        return Ok(());
    }
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    if meta.mode() & 0o777 != want {
        fs::set_permissions(dir, fs::Permissions::from_mode(want))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(dir)? {
            make_private(&entry?.path())?;
        }
    }
    Ok(())
}

/// `fsync` of a directory: makes the entries created, renamed or removed in it durable.
pub(crate) fn sync_dir(p: &Path) -> io::Result<()> {
    File::open(p)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_or_changed_directories_are_synced() {
        let old = SystemTime::now() - Duration::from_secs(60);
        assert!(changed(None, Some(old)));
        assert!(changed(Some(old), None));
        assert!(!changed(Some(old), Some(old)));
        assert!(changed(Some(old), Some(old + Duration::from_secs(1))));
        let recent = SystemTime::now();
        assert!(
            changed(Some(recent), Some(recent)),
            "a recent mtime may hide a change"
        );
    }

    #[test]
    fn new_blobs_are_synced_once_and_deleted_ones_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("db"), b"log").unwrap();
        fs::create_dir(dir.path().join("blobs")).unwrap();
        let mut s = DiskSync::open(dir.path()).unwrap();
        assert!(s.synced_blobs.is_empty());
        fs::write(dir.path().join("blobs/17"), b"big value").unwrap();
        s.after_flush().unwrap();
        assert!(s.synced_blobs.contains(std::ffi::OsStr::new("17")));
        assert!(!s.sync_new_blobs().unwrap(), "synced twice");
        fs::remove_file(dir.path().join("blobs/17")).unwrap();
        s.after_flush().unwrap();
        assert!(s.synced_blobs.is_empty());
        assert_eq!(s.syncs, 3);
    }

    #[test]
    fn data_dirs_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/data");
        create_private_dir(&dir).unwrap();
        fs::write(dir.join("db"), b"x").unwrap();
        fs::create_dir(dir.join("blobs")).unwrap();
        fs::write(dir.join("blobs/1"), b"x").unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        make_private(&dir).unwrap();
        let mode = |p: &str| fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode("db"), 0o600);
        assert_eq!(mode("blobs"), 0o700);
        assert_eq!(mode("blobs/1"), 0o600);
    }
}
