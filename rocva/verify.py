"""Verify / scrub a domain in the object store: catalog vs objects, seq continuity, checksums.

``verify(store, domain, deep=False)`` reports problems per object instead of stopping at
the first one, so one run tells an operator everything that is wrong:

* the catalog chain loads (every generation decodes; a missing one is named);
* segments named by the catalog exist, with the size the catalog records, and cover
  ``first..committed_seq`` without a gap (a deleted segment is reported as a gap);
* base manifests exist and decode, and every chunk they name exists;
* checksums: the default reads every segment's index (its tail: footer and index sums)
  and every manifest; ``deep`` reads every byte — whole segments, every chunk — and
  checks every block and chunk sum; ``sample`` deep-checks a random share of segments.

Objects under the domain's prefix that the catalog does not name are listed as
``unreferenced`` (uploads whose catalog commit never happened); they are not errors.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from cdp.base_image import decode_chunk, decode_manifest
from cdp.catalog import load_catalog
from cdp.errors import CdpError, NotFound
from cdp.layout import chunk_key, segment_prefix
from cdp.segment import decode_segment, read_segment_index

CONCURRENCY = 8


class _Report:
    def __init__(self) -> None:
        self.problems: list[dict[str, str]] = []
        self.checked = {"segments": 0, "manifests": 0, "chunks": 0, "bytes_read": 0}
        self.unreferenced: list[str] = []

    def problem(self, key: str, what: str) -> None:
        self.problems.append({"object": key, "problem": what})


async def verify(store, domain: int, *, deep: bool = False, sample: float = 0.0, seed: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Check ``domain`` (see the module docstring); returns a report with ``ok``."""
    t0 = time.monotonic()
    report = _Report()
    try:
        state, generation = await load_catalog(store, domain)
    except CdpError as exc:
        report.problem(f"d/{domain:08x}/cat/", f"catalog unreadable: {exc.message}")
        return _summary(domain, None, report, t0, deep)
    if state is None:
        report.problem(f"d/{domain:08x}/cat/", "no catalog: the domain is not in this store")
        return _summary(domain, None, report, t0, deep)
    rows = state.segments_between(0, state.committed_seq)
    keys = state.segment_keys(rows)
    listed = {info.key: info.size async for info in store.list(segment_prefix(domain))}
    _continuity(state, rows, keys, listed, report)
    rng = random.Random(seed)
    jobs = [(k, int(r["size"]), deep or (sample > 0 and rng.random() < sample)) for k, r in zip(keys, rows)
            if k in listed]
    done = 0
    total = len(jobs) + len(state.bases)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one_segment(key: str, size: int, whole: bool) -> None:
        nonlocal done
        async with sem:
            try:
                if whole:
                    data = await store.get(key)
                    report.checked["bytes_read"] += len(data)
                    decode_segment(key, data)
                else:
                    index = await read_segment_index(store, key)
                    report.checked["bytes_read"] += index.object_size - index.index_offset
                report.checked["segments"] += 1
            except CdpError as exc:
                report.problem(key, exc.message)
        done += 1
        if progress:
            progress(done, total)

    await asyncio.gather(*(one_segment(*j) for j in jobs))
    for base in state.bases:
        await _check_base(store, base["key"], deep, report, sem)
        done += 1
        if progress:
            progress(done, total)
    report.unreferenced = sorted(set(listed) - set(keys))
    return _summary(domain, generation, report, t0, deep, state)


def _continuity(state, rows, keys: list[str], listed: dict[str, int], report: _Report) -> None:
    """Every catalog segment exists with its size; seqs are contiguous to committed_seq."""
    expect = int(rows["first_seq"][0]) if len(rows) else state.committed_seq + 1
    for key, row in zip(keys, rows):
        first, last = int(row["first_seq"]), int(row["last_seq"])
        if first != expect:
            report.problem(key, f"seq gap: expected a segment starting at seq {expect}")
        expect = last + 1
        if key not in listed:
            report.problem(key, f"missing: seqs {first}..{last} are named by the catalog but "
                                f"the object is gone (a gap in the recovery history)")
        elif listed[key] != int(row["size"]):
            report.problem(key, f"size {listed[key]} bytes, the catalog records {int(row['size'])}")
    if len(rows) and expect != state.committed_seq + 1:
        report.problem(keys[-1], f"segments end at seq {expect - 1}, committed_seq is {state.committed_seq}")


async def _check_base(store, key: str, deep: bool, report: _Report, sem: asyncio.Semaphore) -> None:
    try:
        manifest = decode_manifest(key, await store.get(key))
    except NotFound:
        report.problem(key, "missing: the catalog names this base manifest")
        return
    except CdpError as exc:
        report.problem(key, exc.message)
        return
    report.checked["manifests"] += 1
    hashes = {manifest.hash_of(i) for i in range(manifest.chunk_count) if manifest.hashes[i].any()}

    async def one(h: bytes) -> None:
        ck = chunk_key(h)
        async with sem:
            try:
                if deep:
                    data = await store.get(ck)
                    report.checked["bytes_read"] += len(data)
                    decode_chunk(ck, data, h)
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
        "committed_seq": state.committed_seq if state is not None else None,
        "checked": report.checked,
        "problems": report.problems,
        "unreferenced": report.unreferenced,
        "seconds": round(time.monotonic() - t0, 3),
    }

