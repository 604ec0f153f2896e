"""DomainCapture.submit: plain NBD writes queued without a task, answered by callback in
capture order, refused (for the waiting path) when the queue has no room."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter
from iofilter_sim.nbd_capture import DomainCapture

SIZE = 1 << 20


@pytest.fixture
def disk(tmp_path: Path):
    with PrimaryDisk(tmp_path / "d.img", SIZE, name="vm/d0") as d:
        yield d


def _capture(disk: PrimaryDisk, **options) -> DomainCapture:
    filt = DomainFilter(1, [disk])
    return DomainCapture(filt, [disk], name="t", **options)


async def test_submitted_writes_land_and_are_answered_in_order(disk: PrimaryDisk) -> None:
    cap = _capture(disk)
    cap.start()
    try:
        answers: list[tuple[int, BaseException | None]] = []
        for i in range(5):
            assert cap.submit(0, i * 4096, bytes([i + 1]) * 4096, lambda exc, i=i: answers.append((i, exc)))
        assert answers == []  # never answered from inside submit
        async with asyncio.timeout(10):
            while len(answers) < 5:
                await asyncio.sleep(0.01)
        assert answers == [(i, None) for i in range(5)]
        assert cap.filt.next_seq - 1 == 5  # five writes captured, numbered
        assert disk.read(0, 5 * 4096) == b"".join(bytes([i + 1]) * 4096 for i in range(5))
    finally:
        await cap.close()


async def test_no_room_refuses_and_close_fails_what_is_queued(disk: PrimaryDisk) -> None:
    cap = _capture(disk, queue_bytes_max=8192)  # not started: nothing is taken off the queue
    answers: list[BaseException | None] = []
    assert cap.submit(0, 0, bytes(8192), answers.append)
    assert not cap.submit(0, 8192, bytes(512), answers.append)  # past the queue's bytes
    # A writer waiting for room keeps its turn: submit refuses even what would fit.
    waiting = asyncio.create_task(cap.write(0, 16384, bytes(4096)))
    await asyncio.sleep(0)
    assert cap._room_waiters == 1
    cap.queue_bytes_max = 1 << 20  # room now, but the waiter has not had its turn yet
    assert not cap.submit(0, 20480, bytes(512), answers.append)
    await cap.close()
    assert len(answers) == 1 and isinstance(answers[0], OSError) and answers[0].errno == errno.ESHUTDOWN
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_a_failing_callback_does_not_stop_the_capture(disk: PrimaryDisk) -> None:
    cap = _capture(disk)
    cap.start()
    try:
        def bad(exc: BaseException | None) -> None:
            raise RuntimeError("a bug in the caller")

        assert cap.submit(0, 0, b"a" * 4096, bad)
        await asyncio.wait_for(cap.write(0, 4096, b"b" * 4096), 10)
        assert disk.read(0, 8192) == b"a" * 4096 + b"b" * 4096
    finally:
        await cap.close()
