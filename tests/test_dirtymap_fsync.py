"""A dirty-region map whose sync failed never vouches for a flag again (FORMAT.md §15,
``cdp.durable.StickySync``).

After a failed write-back Linux reports the error to one fsync and marks the lost pages
clean: the next fsync returns 0 though the flags never reached the disk, and the write
they guard would then be issued — after a crash the map would call its region clean.
Failures are injected as the kernel behaves: one sync raises, every later one returns 0.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from cdp import durable
from cdp.dirtymap import DirtyMap, DirtyMapUnusable, read_dirty_map, sidecar_path
from cdp.records import KIND_WRITE
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter

SIZE = 8 << 20  # 128 regions of 64 KiB
REGION = 64 << 10


def fail_once(monkeypatch: pytest.MonkeyPatch, fd: int, code: int = errno.EIO) -> list[int]:
    """``os.fsync``/``os.fdatasync`` of ``fd`` raise once, then return 0 (the kernel's way);
    the list counts the syncs of ``fd``."""
    calls: list[int] = []

    def wrap(real):
        def sync(n: int) -> None:
            if n == fd:
                calls.append(n)
                if len(calls) == 1:
                    raise OSError(code, os.strerror(code))
            real(n)
        return sync

    monkeypatch.setattr(os, "fsync", wrap(os.fsync))
    monkeypatch.setattr(os, "fdatasync", wrap(os.fdatasync))
    return calls


def write(f: DomainFilter, region: int) -> None:
    f.capture(np.array([0], np.uint32), np.array([region * REGION], np.uint64), np.array([4096], np.uint32),
              np.array([KIND_WRITE], np.uint16), b"\x5a" * 4096)


def test_after_a_failed_map_sync_no_write_reaches_the_disk_and_the_map_is_unusable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = PrimaryDisk(tmp_path / "d0.img", SIZE)
    m = DirtyMap.open(disk.path, SIZE, 7)
    f = DomainFilter(7, [disk], dirty_maps=[m])
    write(f, 1)  # a good sync: region 1 flagged durably, its write applied
    fail_once(monkeypatch, m._fd)
    with pytest.raises(OSError) as first:
        write(f, 5)
    with pytest.raises(OSError) as again:  # the kernel would return 0 now
        write(f, 9)
    assert first.value.errno == errno.EIO and str(m.path) in str(first.value)
    assert again.value.errno == errno.EIO and "failed earlier" in str(again.value) and str(m.path) in str(again.value)
    with pytest.raises(OSError, match="failed earlier"):
        asyncio.run(m.sync_async())
    with open(disk.path, "rb") as img:
        img.seek(9 * REGION)
        assert img.read(4096) == bytes(4096), "a write reached the disk after its flag's sync failed"
    assert m.broken is not None
    f.on_ack(f.next_seq - 1)
    m.close(clean=True)  # writes nothing on a broken map: no clean header after a failed sync
    disk.close()
    with pytest.raises(DirtyMapUnusable, match="marked unusable by its writer"):
        read_dirty_map(sidecar_path(disk.path), SIZE)
    again_map = DirtyMap.open(disk.path, SIZE, 7)  # the next filter resyncs every region
    assert again_map.left.all() and "marked unusable" in again_map.left_reason
    again_map.close(clean=False)


def test_a_sync_that_returned_beside_a_failing_one_is_not_believed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two syncs of the map overlap (the NBD pipeline flags a batch while the one before
    syncs): the write-back error goes to the first only, and the second returns 0 for a
    page that may be the lost one. Neither may let its batch through."""
    m = DirtyMap.open(tmp_path / "d0.img", SIZE, 7)
    first_running, second_returned, release = threading.Event(), threading.Event(), threading.Event()
    calls: list[int] = []
    real = durable.sync_data

    def sync_data(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            first_running.set()
            release.wait(10)
            raise OSError(errno.EIO, "write-back failed")
        real(fd)
        if len(calls) == 2:
            second_returned.set()

    monkeypatch.setattr(durable, "sync_data", sync_data)

    async def main() -> list:
        m.flag(np.array([1]))
        first = asyncio.create_task(m.sync_covering(m.pending_set(np.array([1]))))
        assert await asyncio.to_thread(first_running.wait, 10)
        m.flag(np.array([2]))
        second = asyncio.create_task(m.sync_covering(m.pending_set(np.array([2]))))
        assert await asyncio.to_thread(second_returned.wait, 10)
        release.set()
        return await asyncio.gather(first, second, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, OSError) for r in results), results
    m.close(clean=False)


def test_a_flag_whose_write_failed_is_written_and_synced_again(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag set in memory and not in the file made the next batch skip the write and the
    sync: its write reached the disk with no durable flag."""
    m = DirtyMap.open(tmp_path / "d0.img", SIZE, 7)
    real = durable.pwrite_all
    failing = [True]

    def pwrite_all(fd, buffers, offset):
        if fd == m._fd and failing[0]:
            failing[0] = False
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers, offset)

    monkeypatch.setattr(durable, "pwrite_all", pwrite_all)
    with pytest.raises(OSError, match="No space left"):
        m.set_before_write(np.array([3]))
    assert not m.flags[3]
    assert m.set_before_write(np.array([3])), "the flag was neither written nor synced"
    flags, _ = read_dirty_map(m.path, SIZE)
    assert flags[3] and m.broken is None
    m.close(clean=False)
