"""The time of the retention horizon (FORMAT.md §8.2 ``horizon_ts``).

Retention drops the rows at or below ``horizon_seq``; the point at the horizon stays
recoverable (every disk has a base there), and ``horizon_ts`` keeps the time of its record
so that ``--at T`` for ``T`` between that time and the next record's resolves to it — the
disk was in that state all along — instead of being refused. A head without the key (a
catalog written before it, or a horizon moved without it) reads as 0 (unknown) and keeps
the old refusal, which names ``--seq``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdp import catalog_page
from cdp.catalog import CatalogState, CatalogWriter, load_catalog
from cdp.catalog_fork import fork_timeline
from cdp.catalog_read import CatalogView
from cdp.errors import FormatError
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.testing.domain import TS0, DomainBuilder
from rocva import OutsideRetention, RecoverOptions, Target, recover, resolve_target
from rocva.consolidate import consolidate
from rocva.plan import load_state
from rocva.points import list_points
from tests.catalog_rows import segment_rows
from tests.rocva.build import seed_initial
from tests.rocva.test_consolidate import workload

ROOT = Path(__file__).resolve().parent.parent
KiB = 1 << 10
S = 1_000_000_000  # ns
US = 1_000  # ns: ISO 8601 text carries microseconds
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
WRITER = {"id": "5f1c0e2d9a8b7c6d5e4f3a2b1c0d9e8f", "by": "drva drva-1@site-a"}


def iso(ns: int) -> str:
    assert ns % US == 0, ns
    return (EPOCH + timedelta(microseconds=ns // US)).isoformat()


class SpacedBuilder(DomainBuilder):
    """A builder whose records are ``ns_per_seq`` apart (the stock one stamps two records
    alike): the time after the horizon record, up to the next, is never empty."""

    def ts(self, seq: int) -> int:
        return TS0 + seq * self.ns_per_seq


async def retained_history(store, work: Path) -> tuple[DomainBuilder, dict[int, list[str]], int]:
    """A domain with a seeded disk, two rounds of consolidation, the second with retention
    (as ``cdp consolidate`` runs them): (builder, sha256 of every disk after each seq — the
    primary's state —, the new horizon seq)."""
    rng = np.random.default_rng(11)
    b = await SpacedBuilder(store, disks=(("db", "data", 256 * KiB), ("db", "log", 128 * KiB)),
                            ns_per_seq=S).start()
    await seed_initial(b, 0, rng)
    shas: dict[int, list[str]] = {0: b.snapshot()}
    await workload(b, rng, 80, shas)
    r1 = await consolidate(store, b.domain, older_than_s=20, now_ns=b.ts(b.seq), scratch_dir=work)
    assert r1["consolidated_seq"] is not None and r1["horizon_seq"] == 0
    await workload(b, rng, 80, shas)
    r2 = await consolidate(store, b.domain, older_than_s=10, retention_s=30, now_ns=b.ts(b.seq), scratch_dir=work)
    horizon = r2["horizon_seq"]
    assert horizon == r1["consolidated_seq"] and r2["segments_removed"] > 0
    return b, shas, horizon


async def recovered_at(b: DomainBuilder, t_ns: int, work: Path) -> tuple[int, list[str]]:
    out = work / f"at-{t_ns}"
    result = await recover(b.store, b.domain, RecoverOptions(Target.at(iso(t_ns)), out, checksum=True))
    return result["seq"], [im["sha256"] for im in result["images"]]


async def test_at_between_the_horizon_point_and_the_next_record_recovers_the_horizon_point(tmp_path: Path) -> None:
    b, shas, h = await retained_history(FileStore(tmp_path / "store"), tmp_path)
    state = await load_state(b.store, b.domain)
    rows = await state.rows_between(1, state.committed_seq)
    assert int(rows["first_seq"][0]) == h + 1  # the horizon record's row is gone with it
    # The disk was in the horizon point's state from its record on, until the next one.
    for t in (b.ts(h), b.ts(h) + S // 2, b.ts(h + 1) - US):
        assert await recovered_at(b, t, tmp_path) == (h, shas[h]), t
    assert await recovered_at(b, b.ts(h + 1), tmp_path) == (h + 1, shas[h + 1])
    # Before it: refused, naming the horizon, its time and the nearest point.
    with pytest.raises(OutsideRetention) as info:
        await recovered_at(b, b.ts(h) - US, tmp_path)
    assert f"is before the retention horizon (seq {h}, recorded at {iso(b.ts(h))[:19]}" in str(info.value)
    assert str(info.value).endswith(f"nothing older is kept; nearest consistent point: seq {h}")
    assert info.value.nearest == (None, h)
    # The head keeps the time; the job wrote it with the horizon.
    assert (state.horizon_seq, state.horizon_ts) == (h, b.ts(h))
    head, _ = await load_catalog(b.store, b.domain)
    assert head.to_snapshot_body(WRITER)["timelines"][0]["horizon_ts"] == b.ts(h)


async def test_cdp_recover_and_points_at_the_horizon_time(tmp_path: Path) -> None:
    """The same through the CLI a user runs: ``cdp recover --at`` in the gap, and ``cdp
    points`` giving the oldest point's time."""
    b, shas, h = await retained_history(FileStore(tmp_path / "store"), tmp_path)

    def cdp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cdp.cli", *args, "--store", f"file://{tmp_path / 'store'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    r = cdp("recover", "7", "--at", iso(b.ts(h) + S // 2), "--to", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["seq"] == h
    images = sorted((tmp_path / "out").glob("*.img"))
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in images] == shas[h]
    r = cdp("recover", "7", "--at", iso(b.ts(h) - US), "--to", str(tmp_path / "none"))
    assert r.returncode == 2 and f"before the retention horizon (seq {h}" in r.stderr, r.stderr
    r = cdp("points", "7", "--json")
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout)
    assert points["horizon_ts"] == b.ts(h) and points["timelines"][0]["horizon_ts"] == b.ts(h)
    first = points["consistent"][0]
    assert (first["first_seq"], first["first_ts"]) == (h, b.ts(h))


