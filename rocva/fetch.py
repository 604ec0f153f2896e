"""Executing a plan: fetch the surviving payload ranges and base chunks, pwrite them.

The work is cut into **units**, each one ranged GET (or one chunk GET) followed by the
``os.pwrite`` calls that place its bytes, and units into **groups**, the granularity of
resume (``rocva.recover``):

- ``seg:<key>``: every ``WRITE`` extent of one segment, sorted by payload position and
  cut into ``SegmentRun`` units — runs of contiguous blocks (at most about
  ``run_bytes_max`` raw bytes each, read through gaps of unneeded blocks of at most
  ``gap_bytes_max``), fetched by ``cdp.segment.fetch_blocks`` and the blocks that hold
  pieces verified block by block (``stored_xxh3``, ``raw_xxh3``) and decoded a group at
  a time by ``unpack_block_groups``;
- ``base:<disk>:<batch>``: the base pieces of ``batch_chunks`` consecutive chunk positions
  of one disk, one ``ChunkCopy`` unit per distinct chunk hash (a chunk that appears
  several times in the batch is fetched once), in disk order; of a whole chunk (a
  version-2 one, FORMAT.md §6.1) only the runs of 64 KiB sub-blocks that hold the
  unit's pieces are verified and decoded (``_chunk_parts``), and a delta's units
  (``partial``) fetch only the chunk's header and table and those runs.

Units run segment runs first, then base chunks; a unit writes bytes no other unit
writes (the plan's extents are disjoint), so any order is correct, and this one lets
``Writeback`` drop each region of an image from the cache as soon as its last byte
lands (it starts the write-out of everything placed as units land).

Each unit is one GET (on the event loop) and then one job on a small thread pool
(``pool_workers``) that verifies, decompresses (a segment's blocks into the thread's
reused buffer) and pwrites: LZ4 (through liblz4 for segments, see ``cdp.segment``),
xxhash, numpy's zero-page scan and pwrite run without the GIL; the event loop never
touches payload.

Each unit returns the **digest** of the bytes it placed — ``xxh3`` (§0 of FORMAT.md) of
its pieces' bytes in the unit's piece order — and a group's digest is the ``xxh3`` of its
units' digests (8 bytes little-endian each) in the group's unit order
(``group_digest``). A resume (``rocva.resume``) records group digests and proves them
again by reading the pieces back (``unit_digest_from_file``) before it trusts them.

Bounds: at most ``concurrency`` units are in flight (a semaphore taken *before* a task
is created, so pending work never piles up as tasks). A unit holds its stored bytes:
one run's blocks (below ``2 × run_bytes_max`` plus a block, see ``_split_long``; about
``run_bytes_max`` for scattered writes) or one chunk object (a partial read: less).
From a file store those bytes are read into a buffer lent to the unit (``ReadBuffer``,
``O_DIRECT``, no copy) and kept for the next unit: at most ``concurrency`` buffers, each
the size of the largest read it took rounded up to 4 MiB. From a sealed store over a
file store, its sealed pages are read into them the same way (a sealed recovery went
from 0.75-0.78 of the plain one's speed to 0.81-0.90, 1 GiB, ``benchmarks.recovery``'s
store).
While it is decoded it holds one group of raw blocks (``DECODE_GROUP_BYTES`` or one
block) and one page carried to the next group, or
one raw chunk (4 MiB by default, 64 MiB at most), in the pool thread's buffer (a
version-1 chunk: in python-lz4's output, twice while it copies it). So memory stays
below ``concurrency × (2 × run_bytes_max + one block) + pool_workers × (2 × one
chunk)``: 8 × 33 MiB + 2 × 8 MiB with the defaults and blocks of 1 MiB at most, 4 MiB chunks, 2
CPUs. From a sealed store (FORMAT.md §19) each pool thread also keeps the opened bytes of
its largest unit (``_opened``): ``pool_workers × (2 × run_bytes_max + one block)`` more.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import xxhash

from cdp import durable
from cdp.base_image import (
    SUB_BLOCK_BYTES, ChunkTable, Namer, chunk_bytes_max, chunk_head_bytes, chunk_namer_of, decode_chunk,
    decode_chunk_head,
)
from cdp.direct_io import ReadBuffer
from cdp.errors import FormatError, NotFound, TruncatedError
from cdp.layout import chunk_key
from cdp.segment import SegmentIndex, fetch_blocks, unpack_block_groups
from cdp.store.base import ObjectStore, get_bounded
from rocva.plan import EXTENT_DTYPE, SRC_WRITE, RecoveryPlan

RUN_BYTES_MAX_DEFAULT = 16 << 20
# A full recovery reads through gaps of overwritten writes up to this many raw bytes
# rather than cutting a run there: one GET instead of many (with 64 KiB blocks, random
# 64 KiB writes of which a third are dead cut a 16 MiB segment into ~60 runs; 1723 GETs
# against 97 for 512 MiB of them in tests.rocva.bench_recover), for a few more bytes
# read; their blocks are not decoded. A delta (rocva.delta) passes its own.
GAP_BYTES_MAX_DEFAULT = 1 << 20
# Consecutive blocks of a run are decoded into one buffer of up to this many bytes and
# placed together (cdp.segment.unpack_block_groups): the per-block work in Python costs
# as much for a 64 KiB block as for 1 MiB (a full recovery measured ~15 % slower with
# 64 KiB blocks placed one by one).
DECODE_GROUP_BYTES = 1 << 20
PAGE = 4096  # file-system block: all-zero pages are left as holes
BASE_BATCH_CHUNKS_DEFAULT = 64


@dataclass(frozen=True, eq=False)
class SegmentRun:
    """Blocks ``first_block..last_block`` of a segment and where their bytes go:
    ``length[i]`` bytes from ``start[i]`` in the run's raw bytes to ``offset[i]`` of disk
    slot ``slot[i]``."""

    index: SegmentIndex
    first_block: int
    last_block: int
    slot: np.ndarray
    offset: np.ndarray
    start: np.ndarray
    length: np.ndarray
    nbytes: int


@dataclass(frozen=True, eq=False)
class ChunkCopy:
    """One base chunk and where its pieces go (``chunk_off`` inside the chunk).

    ``partial``: fetch only the sub-blocks that hold the pieces (a version-2 chunk,
    FORMAT.md §6.1; a version-1 chunk is still fetched whole), for a delta whose pieces
    are a small part of each chunk. A full recovery needs nearly all of every chunk and
    fetches each whole, in one GET."""

    key: str
    hash16: bytes
    chunk_len: int
    slot: np.ndarray
    offset: np.ndarray
    start: np.ndarray
    length: np.ndarray
    nbytes: int
    partial: bool = False


Unit = SegmentRun | ChunkCopy


# --------------------------------------------------------------------------- cutting


def _coalesce(slot, off, pos, length):
    """Merge neighbours contiguous both in the payload stream and on the same disk."""
    n = len(pos)
    join = np.zeros(n, dtype=bool)
    if n > 1:
        join[1:] = ((pos[1:] == pos[:-1] + length[:-1]) & (off[1:] == off[:-1] + length[:-1])
                    & (slot[1:] == slot[:-1]))
    heads = np.flatnonzero(~join)
    return slot[heads], off[heads], pos[heads], np.add.reduceat(length, heads) if n else length


def _split_long(slot, off, pos, length, cap: int):
    """Cut pieces longer than ``cap`` bytes (coalesced sequential writes can be any length)
    into parts of at most ``cap``, so that a run, which ``_runs`` cuts by where its pieces
    start, stays below ``2 × cap`` plus a block. Every cut falls on a file page boundary
    (the first part is shortened to reach one), so zero pages are found exactly as in
    the piece written whole."""
    cap = max(PAGE, cap - cap % PAGE)
    long = length > cap
    if not long.any():
        return slot, off, pos, length
    head = np.where(long, cap - off % PAGE, length)  # the first part ends on a page boundary
    parts = 1 + -(-(length - head) // cap)
    first = np.repeat(np.cumsum(parts) - parts, parts)
    j = np.arange(int(parts.sum()), dtype=np.int64) - first  # part number within its piece
    rep = lambda a: np.repeat(a, parts)  # noqa: E731
    at = np.where(j == 0, 0, rep(head) + (j - 1) * cap)  # where the part starts in its piece
    size = np.where(j == 0, rep(head), np.minimum(cap, rep(length) - at))
    return rep(slot), rep(off) + at, rep(pos) + at, size


def _runs(index: SegmentIndex, slot, off, pos, length, run_bytes_max: int,
          gap_bytes_max: int = 0) -> list[SegmentRun]:
    """Cut one segment's writes (sorted by ``pos``) into runs of contiguous blocks; a gap
    of unneeded blocks of at most ``gap_bytes_max`` raw bytes is read through rather than
    cut at (its blocks are fetched, not decoded: ``_place_run``)."""
    brs = index.block_raw_size
    fb = (pos // brs).astype(np.int64)
    lb = ((pos + length - 1) // brs).astype(np.int64)
    new = np.ones(len(fb), dtype=bool)
    new[1:] = fb[1:] > np.maximum.accumulate(lb)[:-1] + 1 + gap_bytes_max // brs  # too long a gap
    group_first = fb[new][np.cumsum(new) - 1]
    sub = (fb - group_first) // max(1, run_bytes_max // brs)  # cap a long contiguous stretch
    new[1:] |= sub[1:] != sub[:-1]
    heads = np.flatnonzero(new)
    ends = np.append(heads[1:], len(fb))
    last = np.maximum.reduceat(lb, heads)
    runs = []
    for h, e, lb_max in zip(heads.tolist(), ends.tolist(), last.tolist()):
        first = int(fb[h])
        runs.append(SegmentRun(index, first, lb_max, slot[h:e], off[h:e], pos[h:e] - first * brs,
                               length[h:e], int(length[h:e].sum())))
    return runs


def segment_groups(plan: RecoveryPlan, run_bytes_max: int = RUN_BYTES_MAX_DEFAULT,
                   gap_bytes_max: int = GAP_BYTES_MAX_DEFAULT) -> Iterator[tuple[str, int, list[SegmentRun]]]:
    """(group name, bytes, units) per segment with surviving writes, in seq order; gaps
    of at most ``gap_bytes_max`` unneeded raw bytes inside a run (``_runs``)."""
    parts = []
    for k, d in enumerate(plan.disks):
        ext = d.extents[d.extents["kind"] == SRC_WRITE]
        parts.append((np.full(len(ext), k, np.int64), ext))
    slot = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    ext = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, EXTENT_DTYPE)
    order = np.lexsort((ext["pos"], ext["seg"]))
    slot, ext = slot[order], ext[order]
    seg = ext["seg"]
    bounds = np.flatnonzero(np.diff(seg)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]).tolist(), np.concatenate([bounds, [len(seg)]]).tolist()):
        if lo == hi:
            continue
        index = plan.segments[int(seg[lo])]
        cols = _coalesce(slot[lo:hi], ext["offset"][lo:hi].astype(np.int64),
                         ext["pos"][lo:hi].astype(np.int64), ext["length"][lo:hi].astype(np.int64))
        units = _runs(index, *_split_long(*cols, run_bytes_max), run_bytes_max, gap_bytes_max)
        yield f"seg:{index.key}", sum(u.nbytes for u in units), units


def base_groups(plan: RecoveryPlan, batch_chunks: int = BASE_BATCH_CHUNKS_DEFAULT, *, partial: bool = False
                ) -> Iterator[tuple[str, int, list[ChunkCopy]]]:
    """(group name, bytes, units) per batch of ``batch_chunks`` chunk positions of each
    disk; ``partial``: units that fetch only the sub-blocks they need (``ChunkCopy``)."""
    for k, d in enumerate(plan.disks):
        pieces, m = d.base_pieces, d.manifest
        if m is None or not len(pieces):
            continue
        batch = pieces["chunk"] // batch_chunks
        bounds = np.flatnonzero(np.diff(batch)) + 1
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(pieces)]):
            p = pieces[lo:hi]
            hashes = np.ascontiguousarray(m.hashes[p["chunk"]]).view("V16").ravel()
            uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
            units = []
            # In disk order (not hash order): a base batch then completes the image's
            # regions front to back, so their write-out starts early (see Writeback).
            for u in np.argsort(first, kind="stable").tolist():
                sel = np.flatnonzero(inverse.ravel() == u)
                h = m.hash_of(int(p["chunk"][first[u]]))
                units.append(ChunkCopy(chunk_key(h), h, m.chunk_len(int(p["chunk"][first[u]])),
                                       np.full(len(sel), k, np.int64), p["offset"][sel].astype(np.int64),
                                       p["chunk_off"][sel].astype(np.int64), p["length"][sel].astype(np.int64),
                                       int(p["length"][sel].sum()), partial))
            yield f"base:{d.disk}:{int(batch[lo])}", sum(u.nbytes for u in units), units


# --------------------------------------------------------------------------- doing


def pool_workers(concurrency: int) -> int:
    """Threads for decoding and writing: one per CPU, not one per unit in flight.

    The units in flight (``concurrency``) bound memory and keep GETs outstanding; the
    pool only does CPU work and pwrite (and pwrites to one image serialize on its inode
    lock). More threads than CPUs only add GIL hand-offs and context switches: on 2 CPUs
    a 256 MiB recovery measured 2 threads ≤ 3 < 8 (8 was the old pool, one per unit).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(concurrency, cpus))


