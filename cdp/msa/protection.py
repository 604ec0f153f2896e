"""Which domains are protected now: ``<state_dir>/protection.json`` (FORMAT.md §13).

``cdp install`` writes it from the site file's ``[[protect]]`` tables; ``cdp protect`` and
``cdp unprotect`` (through the daemon) change it. Each entry holds the domain's policy
(``Policy`` fields), so a policy given at protect time survives restarts. The file is
replaced atomically; a missing file means nothing is protected (not installed).

::

    {"version": 1, "site": "site-a",
     "domains": {"erp": {"retention_s": 259200.0, "rpo_target_s": 30.0,
                         "consolidate_after_s": 3600.0, "consolidate_every_s": 900.0}}}
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from cdp.durable import atomic_write
from cdp.errors import ConfigError
from cdp.msa.config import POLICY_FIELDS, Policy, SiteConfig, policy_value
from cdp.msa.install_dirs import make_missing_dirs
from cdp.small_file import read_json_file

PROTECTION_VERSION = 1
PROTECTION_BYTES_MAX = 4 << 20  # a few hundred bytes per domain; anything larger was not written by the MSA
_POLICY_FIELDS = {f.name for f in fields(Policy)}


def protection_path(cfg: SiteConfig) -> Path:
    return cfg.state_dir / "protection.json"


def load_protection(cfg: SiteConfig) -> dict[str, Policy]:
    """The protected domains and their policies, in protection order ({} when none)."""
    path = protection_path(cfg)
    doc = read_json_file(path, PROTECTION_BYTES_MAX, "a protection record")
    if doc is None:
        return {}
    if not isinstance(doc, dict) or doc.get("version") != PROTECTION_VERSION or not isinstance(doc.get("domains"), dict):
        raise ConfigError(f"{path}: expected {{'version': {PROTECTION_VERSION}, 'site', 'domains': {{...}}}}")
    if doc.get("site") != cfg.site:
        raise ConfigError(f"{path}: belongs to site {doc.get('site')!r}, the site file says {cfg.site!r}")
    out = {}
    for name, p in doc["domains"].items():
        if not isinstance(p, dict) or set(p) != _POLICY_FIELDS:
            raise ConfigError(f"{path}: domains.{name}: expected the keys {sorted(_POLICY_FIELDS)}")
        cfg.domain(name)  # a domain the cluster file no longer has is an error, not a silent drop
        out[name] = Policy(**{k: _stored_seconds(path, name, k, v) for k, v in p.items()})
    return out


def _stored_seconds(path: Path, domain: str, field_name: str, value: object) -> float:
    """A stored policy field, held to the bounds a protect request is (a hand-edited
    ``"retention_s": "x"`` or ``1e308`` stopped the MSA with a traceback, or ran it with
    a policy no request could set)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: domains.{domain}.{field_name}: expected a number of seconds, got {value!r:.80}")
    try:
        return policy_value(_REQUEST_KEY[field_name], value)
    except ConfigError as exc:
        raise ConfigError(f"{path}: domains.{domain}.{field_name}: {exc}") from None


_REQUEST_KEY = {field_name: key for key, field_name in POLICY_FIELDS.items()}


def save_protection(cfg: SiteConfig, domains: dict[str, Policy]) -> None:
    doc = {"version": PROTECTION_VERSION, "site": cfg.site,
           "domains": {name: asdict(p) for name, p in domains.items()}}
    make_missing_dirs(cfg.state_dir)
    atomic_write(protection_path(cfg), json.dumps(doc, indent=1, sort_keys=True).encode())
