"""Failover of a domain to this site, from the object store alone (issue 11).

``failover`` rehydrates every disk of the domain at the chosen point into ``out_dir``
(the recovery site's datastore), then forks the domain's timeline at that seq, owned by
this ``site`` (FORMAT.md §8.5). From the fork on, the protected site's DRVA is fenced
(its next conditional create meets the new timeline) and a DRVA of this site continues
the domain on the new timeline: its catalog opens at ``committed_seq == fork_seq`` and a
new filter numbers its writes from ``fork_seq + 1``.

Order, and what a crash leaves (``failover.json`` in ``out_dir``, FORMAT.md §14.4):

1. rehydrate: a resumable recovery (``rocva.recover``) of the current timeline (the
   whole failover, from the catalog's first read to the fork, holds a recovery lease).
   A crash here leaves the catalog untouched and the protected site unfenced; a rerun
   resumes the recovery.
2. ``phase: "rehydrated"`` is recorded with the parent timeline and the seq.
3. fork. A crash between the fork and step 4 is recognised on rerun: the current
   timeline is owned by this site and forked from the recorded parent at the recorded
   seq — it is ours, and is not forked again. A rerun that finds no fork reuses the
   images only when its target resolves to the recorded seq (else the record is
   removed and the disks rehydrated again): a ``latest`` asked again after the
   protected site went on writing is a later point, and the MSA resumes a standby
   (which moves the images and removes the record) when a fork fails. The fork
   is committed only while the timeline rehydrated from is still current: a failover
   to another site that forked first wins, and this one is refused (``fork_timeline``).
4. ``phase: "forked"`` with the new timeline. A rerun now returns the same result and
   touches nothing (the VMs may already be writing to the images).

Refused, with what to do: a domain without a catalog; a point outside retention or in a
not-consistent window (``InvalidTarget`` naming the nearest points); a domain whose
current timeline this site already owns and this failover did not create (it failed over
before: there is nothing to fail over; failing back is another verb); a record that is
not a small regular file, or names a timeline or seq the catalog never had (move it
away); a fork once another timeline became current (another site won).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from cdp.catalog import load_catalog
from cdp.catalog_fork import fork_timeline
from cdp.catalog_read import CatalogView
from cdp.catalog_state import CatalogState
from cdp.durable import atomic_write
from cdp.errors import FailoverRefused, NotFound
from cdp.logs import get_logger
from cdp.store.base import ObjectStore
from rocva.destination import OutputDir
from rocva.errors import RecoveryError
from rocva.plan import image_file_name
from rocva.recover import Progress, recover, recovery_lease_held
from rocva.recover_options import RecoverOptions
from rocva.target import Target, resolve_target

log = get_logger("rocva.failover")

STATE_NAME = "failover.json"
STATE_VERSION = 1
STATE_BYTES_MAX = 64 << 10


def _read_state(out_dir: Path, domain: int, site: str) -> dict[str, Any] | None:
    """This failover's record in ``out_dir`` (None: none, or another domain's or site's)."""
    out = _open_dir(out_dir)
    if out is None:
        return None
    try:
        doc = read_record(out)
    finally:
        out.close()
    if doc is not None and (doc["domain"] != domain or doc["site"] != site):
        raise FailoverRefused(f"{out_dir / STATE_NAME}: the record of a failover of domain {doc['domain']} to site "
                              f"{doc['site']!r}; use another directory for domain {domain} to site {site!r}")
    return doc


def _open_dir(out_dir: Path) -> OutputDir | None:
    """``out_dir`` opened to reach its entries by descriptor (None when it is not there)."""
    try:
        fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    return OutputDir(fd, Path(out_dir))


def read_record(out: OutputDir) -> dict[str, Any] | None:
    """The failover record in ``out``, its fields checked (None: there is none). It is
    opened without following a link or blocking on a FIFO, and at most
    ``STATE_BYTES_MAX + 1`` bytes are read: anything else there is refused by name."""
    path = out.show(STATE_NAME)
    try:
        raw = out.read(STATE_NAME, STATE_BYTES_MAX)
    except RecoveryError as exc:  # a link, a FIFO, a device, a hard link: never a record of ours
        raise FailoverRefused(f"{exc.message} (not a failover record); move it away to start this failover over") \
            from None
    if raw is None:
        return None
    try:
        doc = json.loads(raw) if len(raw) <= STATE_BYTES_MAX else None
    except ValueError:
        doc = None
    fields = {"version": int, "domain": int, "site": str, "parent_timeline": int, "seq": int, "phase": str}
    if not isinstance(doc, dict) or any(not isinstance(doc.get(k), t) or isinstance(doc.get(k), bool)
                                        for k, t in fields.items()):
        raise FailoverRefused(f"{path}: not a failover record this version can read; move it away to "
                              f"start this failover over")
    if doc["version"] != STATE_VERSION or doc["phase"] not in ("rehydrated", "forked"):
        raise FailoverRefused(f"{path}: failover record version {doc['version']} phase {doc['phase']!r}; "
                              f"expected version {STATE_VERSION}")
    return doc


