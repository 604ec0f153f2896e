"""Cancelling a DRVA loop ends it, whatever it was waiting for when the cancel landed.

On Python 3.11 ``asyncio.wait_for`` returns the inner result, swallowing the cancel, when
the awaited thing completes in the same turn as the cancellation; a loop around it then
runs on and ``Drva.stop`` waits for it forever (issue 9). Each test wakes the loop, then
cancels it after 0, 1, 2 ... turns of the event loop, so one of the cancels lands in
that window whatever the exact number of turns in between."""

from __future__ import annotations

import asyncio

import pytest

from cdp import wire
from tests.drva.harness import config, domain_doc, drva_doc, running_drva, wait_until
from tests.drva.test_protocol import handshake

SIZE = 8 << 20
TURNS_MAX = 10
ENDS_WITHIN_S = 5.0


@pytest.fixture
async def drva(tmp_path):
    async with running_drva(config(drva_doc(tmp_path, "drva-c", [domain_doc(1, "erp", [("vm1", "d0", SIZE)])]))) as d:
        yield d


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _cancel_after_wake(make_loop, wake) -> None:
    for turns in range(TURNS_MAX):
        task = asyncio.create_task(make_loop())
        await _turns(3)  # the loop is parked in its wait
        wake()
        await _turns(turns)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=ENDS_WITHIN_S)
        assert done, f"the loop ran on after a cancel {turns} turns after its wake-up"
        assert task.cancelled(), f"the loop ended without its cancellation: {task!r}"


async def test_a_cancelled_commit_loop_ends(drva):
    await _cancel_after_wake(drva._commit_loop, drva.shipper.uploaded.set)


async def test_a_cancelled_ack_loop_ends(drva):
    reader, writer, *_ = await handshake(drva.port)
    assert (await wire.read_message(reader, "t")).type == wire.WELCOME
    await wait_until(lambda: drva.sessions, 10, "the session")
    session = next(iter(drva.sessions))
    await _cancel_after_wake(session._ack_loop, session.want_ack)
    writer.close()
