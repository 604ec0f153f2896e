"""The frame budget (``drva.committer.FrameBudget``, FORMAT.md §9.2): what a DRVA holds
of frames received and not staged is bounded by it — not by one frame per domain waiting
for room — taken from a FRAME's header before its body is read, and given back however
the frame or its session ends. First come, first served: a frame larger than the budget
gets through alone, and no domain's frames starve another's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import numpy as np
import pytest

import drva.session as session_mod
from cdp import wire
from cdp.frame import HEADER_SIZE as FRAME_HEADER_SIZE
from cdp.frame import encode_frame
from cdp.records import empty_records
from drva import committer as committer_mod
from tests.drva.harness import config, domain_doc, drva_doc, running_drva
from tests.drva.test_protocol import handshake
from tests.waiting import EVENTUALLY_S, wait_until

BUDGET = 1 << 20  # staging_bytes_max of these tests' DRVAs, and so their frame budget
WRITE = 4096


def big_frame(domain: int, first_seq: int, payload: int) -> bytes:
    """A frame of ``payload // WRITE`` 4 KiB writes from ``first_seq`` on."""
    n = payload // WRITE
    rec = empty_records(n)
    rec["seq"] = np.arange(first_seq, first_seq + n)
    rec["timestamp_ns"] = 1
    rec["offset"] = np.arange(n) * WRITE
    rec["length"] = WRITE
    return encode_frame(domain, rec, bytes([domain]) * (n * WRITE))


def _cfg(tmp_path, domains: int, **kw):
    doms = [domain_doc(i, f"dom{i}", [(f"vm{i}", "d0", 16 << 20)]) for i in range(1, domains + 1)]
    cfg = config(drva_doc(tmp_path, "drva-b", doms, log_size="64MiB", **kw))
    return dataclasses.replace(cfg, staging_bytes_max=BUDGET)


async def _session(d, domain: int):
    reader, writer, *_ = await handshake(d, (domain,), name=f"host-{domain}")
    assert (await wire.read_message(reader, "t")).type == wire.WELCOME
    return reader, writer


class _Room:
    """Counts the frames (and bytes) in ``wait_room`` — received whole, not staged — and
    can hold every lane back (the log above high water behind a store that is down)."""

    def __init__(self, d) -> None:
        self.d, self.inside, self.bytes, self.peak_bytes, self.peak = d, 0, 0, 0, 0
        self.held = False
        committer = d.committer
        real_wait, real_held = committer.wait_room, committer.held_back

        async def wait_room(nbytes, *a, **kw):
            self.inside += 1
            self.bytes += nbytes
            self.peak, self.peak_bytes = max(self.peak, self.inside), max(self.peak_bytes, self.bytes)
            try:
                return await real_wait(nbytes, *a, **kw)
            finally:
                self.inside -= 1
                self.bytes -= nbytes

        committer.wait_room = wait_room
        committer.held_back = lambda lanes: [True] * len(lanes) if self.held else real_held(lanes)

    def release(self) -> None:
        self.held = False
        self.d.committer.poke()


def _budgets(d) -> list:
    return getattr(d, "frame_budgets", [])


def _waiting(d) -> int:
    return sum(b.waiting for b in _budgets(d))


# ------------------------------------------------------------------ the budget itself


async def test_first_come_first_served_and_a_share_larger_than_the_budget_goes_alone():
    budget = committer_mod.FrameBudget(10)
    assert await budget.take(6, "a")
    big = asyncio.create_task(budget.take(25, "big"))  # larger than the whole budget
    small = asyncio.create_task(budget.take(1, "small"))  # fits, but came after: no overtaking
    await asyncio.sleep(0)
    assert not big.done() and not small.done() and budget.waiting == 2
    budget.give(6)  # empty: the big one goes, alone
    await asyncio.sleep(0)
    assert big.done() and big.result() and budget.held == 25 and not small.done()
    budget.give(25)
    await asyncio.sleep(0)
    assert small.result() and budget.held == 1
    budget.give(1)
    assert budget.held == 0 and budget.waiting == 0


async def test_a_waiter_that_leaves_or_is_cancelled_takes_nothing_and_holds_no_one_back():
    budget = committer_mod.FrameBudget(10)
    assert await budget.take(8, "a")
    head = asyncio.create_task(budget.take(9, "head"))  # does not fit: at the head
    behind = asyncio.create_task(budget.take(2, "behind"))  # fits, waits behind it
    left = asyncio.create_task(budget.take(1, "left"))
    await asyncio.sleep(0)
    budget.leave("left")  # its session closed
    assert await left is False
    head.cancel()  # its session was cancelled: the one behind it goes
    await asyncio.gather(head, return_exceptions=True)
    assert await behind is True and budget.held == 10
    # Granted, then cancelled before it ran: the share comes back.
    late = asyncio.create_task(budget.take(5, "late"))
    await asyncio.sleep(0)
    budget.give(8)
    late.cancel()
    await asyncio.gather(late, return_exceptions=True)
    budget.give(2)
    assert budget.held == 0 and budget.waiting == 0


