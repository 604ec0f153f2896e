"""Cutting a recovery plan into the work a recovery does: **units** and **groups**.

A unit is one ranged GET (or one chunk GET) followed by the ``os.pwrite`` calls that place
its bytes (``rocva.fetch`` runs it); a group is a list of units, the granularity of resume
(``rocva.recover``, ``rocva.resume``: a group's name and digest are what a state file
records, so how a plan is cut is part of what a state must match, FORMAT.md §14):

- ``seg:<key>`` (``segment_groups``): every ``WRITE`` extent of one segment, sorted by
  payload position and cut into ``SegmentRun`` units — runs of contiguous blocks (at most
  about ``run_bytes_max`` raw bytes each, read through gaps of unneeded blocks of at most
  ``gap_bytes_max``);
- ``base:<disk>:<batch>`` (``base_groups``): the base pieces of ``batch_chunks``
  consecutive chunk positions of one disk, one ``ChunkCopy`` unit per distinct chunk hash
  (a chunk that appears several times in the batch is fetched once), in disk order.

Everything here is numpy over the plan's extent arrays: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cdp.layout import chunk_key
from cdp.segment import SegmentIndex
from rocva.plan import EXTENT_DTYPE, SRC_WRITE, RecoveryPlan

__all__ = ["BASE_BATCH_CHUNKS_DEFAULT", "GAP_BYTES_MAX_DEFAULT", "PAGE", "RUN_BYTES_MAX_DEFAULT", "ChunkCopy",
           "SegmentRun", "Unit", "base_groups", "segment_groups"]

RUN_BYTES_MAX_DEFAULT = 16 << 20
# A full recovery reads through gaps of overwritten writes up to this many raw bytes
# rather than cutting a run there: one GET instead of many (with 64 KiB blocks, random
# 64 KiB writes of which a third are dead cut a 16 MiB segment into ~60 runs; 1723 GETs
# against 97 for 512 MiB of them in tests.rocva.bench_recover), for a few more bytes
# read; their blocks are not decoded. A delta (rocva.delta) passes its own.
GAP_BYTES_MAX_DEFAULT = 1 << 20
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