def _check_record(path: Path | str, record: dict[str, Any], state: CatalogState) -> None:
    """FailoverRefused naming the field when the record names a timeline the catalog never
    had, or a seq its timeline never held: a failover records only a point it recovered."""
    tl = state.timelines.get(record["parent_timeline"])
    if tl is None:
        raise FailoverRefused(
            f"{path}: field 'parent_timeline' is {record['parent_timeline']}, and domain {state.domain_id} has no "
            f"such timeline ({', '.join(map(str, sorted(state.timelines)))}); not a record of this domain's "
            f"failover: move it away to start this failover over")
    if not 0 <= record["seq"] <= tl.committed_seq:
        raise FailoverRefused(
            f"{path}: field 'seq' is {record['seq']}, outside timeline {tl.id} (seqs 0..{tl.committed_seq} "
            f"committed): not a point a failover recovered; move it away to start this failover over")


def forked_by(record: dict[str, Any], state: CatalogState) -> bool:
    """The record's failover forked: it says so, or a timeline of the catalog is the one
    it was about to fork (its site's, from its parent at its seq) and only the record of
    it was lost. Its images are then that failover's (VMs may run on them)."""
    return record["phase"] == "forked" or any(_is_its_fork(record, tl) for tl in state.timelines.values())


def _is_its_fork(record: dict[str, Any], tl: Any) -> bool:
    """``tl`` is the timeline the record's failover forks: its site's, from its parent at
    its seq."""
    return tl.owner == record["site"] and tl.parent == record["parent_timeline"] and tl.fork_seq == record["seq"]


def forget_unforked(out: OutputDir, state: CatalogState) -> dict[str, Any] | None:
    """Remove the record in ``out`` of a failover that did not fork (``state``: the
    domain's catalog now), durably, before anything else touches the images it claims:
    a rerun must not fork at its seq over images that hold another point. Returns the
    record when its failover forked (it is kept, and so must the images be); None when
    there was none or it was removed."""
    doc = read_record(out)
    if doc is None:
        return None
    if doc["domain"] != state.domain_id:
        raise FailoverRefused(f"{out.show(STATE_NAME)}: the record of a failover of domain {doc['domain']}, not "
                              f"{state.domain_id}; move it away")
    if forked_by(doc, state):
        return doc
    log.warning("failover_record_discarded", domain=doc["domain"], site=doc["site"], seq=doc["seq"],
                path=out.show(STATE_NAME), reason="its fork did not happen")
    out.unlink(STATE_NAME)
    out.fsync()
    return None


async def forget_unforked_at(store: ObjectStore, domain: int, out_dir: Path) -> bool:
    """``forget_unforked`` in ``out_dir`` against the domain's catalog now (the MSA's
    rollback of a failover job that failed before its fork). True when removed."""
    out = _open_dir(out_dir)
    if out is None:
        return False
    try:
        if out.lstat(STATE_NAME) is None:
            return False
        state, _ = await load_catalog(store, domain)
        if state is None:
            return False
        return forget_unforked(out, state) is None
    finally:
        out.close()


def _write_state(out_dir: Path, doc: dict[str, Any]) -> None:
    atomic_write(out_dir / STATE_NAME, json.dumps(doc, sort_keys=True).encode())


async def failover(store: ObjectStore, domain: int, target: Target | int | str, out_dir: Path | str, *, site: str,
                   progress: Progress | None = None, destination: Any = None,
                   now_ns: int | None = None) -> dict[str, Any]:
    """Fail ``domain`` over to ``site`` at ``target`` (module docstring). Returns the
    timeline the domain now continues on, its fork seq and parent, the recovered images
    (``None`` on a rerun that found the failover done), and ``resumed``.

    Holds a recovery lease on the domain from before the catalog is read until the fork
    is committed (FORMAT.md §11.3): nothing the rehydration reads is deleted meanwhile.
    A retention may still move the horizon past the point before the fork: the fork is
    then refused (``FailoverRefused`` naming the horizon), the images kept."""
    async with recovery_lease_held(store, domain, f"cdp failover domain {domain} to {site}"):
        return await _failover(store, domain, target, Path(out_dir), site=site, progress=progress,
                               destination=destination, now_ns=now_ns)


