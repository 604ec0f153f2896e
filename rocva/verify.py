"""Verify / scrub a domain in the object store: catalog vs objects, seq continuity, checksums.

``verify(store, domain, deep=False)`` reports problems per object instead of stopping at
the first one, so one run tells an operator everything that is wrong:

* the catalog chain loads (every generation decodes; a missing one is named);
* per timeline (FORMAT.md §8.5): the catalog's pages decode and agree with the
  references that name them; the segments its rows name exist, with the size the catalog
  records, and cover ``horizon_seq + 1 .. committed_seq`` without a gap (a deleted
  segment is reported as a gap);
* each mark the catalog holds is a ``MARK`` record of its time and name length at its
  seq (from the index), and of its very name where the segment is read whole;
* base manifests exist and decode, and every chunk they name exists;
* checksums: the default reads every segment's index (its tail: footer and index sums)
  and every manifest; ``deep`` reads every byte — whole segments, every chunk — and
  checks every block and chunk sum; ``sample`` deep-checks a random share of segments.

It holds a recovery lease on the domain throughout, taken before the catalog is read
(FORMAT.md §11.3), so that a retention beside it deletes nothing the catalog it checks
names.

Objects under the domain's prefix that the catalog does not name are listed as
``unreferenced`` (uploads whose catalog commit never happened); they are not errors —
unless they lie past the current timeline's ``committed_seq`` and are no upload in
flight, or pages lie past every timeline's: then the catalog was rolled back, a problem
(``rocva.integrity.rollback_problems``). So is a catalog older than what a witness in
``seen`` (the DRVA's metadata) last saw committed (``rocva.integrity.behind_problems``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cdp.base_image import chunk_bytes_max, chunk_namer_of, decode_chunk, decode_manifest
from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView, row_records
from cdp.errors import CdpError, ConfigError, FormatError, NotFound
from cdp.layout import chunk_key, segment_prefix
from cdp.records import KIND_ZERO
from cdp.segment import decode_segment, read_segment_index
from cdp.store.base import ObjectStore, get_bounded
from cdp.sorted_find import find_keys
from rocva.integrity import SeenCommit, behind_problems, rollback_problems
from rocva.plan import manifest_bytes_max
from rocva.recover import recovery_lease_held
from rocva.target import mark_payload, mark_problem

CONCURRENCY = 8


class _Report:
    def __init__(self) -> None:
        self.problems: list[dict[str, str]] = []
        self.checked = {"segments": 0, "manifests": 0, "chunks": 0, "bytes_read": 0}
        self.unreferenced: list[str] = []

    def problem(self, key: str, what: str) -> None:
        self.problems.append({"object": key, "problem": what})


async def verify(store: ObjectStore, domain: int, *, deep: bool = False, sample: float = 0.0, seed: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 timeline: int | None = None, seen: tuple[SeenCommit, ...] = ()) -> dict[str, Any]:
    """Check ``domain`` (see the module docstring): every timeline, or only ``timeline``;
    returns a report with ``ok``. ``ConfigError`` for a ``sample`` that is no share in
    0..1 (NaN compared false with everything and deep-checked nothing: a report of
    "OK" for a check that never ran)."""
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 <= sample <= 1:
        raise ConfigError(f"sample: expected a share of segments in 0..1, got {sample!r}")
    # Under a recovery lease taken before the catalog is read, as a recovery (FORMAT.md
    # §11.3): a retention beside it deleted what the catalog it loaded names, and a
    # healthy store was reported damaged ("missing ... a gap in the recovery history").
    async with recovery_lease_held(store, domain, f"cdp verify domain {domain}"):
        return await _verify(store, domain, deep=deep, sample=sample, seed=seed, progress=progress,
                             timeline=timeline, seen=seen)


async def _verify(store: ObjectStore, domain: int, *, deep: bool, sample: float, seed: int | None,
                  progress: Callable[[int, int], None] | None, timeline: int | None,
                  seen: tuple[SeenCommit, ...]) -> dict[str, Any]:
    """``verify``'s work, under its lease."""
    t0 = time.monotonic()
    report = _Report()
    try:
        state, generation = await load_catalog(store, domain)
    except CdpError as exc:
        report.problem(f"d/{domain:08x}/cat/", f"catalog unreadable: {exc.message}")
        return _summary(domain, None, report, t0, deep)
    for p in behind_problems(domain, state, generation, list(seen)):
        report.problem(p["object"], p["problem"])
    if state is None:
        report.problem(f"d/{domain:08x}/cat/", "no catalog: the domain is not in this store")
        return _summary(domain, None, report, t0, deep)
    if timeline is not None and timeline not in state.timelines:
        report.problem(f"d/{domain:08x}/cat/", f"no timeline {timeline} in the catalog")
        return _summary(domain, generation, report, t0, deep, state)
    listed = {info.key: info.size async for info in store.list(segment_prefix(domain))}
    named: dict[str, int] = {}  # key -> size, every timeline's rows (shared objects once)
    rows_of: dict[str, list[np.void]] = {}  # key -> the catalog rows naming it (a fork cuts one)
    marks_of: dict[str, dict[tuple, str]] = {}  # key -> {(seq, name, ts): timeline text} of its marks
    bases: dict[str, int | None] = {}  # manifest key -> its disk's size, as the catalog says
    for tl in ([timeline] if timeline is not None else sorted(state.timelines)):
        view = CatalogView(store, state, generation, tl)
        try:
            await _continuity(view, listed, named, rows_of, marks_of, report)
        except CdpError as exc:  # a page that does not decode: the rest of it is unknown
            report.problem(f"d/{domain:08x}/page/", f"timeline {tl}: {exc.message}")
        sizes = {int(d["disk"]): int(d["size"]) for d in view.disks}
        bases.update({b["key"]: sizes.get(int(b["disk"])) for b in view.bases})
    disk_sizes = {int(d["disk"]): int(d["size"]) for d in state.disks}
    rng = random.Random(seed)
    jobs = [(k, size, deep or (sample > 0 and rng.random() < sample)) for k, size in named.items() if k in listed]
    done = 0
    total = len(jobs) + len(bases)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one_segment(key: str, size: int, whole: bool) -> None:
        nonlocal done
        async with sem:
            try:
                payload = None
                if whole:
                    data = await get_bounded(store, key, size)  # the size the catalog records
                    report.checked["bytes_read"] += len(data)
                    index, payload = decode_segment(key, data)
                else:
                    index = await read_segment_index(store, key)
                    report.checked["bytes_read"] += index.object_size - index.index_offset
                for row in rows_of[key]:
                    row_records(key, row, index)
                    _check_extents(key, index.rows_for_seqs(int(row["first_seq"]), int(row["last_seq"])),
                                   disk_sizes)
                report.checked["segments"] += 1
                for (seq, name, ts), where in marks_of.get(key, {}).items():
                    # The name itself only where the payload was read anyway (deep): its length otherwise.
                    got = None if payload is None else mark_payload(index, payload, seq)
                    problem = mark_problem(index, {"seq": seq, "name": name, "ts": ts}, got)
                    if problem is not None:
                        report.problem(key, f"{where}the catalog's mark {name!r} at seq {seq} is no such mark: "
                                            f"{problem}")
            except CdpError as exc:
                report.problem(key, exc.message)
        done += 1
        if progress:
            progress(done, total)

    await asyncio.gather(*(one_segment(*j) for j in jobs))
    for key in sorted(bases):
        await _check_base(store, key, bases[key], deep, report, sem)
        done += 1
        if progress:
            progress(done, total)
    report.unreferenced = sorted(set(listed) - set(named))
    for p in await rollback_problems(store, state):
        report.problem(p["object"], p["problem"])
    return _summary(domain, generation, report, t0, deep, state)


