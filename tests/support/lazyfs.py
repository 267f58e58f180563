#!/usr/bin/env python3
"""A FUSE file system that loses every write not yet synced when the power is "cut" (after LazyFS,
the tool Jepsen uses for this).

    lazyfs.py BACKING MOUNTPOINT

Mounts MOUNTPOINT as a pass-through view of BACKING, except that file data written through it stays in
this process's memory (a page cache of its own) until the file is `fsync`ed or `fdatasync`ed through any
of its descriptors; reads see the cached data. Reading the attributes of `MOUNTPOINT/.lazyfs-cut` (e.g. `stat`) is the power cut: every unsynced
write is dropped (files shrink back to their synced size), as a machine losing power loses its page
cache; the `stat` returns once it is done, and fails with ENOENT. The kernel's own cache is bypassed
(`direct_io`, no attribute cache), so nothing dropped here can be read back from it. Metadata
operations (create, mkdir, rename, unlink) reach BACKING at once, which is kinder than a real disk and
never hides a missing data sync. `sync_file_range` does not reach a FUSE file system at all: only
`fsync`/`fdatasync` make data survive here. SIGTERM unmounts.

The proxy under test must survive the cut: whatever it acknowledged was synced first.
Needs fusepy (pip install fusepy) and libfuse2.
"""

import errno
import os
import sys
import threading

from fuse import FUSE, FuseOSError, Operations


class Pending:
    """Writes to one file not yet synced, in order; applied over the backing file's bytes."""

    def __init__(self, size):
        self.ops = []  # ("w", offset, bytes) | ("t", length)
        self.size = size  # the file's size as this cache sees it

    def write(self, data, offset):
        self.ops.append(("w", offset, bytes(data)))
        self.size = max(self.size, offset + len(data))

    def truncate(self, length):
        self.ops.append(("t", length))
        self.size = length

    def overlay(self, buf, offset):
        """`buf` holds the backing bytes from `offset` on: apply the pending writes to it."""
        end = offset + len(buf)
        for op in self.ops:
            if op[0] == "t":
                cut = op[1]
                if cut < end:
                    start = max(cut - offset, 0)
                    for i in range(start, len(buf)):
                        buf[i] = 0
            else:
                _, woff, data = op
                lo, hi = max(woff, offset), min(woff + len(data), end)
                if lo < hi:
                    buf[lo - offset:hi - offset] = data[lo - woff:hi - woff]
        return buf


class LazyFS(Operations):
    def __init__(self, root):
        self.root = root
        self.pending = {}  # path -> Pending
        self.mutex = threading.RLock()
        self.syncs = 0

    def _full(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    # --- power cut ---------------------------------------------------------------------------------

    def cut(self, *_):
        with self.mutex:
            lost = sum(len(p.ops) for p in self.pending.values())
            self.pending.clear()
        sys.stderr.write(f"lazyfs: power cut, {lost} unsynced writes dropped\n")
        sys.stderr.flush()

    # --- metadata, straight through ----------------------------------------------------------------

    def access(self, path, mode):
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        if path == "/.lazyfs-cut":
            self.cut()
            raise FuseOSError(errno.ENOENT)
        st = os.lstat(self._full(path))
        attrs = {k: getattr(st, k) for k in (
            "st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")}
        with self.mutex:
            p = self.pending.get(path)
            if p is not None:
                attrs["st_size"] = p.size
        return attrs

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._full(path))

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._full(path), uid, gid)

    def mkdir(self, path, mode):
        os.mkdir(self._full(path), mode)

    def rmdir(self, path):
        os.rmdir(self._full(path))

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        return {k: getattr(st, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
            "f_frsize", "f_namemax")}

    def unlink(self, path):
        with self.mutex:
            self.pending.pop(path, None)
        os.unlink(self._full(path))

    def rename(self, old, new):
        with self.mutex:
            p = self.pending.pop(old, None)
            if p is not None:
                self.pending[new] = p
        os.rename(self._full(old), self._full(new))

    def utimens(self, path, times=None):
        os.utime(self._full(path), times)

    # --- data, through the cache --------------------------------------------------------------------

    def open(self, path, flags):
        return os.open(self._full(path), flags & ~(os.O_APPEND))

    def create(self, path, mode, fi=None):
        return os.open(self._full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, length, offset, fh):
        with self.mutex:
            p = self.pending.get(path)
            if p is None:
                return os.pread(fh, length, offset)
            length = max(0, min(length, p.size - offset))
            buf = bytearray(os.pread(fh, length, offset))
            buf.extend(b"\0" * (length - len(buf)))
            return bytes(p.overlay(buf, offset))

    def write(self, path, data, offset, fh):
        with self.mutex:
            p = self.pending.get(path)
            if p is None:
                p = self.pending[path] = Pending(os.fstat(fh).st_size)
            p.write(data, offset)
        return len(data)

    def truncate(self, path, length, fh=None):
        with self.mutex:
            p = self.pending.get(path)
            if p is None:
                p = self.pending[path] = Pending(os.lstat(self._full(path)).st_size)
            p.truncate(length)

    def _sync(self, path):
        with self.mutex:
            p = self.pending.pop(path, None)
            if p is None:
                return
            fd = os.open(self._full(path), os.O_WRONLY)
            try:
                for op in p.ops:
                    if op[0] == "t":
                        os.ftruncate(fd, op[1])
                    else:
                        os.pwrite(fd, op[2], op[1])
                os.fsync(fd)
            finally:
                os.close(fd)
            self.syncs += 1

    def fsync(self, path, datasync, fh):
        self._sync(path)

    def fsyncdir(self, path, datasync, fh):
        return 0

    def flush(self, path, fh):
        return 0  # close() is not a sync

    def release(self, path, fh):
        os.close(fh)


def main():
    backing, mountpoint = sys.argv[1], sys.argv[2]
    fs = LazyFS(os.path.realpath(backing))
    FUSE(fs, mountpoint, foreground=True, nothreads=False, direct_io=True, attr_timeout=0,
         entry_timeout=0, negative_timeout=0)


if __name__ == "__main__":
    main()
