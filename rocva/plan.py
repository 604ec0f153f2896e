"""The recovery planner: which bytes of which object become which bytes of which disk.

For a target seq ``S`` on one timeline and each disk: the newest base at or below ``S``
(``b``, 0 when the disk has none); then the timeline's rows holding ``(min b, S]`` (only
the catalog pages that cover those seqs are read); their segments' indexes are read
(bounded concurrency) and concatenated, each clipped to the seqs its row holds (after a
fork, the parent's last segment holds records the child does not: FORMAT.md §8.5); every
``WRITE``/``ZERO`` record with ``b < seq <= S`` of its disk takes part in a last-writer
resolution (``rocva.extents``), newest first, so each output byte has exactly one source.

Invariants of a ``DiskPlan``:

- ``extents`` tile ``[0, size)`` in offset order, without gap or overlap; each is a
  ``WRITE`` (payload-stream position ``pos`` in segment ``seg`` of the plan), a ``ZERO``
  (nothing to do: a fresh sparse file already reads as zeros) or ``BASE`` (the base
  image, or zeros when the disk has no base);
- ``base_pieces`` are the parts of the ``BASE`` extents that lie in non-zero base chunks:
  the only base bytes to copy. Zero chunks stay holes.

So the images are written once per byte, never zero-filled, and only the payload ranges
and chunks that survive are fetched. Everything is numpy over the index rows; nothing
is done per record or per sector in Python.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from cdp.base_image import CHUNK_SIZE_MIN, HASH_BYTES, HEADER_SIZE, Manifest, decode_manifest
from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView, row_records
from cdp.errors import FormatError, NotFound
from cdp.gather import gather_bounded
from cdp.inventory import image_clash, image_file_name  # image_file_name: re-exported for rocva's modules
from cdp.records import KIND_ZERO
from cdp.segment import SegmentIndex, read_segment_index
from cdp.layout import U32_MAX
from cdp.store.base import ObjectStore, get_bounded
from cdp.sorted_find import find_keys
from rocva.extents import last_writer
from rocva.errors import InvalidTarget
from rocva.target import ResolvedTarget, Target, resolve_target

SRC_WRITE, SRC_ZERO, SRC_BASE = 0, 1, 2  # extent kinds (WRITE/ZERO equal the record kinds)
SRC_NAMES = ("WRITE", "ZERO", "BASE")
EXTENT_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u8"), ("kind", "u1"), ("seg", "<i4"),
                         ("pos", "<u8")])
PIECE_DTYPE = np.dtype([("chunk", "<i8"), ("offset", "<u8"), ("chunk_off", "<u8"), ("length", "<u8")])
CONCURRENCY_DEFAULT = 8
# vm and disk names come from the catalog and become file names: no path tricks.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}")
assert SRC_WRITE == 0 and SRC_ZERO == KIND_ZERO


@dataclass(frozen=True, eq=False)
class DiskPlan:
    """How to build one disk's image (invariants in the module docstring)."""

    disk: int
    vm: str
    name: str
    size: int
    base_seq: int
    manifest: Manifest | None
    extents: np.ndarray
    base_pieces: np.ndarray

    @property
    def image_name(self) -> str:
        return image_file_name(self.vm, self.name)

    def bytes_of(self, kind: int) -> int:
        sel = self.extents["kind"] == kind
        return int(self.extents["length"][sel].sum())

    @property
    def base_copy_bytes(self) -> int:
        return int(self.base_pieces["length"].sum())


