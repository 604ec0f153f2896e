"""Recovery points of a domain, from the store's catalog alone (``cdp points DOMAIN``).

Per timeline (FORMAT.md §8.5; the current one first in ``timelines``' order of ids),
the consistent windows are ``target.recoverable_ranges``: the seqs inside retention at
which every disk can be rebuilt, minus the seeding/resync windows. Each window's ends
are given with their times (the record's ``timestamp_ns``: from the catalog's rows when
the seq ends or starts a segment, else from that one segment's index). Marks say whether
they are consistent points; bases, the not-consistent windows and the retention horizon
are listed as the catalog has them.

It summarises from the head: no page is read but the few that hold the windows' ends
and the marks, however long the history. A mark (or the latest point) whose segment or
base is missing from the store is shown with ``missing`` naming the objects and is not
offered as consistent; ``problems`` lists signs that the catalog was rolled back
(``rocva.integrity``): traces in the store, and a catalog older than what a witness in
``seen`` (the DRVA's metadata) last saw committed.

Marks may be paged (the MSA's ``GET /v1/domains/{name}/points``, FORMAT.md §13.5): with
``limit``, each timeline gives at most that many of its marks — the newest ones below
``before_seq`` (all of them when it is None), in seq order — with ``marks_total`` (every
mark it holds) and ``marks_next_before_seq``: the ``before_seq`` that asks for the older
marks not given, or None when none is left. Only the given marks are checked against the
store. Without ``limit`` (``cdp points``) every mark is given.
"""

from __future__ import annotations

import bisect
from typing import Any

from cdp.catalog_read import CatalogView
from cdp.catalog_state import CatalogState
from cdp.store.base import ObjectStore
from rocva.errors import InvalidTarget
from rocva.integrity import SeenCommit, behind_problems, missing_for_points, rollback_problems
from rocva.plan import load_state
from rocva.target import recoverable_ranges


async def seq_time_ns(state: CatalogView, seq: int) -> int | None:
    """``timestamp_ns`` of record ``seq`` (None for seq 0, or one whose time the catalog no
    longer holds: no retained row, nor the horizon's ``horizon_ts``)."""
    return await state.time_of(seq)


def marks_page(marks: list[dict], limit: int | None = None,
               before_seq: int | None = None) -> tuple[list[dict], int | None]:
    """(the marks given, the ``before_seq`` of the next page or None) of ``marks`` (a
    timeline's: strictly increasing seqs, §8.2) for a page of ``limit`` (None: all) below
    ``before_seq`` (module docstring)."""
    end = len(marks) if before_seq is None else bisect.bisect_left(marks, before_seq, key=lambda m: m["seq"])
    start = 0 if limit is None else max(0, end - limit)
    if start == 0:
        return marks[:end], None
    return marks[start:end], marks[start]["seq"] if start < end else marks[end - 1]["seq"] + 1


async def timeline_points(state: CatalogView, limit: int | None = None,
                          before_seq: int | None = None) -> dict[str, Any]:
    """The recovery points of the timeline ``state`` reads (module docstring)."""
    ranges = recoverable_ranges(state)
    windows = []
    for first, last in ranges:
        last = min(last, state.committed_seq)
        windows.append({"first_seq": first, "last_seq": last,
                        "first_ts": await seq_time_ns(state, first),
                        "last_ts": await seq_time_ns(state, last)})

    def consistent(seq: int) -> bool:
        return any(a <= seq <= b for a, b in ranges)

    latest = windows[-1]["last_seq"] if windows else None
    marks, next_before = marks_page(state.marks, limit, before_seq)
    missing = await missing_for_points(state, [m["seq"] for m in marks] + ([latest] if latest is not None else []))
    tl = state.tl
    return {
        "timeline": tl.id, "parent": tl.parent or None, "fork_seq": tl.fork_seq if tl.parent else None,
        "owner": tl.owner, "created_ns": tl.created_ns,
        "current": tl.id == state.state.current,
        "committed_seq": state.committed_seq,
        "horizon_seq": state.horizon_seq,
        "horizon_ts": state.horizon_ts or None,
        "segments": state.segment_count,
        "consistent": windows,
        "latest": latest,
        "latest_missing": missing.get(latest, []) if latest is not None else [],
        "marks": [dict(m, consistent=consistent(m["seq"]) and not missing[m["seq"]], missing=missing[m["seq"]])
                  for m in marks],
        "marks_total": len(state.marks),
        "marks_next_before_seq": next_before,
        "bases": list(state.bases),
        "not_consistent": list(state.windows),
    }


async def list_points(store: ObjectStore, domain: int, timeline: int | None = None,
                      seen: tuple[SeenCommit, ...] = (), *, limit: int | None = None,
                      before_seq: int | None = None) -> dict[str, Any]:
    """Everything a user needs to pick a recovery point (see the module docstring).

    The top level describes ``timeline`` (default: the current one), as before timelines
    existed; ``timelines`` lists every timeline the same way (all of them unless one was
    asked for). ``limit`` and ``before_seq`` page the marks (module docstring)."""
    state = await load_state(store, domain, timeline)
    return await points_of(state, timeline, seen, limit=limit, before_seq=before_seq)


async def points_at(store: ObjectStore, head: CatalogState, generation: int, timeline: int | None = None,
                    seen: tuple[SeenCommit, ...] = (), *, limit: int | None = None,
                    before_seq: int | None = None) -> dict[str, Any]:
    """``list_points`` of a head loaded already (``load_catalog``: the MSA keeps the
    newest of a domain while its generation stays the newest), read from ``store``;
    InvalidTarget when it has no timeline ``timeline``. ``head`` is not changed."""
    if timeline is not None and timeline not in head.timelines:
        raise InvalidTarget(f"domain {head.domain_id}: no timeline {timeline} (timelines: "
                            f"{', '.join(map(str, sorted(head.timelines)))})", (None, None))
    return await points_of(CatalogView(store, head, generation, timeline), timeline, seen, limit=limit,
                           before_seq=before_seq)


async def points_of(state: CatalogView, timeline: int | None, seen: tuple[SeenCommit, ...], *,
                    limit: int | None, before_seq: int | None) -> dict[str, Any]:
    """The answer of ``list_points`` from the view of its asked timeline."""
    store, domain = state.store, state.domain_id
    asked = state.timeline_id
    others = [asked] if timeline is not None else sorted(state.state.timelines)
    per = {}
    for tl in others:
        view = state if tl == asked else CatalogView(store, state.state, state.generation, tl)
        per[tl] = await timeline_points(view, limit, before_seq)
    top = per[asked]
    return {
        "domain": {"id": state.domain_id, "name": state.domain["name"]},
        "generation": state.generation,
        "timeline": asked,
        "current_timeline": state.state.current,
        **{k: top[k] for k in ("committed_seq", "horizon_seq", "horizon_ts", "consistent", "latest", "latest_missing",
                               "marks", "marks_total", "marks_next_before_seq", "bases", "not_consistent")},
        "disks": list(state.disks),
        "timelines": [per[tl] for tl in others],
        "problems": (behind_problems(domain, state.state, state.generation, list(seen))
                     + await rollback_problems(store, state.state)),
    }
