"""Resync windows a DRVA writes are bounded in work and in number (FORMAT.md §9.2, §8.2).
An audit sent one frame of 60,000 RESYNC_BEGIN/RESYNC_END records by turns: the DRVA
scanned its whole window list for each record, on the event loop, and another domain's
PING waited 28 s for its PONG; and no window ever left the head. Each test failed before
the fix:

1. a frame of more than ``RESYNC_RUNS_PER_FRAME_MAX`` runs of RESYNC records is refused
   (``bad_frame``, naming the count and the bound) and the other domain is served; a
   frame of thousands of RESYNC_BEGIN records (one run: the simulator's filler for
   frames its spill journal lost) is taken;
2. the windows after a batch of RESYNC records cost one pass over the list and one step
   per record (counted, not timed), with the same result as before;
3. a closed window ending below the horizon leaves the head when retention moves it,
   and the DRVA catching up over that retention generation is not fenced;
4. past ``RESYNC_WINDOWS_MAX`` neighbouring windows merge (fewer points offered, none
   wrongly), counted in the status.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp import records
from cdp.catalog import CatalogWriter, load_catalog
from cdp.frame import encode_frame
from cdp.records import KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE, empty_records
from drva import shipper
from tests.drva.harness import config, running_drva, two_domains
from tests.drva.test_hostile_filter import welcomed
from tests.drva.test_protocol import expect_error, frame, good_session_still_works, log_since, send_frame
from tests.waiting import EVENTUALLY_S, wait_until

RUNS = getattr(records, "RESYNC_RUNS_PER_FRAME_MAX", 8)
B, E, W = KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE
examples = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def kinds_frame(first: int, kinds: list[int], domain: int = 1) -> bytes:
    """Records ``first..`` of the given kinds (WRITEs of 512 bytes at offset 0)."""
    rec = empty_records(len(kinds))
    rec["seq"] = np.arange(first, first + len(kinds))
    rec["timestamp_ns"] = 1
    rec["kind"] = kinds
    rec["length"] = np.where(rec["kind"] == W, 512, 0)
    return encode_frame(domain, rec, b"\x07" * 512 * kinds.count(W))


def resync_windows(windows: list[dict]) -> list[tuple[int, int | None]]:
    return [(w["first_seq"], w["last_seq"]) for w in windows if w["kind"] == "resync"]


# ------------------------------------------------------------------ 1: a frame's runs


async def test_a_frame_switching_resync_more_often_than_a_filter_does_is_refused(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-r"))) as d:
        reader, writer = await welcomed(d)
        tail = d.log.tail
        await send_frame(writer, kinds_frame(1, [B, E] * (RUNS // 2) + [B]))  # RUNS + 1 runs
        doc = await expect_error(reader, "bad_frame")
        assert f"holds {RUNS + 1} runs of RESYNC_BEGIN/RESYNC_END records" in doc["message"], doc
        assert f"more than the {RUNS} a DRVA takes in one frame" in doc["message"], doc
        await good_session_still_works(d)  # the other domain is served
        assert log_since(d, tail) == [(2, 1, 2)] and d.domains[1].accepted_seq == 0
        # One run of 5,000 RESYNC_BEGIN (a filler frame), writes, then one that ends it
        # and the most runs a frame may hold: taken, and the windows follow.
        reader, writer = await welcomed(d)
        await send_frame(writer, kinds_frame(1, [B] * 5000))
        await send_frame(writer, kinds_frame(5001, [W, W, E, W] + [B, E] * (RUNS // 2 - 1) + [W, B, W]))
        last = 5000 + 4 + 2 * (RUNS // 2 - 1) + 3
        await wait_until(lambda: d.domains[1].committed_seq == last, EVENTUALLY_S, "the resync frames committed")
        state, _ = await load_catalog(d.shipper.store, 1)
        got = resync_windows(state.timeline().windows)
        assert got[0] == (1, 5002) and len(got) == RUNS // 2 + 1, got
        assert got[-1] == (last - 1, None)  # still open
        writer.close()


# ------------------------------------------------------------------ 2: one pass


class Counted(str):
    """A window kind that counts how often it is compared."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_the_windows_after_a_batch_of_resync_records_cost_one_pass_and_one_step_each():
    """4,000 closed windows and 6,000 events by turns: before, every event scanned the
    whole list (24 M comparisons, on the event loop); now about one pass and one step
    per event."""
    windows = [{"kind": Counted("resync"), "first_seq": 10 * i + 1, "last_seq": 10 * i + 5} for i in range(4000)]
    events = [(B if i % 2 == 0 else E, 50_000 + i) for i in range(6000)]
    Counted.compared = 0
    out = shipper._apply_resync(windows, events)
    assert Counted.compared <= 2 * (len(windows) + len(events)), Counted.compared
    assert len(out) == 4000 + 3000 and all(w["last_seq"] is not None for w in out)
    assert out[4000] == {"kind": "resync", "first_seq": 50_000, "last_seq": 50_000}


