"""What the catalog alone cannot see: objects it names that are gone, and signs that the
catalog itself was rolled back (FORMAT.md §8; issue 10).

* ``missing_for_points``: per recovery point (a mark, the latest seq), the objects its
  recovery needs first — the segment holding it and each disk's base — that the store
  does not have. ``cdp points`` shows such a point as not recoverable, by name; a
  recovery of it is refused when planning reads the missing object (``NotFound`` naming it).
* ``rollback_problems``: segments of the current timeline that start after its
  ``committed_seq`` and are older than ``PENDING_GRACE_S`` (the DRVA commits an upload
  within seconds, so an old one means the generations that named it are gone), and
  pages that start after every timeline's ``committed_seq`` (folds of generations that
  no longer exist). Uploads younger than the grace are in flight, not a problem.
* ``behind_problems``: a catalog older than what a witness outside the store last saw
  committed — the DRVA's metadata repository records the timeline, committed seq and
  generation of every commit it made (FORMAT.md §4). A rollback that removed the newest
  generations *and* their segments leaves no trace in the store; it does there.

Neither is a substitute for ``verify``, which reads every object; both cost a few
requests, so ``cdp points`` can afford them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cdp.catalog_read import CatalogView
from cdp.catalog_state import CatalogState
from cdp.errors import MetaError, NotFound
from cdp.gather import gather_bounded
from cdp.layout import U32_MAX, U64_MAX, page_prefix, parse_page_key, segment_prefix
from cdp.meta import read_metadata
from cdp.store.base import ObjectStore

#: An upload not yet named by the catalog after this long is no upload in flight.
PENDING_GRACE_S = 120.0
#: Objects looked up at once.
STAT_CONCURRENCY = 16
#: Stray objects named in one report (the count is always given).
NAMED_MAX = 20


async def _exists(store: ObjectStore, key: str) -> bool:
    try:
        await store.stat(key)
        return True
    except NotFound:
        return False


async def missing_for_points(view: CatalogView, seqs: list[int]) -> dict[int, list[str]]:
    """{seq: keys missing from the store} for the recovery points ``seqs`` (module docstring)."""
    needs: dict[int, list[str]] = {}
    for seq in seqs:
        keys = []
        row = await view.row_for_seq(seq) if seq > view.horizon_seq else None
        if row is not None:
            keys.append(view.row_key(row))
        for d in view.disks:
            below = [b for b in view.bases if b["disk"] == d["disk"] and b["seq"] <= seq]
            if below:
                keys.append(max(below, key=lambda b: b["seq"])["key"])
        needs[seq] = keys
    unique = sorted({k for keys in needs.values() for k in keys})
    present = dict(zip(unique, await gather_bounded((_exists(view.store, k) for k in unique), STAT_CONCURRENCY)))
    return {seq: [k for k in keys if not present[k]] for seq, keys in needs.items()}


async def rollback_problems(store: ObjectStore, state: CatalogState, *,
                            now: float | None = None) -> list[dict[str, Any]]:
    """Signs that generations of ``state``'s catalog were removed (module docstring)."""
    now = time.time() if now is None else now
    domain, tl = state.domain_id, state.timeline()
    problems: list[dict[str, Any]] = []
    prefix = segment_prefix(domain, tl.id)
    stray = []
    async for info in store.list(prefix, start_after=f"{prefix}{tl.committed_seq:016x}-~"):
        if info.mtime is None or now - info.mtime > PENDING_GRACE_S:
            stray.append(info.key)
    if stray:
        problems.append({"object": stray[0], "problem": (
            f"{len(stray)} segment(s) of timeline {tl.id} start after its committed_seq {tl.committed_seq} and "
            f"were uploaded more than {PENDING_GRACE_S:g} s ago: the catalog generations that named them are "
            f"gone (rolled back?) or the DRVA cannot commit: {', '.join(stray[:NAMED_MAX])}")})
    top = max(t.committed_seq for t in state.timelines.values())
    pages = []
    async for info in store.list(page_prefix(domain), start_after=f"{page_prefix(domain)}{top:016x}-~"):
        if parse_page_key(info.key)[1] > top:
            pages.append(info.key)
    if pages:
        problems.append({"object": pages[0], "problem": (
            f"{len(pages)} catalog page(s) start after every timeline's committed_seq (at most {top}): "
            f"they were folded by generations that are gone (rolled back?): {', '.join(pages[:NAMED_MAX])}")})
    return problems


@dataclass(frozen=True)
class SeenCommit:
    """What a witness outside the store last saw committed for one domain."""

    by: str  # who saw it, for the messages ("the metadata of DRVA drva-1")
    timeline: int
    committed_seq: int
    generation: int


def seen_in_metadata(path, domain: int, by: str) -> SeenCommit | None:
    """What the DRVA metadata repository at ``path`` last recorded for ``domain`` (None:
    the DRVA never opened its catalog); ``MetaError`` naming the file when it cannot be
    read or does not hold what a DRVA writes there."""
    doc = read_metadata(path)
    entry = doc.get("domains", {}).get(str(domain)) if isinstance(doc.get("domains"), dict) else None
    if entry is None:
        return None
    fields = {}
    for name, high in (("timeline", U32_MAX), ("committed_seq", U64_MAX), ("generation", U64_MAX)):
        value = entry.get(name) if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise MetaError(f"metadata repository {path}: domains.{domain}.{name} is {value!r}, "
                            f"expected an integer in 0..{high}")
        fields[name] = value
    if fields["timeline"] == 0:  # written before the catalog was open: nothing seen yet
        return None
    return SeenCommit(by, **fields)


def behind_problems(domain: int, state: CatalogState | None, generation: int | None,
                    seen: list[SeenCommit]) -> list[dict[str, Any]]:
    """Where the catalog (``state`` at head ``generation``; None: no catalog at all) is
    older than a witness in ``seen`` last saw: generations were removed (module docstring)."""
    problems = []
    prefix = f"d/{domain:08x}/cat/"
    for w in seen:
        tl = state.timelines.get(w.timeline) if state is not None else None
        if state is None:
            what = "the store holds no catalog for the domain"
        elif tl is None:
            what = f"the catalog has no timeline {w.timeline}"
        elif tl.committed_seq < w.committed_seq:
            what = f"timeline {w.timeline} is committed up to seq {tl.committed_seq} only"
        elif generation is not None and generation < w.generation:
            what = f"the newest catalog generation is {generation}"
        else:
            continue
        problems.append({"object": prefix, "problem": (
            f"{what}, but {w.by} saw timeline {w.timeline} committed up to seq {w.committed_seq} at generation "
            f"{w.generation}: the catalog was rolled back (generations removed), or this is not the store "
            f"that DRVA writes to")})
    return problems
