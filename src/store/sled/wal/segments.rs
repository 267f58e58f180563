//! The log's files: preallocated segments under `<data dir>/wal/`, reused after each checkpoint.
//!
//! A segment is created once, zero-filled to [`SEGMENT_SIZE`] and synced with its directory entry, so
//! that appending to it later changes no file metadata: the `fdatasync` of a commit then writes data
//! blocks only (no journal commit for a growing file, which `sync_file_range` never covered anyway).
//! A segment whose entries are all checkpointed into sled becomes a spare, and is reused by writing a
//! new header over its start; what it held before stays behind the new entries, and a reader tells it
//! apart by its sequence numbers (see `format`). Files are named by a counter (`00000001.wal`), never
//! renamed: the only directory changes are the creation of a segment (synced at once) and the deletion
//! of a spare beyond [`MAX_SPARES`] (harmless if a power cut undoes it).

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use super::format::{self, HEADER_LEN};
use crate::store::sled::disk_sync::sync_dir;

/// Bytes preallocated per segment: a checkpoint follows each one filled.
pub(crate) const SEGMENT_SIZE: u64 = 4 << 20;
/// Spare segments kept for reuse.
const MAX_SPARES: usize = 2;

/// One segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    path: PathBuf,
    file: File,
}

/// What a segment held at open.
#[derive(Debug)]
pub(crate) struct Found {
    /// First sequence number, from the header.
    pub(crate) start: u64,
    /// Everything after the header.
    pub(crate) body: Vec<u8>,
}

/// The segment being appended to (owned by the writer thread).
#[derive(Debug)]
pub(crate) struct Active {
    seg: Segment,
    /// Sequence number of its first entry.
    start: u64,
    /// Where the next entry goes.
    offset: u64,
}

/// Segments that are not active: full ones waiting for a checkpoint, and spares.
#[derive(Debug)]
pub(crate) struct Pool {
    dir: PathBuf,
    /// Full segments, oldest first, with the last sequence number each holds.
    sealed: VecDeque<(u64, Segment)>,
    spares: Vec<Segment>,
    /// Number for the next segment file.
    next_name: u64,
}

impl Pool {
    /// Opens `dir` (created if missing), returning every segment found with what it holds (for
    /// recovery); the files all become spares: call only once their entries are applied and synced, or
    /// after reading them.
    pub(crate) fn open(dir: &Path) -> io::Result<(Self, Vec<Found>)> {
        if !dir.exists() {
            super::super::disk_sync::create_private_dir(dir)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let mut found = Vec::new();
        let mut spares = Vec::new();
        let mut next_name = 1;
        let mut names: Vec<_> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n: u64 = name.strip_suffix(".wal")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        names.sort();
        for (n, path) in names {
            next_name = next_name.max(n + 1);
            let bytes = fs::read(&path)?;
            if let Some(start) = format::parse_header(&bytes) {
                found.push(Found {
                    start,
                    body: bytes[HEADER_LEN..].to_vec(),
                });
            }
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            spares.push(Segment { path, file });
        }
        found.sort_by_key(|f| f.start);
        Ok((
            Self {
                dir: dir.to_owned(),
                sealed: VecDeque::new(),
                spares,
                next_name,
            },
            found,
        ))
    }

    /// A segment to append to: a spare, or else a new file.
    fn take(&mut self) -> io::Result<Segment> {
        if let Some(s) = self.spares.pop() {
            return Ok(s);
        }
        let path = self.dir.join(format!("{:08}.wal", self.next_name));
        self.next_name += 1;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let zeros = vec![0u8; 1 << 20];
        let result = (|| {
            for _ in 0..SEGMENT_SIZE / zeros.len() as u64 {
                file.write_all(&zeros)?;
            }
            file.sync_all()?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(Segment { path, file })
    }

    /// Makes sure a spare is ready, so the writer's next roll does not create a file.
    pub(crate) fn prepare(&mut self) -> io::Result<()> {
        if self.spares.is_empty() {
            let s = self.take()?;
            self.spares.push(s);
        }
        Ok(())
    }

    /// Segments whose entries are all at or below `cut` (checkpointed into sled) become spares.
    pub(crate) fn release_upto(&mut self, cut: u64) {
        while self.sealed.front().is_some_and(|(last, _)| *last <= cut) {
            let Some((_, seg)) = self.sealed.pop_front() else {
                break;
            };
            if self.spares.len() < MAX_SPARES {
                self.spares.push(seg);
            } else if let Err(e) = fs::remove_file(&seg.path) {
                tracing::warn!(error = %e, path = %seg.path.display(), "could not delete a spare log segment");
            }
        }
    }

    /// Segments waiting for a checkpoint.
    pub(crate) fn sealed(&self) -> usize {
        self.sealed.len()
    }

    /// Starts a segment whose first entry will be `start`.
    pub(crate) fn activate(&mut self, start: u64) -> io::Result<Active> {
        let seg = self.take()?;
        seg.file.write_all_at(&format::header(start), 0)?;
        Ok(Active {
            seg,
            start,
            offset: HEADER_LEN as u64,
        })
    }

    /// Seals `active`, whose last entry is `last`, and makes it the next segment, starting at
    /// `last + 1`. On an error `active` stays as it was (appends then go past its preallocated end).
    pub(crate) fn roll(&mut self, active: &mut Active, last: u64) -> io::Result<()> {
        let next = self.activate(last + 1)?;
        let old = std::mem::replace(active, next);
        self.sealed.push_back((last, old.seg));
        Ok(())
    }
}

impl Active {
    /// Whether `len` more bytes fit in the preallocated part (a segment holding no entry takes any).
    pub(crate) fn fits(&self, len: usize) -> bool {
        self.offset == HEADER_LEN as u64 || self.offset + len as u64 <= SEGMENT_SIZE
    }

    /// The first sequence number of this segment.
    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// Appends `bytes` (whole entries) without syncing.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.seg.file.write_all_at(bytes, self.offset)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// `fdatasync` of the segment: every byte appended (and the header) is durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.seg.file.sync_data()
    }
}
