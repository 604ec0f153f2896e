"""Move only what changed: the byte ranges where two histories of a domain may differ
since their fork, and applying a timeline's content there, in place, on existing disks.

A failback (issue 12) brings the protected site's disks — which hold the old timeline
up to the fork and then whatever that site wrote before it went down — to the new
timeline's content at a point ``M``. The ranges where the two may differ are a subset of:

* the old timeline's records after the fork seq (its segments' indexes, ``changed_in_store``),
* the frames the old site's replication log still holds after the fork — written, acked,
  never shipped (``changed_in_log``),
* the regions its filter's dirty-region maps flag — written, perhaps never acked
  (``cdp.dirtymap``),
* the new timeline's records in ``(fork, M]`` (``changed_in_store`` again).

Everything here is computed from indexes, logs and maps alone: no payload is read to
find what to move. ``restrict`` cuts a full recovery plan at ``M`` (``rocva.plan``) down
to those ranges, and ``apply_in_place`` writes their content there — payload ranges and
the sub-blocks of base chunks that hold them, every byte written; holes where the
content is zeros without a payload — so each range ends exactly as the recovered image
would hold it. Ranges are per disk slot, as ``(start, end)`` int64 arrays, sorted and
disjoint once merged.

The store can say what changed only above a timeline's horizon: the rows at or below it
are gone with retention (``CatalogView.rows_between`` returns only the rows it keeps).
``changed_in_store`` asked to start below the horizon raises ``HorizonPassed`` instead of
answering with the part it still holds: the caller rewrites the disks whole.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from cdp.catalog_read import CatalogView
from cdp.errors import HorizonPassed
from cdp.file_kinds import open_regular
from cdp.frame import decode_frame
from cdp.gather import gather_bounded
from cdp.records import KIND_ZERO
from cdp.replog import ReplicationLog
from cdp.store.base import ObjectStore
from rocva.fetch import Fetcher, execute, pool_workers
from rocva.plan import (
    EXTENT_DTYPE, SRC_BASE, SRC_WRITE, SRC_ZERO, DiskPlan, RecoveryPlan, _base_pieces, _get_index, base_parts,
)
from rocva.resume import zero_range
from rocva.work_units import base_groups, segment_groups

Ranges = tuple[np.ndarray, np.ndarray]  # (start, end), int64
# Units in flight while a delta is applied. Its units are small: a partial chunk read
# (rocva.work_units.ChunkCopy) is a head of ~2 KiB and then a few 64 KiB sub-blocks, a
# segment run one or two 64 KiB blocks of scattered writes, so the time goes into GET
# latency, not bytes: twice the recovery's 8 keeps GETs outstanding. Memory stays below
# CONCURRENCY x (2 x RUN_BYTES_MAX + a block) for runs, or x one chunk object: 16 x 5
# MiB with 64 KiB .. 1 MiB blocks and 4 MiB chunks.
CONCURRENCY = 16
RUN_BYTES_MAX = 2 << 20
# Read through gaps of at most two 64 KiB blocks, not a recovery's 1 MiB: a delta's
# writes are scattered, and a GET of a few blocks costs less than 16 blocks of bytes.
GAP_BYTES_MAX = 128 << 10


def empty() -> Ranges:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def merge(start: np.ndarray, end: np.ndarray) -> Ranges:
    """Sorted, disjoint ranges covering the same bytes (touching ranges joined)."""
    start, end = np.asarray(start, np.int64), np.asarray(end, np.int64)
    keep = end > start
    start, end = start[keep], end[keep]
    if not len(start):
        return empty()
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)
    new = np.ones(len(start), bool)
    new[1:] = start[1:] > reach[:-1]
    heads = np.flatnonzero(new)
    return start[heads], np.maximum.reduceat(end, heads)


def union(*parts: Ranges) -> Ranges:
    return merge(np.concatenate([p[0] for p in parts] or [np.zeros(0, np.int64)]),
                 np.concatenate([p[1] for p in parts] or [np.zeros(0, np.int64)]))


def total(r: Ranges) -> int:
    return int((r[1] - r[0]).sum())


def _by_disk(disk: np.ndarray, offset: np.ndarray, length: np.ndarray, slots: dict[int, int],
             n: int) -> list[Ranges]:
    out = []
    for k in range(n):
        ids = [d for d, s in slots.items() if s == k]
        sel = np.isin(disk, ids)
        a = offset[sel].astype(np.int64)
        out.append(merge(a, a + length[sel].astype(np.int64)))
    return out


async def changed_in_store(store: ObjectStore, view: CatalogView, after_seq: int, upto_seq: int) -> list[Ranges]:
    """Per disk slot of ``view``, the ranges its WRITE/ZERO records in ``(after_seq,
    upto_seq]`` touch (segment indexes only). ``HorizonPassed`` when ``after_seq`` is below
    the view's horizon: the rows of ``(after_seq, horizon_seq]`` are gone, and
    ``rows_between`` would silently leave their writes out."""
    slots = {int(d["disk"]): k for k, d in enumerate(view.disks)}
    if upto_seq <= after_seq:
        return [empty() for _ in view.disks]
    if after_seq < view.horizon_seq:
        raise HorizonPassed(
            f"domain {view.domain_id} timeline {view.timeline_id}: retention moved its horizon to seq "
            f"{view.horizon_seq}, past seq {after_seq}: the writes in ({after_seq}, {view.horizon_seq}] are no "
            f"longer in the store")
    rows = await view.rows_between(after_seq + 1, upto_seq)
    keys = view.segment_keys(rows)
    indexes = await gather_bounded([_get_index(store, k, r) for k, r in zip(keys, rows)], CONCURRENCY)
    parts = []
    for index, row in zip(indexes, rows):
        recs = index.rows_for_seqs(max(after_seq + 1, int(row["first_seq"])), min(upto_seq, int(row["last_seq"])))
        parts.append(recs[recs["kind"] <= KIND_ZERO])
    if not parts:
        return [empty() for _ in view.disks]
    cols = {c: np.concatenate([p[c] for p in parts]) for c in ("disk", "offset", "length")}
    return _by_disk(cols["disk"], cols["offset"], cols["length"], slots, len(view.disks))


def changed_in_log(path: str | os.PathLike[str], domain: int, after_seq: int,
                   disk_ids: Sequence[int]) -> tuple[list[Ranges], int]:
    """Per disk (in ``disk_ids`` order), the ranges the frames of ``domain`` in the
    replication log at ``path`` touch after ``after_seq``, read-only; and the last seq
    the log holds for the domain (0: none). Every entry is checksummed on read: a
    corrupt log raises."""
    slots = {int(d): k for k, d in enumerate(disk_ids)}
    parts, last = [], 0
    with ReplicationLog.open(path, readonly=True) as log:
        for _, body in log.entries():
            frame = decode_frame(body)
            if frame.domain != domain or frame.last_seq <= after_seq:
                continue
            recs = frame.records
            recs = recs[(recs["seq"] > after_seq) & (recs["kind"] <= KIND_ZERO)]
            parts.append(recs[["disk", "offset", "length"]])
            last = max(last, frame.last_seq)
    if not parts:
        return [empty() for _ in disk_ids], last
    cols = np.concatenate(parts)
    return _by_disk(cols["disk"], cols["offset"], cols["length"], slots, len(disk_ids)), last


def flagged(flags: np.ndarray, region_bytes: int, size: int) -> Ranges:
    """The byte ranges of the flagged regions of a dirty-region map (``cdp.dirtymap``)."""
    idx = np.flatnonzero(flags).astype(np.int64)
    start = idx * region_bytes
    return merge(start, np.minimum(start + region_bytes, size))


def clip(extents: np.ndarray, ranges: Ranges) -> np.ndarray:
    """The parts of ``extents`` (tiling a disk, in offset order) inside ``ranges``; a
    WRITE part's payload position moves with its start."""
    rs, re_ = ranges
    if not len(rs) or not len(extents):
        return np.zeros(0, dtype=EXTENT_DTYPE)
    e0 = extents["offset"].astype(np.int64)
    e1 = e0 + extents["length"].astype(np.int64)
    first = np.searchsorted(e1, rs, side="right")  # the first extent ending after a range starts
    last = np.searchsorted(e0, re_, side="left")  # past the last extent starting before it ends
    count = np.maximum(last - first, 0)
    which = np.repeat(first - np.concatenate(([0], np.cumsum(count)[:-1])), count) + np.arange(int(count.sum()))
    a = np.maximum(e0[which], np.repeat(rs, count))
    b = np.minimum(e1[which], np.repeat(re_, count))
    out = extents[which].copy()
    out["offset"], out["length"] = a, b - a
    write = out["kind"] == SRC_WRITE
    out["pos"][write] += (a - e0[which])[write].astype(np.uint64)
    return out[b > a]


