"""Placing recovered bytes in image files: pwrites that leave zero pages as holes, and
``Writeback``, which gets the images written out while a recovery still places bytes.

The images are fresh sparse files and every byte is written by one piece only
(``rocva.work_units``), which is what lets a whole zero page be skipped; a file not
known to be zero there is written densely (``sparse=False``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from cdp import durable
from rocva.plan import SRC_WRITE, RecoveryPlan
from rocva.work_units import PAGE, Unit

__all__ = ["EARLY_WRITEOUT_BYTES", "WRITEBACK_REGION_DEFAULT", "ImageWriteError", "Writeback", "pwrite_image",
           "pwrite_sparse", "region_parts", "write_piece", "zero_pages_before"]


class ImageWriteError(OSError):
    """A ``pwrite`` into an image failed (a full file system, a failing disk): ``fd`` and
    ``offset``, ``length`` of the write, for the caller, who knows which image ``fd`` is,
    to name it."""

    def __init__(self, exc: OSError, fd: int, offset: int, length: int) -> None:
        super().__init__(exc.errno, exc.strerror)
        self.fd = fd
        self.offset = offset
        self.length = length


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Every byte of ``data`` at ``offset``; a failure is an ``ImageWriteError`` (where
    ``cdp.durable.pwrite_all`` raises the bare OSError), so the recovery can name the image."""
    while len(data):
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as exc:
            raise ImageWriteError(exc, fd, offset, len(data)) from exc
        data, offset = data[n:], offset + n


def pwrite_sparse(fd: int, data: memoryview, offset: int) -> None:
    """pwrite ``data`` at ``offset``, skipping the whole file pages it would fill with zeros.

    The image is a fresh sparse file and every byte is written by one piece only, so a
    zero page left unwritten already reads as zeros, and stays a hole (a base chunk is
    often partly empty). Head and tail fragments of pages are always written.
    """
    head = -offset % PAGE
    pages = (len(data) - head) // PAGE if len(data) >= head else 0
    if pages < 1:
        _pwrite_all(fd, data, offset)
        return
    words = np.frombuffer(data[head : head + pages * PAGE], dtype=np.uint64).reshape(pages, PAGE // 8)
    full = words.any(axis=1)
    if full.all():
        _pwrite_all(fd, data, offset)
        return
    edges = np.flatnonzero(np.diff(np.concatenate([[False], full, [False]]).astype(np.int8)))
    if head:
        _pwrite_all(fd, data[:head], offset)
    for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):  # runs of non-zero pages
        lo, hi = head + a * PAGE, head + b * PAGE
        _pwrite_all(fd, data[lo:hi], offset + lo)
    tail = head + pages * PAGE
    if tail < len(data):
        _pwrite_all(fd, data[tail:], offset + tail)


