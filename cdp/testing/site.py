"""A small site for the management tests: cluster + site files on free ports, a file store,
small log partitions.

``make_site`` writes the files and, with ``install``, formats the partitions and writes
protection.json itself (what the daemon needs of ``cdp install``); ``installed_site``
runs the real ``cdp.msa.install.install`` instead (partitions, DRVA configurations,
protection.json, the deployment record in the store).

Domains: ``erp`` (id 1, two disks) and ``web`` (id 2) stream to drva-1; ``files`` (id 3)
to drva-2. ``protect`` says which are protected at install.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp import site_files
from cdp.meta import MetaRepository
from cdp.msa.config import SiteConfig, load_site_config
from cdp.msa.protection import save_protection
from cdp.replog import ReplicationLog
from cdp.testing.drva_config import SECRET, free_port

TOKEN = "test-api-token-0123456789abcdef"
DISK_SIZE = 4 << 20

def inventory_doc(p1: int, p2: int) -> dict[str, Any]:
    return site_files.inventory(
        "site-t", ["esx-01"],
        [site_files.vm("erp-db", "esx-01", [("data", "4MiB"), ("log", "4MiB")]),
         site_files.vm("web-1", "esx-01", [("disk0", "4MiB")]),
         site_files.vm("files", "esx-01", [("disk0", "4MiB")])],
        [site_files.domain("erp", 1, f"127.0.0.1:{p1}", ["erp-db"]),
         site_files.domain("web", 2, f"127.0.0.1:{p1}", ["web-1"]),
         site_files.domain("files", 3, f"127.0.0.1:{p2}", ["files"])],
        state_dir="primaries")


def site_doc(p1: int, p2: int, api: int, *, log_size: str, protect: Iterable[str],
             recovery_roots: list[str], hypervisor: dict[str, Any] | None = None,
             tls: dict[str, Any] | None = None) -> dict[str, Any]:
    drvas = [site_files.drva(name, f"127.0.0.1:{port}", log_path=f"state/{name}/replog", log_size=log_size,
                             meta_path=f"state/{name}/meta", seal_bytes="1MiB", seal_age_s=0.2)
             for name, port in (("drva-1", p1), ("drva-2", p2))]
    return site_files.site(
        "site-t", secret_env="CDP_SITE_SECRET", api_listen=f"127.0.0.1:{api}", token_env="CDP_API_TOKEN",
        recovery_roots=recovery_roots or None, drvas=drvas,
        defaults={"retention": "72h", "rpo_target_s": 60, "consolidate_after": "1h", "consolidate_every": "15m"},
        protect=[{"domain": d, "rpo_target_s": 30} if d == "erp" else d for d in protect],
        alarms={"log_usage_pct": 90, "backpressure_s": 300}, hypervisor=hypervisor, tls=tls)


@dataclass
class Site:
    root: Path
    config_path: Path
    cfg: SiteConfig
    env: dict[str, str]

    @property
    def api(self) -> str:
        return self.cfg.api_url  # https with [tls] on

    @property
    def ssl(self) -> Any:
        """The client context for the API (the site CA) with [tls] on; None otherwise."""
        from cdp.tls import client_context

        return client_context(self.cfg.tls.ca_cert) if self.cfg.tls is not None else None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


def make_site(root: Path, *, protect: Iterable[str] = ("erp",), log_size: str = "8MiB",
              install: bool = True, recovery_roots: Iterable[str] | None = None,
              hypervisor: dict[str, Any] | None = None, tls: dict[str, Any] | None = None) -> Site:
    """``recovery_roots``: the site file's (default: ``root``'s parent, which holds the
    site's store and state directory, where recoveries are refused all the same)."""
    p1, p2, api = free_port(), free_port(), free_port()
    roots = [str(root.parent)] if recovery_roots is None else list(recovery_roots)
    path = site_files.write_site(root, site_doc(p1, p2, api, log_size=log_size, protect=protect, recovery_roots=roots,
                                                      hypervisor=hypervisor, tls=tls),
                                 inventory_doc(p1, p2))
    cfg = load_site_config(path)
    env = {**os.environ, "CDP_SITE_SECRET": SECRET, "CDP_API_TOKEN": TOKEN}
    if install:
        install_site(cfg)
    return Site(root, path, cfg, env)


async def installed_site(root: Path, **options: Any) -> Site:
    """``make_site`` installed by ``cdp install``'s library function."""
    from cdp.msa.install import install

    site = make_site(root, install=False, **options)
    await install(site.cfg, site.env)
    return site


def install_site(cfg: SiteConfig) -> None:
    """What the daemon needs of ``cdp install``: formatted partitions, protection.json."""
    for drva in cfg.drvas:
        drva.log_path.parent.mkdir(parents=True, exist_ok=True)
        ReplicationLog.format(drva.log_path, drva.log_size, label=drva.name)
        MetaRepository.format(drva.meta_path)
    save_protection(cfg, {name: cfg.policy(name) for name in cfg.protect})


@contextlib.asynccontextmanager
async def running_daemon(site: Site, **options: Any) -> AsyncIterator[Any]:
    """The daemon of ``site`` in this event loop (its DRVAs are subprocesses)."""
    from cdp.msa.daemon import MsaDaemon

    daemon = MsaDaemon(site.cfg, site.env, **options)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()
