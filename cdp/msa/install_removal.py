"""``cdp uninstall``: remove what ``cdp install`` made, and only that.

Uninstall stops the daemon (SIGTERM to the process ``<state_dir>/msa.pid`` names, only
if it is the process that wrote it: same pid *and* start time; then waits:
``cdp.msa.install_daemon``), then whatever children a killed daemon left running — the
DRVAs, simulated hosts and standbys its pid files (``logs/*.pid``) or their command
lines name (``cdp.msa.processes.find_leftovers``): a DRVA left running on a partition
uninstall unlinks would go on acknowledging writes into a file that no longer exists.
One that outlives SIGKILL stops uninstall (``Busy``) before anything is removed.

It then removes what install made — DRVA configurations, the partitions the install
record names while they still are the files it made, the record, protection.json, the
deployment record — and from each DRVA's state directory what the DRVA writes there
(``status.json``, ``requests/``: ``drva_dir_plan``), the directory itself only once
empty. It keeps ``<state_dir>/jobs`` (job history has its own retention), the TLS
directory (the site CA: a reinstall keeps trusting it), every partition install did not
make, anything else found in a DRVA's state directory (a store, a TLS directory or VM
images someone put there: the site file refuses that, an older one may not have), and
every replicated object, unless ``purge`` (``cdp.msa.install_purge``).

``made_verdict``, ``kept_not_made``, ``drva_dir_plan``, ``drva_dir_kept`` and
``leftover_children`` only read: ``cdp preflight uninstall`` asks them what uninstall
would stop, remove and keep, so the two say the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from cdp.durable import fsync_dir
from cdp.errors import Busy, NotFound
from cdp.hypervisor.simulator import host_args
from cdp.logs import get_logger
from cdp.msa.config import DrvaSpec, SiteConfig
from cdp.msa.deployment import MadePartition, deployment_key, install_record_path, load_install_record
from cdp.msa.install_daemon import DAEMON_STOP_TIMEOUT_S, DaemonState, daemon_state, pid_path, stop_daemon
from cdp.msa.install_dirs import dir_error, dir_problem, drva_config_path, jobs_dir
from cdp.msa.install_inspect import KEPT_NOT_MADE, ROLES, PathState, made_problem
from cdp.msa.install_purge import domain_usage, purge_domains, purge_plan, registered_kept
from cdp.msa.install_store import Progress, no_progress, open_site_store
from cdp.msa.keeper import STOP_TIMEOUT_S, Leftover, find_leftovers, stop_leftovers
from cdp.msa.protection import protection_path
from cdp.msa.standby import standby_args
from cdp.msa.supervisor import drva_args
from cdp.store.base import ObjectStore

log = get_logger("cdp.msa.install")  # install and uninstall log as one, whichever module acts

Entries = list[dict[str, Any]]

#: What a DRVA writes in its state directory (drva/config.py ``status_path``; FORMAT.md
#: §13.4, §13.6), each also as ``cdp.durable.atomic_write``'s temporary ``.tmp-<name>-*``:
#: uninstall removes these, and nothing else there.
DRVA_STATE_FILES = ("status.json",)
REQUESTS_DIR = "requests"  # drva/requests.py ``requests_dir``
REQUEST_FILES = ("mark-*.json",)
KEPT_SHOWN_MAX = 8  # a message names this many entries kept in a DRVA's state directory, then counts


def _rmdir_if_empty(directory: Path, within: Path) -> None:
    """Remove ``directory`` and its empty parents, never leaving ``within``."""
    within = within.resolve()
    directory = directory.resolve()
    while directory != within and within in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _wipe_headers(path: Path, length: int, offsets: tuple[int, ...]) -> None:
    """Make a block device blank again where a format's headers go (it cannot be deleted)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in offsets:
            os.pwrite(fd, bytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)