async def _failover(store: ObjectStore, domain: int, target: Target | int | str, out_dir: Path, *, site: str,
                    progress: Progress | None, destination: Any, now_ns: int | None) -> dict[str, Any]:
    """``failover``'s work, under its lease."""
    t0 = time.monotonic()
    state, generation = await load_catalog(store, domain)
    if state is None:
        raise NotFound(f"domain {domain}: no catalog in {store.describe()}: nothing to fail over")
    record = _read_state(out_dir, domain, site) if out_dir.is_dir() else None
    if record is not None and record["phase"] == "rehydrated":
        _check_record(out_dir / STATE_NAME, record, state)
    current = state.timeline()
    if record is not None and record["phase"] == "forked" and record.get("timeline") == current.id:
        return {**_summary(domain, record, None, True, t0), "warm": False}
    ours = record is not None and _is_its_fork(record, current)
    if current.owner == site and not ours:
        fork = (f", forked from timeline {current.parent} at seq {current.fork_seq}" if current.parent else "")
        raise FailoverRefused(
            f"domain {domain} already runs on timeline {current.id} owned by site {site!r}{fork}: there is "
            f"nothing to fail over to this site (`cdp points` shows its timelines)")
    images = None
    record_warm = False
    if not ours:
        view = CatalogView(store, state, generation, current.id)
        recovered = await _rehydrated_before(store, domain, record, out_dir, view, target, now_ns)
        if recovered is None:
            if record is not None and record["phase"] == "rehydrated":
                _forget_record(out_dir)  # its claim on the images ends before they change
            if record is None or record["phase"] == "rehydrated":
                await _discard_unforked(store, domain, out_dir, destination)
            recovered = await _rehydrate(store, domain, target, out_dir, current.id, progress=progress,
                                         destination=destination, now_ns=now_ns)
        record = {"version": STATE_VERSION, "domain": domain, "site": site, "parent_timeline": current.id,
                  "seq": recovered["seq"], "phase": "rehydrated", "timeline": None}
        _write_state(out_dir, record)
        images = recovered["images"]
        record_warm = recovered.get("warm", False)
        await asyncio.to_thread(_forget_dirty_maps, store, out_dir, images, destination)
        log.info("failover_rehydrated", domain=domain, site=site, timeline=current.id, seq=recovered["seq"],
                 bytes=recovered["bytes_written"], seconds=recovered["seconds"])
        state, _ = await fork_timeline(store, domain, record["seq"], site, parent=current.id,
                                       by=f"cdp failover to {site}")
    assert record is not None
    record = {**record, "phase": "forked", "timeline": state.current}
    _write_state(out_dir, record)
    log.info("failover_forked", domain=domain, site=site, timeline=state.current,
             parent=record["parent_timeline"], fork_seq=record["seq"])
    return {**_summary(domain, record, images, ours, t0), "warm": record_warm}


async def _rehydrated_before(store: ObjectStore, domain: int, record: dict[str, Any] | None, out_dir: Path,
                             view: CatalogView, target: Any, now_ns: int | None) -> dict[str, Any] | None:
    """An earlier run's images, when its record says it rehydrated them from the current
    timeline (``view``) at the point ``target`` resolves to now, and it was stopped before
    the fork: they were published only once fsynced, and recorded after, so the rerun
    forks at the recorded seq instead of rehydrating. Another point (a ``latest`` asked
    again after more writes, a standby that moved on) is rehydrated again."""
    if record is None or record["phase"] != "rehydrated" or record.get("parent_timeline") != view.timeline_id:
        return None
    resolved = await resolve_target(view, Target.parse(target), now_ns=now_ns)
    if resolved.seq != record["seq"]:
        log.info("failover_rehydrated_elsewhere", domain=domain, recorded_seq=record["seq"], seq=resolved.seq)
        return None
    images = await _images(store, domain, out_dir)
    if not all(Path(i["path"]).is_file() and Path(i["path"]).stat().st_size == i["size"] for i in images):
        return None
    log.info("failover_rehydrated_before", domain=domain, seq=record["seq"])
    return {"seq": record["seq"], "images": images, "bytes_written": 0, "seconds": 0.0, "warm": False}


def _forget_record(out_dir: Path) -> None:
    """Remove this failover's record, durably (the directory fsynced)."""
    out = _open_dir(out_dir)
    if out is None:
        return
    try:
        out.unlink(STATE_NAME)
        out.fsync()
    finally:
        out.close()


