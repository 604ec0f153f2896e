"""What a catalog head keeps (FORMAT.md §8.2, §8.1): bounds an audit found missing.
Each test below failed before the fix:

1. marks: nothing bounded them. Every MARK record became a mark of the head a DRVA keeps
   in memory, and every 64th generation is a snapshot holding all of them: 8.1 M marks
   took a DRVA to 4.7 GB, and their snapshot, past 256 MiB, ended it (exit 70) at every
   restart. The head now keeps the newest ``MARKS_MAX`` of a timeline.
2. windows: none ever left the head. Every resync and seed added one for good; now a
   closed window ending below the horizon goes with the rows and marks there — with the
   recovery points at and above the horizon judged exactly as before.
3. a body too large to encode was a ValueError, which no DRVA handler took: now a
   ``CatalogTooLarge`` (a ``FormatError``), refused like any delta the head refuses.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp import catalog, catalog_state
from cdp.catalog import KIND_DELTA, KIND_SNAPSHOT, CatalogState, CatalogWriter, encode_catalog_object
from cdp.catalog_read import CatalogView
from cdp.errors import CdpError, FormatError
from cdp.layout import base_manifest_key, catalog_key
from cdp.store.memory import MemoryStore
from rocva.plan import _inside_copies
from rocva.target import recoverable_ranges
from tests.catalog_rows import segment_rows

#: The bound as the fix sets it; the parent had none (the tests then see every mark kept).
MARKS = getattr(catalog_state, "MARKS_MAX", 1 << 17)
TS0 = 1_700_000_000_000_000_000
WRITER = {"id": "5f1c0e2d9a8b7c6d5e4f3a2b1c0d9e8f", "by": "test"}
DISKS = [{"disk": 0, "vm": "vm", "name": "d0", "size": 1 << 20}]
ROW = 10  # seqs per segment row in these heads

examples = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rows(first: int, last: int) -> dict:
    """``add_segments`` for seqs ``first..last``, one row per ``ROW`` seqs."""
    return segment_rows(*({"first_seq": a, "last_seq": min(a + ROW - 1, last), "first_ts": TS0 + a,
                           "last_ts": TS0 + min(a + ROW - 1, last), "size": 100, "payload_raw_len": 200}
                          for a in range(first, last + 1, ROW)))


def mark(seq: int) -> dict:
    return {"name": f"m{seq}", "seq": seq, "ts": TS0 + seq}


def head(committed: int) -> CatalogState:
    state = CatalogState.new(7, "erp", TS0, "site-a")
    state.apply_delta({"writer": WRITER, "disks": DISKS})
    if committed:
        state.apply_delta({"writer": WRITER, "add_segments": rows(1, committed)})
    return state


def test_a_head_keeps_the_newest_marks_max_marks_and_its_snapshot_stays_small():
    """One commit of 131,072 + 3,000 marks (what frames of MARK records used to put in
    the head unbounded): the head keeps the newest MARKS_MAX; the oldest names are gone,
    their points not (the rows still hold every seq); the next commit keeps the bound."""
    n = MARKS + 3000
    state = head(0)
    state.apply_delta({"writer": WRITER, "add_segments": rows(1, n), "add_marks": [mark(s) for s in range(1, n + 1)]})
    tl = state.timeline()
    assert len(tl.marks) == MARKS == 1 << 17
    assert tl.marks[0]["seq"] == n - MARKS + 1 and tl.marks[-1]["seq"] == n
    assert tl.committed_seq == n and tl.horizon_seq == 0  # every point stays: only names went
    state.apply_delta({"writer": WRITER, "add_segments": rows(n + 1, n + 10),
                       "add_marks": [mark(s) for s in range(n + 1, n + 11)]})
    tl = state.timeline()
    assert len(tl.marks) == MARKS and tl.marks[-1]["seq"] == n + 10 and tl.marks[0]["seq"] == n - MARKS + 11
    body = state.to_snapshot_body(WRITER)
    data = encode_catalog_object(7, 64, KIND_SNAPSHOT, body)
    assert len(data) < 16 << 20  # ~10 MB of marks at most with these names; 256 MiB is the bound
    assert CatalogState.from_snapshot_body(catalog.decode_catalog_object(catalog_key(7, 64), data)[3]) == state


@examples
@given(cap=st.integers(1, 12), steps=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 20)), min_size=1,
                                             max_size=12))
def test_marks_are_the_newest_cap_of_those_at_or_above_the_horizon(cap, steps):
    """Format rule (§8.2), any cap: after every delta the head's marks are the newest
    ``cap`` of all marks ever added at or above the horizon — whatever order the horizon
    and the bound cut them in — and the snapshot of that head reads back the same."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catalog_state, "MARKS_MAX", cap, raising=False)
        state, added, committed, horizon = head(0), [], 0, 0
        for new_marks, horizon_step in steps:
            first, committed = committed + 1, committed + max(1, new_marks)
            marks = [mark(s) for s in range(committed - new_marks + 1, committed + 1)]
            state.apply_delta({"writer": WRITER, "add_segments": rows(first, committed), "add_marks": marks})
            added += marks
            horizon = min(committed, horizon + horizon_step)
            state.apply_delta({"writer": WRITER, "horizon_seq": horizon})
            kept = [m for m in added if m["seq"] >= horizon][-cap:]
            assert state.timeline().marks == kept
            assert CatalogState.from_snapshot_body(state.to_snapshot_body(WRITER)) == state