def made_verdict(made: MadePartition) -> tuple[PathState | None, str | None]:
    """What lies at the path of a partition the install record names, and why uninstall
    keeps it (None: uninstall removes it). (None, None): nothing is there any more.
    Reads only."""
    role = ROLES[made.role]
    path = Path(made.path)
    if not os.path.lexists(path):
        return None, None
    if (problem := dir_problem(path.parent)) is not None:  # a path others control may lead elsewhere
        return None, f"{role.what} of DRVA {made.drva}: kept: {problem}"
    state = role.inspect(path, made.drva, None)
    if (why := made_problem(made, state)) is not None:
        return state, f"{state.what}: {KEPT_NOT_MADE}: {why}"
    return state, None


def _remove_made(cfg: SiteConfig, made: MadePartition) -> tuple[Entries, Entries]:
    """Remove (a file) or blank (a device) a partition install made, if it still is the
    one it made (``made_verdict``); return (removed, left alone) entries."""
    role = ROLES[made.role]
    path = Path(made.path)
    state, kept = made_verdict(made)
    if kept is not None:
        return [], [{"path": made.path, "why": kept}]
    if state is None:
        return [], []
    if made.kind == "file":
        path.unlink()
        fsync_dir(path.parent)
        action = "removed"
        _rmdir_if_empty(path.parent, cfg.state_dir)
    else:
        _wipe_headers(path, role.wipe_length, role.wipe_offsets)
        action = "wiped (block device)"
    log.info("partition_removed", drva=made.drva, path=made.path, what=role.what)
    return [{"path": made.path, "what": f"{role.what} of DRVA {made.drva}", "size": state.size,
             "action": action}], []


def kept_not_made(cfg: SiteConfig, made: dict[str, MadePartition], drvas: list[DrvaSpec] | None = None) -> Entries:
    """The configured partitions (of ``drvas``, default all) that exist and that the
    install record does not name: uninstall leaves them alone. Reads only."""
    left: Entries = []
    for drva in cfg.drvas if drvas is None else drvas:
        for role in ROLES.values():
            path = role.path(drva)
            state = role.inspect(path, drva.name, cfg.site)
            if str(path) not in made and state.exists:
                left.append({"path": str(path), "why": f"{state.what}: {KEPT_NOT_MADE}"})
    return left


def _uninstall_partitions(cfg: SiteConfig, made: dict[str, MadePartition]) -> tuple[Entries, Entries]:
    """Remove what the install record names (``_remove_made``); say which configured
    partitions stay because install did not make them."""
    removed: Entries = []
    left: Entries = []
    for entry in sorted(made.values(), key=lambda m: m.path):
        r, lf = _remove_made(cfg, entry)
        removed += r
        left += lf
    return removed, left + kept_not_made(cfg, made)


def _written_by_drva(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f".tmp-{p}-*") for p in patterns)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def drva_dir_plan(cfg: SiteConfig, drva: DrvaSpec) -> tuple[list[Path], list[Path]]:
    """(what ``drva`` wrote in its state directory — regular files named as in
    ``DRVA_STATE_FILES``, the ``requests/`` directory and its requests — in the order
    uninstall removes it; every other entry there, which uninstall keeps). Nothing
    inside a kept entry is looked at: a directory someone put there is kept whole.
    A state directory that is a symbolic link has nothing of the DRVA's. Reads only."""
    state_dir = cfg.drva_state_dir(drva)
    if state_dir.is_symlink():
        return [], []
    remove: list[Path] = []
    keep: list[Path] = []
    for entry in _entries(state_dir):
        path = Path(entry.path)
        if entry.name == REQUESTS_DIR and entry.is_dir(follow_symlinks=False):
            box = [(Path(e.path), e.is_file(follow_symlinks=False) and _written_by_drva(e.name, REQUEST_FILES))
                   for e in _entries(path)]
            remove += [p for p, ours in box if ours]
            keep += [p for p, ours in box if not ours]
            if all(ours for _, ours in box):
                remove.append(path)  # empty once its requests are gone
        elif entry.is_file(follow_symlinks=False) and _written_by_drva(entry.name, DRVA_STATE_FILES):
            remove.append(path)
        else:
            keep.append(path)
    return remove, keep


