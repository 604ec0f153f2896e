"""How the replication log reads its partition (``cdp.replog``): one read, checked (an
I/O error is a ``LogError`` naming the place), the kinds of file a partition may be, and
what the recovery scan reads through so that it sees the device, not the page cache."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from cdp import durable
from cdp.errors import LogCorruption, LogError
from cdp.logfmt import BLOCK, Superblock, unpack_superblock


def pread(fd: int, n: int, offset: int, direct: bool = False) -> bytes:
    if direct:
        buf = durable.aligned_buffer(n)
        try:
            got = os.preadv(fd, [buf], offset)
            return bytes(memoryview(buf)[:got])
        finally:
            buf.close()
    return os.pread(fd, n, offset)


def pread_checked(path: Path, fd: int, n: int, offset: int, direct: bool, where: str) -> bytes:
    """``pread``, an I/O error (EIO of a bad sector, …) raised as ``LogError`` naming
    the partition, the offset and ``where`` (a position, a superblock copy)."""
    try:
        return pread(fd, n, offset, direct)
    except OSError as exc:
        raise LogError(f"log partition {path}: cannot read {n} bytes at offset {offset} "
                       f"({where}): {exc.strerror or exc}") from exc


def check_kind(path: Path, fd: int) -> None:
    """Refuse anything but a regular file or a block device (a FIFO, ``/dev/zero``, …)."""
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise LogError(f"log partition {path}: not a regular file or a block device "
                       f"(file type {stat.filemode(mode)[0]!r})")
    os.set_blocking(fd, True)


def scan_source(path: Path, fd: int, direct: bool, *, sync: bool) -> tuple[int, bool]:
    """The fd (and its ``O_DIRECT`` mode) the recovery scan reads through.

    After a failed write-back (fsyncgate), Linux keeps the never-written pages in the
    cache, marked clean: a buffered scan would read entries that are not on the device
    and report them durable. So the scan reads the device: through ``fd`` when it is
    ``O_DIRECT`` already, else through a second, ``O_DIRECT`` open of the same file
    (``/proc/self/fd``: the same inode, whatever ``path`` names now). Where the file
    system refuses ``O_DIRECT``, the cache is dropped instead (``POSIX_FADV_DONTNEED``,
    after an ``fdatasync`` of what a dead writer left dirty when ``sync``): a weaker
    fallback, FORMAT.md §3.5.
    """
    o_direct = getattr(os, "O_DIRECT", 0)
    if direct:
        return fd, True
    if o_direct:
        try:
            scan_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | o_direct)
        except OSError:
            scan_fd = -1
        if scan_fd >= 0:
            try:
                pread(scan_fd, BLOCK, 0, True)  # some file systems refuse only at the read
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    os.close(scan_fd)
                    scan_fd = -1
                # else: the device's error, met again (and reported) by the scan's read
            if scan_fd >= 0:
                return scan_fd, True
    if sync:
        try:
            durable.sync_data(fd)
        except OSError as exc:
            raise LogError(f"log partition {path}: cannot sync before the recovery scan "
                           f"({exc.strerror})") from exc
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, False


def read_superblocks(path: Path, fd: int, direct: bool, size: int) -> tuple[Superblock, str]:
    """The newest valid copy, and why the other one was refused ("" when it was not:
    older is not refused). A copy that cannot be read is refused like a corrupt one,
    and so is one recording more bytes than the partition's ``size``: a partition cut
    short (a file truncated, a LUN shrunk) while stopped would otherwise read its last
    entries short and cut them as a torn tail, acked data lost quietly."""
    found: list[Superblock] = []
    reasons = []
    for i in range(2):
        try:
            raw = pread_checked(path, fd, BLOCK, i * BLOCK, direct, f"superblock copy {i}")
        except LogError as exc:
            reasons.append(f"copy {i}: {exc.message}")
            continue
        sb = unpack_superblock(raw)
        if isinstance(sb, str):
            reasons.append(f"copy {i}: {sb}")
        elif sb.copy_index() != i:
            reasons.append(f"copy {i}: generation {sb.generation} belongs to the other copy")
        elif size < sb.partition_size:
            reasons.append(f"copy {i}: records partition_size {sb.partition_size}, but the "
                           f"partition holds {size} bytes: it was cut short")
        else:
            found.append(sb)
    if not found:
        raise LogCorruption(
            f"log partition {path}: no valid superblock ({'; '.join(reasons)})")
    return max(found, key=lambda s: s.generation), "; ".join(reasons)
