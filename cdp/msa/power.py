"""Which domains' VMs the site runs: ``<state_dir>/power.json`` (FORMAT.md §13.3).

``cdp power DOMAIN on|off`` and a failover change it; the daemon hands it to the
hypervisor driver (``cdp.hypervisor``) at start and at every change, so VMs that were
running run again after a restart of the MSA. Replaced atomically; missing means none::

    {"version": 1, "site": "site-b", "on": ["erp"]}
"""

from __future__ import annotations

import json
from pathlib import Path

from cdp.durable import atomic_write
from cdp.errors import ConfigError
from cdp.msa.config import SiteConfig
from cdp.msa.install_dirs import make_missing_dirs
from cdp.small_file import read_json_file

POWER_VERSION = 1
POWER_BYTES_MAX = 1 << 20  # a list of domain names; anything larger was not written by the MSA


def power_path(cfg: SiteConfig) -> Path:
    return cfg.state_dir / "power.json"


def load_power(cfg: SiteConfig) -> list[str]:
    """The powered-on domains, in the order they were powered on."""
    path = power_path(cfg)
    doc = read_json_file(path, POWER_BYTES_MAX, "a power record")
    if doc is None:
        return []
    if (not isinstance(doc, dict) or doc.get("version") != POWER_VERSION or not isinstance(doc.get("on"), list)
            or not all(isinstance(d, str) for d in doc["on"])):
        raise ConfigError(f"{path}: expected {{'version': {POWER_VERSION}, 'site', 'on': [domain, ...]}}")
    if doc.get("site") != cfg.site:
        raise ConfigError(f"{path}: belongs to site {doc.get('site')!r}, the site file says {cfg.site!r}")
    for name in doc["on"]:
        cfg.domain(name)  # a domain the inventory no longer has is an error, not a silent drop
    return list(dict.fromkeys(doc["on"]))


def save_power(cfg: SiteConfig, on: list[str]) -> None:
    make_missing_dirs(cfg.state_dir)
    atomic_write(power_path(cfg), json.dumps({"version": POWER_VERSION, "site": cfg.site, "on": on}).encode())