def zero_pages_before(buf) -> list[int]:
    """``z[i]``: how many of the first ``i`` whole pages of ``buf`` are all zero bytes.

    One numpy pass per decoded block or chunk, so that writing one of its (often
    hundreds of) pieces costs a little arithmetic and a pwrite, not a zero scan of its
    own. (``max`` over the words: faster than ``any``, which casts every word to bool.)"""
    pages = len(buf) // PAGE
    words = np.frombuffer(buf, dtype=np.uint64, count=pages * (PAGE // 8)).reshape(pages, PAGE // 8)
    z = np.zeros(pages + 1, dtype=np.int64)
    np.cumsum(words.max(axis=1, initial=0) == 0, out=z[1:])
    return z.tolist()


def pwrite_image(fd: int, data: memoryview, offset: int, sparse: bool) -> None:
    """``pwrite_sparse`` if ``sparse``, else every byte."""
    if sparse:
        pwrite_sparse(fd, data, offset)
    else:
        _pwrite_all(fd, data, offset)


def write_piece(fd: int, mv: memoryview, x0: int, x1: int, offset: int, zeros: list[int] | None) -> None:
    """pwrite ``mv[x0:x1]`` at ``offset`` exactly as ``pwrite_sparse`` would (whole zero
    pages stay holes): one pwrite when ``zeros`` (``zero_pages_before(mv)``) shows the
    piece has no whole zero page, which needs the buffer's pages to be the file's.
    ``zeros`` None: dense, every byte written (the file is not known to be zero there)."""
    if zeros is None:
        _pwrite_all(fd, mv[x0:x1], offset)
        return
    if (offset - x0) % PAGE == 0:
        p0, p1 = -(-x0 // PAGE), x1 // PAGE
        if p1 <= p0 or zeros[p1] == zeros[p0]:
            _pwrite_all(fd, mv[x0:x1], offset)
            return
    pwrite_sparse(fd, mv[x0:x1], offset)



def region_parts(offset: np.ndarray, length: np.ndarray, region: int) -> tuple[np.ndarray, np.ndarray]:
    """(region, bytes): how many bytes of the pieces ``[offset, offset + length)`` fall in
    each region of ``region`` bytes they touch, one entry per piece and region (a long
    piece gives one per region it crosses)."""
    a = offset.astype(np.int64)
    b = a + length.astype(np.int64)
    r0, r1 = a // region, (b - 1) // region
    counts = np.maximum(r1 - r0 + 1, 0)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    idx = np.repeat(r0, counts) + (np.arange(int(counts.sum()), dtype=np.int64) - first)
    lo = np.maximum(np.repeat(a, counts), idx * region)
    hi = np.minimum(np.repeat(b, counts), (idx + 1) * region)
    return idx, hi - lo


WRITEBACK_REGION_DEFAULT = 16 << 20
#: While units land, the write-out of the images' dirty pages is started after every
#: this many bytes placed (``Writeback``).
EARLY_WRITEOUT_BYTES = 32 << 20


def _start_writeout_all(fds: list[int]) -> None:
    """``durable.start_writeout`` of each image: a hint, like ``_start_writeout``."""
    for fd in fds:
        durable.start_writeout(fd)


def _start_writeout(fd: int, offset: int, length: int) -> None:
    """``posix_fadvise(DONTNEED)``: starts the write-out of the range's dirty pages
    without waiting for it (and drops its clean pages). A hint: errors are ignored."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


class Writeback:
    """Gets the images written out while units still land, so that the final fsync
    finds little left: the write-out of all their dirty pages is started after every
    ``EARLY_WRITEOUT_BYTES`` placed (``durable.start_writeout``), and each region of an
    image is dropped from the cache (its write-out started if it is not yet) as soon as
    every byte the plan puts in it has been pwritten.

    Why early: the segment runs come first, and their pieces are scattered over the
    whole image, so no region completes before the base copy. Holding their pages until
    the regions completed let the device only read during the segment phase (1.1-1.4
    GB/s) and only write during the base phase and the fsync, where ``cp`` shows it does
    both at once (1.9 GB/s together). Started every 32 MiB, the 1 GiB recovery of
    ``benchmarks.recovery`` took 1.64 s (median of 5) against 1.84 s, with less CPU
    (an earlier attempt, which started the write-out piece by piece or waited for a
    periodic fdatasync, was slower than one sweep at the end: thousands of small
    writes, and waits; this starts the kernel's own sorted sweep over all dirty pages,
    and does not wait). ``sync_file_range`` leaves the pages in the cache, so a later
    write to part of one (a piece's head or tail page) does not read it back.

    Why regions, and only complete ones, for the drop: no byte of a complete region is
    written again, so dropping its pages cannot make a later partial-page write read
    one back from disk. Units come segment runs first, then base chunks in disk order,
    so regions complete front to back during the base copy.

    Both hints are given on one background thread (starting write-out blocks for
    milliseconds when the device queue is full, which must not hold a fetch worker),
    one early write-out at a time. Durability still comes from the fsync before
    publication; neither hint consumes a write-back error that fsync must report.
    ``close`` before closing the images.
    """

    def __init__(self, plan: RecoveryPlan, fds: list[int], region: int = WRITEBACK_REGION_DEFAULT) -> None:
        assert region > 0 and region % PAGE == 0, region
        self.fds = fds
        self.region = region
        self.left = []  # per disk slot: bytes still to be written in each region
        for d in plan.disks:
            count = -(-d.size // region)
            left = np.zeros(count, dtype=np.int64)
            for pieces in (d.extents[d.extents["kind"] == SRC_WRITE], d.base_pieces):
                regions, nbytes = region_parts(pieces["offset"], pieces["length"], region)
                left += np.bincount(regions, weights=nbytes, minlength=count).astype(np.int64)  # exact < 2**53
            self.left.append(left)
        self.lock = threading.Lock()
        usable = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rocva-writeback") if usable else None
        self._placed = 0  # bytes placed since the last early write-out was started
        self._early: Future | None = None  # that write-out, while it is being started

    def written(self, unit: Unit) -> None:
        """Count the unit's bytes as written (from any thread, once its pwrites are done);
        drop the regions it completed from the cache, and start the write-out of every
        image when ``EARLY_WRITEOUT_BYTES`` more were placed."""
        done = []
        for k in np.unique(unit.slot).tolist():
            sel = unit.slot == k
            regions, nbytes = region_parts(unit.offset[sel], unit.length[sel], self.region)
            touched, where = np.unique(regions, return_inverse=True)
            got = np.bincount(where.ravel(), weights=nbytes, minlength=len(touched)).astype(np.int64)
            with self.lock:
                left = self.left[k]
                left[touched] -= got
                done += [(k, r) for r in touched[left[touched] == 0].tolist()]
        if self._pool is not None:
            for k, r in done:
                self._pool.submit(_start_writeout, self.fds[k], r * self.region, self.region)
            with self.lock:
                self._placed += unit.nbytes
                if self._placed >= EARLY_WRITEOUT_BYTES and (self._early is None or self._early.done()):
                    self._placed = 0
                    self._early = self._pool.submit(_start_writeout_all, self.fds)

    def close(self, *, drop_pending: bool = False) -> None:
        """Wait until the hints given are done (``drop_pending``: only the one running)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=drop_pending)


