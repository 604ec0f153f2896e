"""The failback job (``cdp failback DOMAIN``, issue 12), run by the protected site's MSA
once the domain runs at the recovery site after a failover:

1. The recovery site (``[peer]``) quiesces the domain over its REST API, as for a planned
   failover: its VMs stop issuing writes, a final mark is committed after their last
   acknowledged write, the VMs are powered off and it stops shipping the domain.
2. A short-lived recovery appliance (``python -m rocva failback``) brings this site's own
   disks to that mark by moving only what changed (``rocva.failback``: both timelines'
   indexes, this site's DRVA logs and its filters' dirty-region maps), then forks a
   timeline owned by this site.
3. The domain is protected here again (its DRVA restarted: it adopts the new timeline,
   dropping what it held of the old one) and its VMs are powered on.
4. The recovery site releases the domain (``POST /v1/failover/{name}/release``): it
   moves the disks the VMs ran on aside, then unregisters the VMs and the on-demand
   hosts they took (a rerun finishes a release that was interrupted).

``failbacks/<domain>.json`` (FORMAT.md §13.12) records the phase reached: a rerun resumes
after it — never asks for a second handover, never forks twice. Until it is
``protected``, the domain's VMs are not powered on here: their disks may be
half-written, then their DRVA serves the old, fenced timeline (a filter that meets it
stays fenced: nothing it captures is acknowledged). A failback is refused while they
run here before the appliance (it writes their disks); VMs found running at ``forked``
(left by an earlier version, which let them on) are powered off before the protect:
their writes since, never acknowledged, stay flagged in their dirty-region maps and are
resynced onto the new timeline when they run again.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdp import durable
from cdp.errors import CdpError, ConfigError, FailoverRefused, NotFound
from cdp.logs import get_logger
from cdp.msa.appliance import run_appliance
from cdp.msa.failover import _find, _Quiet, check_domain_name
from cdp.msa.handover import ask_handover
from cdp.msa.job_records import read_domain_record, write_domain_record
from cdp.msa.jobs import Job

log = get_logger("msa.failback")

RECORD_VERSION = 1
RECORD_BYTES_MAX = 1 << 20
PHASES = ("handed_over", "forked", "protected", "done")


def record_path(state_dir: Path, domain: str) -> Path:
    return state_dir / "failbacks" / f"{domain}.json"


def read_record(state_dir: Path, domain: str) -> dict[str, Any] | None:
    return read_domain_record(record_path(state_dir, domain), domain, version=RECORD_VERSION,
                              bytes_max=RECORD_BYTES_MAX, what="failback",
                              valid=lambda doc: doc.get("phase") in PHASES)


def write_record(state_dir: Path, doc: Mapping[str, Any]) -> None:
    write_domain_record(record_path(state_dir, str(doc["domain"])), doc)


def in_progress(state_dir: Path, domain: str) -> dict[str, Any] | None:
    """The record of a failback of ``domain`` that is not done (its disks may be
    half-written: nothing may run on them), else None."""
    try:
        doc = read_record(state_dir, domain)
    except ConfigError:
        return {"domain": domain, "phase": "unreadable"}
    return doc if doc is not None and doc["phase"] != "done" else None


async def run_failback(daemon: Any, name: str, job: Job) -> dict[str, Any]:
    """The job (module docstring). ``daemon`` is the protected site's ``MsaDaemon``."""
    t0 = time.monotonic()
    cfg = daemon.cfg
    check_domain_name(name)
    spec = next((d for d in cfg.cluster.domains if d.name == name), None)
    if spec is None:
        raise FailoverRefused(f"site {cfg.site} has no domain {name} of its own in {cfg.cluster_path.name}: a "
                              f"failback brings a domain back to the site whose disks it was protected from")
    if name in cfg.isolated:
        raise FailoverRefused(f"domain {name} is a test failover's copy here: `cdp failover-cleanup {name}`")
    record = read_record(cfg.state_dir, name)
    if record is not None and record["phase"] == "done":
        record = None  # an earlier failback: this is a new one
    phases: dict[str, float] = {}
    if record is None:
        where = await daemon.owner_elsewhere(name, strict=True)
        if where is None:
            raise FailoverRefused(f"domain {name} runs at site {cfg.site} (it never failed over, or it already "
                                  f"came back): there is nothing to fail back")
        if cfg.peer is None or cfg.peer.site != where["site"]:
            peer = "no [peer]" if cfg.peer is None else f"[peer] site {cfg.peer.site}"
            raise FailoverRefused(f"domain {name} runs at site {where['site']}, and {cfg.path.name} has {peer}: "
                                  f"the failback asks the site running the domain for its final mark; make "
                                  f"[peer] that site")
        _refuse_if_running(daemon, name)  # before the peer stops anything
        await _check_inventory(cfg, spec, name)
        t = time.monotonic()
        handover = await ask_handover(daemon, name, job, failback=True)
        phases["quiesce"] = round(time.monotonic() - t, 3)
        record = {"version": RECORD_VERSION, "domain": name, "id": spec.id, "site": cfg.site,
                  "peer": where["site"], "target": f"mark:{handover['mark']}", "handover": handover,
                  "phase": "handed_over", "started_ns": time.time_ns()}
        write_record(cfg.state_dir, record)
    else:
        log.info("failback_resumed", domain=name, phase=record["phase"])
    if record["phase"] == "handed_over":
        _refuse_if_running(daemon, name)
        t = time.monotonic()
        job.progress("rehydrate", 0, 0)
        result = await run_appliance(cfg, ["failback", "--domain", str(record["id"]), "--name", name,
                                           "--target", str(record["target"])], job, daemon.env, "rehydrate",
                                     peer_token=True)
        phases["rehydrate"] = round(time.monotonic() - t, 3)
        record.update(phase="forked", appliance=result)
        write_record(cfg.state_dir, record)
    if record["phase"] == "forked":
        t = time.monotonic()
        if name in daemon.powered:
            # On the old timeline, fenced for good: restarted on the new one below.
            log.warning("failback_vms_restarted", domain=name, phase=record["phase"])
            await daemon.power(name, False)
        job.progress("protect", 0, 1)
        await daemon.protect(name, daemon.protection.get(name) or cfg.policy(name), _Quiet(), reopen=True)
        phases["protect"] = round(time.monotonic() - t, 3)
        record.update(phase="protected")
        write_record(cfg.state_dir, record)
    if record["phase"] == "protected":
        t = time.monotonic()
        job.progress("power on", 0, 1)
        await daemon.power(name, True)
        phases["power_on"] = round(time.monotonic() - t, 3)
        release = await _release(daemon, name, job)
        phases["release"] = round(time.monotonic() - t, 3)
        record.update(phase="done", release=release, done_ns=time.time_ns())
        write_record(cfg.state_dir, record)
    job.progress("done", 1, 1)
    appliance = record.get("appliance") or {}
    out = {"domain": name, "id": record["id"], "site": cfg.site, "from_site": record["peer"],
           "target": record["target"], "handover": record["handover"],
           "timeline": appliance.get("timeline"), "parent_timeline": appliance.get("parent_timeline"),
           "fork_seq": appliance.get("fork_seq"), "disks": appliance.get("disks"),
           "bytes_moved": appliance.get("bytes_moved"), "bytes_written": appliance.get("bytes_written"),
           "source": appliance.get("source"), "peer_error": appliance.get("peer_error"),
           "release": record.get("release"), "phases_s": phases, "seconds": round(time.monotonic() - t0, 3)}
    log.info("failback_done", **{k: v for k, v in out.items() if k != "disks"})
    return out


