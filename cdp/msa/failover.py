"""``cdp failover DOMAIN`` (unplanned), run by the recovery site's MSA as a job.

From the store alone — the protected site may be gone:

1. **find** the domain by name in the store and refuse what cannot be done: a name the
   site's own inventory already uses, a domain that already failed over here (its
   record says ``done``), a domain this site already owns, a ``<datastore>/<domain>/``
   still holding the disks of an earlier failover that was never released;
2. **rehydrate and fork** in a short-lived ``python -m rocva failover`` process (the seed's
   temporary recovery appliance): every disk at the point, into ``<datastore>/<domain>/``,
   then the new timeline owned by this site (``rocva.failover``; progress is relayed to
   the job). With a ``[[standby]]`` of the domain its process is stopped first and the
   appliance only applies the tail to the warm images (``rocva.standby``);
3. before that, **register** the domain's VMs and disks (names and sizes from the
   catalog) on this site's hosts — adding on-demand hosts when the inventory's are full —
   in ``<state_dir>/registered.toml`` (``cdp.msa.registry``), streaming to this site's
   least-loaded DRVA, running ``[hypervisor] recovered_workload``; and **protect** it:
   the DRVA starts while the appliance works, and waits for the fork (``takeover`` in its
   configuration) instead of being fenced by the other site's timeline. If the appliance
   fails before the fork, both are rolled back, and so is the appliance's record of the
   point it rehydrated (the standby, resumed, moves the images);
4. once forked, **power on** its VMs (``cdp.hypervisor``): the DRVA continues the domain
   on the new timeline;
5. wait (bounded) for the first write of a recovered VM to be acknowledged by the DRVA:
   the recovery time objective ends there.

``<state_dir>/failovers/<domain>.json`` records the phase reached (FORMAT.md §13.10).
Every step is idempotent, so a crashed or failed job is resumed by running it again:
the recovery resumes, a fork already made is recognised, registration replaces itself.
Once ``done``, a new failover of the domain is refused. A planned failover
(``--planned``: the peer site quiesces the domain at a final mark first) that did not
fork asks the peer again when rerun: the peer answers with the same mark while it has
not run the domain since, else quiesces it anew — a mark it ran past is never forked
at. A test failover's record (``test``) is never taken for a real one's progress.

A test failover's disks live in ``<datastore>/+test/<domain>/`` (``isolated_area``): no
domain's folder (``<datastore>/<domain>/``, a name of ``[A-Za-z0-9._-]``) can be there,
so its clean-up — which deletes that folder — never touches a domain's disks. Earlier
versions used ``<datastore>/test-<domain>/``, the folder of a domain named so: the
clean-up takes from there only the files the test's recovery provably wrote
(``cdp.msa.old_test_areas``).
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cdp import durable, site_files
from cdp.errors import CdpError, ConfigError, FailoverRefused, NotFound
from cdp.inventory import image_file_name
from cdp.logs import get_logger
from cdp.msa.handover import ask_handover
from cdp.msa.job_records import read_domain_record, write_domain_record
from cdp.msa import registry
from cdp.msa.appliance import run_appliance
from cdp.msa.jobs import Job
from cdp.msa.old_test_areas import clean_old_area, old_isolated_area, registered_images
from cdp.store import open_store
from cdp.tomlread import NAME

log = get_logger("cdp.msa.failover")

RECORD_VERSION = 1
RECORD_BYTES_MAX = 64 << 10
FIRST_ACK_WAIT_S = 60.0
#: The datastore's folder of test failovers' areas: "+" is no character of a domain name
#: (``cdp.tomlread.NAME``), so this is no domain's folder (".test" would be one).
ISOLATED_DIR = "+test"


def isolated_area(datastore: Path, name: str) -> Path:
    """Where a test failover of domain ``name`` recovers its disks (module docstring)."""
    return datastore / ISOLATED_DIR / name


def record_path(state_dir: Path, domain: str) -> Path:
    return state_dir / "failovers" / f"{domain}.json"


def read_record(state_dir: Path, domain: str) -> dict[str, Any] | None:
    return read_domain_record(record_path(state_dir, domain), domain, version=RECORD_VERSION,
                              bytes_max=RECORD_BYTES_MAX, what="failover")


def write_record(state_dir: Path, doc: Mapping[str, Any]) -> None:
    write_domain_record(record_path(state_dir, str(doc["domain"])), doc)


def _registry_without_test(cfg: Any, name: str) -> dict[str, Any]:
    """The site's registrations; ``FailoverRefused`` while a test failover of ``name`` is up."""
    reg = registry.load_registry(cfg.state_dir, cfg.site)
    if name in reg["isolated"]:
        raise FailoverRefused(f"a test failover of domain {name} is up at site {cfg.site}: "
                              f"`cdp failover-cleanup {name}` removes it first")
    return reg


