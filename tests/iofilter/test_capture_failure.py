"""A batch that fails once it may have reached the primary disk goes to the bitmap,
whatever failed: the disk's write, or numbering and buffering after it. Before, only an
``OSError`` did (``nbd_capture``); any other error — a ``WELCOME`` that set the next seq
past 2**64, a clock source that raised — left a write on the primary that was neither in
the stream nor in the bitmap: never replicated, and a FLUSH after it returned.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from iofilter_sim.client import FilterClient
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter
from iofilter_sim.nbd_capture import CapturedDisk, DomainCapture
from tests.iofilter.fake_drva import SECRET, FakeDrva
from tests.waiting import EVENTUALLY_S, wait_until

SIZE = 1 << 20
R = 64 << 10


class FlakyClock:
    """The filter's clock; raises once when asked to."""

    fail_next = False

    def __call__(self) -> int:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("clock source failed")
        return time.time_ns()


class FlakyDisk(PrimaryDisk):
    """A primary whose write lands, then raises (not an OSError) once when asked to."""

    fail_next = False

    def write_batch(self, records: np.ndarray, payload: bytes | bytearray | memoryview) -> None:
        super().write_batch(records, payload)
        if self.fail_next:
            self.fail_next = False
            raise ValueError("driver bug after the write")


@pytest.mark.parametrize("failing", ["clock", "disk"])
async def test_a_write_that_fails_after_reaching_the_primary_is_resynced(tmp_path, failing: str) -> None:
    disk = FlakyDisk(tmp_path / "d.img", SIZE)
    clock = FlakyClock()
    f = DomainFilter(1, [disk], clock=clock)
    fake = FakeDrva()
    await fake.start()
    client = FilterClient([f], "127.0.0.1", fake.port, SECRET, "host-1")
    task = asyncio.create_task(client.run())
    capture = DomainCapture(f, [disk], name="dom")
    capture.start()
    exported = CapturedDisk(capture, 0)
    try:
        await wait_until(lambda: client.connected, EVENTUALLY_S, "the WELCOME")
        await exported.write(0, b"A" * 4096, fua=False)
        (clock if failing == "clock" else disk).fail_next = True
        with pytest.raises(OSError):
            await exported.write(R, b"B" * 4096, fua=False)
        assert disk.read(R, 4096) == b"B" * 4096  # it failed, and it is on the primary
        assert f.stats["bitmap_entries"] == 1, "the failed write is neither captured nor dirty"
        await exported.write(2 * R, b"C" * 4096, fua=False)
        async with asyncio.timeout(EVENTUALLY_S):
            await exported.flush()  # every write answered before is durable at the DRVA
        assert fake.image(0, SIZE) == disk.read(0, SIZE), "a write on the primary never reached the DRVA"
        assert f.stats["resyncs_completed"] == 1
    finally:
        await capture.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()
        disk.close()


async def test_a_welcome_past_the_seq_range_is_refused_before_any_write(tmp_path) -> None:
    """The trigger the reviewer found: a WELCOME of durable_seq 2**64 - 1 made the next
    write fail after its primary write. The WELCOME is refused now; the filter numbers
    from 1 on the next, honest session."""
    disk = PrimaryDisk(tmp_path / "d.img", SIZE)
    f = DomainFilter(1, [disk])
    fake = FakeDrva()
    fake.welcome = lambda doc: {**doc, "domains": {"1": {"durable_seq": 2**64 - 1}}}
    await fake.start()
    client = FilterClient([f], "127.0.0.1", fake.port, SECRET, "host-1")
    task = asyncio.create_task(client.run())
    capture = DomainCapture(f, [disk], name="dom")
    capture.start()
    try:
        await wait_until(lambda: client.connected, EVENTUALLY_S, "an honest WELCOME")
        assert fake.connections == 2 and "durable_seq" in (client.last_error or "")
        await CapturedDisk(capture, 0).write(0, b"Q" * 4096, fua=True)
        assert f.acked_seq == 1 and fake.image(0, SIZE) == disk.read(0, SIZE)
    finally:
        await capture.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()
