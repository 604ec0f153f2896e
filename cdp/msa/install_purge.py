"""``cdp uninstall --purge``: which of this site's domains it may delete, and deleting them.

Each domain of the cluster file this site owns loses every object under ``d/<id>/``
(catalog first, so an interrupted purge leaves no catalog naming missing objects), then
a chunk sweep drops the chunks no manifest names any more. A domain is this site's when
its catalog's current timeline is (the check install makes,
``cdp.msa.install_store.foreign_domains``); one of another site, or whose catalog
cannot be read, is left alone and said so (``purge_plan``). A domain a failover
registered here is never purged: its objects are the peer site's history too
(``registered_kept``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from cdp.errors import Busy, CdpError, NotFound
from cdp.inventory import DomainSpec
from cdp.layout import catalog_prefix, domain_prefix
from cdp.locks import live_locks, maintenance_lock, recovery_prefix
from cdp.logs import get_logger
from cdp.msa.config import SiteConfig
from cdp.msa.install_store import Progress
from cdp.store.base import ObjectStore

log = get_logger("cdp.msa.install")  # install and uninstall log as one, whichever module acts

DELETE_CONCURRENCY = 16


@dataclass(frozen=True)
class PurgePlan:
    """The ids of this site's own domains (the cluster file's, not a failover's) that
    ``--purge`` leaves alone, each with why (a left-alone entry of ``uninstall``)."""

    skipped: list[dict[str, Any]]


async def _not_ours_to_purge(store: ObjectStore, cfg: SiteConfig, spec: DomainSpec) -> str | None:
    """Why ``--purge`` must leave domain ``spec`` alone, or None. The check install makes
    (``foreign_domains``): the catalog's current timeline is another site's. A catalog
    that cannot be read cannot say whose the objects are: they stay too."""
    from cdp.catalog import load_catalog

    try:
        state, _ = await load_catalog(store, spec.id)
    except NotFound:
        return None  # no bucket: nothing to delete
    except CdpError as exc:
        return f"its catalog cannot be read ({exc.message}), so whose objects these are is unknown: not purged"
    if state is None:
        return None  # no catalog: objects this site's DRVA wrote before its first commit
    tl = state.timeline()
    if tl.owner != cfg.site:
        return (f"its catalog's current timeline ({tl.id}) belongs to site {tl.owner!r} (domain "
                f"{state.domain.get('name')!r}), not to {cfg.site!r}: another site's domain under this id, not purged")
    return None


async def purge_plan(store: ObjectStore, cfg: SiteConfig) -> PurgePlan:
    """Which of this site's own domains ``--purge`` must leave alone, and why."""
    skipped = []
    for spec in cfg.cluster.domains:
        if spec.name not in cfg.own_domains:
            continue  # registered by a failover: registered_kept
        why = await _not_ours_to_purge(store, cfg, spec)
        if why is not None:
            skipped.append({"domain": spec.name, "id": spec.id, "path": domain_prefix(spec.id),
                            "why": f"domain {spec.name} (id {spec.id}): {why}"})
    return PurgePlan(skipped)


async def domain_usage(store: ObjectStore, cfg: SiteConfig, plan: PurgePlan | None = None) -> list[dict[str, Any]]:
    """Per domain of this site's own (its cluster file's): its objects in the store
    (count, bytes), and whether ``--purge`` deletes them (``purge``; when not, ``why``:
    ``purge_plan``). Not a domain a failover registered here (``registered_kept``)."""
    plan = plan or await purge_plan(store, cfg)
    skipped = {s["id"]: s["why"] for s in plan.skipped}
    out = []
    for spec in cfg.cluster.domains:
        if spec.name not in cfg.own_domains:
            continue
        prefix = domain_prefix(spec.id)
        count = size = 0
        try:
            async for info in store.list(prefix):
                count += 1
                size += info.size
        except NotFound:  # no bucket: no objects
            pass
        out.append({"domain": spec.name, "id": spec.id, "prefix": prefix, "objects": count, "bytes": size,
                    "purge": spec.id not in skipped})
        if spec.id in skipped:
            out[-1]["why"] = skipped[spec.id]
    return out


def registered_kept(cfg: SiteConfig) -> list[dict[str, Any]]:
    """The domains a failover registered here: never purged with the site. Their objects
    hold the peer site's history as well (its old timeline, which a failback reads), and
    the domain may be running here."""
    return [{"domain": spec.name, "id": spec.id, "why": "registered by a failover from the peer site: its objects "
             "are its history at both sites; fail it back or release it, then purge from the site that owns it"}
            for spec in cfg.cluster.domains if spec.name not in cfg.own_domains]


async def _purge_domain(store: ObjectStore, domain_id: int, progress: Progress, done_bytes: list[int],
                        total_bytes: int) -> int:
    """Delete every object of one domain, catalog first (so that an interrupted purge
    leaves no catalog naming missing objects); return how many were deleted."""
    async with await maintenance_lock(store, domain_id, owner="cdp uninstall --purge"):
        leases = await live_locks(store, recovery_prefix(domain_id))
        if leases:
            raise Busy(f"domain {domain_id}: a recovery is reading it ({leases[0].describe()}); "
                       f"purge it once the recovery is done")
        catalog = catalog_prefix(domain_id)
        cat = [i async for i in store.list(catalog)]
        rest = [i async for i in store.list(domain_prefix(domain_id)) if not i.key.startswith(catalog)]
        slots = asyncio.Semaphore(DELETE_CONCURRENCY)

        async def delete(info: Any) -> None:
            async with slots:
                await store.delete(info.key)
                done_bytes[0] += info.size
                progress(f"purge domain {domain_id}", done_bytes[0], total_bytes)

        for batch in (cat, rest):
            await asyncio.gather(*(delete(i) for i in batch))
    log.info("domain_purged", domain=domain_id, objects=len(cat) + len(rest))
    return len(cat) + len(rest)


async def purge_domains(store: ObjectStore, cfg: SiteConfig, plan: PurgePlan, progress: Progress) -> dict[str, Any]:
    """Delete every object of each domain ``plan`` does not skip, then sweep the chunks
    no manifest names any more; return what was deleted and what was skipped."""
    from rocva.retention import sweep_chunks

    usage = [u for u in await domain_usage(store, cfg, plan) if u["purge"]]
    total = sum(u["bytes"] for u in usage)
    done = [0]
    domains = []
    for u in usage:
        deleted = await _purge_domain(store, u["id"], progress, done, total) if u["objects"] else 0
        domains.append({**u, "deleted": deleted})
    try:
        chunks = await sweep_chunks(store, owner="cdp uninstall --purge")
    except Busy as exc:  # a chunk writer of another site or job: the next sweep gets them
        chunks = {"deferred": exc.message}
    return {"domains": domains, "bytes": total, "chunk_sweep": chunks, "skipped": plan.skipped}


__all__ = ["DELETE_CONCURRENCY", "PurgePlan", "domain_usage", "purge_domains", "purge_plan", "registered_kept"]
