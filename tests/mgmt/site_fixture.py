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
import json
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.meta import MetaRepository
from cdp.msa.config import SiteConfig, load_site_config
from cdp.msa.protection import save_protection
from cdp.replog import ReplicationLog
from tests.drva.harness import SECRET, free_port

TOKEN = "test-api-token-0123456789abcdef"
DISK_SIZE = 4 << 20

CLUSTER = """\
site = "site-t"
state_dir = "primaries"

[[hosts]]
name = "esx-01"

[[vms]]
name = "erp-db"
host = "esx-01"
disks = [{{ name = "data", size = "4MiB" }}, {{ name = "log", size = "4MiB" }}]

[[vms]]
name = "web-1"
host = "esx-01"
disks = [{{ name = "disk0", size = "4MiB" }}]

[[vms]]
name = "files"
host = "esx-01"
disks = [{{ name = "disk0", size = "4MiB" }}]

[[domains]]
name = "erp"
id = 1
drva = "127.0.0.1:{p1}"
vms = ["erp-db"]

[[domains]]
name = "web"
id = 2
drva = "127.0.0.1:{p1}"
vms = ["web-1"]

[[domains]]
name = "files"
id = 3
drva = "127.0.0.1:{p2}"
vms = ["files"]
"""

SITE = """\
site = "site-t"
cluster = "cluster.toml"
store = "store"
state_dir = "state"
secret_env = "CDP_SITE_SECRET"
{recovery_roots}
[api]
listen = "127.0.0.1:{api}"
token_env = "CDP_API_TOKEN"

[[drvas]]
name = "drva-1"
listen = "127.0.0.1:{p1}"
log = {{ path = "state/drva-1/replog", size = "{log_size}" }}
meta = {{ path = "state/drva-1/meta" }}
seal = {{ bytes = "1MiB", age_s = 0.2 }}

[[drvas]]
name = "drva-2"
listen = "127.0.0.1:{p2}"
log = {{ path = "state/drva-2/replog", size = "{log_size}" }}
meta = {{ path = "state/drva-2/meta" }}
seal = {{ bytes = "1MiB", age_s = 0.2 }}

[defaults]
retention = "72h"
rpo_target_s = 60
consolidate_after = "1h"
consolidate_every = "15m"

{protect}
[alarms]
log_usage_pct = 90
backpressure_s = 300
"""


@dataclass
class Site:
    root: Path
    config_path: Path
    cfg: SiteConfig
    env: dict[str, str]

    @property
    def api(self) -> str:
        return f"http://{self.cfg.api_listen}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


def make_site(root: Path, *, protect: Iterable[str] = ("erp",), log_size: str = "8MiB",
              install: bool = True, recovery_roots: Iterable[str] | None = None) -> Site:
    """``recovery_roots``: the site file's (default: ``root``'s parent, which holds the
    site's store and state directory, where recoveries are refused all the same)."""
    root.mkdir(parents=True, exist_ok=True)
    p1, p2, api = free_port(), free_port(), free_port()
    (root / "cluster.toml").write_text(CLUSTER.format(p1=p1, p2=p2))
    tables = "".join(f'[[protect]]\ndomain = "{d}"\n' + ("rpo_target_s = 30\n" if d == "erp" else "") + "\n"
                     for d in protect)
    path = root / "site.toml"
    roots = [str(root.parent)] if recovery_roots is None else list(recovery_roots)
    path.write_text(SITE.format(p1=p1, p2=p2, api=api, log_size=log_size, protect=tables,
                                recovery_roots=f"recovery_roots = {json.dumps(roots)}\n" if roots else ""))
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