def _refuse_if_running(daemon: Any, name: str) -> None:
    """``FailoverRefused`` while ``name``'s VMs run here: the appliance writes their disks."""
    if name in daemon.powered:
        raise FailoverRefused(f"domain {name}'s VMs are on at site {daemon.cfg.site}: a failback brings their disks "
                              f"to the other site's final mark under them; power them off first (`cdp power {name} "
                              f"off`: what they wrote since the failover is not on the domain's current timeline)")


async def _check_inventory(cfg: Any, spec: Any, name: str) -> None:
    """This site's inventory must give the domain every disk the catalog has, at the
    catalog's size (the appliance writes the disks it names): checked before the other
    site is asked to quiesce, so a refusal changes nothing anywhere."""
    from rocva.failback import inventory_disks

    _, catalog_disks, _ = await _find(cfg, name)
    inventory_disks(catalog_disks, {(d.vm.name, d.disk.name): d.disk for d in spec.disks}, name,
                    cfg.cluster_path.name)


async def _release(daemon: Any, name: str, job: Job) -> dict[str, Any]:
    """Ask the site the domain came back from to release it (unregister its VMs and the
    on-demand hosts they took); its answer. A failure says to rerun: the domain runs here
    already, only the other site's inventory is left to tidy."""
    from cdp.msa.client import MsaClient

    cfg = daemon.cfg
    job.progress("release", 0, 1)
    try:
        async with MsaClient.for_peer(cfg, daemon.env) as peer:
            doc = await peer.post(f"/v1/failover/{name}/release", {})
    except CdpError as exc:
        raise CdpError(f"domain {name} runs at site {cfg.site} again, but site {cfg.peer.site} did not release it "
                       f"({exc.message}); run `cdp failback {name}` again to finish") from None
    job.progress("release", 1, 1)
    return doc if isinstance(doc, dict) else {"answer": doc}