def restrict(plan: RecoveryPlan, ranges: list[Ranges]) -> RecoveryPlan:
    """``plan`` (a full recovery plan) cut down to ``ranges`` per disk slot."""
    disks = []
    for d, r in zip(plan.disks, ranges):
        extents = clip(d.extents, r)
        disks.append(replace(d, extents=extents, base_pieces=_base_pieces(extents, d.manifest)))
    return replace(plan, disks=disks)


def zero_ranges(disk: DiskPlan) -> Ranges:
    """The bytes ``disk``'s plan makes zero without a payload: its ZERO extents and its
    BASE extents in all-zero chunks (all of them when the disk has no base)."""
    ext = disk.extents
    zero = ext[ext["kind"] == SRC_ZERO]
    starts, ends = [zero["offset"].astype(np.int64)], [(zero["offset"] + zero["length"]).astype(np.int64)]
    if disk.manifest is None:
        base = ext[ext["kind"] == SRC_BASE]
        starts.append(base["offset"].astype(np.int64))
        ends.append((base["offset"] + base["length"]).astype(np.int64))
    else:
        chunk, a, b = base_parts(ext, disk.manifest.chunk_size)
        in_zero = disk.manifest.zero_mask()[chunk]
        starts.append(a[in_zero])
        ends.append(b[in_zero])
    return merge(np.concatenate(starts), np.concatenate(ends))


