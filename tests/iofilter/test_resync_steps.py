"""A resync finishes whatever the filter's buffer size: each step fits the buffer."""

from __future__ import annotations

import numpy as np

from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter

KiB, MiB = 1 << 10, 1 << 20


def _write(f: DomainFilter, offset: int, length: int, byte: int) -> None:
    f.capture(np.array([0], np.uint32), np.array([offset], np.uint64), np.array([length], np.uint32),
              np.array([0], np.uint8), bytes([byte]) * length)


def _send_and_ack(f: DomainFilter) -> None:
    while f.next_unsent() is not None:
        f.mark_sent()
    f.on_ack(f.next_seq - 1)


def test_a_buffer_smaller_than_a_resync_step_still_resyncs(tmp_path) -> None:
    # Before steps were bounded by the buffer, each step (4 MiB) failed to fit the 256 KiB
    # buffer next to its own RESYNC_BEGIN, dropped it, and the next step did the same.
    disk = PrimaryDisk(tmp_path / "d.img", 16 * MiB)
    f = DomainFilter(1, [disk], buffer_bytes_max=256 * KiB)
    _write(f, 0, 1 * MiB, 0x11)  # an empty buffer takes one frame of any size
    _write(f, 3 * MiB, 512 * KiB, 0x22)  # no room: bitmap
    assert f.mode == "bitmap" and f.dirty_bytes() >= 512 * KiB
    steps = 0
    while f.mode != "normal":
        steps += 1
        assert steps < 200, f"the resync does not converge: {f.state()}"
        _send_and_ack(f)
        f.resync_step(connected=True)
    _send_and_ack(f)
    assert f.acked_seq == f.next_seq - 1 == f.resync_end_seq
    assert f.stats["resyncs_completed"] == 1
    disk.close()
