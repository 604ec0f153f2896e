"""``cdp install`` and ``cdp uninstall``: the seed's Install-JetDR / Uninstall-JetDR.

Both run as root: they write and delete only what they were told they may.

Install, in this order, each step idempotent so a second run (or a run after a crash
half-way) ends in the same state:

0. every directory it will write in — ``state_dir``, ``[tls] dir``, each partition's
   directory — is ours alone, or missing (install creates it): ``cdp.msa.install_dirs``.
   Anything else is refused before anything is written: another user could point our
   writes elsewhere;
1. the bucket / container / root directory exists (``ensure_container``), and no domain
   of this site's inventory has an id whose catalog in the store another site owns
   (``cdp.msa.install_store.foreign_domains``). Sites may share a store — a recovery
   site must reach its protected site's — but a domain id is one domain's in the store;
2. per DRVA: its state directory, its replication-log partition and its metadata
   repository (kept, adopted, formatted or refused, and written down in the install
   record ``<state_dir>/install.json``: ``cdp.msa.install_partitions``), and its
   configuration file ``<state_dir>/drvas/<name>.toml``;
3. with ``[tls] mode = "on"``, the site CA and a certificate for each DRVA and for the
   API (``cdp.pki.ensure_site_pki``, in ``[tls] dir``): kept while good, renewed when
   near expiry, when the names they must hold changed, or when another CA signed them;
   each DRVA's configuration then names its certificate and key (``[tls]``);
4. ``<state_dir>/protection.json`` from the site file's ``[[protect]]``, only if absent:
   the daemon owns it afterwards (``cdp protect`` / ``unprotect``);
5. last, the deployment record ``sites/<site>/deployment.cdpd`` (FORMAT.md §12), so a
   record in the store means a completed installation.

Uninstall (``cdp.msa.install_removal``) removes what install made and only that; with
``purge`` (``cdp.msa.install_purge``) it also deletes the objects of this site's own
domains.

The parts, one job each::

    install_dirs        the directories install and uninstall write in, and whether they may
    install_inspect     what lies at a partition's path, whose it is, is it the one install made
    install_partitions  step 2: keep, adopt, format or refuse each partition
    install_store       the store: foreign domains, other sites, the deployment record
    install_daemon      the daemon msa.pid names, and stopping it
    install_purge       which domains --purge may delete, and deleting them
    install_removal     uninstall

This module keeps the names callers import from it (``install``, ``uninstall``,
``inspect_log``, ...), re-exported below.

Secrets are read from the environment only to check that they are there; no summary,
log line or record holds one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from cdp.durable import atomic_write
from cdp.errors import ConfigError
from cdp.logs import get_logger
from cdp.msa.config import DrvaSpec, SiteConfig
from cdp.msa.deployment import deployment_key, load_install_record
from cdp.msa.install_daemon import DAEMON_STOP_TIMEOUT_S, DaemonState, daemon_state, pid_path, stop_daemon
from cdp.msa.install_dirs import (
    SYMLINK_HOPS_MAX, check_local_dirs, dir_problem, drva_config_path, ensure_dir, jobs_dir,
)
from cdp.msa.install_inspect import (
    KEPT_NOT_MADE, MARK_CHARS_MAX, MARK_XATTR, ROLES, PathState, inspect_log, inspect_meta, label_for,
)
from cdp.msa.install_partitions import install_partition
from cdp.msa.install_purge import DELETE_CONCURRENCY, PurgePlan, domain_usage, purge_plan, registered_kept
from cdp.msa.install_removal import uninstall
from cdp.msa.install_store import (
    Progress, engine_version, foreign_domains, no_progress, open_site_store, other_sites, write_deployment,
)
from cdp.msa.protection import load_protection, protection_path, save_protection
from cdp.pki import ensure_site_pki
from cdp.store.base import ObjectStore

log = get_logger("cdp.msa.install")


def _write_if_changed(path: Path, data: bytes) -> str:
    try:
        if path.read_bytes() == data:
            return "kept"
    except FileNotFoundError:
        pass
    atomic_write(path, data)
    return "written"


def _install_drva_config(cfg: SiteConfig, drva: DrvaSpec, protected: list[str]) -> dict[str, Any]:
    domains = [name for name in protected if cfg.drva_of(cfg.domain(name)) is drva]
    path = drva_config_path(cfg, drva)
    ensure_dir(cfg, "state_dir", cfg.drva_state_dir(drva))
    action = _write_if_changed(path, tomli_w.dumps(cfg.drva_config_doc(drva, domains)).encode())
    return {"path": str(path), "state_dir": str(cfg.drva_state_dir(drva)), "domains": domains,
            "action": action}


def _install_tls(cfg: SiteConfig) -> dict[str, Any] | None:
    """The site's CA and its servers' certificates (``cdp.pki``), when TLS is on."""
    if cfg.tls is None:
        return None
    leaves = [cfg.tls.drva_leaf(d) for d in cfg.drvas] + [cfg.tls.api_leaf(cfg.api_listen)]
    report = ensure_site_pki(cfg.tls.files, cfg.site, leaves)
    changed = [c["cert"] for c in report["certs"] if c["action"] != "kept"]
    log.info("tls_files", dir=report["dir"], ca=report["ca"]["action"], issued=changed)
    return report


def _install_protection(cfg: SiteConfig) -> dict[str, Any]:
    path = protection_path(cfg)
    if path.exists():
        action = "kept"  # the daemon owns it after install; load_protection checks it is ours
    else:
        save_protection(cfg, dict(cfg.protect))
        action = "written"
    return {"path": str(path), "domains": list(load_protection(cfg)), "action": action}


async def install(cfg: SiteConfig, env: Mapping[str, str] = os.environ, *, store: ObjectStore | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Install ``cfg``'s site (module docstring); return what each step did.

    ``store``: use this store instead of opening ``cfg.store_url`` (tests, the daemon).
    """
    progress = progress or no_progress
    cfg.secret(env)  # ConfigError naming the variable: the DRVAs could not start without it
    cfg.api_token(env)
    check_local_dirs(cfg)  # before the store is touched: a refused install leaves nothing behind
    steps = 4 + len(cfg.drvas)
    store, opened = open_site_store(cfg, env, store)
    try:
        progress("store", 0, steps)
        ensure_container = getattr(store, "ensure_container", None)  # optional (cdp.store.base)
        if ensure_container is not None:
            await ensure_container()
        foreign = await foreign_domains(store, cfg)
        if foreign:
            raise ConfigError(f"{store.describe()} holds domain ids of {cfg.cluster_path.name} as another "
                              f"site's: {'; '.join(foreign)} — give this site's domains ids of their own, "
                              f"or point store in {cfg.path} at another bucket or prefix")
        await asyncio.to_thread(check_local_dirs, cfg)  # again, right before: nothing is made in a foreign one
        await asyncio.to_thread(ensure_dir, cfg, "state_dir", cfg.state_dir)
        made = load_install_record(cfg.state_dir, cfg.site)
        tls = await asyncio.to_thread(_install_tls, cfg)  # before the DRVA configurations that name its files
        progress("tls", 1, steps)
        protection = await asyncio.to_thread(_install_protection, cfg)
        progress("protection", 2, steps)
        drvas = []
        for i, drva in enumerate(cfg.drvas):
            log_part = await asyncio.to_thread(install_partition, cfg, drva, i, ROLES["log"], made)
            meta = await asyncio.to_thread(install_partition, cfg, drva, i, ROLES["meta"], made)
            conf = await asyncio.to_thread(_install_drva_config, cfg, drva, protection["domains"])
            drvas.append({"name": drva.name, "listen": str(drva.listen), "log": log_part, "meta": meta,
                          "config": conf})
            progress(f"drva {drva.name}", 3 + i, steps)
        record, record_action = await write_deployment(store, cfg)
        progress("deployment record", steps, steps)
        log.info("installed", site=cfg.site, store=store.describe(), record=record_action)
        return {"site": cfg.site, "store": store.describe(), "state_dir": str(cfg.state_dir),
                "deployment": {"key": deployment_key(cfg.site), "action": record_action, **record.body()},
                "protection": protection, "drvas": drvas, "tls": tls}
    finally:
        if opened:
            await store.close()


__all__ = [
    "DAEMON_STOP_TIMEOUT_S", "DELETE_CONCURRENCY", "KEPT_NOT_MADE", "MARK_CHARS_MAX", "MARK_XATTR",
    "SYMLINK_HOPS_MAX", "DaemonState", "PathState", "Progress", "PurgePlan", "check_local_dirs", "daemon_state",
    "dir_problem", "domain_usage", "drva_config_path", "engine_version", "foreign_domains", "inspect_log",
    "inspect_meta", "install", "jobs_dir", "label_for", "other_sites", "pid_path", "purge_plan", "registered_kept",
    "stop_daemon", "uninstall",
]
