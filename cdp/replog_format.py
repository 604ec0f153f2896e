"""Formatting a replication-log partition (FORMAT.md §3.1): never under a writer, never
over data by accident, a new file's data area zero-filled once."""

from __future__ import annotations

import os
import stat
from pathlib import Path

# Every write and sync goes through cdp.durable, looked up at each call (test_durable_order.py).
from cdp import durable
from cdp.errors import ConfigError, LogCorruption, LogError
from cdp.frame import FRAME_LEN_MAX
from cdp.logfmt import (
    BLOCK, DATA_SIZE_MIN, DATA_START, Superblock, entry_stride, pack_superblock, unpack_entry_header,
)
from cdp.replog_reads import check_kind, pread_checked, read_superblocks

#: ``format_partition`` writes a new file's data area with zeros in writes of this size.
ZERO_FILL_CHUNK_BYTES = 8 << 20


def format_partition(path: Path, size: int | None, *, label: str, commit_bytes_max: int, force: bool) -> None:
    """Create a partition: preallocate a regular file of ``size`` bytes (or use the
    whole block device at ``path``) and write both superblocks. Destroys the log.

    Never under a writer: the exclusive lock ``open`` takes (§3.2) is taken before
    anything is written and held to the end, so a partition a running DRVA holds is
    refused (``LogError``, "in use"). Never over data by accident: without ``force``,
    an existing regular file that is not empty, or a block device that holds a valid
    superblock, is refused with a ``LogError`` saying what it holds (a log's label and
    whether it has entries, or how many bytes of other data). A new file is created
    with ``O_EXCL``, never through a symbolic link; an existing path is opened as named
    (a ``/dev/disk/by-id`` link to a LUN is one).

    A new file's data area is written with zeros once, here: ``posix_fallocate``
    leaves *unwritten* extents (ext4, XFS), and the first write into one converts it,
    a metadata change that the append's ``fdatasync`` must then commit to the file
    system's journal. Measured on this project's 2-core VM (ext4): appends of 16 MiB
    group commits into a fresh fallocated file ran at 440–1,180 MB/s, into a
    zero-filled one at 1,775–2,090 MB/s. Formatting costs one write of the file.
    """
    fd, created = _open_to_format(path)  # created: (st_dev, st_ino) of a file made here
    try:
        check_kind(path, fd)
        durable.lock_exclusive(fd, LogError, f"log partition {path}")  # as a writer's open (§3.2)
        is_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        if not force:
            _refuse_if_in_use(path, fd, is_device)
        if not is_device:
            if size is None:
                size = os.lseek(fd, 0, os.SEEK_END)  # a file formatted again (force) keeps its size
            if size == 0:
                raise ConfigError(f"log partition {path}: a size is needed to create a file")
            _allocate(path, fd, size)
        _write_format(path, fd, is_device, label, commit_bytes_max)
    except BaseException:
        os.close(fd)  # releases the lock too
        if created is not None:
            _remove_created(path, created)
        raise
    os.close(fd)
    if not is_device:
        durable.fsync_dir(path.resolve().parent)


def _open_to_format(path: Path) -> tuple[int, tuple[int, int] | None]:
    """An fd of ``path`` opened for ``format``, and the (device, inode) of the file when
    this call created it (None: it was there). ``O_CREAT|O_EXCL|O_NOFOLLOW`` creates only
    a new file: a link planted at ``path``, even a dangling one, is never created through.
    An existing path is opened as named, links followed; ``O_NONBLOCK`` so that a FIFO
    there does not wait for a writer (``check_kind`` refuses it)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LogError(f"log partition {path}: cannot create ({exc.strerror})") from exc
    else:
        st = os.fstat(fd)
        return fd, (st.st_dev, st.st_ino)
    try:
        return os.open(path, flags), None
    except OSError as exc:
        raise LogError(f"log partition {path}: cannot open ({exc.strerror})") from exc


def _refuse_if_in_use(path: Path, fd: int, is_device: bool) -> None:
    """``LogError`` saying what ``fd`` holds when formatting it would destroy something:
    any byte of a regular file, a valid superblock on a block device (a new LUN holds
    whatever its array left; only a log on it is taken for data here)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return
    try:
        sb, _ = read_superblocks(path, fd, False, size)
    except LogCorruption:  # no valid superblock copy: not a log
        if is_device:
            return
        held = f"{size:,} bytes of other data (not a replication log: no valid superblock)"
    else:
        held = _log_summary(path, fd, sb)
    raise LogError(f"log partition {path}: holds {held}; formatting would destroy it: format with "
                   f"force (`cdp log format --force`) only if nothing there is needed")


