"""A filter whose wall clock is far off the DRVA's, and a filter session that ended.

A filter stamps its writes with its own wall clock. The DRVA raises a stamp that goes
back (before the domain's newest) and clamps one more than 300 s ahead of its own clock;
a clock hours or days *behind* from the start trips neither — its stamps only go forward
— so it was accepted silently, and ``cdp recover --at T`` then picked writes made up to
that much after T (a recovery "to just before the ransomware" returned it). Old stamps
are not wrong in themselves (a filter replaying its spill journal after an outage sends
them, and they are true); what is wrong is the filter's clock *now*. So each
``FILTER_STATE`` carries it (``now_ns``, FORMAT.md §9), and the DRVA reports its offset
from its own clock per domain (``filter_clock_offset_s``), which the MSA holds to the
locks' skew (the ``filter_clock_skew`` alarm: tests/mgmt/test_filter_alarms.py).

And when a filter's session ends, what its last ``FILTER_STATE`` said of that moment
(how long its oldest unacked write had waited, the bytes it buffered) no longer stood
for anything, yet stayed in the RPO lag and the status until a filter came back.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cdp import wire
from cdp.msa.alarms import AlarmEvaluator
from cdp.msa.config import Alarms, Policy
from cdp.msa.status_doc import problem
from cdp.msa.supervisor import DrvaView
from drva import domain as domain_mod
from drva import messages
from drva.config import DomainConfig
from drva.domain import DomainState
from drva.status import domain_status
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, config, running_drva, two_domains
from tests.drva.test_hostile_filter import welcomed
from tests.waiting import EVENTUALLY_S, wait_until

SIZE = 8 << 20
SECOND = 10**9
DAY_S = 86400
# How far the offset a live filter's reports give may be off the clock step the test
# made: the transport delay on loopback, and the time between two reads of the clock.
OFFSET_SLACK_S = 5.0
DRVA_NOW_NS = 1_800_000_000 * SECOND  # the DRVA's wall clock in the protocol-level tests


def _one_write() -> tuple:
    return (np.zeros(1, np.uint32), np.zeros(1, np.uint64), np.array([4096], np.uint32), np.zeros(1, np.uint16))


def _offset_s(dom: DomainState) -> float | None:
    """The filter's clock offset the DRVA's status reports for ``dom``."""
    return domain_status(dom, False).get("filter_clock_offset_s")


def _alarms_for(st: dict) -> list[tuple[str, str]]:
    """The alarms an MSA raises on a DRVA status holding domain status ``st``."""
    status = {"drva": "drva-clock", "pid": 1, "time": time.time(), "backpressure": False,
              "log": {"used_ratio": 0.0, "used_bytes": 0, "data_size": 1}, "domains": [st]}
    assert problem(status) is None, problem(status)  # the MSA takes the document as the DRVA writes it
    view = DrvaView("drva-clock", "127.0.0.1:1", ("erp",), "up", 60.0, 1, 0, None, None, None, status, 0.5)
    ev = AlarmEvaluator(Alarms())
    ev.evaluate(time.time_ns(), [view], {"erp": Policy(rpo_target_s=30.0)}, monotonic_ns=1)
    return [(a.kind, a.subject) for a in ev.active_alarms()]


# ---------------------------------------------------------------------- live: a filter's clock off

@pytest.mark.parametrize("offset_s", [0, -DAY_S, 120], ids=["clock_right", "clock_a_day_behind", "clock_2min_ahead"])
async def test_the_drva_reports_how_far_the_filters_clock_is_off(tmp_path, offset_s):
    async with running_drva(config(two_domains(tmp_path, "drva-clock", seal_age_s=0.2))) as d:
        f = DomainFilter(1, [Disk(tmp_path / "erp0.img", SIZE)], clock=lambda: time.time_ns() + offset_s * SECOND)
        client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        dom = d.domains[1]
        try:
            f.capture(*_one_write(), b"A" * 4096)
            await wait_until(lambda: dom.committed_seq >= f.next_seq - 1, EVENTUALLY_S, "the write stored")
            await wait_until(lambda: dom.filter_state, EVENTUALLY_S, "a FILTER_STATE")
            st = domain_status(dom, False)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    offset = st.get("filter_clock_offset_s")
    assert offset is not None and abs(offset - offset_s) < OFFSET_SLACK_S, \
        f"domain erp: filter_clock_offset_s is {offset}, expected about {offset_s} (the filter's clock step)"
    # Neither a day behind nor 2 min ahead rewrites a stamp (both are within what the
    # DRVA takes): the offset is the only figure that shows them.
    assert st["timestamps_raised"] == st["timestamps_clamped"] == 0
    skew = ("filter_clock_skew", "erp") in _alarms_for(st)
    assert skew == (offset_s != 0), f"filter clock {offset_s:+} s: filter_clock_skew raised: {skew}"


# ---------------------------------------------------------------------- protocol: the readings

def _state(**fields) -> dict:
    doc = {"domain": 1, "mode": "normal", "captured_seq": 0, "captured_ts": 0, "buffered_bytes": 0, "dirty_bytes": 0}
    doc.update(fields)
    return doc


async def _report(writer: asyncio.StreamWriter, dom: DomainState, **fields) -> None:
    """Send a FILTER_STATE and wait until the DRVA took it (its captured_seq: one more
    than the last one's, unless ``fields`` names it)."""
    seq = fields.setdefault("captured_seq", dom.filter_state.get("captured_seq", 0) + 1)
    writer.writelines(wire.control(wire.FILTER_STATE, _state(**fields)))
    await writer.drain()
    await wait_until(lambda: dom.filter_state.get("captured_seq") == seq, EVENTUALLY_S, f"FILTER_STATE {seq} taken")


async def test_a_reading_that_waited_in_the_stream_does_not_make_the_filter_look_behind(tmp_path):
    """A FILTER_STATE read late (behind frames, or while back-pressure stopped reading)
    gives an offset too far behind by the wait: the least delayed reading counts."""
    async with running_drva(config(two_domains(tmp_path, "drva-clock"))) as d:
        d.committer.clock_ns = lambda: DRVA_NOW_NS
        dom = d.domains[1]
        reader, writer = await welcomed(d)
        try:
            await _report(writer, dom, now_ns=DRVA_NOW_NS - 50 * SECOND)  # read 50 s after it was sent
            assert _offset_s(dom) == -50.0
            await _report(writer, dom, now_ns=DRVA_NOW_NS - SECOND // 10)  # read at once
            assert _offset_s(dom) == -0.1
            await _report(writer, dom, now_ns=DRVA_NOW_NS - 40 * SECOND)  # another late one
            assert _offset_s(dom) == -0.1
        finally:
            writer.close()


async def _session_ended(d, **fields) -> dict:
    """Report ``fields`` on a session of domain 1, close it; the domain's status then."""
    dom = d.domains[1]
    reader, writer = await welcomed(d)
    await _report(writer, dom, **fields)
    writer.close()
    await wait_until(lambda: dom.session is None, EVENTUALLY_S, "the session closed")
    return domain_status(dom, False)


async def test_a_session_that_ends_leaves_no_age_in_the_lag(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-clock"))) as d:
        dom = d.domains[1]
        # Seqs up to 9 captured, none received; the oldest has waited 42 s in the filter.
        st = await _session_ended(d, captured_seq=9, captured_ts=time.time_ns(), buffered_bytes=4096,
                                  oldest_unacked_age_ms=42_000, mode="bitmap", dirty_bytes=1 << 20)
        assert "oldest_unacked_age_ms" not in dom.filter_state, \
            f"domain erp: the ended session's oldest_unacked_age_ms is still held: {dom.filter_state}"
        assert "buffered_bytes" not in dom.filter_state, dom.filter_state
        assert st["rpo_lag_s"] < 42.0 and st["rpo_lag_bytes"] == 0, (st["rpo_lag_s"], st["rpo_lag_bytes"])
        # What stays true of the filter until it says otherwise: its mode, dirty bytes and
        # what it captured.
        assert (st["connected"], st["filter_mode"], st["dirty_bytes"]) == (False, "bitmap", 1 << 20)
        assert dom.filter_state["captured_seq"] == 9


async def test_a_filters_clock_stays_after_its_session_and_goes_with_the_next_one(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-clock"))) as d:
        d.committer.clock_ns = lambda: DRVA_NOW_NS
        dom = d.domains[1]
        st = await _session_ended(d, now_ns=DRVA_NOW_NS - DAY_S * SECOND)
        assert st.get("filter_clock_offset_s") == -DAY_S  # a clock stays as wrong while its filter reconnects
        # A new session (another host, maybe): the old clock's readings no longer count.
        reader, writer = await welcomed(d)
        try:
            assert _offset_s(dom) is None
            await _report(writer, dom, now_ns=DRVA_NOW_NS + 2 * SECOND)
            assert _offset_s(dom) == 2.0
        finally:
            writer.close()


async def test_a_filter_older_than_now_ns_reports_no_offset(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-clock"))) as d:
        dom = d.domains[1]
        reader, writer = await welcomed(d)
        try:
            await _report(writer, dom)
            assert _offset_s(dom) is None
        finally:
            writer.close()


# ---------------------------------------------------------------------- the edge and the parts

@pytest.mark.parametrize("bad", [-1, 2 ** 64, "1", 1.5, True, None])
def test_now_ns_out_of_range_or_mistyped_is_refused_naming_the_field(bad):
    msg = wire.Message(wire.FILTER_STATE, b"".join(wire.control(wire.FILTER_STATE, _state(now_ns=bad))[1:]))
    with pytest.raises(wire.ProtocolError) as exc:
        messages.parse(msg, "test")
    assert exc.value.code == "bad_message" and "FILTER_STATE.now_ns: expected an integer in 0.." in exc.value.message


def test_now_ns_is_optional_and_taken_whole():
    for doc in (_state(), _state(now_ns=0), _state(now_ns=2 ** 64 - 1)):
        msg = wire.Message(wire.FILTER_STATE, b"".join(wire.control(wire.FILTER_STATE, doc)[1:]))
        assert messages.parse(msg, "test") == doc


def test_the_filter_sends_the_clock_that_stamps_its_writes(tmp_path):
    readings = iter([5 * SECOND, 7 * SECOND, -3])
    f = DomainFilter(1, [Disk(tmp_path / "d.img", SIZE)], clock=lambda: next(readings))
    f.capture(*_one_write(), b"A" * 4096)  # stamped 5 s
    # Its clock as is (7 s), not the last stamp; a clock before 1970 is sent as 0, never refused.
    assert f.state()["now_ns"] == 7 * SECOND
    assert f.state()["now_ns"] == 0


def test_the_offset_is_the_least_delayed_of_the_latest_readings():
    dom = DomainState(DomainConfig(1, "erp", ()))
    assert dom.filter_clock_offset_ns() is None
    dom.note_filter_clock(-3 * SECOND)
    dom.note_filter_clock(-DAY_S * SECOND)
    assert dom.filter_clock_offset_ns() == -3 * SECOND
    for _ in range(domain_mod.FILTER_CLOCK_SAMPLES):  # the clock stepped back a day: the old readings age out
        dom.note_filter_clock(-DAY_S * SECOND)
    assert dom.filter_clock_offset_ns() == -DAY_S * SECOND
    dom.filter_session_opened()
    assert dom.filter_clock_offset_ns() is None
