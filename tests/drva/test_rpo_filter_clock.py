"""The RPO lag when the filter's wall clock stepped back (NTP, a VM resumed), and the
timestamp rewrites a DRVA logs for such clocks.

A filter stamps each batch with the newest of its clock and its last stamp: after a step
back its stamps stand still until the clock catches up. ``DomainState.rpo_lag_s`` took
the lag from stamps (newest captured minus the recovery point) or from how long the
oldest pending write had been at the DRVA — so a backlog that had waited in the filter
(the link down, or slow) showed as no lag when it arrived, and no RPO alarm could fire.
The filter now also says how long its oldest write not acked has waited, on its own
monotonic clock (``FILTER_STATE.oldest_unacked_age_ms``, FORMAT.md §9), and the lag is at
least that: a difference of one clock, so neither a step nor a skew between hosts shows.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

from cdp import wire
from cdp.layout import U32_MAX
from drva import messages
from drva import session as session_mod
from drva.config import DomainConfig
from drva.domain import DomainState
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, config, free_port, random_writes, running_drva, two_domains
from tests.drva.test_hostile_filter import SECOND, T, frame, welcomed
from tests.drva.test_protocol import send_frame
from tests.tcp_proxy import TcpProxy
from tests.waiting import EVENTUALLY_S, wait_until

SIZE = 8 << 20
STEP_BACK_NS = 3600 * SECOND
# The link to the DRVA is down this long while the VM writes: the filter holds the writes.
OUTAGE_S = 3.0
WRITE_EVERY_S = 0.05  # a small batch of writes this often, during and after the outage
POLL_S = 0.01  # the DRVA's lag is read this often while the backlog arrives
# Segments seal after 1 s: the backlog arrives well before it is in the store.
SEAL_AGE_S = 1.0


class SteppedClock:
    """A wall clock (ns) an operator, NTP or a resumed VM may step."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns


class Captures:
    """When each batch was captured (the test's monotonic clock), by its last seq: the
    true age of the oldest write not in the store, to hold the DRVA's figure against."""

    def __init__(self, f: DomainFilter) -> None:
        self.f = f
        self.rng = np.random.default_rng(7)
        self.batches: list[tuple[int, float]] = []

    def write(self) -> None:
        self.f.capture(*random_writes(self.rng, [SIZE], 4, 8))
        self.batches.append((self.f.next_seq - 1, time.monotonic()))

    def age_of_next_after(self, committed_seq: int) -> float:
        """How long ago the write after ``committed_seq`` was captured (0: none was)."""
        return next((time.monotonic() - at for last, at in self.batches if last > committed_seq), 0.0)


