"""Executing a plan: fetch the surviving payload ranges and base chunks, pwrite them.

The work is cut into **units**, each one ranged GET (or one chunk GET) followed by the
``os.pwrite`` calls that place its bytes, and units into **groups**, the granularity of
resume (``rocva.recover``):

- ``seg:<key>``: every ``WRITE`` extent of one segment, sorted by payload position and
  cut into ``SegmentRun`` units — runs of contiguous blocks (at most about
  ``run_bytes_max`` raw bytes each), fetched by ``read_blocks``, which verifies each
  block's ``stored_xxh3`` and ``raw_xxh3``;
- ``base:<disk>:<batch>``: the base pieces of ``batch_chunks`` consecutive chunk positions
  of one disk, one ``ChunkCopy`` unit per distinct chunk hash (a chunk that appears
  several times in the batch is fetched once), decoded by ``decode_chunk``.

Bounds: at most ``concurrency`` units are in flight (a semaphore taken *before* a task
is created, so pending work never piles up as tasks), each holding one run or one
chunk: memory stays below ``concurrency × (run_bytes_max + one write + one block)``.
Decompression, checksums and pwrite run on a thread pool (lz4, xxhash and os.pwrite
release the GIL). A unit writes bytes no other unit writes (the plan's extents are
disjoint), so units run in any order.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from cdp.base_image import decode_chunk
from cdp.errors import FormatError, NotFound
from cdp.layout import chunk_key
from cdp.segment import SegmentIndex, read_blocks
from rocva.plan import EXTENT_DTYPE, SRC_WRITE, RecoveryPlan

RUN_BYTES_MAX_DEFAULT = 16 << 20
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
    """One base chunk and where its pieces go (``chunk_off`` inside the chunk)."""

    key: str
    hash16: bytes
    chunk_len: int
    slot: np.ndarray
    offset: np.ndarray
    start: np.ndarray
    length: np.ndarray
    nbytes: int


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


def _runs(index: SegmentIndex, slot, off, pos, length, run_bytes_max: int) -> list[SegmentRun]:
    """Cut one segment's writes (sorted by ``pos``) into runs of contiguous blocks."""
    brs = index.block_raw_size
    fb = (pos // brs).astype(np.int64)
    lb = ((pos + length - 1) // brs).astype(np.int64)
    new = np.ones(len(fb), dtype=bool)
    new[1:] = fb[1:] > np.maximum.accumulate(lb)[:-1] + 1  # a gap of unneeded blocks
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


def segment_groups(plan: RecoveryPlan, run_bytes_max: int = RUN_BYTES_MAX_DEFAULT
                   ) -> Iterator[tuple[str, int, list[SegmentRun]]]:
    """(group name, bytes, units) per segment with surviving writes, in seq order."""
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
        units = _runs(index, *cols, run_bytes_max)
        yield f"seg:{index.key}", sum(u.nbytes for u in units), units


def base_groups(plan: RecoveryPlan, batch_chunks: int = BASE_BATCH_CHUNKS_DEFAULT
                ) -> Iterator[tuple[str, int, list[ChunkCopy]]]:
    """(group name, bytes, units) per batch of ``batch_chunks`` chunk positions of each disk."""
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
            for u in range(len(uniq)):
                sel = np.flatnonzero(inverse.ravel() == u)
                h = m.hash_of(int(p["chunk"][first[u]]))
                units.append(ChunkCopy(chunk_key(h), h, m.chunk_len(int(p["chunk"][first[u]])),
                                       np.full(len(sel), k, np.int64), p["offset"][sel].astype(np.int64),
                                       p["chunk_off"][sel].astype(np.int64), p["length"][sel].astype(np.int64),
                                       int(p["length"][sel].sum())))
            yield f"base:{d.disk}:{int(batch[lo])}", sum(u.nbytes for u in units), units


# --------------------------------------------------------------------------- doing


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
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


def _place(fds: list[int], unit: Unit, raw: bytes) -> None:
    """pwrite every piece of ``unit`` from ``raw`` (runs on the thread pool)."""
    mv = memoryview(raw)
    for s, o, a, n in zip(unit.slot.tolist(), unit.offset.tolist(), unit.start.tolist(), unit.length.tolist()):
        if a + n > len(mv):  # the plan's positions come from a verified index: a bug if hit
            raise AssertionError(f"piece {a}+{n} outside {len(mv)} fetched bytes")
        _pwrite_sparse(fds[s], mv[a : a + n], o)


class Fetcher:
    """Runs units against ``store`` into the open image files ``fds`` (by disk slot)."""

    def __init__(self, store, fds: list[int], executor: Executor) -> None:
        self.store = store
        self.fds = fds
        self.executor = executor
        self.bytes_written = 0
        self.units_done = 0

    async def run(self, unit: Unit) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(unit, SegmentRun):
            try:
                raw = await read_blocks(self.store, unit.index, unit.first_block, unit.last_block,
                                        executor=self.executor)
            except NotFound as exc:
                raise NotFound(f"segment {unit.index.key} is missing from {self.store.describe()}") from exc
        else:
            try:
                data = await self.store.get(unit.key)
            except NotFound as exc:
                raise NotFound(f"chunk {unit.key} is missing from {self.store.describe()}") from exc
            raw = await loop.run_in_executor(self.executor, decode_chunk, unit.key, data, unit.hash16)
            if len(raw) != unit.chunk_len:
                raise FormatError(f"chunk {unit.key}: {len(raw)} bytes, the manifest needs {unit.chunk_len}")
        await loop.run_in_executor(self.executor, _place, self.fds, unit, raw)
        self.bytes_written += unit.nbytes
        self.units_done += 1


async def execute(groups, fetcher: Fetcher, *, concurrency: int, skip: Callable[[str, int], bool],
                  on_group_done: Callable[[str], None], on_unit_done: Callable[[int], None]) -> None:
    """Run every unit of every group for which ``skip(name, nbytes)`` is false,
    ``concurrency`` units at a time.

    ``on_group_done(name)`` is called once all of a group's units have returned, i.e.
    their pwrites are done (not yet fsynced). On the first failure no new unit starts;
    the units in flight finish (their groups may still complete), then the first error
    is raised.
    """
    assert concurrency >= 1, concurrency
    sem = asyncio.Semaphore(concurrency)
    remaining: dict[str, int] = {}
    failures: list[BaseException] = []
    tasks: set[asyncio.Task] = set()

    async def one(name: str, unit: Unit) -> None:
        try:
            await fetcher.run(unit)
        except Exception as exc:  # noqa: BLE001 - recorded, raised by execute()
            failures.append(exc)
            return
        finally:
            sem.release()
        on_unit_done(unit.nbytes)
        remaining[name] -= 1
        if remaining[name] == 0:
            on_group_done(name)

    try:
        for name, nbytes, units in groups:
            if failures:
                break
            if skip(name, nbytes):
                continue
            remaining[name] = len(units)
            if not units:
                on_group_done(name)
            for unit in units:
                await sem.acquire()
                if failures:
                    sem.release()
                    break
                task = asyncio.create_task(one(name, unit))
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