def _check_extents(key: str, records: np.ndarray, disk_sizes: dict[int, int]) -> None:
    """``FormatError`` for the first write of ``records`` to a disk the catalog does not
    list or past its end, as a recovery of any point refuses it (``rocva.plan``): a
    verify that passed such a segment said "OK" of a domain no point of which recovers."""
    writes = records[records["kind"] <= KIND_ZERO]
    if not len(writes):
        return
    at, known = find_keys(np.array(list(disk_sizes), dtype=np.int64), writes["disk"])
    sizes = np.array(list(disk_sizes.values()), dtype=np.uint64)
    bad = ~known | (writes["offset"] + writes["length"] > np.where(known, sizes[at] if len(sizes) else 0, 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        r = writes[i]
        what = "writes past the end of the disk" if known[i] else "the catalog lists no such disk"
        raise FormatError(f"segment {key}: record seq {int(r['seq'])} (disk {int(r['disk'])}, offset {int(r['offset'])}, "
                          f"length {int(r['length'])}): {what}")


async def _continuity(view: CatalogView, listed: dict[str, int], named: dict[str, int],
                      rows_of: dict[str, list[np.void]], marks_of: dict[str, dict[tuple, str]],
                      report: _Report) -> None:
    """Every segment the timeline's rows name exists with its size; the rows hold every
    seq from ``horizon_seq + 1`` to ``committed_seq``. Each row is kept in ``rows_of``
    for the segment's check against its index (seqs, times, payload length), and each
    mark in ``marks_of`` under the segment that holds its seq (checked to be that MARK
    record, ``rocva.target.mark_problem``)."""
    expect = None
    where = f"timeline {view.timeline_id}: " if len(view.state.timelines) > 1 else ""
    last_key = f"d/{view.domain_id:08x}/cat/"
    mark_seqs = np.array([m["seq"] for m in view.marks], dtype=np.uint64)
    async for rows in view.iter_rows():
        if len(rows) and len(mark_seqs):  # the marks these rows hold: a searchsorted, no loop over rows
            at = np.searchsorted(rows["last_seq"], mark_seqs)
            inside = at < len(rows)
            inside[inside] &= rows["first_seq"][at[inside]] <= mark_seqs[inside]
            keys = view.segment_keys(rows[at[inside]])
            for key, i in zip(keys, np.flatnonzero(inside).tolist()):
                m = view.marks[i]
                marks_of.setdefault(key, {}).setdefault((m["seq"], m["name"], m["ts"]), where)
        for key, row in zip(view.segment_keys(rows), rows):
            first, last = int(row["first_seq"]), int(row["last_seq"])
            if expect is None:
                expect = first if first <= view.horizon_seq + 1 else view.horizon_seq + 1
            if first != expect:
                report.problem(key, f"{where}seq gap: expected a segment starting at seq {expect}")
            expect, last_key = last + 1, key
            rows_of.setdefault(key, []).append(row.copy())
            if key in named:
                continue
            named[key] = int(row["size"])
            if key not in listed:
                report.problem(key, f"{where}missing: seqs {first}..{last} are named by the catalog but "
                                    f"the object is gone (a gap in the recovery history)")
            elif listed[key] != int(row["size"]):
                report.problem(key, f"{where}size {listed[key]} bytes, the catalog records {int(row['size'])}")
    end = view.committed_seq if expect is None else expect - 1
    if end != view.committed_seq:
        report.problem(last_key, f"{where}segments end at seq {end}, committed_seq is {view.committed_seq}")


async def _check_base(store: ObjectStore, key: str, disk_size: int | None, deep: bool, report: _Report,
                      sem: asyncio.Semaphore) -> None:
    """The manifest decodes, is the size the catalog gives its disk (a recovery refuses
    it otherwise), and its chunks exist (``deep``: and decode)."""
    try:
        manifest = decode_manifest(key, await get_bounded(store, key, manifest_bytes_max(disk_size)))
    except NotFound:
        report.problem(key, "missing: the catalog names this base manifest")
        return
    except CdpError as exc:
        report.problem(key, exc.message)
        return
    if manifest.disk_size != disk_size:
        report.problem(key, f"disk_size {manifest.disk_size}, the catalog says its disk has "
                            f"{'no entry' if disk_size is None else f'{disk_size} bytes'}")
    report.checked["manifests"] += 1
    hashes = {manifest.hash_of(i) for i in range(manifest.chunk_count) if manifest.hashes[i].any()}

    async def one(h: bytes) -> None:
        ck = chunk_key(h)
        async with sem:
            try:
                if deep:
                    data = await get_bounded(store, ck, chunk_bytes_max(manifest.chunk_size))
                    report.checked["bytes_read"] += len(data)
                    decode_chunk(ck, data, h, namer=chunk_namer_of(store))
                else:
                    await store.stat(ck)
                report.checked["chunks"] += 1
            except NotFound:
                report.problem(ck, f"missing: chunk of base {key}")
            except CdpError as exc:
                report.problem(ck, exc.message)

    await asyncio.gather(*(one(h) for h in sorted(hashes)))


def _summary(domain: int, generation: int | None, report: _Report, t0: float, deep: bool,
             state=None) -> dict[str, Any]:
    return {
        "domain": domain,
        "ok": not report.problems,
        "deep": deep,
        "generation": generation,
        "committed_seq": state.timeline().committed_seq if state is not None else None,
        "timelines": sorted(state.timelines) if state is not None else [],
        "checked": report.checked,
        "problems": report.problems,
        "unreferenced": report.unreferenced,
        "seconds": round(time.monotonic() - t0, 3),
    }

