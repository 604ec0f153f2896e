"""Recovery points of a domain, from the store's catalog alone (``cdp points DOMAIN``).

The consistent windows are ``target.recoverable_ranges``: the seqs inside retention at
which every disk can be rebuilt, minus the seeding/resync windows. Each window's ends are
given with their times (the record's ``timestamp_ns``: from the catalog's segment
columns when the seq ends a segment, else from that one segment's index). Marks say
whether they are consistent points; bases, the not-consistent windows and the retention
horizon are listed as the catalog has them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cdp.catalog_state import CatalogState
from cdp.segment import read_segment_index
from rocva.plan import load_state
from rocva.target import recoverable_ranges



async def seq_time_ns(store, state: CatalogState, seq: int) -> int | None:
    """``timestamp_ns`` of record ``seq`` (None for seq 0 or one no segment holds)."""
    ref = state.segment_for_seq(seq) if seq > 0 else None
    if ref is None:
        return None
    if seq == ref.last_seq:
        return ref.last_ts
    if seq == ref.first_seq:
        return ref.first_ts
    index = await read_segment_index(store, ref.key)
    i = int(np.searchsorted(index.records["seq"], np.uint64(seq)))
    return int(index.records["timestamp_ns"][i])


async def list_points(store, domain: int) -> dict[str, Any]:
    """Everything a user needs to pick a recovery point (see the module docstring)."""
    state, generation = await load_state(store, domain)
    ranges = recoverable_ranges(state)
    windows = []
    for first, last in ranges:
        last = min(last, state.committed_seq)
        windows.append({"first_seq": first, "last_seq": last,
                        "first_ts": await seq_time_ns(store, state, first),
                        "last_ts": await seq_time_ns(store, state, last)})

    def consistent(seq: int) -> bool:
        return any(a <= seq <= b for a, b in ranges)

    return {
        "domain": {"id": state.domain_id, "name": state.domain["name"]},
        "generation": generation,
        "committed_seq": state.committed_seq,
        "horizon_seq": state.horizon_seq,
        "consistent": windows,
        "latest": windows[-1]["last_seq"] if windows else None,
        "marks": [dict(m, consistent=consistent(m["seq"])) for m in state.marks],
        "bases": list(state.bases),
        "not_consistent": list(state.windows),
        "disks": list(state.disks),
    }
