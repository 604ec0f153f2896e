"""Continuous rehydration: a recovery site's standby copy of a domain's disks, kept at the
newest consistent point as the catalog commits (issue 11).

The standby lives where a failover of the domain rehydrates (``<datastore>/<domain>/``,
``rocva.__main__.failover_dir``): the images ``<vm>-<disk>.img`` and ``standby.json``
(FORMAT.md §14.6) saying the seq and timeline they hold. ``keep_warm`` brings them from
that seq ``W`` to the newest consistent point ``S`` by applying only the tail: a plan of
the records in ``(W, S]`` (``rocva.plan.build_plan(after_seq=W)``), whose ``WRITE`` and
``ZERO`` extents are first punched to holes and then written as a fresh image's would be
— so the bytes written are the changed data, not the disk. A failover to a point at or
after ``W`` applies the same way (``apply_tail``) and forks; a point before it, a
standby of another timeline, segments that retention already deleted, or a disk seeded
at or after the standby's seq (its ``seed`` base holds content no record says) fall back
to a cold rehydration (the standby is discarded).

Crash safety: ``standby.json`` says ``applying`` with ``from`` and ``to`` before any
byte moves, and ``ready`` only after the images are fsynced. A tail plan writes every
byte its records touch with that byte's value at ``to``, so a rerun of an interrupted
apply — or an apply from ``from`` to any later point — ends in the right images.
Every apply holds the domain's recovery lease, so retention deletes nothing it reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cdp.errors import NotFound
from cdp.logs import get_logger
from cdp.store.base import ObjectStore
from rocva.destination import Destination, OutputDir, for_store, open_output_dir
from rocva.errors import InvalidTarget, RecoveryError
from rocva.fetch import Fetcher, execute, pool_workers
from rocva.plan import SRC_BASE, RecoveryPlan, build_plan, image_file_name, load_state, seeds_between
from rocva.resume import zero_range
from rocva.target import Target, recoverable_ranges, resolve_target
from rocva.work_units import segment_groups

log = get_logger("rocva.standby")

STATE_NAME = "standby.json"
STATE_VERSION = 1
STATE_BYTES_MAX = 64 << 10
CONCURRENCY = 8
RUN_BYTES_MAX = 4 << 20


class StandbyUnusable(Exception):
    """The standby cannot reach the point asked for: rehydrate cold (the message says why)."""


def read_standby(out: OutputDir) -> dict[str, Any] | None:
    raw = out.read(STATE_NAME, STATE_BYTES_MAX)
    if raw is None:
        return None
    try:
        doc = json.loads(raw) if len(raw) <= STATE_BYTES_MAX else None
    except ValueError:
        doc = None
    fields = {"version": int, "domain": int, "timeline": int, "seq": int, "phase": str}
    if (not isinstance(doc, dict) or any(not isinstance(doc.get(k), t) or isinstance(doc.get(k), bool)
                                         for k, t in fields.items())
            or doc["version"] != STATE_VERSION or doc["phase"] not in ("ready", "applying")
            or (doc["phase"] == "applying" and not isinstance(doc.get("to"), int))):
        return None  # unreadable: the standby is rebuilt, never trusted
    return doc


def seeds_held(doc: dict[str, Any]) -> set[str]:
    """The keys of the ``seed`` bases at the record's ``seq`` that its images hold
    (``seeds``; none in a record written before the field: a seed there rebuilds)."""
    keys = doc.get("seeds")
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()


def ready_state(domain: int, timeline: int, seq: int, view: Any) -> dict[str, Any]:
    """The record of images that hold ``seq`` of ``timeline``, with the seeds at that seq
    that ``view`` (read before the images were built, of that timeline) names."""
    seeds = seeds_between(view, seq, seq) if view.timeline_id == timeline else []
    return {"version": STATE_VERSION, "domain": domain, "timeline": timeline, "seq": seq,
            "phase": "ready", "applied_ns": time.time_ns(), "seeds": sorted(b["key"] for b in seeds)}


def _write_state(out: OutputDir, doc: dict[str, Any]) -> None:
    out.write_atomic(STATE_NAME, json.dumps(doc, sort_keys=True).encode())


def discard(out: OutputDir, plan_images: list[str]) -> None:
    """Forget the standby: its record first (so a crash never trusts half-removed images)."""
    out.unlink(STATE_NAME)
    for name in plan_images:
        out.unlink(name)
    out.fsync()


async def apply_tail(store: ObjectStore, out: OutputDir, plan: RecoveryPlan) -> int:
    """Apply a tail plan (``build_plan(after_seq=...)``) to the images in ``out``: punch
    every WRITE and ZERO extent, then write the WRITE extents; fsync. Bytes written."""
    fds = []
    try:
        for d in plan.disks:
            try:
                fds.append(out.open(d.image_name))
            except FileNotFoundError:
                raise StandbyUnusable(f"{out.show(d.image_name)} is missing") from None
            if os.fstat(fds[-1]).st_size != d.size:
                raise StandbyUnusable(f"{out.show(d.image_name)} is not {d.size} bytes")
        await asyncio.to_thread(_punch, plan, fds)
        with ThreadPoolExecutor(pool_workers(CONCURRENCY), thread_name_prefix="standby") as pool:
            fetcher = Fetcher(store, fds, pool)
            await execute(segment_groups(plan, RUN_BYTES_MAX), fetcher, concurrency=CONCURRENCY,
                          skip=lambda name, nbytes: False, on_group_done=lambda name, digest: None,
                          on_unit_done=lambda nbytes: None)
        await asyncio.to_thread(lambda: [os.fsync(fd) for fd in fds])
        return fetcher.bytes_written
    finally:
        for fd in fds:
            os.close(fd)


def _punch(plan: RecoveryPlan, fds: list[int]) -> None:
    """Holes where the tail writes or zeroes: the sparse writes that follow skip whole
    zero pages, which must read as zeros, not as what the standby held."""
    for d, fd in zip(plan.disks, fds):
        ext = d.extents[d.extents["kind"] != SRC_BASE]
        if not len(ext):
            continue
        start = ext["offset"].astype(np.int64)
        end = start + ext["length"].astype(np.int64)
        # coalesce touching extents: one fallocate per run of them
        breaks = np.flatnonzero(start[1:] != end[:-1]) + 1
        for a, b in zip(np.concatenate(([0], breaks)).tolist(), np.concatenate((breaks, [len(ext)])).tolist()):
            zero_range(fd, int(start[a]), int(end[b - 1] - start[a]))


async def bring_to(store: ObjectStore, domain: int, out: OutputDir, target: Target, *, timeline: int | None = None,
                   now_ns: int | None = None) -> dict[str, Any]:
    """Bring the standby in ``out`` to ``target`` on ``timeline`` (default: the current
    one) by applying the tail; ``StandbyUnusable`` when it cannot (then rehydrate cold).
    Returns ``{"seq", "from_seq", "timeline", "bytes_written", "seconds"}``."""
    t0 = time.monotonic()
    doc = read_standby(out)
    if doc is None or doc["domain"] != domain:
        raise StandbyUnusable("no standby record of this domain")
    view = await load_state(store, domain, timeline)
    resolved = await resolve_target(view, target, now_ns=now_ns)
    w = doc["seq"]
    reached = doc["to"] if doc["phase"] == "applying" else w
    if doc["timeline"] != view.timeline_id:
        raise StandbyUnusable(f"the standby holds timeline {doc['timeline']}, not {view.timeline_id}")
    if resolved.seq < reached:
        raise StandbyUnusable(f"the point (seq {resolved.seq}) is before the standby's (seq {reached})")
    # A disk seeded at or after w holds content no record says (a filter that lost
    # track re-seeds it): replaying (w, S] over the images would keep the old bytes.
    # At w itself too, unless the record names that seed among those its images hold:
    # the seed may have been committed after the images were built — even when S is w
    # and there is nothing to apply.
    held = seeds_held(doc)
    seeds = [b for b in seeds_between(view, w, resolved.seq) if not (b["seq"] == w and b["key"] in held)]
    if seeds:
        raise StandbyUnusable(f"disk {seeds[0]['disk']} was seeded at seq {seeds[0]['seq']} "
                              f"({seeds[0]['key']}), at or after the standby's seq {w}")
    if resolved.seq == w and doc["phase"] == "ready":
        return {"seq": w, "from_seq": w, "timeline": view.timeline_id, "bytes_written": 0,
                "seconds": round(time.monotonic() - t0, 3)}
    if w < view.horizon_seq:  # rows_between would skip the writes in (w, horizon]
        raise StandbyUnusable(f"retention moved past the standby's seq {w}")
    try:
        plan = await build_plan(store, view, resolved, after_seq=w)
    except NotFound as exc:
        raise StandbyUnusable(f"a segment of its tail is gone: {exc.message}") from None
    await asyncio.to_thread(_write_state, out, {**doc, "phase": "applying", "to": resolved.seq})
    try:
        written = await apply_tail(store, out, plan)
    except NotFound as exc:
        raise StandbyUnusable(f"a segment of its tail is gone: {exc.message}") from None
    await asyncio.to_thread(_write_state, out, ready_state(domain, view.timeline_id, resolved.seq, view))
    return {"seq": resolved.seq, "from_seq": w, "timeline": view.timeline_id, "bytes_written": written,
            "seconds": round(time.monotonic() - t0, 3)}


def _release_failover_claim(out: OutputDir, view: Any) -> None:
    """Before the standby touches the images: a failover that rehydrated into this
    directory and did not fork left its record (``failover.json``, FORMAT.md §14.4),
    which says the images hold its seq — the images are about to hold another point, so
    the record goes first (durably). A failover that forked owns the images (its VMs
    may run on them, or serve them for a failback): they are never touched, and this
    is refused (RecoveryError) naming the record."""
    from rocva.failover import STATE_NAME as FAILOVER_NAME
    from rocva.failover import forget_unforked

    forked = forget_unforked(out, view.state)
    if forked is not None:
        raise RecoveryError(f"{out.show(FAILOVER_NAME)}: a failover of domain {forked['domain']} to site "
                            f"{forked['site']!r} forked on these images (from timeline {forked['parent_timeline']} "
                            f"at seq {forked['seq']}): the standby never touches them")


async def keep_warm(store: ObjectStore, domain: int, out_dir: Path, *,
                    destination: Destination | None = None) -> dict[str, Any]:
    """One step of continuous rehydration: the standby in ``out_dir`` at the newest
    consistent point of the current timeline — the tail applied, or built cold when
    there is none or it cannot be used. Holds the recovery lease throughout. The record
    of a failover that did not fork there is removed first (``_release_failover_claim``)."""
    from rocva.recover import recover, recovery_lease_held
    from rocva.recover_options import RecoverOptions

    async with recovery_lease_held(store, domain):
        out = open_output_dir(out_dir, for_store(store, destination))
        try:
            view = await load_state(store, domain)
            _release_failover_claim(out, view)
            ranges = recoverable_ranges(view)
            if not ranges:
                raise InvalidTarget(f"domain {domain}: no consistent point yet", (None, None))
            newest = Target.seq(min(ranges[-1][1], view.committed_seq))  # not --latest: a resync may be open
            try:
                return {**await bring_to(store, domain, out, newest), "cold": False}
            except StandbyUnusable as why:
                reason = str(why)
            names = [image_file_name(d["vm"], d["name"]) for d in view.disks]
            await asyncio.to_thread(discard, out, names)
        finally:
            out.close()
        log.info("standby_cold", domain=domain, reason=reason)
        result = await recover(store, domain, RecoverOptions(newest, out_dir), destination=destination)
        out = open_output_dir(out_dir, for_store(store, destination))
        try:
            # The seeds named are those of the view read before the recovery: one
            # committed since, at that seq, is in the images but not named, and costs
            # one more cold rebuild — never a standby trusted with a seed it lacks.
            state = ready_state(domain, result["plan"]["timeline"], result["seq"], view)
            await asyncio.to_thread(_write_state, out, state)
        finally:
            out.close()
        return {"seq": result["seq"], "from_seq": None, "timeline": result["plan"]["timeline"],
                "bytes_written": result["bytes_written"], "seconds": result["seconds"], "cold": True,
                "reason": reason}
