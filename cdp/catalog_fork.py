"""Creating a timeline (FORMAT.md §8.5): a domain's history branches at a seq.

``fork_timeline`` commits an ``add_timeline`` generation: the new timeline holds the
parent's history up to ``fork_seq`` — the parent's page references that end by then, the
rows of the page that straddles it (read and re-referenced one level down, so the cost is
the tree's depth, not the history's length), and the row holding ``fork_seq`` clipped to
it — and it becomes current, owned by ``owner``. The previous writer is fenced from then
on: its next conditional create meets this generation (§8.3).

The caller decides that ``fork_seq`` is a point worth forking at (a recovery point:
``rocva.target.check_point``); this module only keeps the catalog's rules.
"""

from __future__ import annotations

import time

import numpy as np

from cdp.catalog import CatalogWriter, load_catalog
from cdp.catalog_json import refs_json, rows_json
from cdp.catalog_read import CatalogView
from cdp.catalog_state import CatalogState
from cdp.errors import AlreadyExists, Busy, FailoverRefused, NotFound
from cdp.store.base import ObjectStore

#: Attempts to commit the fork when others commit first (their generation is reloaded).
FORK_ATTEMPTS_MAX = 8


async def fork_body(view: CatalogView, fork_seq: int, new_id: int, owner: str, created_ns: int) -> dict:
    """The ``add_timeline`` value for timeline ``new_id`` forked from ``view``'s timeline
    at ``fork_seq`` (§8.5). ``FailoverRefused`` when the parent does not hold ``fork_seq``
    (a retention moved its horizon past the point after the caller chose it)."""
    parent = view.tl
    if not parent.horizon_seq <= fork_seq <= parent.committed_seq:
        why = (f"retention moved its horizon to seq {parent.horizon_seq} since the point was chosen: the point "
               f"is outside retention now" if fork_seq < parent.horizon_seq else "the point is not committed")
        raise FailoverRefused(f"domain {view.domain_id}: timeline {parent.id} holds seqs {parent.horizon_seq}.."
                              f"{parent.committed_seq}, not {fork_seq} ({why}); nothing was forked: choose a "
                              f"point at or after seq {parent.horizon_seq} (`cdp points`)")
    f = np.uint64(fork_seq)
    refs = parent.refs[parent.refs["last_seq"] <= f]
    straddle = parent.refs[(parent.refs["first_seq"] <= f) & (parent.refs["last_seq"] > f)]
    # The rows that may hold fork_seq: the tail's, unless a page straddles it; then
    # descend to the level-0 page holding it, keeping the whole pages before it.
    tail = parent.tail
    while len(straddle):
        page = await view.page(straddle[0])
        if page.level == 0:
            tail = page.entries
            break
        kids = page.entries[page.entries["last_seq"] > np.uint64(parent.horizon_seq)]
        refs = np.concatenate([refs, kids[kids["last_seq"] <= f]])
        straddle = kids[(kids["first_seq"] <= f) & (kids["last_seq"] > f)]
    tail = tail[(tail["first_seq"] <= f) & (tail["last_seq"] > np.uint64(parent.horizon_seq))].copy()
    if len(tail) and int(tail["last_seq"][-1]) > fork_seq:
        row = tail[-1]
        tail["last_ts"][-1] = await view.record_time(row, fork_seq)
        tail["last_seq"][-1] = fork_seq
    body = {
        "id": new_id, "parent": parent.id, "fork_seq": fork_seq, "owner": owner, "created_ns": created_ns,
        "committed_seq": fork_seq, "horizon_seq": parent.horizon_seq,
        "pages": refs_json(refs), "tail": rows_json(tail),
        "bases": [dict(b) for b in parent.bases if b["seq"] <= fork_seq],
        "marks": [dict(m) for m in parent.marks if m["seq"] <= fork_seq],
        "windows": [dict(w, last_seq=fork_seq if w["last_seq"] is None or w["last_seq"] > fork_seq else w["last_seq"])
                    for w in parent.windows if w["first_seq"] <= fork_seq],
    }
    if parent.horizon_ts:  # the same record as the parent's horizon; absent = 0, as in a head (§8.2)
        body["horizon_ts"] = parent.horizon_ts
    return body


async def fork_timeline(store: ObjectStore, domain: int, fork_seq: int, owner: str, *, parent: int | None = None,
                        by: str = "cdp fork", created_ns: int | None = None) -> tuple[CatalogState, int]:
    """Create the next timeline of ``domain`` from ``parent`` at ``fork_seq``, owned by
    ``owner`` (§8.5). Returns the head and generation that hold it. NotFound when the
    domain has no catalog; ``Fenced`` never (this takes over).

    ``parent`` is the timeline the caller saw current (and rehydrated or rewrote disks
    from): the fork is committed only while it still is. The commit is a conditional
    create of the generation after the one loaded, so a generation committed meanwhile
    makes it fail, and the head is loaded again: when another timeline became current —
    another site failed over, or back, first — ``FailoverRefused`` names it and nothing
    is forked (forking the old parent again would leave the winner's timeline dead, and
    two sites each believing they own the domain). Without ``parent``, the current
    timeline is forked, whichever it is at the commit."""
    created_ns = time.time_ns() if created_ns is None else created_ns
    for _ in range(FORK_ATTEMPTS_MAX):
        state, generation = await load_catalog(store, domain)
        if state is None:
            raise NotFound(f"domain {domain}: no catalog in {store.describe()}")
        if parent is not None and state.current != parent:
            raise FailoverRefused(_superseded(state, domain, parent, owner))
        view = CatalogView(store, state, generation, parent)
        body = await fork_body(view, fork_seq, max(state.timelines) + 1, owner, created_ns)
        writer = CatalogWriter(store, state, generation, by=by)
        try:
            await writer.commit({"add_timeline": body})
        except AlreadyExists:  # someone committed first: load their generation, check the parent again
            continue
        return writer.state, writer.generation
    raise Busy(f"domain {domain}: lost {FORK_ATTEMPTS_MAX} catalog races in a row while forking; try again")


def _superseded(state: CatalogState, domain: int, parent: int, owner: str) -> str:
    """Why a fork of ``parent`` for ``owner`` is refused: the timeline current instead."""
    won = state.timeline()
    origin = f", forked from timeline {won.parent} at seq {won.fork_seq}" if won.parent else ""
    return (f"domain {domain}: timeline {parent} is no longer current: timeline {won.id} (owner {won.owner!r}"
            f"{origin}) is, committed by another writer while this fork for {owner!r} was made; nothing was "
            f"forked: the domain runs at site {won.owner!r} now (`cdp points` shows its timelines)")