_scratch_local = threading.local()


def _scratch(size: int, name: str = "buf") -> bytearray:
    """This pool thread's reusable buffer ``name``, at least ``size`` bytes: ``buf`` for
    decompressed blocks or chunks (one ``block_raw_size``, 1 MiB by default, 16 MiB at
    most; one chunk, 4 MiB by default, 64 MiB at most), ``opened`` for the stored bytes
    of one unit opened from a sealed store (``_opened``).

    A fresh buffer per block cost a page fault per 4 KiB every time (python-lz4's own
    output: two); the buffer lives as long as the pool's thread, i.e. one recovery."""
    buf = getattr(_scratch_local, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(_scratch_local, name, buf)
    return buf


def _opened(stored):
    """The stored bytes of a unit: as fetched, or, from a sealed store (``Unopened``,
    FORMAT.md §19), decrypted and checked here, in the pool thread, into its reused
    ``opened`` buffer (a view valid for this job only).

    Why here and not in the store's ``get``: that opens into a fresh buffer per object
    (a page fault per 4 KiB, which this project's machines pay at ~0.3 GB/s) on one more
    thread hand-off; here the pages are opened by the thread that decodes them next."""
    open_into = getattr(stored, "open_into", None)
    return stored if open_into is None else open_into(_scratch(len(stored), "opened"))


def _byte_runs(offsets: np.ndarray, lengths: np.ndarray, keep: np.ndarray, base: int) -> list[tuple[int, int]]:
    """``[a, b)`` relative to ``base`` of each run of consecutive entries flagged in
    ``keep``, entries being contiguous stored byte ranges (``offsets``, ``lengths``)."""
    ends = offsets + lengths
    runs = ((int(offsets[a]) - base, int(ends[b]) - base) for a, b in _true_runs(keep))
    return [(a, b) for a, b in runs if a < b]


def _true_runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of consecutive True entries of ``flags``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], flags, [False]]).astype(np.int8)))
    return [(a, b - 1) for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist())]


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
    while len(data):
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as exc:
            raise ImageWriteError(exc, fd, offset, len(data)) from exc
        data, offset = data[n:], offset + n


