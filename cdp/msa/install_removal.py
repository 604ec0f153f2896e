"""``cdp uninstall``: remove what ``cdp install`` made, and only that.

Uninstall stops the daemon (SIGTERM to the process ``<state_dir>/msa.pid`` names, only
if it is the process that wrote it: same pid *and* start time; then waits:
``cdp.msa.install_daemon``), removes what install made — DRVA configurations and state
directories, the partitions the install record names while they still are the files it
made, the record, protection.json, the deployment record — and keeps
``<state_dir>/jobs`` (job history has its own retention), the TLS directory (the site
CA: a reinstall keeps trusting it), every partition install did not make, and every
replicated object, unless ``purge`` (``cdp.msa.install_purge``).

``made_verdict``, ``kept_not_made`` and ``drva_dir_kept`` only read: ``cdp preflight
uninstall`` asks them what uninstall would remove and keep, so the two say the same.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdp.durable import fsync_dir
from cdp.errors import NotFound
from cdp.logs import get_logger
from cdp.msa.config import DrvaSpec, SiteConfig
from cdp.msa.deployment import MadePartition, deployment_key, install_record_path, load_install_record
from cdp.msa.install_daemon import DAEMON_STOP_TIMEOUT_S, daemon_state, pid_path, stop_daemon
from cdp.msa.install_dirs import dir_problem, drva_config_path, jobs_dir
from cdp.msa.install_inspect import KEPT_NOT_MADE, ROLES, PathState, made_problem
from cdp.msa.install_purge import domain_usage, purge_domains, purge_plan, registered_kept
from cdp.msa.install_store import Progress, no_progress, open_site_store
from cdp.msa.protection import protection_path
from cdp.store.base import ObjectStore

log = get_logger("cdp.msa.install")  # install and uninstall log as one, whichever module acts

Entries = list[dict[str, Any]]


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


def _uninstall_drva(cfg: SiteConfig, drva: DrvaSpec, left: Entries) -> tuple[Entries, Entries]:
    """Remove one DRVA's configuration and state directory (unless it holds a partition
    left alone); return (removed, left alone) entries."""
    removed: Entries = []
    kept: Entries = []
    conf = drva_config_path(cfg, drva)
    if conf.exists():
        conf.unlink()
        removed.append({"path": str(conf), "what": f"configuration of DRVA {drva.name}"})
    state_dir = cfg.drva_state_dir(drva)
    why = drva_dir_kept(cfg, drva, left)
    if why is not None:
        kept.append({"path": str(state_dir), "why": why})
    elif state_dir.exists():
        shutil.rmtree(state_dir)
        removed.append({"path": str(state_dir), "what": f"state directory of DRVA {drva.name}"})
    return removed, kept


def drva_dir_kept(cfg: SiteConfig, drva: DrvaSpec, left: Entries) -> str | None:
    """Why uninstall keeps ``drva``'s state directory — it holds a partition left alone
    (``left``), or is a symbolic link — or None. Reads only."""
    state_dir = cfg.drva_state_dir(drva)
    if state_dir.is_symlink():  # install made a directory: never follow a link planted in its place
        return "a symbolic link, not the directory install made: not followed, not removed"
    keep_inside = [e["path"] for e in left if state_dir.resolve() in Path(e["path"]).resolve().parents]
    if keep_inside:
        return f"holds {', '.join(keep_inside)}: not removed"
    return None


async def uninstall(cfg: SiteConfig, purge: bool = False, env: Mapping[str, str] = os.environ, *,
                    store: ObjectStore | None = None, progress: Progress | None = None,
                    stop_timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> dict[str, Any]:
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
        made = load_install_record(cfg.state_dir, cfg.site)
        removed, left = await asyncio.to_thread(_uninstall_partitions, cfg, made)
        for drva in cfg.drvas:
            r, lf = await asyncio.to_thread(_uninstall_drva, cfg, drva, left)
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
        return {"site": cfg.site, "store": store.describe(), "purge": purge, "daemon": daemon.to_dict(),
                "removed": removed, "left_alone": left, "kept": kept, "purged": purged}
    finally:
        if opened:
            await store.close()


__all__ = ["drva_dir_kept", "kept_not_made", "made_verdict", "uninstall"]