COMMITTED = 400


@st.composite
def windows_and_bases(draw):
    """Windows as writers leave them: resync windows one after another (the last one
    maybe open), seeding windows with the seed's base at ``first_seq - 1`` and maybe a
    base built inside the copy; bases of disk 0 anywhere."""
    cuts = sorted(draw(st.sets(st.integers(1, COMMITTED), max_size=12)))
    windows = [{"kind": "resync", "first_seq": a, "last_seq": b} for a, b in zip(cuts[::2], cuts[1::2])]
    if len(cuts) % 2:
        windows.append({"kind": "resync", "first_seq": cuts[-1], "last_seq": None})
    bases = {}
    for _ in range(draw(st.integers(0, 2))):
        first = draw(st.integers(2, COMMITTED))
        last = draw(st.one_of(st.none(), st.integers(first, COMMITTED)))
        windows.append({"kind": "seeding", "first_seq": first, "last_seq": last})
        if draw(st.booleans()):
            bases[first - 1] = "seed"
        if draw(st.booleans()):
            inside = draw(st.integers(first, COMMITTED if last is None else last))
            bases.setdefault(inside, "consolidation")
    for seq in draw(st.sets(st.integers(0, COMMITTED), max_size=3)):
        bases.setdefault(seq, draw(st.sampled_from(["seed", "consolidation"])))
    bases = [{"timeline": 1, "seq": s, "disk": 0, "key": base_manifest_key(7, 1, s, 0), "origin": o}
             for s, o in sorted(bases.items())]
    return draw(st.permutations(windows)), bases


@examples
@given(wb=windows_and_bases(), horizon=st.integers(0, COMMITTED))
def test_windows_below_the_horizon_leave_the_head_and_every_point_above_it_is_judged_the_same(wb, horizon):
    """Format rule (§8.2): a closed window ending below the horizon leaves the head with
    the generation that moves the horizon past it — a seeding window only once no base
    lies in it or at its fuzzy base. Open windows, and those ending at or above the
    horizon (straddling it too), stay. Recovery's consistent points
    (``recoverable_ranges``: all at or above the horizon) and the bases it will not
    start from (``_inside_copies``) are exactly what the undropped windows gave."""
    windows, bases = wb
    state = head(COMMITTED)
    state.apply_delta({"writer": WRITER, "add_bases": bases, "set_windows": windows})
    assert state.timeline().windows == windows  # nothing below a horizon of 0
    state.apply_delta({"writer": WRITER, "horizon_seq": horizon})
    kept = state.timeline().windows
    assert all(w in windows for w in kept) and [w for w in windows if w in kept] == kept  # same order
    for w in windows:
        below = w["last_seq"] is not None and w["last_seq"] < horizon
        based = any(w["first_seq"] - 1 <= b["seq"] <= (w["last_seq"] or 0) for b in bases)
        gone = below and (w["kind"] == "resync" or not based)
        assert (w not in kept) == gone, (w, horizon)
    undropped = state.copy()
    undropped.timelines[1].windows = list(windows)
    now, before = CatalogView(MemoryStore(), state), CatalogView(MemoryStore(), undropped)
    assert recoverable_ranges(now) == recoverable_ranges(before)
    assert _inside_copies(now) == _inside_copies(before)
    assert CatalogState.from_snapshot_body(state.to_snapshot_body(WRITER)) == state