def check_domain_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ConfigError(f"domain {name!r}: expected a domain name of 1..64 characters [A-Za-z0-9._-]")


async def run_failover(daemon: Any, name: str, target: str, job: Job, *, planned: bool = False) -> dict[str, Any]:
    """The job (module docstring). ``daemon`` is the site's ``MsaDaemon``; ``target`` is
    ``latest``, ``seq:N``, ``mark:NAME`` or ``at:TIME`` — for a ``planned`` one, the
    final mark the peer site places when it hands the domain over (``target`` unused).

    However it ends, the domain leaves ``supervisor.takeover``: a failed run kept it
    there for good (a later restart of its DRVA waited for a fork instead of fencing);
    a rerun's protect adds it again."""
    try:
        return await _failover(daemon, name, target, job, planned=planned)
    finally:
        daemon.supervisor.takeover.discard(name)


async def _failover(daemon: Any, name: str, target: str, job: Job, *, planned: bool) -> dict[str, Any]:
    """``run_failover``'s steps."""
    from cdp.msa.failback import refuse_unreleased_images

    t0, t0_wall = time.monotonic(), time.time()
    cfg = daemon.cfg
    check_domain_name(name)
    reg = _registry_without_test(cfg, name)
    registered = name in registry.registered_domains(reg)
    if not registered and any(d.name == name for d in cfg.cluster.domains):
        raise FailoverRefused(f"site {cfg.site} already has a domain {name} of its own in "
                              f"{cfg.cluster_path.name}: a failover would shadow it; rename one of them")
    record = read_record(cfg.state_dir, name)
    if record is not None and record.get("test"):
        # A test failover's, left by a run killed before it came up (it was never
        # registered): not this failover's progress, and its point is not this one's.
        log.warning("failover_test_record_ignored", domain=name, target=record.get("target"),
                    phase=record.get("phase"))
        record = None
    # A rerun of a run that died (its MSA killed) before it was done: the DRVA the
    # restarted daemon started serves the domain without takeover — fenced by the old
    # timeline if the fork had not happened — so it is restarted below.
    resuming = record is not None and record.get("phase") in ("started", "forked")
    if record is not None and record.get("phase") == "done" and registered:
        raise FailoverRefused(
            f"domain {name} already failed over to site {cfg.site} (timeline {record.get('timeline')}, forked "
            f"from timeline {record.get('parent_timeline')} at seq {record.get('fork_seq')}); it runs here "
            f"(`cdp status`); failing back is another verb")
    job.progress("find", 0, 1)
    domain_id, state = await _find_state(cfg, name)
    disks, seed = _disks(state), state.timeline().committed_seq
    job.progress("find", 1, 1)
    if not resuming:  # before the peer is asked to stop anything
        await refuse_unreleased_images(cfg, name, domain_id, state)
    handover = None
    if planned and record is not None and record.get("phase") == "forked":
        target = str(record["target"])  # forked at the handed-over mark: the peer is fenced, nothing to ask
    elif planned:
        # A rerun of one that did not fork asks again: the peer answers with the mark it
        # handed over at while it has not run the domain since, else quiesces it anew.
        asked = record.get("handover") if resuming and record.get("planned") else None
        handover = await ask_handover(daemon, name, job, resumes=asked)
        target = f"mark:{handover['mark']}"
        if asked is not None and handover["mark"] != asked.get("mark"):
            log.warning("planned_failover_handed_over_anew", domain=name, mark=handover["mark"],
                        seq=handover["seq"], stale_mark=asked.get("mark"), stale_seq=asked.get("seq"))
    elif resuming and record.get("planned") and record.get("phase") == "started":
        # Unplanned over a planned one that did not fork (its peer is gone, or no
        # longer vouches for the handed-over mark): the point is this run's.
        log.warning("planned_failover_replaced", domain=name, stale_target=record.get("target"), target=target)
        record = None
    if record is None or record.get("phase") == "done" or handover is not None:
        # (done but unregistered: a new failover)
        record = {"version": RECORD_VERSION, "domain": name, "id": domain_id, "site": cfg.site, "target": target,
                  "planned": planned, "phase": "started", "started_ns": time.time_ns()}
        if handover is not None:
            record["handover"] = handover
        write_record(cfg.state_dir, record)
    elif record.get("target") != target:
        raise FailoverRefused(f"a failover of domain {name} to {record.get('target')} was started and did not "
                              f"finish; run it again with that point to resume it (or see the job's error)")

    # Registered and protected first: the DRVA starts while the appliance rehydrates and
    # waits for the fork (takeover) instead of being fenced by the other site's timeline.
    phases: dict[str, float] = {"to_rehydrate": round(time.monotonic() - t0, 3)}
    t = time.monotonic()
    placed = await _register(daemon, name, domain_id, disks, seed)
    phases["register"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    protecting = asyncio.create_task(
        _timed(lambda: daemon.protect(name, daemon.cfg.policy(name), _Quiet(), takeover=True, reopen=resuming),
               phases, "protect"))
    job.progress("rehydrate", 0, 0)
    t_rehydrate = time.monotonic()
    await daemon.standby.suspend(name)  # the appliance alone touches the images from here
    try:
        forked = await _rocva_failover(cfg, domain_id, name, target, job, daemon.env)
        daemon.supervisor.nudge(name)  # its DRVA waits for the fork: it is there
    except BaseException:
        if record["phase"] == "started":  # nothing forked: roll back, a rerun may pick another point
            protecting.cancel()
            await asyncio.gather(protecting, return_exceptions=True)
            await _unregister(daemon, name)
            if not record.get("planned"):  # a planned one keeps its handover: a rerun asks again with it
                durable.remove(record_path(cfg.state_dir, name))
            await _forget_appliance_record(cfg, domain_id, name)  # before the standby may move the images
            daemon.standby.resume(name)
        raise
    rehydrate_s = time.monotonic() - t_rehydrate
    phases["rehydrate"] = round(rehydrate_s, 3)
    record.update(phase="forked", timeline=forked["timeline"], parent_timeline=forked["parent_timeline"],
                  fork_seq=forked["fork_seq"], hosts=placed["hosts"], drva=placed["drva"])
    write_record(cfg.state_dir, record)
    job.progress("protect and power on", 0, 1)
    await protecting  # usually long done: the DRVA started during the rehydration
    await _timed(lambda: daemon.power(name, True), phases, "power_on")
    t = time.monotonic()
    job.progress("first-ack", 0, 1)
    first_ack_s = await _first_ack(daemon, name, t0_wall)
    phases["first_ack"] = round(time.monotonic() - t, 3)
    daemon.standby.resume(name)  # it stays off: the domain is this site's now
    daemon.supervisor.takeover.discard(name)  # a later restart of the DRVA must fence, not wait
    record.update(phase="done", done_ns=time.time_ns())
    write_record(cfg.state_dir, record)
    job.progress("done", 1, 1)
    handover = record.get("handover")
    result = {"domain": name, "id": domain_id, "site": cfg.site, "target": target, "planned": planned,
              "warm": forked.get("warm", False),
              "timeline": forked["timeline"], "parent_timeline": forked["parent_timeline"],
              "fork_seq": forked["fork_seq"], "resumed": forked["resumed"], "images": forked["images"],
              "hosts": placed["hosts"], "added_hosts": placed["added_hosts"], "drva": placed["drva"],
              "rehydrate_s": round(rehydrate_s, 3), "first_write_acked_s": first_ack_s, "phases_s": phases,
              "seconds": round(time.monotonic() - t0, 3)}
    if handover is not None:
        # Writes the protected site acknowledged after the point failed over to: lost.
        result["handover"] = {**handover, "lost_writes": max(0, int(handover["acked_seq"] or 0) - forked["fork_seq"])}
    log.info("failover_done", **{k: v for k, v in result.items() if k != "images"})
    return result


async def run_test_failover(daemon: Any, name: str, target: str, job: Job) -> dict[str, Any]:
    """``cdp failover --test``: the domain's VMs come up here from ``target`` in an
    isolated test area — disks in ``<datastore>/+test/<name>/``, registered as isolated,
    powered on — while the protected site keeps replicating. No DRVA, no fork: nothing is
    written to the store but the recovery's lease. ``cleanup_test_failover`` undoes it."""
    t0 = time.monotonic()
    cfg = daemon.cfg
    check_domain_name(name)
    _registry_without_test(cfg, name)
    if any(d.name == name for d in cfg.cluster.domains):
        raise FailoverRefused(f"site {cfg.site} already runs a domain {name} (its own, or failed over here): "
                              f"a test failover would shadow it")
    if (used := _site_disks_in(cfg, isolated_area(cfg.cluster.state_dir, name))):
        raise FailoverRefused(f"a test failover of domain {name} recovers into "
                              f"{isolated_area(cfg.cluster.state_dir, name)}, which holds the image of {used[0]} "
                              f"of {cfg.cluster_path.name}: its clean-up would delete it; move that image out of "
                              f"{cfg.cluster.state_dir / ISOLATED_DIR}")
    job.progress("find", 0, 1)
    domain_id, disks, _ = await _find(cfg, name)
    write_record(cfg.state_dir, {"version": RECORD_VERSION, "domain": name, "id": domain_id, "site": cfg.site,
                                 "target": target, "test": True, "phase": "started", "started_ns": time.time_ns()})
    job.progress("rehydrate", 0, 0)
    try:
        recovered = await _rocva_failover(cfg, domain_id, name, target, job, daemon.env, test=True)
    except BaseException:
        durable.remove(record_path(cfg.state_dir, name))
        raise
    placed = await _register(daemon, name, domain_id, disks, recovered["seq"], test=True)
    job.progress("power-on", 0, 1)
    await daemon.power(name, True)
    write_record(cfg.state_dir, {"version": RECORD_VERSION, "domain": name, "id": domain_id, "site": cfg.site,
                                 "target": target, "test": True, "phase": "done", "seq": recovered["seq"],
                                 "hosts": placed["hosts"], "done_ns": time.time_ns()})
    job.progress("done", 1, 1)
    result = {"domain": name, "id": domain_id, "site": cfg.site, "target": target, "test": True,
              "seq": recovered["seq"], "images": recovered["images"], "hosts": placed["hosts"],
              "added_hosts": placed["added_hosts"], "seconds": round(time.monotonic() - t0, 3)}
    log.info("test_failover_up", **{k: v for k, v in result.items() if k != "images"})
    return result


async def cleanup_test_failover(daemon: Any, name: str) -> dict[str, Any]:
    """Remove a test failover: power its VMs off, unregister them (and the on-demand
    hosts they took), delete ``<datastore>/+test/<name>/`` and the record. A test failover
    whose MSA was killed before it registered the VMs left only its record (and perhaps
    part of its area): those are removed the same way. One of an earlier version, in
    ``<datastore>/test-<name>/``, loses only what its recovery provably wrote there
    (``cdp.msa.old_test_areas.clean_old_area``); what else is there is kept and said."""
    cfg = daemon.cfg
    check_domain_name(name)
    reg = registry.load_registry(cfg.state_dir, cfg.site)
    # What an earlier version's area may hold of the test: the registered VMs' images,
    # else (a run killed before registering) its recovery's, known by the domain id.
    images: list[str] | None = None
    domain_id = None
    if name not in reg["isolated"]:
        record = read_record(cfg.state_dir, name)
        if record is None or not record.get("test") or name in registry.registered_domains(reg):
            raise FailoverRefused(f"no test failover of domain {name} at site {cfg.site} "
                                  f"(test failovers: {', '.join(reg['isolated']) or 'none'})")
        log.warning("test_failover_leftover", domain=name, phase=record.get("phase"), target=record.get("target"))
        domain_id = record.get("id")
    else:
        images = registered_images(reg, name)
        if name in daemon.powered:
            await daemon.power(name, False)
        registry.save_registry(cfg.state_dir, registry.without_domain(reg, name))
        daemon.reload_config()
    outcome = await asyncio.to_thread(_remove_areas, daemon.cfg, name, images, domain_id)
    durable.remove(record_path(cfg.state_dir, name))
    log.info("test_failover_removed", domain=name, **outcome)
    return {"domain": name, "site": cfg.site, **outcome}



def _site_disks_in(cfg: Any, area: Path) -> list[str]:
    """The site's disks (``VM/disk``: the inventory's and the registered ones) whose image
    lies in ``area``, by path and, for what exists, as the file system resolves it."""
    real = Path(os.path.realpath(area))
    return [f"disk {x.vm.name}/{x.disk.name} ({x.disk.image})" for d in cfg.cluster.domains for x in d.disks
            if Path(os.path.abspath(x.disk.image)).is_relative_to(os.path.abspath(area))
            or Path(os.path.realpath(x.disk.image)).is_relative_to(real)]


def _remove_areas(cfg: Any, name: str, images: list[str] | None, domain_id: Any) -> dict[str, Any]:
    """Remove the test failover's area, and what it left in an earlier version's; what
    was removed (``removed``: the area, for the messages) and what was ``kept`` (with why)."""
    datastore = cfg.cluster.state_dir
    removed: list[str] = []
    kept: list[dict[str, str]] = []
    area = isolated_area(datastore, name)
    if os.path.lexists(area):
        if (why := _remove_area(cfg, area)) is None:
            removed.append(str(area))
        else:
            kept.append({"path": str(area), "why": why})
    old = old_isolated_area(datastore, name)
    if os.path.lexists(old):
        gone, why = clean_old_area(cfg, old, images, domain_id)
        removed += gone
        if why:
            kept.append({"path": str(old), "why": why})
    return {"removed": ", ".join(removed) or "nothing", "kept": kept}


def _remove_area(cfg: Any, area: Path) -> str | None:
    """Delete ``area`` (``<datastore>/+test/<name>/``) and what it holds, durably; why not,
    or None. Nothing else uses it, unless an image of the site was put there (refused
    at the test failover's start) or it is not a directory of its own."""
    for path in (area.parent, area):
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return f"{path} is not a directory (a symbolic link?): never followed; move it away"
    if (used := _site_disks_in(cfg, area)):
        return f"it holds the image of {used[0]}: kept"
    _remove_tree(area)
    return None


def _remove_tree(path: Path) -> None:
    """Delete the directory ``path`` and what it holds, and make its entry's removal
    durable (its parent fsynced): a test area back after a power loss is refused by the
    next test failover's recovery ("already exists")."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    if path.parent.is_dir():
        durable.fsync_dir(path.parent)


class _Quiet:
    """A job handle for work the job runs beside its own steps (their progress would
    overwrite the job's)."""

    def progress(self, *args: Any) -> None:
        pass


async def _unregister(daemon: Any, name: str) -> None:
    """Undo ``_register`` and the protection of a failover that did not fork."""
    cfg = daemon.cfg
    daemon.supervisor.takeover.discard(name)
    if name in daemon.protection:
        await daemon.unprotect(name)
    registry.save_registry(cfg.state_dir, registry.without_domain(registry.load_registry(cfg.state_dir, cfg.site),
                                                                  name))
    daemon.reload_config()
    log.info("failover_rolled_back", domain=name)


async def _forget_appliance_record(cfg: Any, domain_id: int, name: str) -> None:
    """The appliance's own record in the datastore (``<datastore>/<name>/failover.json``,
    FORMAT.md §14.4) of a run that did not fork: it says the images hold its point, and
    the standby resumed next (or a rerun at another point) changes them. Removed unless
    the catalog shows the fork happened (the appliance died after it: the rerun
    recognises it by that record). Best effort: the job's own error is what is reported,
    and a record left here is still checked by the rerun and removed by the standby."""
    from rocva.failover import forget_unforked_at

    out_dir = cfg.cluster.state_dir / name  # rocva.__main__.failover_dir
    try:
        store = open_store(cfg.store_url_for(name))
        try:
            if await forget_unforked_at(store, domain_id, out_dir):
                log.info("failover_appliance_record_removed", domain=name, dir=str(out_dir))
        finally:
            await store.close()
    except Exception as exc:  # noqa: BLE001 - the rollback goes on; the record is checked again later
        log.warning("failover_appliance_record_kept", domain=name, dir=str(out_dir), error=str(exc)[:400])


async def _timed(work: Callable[[], Awaitable[Any]], phases: dict[str, float], name: str) -> Any:
    # ``work`` makes its coroutine only once this task runs: a task cancelled before its
    # first step must not leave a coroutine never awaited.
    t = time.monotonic()
    try:
        return await work()
    finally:
        phases[name] = round(time.monotonic() - t, 3)


async def _find(cfg: Any, name: str) -> tuple[int, list[dict[str, Any]], int]:
    """The domain's id, its disks and its committed seq (to seed the recovered VMs' writes),
    from the store it lives in: the peer's for a domain of the peer (``store_url_for``)."""
    domain_id, state = await _find_state(cfg, name)
    return domain_id, _disks(state), state.timeline().committed_seq


async def _find_state(cfg: Any, name: str) -> tuple[int, Any]:
    """The domain's id and its catalog's state (``_find``)."""
    from cdp.catalog import find_domain

    store = open_store(cfg.store_url_for(name))
    try:
        found = await find_domain(store, name)
        if found is None:
            raise NotFound(f"no domain named {name} in {store.describe()}: nothing to fail over "
                           f"(`cdp points` lists what a store holds)")
    finally:
        await store.close()
    return found


def _disks(state: Any) -> list[dict[str, Any]]:
    return [dict(d) for d in sorted(state.disks, key=lambda d: d["disk"])]


async def _rocva_failover(cfg: Any, domain_id: int, name: str, target: str, job: Job,
                          env: Mapping[str, str], *, test: bool = False) -> dict[str, Any]:
    """Run ``python -m rocva failover`` (``run_appliance``)."""
    return await run_appliance(cfg, ["failover", "--domain", str(domain_id), "--name", name, "--target", target,
                                     *(["--test"] if test else [])], job, env, "rehydrate")


async def _register(daemon: Any, name: str, domain_id: int, disks: list[dict[str, Any]],
                    seed: int, *, test: bool = False) -> dict[str, Any]:
    """Register the domain's VMs here (module docstring, step 3); reload the site.
    ``test``: isolated, their images under ``+test/<name>/`` (``isolated_area``)."""
    cfg = daemon.cfg
    previous = registry.load_registry(cfg.state_dir, cfg.site)
    reg = registry.without_domain(previous, name)
    vms: dict[str, list[dict[str, Any]]] = {}
    for d in disks:
        vms.setdefault(d["vm"], []).append(d)
    hosts, added = _place(cfg, reg, name, list(vms))
    drva = _least_loaded_drva(daemon)
    folder = f"{ISOLATED_DIR}/{name}" if test else name  # rocva.__main__.failover_dir
    vm_entries = [site_files.vm(vm, hosts[vm], [(d["name"], d["size"], f"{folder}/{image_file_name(vm, d['name'])}")
                                                for d in vm_disks]) for vm, vm_disks in vms.items()]
    workload = dict(cfg.hypervisor.recovered_workload)
    # Seeded by the point (its committed seq when the failover began): the protected
    # site's seed would replay the writes its VMs made first, which the disks hold.
    workload.setdefault("seed", seed & 0x7FFF_FFFF)
    domain_entry = site_files.domain(name, domain_id, str(drva.listen), list(vms), workload)
    new = registry.with_domain(reg, domain_entry, vm_entries, added, isolated=test)
    registry.save_registry(cfg.state_dir, new)
    try:
        daemon.reload_config()  # the loader checks the sum: a clash is refused here
        daemon.hypervisor.check(daemon.cfg.domain(name))
    except CdpError:
        registry.save_registry(cfg.state_dir, previous)
        daemon.reload_config()
        raise
    log.info("failover_registered", domain=name, vms=list(vms), hosts=sorted(set(hosts.values())),
             added_hosts=added, drva=drva.name)
    return {"hosts": sorted(set(hosts.values())), "added_hosts": added, "drva": drva.name}


def _place(cfg: Any, reg: Mapping[str, Any], domain: str, vms: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each VM on the first host with room — the operator's hosts, then the on-demand
    ones — and the on-demand hosts that takes. ``FailoverRefused`` when there is no room."""
    per_host = cfg.hypervisor.vms_per_host
    on_demand = list(cfg.hypervisor.on_demand_hosts)
    registered_hosts = {h["name"] for h in reg["hosts"]}
    order = [h.name for h in cfg.cluster.hosts if h.name not in registered_hosts and h.name not in on_demand]
    order += on_demand
    leaving = {vm.name for d in cfg.cluster.domains if d.name == domain for vm in d.vms}  # re-registered
    load = {h: sum(1 for vm in cfg.cluster.vms if vm.host == h and vm.name not in leaving) for h in order}
    placed: dict[str, str] = {}
    for vm in vms:
        host = next((h for h in order if load[h] < per_host), None)
        if host is None:
            raise FailoverRefused(
                f"no room for the {len(vms)} VM(s) of domain {domain}: every host of {cfg.cluster_path.name} "
                f"and every on-demand host already runs {per_host} VMs ([hypervisor] vms_per_host); add "
                f"on_demand_hosts to {cfg.path.name}")
        placed[vm] = host
        load[host] += 1
    return placed, sorted({h for h in placed.values() if h in on_demand}, key=on_demand.index)


def _least_loaded_drva(daemon: Any) -> Any:
    cfg = daemon.cfg
    counts = {d.name: 0 for d in cfg.drvas}
    for domain in daemon.protection:
        counts[cfg.drva_of(cfg.domain(domain)).name] += 1
    return cfg.drva(min(counts, key=lambda n: (counts[n], list(counts).index(n))))


async def _first_ack(daemon: Any, name: str, t0_wall: float) -> float | None:
    """Seconds from the job's start (wall clock ``t0_wall``) until a recovered VM's first
    write was acknowledged by the DRVA, as its filter timed it; None if none came within
    ``FIRST_ACK_WAIT_S`` (the VMs may not write)."""
    deadline = time.monotonic() + FIRST_ACK_WAIT_S
    while time.monotonic() < deadline:
        view = next((v for v in daemon.hypervisor.views() if v.domain == name), None)
        acked_at = (view.status or {}).get("first_ack_time") if view is not None else None
        if isinstance(acked_at, (int, float)):
            return round(max(0.0, acked_at - t0_wall), 3)
        await asyncio.sleep(0.05)
    log.warning("failover_no_first_ack", domain=name, waited_s=FIRST_ACK_WAIT_S)
    return None
