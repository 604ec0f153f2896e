"""Consolidation and retention of one domain: ``cdp consolidate DOMAIN``.

One job, under the domain's maintenance lock (FORMAT.md §11.2, one job per domain), for
each of the domain's timelines in turn (§8.5; the current one first):

1. **Choose** the consolidation seq ``B``: the end of the newest segment whose last
   record is older than ``older_than`` and that is a recovery point (so the new base is
   exact, not inside a seeding or resync window). Nothing to do when every disk already
   has a base at or after ``B``.
2. **Build** a base of every disk at ``B``: the recovery planner and executor rebuild the
   disks at ``B`` into a scratch directory (every checksum checked, as for a recovery);
   each image is cut into chunks; all-zero chunks are not stored, a chunk already in the
   store (looked up under a chunk-writer lease, §11.4) or already seen in this job is
   stored once; a manifest per disk names them.
3. **Commit** one catalog delta: the new bases, plus the retention delta
   (``rocva.retention.retention_delta``) when a retention window is given. The window is
   measured back from the job's clock, never from later than the domain's newest record
   plus the skew (``retention_cutoff``), and nothing runs when this host's clock is off
   from the store's by more than the skew (``cdp.locks.check_clock_skew``). The DRVA
   writing the same catalog absorbs this generation and retries its own on top (§8.3);
   if the DRVA wins the race, the job reloads the catalog and recomputes the delta.
4. **Sweep**: delete what the catalog no longer names (``sweep_domain``; deferred while a
   recovery of the domain holds a lease), then, if any manifest was deleted, the chunks
   no manifest names (``sweep_chunks``, store-wide).

Recovery cost stays bounded: after a consolidation, the latest point needs one base and
the segments written since ``B``, whatever the churn before ``B``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cdp.base_image import (
    CHUNK_SIZE_DEFAULT, HASH_BYTES, Namer, chunk_hash, chunk_namer_of, chunk_stored, encode_chunk, encode_manifest,
    is_zero, put_manifest,
)
from cdp.catalog import CatalogWriter
from cdp.catalog_read import CatalogView
from cdp.errors import AlreadyExists, Busy, ConfigError, LeaseLost, StoreError
from cdp.layout import base_manifest_key, chunk_key
from cdp.locks import SKEW_DEFAULT_S, TTL_DEFAULT_S, Lease, check_clock_skew, chunk_writer_lease, maintenance_lock
from cdp.logs import get_logger
from cdp.scratch import scratch_directory
from cdp.store.base import ObjectStore
from rocva.plan import CONCURRENCY_DEFAULT, build_plan, load_state
from rocva.recover import execute_plan
from rocva.retention import newest_record_ns, retention_cutoff, retention_delta, sweep_chunks, sweep_domain
from rocva.target import SEQ_INF, ResolvedTarget, Target, recoverable_ranges

log = get_logger("rocva.consolidate")

SCRATCH_PREFIX = "consolidate-"  # + 8 random characters (one domain's job or another's)

COMMIT_RETRIES = 16
#: The ``writer`` a delta is checked with before it is committed (the real one is drawn
#: by the ``CatalogWriter`` that commits it).
CONSOLIDATE_WRITER = {"id": "0" * 32, "by": "cdp consolidate"}
#: The longest ``older_than_s`` / ``retention_s`` taken: a century, past any policy
#: (``cdp.msa.config.POLICY_LIMITS``) and still far inside the ns clock.
DURATION_S_MAX = 100 * 365.25 * 86400
Progress = Callable[[str, int, int], None]  # (phase, done, total)


def seeding_spans(state: CatalogView) -> list[tuple[int, int]]:
    """The seqs no consolidation base may be at: each ``seeding`` window with the seq of
    its fuzzy base (``first_seq - 1``), an open one to the end of the seq space. While a
    seed is copying, the catalog has no base of the disk yet and still takes it for zeros
    there (FORMAT.md §6.2, §8.2): a base built then would be zeros plus writes."""
    return [(w["first_seq"] - 1, SEQ_INF if w["last_seq"] is None else w["last_seq"])
            for w in state.windows if w["kind"] == "seeding"]


def _outside(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` (inclusive, sorted) minus ``holes`` (inclusive)."""
    for lo, hi in holes:
        out = []
        for a, b in ranges:
            if b < lo or a > hi:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo - 1))
            if b > hi:
                out.append((hi + 1, b))
        ranges = out
    return ranges