# ------------------------------------------------------------------ in a DRVA


async def test_frames_waiting_for_log_room_hold_the_budget_not_a_frame_per_domain(tmp_path):
    domains, payload = 8, 384 << 10  # two frames fit the budget, not three
    async with running_drva(_cfg(tmp_path, domains)) as d:
        room = _Room(d)
        room.held = True  # the log is above high water: no frame is staged
        sessions = [await _session(d, i) for i in range(1, domains + 1)]
        frames = [big_frame(i, 1, payload) for i in range(1, domains + 1)]
        for (_, writer), raw in zip(sessions, frames):
            writer.writelines(wire.frame_message([raw]))
        # Every session is either waiting for room with its frame, or for a share of the
        # budget before it reads the frame.
        await wait_until(lambda: room.inside + _waiting(d) == domains, EVENTUALLY_S, "every frame waits")
        await asyncio.sleep(0.2)  # a session past the budget would be in wait_room by now
        # What is held of frames received and not staged: the budget, not 8 frames.
        assert room.peak_bytes <= BUDGET, (room.peak, room.peak_bytes)
        assert room.inside == 2 and _waiting(d) == domains - 2
        assert [b.held for b in _budgets(d)] == [sum(len(f) for f in frames[:2])]

        room.release()  # the log has room again: every frame goes through
        await wait_until(lambda: all(d.domains[i].durable_seq == payload // WRITE for i in range(1, domains + 1)),
                         EVENTUALLY_S, "every domain's frame durable")
        assert [(b.held, b.waiting) for b in _budgets(d)] == [(0, 0)]
        for _, writer in sessions:
            writer.close()


async def test_a_frame_larger_than_the_budget_gets_through_beside_small_ones(tmp_path):
    big_payload = 3 << 20  # three budgets
    async with running_drva(_cfg(tmp_path, 4)) as d:
        sessions = {i: await _session(d, i) for i in range(1, 5)}
        for seq in range(1, 4 * (big_payload // WRITE), big_payload // WRITE):
            sessions[1][1].writelines(wire.frame_message([big_frame(1, seq, big_payload)]))
        small = 8 * WRITE
        for i in (2, 3, 4):
            for seq in range(1, 40 * 8, 8):  # 40 frames of 8 writes
                sessions[i][1].writelines(wire.frame_message([big_frame(i, seq, small)]))
        await wait_until(lambda: d.domains[1].durable_seq == 4 * (big_payload // WRITE)
                         and all(d.domains[i].durable_seq == 40 * 8 for i in (2, 3, 4)),
                         EVENTUALLY_S, "every frame durable")
        assert [(b.held, b.waiting) for b in _budgets(d)] == [(0, 0)]
        for _, writer in sessions.values():
            writer.close()


@contextlib.asynccontextmanager
async def store_a_held_back(tmp_path):
    """A DRVA whose domains 1..4 ship to store A and domain 5 to store B, with store A's
    lane held back (its store holds the log up) until ``held["a"]`` is set False: (drva,
    held)."""
    doms = [domain_doc(i, f"dom{i}", [(f"vm{i}", "d0", 16 << 20)]) for i in range(1, 5)]
    doms.append({**domain_doc(5, "dom5", [("vm5", "d0", 16 << 20)]), "store": f"file://{tmp_path / 'store-b'}"})
    cfg = dataclasses.replace(config(drva_doc(tmp_path, "drva-l", doms, version=2)), staging_bytes_max=BUDGET)
    async with running_drva(cfg) as d:
        real = d.committer.held_back
        held = {"a": True}
        d.committer.held_back = lambda lanes: [held["a"], False] if held["a"] else real(lanes)
        yield d, held


async def test_a_store_that_holds_the_log_up_keeps_no_budget_from_another_stores_domains(tmp_path):
    """Per store lane: the frames of domains 1..4 (store A) wait for room for as long as
    the outage lasts, and domain 5 (store B) is still served."""
    async with store_a_held_back(tmp_path) as (d, held):
        sessions = [await _session(d, i) for i in range(1, 6)]
        for i, (_, writer) in enumerate(sessions[:4], start=1):
            writer.writelines(wire.frame_message([big_frame(i, 1, 512 << 10)]))
        # One frame of store A's domains holds its lane's share and waits for room, three wait for a share.
        await wait_until(lambda: _budgets(d)[0].waiting == 3, EVENTUALLY_S, "store A's frames wait")
        sessions[4][1].writelines(wire.frame_message([big_frame(5, 1, 768 << 10)]))
        await wait_until(lambda: d.domains[5].durable_seq == 192, EVENTUALLY_S, "domain 5 served")
        assert all(d.domains[i].durable_seq == 0 for i in range(1, 5))
        held["a"] = False
        d.committer.poke()
        await wait_until(lambda: all(d.domains[i].durable_seq == 128 for i in range(1, 5)), EVENTUALLY_S,
                         "store A's frames durable once it is back")
        assert [(b.held, b.waiting) for b in _budgets(d)] == [(0, 0), (0, 0)]
        for _, writer in sessions:
            writer.close()


async def test_sessions_ended_however_while_they_wait_give_their_shares_back(tmp_path):
    payload = 384 << 10
    async with running_drva(_cfg(tmp_path, 6)) as d:
        room = _Room(d)
        room.held = True
        sessions = {i: await _session(d, i) for i in range(1, 6)}
        for i in range(1, 6):
            sessions[i][1].writelines(wire.frame_message([big_frame(i, 1, payload)]))
        await wait_until(lambda: room.inside == 2 and _waiting(d) == 3, EVENTUALLY_S, "2 frames held, 3 waiting")
        budget = _budgets(d)[0]
        waiting = [owner for _, owner, fut in budget._queue if not fut.done()]
        held_by = [s for s in d.sessions if s not in waiting]  # each sent its frame: it holds a share
        assert len(held_by) == 2 and budget.held == 2 * len(big_frame(1, 1, payload))

        # A session waiting for its share is replaced by a new HELLO of its domain.
        waiter = next(s for s in d.sessions if s not in held_by)
        (domain,) = waiter.domains
        sessions[domain] = await _session(d, domain)
        assert waiter.closed and budget.waiting == 2
        # A session holding a share, waiting for room, is replaced too: its frame is dropped.
        holder = held_by[0]
        (domain,) = holder.domains
        sessions[domain] = await _session(d, domain)
        # Its share went to the first waiter: two frames held, one session waiting.
        await wait_until(lambda: holder.closed and room.inside == 2 and budget.waiting == 1, EVENTUALLY_S,
                         "the holder's frame dropped, its share passed on")
        assert budget.held == 2 * len(big_frame(1, 1, payload))

        # A filter that dies while its session waits for a share (it reads nothing meanwhile).
        _, writer6 = await _session(d, 6)
        raw = big_frame(6, 1, payload)
        writer6.writelines([*wire.frame_message([raw])[:-1], raw[: len(raw) // 2]])
        await wait_until(lambda: budget.waiting == 2, EVENTUALLY_S, "domain 6 waits for a share")
        writer6.transport.abort()
        # The DRVA stops with frames held and sessions waiting: every session is cancelled.
    assert d.sessions == set() and (budget.held, budget.waiting) == (0, 0)


@pytest.mark.parametrize("stalled, other", [(768 << 10, 768 << 10),  # read into its own buffer
                                            (32 << 10, 1 << 20)])  # through the read-ahead
async def test_a_filter_that_stalls_in_a_frame_body_gives_its_share_back(tmp_path, monkeypatch, stalled, other):
    monkeypatch.setattr(session_mod, "FRAME_BODY_STALL_S", 0.4)
    async with running_drva(_cfg(tmp_path, 2)) as d:
        reader1, writer1 = await _session(d, 1)
        raw = big_frame(1, 1, stalled)
        header, body = wire.frame_message([raw])
        writer1.writelines([header, raw[: FRAME_HEADER_SIZE + 1000]])  # then nothing more
        await wait_until(lambda: _budgets(d)[0].held == len(raw), EVENTUALLY_S, "its share taken")
        _, writer2 = await _session(d, 2)
        writer2.writelines(wire.frame_message([big_frame(2, 1, other)]))  # does not fit beside it
        msg = await asyncio.wait_for(wire.read_message(reader1, "t"), EVENTUALLY_S)
        while msg.type != wire.ERROR:
            msg = await asyncio.wait_for(wire.read_message(reader1, "t"), EVENTUALLY_S)
        assert msg.json("t")["code"] == "timeout", msg.json("t")
        await wait_until(lambda: d.domains[2].durable_seq == other // WRITE, EVENTUALLY_S, "domain 2 served")
        assert d.domains[1].durable_seq == 0
        await wait_until(lambda: _budgets(d)[0].held == 0, EVENTUALLY_S, "every share back")
        writer1.close()
        writer2.close()


@pytest.mark.parametrize("cut", [10, FRAME_HEADER_SIZE + 10])
async def test_a_filter_gone_in_a_frame_gives_its_share_back(tmp_path, cut):
    async with running_drva(_cfg(tmp_path, 1)) as d:
        _, writer = await _session(d, 1)
        raw = big_frame(1, 1, 768 << 10)
        writer.writelines([wire.frame_message([raw])[0], raw[:cut]])
        await asyncio.sleep(0.05)
        writer.transport.abort()
        await wait_until(lambda: not d.sessions, EVENTUALLY_S, "the session ended")
        assert [(b.held, b.waiting) for b in _budgets(d)] == [(0, 0)]