async def _discard_unforked(store: ObjectStore, domain: int, out_dir: Path, destination: Any) -> None:
    """Remove images an earlier run of this failover published and was killed before it
    recorded them (or before its fork): no VM ever ran on them (VMs start after the fork),
    they are the store's bytes at some point, and a recovery never overwrites an image.
    A standby's images are not touched (``_rehydrate`` applies its tail to them)."""
    from rocva.destination import for_store, open_output_dir
    from rocva.recover import STATE_NAME as RECOVERY_STATE
    from rocva.standby import STATE_NAME as STANDBY_NAME

    if not out_dir.is_dir() or (out_dir / STANDBY_NAME).is_file():
        return
    names = [Path(i["path"]).name for i in await _images(store, domain, out_dir)]
    if (out_dir / RECOVERY_STATE).is_file() or not any((out_dir / n).exists() for n in names):
        return  # an interrupted recovery resumes from its own state; or nothing to remove
    log.warning("failover_unforked_images_discarded", domain=domain, dir=str(out_dir), images=names)
    out = open_output_dir(out_dir, for_store(store, destination))
    try:
        for name in names:
            out.unlink(name)
        out.fsync()
    finally:
        out.close()


async def _rehydrate(store: ObjectStore, domain: int, target: Any, out_dir: Path, timeline: int, *,
                     progress: Progress | None, destination: Any, now_ns: int | None) -> dict[str, Any]:
    """The disks at ``target`` in ``out_dir``: from a standby there (continuous
    rehydration, ``rocva.standby``) by applying its tail when it can, else a recovery."""
    from rocva.destination import for_store, open_output_dir
    from rocva.standby import STATE_NAME as STANDBY_NAME
    from rocva.standby import StandbyUnusable, bring_to, discard
    from rocva.target import Target

    if (out_dir / STANDBY_NAME).is_file():  # under the failover's recovery lease
        out = open_output_dir(out_dir, for_store(store, destination))
        try:
            try:
                warm = await bring_to(store, domain, out, Target.parse(target), timeline=timeline, now_ns=now_ns)
                out.unlink(STANDBY_NAME)  # the images are the failover's now
                out.fsync()
                log.info("failover_warm", domain=domain, seq=warm["seq"], from_seq=warm["from_seq"],
                         bytes=warm["bytes_written"], seconds=warm["seconds"])
                images = await _images(store, domain, out_dir)
                return {"seq": warm["seq"], "bytes_written": warm["bytes_written"], "seconds": warm["seconds"],
                        "images": images, "warm": True, "standby_seq": warm["from_seq"]}
            except StandbyUnusable as why:
                log.info("failover_standby_unusable", domain=domain, reason=str(why))
                await asyncio.to_thread(discard, out, [Path(i["path"]).name
                                                       for i in await _images(store, domain, out_dir)])
        finally:
            out.close()
    recovered = await recover(store, domain, RecoverOptions(target, out_dir, timeline=timeline), progress=progress,
                              destination=destination, now_ns=now_ns)
    return {**recovered, "warm": False}


def _forget_dirty_maps(store: ObjectStore, out_dir: Path, images: list[dict[str, Any]], destination: Any) -> None:
    """Remove the dirty-region map (``cdp.dirtymap``) an earlier life of these images left
    next to them: their content comes from the store now, the map describes nothing of
    it, and a filter opening it would resync regions for no reason."""
    from cdp.dirtymap import sidecar_path
    from rocva.destination import for_store, open_output_dir

    out = open_output_dir(out_dir, for_store(store, destination))
    try:
        for image in images:
            out.unlink(sidecar_path(image["path"]).name)
        out.fsync()
    finally:
        out.close()


async def _images(store: ObjectStore, domain: int, out_dir: Path) -> list[dict[str, Any]]:
    """The domain's images in ``out_dir``, in disk order: ``disk``, ``path``, ``size``."""
    return [{"disk": d["disk"], "path": str(out_dir / image_file_name(d["vm"], d["name"])), "size": d["size"]}
            for d in await _disks(store, domain)]


async def _disks(store: ObjectStore, domain: int) -> list[dict[str, Any]]:
    state, _ = await load_catalog(store, domain)
    assert state is not None
    return sorted(state.disks, key=lambda d: d["disk"])


def _summary(domain: int, record: dict[str, Any], images: Any, resumed: bool, t0: float) -> dict[str, Any]:
    return {"domain": domain, "site": record["site"], "timeline": record["timeline"],
            "parent_timeline": record["parent_timeline"], "fork_seq": record["seq"], "images": images,
            "resumed": resumed, "seconds": round(time.monotonic() - t0, 3)}