def _reference(windows: list[dict], events: list[tuple[int, int]]) -> list[dict]:
    """The windows as the DRVA computed them before (one scan per event)."""
    out = [dict(w) for w in windows]
    for kind, seq in events:
        open_ = next((w for w in out if w["kind"] == "resync" and w["last_seq"] is None), None)
        if kind == B:
            if open_ is None:
                out.append({"kind": "resync", "first_seq": seq, "last_seq": None})
        elif open_ is not None:
            open_["last_seq"] = seq - 1
    return out


@st.composite
def any_windows(draw):
    """Any window list a catalog may hold, several open resync windows among them."""
    out = []
    for _ in range(draw(st.integers(0, 8))):
        first = draw(st.integers(1, 50))
        out.append({"kind": draw(st.sampled_from(["resync", "seeding"])), "first_seq": first,
                    "last_seq": draw(st.one_of(st.none(), st.integers(first, 60)))})
    return out


@examples
@given(windows=any_windows(), kinds=st.lists(st.sampled_from([B, E]), max_size=30))
def test_the_windows_after_resync_records_are_what_they_were(windows, kinds):
    events = [(k, 100 + i) for i, k in enumerate(kinds)]
    before = [dict(w) for w in windows]
    assert shipper._apply_resync(windows, events) == _reference(windows, events)
    assert windows == before  # the head's list is not changed in place


# ------------------------------------------------------------------ 3: the horizon


async def test_retention_drops_old_resync_windows_and_the_drva_goes_on(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-h"))) as d:
        reader, writer = await welcomed(d)
        await send_frame(writer, kinds_frame(1, [B, E]))  # window 1..1
        await send_frame(writer, frame(3, 4))  # writes 3..6
        await send_frame(writer, kinds_frame(7, [B, W, E]))  # window 7..8
        await wait_until(lambda: d.domains[1].committed_seq == 9, EVENTUALLY_S, "committed to 9")
        assert resync_windows(d.shipper.writers[1].state.timeline().windows) == [(1, 1), (7, 8)]
        job = await CatalogWriter.open(d.shipper.store, 1, by="cdp consolidate")  # retention, as a job does it
        await job.commit({"horizon_seq": 5})
        assert resync_windows(job.state.timeline().windows) == [(7, 8)]
        await send_frame(writer, kinds_frame(10, [W, B, E]))  # the DRVA commits over the job's generation
        await wait_until(lambda: d.domains[1].committed_seq == 12, EVENTUALLY_S, "committed over retention")
        assert not d.domains[1].fenced and d.domains[1].stats.last_error is None
        state, generation = await load_catalog(d.shipper.store, 1)
        assert generation == job.generation + 1 and state.timeline().horizon_seq == 5
        assert resync_windows(state.timeline().windows) == [(7, 8), (11, 11)]
        writer.close()


# ------------------------------------------------------------------ 4: how many


@examples
@given(cuts=st.lists(st.integers(1, 10**6), min_size=0, max_size=40, unique=True), open_last=st.booleans(),
       seeding=st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 1000)), max_size=3), most=st.integers(1, 12))