async def consolidation_seq(state: CatalogView, cutoff_ns: int) -> int | None:
    """``B`` of step 1 (module docstring), or None when there is nothing to consolidate."""
    r = await state.seq_at_time(cutoff_ns)
    if r is None or r <= state.horizon_seq or not state.disks:
        return None
    row = await state.row_for_seq(r)
    # The newest segment end at or before r: r itself, or the end of the row before.
    end = r if row is None or int(row["last_seq"]) == r else int(row["first_seq"]) - 1
    best = None
    for a, b in reversed(_outside(recoverable_ranges(state), seeding_spans(state))):
        cap = min(b, end)
        if cap < a:
            continue
        row = await state.row_for_seq(cap)
        e = cap if row is None or int(row["last_seq"]) == cap else int(row["first_seq"]) - 1
        if e >= a:
            best = e
            break
    if best is None:
        return None
    newest = [max((b["seq"] for b in state.bases if b["disk"] == d["disk"]), default=-1) for d in state.disks]
    return None if min(newest) >= best else best


# --------------------------------------------------------------------------- chunking


def _read_chunk(fd: int, offset: int, length: int, namer: Namer = None) -> tuple[bytes | None, bytes]:
    """(hash16, raw) of one chunk of an image; (None, b"") when it is all zeros."""
    raw = os.pread(fd, length, offset)
    if len(raw) != length:
        raise OSError(f"short read of {len(raw)} bytes at offset {offset}, expected {length}")
    if is_zero(raw):
        return None, b""
    return chunk_hash(raw, namer), raw


