"""The one place that knows how to make bytes durable on a local file system.

What POSIX promises, and what it does not: ``write`` returning means the kernel has the
bytes, not the disk; ``fdatasync`` makes a file's data (and the metadata needed to read
it back) durable; a rename or a new directory entry is durable only once the directory
itself is fsynced. ``atomic_write`` combines them so a reader sees the whole old file or
the whole new one, never a mix, even across a power loss.
"""

from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (renames, creations) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Writes a temporary file beside it, fsyncs it, renames it over ``path`` and fsyncs
    the directory. A crash leaves either the old content or the new one; at worst a
    stray ``.tmp-*`` file that the next write's rename never touches.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def preallocate(path: str | os.PathLike[str], size: int) -> None:
    """Create (or grow) a regular file to ``size`` bytes with its blocks allocated.

    Allocating up front means appends never fail with ENOSPC half-way and never need a
    metadata update that ``fdatasync`` would have to flush.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(Path(path).resolve().parent)


def aligned_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of ``size`` bytes, usable with ``O_DIRECT``."""
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))