def _log_summary(path: Path, fd: int, sb: Superblock) -> str:
    """What a valid superblock says of its log, for ``_refuse_if_in_use``: its label, and
    whether an entry starts at its head (acked frames not yet shipped may be in it)."""
    label = f"labelled {sb.label!r}" if sb.label else "unlabelled"
    raw = pread_checked(path, fd, BLOCK, DATA_START + sb.head % sb.data_size, False, f"position {sb.head}")
    first = unpack_entry_header(raw, sb.head, sb.uuid, FRAME_LEN_MAX)
    entries = "no entry at its head" if isinstance(first, str) else f"entries from position {sb.head} on"
    return f"a replication log ({label}, epoch {sb.epoch}) with {entries}"


def _allocate(path: Path, fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the regular file ``fd`` (durable with the format's sync):
    appends then never meet ENOSPC half-way (``durable.preallocate``, on an open file)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise LogError(f"log partition {path}: cannot allocate {size:,} bytes ({exc.strerror})") from exc


def _write_format(path: Path, fd: int, is_device: bool, label: str, commit_bytes_max: int) -> None:
    """Both superblocks, the first data block cleared, a file's data area zeroed, synced."""
    part_size = os.lseek(fd, 0, os.SEEK_END)
    data_size = (part_size - DATA_START) // BLOCK * BLOCK
    if data_size < DATA_SIZE_MIN:
        raise ConfigError(
            f"log partition {path}: {part_size} bytes; at least {DATA_START + DATA_SIZE_MIN} needed")
    if commit_bytes_max < entry_stride(FRAME_LEN_MAX):
        raise ConfigError(
            f"log partition {path}: commit_bytes_max {commit_bytes_max} is below the "
            f"largest entry ({entry_stride(FRAME_LEN_MAX)} bytes)")
    sb = Superblock.new(part_size, data_size, commit_bytes_max, label)
    # Both copies, generations 0 and 1, so neither holds an older partition's state.
    durable.pwrite_all(fd, [pack_superblock(sb)], 0)
    durable.pwrite_all(fd, [pack_superblock(sb.next())], BLOCK)
    # Clear the first data block: a fresh file is zero anyway; a reused device
    # could hold anything, and entries of an earlier format are refused by uuid.
    durable.pwrite_all(fd, [bytes(BLOCK)], DATA_START)
    if not is_device:
        _zero_fill(fd, DATA_START + BLOCK, part_size)
    durable.sync_file(fd)


def _remove_created(path: Path, created: tuple[int, int]) -> None:
    """Remove the file a failed ``format`` created (so that a retry needs no force),
    only if ``path`` still names that file."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == created:
            os.unlink(path)
    except OSError:
        pass  # gone already, or not ours to remove: the format's own error is the one to report


def _zero_fill(fd: int, start: int, end: int) -> None:
    """Write zeros over ``[start, end)`` (see ``format_partition``); not synced."""
    zeros = memoryview(bytes(min(ZERO_FILL_CHUNK_BYTES, max(0, end - start))))
    at = start
    while at < end:
        n = min(len(zeros), end - at)
        durable.pwrite_all(fd, [zeros[:n]], at)
        at += n
