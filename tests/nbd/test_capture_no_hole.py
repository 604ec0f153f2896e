"""WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE on a protected disk: the range reads as zeros and
stays allocated on the primary (a guest that preallocated, or a thin-provisioning test,
asked for exactly that), while one without the flag may be punched. Either way the
captured record is a ZERO, and the store holds the primary byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

from cdp.nbd import protocol as nbd
from tests.nbd.capture_site import DISKS, MiB, protected_site, recover
from tests.nbd.raw_client import RawClient


def allocated_bytes(path: Path) -> int:
    """Bytes of ``path`` backed by storage (a punched hole is not; SEEK_HOLE is no measure:
    ext4 reports a zeroed range's unwritten extents as holes)."""
    return os.stat(path).st_blocks * 512


async def _ok(client: RawClient, command: int, handle: int, offset: int, length: int, flags: int = 0,
              payload: bytes = b"") -> None:
    await client.request(command, handle, offset, length, flags=flags, payload=payload)
    assert (await client.reply()).error == 0


async def test_write_zeroes_with_no_hole_keeps_the_range_allocated(tmp_path: Path) -> None:
    async with protected_site(tmp_path) as site:
        client = await RawClient.connect(site.unix)
        await client.go("db/data")
        for handle, at in ((1, 2 * MiB), (2, 8 * MiB)):
            await _ok(client, nbd.CMD_WRITE, handle, at, MiB, payload=b"\x11" * MiB)
        await _ok(client, nbd.CMD_FLUSH, 3, 0, 0)
        image = site.image("db/data")
        written = allocated_bytes(image)
        await _ok(client, nbd.CMD_WRITE_ZEROES, 4, 2 * MiB, MiB, flags=nbd.CMD_FLAG_NO_HOLE)
        await _ok(client, nbd.CMD_FLUSH, 5, 0, 0)
        assert allocated_bytes(image) >= written, "NO_HOLE: the range was deallocated"
        await _ok(client, nbd.CMD_WRITE_ZEROES, 6, 8 * MiB, MiB)  # may deallocate
        await _ok(client, nbd.CMD_FLUSH, 7, 0, 0)
        assert allocated_bytes(image) <= written - MiB  # this file system punches holes
        await client.close()
        with open(image, "rb") as f:
            for at in (2 * MiB, 8 * MiB):
                f.seek(at)
                assert f.read(MiB) == bytes(MiB), at
        seq = await site.committed()
        assert seq == site.filt.next_seq - 1
        primaries = {name: site.image(name).read_bytes() for name in DISKS}
    images = await recover(tmp_path, tmp_path / "out", "--latest")
    for name in DISKS:
        assert images[name].read_bytes() == primaries[name], name