@dataclass(frozen=True, eq=False)
class RecoveryPlan:
    """A domain's disks at ``target.seq``: what to fetch from where, and where it goes.

    ``segments`` are the indexes of every segment read, in seq order; a ``WRITE`` extent's
    ``seg`` indexes this list. ``generation`` is the catalog generation planned against.
    """

    domain: int
    domain_name: str
    generation: int
    timeline: int
    target: ResolvedTarget
    disks: list[DiskPlan]
    segments: list[SegmentIndex]
    records_considered: int
    _identity: str = field(default="", repr=False)

    @property
    def seq(self) -> int:
        return self.target.seq

    @property
    def bytes_to_write(self) -> int:
        """Bytes the images receive: surviving payloads and base chunk parts."""
        return sum(d.bytes_of(SRC_WRITE) + d.base_copy_bytes for d in self.disks)

    def identity(self) -> str:
        """A digest of what the plan produces: same identity, same images, same work units."""
        doc = {
            "domain": self.domain, "timeline": self.timeline, "seq": self.seq,
            "disks": [[d.disk, d.vm, d.name, d.size, d.manifest.key if d.manifest else None]
                      for d in self.disks],
            "segments": [s.key for s in self.segments],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict:
        return {
            "domain": self.domain, "timeline": self.timeline, "target_seq": self.seq,
            "generation": self.generation,
            "segments_read": len(self.segments),
            "segments_fetched": len({int(s) for d in self.disks
                                     for s in d.extents["seg"][d.extents["kind"] == SRC_WRITE]}),
            "records_considered": self.records_considered,
            "write_bytes": sum(d.bytes_of(SRC_WRITE) for d in self.disks),
            "zero_bytes": sum(d.bytes_of(SRC_ZERO) for d in self.disks),
            "base_copy_bytes": sum(d.base_copy_bytes for d in self.disks),
            "disks": [{"disk": d.disk, "image": d.image_name, "size": d.size, "base_seq": d.base_seq,
                       "extents": len(d.extents)} for d in self.disks],
        }


# --------------------------------------------------------------------------- reading


def manifest_bytes_max(disk_size: int | None) -> int:
    """The largest base manifest (FORMAT.md §6.2) of a disk of ``disk_size`` bytes: one
    entry per chunk of the smallest chunk size (the chunk size is only known once the
    manifest is read; its exact size is then checked by ``decode_manifest``). With no size
    known, the format's own limit (a u32 chunk count). A larger object under a manifest's
    key is refused before it is read."""
    chunks = U32_MAX if disk_size is None else -(-disk_size // CHUNK_SIZE_MIN)
    return HEADER_SIZE + HASH_BYTES * chunks


async def _get_manifest(store: ObjectStore, key: str, disk_size: int | None) -> Manifest:
    try:
        data = await get_bounded(store, key, manifest_bytes_max(disk_size))
    except NotFound as exc:
        raise NotFound(f"base manifest {key} is missing from {store.describe()}") from exc
    return decode_manifest(key, data)


async def _get_index(store: ObjectStore, key: str, row: np.void) -> SegmentIndex:
    """The index of catalog ``row``'s segment, checked to agree with the row (``row_records``)."""
    try:
        index = await read_segment_index(store, key)
    except NotFound as exc:
        raise NotFound(f"segment {key} is missing from {store.describe()}") from exc
    row_records(key, row, index)
    return index


def _check_disks(state: CatalogView) -> None:
    for d in state.disks:
        for part in (d["vm"], d["name"]):
            if not _SAFE_NAME.fullmatch(part):
                raise FormatError(f"catalog of domain {state.domain_id}: disk {d['disk']}: name "
                                  f"{part!r} cannot name an image file ([A-Za-z0-9._-], no leading dot)")
    clash = image_clash([(d["vm"], d["name"]) for d in state.disks])
    if clash is not None:
        raise FormatError(f"catalog of domain {state.domain_id}: two disks make image {clash[2]}")


# --------------------------------------------------------------------------- resolving


def _concat_rows(indexes: list[SegmentIndex], firsts: list[int], lasts: list[int]) -> dict[str, np.ndarray]:
    """The WRITE/ZERO records of ``indexes[k]`` with ``firsts[k] <= seq <= lasts[k]``, as
    columns, plus ``seg`` (= k)."""
    parts = []
    for k, index in enumerate(indexes):
        rows = index.rows_for_seqs(firsts[k], lasts[k])
        parts.append((k, rows[rows["kind"] <= KIND_ZERO]))
    cols = {}
    for name in ("seq", "offset", "length", "disk", "kind", "raw_pos"):
        cols[name] = np.concatenate([r[name] for _, r in parts]) if parts else np.zeros(0, np.uint64)
    cols["seg"] = np.concatenate([np.full(len(r), k, np.int32) for k, r in parts]) if parts else np.zeros(0, np.int32)
    return cols


def _blame(indexes: list[SegmentIndex], cols: dict, bad: np.ndarray, what: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        key = indexes[int(cols["seg"][i])].key
        raise FormatError(f"segment {key}: record seq {int(cols['seq'][i])} (disk {int(cols['disk'][i])}, "
                          f"offset {int(cols['offset'][i])}, length {int(cols['length'][i])}): {what}")


def _disk_extents(cols: dict, sel: np.ndarray, size: int) -> np.ndarray:
    """Extents tiling ``[0, size)`` for the rows ``sel`` of one disk (ascending seq)."""
    off = cols["offset"][sel].astype(np.int64)
    end = off + cols["length"][sel].astype(np.int64)
    ps, pe, w = last_writer(off, end)
    starts, winners = [ps], [w]
    if len(ps) == 0:
        starts, winners = [np.zeros(1, np.int64)], [np.full(1, -1, np.int64)]
    else:  # the pieces tile [first write, last write end): add the base before and after
        if int(ps[0]) > 0:
            starts.insert(0, np.zeros(1, np.int64))
            winners.insert(0, np.full(1, -1, np.int64))
        if int(pe[-1]) < size:
            starts.append(pe[-1:])
            winners.append(np.full(1, -1, np.int64))
    ps, w = np.concatenate(starts), np.concatenate(winners)
    pe = np.append(ps[1:], size)
    out = np.zeros(len(ps), dtype=EXTENT_DTYPE)
    out["offset"], out["length"] = ps, pe - ps
    won = w >= 0
    rows = sel[w[won]]
    out["kind"] = SRC_BASE
    out["kind"][won] = cols["kind"][rows]
    out["seg"] = -1
    out["seg"][won] = cols["seg"][rows]
    delta = ps[won] - cols["offset"][rows].astype(np.int64)
    out["pos"][won] = cols["raw_pos"][rows] + delta.astype(np.uint64)
    out["seg"][out["kind"] != SRC_WRITE] = -1
    out["pos"][out["kind"] != SRC_WRITE] = 0
    return out


def base_parts(extents: np.ndarray, chunk_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chunk, start, end): the ``BASE`` extents of ``extents`` cut at chunk boundaries."""
    base = extents[extents["kind"] == SRC_BASE]
    a = base["offset"].astype(np.int64)
    b = a + base["length"].astype(np.int64)
    c0, c1 = a // chunk_size, (b - 1) // chunk_size
    counts = c1 - c0 + 1
    first = np.repeat(np.cumsum(counts) - counts, counts)
    chunk = np.repeat(c0, counts) + (np.arange(int(counts.sum())) - first)
    ps = np.maximum(np.repeat(a, counts), chunk * chunk_size)
    pe = np.minimum(np.repeat(b, counts), (chunk + 1) * chunk_size)
    return chunk, ps, pe


def _base_pieces(extents: np.ndarray, manifest: Manifest | None) -> np.ndarray:
    """The parts of ``BASE`` extents that fall in non-zero chunks of ``manifest``."""
    if manifest is None or not (extents["kind"] == SRC_BASE).any():
        return np.zeros(0, dtype=PIECE_DTYPE)
    cs = manifest.chunk_size
    chunk, ps, pe = base_parts(extents, cs)
    keep = ~manifest.zero_mask()[chunk]
    out = np.zeros(int(keep.sum()), dtype=PIECE_DTYPE)
    out["chunk"], out["offset"] = chunk[keep], ps[keep]
    out["chunk_off"], out["length"] = (ps - chunk * cs)[keep], (pe - ps)[keep]
    return out


def _inside_copies(state: CatalogView) -> set[tuple[int, int]]:
    """(seq, disk) of the bases that lie inside a seed's copy of their disk: after its
    seed base and within its ``seeding`` window (FORMAT.md §6.2). Such a base was built
    before the window was known, from zeros and writes, not from the seeded content
    (a catalog an older DRVA wrote can hold one); it is never a replay's start."""
    seeds = {(b["seq"], b["disk"]) for b in state.bases if b["origin"] == "seed"}
    out = set()
    for w in state.windows:
        if w["kind"] != "seeding":
            continue
        last = w["last_seq"]
        for b in state.bases:
            if ((w["first_seq"] - 1, b["disk"]) in seeds and w["first_seq"] <= b["seq"]
                    and (last is None or b["seq"] <= last)):
                out.add((b["seq"], b["disk"]))
    return out


def seeds_between(state: CatalogView, first: int, last: int) -> list[dict]:
    """The ``seed`` bases of ``state`` at a seq in ``first..last``: each says its disk
    holds, at that seq, content no record before it says (§8.2) — so images that hold the
    domain at ``first`` (a standby's) cannot be brought past it by replaying records."""
    return [b for b in state.bases if b["origin"] == "seed" and first <= b["seq"] <= last]


def choose_bases(state: CatalogView, seq: int) -> list[dict | None]:
    """Per disk of ``state``, its newest base at or below ``seq`` (None: zeros), never
    one inside a seed's copy of the disk (``_inside_copies``)."""
    bases = []
    skip = _inside_copies(state)
    for d in state.disks:
        below = [b for b in state.bases if b["disk"] == d["disk"] and b["seq"] <= seq
                 and (b["seq"], b["disk"]) not in skip]
        bases.append(max(below, key=lambda b: b["seq"]) if below else None)
    return bases


async def plan_rows(state: CatalogView, seq: int) -> tuple[list[dict | None], int, np.ndarray]:
    """The catalog's part of a plan at ``seq``: (bases per disk, the first seq to replay,
    the rows holding ``first..seq``). Reads only the pages that cover those seqs."""
    bases = choose_bases(state, seq)
    lo = min((b["seq"] if b else 0) for b in bases) + 1 if bases else seq + 1
    rows = await state.rows_between(lo, seq) if lo <= seq else await state.rows_between(1, 0)
    return bases, lo, rows


async def build_plan(store: ObjectStore, state: CatalogView, target: ResolvedTarget, *,
                     concurrency: int = CONCURRENCY_DEFAULT, after_seq: int | None = None) -> RecoveryPlan:
    """Plan the recovery of every disk of ``state`` at ``target.seq`` (already checked to be a
    recovery point by ``resolve_target``). Reads the chosen base manifests and the
    indexes of the segments in ``(min base seq, S]``; fetches no payload.

    ``after_seq``: the disks already hold the domain at that seq (a standby's images,
    ``rocva.standby``): no base is used, only the records in ``(after_seq, S]`` are
    planned, and ``BASE`` extents mean "keep what the image holds". That is only right
    when no disk was seeded at a seq in ``after_seq..S`` (``seeds_between``: the caller
    rebuilds cold then); ValueError otherwise."""
    assert concurrency >= 1, concurrency
    _check_disks(state)
    seq = target.seq
    if after_seq is None:
        bases, lo, rows = await plan_rows(state, seq)
    else:
        assert after_seq <= seq, (after_seq, seq)
        seeds = seeds_between(state, after_seq, seq)
        if seeds:
            raise ValueError(f"a tail plan from seq {after_seq} to {seq} cannot hold the seed base {seeds[0]['key']}")
        bases, lo = [None] * len(state.disks), after_seq + 1
        rows = await state.rows_between(lo, seq) if lo <= seq else await state.rows_between(1, 0)
    sizes_of = {d["disk"]: d["size"] for d in state.disks}
    manifests = await gather_bounded([_get_manifest(store, b["key"], sizes_of.get(b["disk"])) for b in bases if b],
                                     concurrency)
    by_disk = dict(zip([b["disk"] for b in bases if b], manifests))
    for d in state.disks:
        m = by_disk.get(d["disk"])
        if m is not None and m.disk_size != d["size"]:
            raise FormatError(f"manifest {m.key}: disk_size {m.disk_size}, the catalog says disk "
                              f"{d['disk']} has {d['size']} bytes")
    base_seq = np.array([b["seq"] if b else (after_seq or 0) for b in bases], dtype=np.uint64)
    keys = state.segment_keys(rows)
    indexes = await gather_bounded([_get_index(store, k, r) for k, r in zip(keys, rows)], concurrency)
    cols = _concat_rows(indexes, np.maximum(rows["first_seq"], lo).tolist(),
                        np.minimum(rows["last_seq"], seq).tolist())
    slot, known = find_keys(np.array([d["disk"] for d in state.disks], dtype=np.int64), cols["disk"])
    _blame(indexes, cols, ~known, "the catalog lists no such disk")
    live = cols["seq"] > base_seq[slot]  # records at or below the disk's base are in the base
    cols = {k: v[live] for k, v in cols.items()}
    slot = slot[live]
    sizes = np.array([d["size"] for d in state.disks], dtype=np.uint64)
    _blame(indexes, cols, cols["offset"] + cols["length"] > sizes[slot], "writes past the end of the disk")
    by_slot = np.argsort(slot, kind="stable")  # stable: ascending seq within each disk
    bounds = np.searchsorted(slot[by_slot], np.arange(len(state.disks) + 1))
    disks = []
    for k, d in enumerate(state.disks):
        sel = by_slot[bounds[k] : bounds[k + 1]]
        extents = _disk_extents(cols, sel, d["size"])
        m = by_disk.get(d["disk"])
        disks.append(DiskPlan(d["disk"], d["vm"], d["name"], d["size"], int(base_seq[k]), m,
                              extents, _base_pieces(extents, m)))
    return RecoveryPlan(state.domain_id, state.domain["name"], state.generation, state.timeline_id, target,
                        disks, indexes, len(cols["seq"]))


async def load_state(store: ObjectStore, domain: int, timeline: int | None = None) -> CatalogView:
    """Timeline ``timeline`` (default: the current one) of ``domain``'s catalog; NotFound
    when it has no catalog, InvalidTarget when it has no such timeline."""
    state, generation = await load_catalog(store, domain)
    if state is None:
        raise NotFound(f"domain {domain}: no catalog in {store.describe()}")
    if timeline is not None and timeline not in state.timelines:
        raise InvalidTarget(f"domain {domain}: no timeline {timeline} (timelines: "
                            f"{', '.join(map(str, sorted(state.timelines)))})", (None, None))
    return CatalogView(store, state, generation, timeline)


async def plan_recovery(store: ObjectStore, domain: int, target: Target | int | str, *, timeline: int | None = None,
                        concurrency: int = CONCURRENCY_DEFAULT, now_ns: int | None = None) -> RecoveryPlan:
    """Load the catalog of ``domain``, resolve ``target`` on ``timeline`` (default: the
    current one) and plan its recovery (no payload is fetched). ``InvalidTarget`` names
    the nearest recovery points when it is none."""
    state = await load_state(store, domain, timeline)
    resolved = await resolve_target(state, target, now_ns=now_ns)
    return await build_plan(store, state, resolved, concurrency=concurrency)
