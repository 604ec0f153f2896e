"""The store operations the daemon runs for a domain of the site, as jobs: list points,
recover, verify, consolidate. Each opens the domain's store (``SiteConfig.store_url_for``:
the site's own, or the peer's for a domain failed over here), calls the RocVA function
the ``cdp`` verbs call, and closes the store; the REST handlers only check their input.

Domains are named as in the cluster file; the store knows them by id
(``SiteConfig.domain(name).id``), so no catalog search is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cdp.errors import CdpError, MetaError
from cdp.logs import get_logger
from cdp.msa.config import Policy, SiteConfig
from cdp.msa.jobs import Job
from cdp.store import open_store

log = get_logger("cdp.msa.operations")


async def with_store(cfg: SiteConfig, domain: str, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """``work(store)`` on the store ``domain`` lives in, closed after."""
    store = open_store(cfg.store_url_for(domain))
    try:
        return await work(store)
    finally:
        await store.close()


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (paths and other objects as strings): a job's output
    is written as JSON and must never fail to be."""
    return json.loads(json.dumps(value, default=str))


def seen_by_drva(cfg: SiteConfig, domain: str) -> tuple[Any, ...]:
    """What the DRVA serving ``domain`` last recorded as committed in its metadata
    repository: the catalog must not be older (``rocva.integrity.behind_problems``).
    Nothing before the DRVA is installed; an unreadable repository is logged, not fatal
    (the store's own checks still run)."""
    from rocva.integrity import seen_in_metadata

    spec = cfg.domain(domain)
    drva = cfg.drva_of(spec)
    if not drva.meta_path.exists():
        return ()
    try:
        seen = seen_in_metadata(drva.meta_path, spec.id, f"the metadata of DRVA {drva.name}")
    except MetaError as exc:
        log.warning("drva_metadata_unreadable", drva=drva.name, domain=domain, error=exc.message)
        return ()
    return (seen,) if seen is not None else ()


async def points(cfg: SiteConfig, domain: str) -> dict[str, Any]:
    from rocva.points import list_points

    domain_id = cfg.domain(domain).id
    seen = await asyncio.to_thread(seen_by_drva, cfg, domain)
    return jsonable(await with_store(cfg, domain, lambda store: list_points(store, domain_id, seen=seen)))


def forbidden_places(cfg: SiteConfig) -> tuple[tuple[Path, str], ...]:
    """Where no recovery of the site may write (``rocva.destination``): the MSA's state
    directory and every file store the site reaches (its own, and its peer's)."""
    from rocva.destination import store_root

    forbidden = [(cfg.state_dir, "the MSA's state directory")]
    for url in cfg.store_urls():
        if url.startswith("file://"):
            forbidden.append((store_root(open_store(url)), "the site's object store"))
    return tuple(forbidden)


def recovery_destination(cfg: SiteConfig) -> Any:
    """Where the recoveries the daemon runs may write: under the site file's
    ``recovery_roots``, never in a store or the state directory (``rocva.destination``;
    the messages name neither)."""
    from rocva.destination import Destination

    return Destination(cfg.recovery_roots, forbidden_places(cfg))


def check_recovery_destination(cfg: SiteConfig, to: str) -> None:
    """Refuse (``CdpError``) a recovery ``to`` that ``recovery_destination`` forbids, as
    the file system resolves it now; writes nothing."""
    from rocva.destination import resolve_destination

    resolve_destination(to, recovery_destination(cfg))


async def recover(cfg: SiteConfig, domain: str, options: Any, job: Job) -> dict[str, Any]:
    """The ``recover`` job: ``options`` is the request's ``rocva.RecoverOptions``."""
    from rocva import recover as rocva_recover

    domain_id = cfg.domain(domain).id
    destination = recovery_destination(cfg)
    try:
        result = await with_store(cfg, domain, lambda store: rocva_recover(
            store, domain_id, options, progress=lambda done, total: job.progress("recover", done, total),
            destination=destination))
    except OSError as exc:
        if not on_destination(exc, Path(options.out_dir)):
            raise  # the state directory's, the store's...: the job's record names the file (run_job)
        # The destination, as the client named it: an error of the request, not a bug.
        raise CdpError(f"to: cannot write the images there: {exc.strerror or type(exc).__name__}") from exc
    result.pop("plan", None)  # large, and the summary says what matters
    return jsonable(result)


def on_destination(exc: OSError, to: Path) -> bool:
    """Whether ``exc`` names a file of the recovery's destination ``to``: a path under it
    (as given or resolved), or a bare name — the destination is worked on through its open
    directory (``rocva.destination.OutputDir``: ``*at`` calls name files relative to it).
    An error naming no file, or another place (a job record in the state directory whose
    file system is full), is not the destination's: blaming it sent the operator to free
    space where there was plenty."""
    names = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if n is not None]
    if not names:
        return False
    roots = {os.path.abspath(to), os.path.realpath(to)}
    for name in names:
        if not os.path.isabs(name):
            return True
        path = os.path.abspath(name)
        if any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots):
            return True
    return False


async def verify(cfg: SiteConfig, domain: str, deep: bool, sample: float, job: Job) -> dict[str, Any]:
    from rocva.verify import verify as rocva_verify

    domain_id = cfg.domain(domain).id
    seen = await asyncio.to_thread(seen_by_drva, cfg, domain)
    return jsonable(await with_store(cfg, domain, lambda store: rocva_verify(
        store, domain_id, deep=deep, sample=sample, seen=seen,
        progress=lambda done, total: job.progress("verify", done, total))))


async def consolidate(cfg: SiteConfig, domain: str, policy: Policy, job: Job) -> dict[str, Any]:
    """The domain's consolidation and retention job, with the times of its policy."""
    from rocva.consolidate import consolidate as rocva_consolidate

    domain_id = cfg.domain(domain).id
    scratch = cfg.state_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return jsonable(await with_store(cfg, domain, lambda store: rocva_consolidate(
        store, domain_id, older_than_s=policy.consolidate_after_s, retention_s=policy.retention_s,
        scratch_dir=scratch, progress=job.progress)))


async def owned_elsewhere(cfg: SiteConfig, domain: str) -> dict[str, Any] | None:
    """The domain's current timeline when another site owns it — it failed over there
    (FORMAT.md §8.5) — as ``{site, timeline, parent, fork_seq}``; None when this site
    owns it or the store has no catalog of it yet."""
    from cdp.catalog import load_catalog

    domain_id = cfg.domain(domain).id
    state, _ = await with_store(cfg, domain, lambda store: load_catalog(store, domain_id))
    if state is None:
        return None
    tl = state.timeline()
    if tl.owner == cfg.site:
        return None
    return {"site": tl.owner, "timeline": tl.id, "parent": tl.parent, "fork_seq": tl.fork_seq}


def failed_over_text(domain: str, where: dict[str, Any]) -> str:
    fork = (f", forked from timeline {where['parent']} at seq {where['fork_seq']}" if where.get("parent") else "")
    return f"domain {domain} runs at site {where['site']} now (timeline {where['timeline']}{fork})"