def _pwrite_sparse(fd: int, data: memoryview, offset: int) -> None:
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


def _zero_pages_before(buf) -> list[int]:
    """``z[i]``: how many of the first ``i`` whole pages of ``buf`` are all zero bytes.

    One numpy pass per decoded block or chunk, so that writing one of its (often
    hundreds of) pieces costs a little arithmetic and a pwrite, not a zero scan of its
    own. (``max`` over the words: faster than ``any``, which casts every word to bool.)"""
    pages = len(buf) // PAGE
    words = np.frombuffer(buf, dtype=np.uint64, count=pages * (PAGE // 8)).reshape(pages, PAGE // 8)
    z = np.zeros(pages + 1, dtype=np.int64)
    np.cumsum(words.max(axis=1, initial=0) == 0, out=z[1:])
    return z.tolist()


def _pwrite(fd: int, data: memoryview, offset: int, sparse: bool) -> None:
    if sparse:
        _pwrite_sparse(fd, data, offset)
    else:
        _pwrite_all(fd, data, offset)


def _write_piece(fd: int, mv: memoryview, x0: int, x1: int, offset: int, zeros: list[int] | None) -> None:
    """pwrite ``mv[x0:x1]`` at ``offset`` exactly as ``_pwrite_sparse`` would (whole zero
    pages stay holes): one pwrite when ``zeros`` (``_zero_pages_before(mv)``) shows the
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
    _pwrite_sparse(fd, mv[x0:x1], offset)


def group_digest(unit_digests: list[int]) -> int:
    """A group's digest: xxh3 of its units' digests, u64 little-endian, in unit order."""
    return xxhash.xxh3_64_intdigest(np.asarray(unit_digests, dtype="<u8").tobytes())


READBACK_BYTES = 1 << 20  # one pread of a piece read back


ReadBack = Callable[[int, int, int], memoryview]  # (fd, offset, length) -> at most length bytes, b"" at the end


def unit_digest_from_file(fds: list[int], unit: Unit, buf: bytearray, read: ReadBack | None = None) -> int:
    """The digest of ``unit`` as its pieces read now in the image files (``buf``: the
    reused read buffer, any size; ``read``: how to read, at most ``len(buf)`` bytes at a
    time — default ``preadv`` into ``buf``, through the page cache). A file too short
    reads as a different digest."""
    h = xxhash.xxh3_64()
    view = memoryview(buf)
    for s, o, n in zip(unit.slot.tolist(), unit.offset.tolist(), unit.length.tolist()):
        while n > 0:
            if read is None:
                data = view[: os.preadv(fds[s], [view[: min(n, len(view))]], o)]
            else:
                data = read(fds[s], o, min(n, len(view)))
            if not len(data):
                h.update(b"\xff")  # short: the bytes are missing, and that must not hash as if present
                break
            h.update(data)
            o, n = o + len(data), n - len(data)
    return h.intdigest()


def _place(fds: list[int], unit: Unit, parts: list[tuple[int, bytes | bytearray | memoryview]],
           sparse: bool = True) -> int:
    """pwrite every piece of ``unit`` from ``parts``, ``(start, raw)`` pairs sorted by
    ``start``: the raw bytes of the unit from ``start`` on (a whole chunk is one part, a
    partial read one per run of sub-blocks); runs on the thread pool; its digest."""
    starts = np.array([a for a, _ in parts], dtype=np.int64)
    views = [memoryview(raw) for _, raw in parts]
    zeros = [_zero_pages_before(mv) if sparse else None for mv in views]
    which = (np.searchsorted(starts, unit.start, side="right") - 1).tolist()
    h = xxhash.xxh3_64()
    for s, o, a, n, r in zip(unit.slot.tolist(), unit.offset.tolist(), unit.start.tolist(), unit.length.tolist(),
                             which):
        mv, x0 = views[r], a - int(starts[r])
        if r < 0 or x0 + n > len(mv):  # the plan's positions come from a verified index: a bug if hit
            raise AssertionError(f"piece {a}+{n} outside the fetched bytes")
        h.update(mv[x0 : x0 + n])
        _write_piece(fds[s], mv, x0, x0 + n, o, zeros[r])
    return h.intdigest()


def _place_chunk(fds: list[int], unit: ChunkCopy, data: bytes, writeback: Writeback | None = None,
                 sparse: bool = True, namer: Namer = None) -> int:
    """Verify and decode one chunk object, pwrite its pieces (thread pool); its digest.
    ``namer``: the store's chunk names (``chunk_namer_of``). A version-2 chunk is decoded
    only where the unit's pieces are (``_chunk_parts``); a version-1 chunk whole, its
    name checked, except from a sealed store (FORMAT.md §19.6: its seal binds it to its
    name; ``cdp verify --deep`` does hash it), which saves an HMAC-SHA256 of every chunk."""
    parts = _chunk_parts(unit, data)
    if parts is None:
        raw = decode_chunk(unit.key, _opened(data), unit.hash16, out=_scratch(unit.chunk_len), namer=namer,
                           check_name=namer is None)
        if len(raw) != unit.chunk_len:
            raise FormatError(f"chunk {unit.key}: {len(raw)} bytes, the manifest needs {unit.chunk_len}")
        parts = [(0, raw)]
    digest = _place(fds, unit, parts, sparse)
    if writeback is not None:
        writeback.written(unit)
    return digest


def _chunk_parts(unit: ChunkCopy, data) -> list[tuple[int, memoryview]] | None:
    """From a whole version-2 chunk (from a sealed store: still sealed, and only the
    header, the table and the sub-blocks used are opened): verify its header and table,
    then decode only the sub-blocks that hold ``unit``'s pieces into this thread's
    buffer, as a partial read does (FORMAT.md §6.1); ``(raw start, raw bytes)`` per run
    of sub-blocks. None for a version-1 chunk (no table: decoded whole).

    What a partial read checks, this checks: the header (whose ``raw_xxh3_128`` must be
    the manifest's), the table, each sub-block's ``stored_xxh3`` and ``raw_xxh3``. The
    whole chunk's ``raw_xxh3_128`` is not recomputed (``cdp verify --deep`` does). Why:
    later writes leave a full recovery only part of most chunks (a third in
    ``benchmarks.recovery``); decompressing, hashing and scanning for zero pages the
    rest cost 8 % of a plain 1 GiB recovery's CPU (2.06 against 1.90 CPU-s, medians of
    6), and opening it most of what a seal added."""
    size = len(data)
    head_len = min(size, chunk_head_bytes(unit.chunk_len))
    if head_len == 0:
        return None
    sealed = hasattr(data, "open_ranges")
    if sealed:
        stored = data.open_ranges([(0, head_len)], _scratch(size, "opened"))
    else:
        stored = memoryview(data).cast("B")
    table = decode_chunk_head(unit.key, stored[:head_len], unit.hash16, unit.chunk_len)
    if table is None:
        return None
    if table.stored_end != size:
        err = TruncatedError if size < table.stored_end else FormatError
        raise err(f"chunk {unit.key}: {size} bytes, the header and table promise {table.stored_end}")
    runs = _sub_block_runs(unit)
    spans = [table.span(a, b) for a, b in runs]
    if sealed:
        stored = data.open_ranges([(a, a + n) for a, n in spans], _scratch(size, "opened"))
    raw = memoryview(_scratch(unit.chunk_len))
    parts = []
    for (a, b), (offset, n) in zip(runs, spans):
        lo, hi = a * SUB_BLOCK_BYTES, min(unit.chunk_len, (b + 1) * SUB_BLOCK_BYTES)
        table.decode_into(a, b, stored[offset : offset + n], raw[lo:hi])
        parts.append((lo, raw[lo:hi]))
    return parts


def _covered(first: np.ndarray, last: np.ndarray, count: int) -> np.ndarray:
    """Per block ``0..count-1``, whether a range ``[first[i], last[i]]`` holds it."""
    edge = np.zeros(count + 1, dtype=np.int64)
    np.add.at(edge, first, 1)
    np.add.at(edge, last + 1, -1)
    return np.cumsum(edge[:-1]) > 0


def _sub_block_runs(unit: ChunkCopy) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive sub-blocks that hold ``unit``'s pieces.

    One GET per run, not one spanning them all: a delta's pieces are scattered 64 KiB
    ranges, a few per 4 MiB chunk, and a span from the first to the last would read
    most of the chunk."""
    covered = _covered(unit.start // SUB_BLOCK_BYTES, (unit.start + unit.length - 1) // SUB_BLOCK_BYTES,
                       -(-unit.chunk_len // SUB_BLOCK_BYTES))
    return _true_runs(covered)


async def _fetch_chunk_parts(store: ObjectStore, unit: ChunkCopy) -> tuple[ChunkTable | None, list, list]:
    """The partial read of a chunk (FORMAT.md §6.1): its header and table (verified),
    then the stored bytes of each run of sub-blocks ``unit`` needs, as (table, runs,
    stored bytes per run). A version-1 chunk has no table: (None, [], [the whole object])."""
    bound = chunk_bytes_max(unit.chunk_len)
    head = await get_bounded(store, unit.key, bound, 0, chunk_head_bytes(unit.chunk_len))
    table = decode_chunk_head(unit.key, head, unit.hash16, unit.chunk_len)
    if table is None:
        return None, [], [head + await get_bounded(store, unit.key, bound, len(head))]
    runs = _sub_block_runs(unit)
    spans = [table.span(a, b) for a, b in runs]
    stored = await asyncio.gather(*(store.get(unit.key, offset, length) for offset, length in spans))
    return table, runs, stored


def _place_chunk_parts(fds: list[int], unit: ChunkCopy, table: ChunkTable, runs: list[tuple[int, int]],
                       stored: list[bytes], writeback: Writeback | None = None, sparse: bool = True) -> int:
    """Verify and decode the sub-blocks a partial read fetched, pwrite the unit's pieces
    from them (thread pool); its digest, the same as a whole read's."""
    parts = [(a * SUB_BLOCK_BYTES, table.decode(a, b, data)) for (a, b), data in zip(runs, stored)]
    digest = _place(fds, unit, parts, sparse)
    if writeback is not None:
        writeback.written(unit)
    return digest


def _place_run(fds: list[int], unit: SegmentRun, stored: bytes, writeback: Writeback | None = None,
               sparse: bool = True) -> int:
    """Verify and decompress the run's blocks, a group of consecutive ones at a time
    (``DECODE_GROUP_BYTES``), into this thread's buffer, and pwrite each piece's part in
    a group as soon as that group is decoded (thread pool); the unit's digest (each
    piece's parts are hashed in order, so it is the piece's).

    Why group by group: joining a 16 MiB run into one object cost a copy of every byte
    into freshly faulted memory, on the event loop; here nothing is copied after LZ4,
    and a run holds one group (plus the previous one's last page) at a time.

    A piece that spans a group boundary is written as one part per group. So that zero
    pages are found exactly as if the piece were written whole (``_pwrite_sparse`` only
    skips pages wholly inside one call), a part that does not end on a file page keeps
    that page's bytes (< 4 KiB, copied) and they are written together with the next
    block's bytes of the same page.
    """
    brs = unit.index.block_raw_size
    starts = unit.start
    ends = unit.start + unit.length  # pieces are sorted by start and disjoint in the stream
    slot, offset, start, length = (unit.slot.tolist(), unit.offset.tolist(), starts.tolist(),
                                   unit.length.tolist())
    carry: tuple[int, bytes] | None = None  # (file offset, bytes) of a page cut at a block end
    hi = 0
    h = xxhash.xxh3_64()
    # The blocks some piece lies in; the rest only joined them into one GET.
    covered = _covered(starts // brs, (ends - 1) // brs, unit.last_block - unit.first_block + 1)
    if hasattr(stored, "open_ranges"):  # sealed: open only the blocks read below
        rows = unit.index.blocks[unit.first_block : unit.last_block + 1]
        stored = stored.open_ranges(_byte_runs(rows["stored_offset"], rows["stored_len"], covered,
                                               int(rows["stored_offset"][0])), _scratch(len(stored), "opened"))
    wanted = covered.tolist()
    group = max(brs, DECODE_GROUP_BYTES)
    groups = unpack_block_groups(unit.index, unit.first_block, unit.last_block, stored, out=_scratch(group),
                                 wanted=wanted, group_bytes=group)
    for k, raw in groups:
        lo, hi = k * brs, k * brs + len(raw)
        mv = memoryview(raw)
        zeros = _zero_pages_before(mv) if sparse else None
        first = int(np.searchsorted(ends, lo, side="right"))  # pieces ending after lo ...
        last = int(np.searchsorted(starts, hi, side="left"))  # ... and starting before hi
        for i in range(first, last):
            s, o, a, n = slot[i], offset[i], start[i], length[i]
            b0, b1 = max(a, lo), min(a + n, hi)  # the part in this block, in run positions
            x0, x1, d0 = b0 - lo, b1 - lo, o + b0 - a  # ... in the block, and in the file
            h.update(mv[x0:x1])
            if carry is not None and b0 > a:  # finish the page the previous block began
                cd, cbytes = carry
                take = min(-d0 % PAGE, x1 - x0)
                _pwrite(fds[s], memoryview(cbytes + mv[x0 : x0 + take]), cd, sparse)
                x0, d0, carry = x0 + take, d0 + take, None
            if b1 < a + n:  # continues into the next block: hold back its cut page
                d1 = d0 + x1 - x0
                cut = max(d0, d1 - d1 % PAGE)
                if cut < d1:
                    carry = (cut, bytes(mv[x0 + cut - d0 : x1]))
                    x1 = x0 + cut - d0
            if x1 > x0:
                _write_piece(fds[s], mv, x0, x1, d0, zeros)
    if carry is not None or (len(ends) and int(ends[-1]) > hi):  # verified index: a bug if hit
        raise AssertionError(f"run of {unit.index.key}: pieces outside the {hi} fetched bytes")
    if writeback is not None:
        writeback.written(unit)
    return h.intdigest()


def _region_parts(offset: np.ndarray, length: np.ndarray, region: int) -> tuple[np.ndarray, np.ndarray]:
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
                regions, nbytes = _region_parts(pieces["offset"], pieces["length"], region)
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
            regions, nbytes = _region_parts(unit.offset[sel], unit.length[sel], self.region)
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


class Fetcher:
    """Runs units against ``store`` into the open image files ``fds`` (by disk slot).

    ``sparse``: the files read as zeros wherever the units write (fresh images), so whole
    zero pages are left unwritten, as holes; false for files with old content there (a
    delta applied in place), where every byte is written."""

    def __init__(self, store: ObjectStore, fds: list[int], executor: Executor, writeback: Writeback | None = None,
                 *, sparse: bool = True) -> None:
        self.store = store
        self.fds = fds
        self.executor = executor
        self.writeback = writeback
        self.sparse = sparse
        self.namer = chunk_namer_of(store)  # how the store names chunks (FORMAT.md §19.6)
        # A sealed store's runs and chunks are fetched unopened and opened by the pool
        # job that decodes them (``_opened``).
        self.unopened = _Unopening(store) if hasattr(store, "get_unopened") else None
        # A store that reads into buffers (a file store: O_DIRECT, no copy; a sealed store
        # over one, for its sealed pages) is lent one per unit in flight; a unit gives it
        # back once its pool job has decoded (and opened) it.
        self.lends = (hasattr(store, "get_into") if self.unopened is None
                      else bool(getattr(store, "unopened_into", False)))
        self._buffers: list[ReadBuffer] = []
        self.bytes_written = 0
        self.units_done = 0

    async def run(self, unit: Unit) -> int:
        """One GET (a partial chunk read: the head, then one per run of sub-blocks), then
        one job on the pool that verifies (opens, from a sealed store), decodes and writes
        it all (one hand-off per unit, not one per block: the event loop only schedules);
        the unit's digest."""
        try:
            return await self._run(unit, self.unopened)
        except FormatError as exc:
            if not getattr(exc, "stale_envelope", False):
                raise
        # Opened with a cached envelope that did not fit: the object may have been
        # replaced since; ``get`` reads it with a fresh envelope and decides (cdp.store.crypt).
        return await self._run(unit, None)

    async def _run(self, unit: Unit, unopened: _Unopening | None) -> int:
        # Not lent: a partial chunk read (its gets run at once), and a sealed store's
        # retry with a fresh envelope (``get``, which opens into memory of its own).
        if (not self.lends or (isinstance(unit, ChunkCopy) and unit.partial)
                or (unopened is None and self.unopened is not None)):
            return await self._run_from(unit, unopened or self.store)
        buf = self._buffers.pop() if self._buffers else ReadBuffer()
        source = _Lent(self.store, buf) if unopened is None else _Unopening(self.store, buf)
        digest = await self._run_from(unit, source)
        # Only now: a unit that failed or was cancelled may leave a read or a decode
        # still running on its buffer, which is then dropped, not lent again.
        self._buffers.append(buf)
        return digest

    async def _run_from(self, unit: Unit, source) -> int:
        loop = asyncio.get_running_loop()
        if isinstance(unit, SegmentRun):
            try:
                stored = await fetch_blocks(source, unit.index, unit.first_block, unit.last_block)
            except NotFound as exc:
                raise NotFound(f"segment {unit.index.key} is missing from {self.store.describe()}") from exc
            digest = await _stale_marked(stored, loop.run_in_executor(
                self.executor, _place_run, self.fds, unit, stored, self.writeback, self.sparse))
        else:
            try:
                if unit.partial:
                    table, runs, stored = await _fetch_chunk_parts(self.store, unit)
                else:
                    table, runs, stored = None, [], [await get_bounded(source, unit.key,
                                                                       chunk_bytes_max(unit.chunk_len))]
            except NotFound as exc:
                raise NotFound(f"chunk {unit.key} is missing from {self.store.describe()}") from exc
            if table is None:
                digest = await _stale_marked(stored[0], loop.run_in_executor(
                    self.executor, _place_chunk, self.fds, unit, stored[0], self.writeback, self.sparse, self.namer))
            else:
                digest = await loop.run_in_executor(self.executor, _place_chunk_parts, self.fds, unit, table, runs,
                                                    stored, self.writeback, self.sparse)
        self.bytes_written += unit.nbytes
        self.units_done += 1
        return digest


class _Lent:
    """A store that reads into buffers seen as a plain store whose gets land in ``buf``
    (``FileStore.get_into``): what ``fetch_blocks`` and a whole chunk's get call."""

    def __init__(self, store: ObjectStore, buf: ReadBuffer) -> None:
        self.store = store
        self.buf = buf
        self.describe = store.describe

    async def get(self, key: str, offset: int = 0, length: int | None = None, *, max_bytes: int | None = None):
        return await self.store.get_into(key, offset, length, self.buf, max_bytes=max_bytes)


class _Unopening:
    """A sealed store seen through its ``get_unopened``: ``get`` returns the ranges still
    sealed (``cdp.store.crypt.Unopened``, whose ``len`` is the plaintext's, so
    ``fetch_blocks`` checks it as it checks bytes), their sealed pages read into ``buf``
    when one is lent."""

    def __init__(self, store: ObjectStore, buf: ReadBuffer | None = None) -> None:
        self.store = store
        self.buf = buf
        self.describe = store.describe

    async def get(self, key: str, offset: int = 0, length: int | None = None, *, max_bytes: int | None = None):
        return await self.store.get_unopened(key, offset, length, into=self.buf, max_bytes=max_bytes)


async def _stale_marked(stored, job) -> int:
    """``await job`` (which opens ``stored``); a failure to open it with a cached envelope
    (``Unopened.stale``) is marked ``stale_envelope`` for ``Fetcher.run`` to retry."""
    try:
        return await job
    except FormatError as exc:
        if getattr(stored, "stale", False):
            exc.stale_envelope = True
        raise


async def execute(groups, fetcher: Fetcher, *, concurrency: int, skip: Callable[[str, int], bool],
                  on_group_done: Callable[[str, int], None], on_unit_done: Callable[[int], None]) -> None:
    """Run every unit of every group for which ``skip(name, nbytes)`` is false,
    ``concurrency`` units at a time.

    ``on_group_done(name, digest)`` is called once all of a group's units have returned,
    i.e. their pwrites are done (not yet fsynced), with the group's digest. On the first failure no new unit starts;
    the units in flight finish (their groups may still complete), then the first error
    is raised.
    """
    assert concurrency >= 1, concurrency
    sem = asyncio.Semaphore(concurrency)
    remaining: dict[str, int] = {}
    digests: dict[str, list[int]] = {}  # of the groups in flight, by unit
    failures: list[BaseException] = []
    tasks: set[asyncio.Task] = set()

    async def one(name: str, k: int, unit: Unit) -> None:
        try:
            digests[name][k] = await fetcher.run(unit)
        except Exception as exc:  # noqa: BLE001 - recorded, raised by execute()
            failures.append(exc)
            return
        finally:
            sem.release()
        on_unit_done(unit.nbytes)
        remaining[name] -= 1
        if remaining[name] == 0:
            on_group_done(name, group_digest(digests.pop(name)))

    try:
        for name, nbytes, units in groups:
            if failures:
                break
            if skip(name, nbytes):
                continue
            remaining[name] = len(units)
            digests[name] = [0] * len(units)
            if not units:
                on_group_done(name, group_digest(digests.pop(name)))
            for k, unit in enumerate(units):
                await sem.acquire()
                if failures:
                    sem.release()
                    break
                task = asyncio.create_task(one(name, k, unit))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    except BaseException:
        for task in tasks:  # cancelled (or a bug in a group generator): stop the units too
            task.cancel()
        raise
    finally:
        # Let the units in flight finish (or, when we are cancelled, cancel them).
        if tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
    if failures:
        raise failures[0]