async def _lag_through_outage(tmp_path, *, step_back: bool) -> tuple[float, float]:
    """Writes through a link outage of OUTAGE_S, the filter's clock stepped back an hour
    just before it if ``step_back``: (the highest RPO lag the DRVA showed while the
    backlog arrived and was stored, the highest true lag seen meanwhile)."""
    async with running_drva(config(two_domains(tmp_path, "drva-clock", seal_age_s=SEAL_AGE_S))) as d:
        proxy = TcpProxy("127.0.0.1", d.port, free_port())
        await proxy.up()
        clock = SteppedClock()
        f = DomainFilter(1, [Disk(tmp_path / "erp0.img", SIZE)], clock=clock)
        client = FilterClient([f], "127.0.0.1", proxy.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        dom, writes = d.domains[1], Captures(f)
        try:
            await wait_until(lambda: client.connections == 1, EVENTUALLY_S, "the filter connected")
            writes.write()
            await wait_until(lambda: dom.committed_seq == f.next_seq - 1, EVENTUALLY_S, "the first writes stored")
            if step_back:
                clock.offset_ns = -STEP_BACK_NS
            await proxy.down()
            outage_ends = time.monotonic() + OUTAGE_S
            while time.monotonic() < outage_ends:  # the outage lasts OUTAGE_S: sleeping is the point
                writes.write()
                await asyncio.sleep(WRITE_EVERY_S)
            held_to = f.next_seq - 1
            await proxy.up()
            return await _watch(dom, writes, held_to)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await proxy.down()


async def _watch(dom: DomainState, writes: Captures, held_to: int) -> tuple[float, float]:
    """Read the DRVA's lag (and the truth) every POLL_S, writing on, until the writes
    held through the outage are stored and a second has passed (a FILTER_STATE after it)."""
    lag = truth = 0.0
    deadline = time.monotonic() + EVENTUALLY_S
    stored_at = None
    next_write = time.monotonic()
    while stored_at is None or time.monotonic() < stored_at + 1.0:
        assert time.monotonic() < deadline, f"the held writes (to seq {held_to}) never stored: {dom.committed_seq}"
        lag = max(lag, dom.rpo_lag_s())
        truth = max(truth, writes.age_of_next_after(dom.committed_seq))
        if stored_at is None and dom.committed_seq >= held_to:
            stored_at = time.monotonic()
        if time.monotonic() >= next_write:
            writes.write()
            next_write += WRITE_EVERY_S
        await asyncio.sleep(POLL_S)
    return lag, truth


@pytest.mark.parametrize("step_back", [False, True], ids=["clock_steady", "clock_stepped_back"])
async def test_writes_held_in_the_filter_show_as_lag_whatever_its_wall_clock_did(tmp_path, step_back):
    lag, truth = await _lag_through_outage(tmp_path, step_back=step_back)
    # The oldest write held through the outage had waited at least OUTAGE_S when the
    # backlog reached the DRVA: the lag showed it (with the clock stepped back it showed
    # about 1 s, how long the backlog then waited at the DRVA for its seal)...
    assert truth >= OUTAGE_S, truth
    assert lag >= OUTAGE_S - 0.5, (lag, truth)
    # ... and no more than it was (a write's age on the filter's own clock).
    assert lag <= truth + 0.5, (lag, truth)


# ---------------------------------------------------------------------- the filter's figure

class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_the_age_is_of_the_oldest_write_not_acked_never_of_a_quiet_spell(tmp_path):
    mono = FakeMonotonic()
    f = DomainFilter(1, [Disk(tmp_path / "d.img", SIZE)], monotonic=mono)
    rng = np.random.default_rng(1)
    assert "oldest_unacked_age_ms" not in f.state()  # nothing waits: the field is left out
    f.capture(*random_writes(rng, [SIZE], 2, 8))
    first = f.next_seq - 1
    mono.now += 2.5
    f.capture(*random_writes(rng, [SIZE], 2, 8))
    assert f.state()["oldest_unacked_age_ms"] == 2500  # the older batch's age, not the newer's
    f.mark_sent()
    f.on_ack(first)
    assert f.state()["oldest_unacked_age_ms"] == 0  # the newer one is the oldest now
    f.mark_sent()
    f.on_ack(f.next_seq - 1)
    assert "oldest_unacked_age_ms" not in f.state()
    mono.now += 3600.0  # an hour without a write, then one: a quiet hour is no lag
    f.capture(*random_writes(rng, [SIZE], 1, 8))
    mono.now += 0.25
    assert f.state()["oldest_unacked_age_ms"] == 250
    mono.now += 10**9  # decades unacked: bounded to what a DRVA takes
    assert f.state()["oldest_unacked_age_ms"] == U32_MAX


# ---------------------------------------------------------------------- the DRVA's figure

def _stored_domain(committed_seq: int = 10) -> DomainState:
    """A domain whose store holds everything up to ``committed_seq``, stamped T."""
    dom = DomainState(DomainConfig(1, "erp", ()))
    dom.committed_seq = dom.sealed_seq = dom.durable_seq = dom.accepted_seq = committed_seq
    dom.committed_ts = dom.newest_received_ts = dom.accepted_ts = T
    return dom


def test_the_filters_age_is_a_floor_of_the_lag_and_old_filters_keep_todays_figure():
    dom = _stored_domain()
    # Seqs 11..15 are in the filter; its clock stepped back, so their stamps stand at T.
    state = {"mode": "normal", "captured_seq": 15, "captured_ts": T, "buffered_bytes": 1, "dirty_bytes": 0}
    dom.filter_state = dict(state)  # a filter older than the field
    assert dom.rpo_lag_s(0.0) == 0.0  # what such a filter gives: the lag stays hidden
    dom.filter_state = dict(state, oldest_unacked_age_ms=42_000)
    assert dom.rpo_lag_s(0.0) == 42.0
    # A good clock's stamps may say more: the larger figure counts.
    dom.filter_state = dict(state, captured_ts=T + 60 * SECOND, oldest_unacked_age_ms=42_000)
    assert dom.rpo_lag_s(0.0) == 60.0
    # Everything the filter reported is in the store: a stale age is no lag.
    dom.filter_state = dict(state, captured_seq=10, oldest_unacked_age_ms=42_000)
    assert dom.rpo_lag_s(0.0) == 0.0


def test_the_filters_age_counts_also_when_the_next_write_is_here():
    dom = _stored_domain()
    dom.accepted_seq = 12
    dom.staged_first = (11, T, 100.0)  # staged 0.5 s ago, stamped as the store's newest
    dom.filter_state = {"mode": "normal", "captured_seq": 12, "captured_ts": T, "buffered_bytes": 0,
                        "dirty_bytes": 0, "oldest_unacked_age_ms": 7_000}  # it waited 7 s in the filter
    assert dom.rpo_lag_s(100.5) == 7.0


# ---------------------------------------------------------------------- the wire

def _state_message(**fields) -> wire.Message:
    doc = {"domain": 1, "mode": "normal", "captured_seq": 3, "captured_ts": 0, "buffered_bytes": 0,
           "dirty_bytes": 0, **fields}
    return wire.Message(wire.FILTER_STATE, b"".join(wire.control(wire.FILTER_STATE, doc))[wire.HEADER_SIZE:])


def test_the_age_is_optional_and_checked_when_given():
    assert "oldest_unacked_age_ms" not in messages.parse(_state_message(), "t")
    assert messages.parse(_state_message(oldest_unacked_age_ms=U32_MAX), "t")["oldest_unacked_age_ms"] == U32_MAX
    for bad in (-1, U32_MAX + 1, 1.5, True, "5", None, [1]):
        with pytest.raises(wire.ProtocolError) as info:
            messages.parse(_state_message(oldest_unacked_age_ms=bad), "t")
        assert info.value.code == "bad_message" and "FILTER_STATE.oldest_unacked_age_ms" in info.value.message


async def test_a_hostile_age_closes_only_its_session_and_a_good_one_is_kept(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-age"))) as d:
        reader, writer = await welcomed(d)
        good = {"domain": 1, "mode": "normal", "captured_seq": 5, "captured_ts": 0, "buffered_bytes": 0,
                "dirty_bytes": 0}
        writer.writelines(wire.control(wire.FILTER_STATE, dict(good, oldest_unacked_age_ms=1500)))
        await wait_until(lambda: d.domains[1].filter_state.get("oldest_unacked_age_ms") == 1500, EVENTUALLY_S,
                         "the age taken")
        assert d.domains[1].rpo_lag_s() == 1.5
        # The next report without it (nothing waits, or an older filter took over): gone.
        writer.writelines(wire.control(wire.FILTER_STATE, good))
        await wait_until(lambda: "oldest_unacked_age_ms" not in d.domains[1].filter_state, EVENTUALLY_S,
                         "the age dropped")
        writer.writelines(wire.control(wire.FILTER_STATE, dict(good, oldest_unacked_age_ms=2**64)))
        async with asyncio.timeout(EVENTUALLY_S):
            msg = await wire.read_message(reader, "t")
            while msg.type != wire.ERROR:
                msg = await wire.read_message(reader, "t")
        assert msg.json("t")["code"] == "bad_message", msg.json("t")
        assert "FILTER_STATE.oldest_unacked_age_ms" in msg.json("t")["message"]
        writer.close()
        assert d.failure is None


# ---------------------------------------------------------------------- the rewrites' log lines

async def test_raised_and_clamped_timestamps_are_counted_and_logged_at_most_once_a_second(tmp_path, caplog,
                                                                                           monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(session_mod, "TS_RAISED_LOG_INTERVAL_S", 3600.0)  # however slow the machine
    async with running_drva(config(two_domains(tmp_path, "drva-ts"))) as d:
        d.committer.clock_ns = lambda: T
        reader, writer = await welcomed(d)
        await send_frame(writer, frame(1, 2, ts=T))
        await send_frame(writer, frame(3, 2, ts=T - SECOND))  # a filter clock behind: raised
        await send_frame(writer, frame(5, 3, ts=T - SECOND))  # again, within the second: not logged
        await send_frame(writer, frame(8, 1, ts=T + STEP_BACK_NS))  # an hour ahead: clamped
        await wait_until(lambda: d.domains[1].durable_seq == 8, EVENTUALLY_S, "seqs 1..8 durable")
        writer.close()
    stats = d.domains[1].stats
    assert (stats.timestamps_raised, stats.timestamps_clamped) == (5, 1)
    lines = [(r.getMessage(), r.fields) for r in caplog.records if r.getMessage().startswith("timestamps_")]
    assert [(event, list(fields)) for event, fields in lines] == [
        ("timestamps_raised", ["peer", "filter", "domain", "first_seq", "records", "back_ns", "raised_total",
                               "reason"]),
        ("timestamps_clamped", ["peer", "filter", "domain", "first_seq", "records", "ahead_ns", "clamped_total",
                                "reason"]),
    ]
    raised, clamped = lines[0][1], lines[1][1]
    assert (raised["first_seq"], raised["records"], raised["back_ns"], raised["raised_total"]) == (3, 2, SECOND, 2)
    assert (clamped["first_seq"], clamped["records"], clamped["clamped_total"]) == (8, 1, 1)
    assert clamped["ahead_ns"] == STEP_BACK_NS - 300 * SECOND
    assert "behind" in raised["reason"] and "300 s ahead" in clamped["reason"]


class _SlowLink:
    """A writer on a slow link: each drain takes ``drain_s`` (a window of frames crossing
    it); records the type of each message written, in order."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.types: list[int] = []
        self._pending = b""

    def writelines(self, parts) -> None:
        head = b"".join(bytes(memoryview(p).cast("B")) for p in parts)[:wire.HEADER_SIZE]
        mtype, _, _ = wire.parse_header(head, "test link")
        self.types.append(mtype)

    async def drain(self) -> None:
        await asyncio.sleep(self.drain_s)


async def test_a_backlog_on_a_slow_link_does_not_hold_back_the_filter_state(tmp_path) -> None:
    """FILTER_STATE was written only once every unsent frame was: on a slow link the
    DRVA heard the filter's age (and so the lag) only after the whole backlog, minutes
    late. It goes between windows of frames now, as often as it is due."""
    f = DomainFilter(1, [Disk(tmp_path / "d.img", SIZE)], buffer_bytes_max=64 << 20)
    rng = np.random.default_rng(5)
    while f.buffered_bytes < 5 * (8 << 20):  # five send windows of backlog
        f.capture(*random_writes(rng, [SIZE], 64, 2048))
    client = FilterClient([f], "127.0.0.1", 1, SECRET, "slow-link")
    link = _SlowLink(drain_s=0.6)  # a window every 0.6 s: a state is due more than once meanwhile
    sender = asyncio.create_task(client._send(link))
    try:
        await wait_until(lambda: f.next_unsent() is None, EVENTUALLY_S, "the backlog to be sent")
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    last_frame = max(i for i, t in enumerate(link.types) if t == wire.FRAME)
    states = [i for i, t in enumerate(link.types) if t == wire.FILTER_STATE]
    assert len([i for i in states if i < last_frame]) >= 2, link.types
