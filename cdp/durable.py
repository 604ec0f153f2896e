"""The one place that knows how to make bytes durable on a local file system.

What POSIX promises, and what it does not: ``write`` returning means the kernel has the
bytes, not the disk; ``fdatasync`` makes a file's data (and the metadata needed to read
it back) durable; a rename or a new directory entry is durable only once the directory
itself is fsynced. ``atomic_write`` combines them so a reader sees the whole old file or
the whole new one, never a mix, even across a power loss.

Every write and sync of the replication log and the metadata repository goes through
``pwrite_all``, ``sync_data`` and ``sync_file`` here (called as ``durable.sync_data``,
looked up at each call), so a test can record their order and check that nothing was
reported durable before a sync covered it (tests/test_durable_order.py): a SIGKILL test
cannot see a missing sync, the page cache survives it.

A failed sync is for good (``StickySync``): after a failed write-back Linux reports the
error once and marks the pages clean, so a second fsync returns 0 for bytes that never
reached the disk ("fsyncgate").
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

from cdp.libc import libc_function

# Most buffers one pwritev takes (Linux's IOV_MAX).
IOV_MAX = 1024

Buffer = bytes | bytearray | memoryview


def sync_data(fd: int) -> None:
    """``fdatasync``: what was written to ``fd`` (and the metadata needed to read it back)
    is durable when this returns. Nothing written may be reported durable before that."""
    os.fdatasync(fd)


def sync_file(fd: int) -> None:
    """``fsync``: as ``sync_data``, and every metadata of the file too (size, times)."""
    os.fsync(fd)


class SyncFailed(OSError):
    """A sync that cannot be believed (``StickySync``): it failed, or one before it (or
    beside it) failed. ``filename`` is the file synced; ``first`` the first failure."""

    def __init__(self, code: int, text: str, filename: str, first: OSError) -> None:
        super().__init__(code, text, filename)
        self.first = first


class StickySync:
    """The syncs of some files (one overlay, the images of one recovery, one dirty map)
    where a failure is for good.

    Why: after a failed write-back, Linux reports the error to one ``fsync`` of each open
    file and marks the pages clean, keeping the lost bytes in the cache; the next fsync
    returns 0 though they never reached the disk (PostgreSQL's "fsyncgate", 2018). So
    once a sync of these files has failed, no later one is believed: ``sync`` and
    ``check`` raise ``SyncFailed`` (EIO) from then on, and the caller must never write a
    record saying that what it wrote since its last good sync is durable. A sync that ran
    beside the failing one is not believed either: the error went to one of them only,
    so each sync waits until every sync begun before it ended (syscalls: a bounded wait)
    and then asks whether any of them failed. Thread-safe."""

    def __init__(self) -> None:
        self.failed: OSError | None = None  # the first failure
        self._cond = threading.Condition()
        self._issued = 0  # syncs begun
        self._running: set[int] = set()  # the numbers of those not ended yet

    def check(self, name: str) -> None:
        """``SyncFailed`` (EIO) naming ``name`` once a sync has failed."""
        first = self.failed
        if first is not None:
            raise SyncFailed(errno.EIO, f"a sync failed earlier ({first.strerror or first}): nothing written "
                                        f"since the last good sync is known to be on the disk", name, first)

    def sync(self, fd: int, name: str, *, data_only: bool = True) -> None:
        """``sync_data`` (``sync_file`` if not ``data_only``) of ``fd``, the file ``name``:
        ``SyncFailed`` if it fails, if one ran beside it and failed, or if one failed before."""
        with self._cond:
            self.check(name)
            ticket = self._issued
            self._issued += 1
            self._running.add(ticket)
        error: OSError | None = None
        try:
            if data_only:
                sync_data(fd)
            else:
                sync_file(fd)
        except OSError as exc:
            error = exc
        finally:
            with self._cond:
                self._running.discard(ticket)
                if error is not None and self.failed is None:
                    self.failed = error
                self._cond.notify_all()
        if error is not None:
            raise SyncFailed(error.errno or errno.EIO, f"sync failed ({error.strerror or error}): the kernel may "
                                                      f"have dropped what was written since the last good sync",
                             name, error) from error
        with self._cond:
            horizon = self._issued  # every sync that began before this one ended
            while self.failed is None and any(t < horizon for t in self._running):
                self._cond.wait()
        self.check(name)


#: libc's ``sync_file_range`` (Linux only), or None.
_sync_file_range = libc_function(["sync_file_range"], [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages not yet under it; no wait


def start_writeout(fd: int) -> bool:
    """Start writing out every dirty page of ``fd`` without waiting for it: a hint that
    makes **nothing** durable (only ``sync_data``/``sync_file`` do) and reports no error
    (a write-back error stays for the fsync to report: without a wait flag,
    ``sync_file_range`` does not consume it). The pages stay cached, so a later write to
    part of one does not read it back. False where there is no ``sync_file_range`` (or
    the file does not take it), true when the write-out was started."""
    if _sync_file_range is None:
        return False
    return _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


def pwrite_all(fd: int, buffers: Sequence[Buffer], offset: int) -> None:
    """``pwritev`` every buffer at ``offset``, resuming after short writes, at most
    ``IOV_MAX`` buffers a call. Like any write, it makes nothing durable (``sync_data``)."""
    views = [memoryview(b).cast("B") for b in buffers]
    i = 0
    while i < len(views):
        batch = views[i : i + IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        for v in batch:
            if written >= len(v):
                written -= len(v)
                i += 1
            else:
                views[i] = v[written:]
                break


def sync_dir(fd: int) -> None:
    """Make the entries of the open directory ``fd`` (creations, renames, links) durable.
    Every directory sync of the project goes through here (``fsync_dir``, ``publish_at``,
    the file store's ``beneath.fsync_dir``), looked up at each call, so one test can drop
    it and watch a power loss take the entries with it."""
    sync_file(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (renames, creations) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sync_dir(fd)
    finally:
        os.close(fd)


def remove(path: str | os.PathLike[str]) -> bool:
    """Unlink ``path`` and make that durable (its directory fsynced); True when it was
    there. A missing ``path`` still has its directory fsynced when that exists: the
    unlink of a run killed before its fsync is in the page cache only, and a power loss
    would bring the file back. Without the fsync a removed record (a job's progress, a
    registration) can come back after a power loss and wedge the next run."""
    path = Path(path)
    try:
        os.unlink(path)
        removed = True
    except FileNotFoundError:
        removed = False
    try:
        fsync_dir(path.parent)
    except FileNotFoundError:
        pass  # no directory, no entry to make durable
    return removed


def write_all(fd: int, data: bytes | bytearray | memoryview, chunk_bytes_max: int = 64 << 20) -> None:
    """``os.write`` all of ``data``, resuming after short writes, in bounded chunks."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + chunk_bytes_max])


def publish_at(dir_fd: int, tmp: str, name: str, *, if_absent: bool = False) -> None:
    """Move the complete, fsynced temporary file ``tmp`` to ``name``, both names in the
    open directory ``dir_fd``, and make the move durable (the directory fsynced).

    Neither name is resolved through a path, and a rename or a link replaces (or fails
    on) the entry ``name``: it never writes through a link planted there. ``if_absent``
    links instead of renaming, so that it fails with ``FileExistsError`` when ``name``
    exists, even against a concurrent writer. ``tmp`` is gone afterwards, whatever
    happened.
    """
    try:
        if if_absent:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        else:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    sync_dir(dir_fd)


def atomic_write_at(dir_fd: int, name: str, data: bytes | bytearray | memoryview, *,
                    if_absent: bool = False, mode: int = 0o600) -> None:
    """Replace ``name`` in the open directory ``dir_fd`` with ``data``, atomically and
    durably: a new temporary file beside it (``O_EXCL|O_NOFOLLOW``: never an existing
    file, never through a link), fsynced (``stage_at``), then ``publish_at``. A crash
    leaves either the old content or the new one; at worst a stray ``.tmp-*`` file that
    the next write's rename never touches."""
    publish_at(dir_fd, stage_at(dir_fd, name, data, mode=mode), name, if_absent=if_absent)


def stage_at(dir_fd: int, name: str, data: bytes | bytearray | memoryview, *, mode: int = 0o600) -> str:
    """The first half of ``atomic_write_at``: ``data`` in a new temporary file beside
    ``name``, fsynced; its name, for ``publish_at``. Nothing is left when it fails (the
    temporary file is removed), and ``name`` is untouched: a caller may try again."""
    tmp = f".tmp-{name}-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        write_all(fd, data)
        sync_file(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    return tmp


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *,
                 if_absent: bool = False) -> None:
    """``atomic_write_at`` of ``path``'s name in its parent directory (``if_absent``:
    ``FileExistsError`` when ``path`` exists)."""
    path = Path(path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            atomic_write_at(dir_fd, path.name, data, if_absent=if_absent)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        # The write of a temporary file beside it fails with no file name (ENOSPC, EROFS):
        # the caller's error would not say which file could not be written.
        if exc.filename is None:
            exc.filename = str(path)
        raise


def create_new(path: str | os.PathLike[str], mode: int = 0o600) -> os.stat_result:
    """Create ``path`` as a new, empty regular file; return its ``fstat``.

    ``O_EXCL`` makes it fail (``FileExistsError``) when anything is at ``path``: a file,
    or a symbolic link, which it never follows, not even a dangling one (``O_NOFOLLOW``
    says so for the last component once more). So a link planted at ``path`` cannot make
    the caller create or truncate a file elsewhere. Nothing is durable yet: the caller
    fsyncs the directory once the file holds what it should (``preallocate`` does).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def preallocate(path: str | os.PathLike[str], size: int) -> None:
    """Create (or grow) a regular file to ``size`` bytes with its blocks allocated.

    Allocating up front means appends never fail with ENOSPC half-way and never need a
    metadata update that ``fdatasync`` would have to flush.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        sync_file(fd)
    finally:
        os.close(fd)
    fsync_dir(Path(path).resolve().parent)


def lock_exclusive(fd: int, error: type[Exception], what: str) -> None:
    """Take an exclusive ``flock`` on the open file ``fd`` without waiting, or raise
    ``error`` naming ``what`` (``"log partition /x"``): when another open file (another
    process, or another ``open`` in this one) holds it, or the file takes no lock. The
    lock belongs to the open file description: closing ``fd`` (and every copy a fork
    made) releases it, so a crashed holder never leaves it behind."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise error(f"{what}: in use by another process (locked)") from None
    except OSError as exc:
        raise error(f"{what}: cannot lock ({exc.strerror})") from exc


def aligned_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of ``size`` bytes, usable with ``O_DIRECT``."""
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))
