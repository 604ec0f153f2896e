"""Writing a new file's data past the page cache (``O_DIRECT``), for objects written once
and not read back soon: the file store's segments, base chunks, recovered images' peers;
and reading such files past it (``read_direct``, ``read_direct_into``).

Why: a buffered write copies every byte into page-cache pages, and a page freed by a
deleted object and handed out again comes back cold on this project's machines (a VM
whose free pages go back to the host): writing 16 MiB objects into new files while
older ones were deleted measured 1.94 CPU-s/GB and 0.37 GB/s buffered, 0.20-0.24 CPU-s/GB
and 0.88 GB/s direct (once pages are recycled warm, buffered costs 0.32). In the DRVA the
segment writes' copy was 23 % of its CPU under 4 KiB NBD writes (perf).

How: ``O_DIRECT`` wants the memory, the file offset and the length aligned
(``ALIGN``: 4096 covers 512- and 4096-byte devices and page-sized file system blocks).
The data is copied, ``STAGE_BYTES`` at a time, into this thread's page-aligned staging
buffer (reused, so its pages stay warm) and written from there; a last partial block
goes out zero-padded and the file is cut back to the data's length (``ftruncate``).
Nothing here makes data durable: the caller still fsyncs (the device may cache).
A file system that refuses ``O_DIRECT`` (tmpfs, some FUSE and overlay mounts) makes
``write_direct`` return False before anything is written, and the caller writes
buffered.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

from cdp.durable import pwrite_all

ALIGN = 4096
#: The staging buffer of each writing thread; also the size of each direct write.
STAGE_BYTES = 4 << 20
#: Objects smaller than this are written buffered: the copy to the staging buffer and
#: the synchronous direct writes are not worth it for a catalog page or a lock object.
DIRECT_MIN_BYTES = 1 << 20

_local = threading.local()


def _thread_buffer() -> ReadBuffer:
    """This thread's staging buffer (page-aligned, kept warm): ``STAGE_BYTES``, for the
    writes of ``write_direct`` and the stages of ``read_direct``, which never grow it."""
    buf = getattr(_local, "buffer", None)
    if buf is None:
        buf = _local.buffer = ReadBuffer()
    return buf


def _set_direct(fd: int, on: bool) -> bool:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def write_direct(fd: int, data: bytes | bytearray | memoryview) -> bool:
    """Write all of ``data`` at offset 0 of the empty regular file ``fd`` with
    ``O_DIRECT``; False (nothing written, ``fd`` as it was) where the file system
    refuses it. Leaves ``fd`` without ``O_DIRECT``; its file offset is not used."""
    view = memoryview(data).cast("B")
    if not hasattr(os, "O_DIRECT") or not _set_direct(fd, True):
        return False
    try:
        stage = _thread_buffer().window(STAGE_BYTES)
        total = len(view)
        done = 0
        try:
            while done < total:
                n = min(STAGE_BYTES, total - done)
                padded = -(-n // ALIGN) * ALIGN
                stage[:n] = view[done : done + n]
                if padded > n:
                    stage[n:padded] = bytes(padded - n)
                pwrite_all(fd, [stage[:padded]], done)
                done += n
        except OSError as exc:
            if exc.errno != errno.EINVAL or done:
                raise
            return False  # accepted the flag, refused the write: nothing was written
        if total % ALIGN:
            os.ftruncate(fd, total)  # the last block's padding
        return True
    finally:
        _set_direct(fd, False)


def read_direct(fd: int, start: int, end: int) -> bytes | None:
    """Bytes ``[start, end)`` of the regular file ``fd`` (``end`` at most its size), read
    with ``O_DIRECT``; None (``fd`` as it was) where the file system refuses it.

    Why: the objects ``write_direct`` wrote are not in the page cache, so a buffered
    read of them allocates page-cache pages, copies out of them and later reclaims them;
    a cold recovery of 1 GiB spent 15-20 % less CPU reading the store this way (2.7-3.0
    against 3.25-3.8 CPU-s). And a ranged read fetches its aligned blocks only: no
    readahead past it.

    How: ``read_direct_into`` this thread's staging buffer, at most ``STAGE_BYTES`` of
    aligned blocks at a time, each stage's bytes copied out: one copy for a range within
    one stage, two for a longer one (each stage's part, then the join). A read that ends
    at the end of the file returns short there, as ``pread`` does."""
    buf = _thread_buffer()
    parts: list[bytes] = []
    pos = start
    while pos < end:
        stop = min(end, pos - pos % ALIGN + STAGE_BYTES)  # its aligned blocks fill one stage at most
        view = read_direct_into(fd, pos, stop, buf)
        if view is None:
            if parts:  # refused after a first stage was read: an error, not a refusal
                raise OSError(errno.EINVAL, "O_DIRECT read refused part way")
            return None
        parts.append(bytes(view))  # the buffer is read into again
        if len(view) < stop - pos:
            break  # the end of the file
        pos = stop
    return b"".join(parts)  # one part: that very object, not a copy


class ReadBuffer:
    """Page-aligned memory for direct reads, reused read after read so that its pages
    stay warm (a fresh page costs a fault, and on this project's machines a cold one);
    it grows, by whole stages, to the largest read asked of it. One read at a time: a
    view it returned is valid until the next read into it."""

    def __init__(self) -> None:
        self._memory: memoryview | None = None

    def window(self, n: int) -> memoryview:
        if self._memory is None or len(self._memory) < n:
            # The old memory goes when its last view does.
            self._memory = memoryview(mmap.mmap(-1, max(STAGE_BYTES, -(-n // STAGE_BYTES) * STAGE_BYTES)))
        return self._memory[:n]


def read_direct_into(fd: int, start: int, end: int, buf: ReadBuffer) -> memoryview | None:
    """``read_direct`` without the copy: the bytes ``[start, end)`` as a view into
    ``buf``, which the device reads the covering aligned blocks into, in one request and
    without the GIL; None (``fd`` as it was) where the file system refuses ``O_DIRECT``.

    Why: ``read_direct``'s copy out of its staging buffer holds the GIL, and in a cold
    recovery it was 40 % of the time the GIL was held while segments were read (py-spy
    --gil). Reading into buffers the recovery lends and reuses took the 1 GiB recovery
    from a median of 2.43 s to 2.24 s (1.9-2.0 s with buffers warmed beforehand: the
    rest is the first touch of their pages)."""
    if not hasattr(os, "O_DIRECT") or not _set_direct(fd, True):
        return None
    try:
        first = start - start % ALIGN
        window = buf.window(max(-(-end // ALIGN) * ALIGN - first, 0))
        got = 0
        while first + got < end:
            try:
                n = os.preadv(fd, [window[got:]], first + got)
            except OSError as exc:
                if exc.errno == errno.EINVAL and not got:
                    return None  # accepted the flag, refused the read
                raise
            got += n
            if not n or n % ALIGN:
                break  # the end of the file (a partial block, or none)
        lo = start - first
        return window[lo : max(lo, min(end - first, got))]
    finally:
        _set_direct(fd, False)
