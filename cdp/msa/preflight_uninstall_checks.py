"""``cdp preflight uninstall``: the installation and the daemon, the state directory ours
alone (``dirs``), what uninstall would remove and leave alone (per DRVA and for the
site), and each domain's objects kept or purged.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cdp.errors import ConfigError, NotFound
from cdp.msa.config import DrvaSpec, SiteConfig
from cdp.msa.deployment import (
    MadePartition, deployment_key, install_record_path, load_install_record, read_deployment,
)
from cdp.msa.install_daemon import daemon_state
from cdp.msa.install_dirs import check_state_dir, drva_config_path, jobs_dir, who
from cdp.msa.install_inspect import ROLES, PathState
from cdp.msa.install_purge import domain_usage, registered_kept
from cdp.msa.install_removal import drva_dir_kept, drva_dir_plan, kept_not_made, leftover_children, made_verdict
from cdp.msa.preflight_check import (
    STORE_OP_TIMEOUT_S, Check, Progress, _no_progress, _open_store, _run_checks, _state_dir_refused, _when,
    _within, format_size, summarize,
)
from cdp.msa.protection import protection_path
from cdp.store.base import ObjectStore


def check_state_dirs(cfg: SiteConfig) -> Check:
    """``state_dir`` (and its job records) ours alone: uninstall reads the daemon's pid
    file and the install record there, and refuses the directory otherwise."""
    check_state_dir(cfg)  # a ConfigError is this check's failure (_run_checks)
    return Check("dirs", "pass", f"{cfg.state_dir}: missing or owned by {who(os.geteuid())} or root and "
                 "writable by no other user", {"dirs": [str(cfg.state_dir), str(jobs_dir(cfg))]})


def _files_bytes(paths: list[Path]) -> tuple[int, int]:
    files = size = 0
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            files += 1
            size += st.st_size
    return files, size


Verdicts = tuple[list[tuple[MadePartition, PathState]], list[dict[str, Any]]]


def _partition_verdicts(cfg: SiteConfig, made: dict[str, MadePartition]) -> Verdicts:
    """What uninstall would do with the partitions: (the install record's entries it
    would remove, each with what lies there; the partitions it would leave alone, each
    with why). The same verdicts uninstall acts on (``cdp.msa.install_removal``)."""
    remove: list[tuple[MadePartition, PathState]] = []
    left: list[dict[str, Any]] = []
    for entry in sorted(made.values(), key=lambda m: m.path):
        state, why = made_verdict(entry)
        if why is not None:
            left.append({"path": entry.path, "why": why})
        elif state is not None:
            remove.append((entry, state))
    return remove, left + kept_not_made(cfg, made)


def check_removal(cfg: SiteConfig, drva: DrvaSpec) -> Check:
    """What uninstall would remove for one DRVA — its configuration, its state directory,
    the partitions the install record names that still are the files install made — and
    what it would leave alone, with why (``details.left_alone``: as uninstall says it)."""
    made = load_install_record(cfg.state_dir, cfg.site)
    remove_all, left_all = _partition_verdicts(cfg, made)
    remove: list[str] = []
    conf = drva_config_path(cfg, drva)
    if conf.exists():
        remove.append(f"config {conf}")
    state_dir = cfg.drva_state_dir(drva)
    mine = {str(role.path(drva)) for role in ROLES.values()} | {m.path for m in made.values() if m.drva == drva.name}
    left = [e for e in left_all if e["path"] in mine]
    files, size = _files_bytes(drva_dir_plan(cfg, drva)[0])
    why = drva_dir_kept(cfg, drva, {entry.path for entry, _ in remove_all})
    if why is not None:
        if files:
            remove.append(f"the DRVA's status and requests in {state_dir} ({files} files, {format_size(size)})")
        left.append({"path": str(state_dir), "why": why})
    elif state_dir.exists():
        remove.append(f"state dir {state_dir} ({files} files, {format_size(size)})")
    remove += [f"{ROLES[entry.role].what} {entry.path} ({format_size(state.size)})"
               for entry, state in remove_all if entry.drva == drva.name]
    leave = [f"{e['path']} ({e['why']})" for e in left]
    details = {"remove": remove, "leave": leave, "left_alone": left}
    text = f"would remove {'; '.join(remove)}" if remove else "nothing to remove"
    if leave:
        return Check(f"remove.{drva.name}", "warn", f"{text}; would leave {'; '.join(leave)}", details)
    return Check(f"remove.{drva.name}", "pass", text, details)


def check_site_removal(cfg: SiteConfig, installed: bool) -> Check:
    """What uninstall would remove for the whole site: protection.json, the install
    record (and any partition it names of a DRVA no longer in the site file), the
    deployment record; it keeps the job history."""
    made = load_install_record(cfg.state_dir, cfg.site)
    configured = {d.name for d in cfg.drvas}
    remove_all, left_all = _partition_verdicts(cfg, made)
    remove = [f"{ROLES[entry.role].what} {entry.path} of DRVA {entry.drva} (no longer in the site file)"
              for entry, _ in remove_all if entry.drva not in configured]
    left = [e for e in left_all if e["path"] in made and made[e["path"]].drva not in configured]
    leave = [f"{e['path']} ({e['why']})" for e in left]
    if protection_path(cfg).exists():
        remove.append(f"{protection_path(cfg)}")
    if install_record_path(cfg.state_dir).exists():
        remove.append(f"the install record {install_record_path(cfg.state_dir)}")
    if installed:
        remove.append(f"the deployment record {deployment_key(cfg.site)}")
    text = f"would remove {', '.join(remove)}" if remove else "nothing to remove"
    details = {"remove": remove, "keep": [str(jobs_dir(cfg))], "leave": leave, "left_alone": left}
    if leave:
        return Check("remove.site", "warn", f"{text}; would leave {'; '.join(leave)}; keeps the job history "
                     f"{jobs_dir(cfg)}", details)
    return Check("remove.site", "pass", f"{text}; keeps the job history {jobs_dir(cfg)}", details)


async def check_kept_data(cfg: SiteConfig, store: ObjectStore) -> list[Check]:
    """Each domain's objects: kept by uninstall, deleted by ``--purge`` — unless purge
    leaves them alone (another site's, or a catalog that cannot be read: a warning,
    saying why), or a failover registered the domain here."""
    usage = await _within(domain_usage(store, cfg), STORE_OP_TIMEOUT_S * 10)
    checks = []
    for u in usage:
        held = f"{u['objects']} objects, {format_size(u['bytes'])} under {u['prefix']}"
        if u["purge"]:
            checks.append(Check(f"keep.{u['domain']}", "pass", f"{held}: kept (deleted with --purge)", u))
        else:
            checks.append(Check(f"keep.{u['domain']}", "warn", f"{held}: kept, even with --purge: {u['why']}", u))
    for r in registered_kept(cfg):
        checks.append(Check(f"keep.{r['domain']}", "pass", f"kept, even with --purge: {r['why']}", r))
    return checks


async def preflight_uninstall(cfg: SiteConfig, env: Mapping[str, str] = os.environ,
                              progress: Progress | None = None, *, store: ObjectStore | None = None) -> dict[str, Any]:
    """``cdp preflight uninstall``."""
    progress = progress or _no_progress
    try:
        store_, opened = _open_store(cfg, env, store)
    except ConfigError as exc:
        return summarize("uninstall", [Check("installation", "fail", exc.message)], site=cfg.site,
                         config=str(cfg.path))
    installed = False
    try:
        async def installation() -> Check:
            nonlocal installed
            where = store_.describe()
            try:
                record = await _within(read_deployment(store_, cfg.site))
            except NotFound:
                record = None
            except TimeoutError:
                return Check("installation", "fail", f"{where}: no answer within {STORE_OP_TIMEOUT_S:g} s")
            if record is None:
                return Check("installation", "warn", f"{where}: no deployment record of {cfg.site}: not "
                             "installed, or already uninstalled (uninstall is idempotent)")
            installed = True
            return Check("installation", "pass", f"{where}: {cfg.site} installed {_when(record.created_ns)} "
                         f"by cdp-engine {record.engine_version}, {len(record.drvas)} DRVAs", record.body())

        def daemon() -> Check:
            state = daemon_state(cfg)
            if state.running:
                return Check("daemon", "warn", f"{state.note}: uninstall stops it (SIGTERM) first",
                             state.to_dict())
            hosts, others = leftover_children(cfg)  # a running daemon stops its own children
            if hosts or others:
                left = [one.to_dict() for one in hosts + others]
                pids = ", ".join(str(one["pid"]) for one in left)
                return Check("daemon", "warn", f"not running ({state.note}), but {len(left)} of its processes are "
                             f"(pid {pids}): uninstall stops them (SIGTERM, then SIGKILL) first",
                             state.to_dict() | {"leftovers": left})
            return Check("daemon", "pass", f"not running ({state.note})", state.to_dict())

        async def kept() -> list[Check]:
            return await check_kept_data(cfg, store_)

        steps: list[tuple[str, Callable[[], Any]]] = [("installation", installation),
                                                      ("dirs", lambda: check_state_dirs(cfg))]
        if not _state_dir_refused(cfg):  # else uninstall stops there: nothing below is read or removed
            steps += [("daemon", daemon)]
            steps += [(f"remove.{d.name}", lambda d=d: check_removal(cfg, d)) for d in cfg.drvas]
            steps += [("remove.site", lambda: check_site_removal(cfg, installed))]
        steps += [("keep", kept)]
        checks = await _run_checks(steps, progress)
    finally:
        if opened:
            await store_.close()
    return summarize("uninstall", checks, site=cfg.site, config=str(cfg.path))
