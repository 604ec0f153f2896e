"""Failback (issue 12): the protected site takes its domain back from the recovery site.

The domain runs on a timeline the recovery site forked from this site's at ``F`` (a
failover, ``rocva.failover``). This site's disks still hold its old timeline up to ``F``
and then whatever it wrote before it went down. ``failback`` brings them to the current
timeline's content at ``target`` (the final mark the recovery site committed when it
quiesced) by writing only the ranges that may differ (``rocva.delta``):

* its old timeline's records after ``F`` (segment indexes),
* the domain's frames its DRVAs' replication logs still hold after ``F`` (acked, perhaps
  never shipped: read-only, every entry checksummed),
* the regions its filters' dirty-region maps flag (written, perhaps never acked),
* the current timeline's records in ``(F, target]``;

read from the recovery site's disks, which its quiesce left exactly at the target and
which it serves as extent streams (``rocva.peer_extents``, FORMAT.md §16): those bytes
are read as they lie, where the store holds them as whole compressed units — segment
blocks and base-chunk sub-blocks, thousands of small GETs for scattered ranges, each
decompressed — so the store path took 2.2x as long in ``benchmarks.failback``. The
store holds the same point, every byte checksummed: it is read instead when no peer is
given, or when the peer refuses or fails (a partial stream's writes are then rewritten
from the store), and for disks rewritten whole. A disk
whose image is missing, of another size than the inventory says, or whose dirty-region
map is missing or damaged cannot say what it holds: it is rewritten whole from the
store, and the result says so. So is every disk when retention has moved either
timeline's horizon past the fork: the records that said what changed after it are gone
(``HorizonPassed``), and a delta without them would leave those bytes as they were.
Then the domain gets a new timeline owned by this site, forked from the current one at
``target`` (refused when another timeline became current meanwhile: ``fork_timeline``);
the dirty-region maps are removed (they describe the disks' old life).

A rerun after a crash computes the same ranges (nothing writes the disks meanwhile: the
MSA keeps the VMs off until the failback is done) and writes them again; once the fork
exists it only finishes (removes the maps). A disk rewritten whole loses its map, durably,
before its image is touched, so that its rerun rewrites it whole again rather than
trusting a delta over a half-written disk. Nothing here powers a VM on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdp import durable
from cdp.catalog import load_catalog
from cdp.catalog_fork import fork_timeline
from cdp.catalog_read import CatalogView
from cdp.dirtymap import DirtyMapUnusable, read_dirty_map, sidecar_path
from cdp.errors import FailoverRefused, HorizonPassed, NotFound
from cdp.file_kinds import open_regular
from cdp.extent_stream import request_for
from cdp.logs import get_logger
from cdp.store.base import ObjectStore
from rocva import delta
from rocva.peer_extents import Peer, PeerUnavailable, copy_from_peer
from rocva.plan import build_plan
from rocva.recover import recovery_lease_held
from rocva.target import Target, resolve_target

log = get_logger("rocva.failback")


@dataclass(frozen=True)
class LocalDisk:
    """One of this site's disks of the domain: the catalog's disk id, its image, and the
    size the site's inventory gives it."""

    disk: int
    path: Path
    size: int


def _timeline_chain(view_state: Any, current: Any, site: str) -> Any:
    """The timeline this site's disks follow: the current one's parent, which must be
    this site's (``FailoverRefused`` otherwise)."""
    if not current.parent:
        raise FailoverRefused(f"domain runs on timeline {current.id} owned by site {current.owner!r}, which was "
                              f"never forked from another: it never failed over, there is nothing to fail back")
    old = view_state.timeline(current.parent)
    if old.owner != site:
        raise FailoverRefused(
            f"timeline {current.id} (owner {current.owner!r}) was forked from timeline {old.id}, owned by "
            f"{old.owner!r}, not by this site ({site!r}): this site's disks do not hold it; fail over instead")
    return old