def test_past_the_bound_neighbouring_resync_windows_merge_and_no_point_is_wrongly_offered(cuts, open_last, seeding,
                                                                                          most):
    bounded = getattr(shipper, "_bounded_windows", None)
    assert bounded is not None, "no bound on resync windows"
    cuts = sorted(cuts)
    windows = [{"kind": "resync", "first_seq": a, "last_seq": b} for a, b in zip(cuts[::2], cuts[1::2])]
    if open_last and windows:
        windows[-1]["last_seq"] = None
    for i, (first, span) in enumerate(seeding):
        windows.insert(min(i * 3, len(windows)), {"kind": "seeding", "first_seq": first, "last_seq": first + span})
    out, merged = bounded([dict(w) for w in windows], most)
    resync_in, resync_out = resync_windows(windows), resync_windows(out)
    assert merged == len(resync_in) - len(resync_out)
    closed_pairs = sum(1 for x, y in zip(resync_in, resync_in[1:]) if x[1] is not None and y[1] is not None)
    assert len(resync_out) == len(resync_in) - min(max(0, len(resync_in) - most), closed_pairs)
    if len(resync_in) <= most:
        assert out == windows
    assert [w for w in out if w["kind"] != "resync"] == [w for w in windows if w["kind"] != "resync"]
    inf = 1 << 64

    def covers(ws, seq):
        return any(a <= seq <= (inf if b is None else b) for a, b in ws)

    for a, b in resync_in:  # every seq not consistent before is not consistent now
        for seq in {a, inf - 1 if b is None else b}:
            assert covers(resync_out, seq)
    for a, b in resync_out:  # and every merged window is made of neighbours, in order
        inside = [(x, y) for x, y in resync_in if a <= x and (b is None or (y is not None and y <= b))]
        assert inside and inside[0][0] == a and (inside[-1][1] == b)


async def test_past_the_bound_the_drva_merges_resync_windows_and_counts_them(tmp_path, monkeypatch):
    monkeypatch.setattr(shipper, "RESYNC_WINDOWS_MAX", 2, raising=False)
    async with running_drva(config(two_domains(tmp_path, "drva-w"))) as d:
        reader, writer = await welcomed(d)
        # Windows 1..1, 3..3, 7..7 (gap 1, then 3) and 9..9 (gap 1): the closest merge first.
        await send_frame(writer, kinds_frame(1, [B, E, B, E, W, W, B, E, B, E]))
        await wait_until(lambda: d.domains[1].committed_seq == 10, EVENTUALLY_S, "committed")
        state, _ = await load_catalog(d.shipper.store, 1)
        assert resync_windows(state.timeline().windows) == [(1, 3), (7, 9)]
        status = next(x for x in d.status()["domains"] if x["id"] == 1)
        assert status["resync_windows_merged"] == 2 and not status["fenced"]
        writer.close()


def test_the_bounds_are_the_documented_ones():
    assert records.RESYNC_RUNS_PER_FRAME_MAX == 8 and records.MARKS_PER_FRAME_MAX == 8
    assert shipper.RESYNC_WINDOWS_MAX == 4096


@pytest.mark.parametrize("kinds", [[B] * 65536, [B, W] * 4 + [E] * 100, [E, B] * (RUNS // 2)])
def test_frames_a_filter_sends_are_within_the_bound(kinds):
    rec = empty_records(len(kinds))
    rec["seq"] = np.arange(1, len(kinds) + 1)
    rec["kind"] = kinds
    rec["length"] = np.where(rec["kind"] == W, 512, 0)
    records.check_special_counts(rec, "t")