def record_handed_back(cfg: Any, domain: str, mark: str, seq: int) -> None:
    """At the site a domain failed over to, once its quiesce handed the domain back
    (``MsaDaemon.quiesce``): its failover record (FORMAT.md §13.10) gets ``handed_back``
    (the final mark and its seq). From then on the disks stay at that mark — the VMs are
    refused power-on (``handed_back``) until the domain is released — and the site
    failing back may read them (``extent_files``). Nothing at a site the domain did not
    fail over to (a planned failover's quiesce at the protected site)."""
    from cdp.msa.failover import read_record as read_failover
    from cdp.msa.failover import write_record as write_failover

    try:
        doc = read_failover(cfg.state_dir, domain)
    except ConfigError:
        return
    if doc is None or doc.get("phase") != "done" or doc.get("test"):
        return
    write_failover(cfg.state_dir, {**doc, "handed_back": {"mark": mark, "seq": int(seq), "ns": time.time_ns()}})


def handed_back(cfg: Any, domain: str) -> str | None:
    """Why ``domain``'s VMs may not run here (``record_handed_back``), else None."""
    from cdp.msa.failover import read_record as read_failover

    try:
        doc = read_failover(cfg.state_dir, domain)
    except ConfigError:
        return None
    back = doc.get("handed_back") if doc is not None else None
    if not isinstance(back, dict):
        return None
    return (f"domain {domain} was handed back at its final mark {back.get('mark')!r} (seq {back.get('seq')}) for "
            f"a failback to the site it came from, which may be reading these disks: they stay at that mark until "
            f"`cdp failback {domain}` there releases the domain")


async def extent_files(daemon: Any, name: str, req: Any) -> dict[int, tuple[Path, int]]:
    """For ``POST /v1/failback/{name}/extents`` (``cdp.msa.extents``): this site's disk
    images of ``name`` by catalog disk id, with their sizes — only while they hold
    exactly the point asked for: the domain was handed back at ``req.seq``
    (``record_handed_back``), its VMs are off, and nothing was committed after that
    seq. ``FailoverRefused`` otherwise (the other site then reads the store)."""
    from cdp.msa.failover import read_record as read_failover
    from rocva.failback import inventory_disks

    cfg = daemon.cfg
    doc = read_failover(cfg.state_dir, name)
    back = doc.get("handed_back") if doc is not None else None
    if not isinstance(back, dict) or back.get("seq") != req.seq or doc.get("id") != req.domain:
        have = f"handed back at seq {back.get('seq')}" if isinstance(back, dict) else "not handed back"
        raise FailoverRefused(f"domain {name} (id {req.domain}) is {have} at site {cfg.site}, not at seq {req.seq}: "
                              f"its disks are not at that point; read the store")
    if name in daemon.powered:
        raise FailoverRefused(f"domain {name}'s VMs are on at site {cfg.site}: its disks are changing")
    _, catalog_disks, committed = await _find(cfg, name)
    if committed != req.seq:
        raise FailoverRefused(f"domain {name}: the store holds commits up to seq {committed}, past the handed-back "
                              f"seq {req.seq}: these disks are not the current point; read the store")
    spec = cfg.domain(name)
    disks = inventory_disks(catalog_disks, {(d.vm.name, d.disk.name): d.disk for d in spec.disks}, name,
                            cfg.cluster_path.name)
    return {d.disk: (d.path, d.size) for d in disks}