def inventory_disks(catalog_disks: Sequence[Mapping[str, Any]], inventory: Mapping[tuple[str, str], Any],
                    name: str, inventory_file: str) -> list[LocalDisk]:
    """This site's disks for the catalog's, matched by VM and disk name (``inventory``:
    ``(vm, disk)`` -> the inventory's disk, with ``image`` and ``size``), in the catalog's
    order. ``FailoverRefused`` saying what to fix when one is missing or of another
    size: the MSA checks this before the other site quiesces, so nothing has changed."""
    out = []
    for d in catalog_disks:
        disk = inventory.get((d["vm"], d["name"]))
        if disk is None:
            raise FailoverRefused(f"domain {name}: the catalog's disk {d['vm']}/{d['name']} is not in "
                                  f"{inventory_file}; add it (same vm and disk name, {d['size']} bytes) to "
                                  f"fail back; nothing was changed")
        if disk.size != int(d["size"]):
            raise FailoverRefused(f"domain {name}: disk {d['vm']}/{d['name']} is {d['size']} bytes in the catalog "
                                  f"and {disk.size} in {inventory_file}; make the inventory say "
                                  f"{d['size']} bytes; nothing was changed")
        out.append(LocalDisk(int(d["disk"]), Path(disk.image), disk.size))
    return out


def _check_disks(catalog_disks: list[dict], disks: Sequence[LocalDisk], domain: int) -> list[LocalDisk]:
    by_id = {d.disk: d for d in disks}
    out = []
    for d in catalog_disks:
        mine = by_id.get(int(d["disk"]))
        if mine is None:
            raise FailoverRefused(f"domain {domain}: the catalog's disk {d['disk']} ({d['vm']}/{d['name']}) has no "
                                  f"disk in this site's inventory; add it (same vm and name) to fail back")
        if mine.size != int(d["size"]):
            raise FailoverRefused(
                f"domain {domain}: disk {d['vm']}/{d['name']} is {d['size']} bytes in the catalog, {mine.size} in "
                f"this site's inventory ({mine.path}): fix the inventory; nothing was changed")
        out.append(mine)
    return out


def _flagged_or_why_whole(disk: LocalDisk) -> tuple[delta.Ranges | None, str | None]:
    """The ranges this disk's dirty-region map flags, or why the disk cannot be brought
    back by a delta (then it is rewritten whole)."""
    try:
        have = os.stat(disk.path).st_size
    except FileNotFoundError:
        return None, f"{disk.path} is missing"
    if have != disk.size:
        return None, f"{disk.path} is {have} bytes, not {disk.size}"
    try:
        flags, region = read_dirty_map(sidecar_path(disk.path), disk.size)
    except DirtyMapUnusable as exc:
        return None, f"its dirty-region map cannot be trusted ({exc.message})"
    return delta.flagged(flags, region, disk.size), None