def drva_dir_kept(cfg: SiteConfig, drva: DrvaSpec, removing: Collection[str] = ()) -> str | None:
    """Why uninstall keeps ``drva``'s state directory — a symbolic link (nothing in it
    touched), or it holds more than the DRVA wrote (``drva_dir_plan``), besides the
    ``removing`` paths (the partitions uninstall removes first) — or None. Reads only."""
    state_dir = cfg.drva_state_dir(drva)
    if state_dir.is_symlink():  # install made a directory: never follow a link planted in its place
        return "a symbolic link, not the directory install made: not followed, not removed"
    keep = [p for p in drva_dir_plan(cfg, drva)[1] if str(p) not in removing]
    if not keep:
        return None
    names = [str(p.relative_to(state_dir)) for p in keep[:KEPT_SHOWN_MAX]]
    more = f" and {len(keep) - KEPT_SHOWN_MAX} more" if len(keep) > KEPT_SHOWN_MAX else ""
    return (f"holds {', '.join(names)}{more}, which the DRVA did not write: kept, with the directory "
            f"(only its status.json and requests are removed)")


def _uninstall_drva(cfg: SiteConfig, drva: DrvaSpec) -> tuple[Entries, Entries]:
    """Remove one DRVA's configuration and what it wrote in its state directory, then
    the directory if that left it empty (``drva_dir_plan``); return (removed, left
    alone) entries."""
    removed: Entries = []
    kept: Entries = []
    conf = drva_config_path(cfg, drva)
    if conf.exists():
        conf.unlink()
        removed.append({"path": str(conf), "what": f"configuration of DRVA {drva.name}"})
    state_dir = cfg.drva_state_dir(drva)
    remove, _ = drva_dir_plan(cfg, drva)
    for path in remove:
        if path.name != REQUESTS_DIR:
            path.unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError):  # not empty after all: kept, and said so below
                path.rmdir()
    why = drva_dir_kept(cfg, drva)
    if why is None and os.path.isdir(state_dir):
        try:
            state_dir.rmdir()
        except OSError as exc:  # something appeared since: kept
            why = f"cannot be removed: {exc.strerror}"
        else:
            removed.append({"path": str(state_dir), "what": f"state directory of DRVA {drva.name}"})
            return removed, kept
    if remove:
        removed.append({"path": str(state_dir), "what": f"status and requests of DRVA {drva.name} "
                        f"({len(remove)} entries)"})
    if why is not None:
        kept.append({"path": str(state_dir), "why": why})
    return removed, kept