async def release_failed_over(daemon: Any, name: str) -> dict[str, Any]:
    """At the site a domain had failed over to: the domain runs at another site again
    (its current timeline is not this site's): power its VMs off if they are on, stop
    protecting it, move the disks they ran on aside (``_move_images_aside``), remove the
    failover record, and last unregister its VMs and the on-demand hosts they took.
    Refused while the domain still runs here.

    Idempotent, so the failback asking may rerun it: each step is skipped once done, and
    the registration — what says the domain failed over here — goes last. A release
    killed after unregistering (before this order) left the record and the images: the
    record alone lets a rerun finish. With nothing of the domain left here, the answer is
    "released" again (the first answer may have been lost with the asking site)."""
    from cdp.msa import registry
    from cdp.msa.failover import read_record as read_failover
    from cdp.msa.failover import record_path as failover_record

    cfg = daemon.cfg
    check_domain_name(name)
    reg = registry.load_registry(cfg.state_dir, cfg.site)
    registered = name in registry.registered_domains(reg)
    if name in reg["isolated"] or (not registered and name in {d.name for d in cfg.cluster.domains}):
        raise FailoverRefused(f"domain {name} was not failed over to site {cfg.site} (failed over here: "
                              f"{', '.join(_failed_over_here(reg)) or 'none'}): nothing to release")
    if registered:
        record = None  # not needed to go on (and removed whatever it holds)
        where = await daemon.owner_elsewhere(name, strict=True)
    else:
        record = read_failover(cfg.state_dir, name)  # left by a release killed after it unregistered
        if record is not None and record.get("test"):
            record = None  # a test failover's: `cdp failover-cleanup` removes it
        where = await _owner_elsewhere_by_name(cfg, name)
    if where is None and (registered or record is not None):
        raise FailoverRefused(f"domain {name} still runs at site {cfg.site} (its current timeline is this site's): "
                              f"fail it back first (`cdp failback {name}` at the site it came from)")
    if not registered and record is None:
        if where is None:
            raise FailoverRefused(f"domain {name} was not failed over to site {cfg.site} (failed over here: "
                                  f"{', '.join(_failed_over_here(reg)) or 'none'}): nothing to release")
        log.info("failed_over_domain_released_before", domain=name, now_at=where["site"])
        return {"domain": name, "site": cfg.site, "released": True, "runs_at": where["site"], "hosts_removed": [],
                "images_kept": None, "already": True}
    if registered and name in daemon.powered:
        await daemon.power(name, False)
    if registered and name in daemon.protection:
        await daemon.unprotect(name)
    kept = await asyncio.to_thread(_move_images_aside, cfg.cluster.state_dir, name)
    durable.remove(failover_record(cfg.state_dir, name))
    remaining = registry.without_domain(reg, name)
    if registered:
        registry.save_registry(cfg.state_dir, remaining)
        daemon.reload_config()
    left = {h["name"] for h in remaining["hosts"]}
    removed = sorted(h["name"] for h in reg["hosts"] if h["name"] not in left)
    log.info("failed_over_domain_released", domain=name, now_at=where["site"], hosts_removed=removed,
             images_kept=str(kept) if kept else None)
    return {"domain": name, "site": cfg.site, "released": True, "runs_at": where["site"], "hosts_removed": removed,
            "images_kept": str(kept) if kept else None}


