"""What ``cdp install`` does in the object store, and what it reads there first.

A store may hold several sites (a recovery site must reach its protected site's
domains), but a domain id is one domain's: ``foreign_domains`` names this site's domains
whose id the store already holds as another site's (the owner of the catalog's current
timeline), and install refuses them. Last, install writes the deployment record
``sites/<site>/deployment.cdpd`` (FORMAT.md §12), so a record in the store means a
completed installation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from cdp.errors import AlreadyExists, NotFound
from cdp.msa.config import SiteConfig
from cdp.msa.deployment import (
    DEPLOYMENT_BYTES_MAX, Deployment, decode_deployment, deployment_key, encode_deployment, installed_sites,
    read_deployment,
)
from cdp.store.base import ObjectStore, get_bounded

#: ``progress(phase, done, total)``: how install and uninstall report their steps.
Progress = Callable[[str, int | None, int | None], None]


def no_progress(phase: str, done: int | None = None, total: int | None = None) -> None:
    return None


def engine_version() -> str:
    try:
        return metadata.version("cdp-engine")
    except metadata.PackageNotFoundError:
        return "unknown"


def open_site_store(cfg: SiteConfig, env: Mapping[str, str], store: ObjectStore | None) -> tuple[Any, bool]:
    """The store to use and whether we opened it (and so must close it)."""
    if store is not None:
        return store, False
    from cdp.store import open_store

    return open_store(cfg.store_url, env=env), True


async def other_sites(store: ObjectStore, site: str) -> list[str]:
    """Sites other than ``site`` installed on ``store`` ([] when the bucket is missing)."""
    try:
        return [s for s in await installed_sites(store) if s != site]
    except NotFound:
        return []


async def foreign_domains(store: ObjectStore, cfg: SiteConfig) -> list[str]:
    """This site's domains whose id the store holds as another site's (the owner of the
    catalog's current timeline), as "<name> (id N: <what the store has>)"."""
    from cdp.catalog import load_catalog

    out = []
    for spec in cfg.cluster.domains:
        try:
            state, _ = await load_catalog(store, spec.id)
        except NotFound:
            return out  # no bucket yet
        if state is None:
            continue
        tl = state.timeline()
        if tl.owner != cfg.site:
            out.append(f"{spec.name} (id {spec.id}: domain {state.domain.get('name')!r} of site {tl.owner!r})")
    return out


def _deployment_for(cfg: SiteConfig, created_ns: int) -> Deployment:
    return Deployment(cfg.site, created_ns, engine_version(),
                      tuple((d.name, str(d.listen)) for d in cfg.drvas), str(cfg.api_listen))


async def write_deployment(store: ObjectStore, cfg: SiteConfig) -> tuple[Deployment, str]:
    """Create the record, or bring an existing one up to date keeping its ``created_ns``."""
    key = deployment_key(cfg.site)
    old = await read_deployment(store, cfg.site)
    if old is None:
        new = _deployment_for(cfg, time.time_ns())
        try:
            await store.put(key, encode_deployment(new), if_absent=True)
            return new, "written"
        except AlreadyExists:  # a concurrent install of this site won: follow it
            old = decode_deployment(key, await get_bounded(store, key, DEPLOYMENT_BYTES_MAX))
    new = _deployment_for(cfg, old.created_ns)
    if new == old:
        return old, "kept"
    await store.put(key, encode_deployment(new))
    return new, "updated"


__all__ = ["Progress", "engine_version", "foreign_domains", "no_progress", "open_site_store", "other_sites",
           "write_deployment"]
