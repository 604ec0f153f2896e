"""The VMs a site's MSA registered itself: ``<state_dir>/registered.toml`` (FORMAT.md §13.2).

A recovery site's inventory file is the operator's: a pilot light of one host and a
datastore. What a failover brings — the domain, its VMs and disks, and the on-demand
hosts it needed — the MSA records here, never in the operator's file, and the site
loader (``cdp.msa.config``) reads the two together, so every rule of the inventory
(unique names, one image per disk, hosts that exist) holds for the sum. Removing a
registration (test-failover cleanup, a failed failover rolled back, failback) restores
the inventory as it was.

The file has the inventory's own ``hosts``/``vms``/``domains`` entries plus ``version``,
``site`` and ``isolated`` (the registered domains that are a test failover's copies:
their VMs run without replication); images are relative to the inventory's ``state_dir`` (the datastore).
It is replaced atomically; a missing file registers nothing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cdp import durable
from cdp.durable import atomic_write
from cdp.errors import ConfigError
from cdp.site_files import toml_text

REGISTERED_NAME = "registered.toml"
REGISTRY_VERSION = 1
_KEYS = {"version", "site", "hosts", "vms", "domains", "isolated"}


def registry_path(state_dir: Path) -> Path:
    return state_dir / REGISTERED_NAME


def empty(site: str) -> dict[str, Any]:
    return {"version": REGISTRY_VERSION, "site": site, "hosts": [], "vms": [], "domains": [], "isolated": []}


def load_registry(state_dir: Path, site: str) -> dict[str, Any]:
    """The registrations of ``site`` (an empty document when there are none)."""
    path = registry_path(state_dir)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return empty(site)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from exc
    if set(doc) != _KEYS or doc["version"] != REGISTRY_VERSION:
        raise ConfigError(f"{path}: expected version {REGISTRY_VERSION} with the keys {sorted(_KEYS)}")
    if doc["site"] != site:
        raise ConfigError(f"{path}: belongs to site {doc['site']!r}, the site file says {site!r}")
    if not all(isinstance(doc[k], list) for k in ("hosts", "vms", "domains", "isolated")):
        raise ConfigError(f"{path}: hosts, vms and domains must be arrays of tables, isolated an array")
    if not set(doc["isolated"]) <= {d.get("name") for d in doc["domains"] if isinstance(d, dict)}:
        raise ConfigError(f"{path}: isolated names a domain that is not registered")
    return doc


def merged(inventory: Mapping[str, Any], registry: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's inventory document with the registrations appended."""
    out = dict(inventory)
    for key in ("hosts", "vms", "domains"):
        out[key] = list(inventory.get(key, [])) + list(registry[key])
    return out


def save_registry(state_dir: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc``; one that registers nothing removes the file (the site is as the
    operator's inventory alone makes it), durably: a registration back after a power
    loss made the next failover of the domain refuse ("already failed over")."""
    if not (doc["hosts"] or doc["vms"] or doc["domains"]):
        durable.remove(registry_path(state_dir))
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(registry_path(state_dir), toml_text(doc).encode())


def with_domain(doc: Mapping[str, Any], domain: Mapping[str, Any], vms: Sequence[Mapping[str, Any]],
                hosts: Sequence[str], *, isolated: bool = False) -> dict[str, Any]:
    """``doc`` with ``domain`` (an inventory ``[[domains]]`` entry), its ``vms`` and the
    ``hosts`` it needed added; an earlier registration of the same domain is replaced.
    ``isolated``: a test failover's copy — its VMs run without replication (its ``drva``
    is never connected to)."""
    out = without_domain(doc, domain["name"])
    known = {h["name"] for h in out["hosts"]}
    out["hosts"] += [{"name": h} for h in hosts if h not in known]
    out["vms"] += [dict(v) for v in vms]
    out["domains"] += [dict(domain)]
    if isolated:
        out["isolated"] += [domain["name"]]
    return out


def without_domain(doc: Mapping[str, Any], name: str, *, keep_hosts: Sequence[str] = ()) -> dict[str, Any]:
    """``doc`` without domain ``name`` and its VMs; a registered host left with no VM is
    removed too (an on-demand host leaves with the VMs it was added for), unless in
    ``keep_hosts``."""
    out = {**doc, "hosts": list(doc["hosts"]), "vms": list(doc["vms"]), "domains": list(doc["domains"]),
           "isolated": [d for d in doc["isolated"] if d != name]}
    gone = next((d for d in out["domains"] if d.get("name") == name), None)
    if gone is None:
        return out
    out["domains"] = [d for d in out["domains"] if d is not gone]
    vms = set(gone.get("vms", []))
    out["vms"] = [v for v in out["vms"] if v.get("name") not in vms]
    used = {v.get("host") for v in out["vms"]} | set(keep_hosts)
    out["hosts"] = [h for h in out["hosts"] if h.get("name") in used]
    return out


def registered_domains(doc: Mapping[str, Any]) -> list[str]:
    return [d["name"] for d in doc["domains"]]