def _failed_over_here(reg: Mapping[str, Any]) -> list[str]:
    from cdp.msa import registry

    return sorted(set(registry.registered_domains(reg)) - set(reg["isolated"]))


async def _owner_elsewhere_by_name(cfg: Any, name: str) -> dict[str, Any] | None:
    """``MsaDaemon.owner_elsewhere`` for a domain this site no longer has in its
    inventory (a release that unregistered it and was killed): found by name in the
    store it lives in. None when this site owns it."""
    from cdp.msa.failover import _find_state

    try:
        _, state = await _find_state(cfg, name)
    except NotFound:
        return None  # the store never had it: nothing failed over anywhere
    tl = state.timeline()
    if tl.owner == cfg.site:
        return None
    return {"site": tl.owner, "timeline": tl.id, "parent": tl.parent, "fork_seq": tl.fork_seq}


async def refuse_unreleased_images(cfg: Any, name: str, domain_id: int, state: Any) -> None:
    """``FailoverRefused`` when ``<datastore>/<name>/`` holds the disks an earlier
    failover of the domain to this site ran on — the appliance's record there says it
    forked a timeline that is no longer the current one: the domain went back (a
    failback) and this site never released it. The appliance never overwrites them (a
    new failover fails on them), and they may hold the only copy of writes that were
    never shipped. Checked before a planned failover asks the peer to stop the domain."""
    from rocva.failover import _open_dir
    from rocva.failover import read_record as read_appliance_record

    out_dir = cfg.cluster.state_dir / name  # rocva.__main__.failover_dir
    out = _open_dir(out_dir)
    if out is None:
        return
    try:
        doc = read_appliance_record(out)
    finally:
        out.close()
    if doc is None or doc["phase"] != "forked" or doc["domain"] != domain_id or doc.get("timeline") == state.current:
        return
    now = state.timeline()
    raise FailoverRefused(
        f"{out_dir}: the disks an earlier failover of domain {name} to site {cfg.site} ran on (it forked timeline "
        f"{doc.get('timeline')}; the domain runs on timeline {now.id} at site {now.owner} now) were never released, "
        f"and a failover never overwrites them: rerun `cdp failback {name}` at site {now.owner} (its release moves "
        f"them aside here), or move the directory aside yourself once nothing in it is needed")


#: Where a release keeps the disks a domain ran on here: a directory of the datastore that
#: no domain's folder can be (``+`` is not in a domain name), as ``+test`` for test failovers.
RELEASED_DIR = "+released"


def _move_images_aside(datastore: Path, name: str) -> Path | None:
    """Rename ``<datastore>/<name>/`` (the disks the domain ran on here, and the
    appliance's record of that failover) to ``<datastore>/+released/<name>-<UTC time>/``:
    a later failover to this site rehydrates into a fresh ``<name>/`` instead of finding
    these images and refusing to overwrite them. Moved, not deleted: after a failback that
    read the store because this site was unreachable, they are the only copy of what its
    VMs wrote last and never shipped; the operator removes them once that is settled. Not
    beside the domain's folder as ``<name>.released-<time>``: that is a valid domain name,
    whose folder a later domain so named would have found holding another's disks."""
    images = datastore / name
    if not images.is_dir():
        return None
    aside = datastore / RELEASED_DIR
    try:
        os.mkdir(aside, 0o700)
        durable.fsync_dir(datastore)
    except FileExistsError:
        pass
    st = os.lstat(aside)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(f"{aside}: not a directory of this user's that others cannot write; the disks of "
                          f"{images} are not moved there (move it aside yourself, or fix {aside})")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        kept = aside / f"{name}-{stamp}{f'-{n}' if n else ''}"
        if not os.path.lexists(kept):
            break
    else:
        raise ConfigError(f"{images}: cannot move it aside, {kept} and 999 others exist")
    os.rename(images, kept)
    durable.fsync_dir(aside)
    durable.fsync_dir(datastore)  # the rename survives a crash before the record and the registration go
    return kept