def _punch_zeros(plan: RecoveryPlan, fds: list[int]) -> None:
    """Holes where the plan puts zeros without a payload (``zero_ranges``). The WRITE and
    BASE pieces are written densely, every byte (zero pages too), over what the disks
    held: punching those first, too, cost ~14k fallocates for bytes about to be
    overwritten (1.4 s of a 5.9 s failback, benchmarks.failback)."""
    for d, fd in zip(plan.disks, fds):
        start, end = zero_ranges(d)
        for a, b in zip(start.tolist(), end.tolist()):
            zero_range(fd, a, b - a)


async def apply_in_place(store: ObjectStore, plan: RecoveryPlan, paths: Sequence[Path]) -> int:
    """Write ``plan``'s extents (``restrict``) into the existing disk files ``paths`` (one
    per disk slot, each exactly its disk's size), fsync them; bytes written."""
    fds = []
    try:
        for d, path in zip(plan.disks, paths):
            fds.append(open_regular(path, os.O_RDWR))
            have = os.fstat(fds[-1]).st_size
            if have != d.size:
                raise ValueError(f"{path}: {have} bytes, the domain's disk {d.disk} has {d.size}")
        await asyncio.to_thread(_punch_zeros, plan, fds)
        with ThreadPoolExecutor(pool_workers(CONCURRENCY), thread_name_prefix="delta") as pool:
            fetcher = Fetcher(store, fds, pool, sparse=False)
            for groups in (segment_groups(plan, RUN_BYTES_MAX, GAP_BYTES_MAX), base_groups(plan, partial=True)):
                await execute(groups, fetcher, concurrency=CONCURRENCY, skip=lambda name, nbytes: False,
                              on_group_done=lambda name, digest: None, on_unit_done=lambda nbytes: None)
        await asyncio.to_thread(lambda: [os.fsync(fd) for fd in fds])
        return fetcher.bytes_written
    finally:
        for fd in fds:
            os.close(fd)