def test_a_window_straddling_the_horizon_and_an_open_one_stay():
    state = head(COMMITTED)
    windows = [{"kind": "resync", "first_seq": 10, "last_seq": 19}, {"kind": "resync", "first_seq": 30,
                                                                     "last_seq": 60},
               {"kind": "resync", "first_seq": 100, "last_seq": None}]
    state.apply_delta({"writer": WRITER, "set_windows": windows})
    state.apply_delta({"writer": WRITER, "horizon_seq": 50})
    assert state.timeline().windows == windows[1:]
    state.apply_delta({"writer": WRITER, "horizon_seq": 60})
    assert state.timeline().windows == windows[1:]  # 60 itself is inside: not a point
    state.apply_delta({"writer": WRITER, "horizon_seq": 61})
    assert state.timeline().windows == windows[2:]
    state.apply_delta({"writer": WRITER, "horizon_seq": 300})
    assert state.timeline().windows == windows[2:]


def test_a_snapshot_of_an_older_writer_that_kept_them_is_still_a_maintenance_generation():
    """A retention job of a release before these rules writes its 64th generation as a
    snapshot that still holds the windows (and marks) the horizon or the bound let go: a
    DRVA catching up over it must not take it for another owner's (§8.3). A window that
    does differ at or above the horizon still fences."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catalog_state, "MARKS_MAX", 3, raising=False)
        drva = head(0)
        windows = [{"kind": "resync", "first_seq": 10, "last_seq": 20}, {"kind": "resync", "first_seq": 80,
                                                                         "last_seq": 90}]
        drva.apply_delta({"writer": WRITER, "add_segments": rows(1, 100), "set_windows": windows,
                          "add_marks": [mark(s) for s in (55, 60, 70, 80)]})
        assert [m["seq"] for m in drva.timeline().marks] == [60, 70, 80]
        job = drva.copy()  # the head an older release's job computes, and snapshots
        tl = job.timelines[1]
        tl.horizon_seq, tl.refs, tl.tail = 50, tl.refs, tl.tail[tl.tail["last_seq"] > 50]
        tl.windows, tl.marks = list(windows), [mark(s) for s in (55, 60, 70, 80)]
        assert drva.maintenance_difference(job) is None
        tl.windows = [windows[0], {"kind": "resync", "first_seq": 80, "last_seq": 95}]
        assert "windows changed" in drva.maintenance_difference(job)


def test_a_body_too_large_to_encode_is_a_format_error_and_nothing_is_written():
    """§8.1: past BODY_LEN_MAX a generation is not written — as a CdpError (the DRVA
    stops that domain only), never a ValueError (which ended the DRVA, at every restart)."""
    async def go() -> None:
        store = MemoryStore()
        writer = CatalogWriter(store, CatalogState.new(7, "erp", TS0, "site-a"), by="test", owner="site-a")
        await writer.commit({"disks": DISKS})
        await writer.commit({"add_segments": rows(1, 10)})
        def long_marks(first: int, last: int) -> list[dict]:
            return [{"name": "x" * 200, "seq": s, "ts": TS0 + s} for s in range(first, last + 1)]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(catalog, "BODY_LEN_MAX", 4096)
            body = {"writer": WRITER, "add_marks": long_marks(1, 39)}
            with pytest.raises(CdpError) as info:
                encode_catalog_object(7, 3, KIND_DELTA, body)
            assert isinstance(info.value, FormatError)
            assert "4,096" in info.value.message and "d/00000007/cat/" in info.value.message
            before = writer.state.copy()
            with pytest.raises(FormatError, match="over the 4,096"):
                await writer.commit({"add_segments": rows(11, 40), "add_marks": long_marks(11, 40)})
            assert writer.generation == 2 and writer.state == before
            assert catalog_key(7, 3) not in [i.key async for i in store.list("d/00000007/cat/")]
            await writer.commit({"add_segments": rows(11, 20)})  # a small one still goes
            assert writer.generation == 3

    asyncio.run(go())
