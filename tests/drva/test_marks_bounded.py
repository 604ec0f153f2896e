"""Marks a DRVA takes and keeps are bounded (FORMAT.md §9.2, §8.2). An audit sent frames
of 65,536 one-byte MARK records: 8.1 M marks in the catalog head took the DRVA to
4.7 GB, its snapshot passed 256 MiB, the ValueError ended the catalog committer and the
DRVA (exit 70), and every restart loaded for 100 s and ended the same way; none of its
domains shipped. Each test failed before the fix:

1. a frame of more than ``MARKS_PER_FRAME_MAX`` MARK records is refused (``bad_frame``,
   naming the count and the bound), and the DRVA's other domains go on;
2. past ``MARKS_MAX`` the oldest marks leave the head — counted in the status
   (``marks_dropped``) and logged — and every record is still committed;
3. a generation too large to write stops its domain (status: fenced, the error), never
   the DRVA: the other domain goes on committing.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp import catalog, catalog_state, records
from cdp.catalog import load_catalog
from cdp.errors import FormatError
from cdp.records import KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE, empty_records
from drva import shipper
from tests.drva.harness import config, running_drva, two_domains
from tests.drva.test_hostile_filter import marks, welcomed
from tests.drva.test_protocol import expect_error, frame, good_session_still_works, log_since, send_frame
from tests.waiting import EVENTUALLY_S, wait_until

#: The bound as the fix sets it (the parent took any number).
PER_FRAME = getattr(records, "MARKS_PER_FRAME_MAX", 8)


def domain_status(d, domain: int) -> dict:
    return next(x for x in d.status()["domains"] if x["id"] == domain)


async def test_a_frame_of_more_marks_than_a_filter_places_is_refused(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-m"))) as d:
        reader, writer = await welcomed(d)
        tail = d.log.tail
        await send_frame(writer, marks(1, [b"a"] * (PER_FRAME + 1)))
        doc = await expect_error(reader, "bad_frame")
        assert f"holds {PER_FRAME + 1} MARK records" in doc["message"], doc
        assert f"more than the {PER_FRAME} a DRVA takes in one frame" in doc["message"], doc
        assert f"record {PER_FRAME} (seq {PER_FRAME + 1}" in doc["message"], doc  # the first one past the bound
        await good_session_still_works(d)  # and the DRVA's other domain goes on
        assert log_since(d, tail) == [(2, 1, 2)] and d.domains[1].accepted_seq == 0
        assert d.domains[1].stats.frames_refused == 1
        reader, writer = await welcomed(d)  # as many as the bound: taken, committed with their names
        names = [f"m{i}".encode() for i in range(PER_FRAME)]
        await send_frame(writer, marks(1, names))
        await wait_until(lambda: d.domains[1].committed_seq == PER_FRAME, EVENTUALLY_S, "the marks committed")
        state, _ = await load_catalog(d.shipper.store, 1)
        assert [m["name"].encode() for m in state.timeline().marks] == names
        writer.close()


@settings(max_examples=200, deadline=None)
@given(kinds=st.lists(st.sampled_from([KIND_WRITE, KIND_MARK, KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END]),
                      min_size=1, max_size=40))
def test_check_special_counts_refuses_exactly_the_frames_past_a_bound(kinds):
    """§9.2: refused iff more than MARKS_PER_FRAME_MAX MARK records, or more than
    RESYNC_RUNS_PER_FRAME_MAX runs of RESYNC records (a run: those of one kind in a row,
    other records between them allowed); the message names the count and the bound."""
    rec = empty_records(len(kinds))
    rec["seq"] = np.arange(1, len(kinds) + 1)
    rec["kind"] = kinds
    rec["length"] = np.where(rec["kind"] == KIND_MARK, 1, np.where(rec["kind"] == KIND_WRITE, 512, 0))
    n_marks = kinds.count(KIND_MARK)
    resync = [k for k in kinds if k >= KIND_RESYNC_BEGIN]
    runs = sum(1 for i, k in enumerate(resync) if i == 0 or k != resync[i - 1])
    marks_max, runs_max = PER_FRAME, getattr(records, "RESYNC_RUNS_PER_FRAME_MAX", 8)
    if n_marks <= marks_max and runs <= runs_max:
        records.check_special_counts(rec, "t")
        return
    with pytest.raises(FormatError) as info:
        records.check_special_counts(rec, "t")
    if n_marks > marks_max:
        assert f"holds {n_marks} MARK records, more than the {marks_max}" in info.value.message
    else:
        assert f"holds {runs} runs of RESYNC_BEGIN/RESYNC_END records" in info.value.message
        assert f"more than the {runs_max}" in info.value.message


async def test_marks_past_the_bound_leave_the_head_counted_and_logged(tmp_path, monkeypatch, caplog):
    """The head keeps the newest MARKS_MAX (5 here): 16 marks committed, 11 names gone,
    every seq committed (the points stay, by seq and time), the DRVA's status counts
    them and its log says so."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(catalog_state, "MARKS_MAX", 5, raising=False)
    monkeypatch.setattr(shipper, "MARKS_MAX", 5, raising=False)
    async with running_drva(config(two_domains(tmp_path, "drva-c"))) as d:
        reader, writer = await welcomed(d)
        for first in range(1, 17, 4):
            await send_frame(writer, marks(first, [f"m{s}".encode() for s in range(first, first + 4)]))
        await wait_until(lambda: d.domains[1].committed_seq == 16, EVENTUALLY_S, "16 marks committed")
        state, _ = await load_catalog(d.shipper.store, 1)
        tl = state.timeline()
        assert [m["name"] for m in tl.marks] == [f"m{s}" for s in range(12, 17)]
        assert tl.committed_seq == 16 and tl.horizon_seq == 0
        status = domain_status(d, 1)
        assert status["marks_dropped"] == 11 and not status["fenced"] and status["last_error"] is None
        said = [r for r in caplog.records if r.getMessage() == "marks_dropped"]
        assert said and said[0].fields["domain"] == 1
        await good_session_still_works(d)
        writer.close()


async def test_a_catalog_generation_too_large_stops_its_domain_not_the_drva(tmp_path, monkeypatch):
    """A body past BODY_LEN_MAX (2,500 bytes here: 8 marks of 255-byte names in one
    delta) was a ValueError that ended the catalog committer, so the DRVA (70); now that
    domain stops, saying why, and the other one goes on committing."""
    monkeypatch.setattr(catalog, "BODY_LEN_MAX", 2500)
    async with running_drva(config(two_domains(tmp_path, "drva-t"))) as d:
        other_reader, other = await welcomed(d, (2,))
        await send_frame(other, frame(1, 2, domain=2))
        await wait_until(lambda: d.domains[2].committed_seq == 2, EVENTUALLY_S, "domain 2 committed")
        reader, writer = await welcomed(d)
        await send_frame(writer, marks(1, [bytes([97 + i]) * 255 for i in range(PER_FRAME)]))
        await wait_until(lambda: d.domains[1].fenced, EVENTUALLY_S, "domain 1 stopped")
        error = d.domains[1].stats.last_error
        assert "CatalogTooLarge" in error and "over the 2,500 a generation may hold" in error, error
        status = domain_status(d, 1)
        assert status["fenced"] and status["last_error"] == error and status["catalog_errors"] == 1
        await send_frame(other, frame(3, 2, domain=2))
        await wait_until(lambda: d.domains[2].committed_seq == 4, EVENTUALLY_S, "domain 2 still committing")
        assert d.failure is None and not d.domains[2].fenced
        other.close()
        writer.close()