def child_args(cfg: SiteConfig) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The arguments (after the interpreter) the daemon's children of ``cfg`` start with:
    (the simulated hosts', everyone else's: the DRVAs', the standbys')."""
    hosts = {h.name for h in cfg.cluster.hosts} | set(cfg.hypervisor.on_demand_hosts)
    hosts |= {e.name.removesuffix(".toml") for e in _entries(cfg.state_dir / "hypervisor") if e.name.endswith(".toml")}
    others = [drva_args(drva_config_path(cfg, d)) for d in cfg.drvas] + [standby_args(cfg.path)]
    return [host_args(cfg.state_dir / "hypervisor" / f"{h}.toml") for h in sorted(hosts)], others


def leftover_children(cfg: SiteConfig) -> tuple[list[Leftover], list[Leftover]]:
    """The children a killed daemon left running (``cdp.msa.processes.find_leftovers``):
    (the simulated hosts, the rest). ``ConfigError`` when ``<state_dir>/logs`` is not
    ours alone: a pid file there could name any process. Reads only."""
    logs = cfg.state_dir / "logs"
    if (problem := dir_problem(logs)) is not None:
        raise dir_error(cfg, "state_dir", logs, problem, "cdp uninstall stops the processes its pid files name")
    hosts, others = child_args(cfg)
    found_hosts = find_leftovers(logs, "host-*.pid", hosts)
    seen = {one.pid for one in found_hosts}
    found_others = [one for one in find_leftovers(logs, "*.pid", hosts + others) if one.pid not in seen]
    return found_hosts, found_others


async def _stop_children(cfg: SiteConfig, timeout_s: float) -> list[Leftover]:
    """Stop the children a killed daemon left running, hosts first (their filters drain
    into the DRVAs, as at the daemon's own stop); ``Busy`` naming any that outlived
    SIGKILL, before anything is removed."""
    hosts, others = await asyncio.to_thread(leftover_children, cfg)
    for group in (hosts, others):
        survivors = await stop_leftovers(group, timeout_s)
        if survivors:
            raise Busy(f"processes the daemon left running outlived SIGKILL: {'; '.join(survivors)}; uninstall "
                       f"removed nothing: stop them and run it again")
    return hosts + others


def _daemon_report(daemon: DaemonState, stopped: list[Leftover]) -> dict[str, Any]:
    out = daemon.to_dict()
    out["leftovers"] = [one.to_dict() for one in stopped]
    if stopped:
        pids = ", ".join(str(one.pid) for one in stopped)
        out["note"] += f"; stopped {len(stopped)} processes it had left running (pid {pids})"
    return out


async def uninstall(cfg: SiteConfig, purge: bool = False, env: Mapping[str, str] = os.environ, *,
                    store: ObjectStore | None = None, progress: Progress | None = None,
                    stop_timeout_s: float = DAEMON_STOP_TIMEOUT_S,
                    child_stop_timeout_s: float = STOP_TIMEOUT_S) -> dict[str, Any]:
    """Uninstall ``cfg``'s site (module docstring); return what was removed and kept."""
    progress = progress or no_progress
    store, opened = open_site_store(cfg, env, store)
    try:
        progress("store", 0, None)
        key = deployment_key(cfg.site)
        try:  # reach the store before touching anything local; a damaged record goes too
            await store.stat(key)
            installed = True
        except NotFound:  # no record, or no bucket at all
            installed = False
        progress("daemon", 0, None)
        daemon = await stop_daemon(cfg, stop_timeout_s)  # ConfigError first if state_dir is not ours alone
        stopped = await _stop_children(cfg, child_stop_timeout_s)  # before their partitions go
        made = load_install_record(cfg.state_dir, cfg.site)
        removed, left = await asyncio.to_thread(_uninstall_partitions, cfg, made)
        for drva in cfg.drvas:
            r, lf = await asyncio.to_thread(_uninstall_drva, cfg, drva)
            removed += r
            left += lf
        _rmdir_if_empty(cfg.state_dir / "drvas", cfg.state_dir)
        if install_record_path(cfg.state_dir).exists():  # last: a rerun after a crash still knows
            install_record_path(cfg.state_dir).unlink()
            removed.append({"path": str(install_record_path(cfg.state_dir)), "what": "install record"})
        if protection_path(cfg).exists():
            protection_path(cfg).unlink()
            removed.append({"path": str(protection_path(cfg)), "what": "protected domains"})
        if pid_path(cfg).exists() and not daemon_state(cfg).running:  # left by a crashed daemon
            pid_path(cfg).unlink()
            removed.append({"path": str(pid_path(cfg)), "what": "stale daemon pid file"})
        if installed:
            await store.delete(key)
            removed.append({"key": key, "what": "deployment record"})
        plan = await purge_plan(store, cfg)
        left += plan.skipped  # said either way: --purge would not delete them
        purged = await purge_domains(store, cfg, plan, progress) if purge else None
        # The site CA stays: a reinstall keeps it, so the peers and clients that trust it
        # need nothing new (FORMAT.md §20 says how to replace it).
        kept = {"jobs": str(jobs_dir(cfg)), "tls": str(cfg.tls.dir) if cfg.tls is not None else None,
                "domains": [] if purge else [u for u in await domain_usage(store, cfg, plan) if u["purge"]],
                "registered": registered_kept(cfg)}
        log.info("uninstalled", site=cfg.site, purge=purge, removed=len(removed))
        return {"site": cfg.site, "store": store.describe(), "purge": purge, "daemon": _daemon_report(daemon, stopped),
                "removed": removed, "left_alone": left, "kept": kept, "purged": purged}
    finally:
        if opened:
            await store.close()


__all__ = ["child_args", "drva_dir_kept", "drva_dir_plan", "kept_not_made", "leftover_children", "made_verdict",
           "uninstall"]
