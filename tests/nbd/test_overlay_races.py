"""A writable mount's overlay under a dropped connection and a full file system
(FORMAT.md §18.3): a cancelled write's thread never lands after a newer acknowledged
write of its block; a map that cannot be written fails its FLUSH without breaking the
overlay, so that the client can free room and go on."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from rocva import overlay as overlay_mod
from rocva.overlay import Overlay, OverlayIdentity

SIZE = 64 * 4096
IDENTITY = OverlayIdentity(domain=7, timeline=1, seq=42, disk=0, disk_size=SIZE)
NAME = "vm-d"
#: How long the first write's pwrite is held in its thread (a slow disk).
HELD_S = 0.5


async def _lower(offset: int, length: int) -> bytes:
    return b"L" * length


async def test_a_cancelled_write_ends_before_a_newer_write_of_its_block(tmp_path: Path) -> None:
    """Connection 1's write of A is in its thread when its connection drops (the server
    cancels the request); connection 2 then writes B to the same block and flushes. B
    stays: before, the cancelled request let the lock go at once, and A's pwrite landed
    over B after B had been acknowledged and flushed."""
    overlay = Overlay.open(tmp_path, NAME, IDENTITY)
    real = overlay._pwrite_parts
    started = threading.Event()

    def slow(parts):
        if bytes(parts[-1][1][:1]) == b"A":
            started.set()
            threading.Event().wait(HELD_S)
        real(parts)

    overlay._pwrite_parts = slow
    try:
        first = asyncio.create_task(overlay.write(0, b"A" * 4096, _lower))
        await asyncio.to_thread(started.wait, 10)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert first.cancelled()
        await overlay.write(0, b"B" * 4096, _lower)
        await overlay.flush()
        await asyncio.sleep(HELD_S * 2)  # long after the first thread's pwrite
        assert bytes(await overlay.read(0, 4096, _lower)) == b"B" * 4096
    finally:
        overlay.close()
    reopened = Overlay.open(tmp_path, NAME, IDENTITY)
    try:
        assert bytes(await reopened.read(0, 4096, _lower)) == b"B" * 4096
    finally:
        reopened.close()


async def test_a_map_that_cannot_be_written_fails_the_flush_and_breaks_nothing(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC while the new map is staged: the FLUSH fails naming the map and saying the
    next one writes it again; writes, TRIM and flushes still work, and once there is
    room the map holds every block. Before, the overlay broke for good: every later
    write and TRIM failed with EIO, and with no map on disk a restart dropped the data."""
    real = overlay_mod.durable.stage_at
    full = [True]

    def stage_at(*args, **kwargs):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(overlay_mod.durable, "stage_at", stage_at)
    overlay = Overlay.open(tmp_path, NAME, IDENTITY)
    try:
        await overlay.write(0, b"W" * 8192, _lower)
        with pytest.raises(OSError) as failed:
            await overlay.flush()
        assert failed.value.errno == errno.ENOSPC, failed.value
        assert f"{overlay.map_path}: flush failed: the map could not be written" in str(failed.value)
        assert "the next flush writes it again" in str(failed.value)
        assert overlay.broken is None and not overlay.has_map()
        await overlay.write_zeroes(0, 4096, _lower)  # the client frees room
        await overlay.write(8192, b"X" * 4096, _lower)
        full[0] = False
        await overlay.flush()
        assert overlay.has_map() and not list(tmp_path.glob(".tmp-*"))
    finally:
        overlay.close()
    reopened = Overlay.open(tmp_path, NAME, IDENTITY)
    try:
        assert bytes(await reopened.read(0, 12288, _lower)) == bytes(4096) + b"W" * 4096 + b"X" * 4096
    finally:
        reopened.close()


async def test_a_map_that_fails_as_it_is_renamed_into_place_still_breaks_the_overlay(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """Once the rename began (its directory's sync failing, say), no retry could prove
    which map the disk holds: the overlay breaks, as for a failed sync of its file."""
    def publish_at(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(overlay_mod.durable, "publish_at", publish_at)
    overlay = Overlay.open(tmp_path, NAME, IDENTITY)
    try:
        await overlay.write(0, b"W" * 4096, _lower)
        with pytest.raises(OSError, match="flush failed"):
            await overlay.flush()
        assert overlay.broken is not None
        with pytest.raises(OSError, match="a flush of this overlay failed earlier"):
            await overlay.write(4096, b"W" * 4096, _lower)
    finally:
        overlay.close()