def _drop_map(disk: LocalDisk) -> None:
    """Remove the disk's dirty-region map, durably (unlink, then the directory fsynced
    through ``cdp.durable``), before a byte of the disk is rewritten whole: a run that
    dies half way leaves an image of the right size whose content is neither its old
    one nor the point, and the old map beside it would have the rerun pick a delta over
    it. Without a map, the rerun rewrites the disk whole again."""
    path = sidecar_path(disk.path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return  # no directory, no map
    try:
        try:
            os.unlink(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        durable.sync_dir(dir_fd)
    finally:
        os.close(dir_fd)


def _prepare_whole(disk: LocalDisk) -> None:
    """A fresh sparse image of the right size where the old one is missing or mis-sized
    (its map removed first: ``_drop_map``)."""
    _drop_map(disk)
    disk.path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_regular(disk.path, os.O_RDWR | os.O_CREAT)
    try:
        if os.fstat(fd).st_size != disk.size:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, disk.size)
        try:
            os.fsync(fd)
        except OSError as exc:  # not retried: a rerun writes the whole disk again, every byte
            raise OSError(exc.errno, f"{exc.strerror} (fsync of the disk a failback rewrites whole; run the "
                                     f"failback again once the disk is healthy)", str(disk.path)) from exc
    finally:
        os.close(fd)


async def failback(store: ObjectStore, domain: int, target: Target | int | str, *, site: str,
                   disks: Sequence[LocalDisk], logs: Sequence[Path] = (),
                   progress: Callable[[int, int], None] | None = None, now_ns: int | None = None,
                   peer: Peer | None = None) -> dict[str, Any]:
    """Bring ``disks`` to the current timeline at ``target`` and fork a timeline for
    ``site`` there (module docstring). Returns what was moved, per disk, and the fork.
    ``peer``: read the delta from the recovery site's quiesced disks (``source`` "peer"),
    and from the store when it cannot serve them; else from the store.

    Holds a recovery lease on the domain from before the catalog is read until the fork
    is committed (FORMAT.md §11.3): a retention beside it deleted the segments its delta
    and plan were reading, and it failed half way (``NotFound``)."""
    async with recovery_lease_held(store, domain, f"cdp failback domain {domain} to {site}"):
        return await _failback(store, domain, target, site=site, disks=disks, logs=logs, progress=progress,
                               now_ns=now_ns, peer=peer)


async def _failback(store: ObjectStore, domain: int, target: Target | int | str, *, site: str,
                    disks: Sequence[LocalDisk], logs: Sequence[Path],
                    progress: Callable[[int, int], None] | None, now_ns: int | None,
                    peer: Peer | None) -> dict[str, Any]:
    """``failback``'s work, under its lease."""
    t0 = time.monotonic()
    phases: dict[str, float] = {}  # seconds from the start to each step's end
    state, generation = await load_catalog(store, domain)
    if state is None:
        raise NotFound(f"domain {domain}: no catalog in {store.describe()}: nothing to fail back")
    current = state.timeline()
    if current.owner == site:
        parent = state.timeline(current.parent) if current.parent else None
        if parent is not None and parent.owner != site:  # our fork exists: a rerun that only finishes
            _forget_maps(disks)
            return {"domain": domain, "site": site, "timeline": current.id, "parent_timeline": parent.id,
                    "fork_seq": current.fork_seq, "resumed": True, "disks": None,
                    "seconds": round(time.monotonic() - t0, 3)}
        raise FailoverRefused(f"domain {domain} runs on timeline {current.id}, owned by this site ({site!r}): it "
                              f"never failed over to another site, there is nothing to fail back")
    old = _timeline_chain(state, current, site)
    fork = current.fork_seq
    view = CatalogView(store, state, generation)
    resolved = await resolve_target(view, Target.parse(target), now_ns=now_ns)
    if resolved.seq < fork:
        raise FailoverRefused(f"domain {domain}: the point (seq {resolved.seq}) is before timeline {current.id}'s fork "
                              f"from this site's timeline (seq {fork}); fail back to the recovery site's final mark")
    mine = _check_disks(view.disks, disks, domain)
    # Where the two histories may differ (rocva.delta), per disk slot.
    old_view = CatalogView(store, state, generation, old.id)
    ids = [int(d["disk"]) for d in view.disks]

    def scan_logs() -> list[delta.Ranges]:
        found = [delta.empty() for _ in ids]
        for path in logs:
            more, _ = delta.changed_in_log(path, domain, fork, ids)
            found = [delta.union(a, b) for a, b in zip(found, more)]
        return found

    async def timed(name: str, work: Any) -> Any:
        result = await work
        phases[name] = round(time.monotonic() - t0, 3)
        return result

    async def in_store(name: str, on: CatalogView, upto: int) -> tuple[list[delta.Ranges] | None, str | None]:
        try:
            return await timed(name, delta.changed_in_store(store, on, fork, upto)), None
        except HorizonPassed as exc:
            return None, exc.message

    # Both timelines' indexes and the logs at once: each is mostly waiting on reads.
    (theirs, theirs_gone), (ours, ours_gone), in_logs = await asyncio.gather(
        in_store("theirs_known", view, resolved.seq), in_store("ours_known", old_view, old.committed_seq),
        timed("logs_known", asyncio.to_thread(scan_logs)))
    phases["ranges_known"] = round(time.monotonic() - t0, 3)
    # Retention passed the fork on a timeline: what changed after it is no longer in the
    # store, so no delta of any disk can be trusted.
    unknown = theirs_gone or ours_gone
    if unknown is not None:
        unknown = f"what changed after the fork (seq {fork}) cannot be known: {unknown}"
    ranges, report = [], []
    for k, disk in enumerate(mine):
        unacked, why = _flagged_or_why_whole(disk)
        if unacked is not None and unknown is not None:
            unacked, why = None, unknown
        if unacked is None:
            log.warning("failback_whole_disk", domain=domain, disk=disk.disk, path=str(disk.path), reason=why)
            _prepare_whole(disk)
            r = (np.zeros(1, np.int64), np.full(1, disk.size, np.int64))
        else:
            assert theirs is not None and ours is not None  # else unknown, and unacked None
            r = delta.union(theirs[k], ours[k], in_logs[k], unacked)
        ranges.append(r)
        report.append({"disk": disk.disk, "path": str(disk.path), "mode": "whole" if why else "delta",
                       "reason": why, "bytes": delta.total(r),
                       "ranges": {"theirs": None if theirs is None else delta.total(theirs[k]),
                                  "ours": None if ours is None else delta.total(ours[k]),
                                  "log": delta.total(in_logs[k])}})
    moved = sum(delta.total(r) for r in ranges)
    if progress is not None:
        progress(0, moved)
    whole = {k for k, r in enumerate(report) if r["mode"] == "whole"}
    from_store, source, peer_error, written = ranges, "store", None, 0
    if peer is not None and len(whole) < len(mine):
        try:
            written = await _from_peer(peer, domain, resolved.seq, mine,
                                       [delta.empty() if k in whole else r for k, r in enumerate(ranges)], progress,
                                       moved)
            from_store = [r if k in whole else delta.empty() for k, r in enumerate(ranges)]
            source = "peer"
        except PeerUnavailable as exc:
            # The store holds the same point: the ranges are read from it instead, every
            # byte written again (whatever the peer's stream wrote is overwritten).
            peer_error = exc.message
            log.warning("failback_peer_unavailable", domain=domain, peer=peer.name, error=exc.message)
            written = 0
    phases["peer_done"] = round(time.monotonic() - t0, 3)
    if any(len(r[0]) for r in from_store):
        plan = delta.restrict(await build_plan(store, view, resolved), from_store)
        written += await delta.apply_in_place(store, plan, [d.path for d in mine])
    phases["applied"] = round(time.monotonic() - t0, 3)
    if progress is not None:
        progress(moved, moved)
    log.info("failback_applied", domain=domain, seq=resolved.seq, bytes_moved=moved, bytes_written=written,
             source=source)
    state, _ = await fork_timeline(store, domain, resolved.seq, site, parent=current.id, by=f"cdp failback to {site}")
    _forget_maps(mine)
    log.info("failback_forked", domain=domain, site=site, timeline=state.current, parent=current.id,
             fork_seq=resolved.seq)
    return {"domain": domain, "site": site, "timeline": state.current, "parent_timeline": current.id,
            "fork_seq": resolved.seq, "old_timeline": old.id, "old_fork_seq": fork, "resumed": False,
            "disks": report, "bytes_moved": moved, "bytes_written": written, "source": source,
            "peer_error": peer_error, "phases_s": phases,
            "seconds": round(time.monotonic() - t0, 3)}


async def _from_peer(peer: Peer, domain: int, seq: int, disks: Sequence[LocalDisk], ranges: list[delta.Ranges],
                     progress: Callable[[int, int], None] | None, moved: int) -> int:
    req = request_for(domain, seq, [d.disk for d in disks], ranges)
    done = 0

    def step(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, moved)

    fds: dict[int, int] = {}
    try:
        for d in disks:
            fds[d.disk] = open_regular(d.path, os.O_RDWR)
            if os.fstat(fds[d.disk]).st_size != d.size:
                raise FailoverRefused(f"{d.path}: {os.fstat(fds[d.disk]).st_size} bytes, its disk has {d.size}")
        return await copy_from_peer(peer, req, fds, progress=step)
    finally:
        for fd in fds.values():
            os.close(fd)


def _forget_maps(disks: Sequence[LocalDisk]) -> None:
    """The disks hold the new timeline's point now: their dirty-region maps describe a
    life that is over (a filter opening one would resync for nothing)."""
    for disk in disks:
        sidecar_path(disk.path).unlink(missing_ok=True)