class _ChunkUploader:
    """Stores the chunks of images under one chunk-writer lease, each distinct one once."""

    def __init__(self, store: ObjectStore, lease: Lease, pool: ThreadPoolExecutor, concurrency: int) -> None:
        self.store = store
        self.lease = lease
        self.pool = pool
        self.sem = asyncio.Semaphore(concurrency)
        self.namer = chunk_namer_of(store)  # how the store names chunks (FORMAT.md §19.6)
        self.present: set[bytes] = set()  # seen in the store (or put) under this lease
        self.failed: BaseException | None = None  # the first error of a chunk task
        self.stats = {"chunks": 0, "zero_chunks": 0, "chunks_stored": 0, "chunks_deduplicated": 0,
                      "bytes_stored": 0}

    async def image(self, path: Path, size: int, chunk_size: int,
                    progress: Callable[[int], None]) -> np.ndarray:
        count = -(-size // chunk_size)
        hashes = np.zeros((count, HASH_BYTES), dtype=np.uint8)
        fd = os.open(path, os.O_RDONLY)
        # Only the tasks in flight are kept (at most ``concurrency``), not one per chunk.
        pending: set[asyncio.Task] = set()
        try:
            for i in range(count):
                await self.sem.acquire()  # taken before the task: pending work stays bounded
                if self.failed is not None:  # stop starting work; raised below
                    self.sem.release()
                    break
                task = asyncio.create_task(self._one(fd, i, chunk_size, size, hashes, progress))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except BaseException:
            for task in pending:
                task.cancel()
            raise
        finally:
            # Every task that reads ``fd`` has ended before it is closed (a closed fd
            # number could be reused by another open meanwhile).
            await asyncio.gather(*pending, return_exceptions=True)
            os.close(fd)
        if self.failed is not None:
            raise self.failed
        return hashes

    async def _one(self, fd: int, i: int, chunk_size: int, size: int, hashes: np.ndarray,
                   progress: Callable[[int], None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            length = min(chunk_size, size - i * chunk_size)
            h, raw = await loop.run_in_executor(self.pool, _read_chunk, fd, i * chunk_size, length, self.namer)
            self.stats["chunks"] += 1
            if h is None:
                self.stats["zero_chunks"] += 1
            else:
                hashes[i] = np.frombuffer(h, dtype=np.uint8)
                await self._store(h, raw)
            progress(length)
        except BaseException as exc:
            if self.failed is None:
                self.failed = exc
        finally:
            self.sem.release()

    async def _store(self, h: bytes, raw: bytes) -> None:
        if h in self.present:
            self.stats["chunks_deduplicated"] += 1
            return
        self.present.add(h)  # before the awaits: a twin in flight counts as a duplicate
        key = chunk_key(h)
        self.lease.check()
        why = await chunk_stored(self.store, key, h, len(raw))
        if why is None:
            self.stats["chunks_deduplicated"] += 1
            return
        if why != "absent":
            log.warning("consolidate_chunk_rewritten", key=key, reason=why)
        _, obj = await asyncio.get_running_loop().run_in_executor(self.pool, encode_chunk, raw, self.namer)
        self.lease.check()
        await self.store.put(key, obj)
        self.stats["chunks_stored"] += 1
        self.stats["bytes_stored"] += len(obj)


async def build_bases(store: ObjectStore, state: CatalogView, seq: int, scratch: Path, *,
                      chunk_size: int = CHUNK_SIZE_DEFAULT, concurrency: int = CONCURRENCY_DEFAULT,
                      progress: Progress | None = None, lease_ttl_s: float = TTL_DEFAULT_S,
                      skew_s: float = SKEW_DEFAULT_S) -> tuple[list[dict], dict]:
    """Write a base (chunks + manifest) at ``seq`` of every disk of ``state`` that has none
    there yet (step 2); return the catalog ``add_bases`` entries and the chunk statistics.

    A manifest is created, never written over another (``put_manifest``): a disk with a
    base at ``seq`` keeps it, and a manifest of another writer found under the key stops
    the job (``AlreadyExists``, nothing committed)."""
    plan = await build_plan(store, state, ResolvedTarget(seq, Target.seq(seq)), concurrency=concurrency)
    images = scratch / "images"
    total = sum(d.size for d in plan.disks)
    await execute_plan(store, plan, images, concurrency=concurrency,
                       progress=(lambda done, tot: progress("rebuild", done, tot)) if progress else None)
    done = 0

    def chunked(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("chunk", done, total)

    have = {b["disk"] for b in state.bases if b["seq"] == seq}
    disks = [d for d in plan.disks if d.disk not in have]
    entries = []
    owner = f"cdp consolidate domain {state.domain_id}"
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="consolidate") as pool:
        lease = await chunk_writer_lease(store, owner=owner, ttl_s=lease_ttl_s, skew_s=skew_s)
        try:
            up = _ChunkUploader(store, lease, pool, concurrency)
            for d in disks:
                hashes = await up.image(images / d.image_name, d.size, chunk_size, chunked)
                key = base_manifest_key(state.domain_id, state.timeline_id, seq, d.disk)
                await put_manifest(store, key, encode_manifest(state.domain_id, d.disk, seq, d.size, chunk_size,
                                                               hashes))
                entries.append({"timeline": state.timeline_id, "seq": seq, "disk": d.disk, "key": key,
                                "origin": "consolidation"})
            try:
                lease.check()  # the chunks the manifests name were seen under this lease (§11.4)
            except LeaseLost as exc:
                lease = await _chunks_again(store, lease, exc, pool, concurrency, [
                    (images / d.image_name, d.size) for d in disks], chunk_size, owner, lease_ttl_s, skew_s)
        finally:
            await lease.release()
    return entries, up.stats


async def _chunks_again(store: ObjectStore, lost: Lease, exc: LeaseLost, pool: ThreadPoolExecutor, concurrency: int,
                        images: list[tuple[Path, int]], chunk_size: int, owner: str, ttl_s: float,
                        skew_s: float) -> Lease:
    """The chunk-writer lease was lost before the manifests were in the store: a chunk
    sweep on another host may have deleted chunks they name (FORMAT.md §11.4). Under a
    new lease (it waits while a sweep runs; a sweep that starts later reads the
    manifests), every chunk of the images is looked at again and the missing ones put
    back from the images, before anything names the manifests. Returns the new lease."""
    log.warning("consolidation_lease_lost", lease=lost.key, error=exc.message)
    await lost.release()
    lease = await chunk_writer_lease(store, owner=owner, ttl_s=ttl_s, skew_s=skew_s)
    try:
        up = _ChunkUploader(store, lease, pool, concurrency)
        for path, size in images:
            await up.image(path, size, chunk_size, lambda n: None)
        lease.check()
    except BaseException:
        await lease.release()
        raise
    log.info("consolidation_chunks_checked", chunks=up.stats["chunks"], chunks_put_back=up.stats["chunks_stored"])
    return lease


# --------------------------------------------------------------------------- the job


async def consolidate(store: ObjectStore, domain: int, *, older_than_s: float, retention_s: float | None = None,
                      now_ns: int | None = None, scratch_dir: Path | str | None = None,
                      chunk_size: int = CHUNK_SIZE_DEFAULT, concurrency: int = CONCURRENCY_DEFAULT,
                      progress: Progress | None = None, lease_ttl_s: float = TTL_DEFAULT_S,
                      skew_s: float = SKEW_DEFAULT_S, sweep_all_chunks: bool = False) -> dict[str, Any]:
    """Run the consolidation and retention job of ``domain`` (module docstring).

    ``older_than_s``: consolidate what is older than this; ``retention_s``: keep every
    point at most this old (None: no retention). ``now_ns`` anchors both (default: the
    clock); retention's never later than the newest record plus ``skew_s``
    (``retention_cutoff``; the summary's ``retention`` says which). ``sweep_all_chunks``
    runs the chunk sweep even when no manifest was deleted. Raises ``Busy`` when another
    job holds the domain's maintenance lock, ``ConfigError`` (nothing done) when this
    host's clock is off from the store's by more than ``skew_s``. The top level of the
    summary is the current timeline's; ``timelines`` has one per timeline.
    """
    for name, value in (("older_than_s", older_than_s), ("retention_s", retention_s)):
        # The CLI and the policies bound these; a library caller may not (int(inf) raised).
        if value is not None and not 0 <= value <= DURATION_S_MAX:
            raise ConfigError(f"consolidate: {name} is {value!r}; expected 0..{DURATION_S_MAX:g} seconds")
    t0 = time.monotonic()
    # A clock off from the store's cannot judge or hold leases, and its cut-offs are not
    # the policy's: refused before anything (the message names both clocks).
    clock = await check_clock_skew(store, skew_s, f"consolidate domain {domain} refused (nothing consolidated "
                                                  f"or deleted)")
    now_ns = time.time_ns() if now_ns is None else now_ns
    owner = f"cdp consolidate domain {domain}"
    opts = dict(older_than_s=older_than_s, now_ns=now_ns, scratch_dir=scratch_dir, chunk_size=chunk_size,
                concurrency=concurrency, progress=progress, lease_ttl_s=lease_ttl_s, skew_s=skew_s)
    async with await maintenance_lock(store, domain, owner=owner, ttl_s=lease_ttl_s, skew_s=skew_s) as mlock:
        state = await load_state(store, domain)
        retention, cutoff_ns = None, None
        if retention_s is not None:
            retention = retention_cutoff(now_ns, newest_record_ns(state.state), retention_s, skew_s)
            retention["store_clock_offset_s"] = None if clock is None else round(clock.offset_s, 3)
            log.info("retention_anchor", domain=domain, **retention)
            cutoff_ns = retention["cutoff_ns"]
        order = [state.state.current] + sorted(t for t in state.state.timelines if t != state.state.current)
        per = []
        for tl in order:
            per.append(await _consolidate_timeline(store, domain, tl, mlock, retention_cutoff_ns=cutoff_ns, **opts))
        state = await load_state(store, domain)
        sweep = await sweep_domain(store, state.state, state.generation, skew_s=skew_s, check=mlock.check)
    summary = dict(per[0], domain=domain, retention=retention, sweep=sweep, chunk_sweep=None, timelines=per)
    if sweep["manifests_deleted"] or sweep_all_chunks:
        # The consolidation is committed by now: a chunk sweep that cannot run (a chunk
        # writer is live, a listing it cannot trust, the store failing, its lock lost)
        # deletes nothing and is left to the next job, which the summary says; failing
        # the job would report a done consolidation as failed.
        try:
            summary["chunk_sweep"] = await sweep_chunks(store, owner=owner, ttl_s=lease_ttl_s, skew_s=skew_s)
        except (Busy, LeaseLost, StoreError) as exc:
            log.warning("chunk_sweep_deferred", domain=domain, error=exc.message)
            summary["chunk_sweep"] = {"deferred": exc.message}
    summary["seconds"] = round(time.monotonic() - t0, 3)
    return summary


async def _consolidate_timeline(store: ObjectStore, domain: int, timeline: int, mlock: Lease, *, older_than_s: float,
                                retention_cutoff_ns: int | None, now_ns: int, scratch_dir: Path | str | None,
                                chunk_size: int, concurrency: int, progress: Progress | None,
                                lease_ttl_s: float, skew_s: float) -> dict[str, Any]:
    """Steps 1-3 of the module docstring on one timeline; no retention when
    ``retention_cutoff_ns`` is None."""
    summary: dict[str, Any] = {"timeline": timeline, "consolidated_seq": None, "bases_added": 0, "chunks": None,
                               "horizon_seq": None, "segments_removed": 0, "bases_removed": 0, "generation": None}
    state = await load_state(store, domain, timeline)
    seq = await consolidation_seq(state, now_ns - int(older_than_s * 1e9))
    built: list[dict] = []
    if seq is not None:
        # Whole disks are rebuilt there: a killed job's directory is swept by the next job
        # (any domain's), never left to fill the disk (cdp.scratch).
        with scratch_directory(scratch_dir, SCRATCH_PREFIX) as scratch:
            built, summary["chunks"] = await build_bases(
                store, state, seq, scratch, chunk_size=chunk_size, concurrency=concurrency,
                progress=progress, lease_ttl_s=lease_ttl_s, skew_s=skew_s)
        summary["consolidated_seq"] = seq
    for _ in range(COMMIT_RETRIES):
        have = {(b["seq"], b["disk"]) for b in state.bases}
        delta: dict[str, Any] = {"timeline": timeline}
        # The catalog read again after a lost race may have opened a seeding window
        # over ``seq`` since it was chosen: the bases built there are not committed.
        spans = seeding_spans(state)
        add = [b for b in built if (b["seq"], b["disk"]) not in have
               and not any(lo <= b["seq"] <= hi for lo, hi in spans)]
        if add:
            delta["add_bases"] = add
        after = state.state.copy()
        after.apply_delta(dict(delta, writer=CONSOLIDATE_WRITER))
        if retention_cutoff_ns is not None:
            delta.update(await retention_delta(CatalogView(store, after, state.generation, timeline),
                                               retention_cutoff_ns))
        if set(delta) == {"timeline"}:
            break
        removed = 0
        if "horizon_seq" in delta:  # the rows the new horizon drops, for the summary
            rows = await state.rows_between(state.horizon_seq + 1, delta["horizon_seq"])
            removed = int((rows["last_seq"] <= np.uint64(delta["horizon_seq"])).sum())
        mlock.check()
        writer = CatalogWriter(store, state.state, state.generation, by="cdp consolidate")
        try:
            generation = await writer.commit(delta)
        except AlreadyExists:  # the DRVA committed first: reload, recompute, retry
            state = await load_state(store, domain, timeline)
            continue
        state = CatalogView(store, writer.state, generation, timeline)
        summary.update(bases_added=len(add), bases_removed=len(delta.get("remove_bases", [])),
                       segments_removed=removed, generation=generation)
        log.info("consolidation_committed", domain=domain, timeline=timeline, generation=generation,
                 consolidated_seq=seq, horizon_seq=state.horizon_seq, **{
                     k: summary[k] for k in ("bases_added", "segments_removed", "bases_removed")})
        break
    else:
        raise Busy(f"domain {domain}: lost {COMMIT_RETRIES} catalog races in a row; try again")
    summary["horizon_seq"] = state.horizon_seq
    return summary
