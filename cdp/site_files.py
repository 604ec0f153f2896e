"""Writing a site's two files — the inventory (``cdp.inventory``) and the site file
(``cdp.msa.config``) — from plain values, in one place.

The demo, the tests and the examples all need sites on free ports; each used to format
its own TOML by hand, and every new key had to be taught to all of them. Here the keys
are spelled once, the values are written by ``tomli_w`` (quoting, inline tables and
arrays of tables are its job), and ``write_site`` reads the result back through the
real loader, so a builder that drifts from the format fails where it is called.

Sizes may be given as integers (bytes) or as the loaders' strings (``"64MiB"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from cdp.durable import atomic_write

Size = int | str


def vm(name: str, host: str, disks: Sequence[tuple[str, Size] | tuple[str, Size, str | Path]]) -> dict[str, Any]:
    """A ``[[vms]]`` entry: ``disks`` as (name, size) or (name, size, image) in the
    domain's disk order (an image relative to the inventory's ``state_dir``)."""
    out = []
    for d in disks:
        entry: dict[str, Any] = {"name": d[0], "size": d[1]}
        if len(d) > 2:
            entry["image"] = str(d[2])
        out.append(entry)
    return {"name": name, "host": host, "disks": out}


def domain(name: str, domain_id: int, drva: str, vms: Sequence[str],
           workload: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``[[domains]]`` entry; ``drva`` is the ``host:port`` its filter streams to."""
    entry: dict[str, Any] = {"name": name, "id": domain_id, "drva": drva, "vms": list(vms)}
    if workload is not None:
        entry["workload"] = dict(workload)
    return entry


def inventory(site: str, hosts: Sequence[str], vms: Sequence[Mapping[str, Any]],
              domains: Sequence[Mapping[str, Any]], *, state_dir: str | Path | None = None,
              tls: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The inventory (cluster file) document; ``state_dir`` holds the simulated disks;
    ``tls``: its ``[tls]`` table (``{"ca": PATH}``: the filters connect with TLS)."""
    doc: dict[str, Any] = {"site": site}
    if state_dir is not None:
        doc["state_dir"] = str(state_dir)
    doc.update({"hosts": [{"name": h} for h in hosts], "vms": [dict(v) for v in vms],
                "domains": [dict(d) for d in domains]})
    if tls is not None:
        doc["tls"] = {k: str(v) for k, v in tls.items()}
    return doc


def drva(name: str, listen: str, *, log_path: str | Path, log_size: Size, meta_path: str | Path,
         seal_bytes: Size | None = None, seal_age_s: float | None = None,
         upload_concurrency: int | None = None) -> dict[str, Any]:
    """A ``[[drvas]]`` entry of the site file."""
    entry: dict[str, Any] = {"name": name, "listen": listen, "log": {"path": str(log_path), "size": log_size},
                             "meta": {"path": str(meta_path)}}
    seal = {k: v for k, v in (("bytes", seal_bytes), ("age_s", seal_age_s)) if v is not None}
    if seal:
        entry["seal"] = seal
    if upload_concurrency is not None:
        entry["upload_concurrency"] = upload_concurrency
    return entry


def site(name: str, *, drvas: Sequence[Mapping[str, Any]], protect: Sequence[str | Mapping[str, Any]] = (),
         cluster: str = "cluster.toml", store: str = "store", state_dir: str | Path = "state",
         secret_env: str | None = None, api_listen: str | None = None, token_env: str | None = None,
         recovery_roots: Sequence[str | Path] | None = None, defaults: Mapping[str, Any] | None = None,
         alarms: Mapping[str, Any] | None = None, hypervisor: Mapping[str, Any] | None = None,
         peer: Mapping[str, Any] | None = None, standby: Sequence[Mapping[str, Any]] = (),
         tls: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The site file document. ``protect``: domain names, or ``[[protect]]`` tables with a
    policy (``{"domain": "erp", "rpo_target_s": 30}``)."""
    doc: dict[str, Any] = {"site": name, "cluster": cluster, "store": store, "state_dir": str(state_dir)}
    if secret_env is not None:
        doc["secret_env"] = secret_env
    if recovery_roots is not None:
        doc["recovery_roots"] = [str(r) for r in recovery_roots]
    api = {k: v for k, v in (("listen", api_listen), ("token_env", token_env)) if v is not None}
    if api:
        doc["api"] = api
    doc["drvas"] = [dict(d) for d in drvas]
    if defaults is not None:
        doc["defaults"] = dict(defaults)
    if protect:
        doc["protect"] = [{"domain": p} if isinstance(p, str) else dict(p) for p in protect]
    if alarms is not None:
        doc["alarms"] = dict(alarms)
    if hypervisor is not None:
        doc["hypervisor"] = dict(hypervisor)
    if peer is not None:
        doc["peer"] = dict(peer)
    if standby:
        doc["standby"] = [dict(x) for x in standby]
    if tls is not None:
        doc["tls"] = dict(tls)
    return doc


def toml_text(doc: Mapping[str, Any]) -> str:
    return tomli_w.dumps(doc)


def write_inventory(path: Path, doc: Mapping[str, Any], *, check: bool = True) -> Path:
    """Write an inventory document; with ``check``, read it back as ``cdp.inventory`` does."""
    atomic_write(path, toml_text(doc).encode())
    if check:
        from cdp.inventory import load_cluster

        load_cluster(path)
    return path


def write_site(root: Path, site_doc: Mapping[str, Any], inventory_doc: Mapping[str, Any], *,
               site_name: str = "site.toml", check: bool = True) -> Path:
    """Write the inventory (named by the site's ``cluster`` key) and the site file under
    ``root``; with ``check``, load the site as the MSA does (``ConfigError`` if it would
    not). Returns the site file's path."""
    root.mkdir(parents=True, exist_ok=True)
    write_inventory(root / site_doc["cluster"], inventory_doc, check=False)
    path = root / site_name
    atomic_write(path, toml_text(site_doc).encode())
    if check:
        from cdp.msa.config import load_site_config

        load_site_config(path)
    return path
