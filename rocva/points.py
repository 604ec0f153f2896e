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
"""

from __future__ import annotations

from typing import Any

from cdp.catalog_read import CatalogView
from cdp.store.base import ObjectStore
from rocva.integrity import SeenCommit, behind_problems, missing_for_points, rollback_problems
from rocva.plan import load_state
from rocva.target import recoverable_ranges


async def seq_time_ns(state: CatalogView, seq: int) -> int | None:
    """``timestamp_ns`` of record ``seq`` (None for seq 0, or one whose time the catalog no
    longer holds: no retained row, nor the horizon's ``horizon_ts``)."""
    return await state.time_of(seq)


async def timeline_points(state: CatalogView) -> dict[str, Any]:
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
    missing = await missing_for_points(state, [m["seq"] for m in state.marks] + ([latest] if latest is not None else []))
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
                  for m in state.marks],
        "bases": list(state.bases),
        "not_consistent": list(state.windows),
    }


async def list_points(store: ObjectStore, domain: int, timeline: int | None = None,
                      seen: tuple[SeenCommit, ...] = ()) -> dict[str, Any]:
    """Everything a user needs to pick a recovery point (see the module docstring).

    The top level describes ``timeline`` (default: the current one), as before timelines
    existed; ``timelines`` lists every timeline the same way (all of them unless one was
    asked for)."""
    state = await load_state(store, domain, timeline)
    asked = state.timeline_id
    others = [asked] if timeline is not None else sorted(state.state.timelines)
    per = {}
    for tl in others:
        view = state if tl == asked else CatalogView(store, state.state, state.generation, tl)
        per[tl] = await timeline_points(view)
    top = per[asked]
    return {
        "domain": {"id": state.domain_id, "name": state.domain["name"]},
        "generation": state.generation,
        "timeline": asked,
        "current_timeline": state.state.current,
        **{k: top[k] for k in ("committed_seq", "horizon_seq", "horizon_ts", "consistent", "latest", "latest_missing",
                               "marks", "bases", "not_consistent")},
        "disks": list(state.disks),
        "timelines": [per[tl] for tl in others],
        "problems": (behind_problems(domain, state.state, state.generation, list(seen))
                     + await rollback_problems(store, state.state)),
    }