async def test_a_head_without_horizon_ts_loads_and_keeps_the_refusal_naming_seq(tmp_path: Path) -> None:
    """A horizon moved without its time (a catalog written before ``horizon_ts``, here by a
    delta that does not carry it): the head loads, says 0, writes no key, and ``--at`` in
    the gap is refused as before — with ``--seq`` named, which takes the point."""
    b = await SpacedBuilder(MemoryStore(), ns_per_seq=S).start()
    for i in range(50):
        b.write(i % 2, (i % 8) * 512, bytes([i + 1]) * 512)
        if i % 10 == 9:
            await b.seal()
    h = b.seq
    await b.add_base(0)
    await b.add_base(1)
    for i in range(30):
        b.write(0, 4096 + i * 512, b"\3" * 512)
        if i % 10 == 9:
            await b.seal()
    await b.retire(5, h)  # {"horizon_seq": h}: no horizon_ts
    head, _ = await load_catalog(b.store, b.domain)
    assert head.timeline().horizon_ts == 0 and "horizon_ts" not in head.to_snapshot_body(WRITER)["timelines"][0]
    state = await load_state(b.store, b.domain)
    with pytest.raises(OutsideRetention, match=f"does not record when the retention horizon, seq {h}, was .*"
                                               f"--seq {h} takes it; nearest consistent point: seq {h}$"):
        await resolve_target(state, Target.at(iso(b.ts(h) + S // 2)))
    assert (await resolve_target(state, Target.seq(h))).seq == h
    assert (await resolve_target(state, Target.at(iso(b.ts(h + 1))))).seq == h + 1
    points = await list_points(b.store, b.domain)
    assert points["horizon_ts"] is None and points["consistent"][0]["first_ts"] is None
    # A head as the release before horizon_ts wrote it reads and writes back the same.
    body = head.to_snapshot_body(WRITER)
    assert CatalogState.from_snapshot_body(json.loads(json.dumps(body))).to_snapshot_body(WRITER) == body


# --------------------------------------------------------------------------- the head's checks


def _body(horizon: int = 10, horizon_ts: int | None = TS0 + 10, first: int = 11, marks=()) -> dict:
    """A snapshot body of one timeline whose rows run from ``first`` to 20 (record ``s`` at
    ``TS0 + s``), at ``horizon`` with ``horizon_ts`` (None: no key)."""
    tl = {"id": 1, "parent": 0, "fork_seq": 0, "owner": "site-a", "created_ns": TS0, "committed_seq": 20,
          "horizon_seq": horizon, "pages": {k: [] for k in ("level", "first_seq", "last_seq", "first_ts", "last_ts",
                                                             "count", "segments", "bytes", "hash")},
          "tail": segment_rows({"first_seq": first, "last_seq": 20, "first_ts": TS0 + first, "last_ts": TS0 + 20,
                                "size": 100, "payload_raw_len": 200}),
          "bases": [], "marks": list(marks), "windows": []}
    if horizon_ts is not None:
        tl["horizon_ts"] = horizon_ts
    return {"writer": WRITER, "domain": {"id": 7, "name": "erp", "created_ns": TS0}, "disks": [], "current": 1,
            "timelines": [tl]}


@pytest.mark.parametrize("body", [
    _body(), _body(horizon_ts=None), _body(horizon_ts=TS0 + 11),  # as old as the next record, not older
    _body(horizon=0, horizon_ts=None, first=1), _body(first=5, horizon_ts=TS0 + 5),  # a row still holds it
    _body(marks=[{"name": "m", "seq": 10, "ts": TS0 + 10}, {"name": "n", "seq": 12, "ts": TS0 + 12}]),
])
def test_a_valid_horizon_ts_loads_and_round_trips(body: dict) -> None:
    state = CatalogState.from_snapshot_body(json.loads(json.dumps(body)))
    assert state.timeline().horizon_ts == body["timelines"][0].get("horizon_ts", 0)
    assert state.to_snapshot_body(WRITER) == body


@pytest.mark.parametrize("body, message", [
    (_body(horizon_ts="x"), r"timelines\[0\].horizon_ts is 'x', expected an integer"),
    (_body(horizon_ts=True), r"timelines\[0\].horizon_ts is True, expected an integer"),
    (_body(horizon_ts=-1), r"timelines\[0\].horizon_ts is -1, expected an integer"),
    (_body(horizon_ts=1 << 64), r"timelines\[0\].horizon_ts is \d+, expected an integer in 0..\d+"),
    (_body(horizon_ts=1.5), r"timelines\[0\].horizon_ts is 1.5, expected an integer"),
    (_body(horizon=0, horizon_ts=5, first=1), r"timeline 1\): horizon_ts 5 with horizon_seq 0: seq 0 is no record"),
    (_body(horizon_ts=TS0 + 12), r"timeline 1\): horizon_ts \d+ \(seq 10\) is after the first retained record's "
                                 r"time \d+ \(seq 11\)"),
    (_body(first=5, horizon_ts=TS0 + 4), r"timeline 1\): horizon_ts \d+ \(seq 10\) is outside the times \d+..\d+ of "
                                         r"the entry holding seqs 5..20"),
    (_body(first=5, horizon_ts=TS0 + 21), "is outside the times"),
    (_body(marks=[{"name": "m", "seq": 10, "ts": TS0 + 9}]), r"mark 'm' at the horizon seq 10 has ts \d+, "
                                                             r"horizon_ts is \d+"),
    (_body(marks=[{"name": "n", "seq": 12, "ts": TS0 + 9}]), r"mark 'n' at seq 12 has ts \d+, before horizon_ts"),
])
def test_a_bad_horizon_ts_is_refused_naming_the_timeline_and_field(body: dict, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        CatalogState.from_snapshot_body(json.loads(json.dumps(body)))


def test_an_unknown_timeline_key_is_still_refused() -> None:
    body = _body()
    body["timelines"][0]["horizon_time"] = 1
    with pytest.raises(FormatError, match=r"timelines\[0\] has keys .*'horizon_time'.*optional: \['horizon_ts'\]"):
        CatalogState.from_snapshot_body(body)


def _head() -> CatalogState:
    """Rows 1..40 (record ``s`` at ``TS0 + s``), horizon 10 at its time."""
    state = CatalogState.new(7, "erp", TS0, "site-a")
    for first in (1, 11, 21, 31):
        state.apply_delta({"writer": WRITER, "add_segments": segment_rows(
            {"first_seq": first, "last_seq": first + 9, "first_ts": TS0 + first, "last_ts": TS0 + first + 9,
             "size": 100, "payload_raw_len": 200})})
    state.apply_delta({"writer": WRITER, "horizon_seq": 10, "horizon_ts": TS0 + 10})
    return state


@pytest.mark.parametrize("delta, message", [
    ({"horizon_seq": 20, "horizon_ts": TS0 + 9}, r"horizon_ts \d+ \(seq 20\) goes back from \d+ \(seq 10\)"),
    ({"horizon_ts": TS0 + 11}, r"horizon_ts \d+ changes the time of seq 10, whose horizon_ts is \d+"),
    ({"horizon_seq": 10, "horizon_ts": 0}, "changes the time of seq 10"),
    ({"horizon_seq": 20, "horizon_ts": "x"}, "horizon_ts is 'x', expected an integer"),
    ({"horizon_seq": 20, "horizon_ts": None}, "horizon_ts is None, expected an integer"),  # null is no absence
    ({"horizon_seq": 20, "horizon_ts": TS0 + 25}, r"horizon_ts \d+ \(seq 20\) is after the first retained record's"),
    ({"add_timeline": {}, "horizon_ts": 1}, "add_timeline comes with other changes"),
])
def test_a_bad_horizon_ts_delta_is_refused_and_changes_nothing(delta: dict, message: str) -> None:
    state = _head()
    before = state.to_snapshot_body(WRITER)
    with pytest.raises(FormatError, match=message):
        state.apply_delta({"writer": WRITER, **delta})
    assert state.to_snapshot_body(WRITER) == before


def test_horizon_ts_moves_with_the_horizon_and_only_with_it() -> None:
    state = _head()
    state.apply_delta({"writer": WRITER, "horizon_ts": TS0 + 10})  # repeated: unchanged
    state.apply_delta({"writer": WRITER, "horizon_seq": 10})
    assert state.timeline().horizon_ts == TS0 + 10
    state.apply_delta({"writer": WRITER, "horizon_seq": 20, "horizon_ts": TS0 + 20})
    assert (state.timeline().horizon_seq, state.timeline().horizon_ts) == (20, TS0 + 20)
    # Moved without a time: the old one was another record's, so it is unknown now.
    state.apply_delta({"writer": WRITER, "horizon_seq": 25})
    assert state.timeline().horizon_ts == 0
    state.apply_delta({"writer": WRITER, "horizon_seq": 30, "horizon_ts": TS0 + 30})
    assert state.timeline().horizon_ts == TS0 + 30


def test_a_maintenance_generation_with_horizon_ts_is_absorbed_by_the_drva() -> None:
    """§8.3: the job's delta holds ``horizon_ts`` beside ``horizon_seq``; the DRVA moves over
    it (a head that changed ``horizon_ts`` alone is someone else's change)."""
    async def go() -> None:
        store = MemoryStore()
        drva = CatalogWriter(store, CatalogState.new(7, "erp", TS0, "site-a"), by="drva", owner="site-a")
        for first in (1, 11, 21):
            await drva.commit({"add_segments": segment_rows(
                {"first_seq": first, "last_seq": first + 9, "first_ts": TS0 + first, "last_ts": TS0 + first + 9,
                 "size": 100, "payload_raw_len": 200})})
        job = CatalogWriter(store, *(await load_catalog(store, 7)), by="cdp consolidate")
        await job.commit({"timeline": 1, "horizon_seq": 10, "horizon_ts": TS0 + 10})
        rows = segment_rows({"first_seq": 31, "last_seq": 40, "first_ts": TS0 + 31, "last_ts": TS0 + 40,
                             "size": 100, "payload_raw_len": 200})
        await drva.commit_shared(lambda s: None if s.timeline().committed_seq >= 40 else {"add_segments": rows})
        tl = drva.state.timeline()
        assert (tl.horizon_seq, tl.horizon_ts, tl.committed_seq) == (10, TS0 + 10, 40)
        moved = drva.state.copy()
        moved.timelines[1].horizon_ts = TS0 + 11
        assert "horizon_ts changed from" in drva.state.maintenance_difference(moved)

    asyncio.run(go())


async def test_a_fork_keeps_the_horizon_time(tmp_path: Path) -> None:
    b, shas, h = await retained_history(MemoryStore(), tmp_path)
    state, _ = await fork_timeline(b.store, b.domain, b.seq, "site-b", parent=1)
    assert state.timelines[2].horizon_seq == h and state.timelines[2].horizon_ts == b.ts(h)
    view = CatalogView(b.store, state, 0, 2)
    assert (await resolve_target(view, Target.at(iso(b.ts(h) + S // 2)))).seq == h
    # A fork whose horizon is the parent's seq but not its time is refused.
    body = state.timelines[2].to_body()
    body.update(id=3, parent=2, horizon_ts=b.ts(h) + 1, marks=[])
    with pytest.raises(FormatError, match="add_timeline: horizon_ts .* but timeline 2 has horizon_ts"):
        state.copy().apply_delta({"writer": WRITER, "add_timeline": body})


# --------------------------------------------------------------------------- time -> seq, any history


async def _seq_at_time_agrees(steps: list[int], cuts: list[bool], horizon: int, known: bool) -> None:
    times = np.concatenate([[TS0], TS0 + np.cumsum(steps)])  # times[s]: record s (from 1), never going back

    class Timed(DomainBuilder):
        def ts(self, seq: int) -> int:
            return int(times[seq])

    b = await Timed(MemoryStore(), disks=(("vm", "d", 64 * KiB),)).start()
    n = len(steps)
    for s in range(1, n + 1):
        b.write(0, 0, bytes([s % 250 + 1]) * 512)
        if cuts[s - 1] or s == n:
            await b.seal()
    h = min(horizon, n)
    await b.writer.commit({"horizon_seq": h, **({"horizon_ts": b.ts(h)} if known and h else {})})
    view = CatalogView(b.store, *(await load_catalog(b.store, b.domain)))
    record_ts = times[1:]
    probes = {TS0 - 5, int(times[-1]) + 5} | {int(t) + d for t in record_ts for d in (-1, 0, 1)}
    for t in sorted(probes):
        at = np.flatnonzero(record_ts <= t)
        truth = int(at[-1]) + 1 if len(at) else None  # the last record at or before t
        got = await view.seq_at_time(t)
        if truth is not None and (truth > h or (truth == h and known and h)):
            assert got == truth, (t, truth, got, h)
        elif truth is None or truth < h:
            assert got is None or got < h, (t, truth, got, h)  # refused: outside retention


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.sampled_from([0, 0, 1, 2, 7]), min_size=1, max_size=50),
       cuts=st.lists(st.booleans(), min_size=50, max_size=50), horizon=st.integers(0, 50), known=st.booleans())
# Two-record segments, the horizon ending the first row of a page that straddles it: a
# time inside that row resolved to the horizon point, which is later (horizon_ts unknown).
@example(steps=[1] * 30, cuts=[s % 2 == 0 for s in range(1, 51)], horizon=10, known=False)
def test_seq_at_time_is_the_last_record_at_or_before_t_or_refused_before_the_horizon(steps, cuts, horizon,
                                                                                      known) -> None:
    """Small pages (4 rows, 3 per level) so that references, rows and segments straddle the
    horizon: with its time known, every ``t`` from the horizon record on is the last record
    at or before ``t``; with or without it, an earlier ``t`` never passes for a point
    retention keeps (an entry of a page ending at the horizon once did)."""
    with mock.patch.object(catalog_page, "PAGE_ROWS", 4), mock.patch.object(catalog_page, "PAGE_FANOUT", 3):
        asyncio.run(_seq_at_time_agrees(steps, cuts, horizon, known))
