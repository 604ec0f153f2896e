"""Executing a plan: fetch the surviving payload ranges and base chunks, pwrite them.

The plan comes cut into **units** and **groups** (``rocva.work_units``). Here each unit
is fetched and placed:

- a ``SegmentRun``: its blocks fetched by ``cdp.segment.fetch_blocks``, the blocks that
  hold pieces verified block by block (``stored_xxh3``, ``raw_xxh3``) and decoded a group
  at a time by ``unpack_block_groups``;
- a ``ChunkCopy``: of a whole chunk (a version-2 one, FORMAT.md §6.1) only the runs of
  64 KiB sub-blocks that hold the unit's pieces are verified and decoded
  (``_chunk_parts``), and a delta's units (``partial``) fetch only the chunk's header
  and table and those runs.

The pwrites themselves, and the early write-out of the images: ``rocva.image_writes``.

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
one run's blocks (below ``2 × run_bytes_max`` plus a block, see ``rocva.work_units``; about
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
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import xxhash

from cdp.base_image import (
    SUB_BLOCK_BYTES, ChunkTable, Namer, chunk_bytes_max, chunk_head_bytes, chunk_namer_of, decode_chunk,
    decode_chunk_head,
)
from cdp.direct_io import ReadBuffer
from cdp.errors import FormatError, NotFound, TruncatedError
from cdp.segment import fetch_blocks, unpack_block_groups
from cdp.store.base import ObjectStore, get_bounded
from rocva.image_writes import Writeback, pwrite_image, write_piece, zero_pages_before
from rocva.work_units import PAGE, ChunkCopy, SegmentRun, Unit

# Consecutive blocks of a run are decoded into one buffer of up to this many bytes and
# placed together (cdp.segment.unpack_block_groups): the per-block work in Python costs
# as much for a 64 KiB block as for 1 MiB (a full recovery measured ~15 % slower with
# 64 KiB blocks placed one by one).
DECODE_GROUP_BYTES = 1 << 20


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
    zeros = [zero_pages_before(mv) if sparse else None for mv in views]
    which = (np.searchsorted(starts, unit.start, side="right") - 1).tolist()
    h = xxhash.xxh3_64()
    for s, o, a, n, r in zip(unit.slot.tolist(), unit.offset.tolist(), unit.start.tolist(), unit.length.tolist(),
                             which):
        mv, x0 = views[r], a - int(starts[r])
        if r < 0 or x0 + n > len(mv):  # the plan's positions come from a verified index: a bug if hit
            raise AssertionError(f"piece {a}+{n} outside the fetched bytes")
        h.update(mv[x0 : x0 + n])
        write_piece(fds[s], mv, x0, x0 + n, o, zeros[r])
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
    pages are found exactly as if the piece were written whole (``pwrite_sparse`` only
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
        zeros = zero_pages_before(mv) if sparse else None
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
                pwrite_image(fds[s], memoryview(cbytes + mv[x0 : x0 + take]), cd, sparse)
                x0, d0, carry = x0 + take, d0 + take, None
            if b1 < a + n:  # continues into the next block: hold back its cut page
                d1 = d0 + x1 - x0
                cut = max(d0, d1 - d1 % PAGE)
                if cut < d1:
                    carry = (cut, bytes(mv[x0 + cut - d0 : x1]))
                    x1 = x0 + cut - d0
            if x1 > x0:
                write_piece(fds[s], mv, x0, x1, d0, zeros)
    if carry is not None or (len(ends) and int(ends[-1]) > hi):  # verified index: a bug if hit
        raise AssertionError(f"run of {unit.index.key}: pieces outside the {hi} fetched bytes")
    if writeback is not None:
        writeback.written(unit)
    return h.intdigest()



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
