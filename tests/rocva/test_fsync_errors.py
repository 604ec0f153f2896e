"""A failed fsync is for good ("fsyncgate", ``cdp.durable.StickySync``).

After a failed write-back Linux reports the error to one fsync of each open file and
marks the lost pages clean: the next fsync returns 0 although the bytes never reached the
disk, and the cache keeps serving them. Failures are injected as the kernel behaves
(``KernelLike``: one fsync or fdatasync raises, every later one returns 0), never by
filling a file system.

- A writable mount's overlay: a failed FLUSH breaks it for good (every later FLUSH, FUA,
  write fails with EIO naming the overlay file) and the map is never written again, so
  a restart serves the overlay of the last good FLUSH — not zeros for lost blocks.
- ``recover``: no state is written after a failed fsync (never ``complete``, never a
  newer ``done``); the error names the file, the directory, the bytes still needed, and
  the same command resumes, proving what it keeps with reads past the page cache (a
  read that fails proves nothing: the state is discarded).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cdp import durable
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptions, RecoveryError, Target, recover
from rocva import resume as resume_mod
from rocva.mount import Mount, MountOptions
from rocva.overlay import Overlay, OverlayIdentity
from rocva.resume import STATE_NAME
from tests.nbd.mount_fixtures import build_domain, new_builder
from tests.rocva.build import seed_initial

KiB = 1 << 10


def path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class KernelLike:
    """``os.fsync`` and ``os.fdatasync`` of the files ``which`` picks by path: the
    ``nth`` such call raises ``code`` once; every other returns as the real call does —
    0 after the failure, as Linux does once it has reported a failed write-back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, which: Callable[[str], bool], nth: int = 1,
                 code: int = errno.ENOSPC) -> None:
        self.calls = 0
        self.failed: list[str] = []

        def wrap(real):
            def sync(fd: int) -> None:
                path = path_of(fd)
                if which(path):
                    self.calls += 1
                    if self.calls == nth:
                        self.failed.append(path)
                        raise OSError(code, os.strerror(code))
                real(fd)
            return sync

        monkeypatch.setattr(os, "fsync", wrap(os.fsync))
        monkeypatch.setattr(os, "fdatasync", wrap(os.fdatasync))


# --------------------------------------------------------------------------- the overlay

IDENTITY = OverlayIdentity(domain=1, timeline=1, seq=100, disk=0, disk_size=1 << 20)


async def lower(offset: int, length: int) -> bytes:
    return b"\x11" * length  # the point's bytes


async def test_a_failed_flush_breaks_the_overlay_and_its_map_names_only_flushed_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ov = Overlay.open(tmp_path, "vm-d0", IDENTITY)
    await ov.write(0, b"\x01" * 4096, lower)
    await ov.flush()  # a good flush: block 0 is in the map
    KernelLike(monkeypatch, lambda p: p.endswith(".overlay"))
    await ov.write(8 * KiB, b"\x02" * 8192, lower)  # acked to the client, not flushed
    with pytest.raises(OSError) as first:
        await ov.flush()
    with pytest.raises(OSError) as again:  # the kernel would say 0: a success the client must never see
        await ov.flush()
    assert first.value.errno == errno.ENOSPC and str(ov.data_path) in str(first.value)
    assert again.value.errno == errno.EIO and str(ov.data_path) in str(again.value)
    for refused in (lambda: ov.write(64 * KiB, b"\x03" * 4096, lower),
                    lambda: ov.write(64 * KiB, b"\x03" * 4096, lower, fua=True),
                    lambda: ov.write_zeroes(64 * KiB, 8192, lower)):
        with pytest.raises(OSError) as caught:
            await refused()
        assert caught.value.errno == errno.EIO and "no more writes" in str(caught.value)
    assert ov.broken is not None
    ov.close()

    # A restart: the map is the last good one; the lost blocks read from the point.
    ov = Overlay.open(tmp_path, "vm-d0", IDENTITY)
    try:
        assert ov.blocks_written == 1
        assert bytes(await ov.read(0, 4096, lower)) == b"\x01" * 4096
        assert bytes(await ov.read(8 * KiB, 8192, lower)) == b"\x11" * 8192
    finally:
        ov.close()


async def test_a_flush_cancelled_during_its_failing_sync_still_breaks_the_overlay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The NBD server cancels a connection's requests when it ends: a FLUSH whose
    fdatasync was failing in its thread lost the error, and the next flush (the kernel's
    0) wrote a map naming the lost blocks."""
    import threading

    ov = Overlay.open(tmp_path, "vm-d0", IDENTITY)
    await ov.write(0, b"\x01" * 4096, lower)
    await ov.flush()
    real, calls, started, release = os.fdatasync, [], threading.Event(), threading.Event()

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            started.set()
            release.wait(30)  # a slow write-back ...
            raise OSError(errno.EIO, "Input/output error")  # ... that fails
        real(fd)  # then 0, as Linux says once it reported the failure
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    await ov.write(8 * KiB, b"\x02" * 8192, lower)
    flushing = asyncio.create_task(ov.flush())
    await asyncio.to_thread(started.wait, 30)
    flushing.cancel()  # the client went away
    release.set()
    await asyncio.gather(flushing, return_exceptions=True)
    assert ov.broken is not None and ov.broken.errno == errno.EIO
    with pytest.raises(OSError, match="no more writes"):
        await ov.flush()
    ov.close()
    ov = Overlay.open(tmp_path, "vm-d0", IDENTITY)
    try:
        assert ov.blocks_written == 1  # the map is the last good one
    finally:
        ov.close()


@pytest.fixture(scope="module")
def mount_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsync-mount")

    async def build() -> Path:
        await build_domain(await new_builder(FileStore(root / "store")), root / "store")
        return root / "store"

    return asyncio.run(build())


async def test_a_mount_whose_overlay_flush_failed_stops_with_an_error_and_keeps_the_rest(
        mount_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop's flush must not succeed where the client's failed; the other disk's
    overlay is still flushed; a mount started again serves the last good flush."""
    overlay_dir = tmp_path / "ovl"
    options = MountOptions(7, Target.latest(), writable=True, overlay_dir=overlay_dir)
    mount = await Mount.open(FileStore(mount_store), options)
    sys_disk, data_disk = mount.disks["vm1/sys"], mount.disks["vm2/data"]
    before = bytes(await sys_disk.read(8 * KiB, 4096))
    KernelLike(monkeypatch, lambda p: p.endswith("vm1-sys.overlay"))
    await sys_disk.write(8 * KiB, b"\xab" * 4096, fua=False)
    await data_disk.write(0, b"\xcd" * 4096, fua=False)
    with pytest.raises(OSError):
        await sys_disk.flush()  # the client sees its FLUSH fail
    with pytest.raises(RecoveryError) as caught:
        await mount.close()
    message = caught.value.message
    assert "vm1/sys" in message and "may be lost" in message and str(overlay_dir) in message, message
    assert "vm1-sys.overlay" in message, message
    monkeypatch.undo()

    again = await Mount.open(FileStore(mount_store), options)
    try:
        assert bytes(await again.disks["vm1/sys"].read(8 * KiB, 4096)) == before
        assert bytes(await again.disks["vm2/data"].read(0, 4096)) == b"\xcd" * 4096
    finally:
        await again.close()


# --------------------------------------------------------------------------- recover


async def small_domain(tmp_path: Path) -> DomainBuilder:
    rng = np.random.default_rng(8)
    b = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("vm", "a", 1 << 20), ("vm", "b", 512 * KiB)),
                            block_raw_size=4 * KiB).start()
    await seed_initial(b, 0, rng, chunk=64 * KiB)
    await random_workload(b, rng, 300, seal_every=12, max_sectors=16)
    return b


def saved(out: Path) -> dict:
    return json.loads((out / STATE_NAME).read_text())


def images(which: str) -> Callable[[str], bool]:
    return lambda p: p.endswith(which)


async def test_a_failed_fsync_at_the_last_save_never_leaves_a_complete_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last save (``complete: true``) fails in its fsync; the error path saved again,
    that fsync returned 0, and the state said complete over bytes the kernel dropped."""
    b = await small_domain(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(resume_mod, "STATE_SAVE_INTERVAL_S", 1e9)  # no save between the first and the last
    # The first save syncs both new images (calls 1, 2); the last one starts with vm-a (3).
    kernel = KernelLike(monkeypatch, images(".img.partial"), nth=3)
    with pytest.raises(Exception) as caught:
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, concurrency=2))
    assert kernel.failed == [str(out / "vm-a.img.partial")]
    state = saved(out)
    assert not state["complete"] and state["done"] == {}, "a state was written after a failed fsync"
    assert isinstance(caught.value, RecoveryError), caught.value
    message = caught.value.message
    assert str(out / "vm-a.img.partial") in message and "fsync failed (No space left on device)" in message
    assert "run the same command again" in message and STATE_NAME in message
    monkeypatch.undo()
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert f"still needs {result['bytes_written']} of the plan's {result['bytes_written']} bytes" in message


async def test_a_failed_background_save_stops_the_run_and_no_newer_state_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = await small_domain(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(resume_mod, "STATE_SAVE_INTERVAL_S", 0.0)  # a save after every group
    KernelLike(monkeypatch, images(".img.partial"), nth=3)  # the first background save's first fsync
    with pytest.raises(Exception) as caught:
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, concurrency=1))
    assert saved(out)["done"] == {}, "the state claims groups written around a failed fsync"
    assert not saved(out)["complete"]
    assert isinstance(caught.value, RecoveryError) and "fsync failed" in caught.value.message, caught.value
    monkeypatch.undo()
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert [i["sha256"] for i in result["images"]] == b.snapshot()


async def full_after(b: DomainBuilder, out: Path, monkeypatch: pytest.MonkeyPatch, writes_ok: int) -> None:
    """A recovery into ``out`` whose pwrites to vm-b fail with ENOSPC after ``writes_ok``,
    saving its state after every group."""
    monkeypatch.setattr(resume_mod, "STATE_SAVE_INTERVAL_S", 0.0)
    real_pwrite = os.pwrite
    writes = [0]

    def pwrite(fd, data, offset):
        if path_of(fd).endswith("vm-b.img.partial"):
            writes[0] += 1
            if writes[0] > writes_ok:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, concurrency=1))


async def test_a_full_file_system_names_the_image_and_the_rerun_resumes_past_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cdp: error: No space left on device`` said nothing of which file, where, or how
    much more room the recovery needed."""
    b = await small_domain(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(RecoveryError) as caught:
        await full_after(b, out, monkeypatch, 40)
    message = caught.value.message
    assert str(out / "vm-b.img.partial") in message and "No space left on device" in message, message
    assert f"into {out} still needs" in message and "bytes are free" in message, message
    assert "run the same command again" in message and caught.value.exit_code == 6
    done = saved(out)["done"]
    assert done, "the groups saved before the failure"
    monkeypatch.undo()

    direct = []
    real_direct = resume_mod.read_direct_into

    def read_direct_into(fd, start, end, buf):
        direct.append(end - start)
        return real_direct(fd, start, end, buf)

    monkeypatch.setattr(resume_mod, "read_direct_into", read_direct_into)
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert result["resumed"] and result["groups_skipped"] == len(done)
    assert direct, "the done groups were proved through the page cache"
    assert [i["sha256"] for i in result["images"]] == b.snapshot()


async def test_a_read_back_that_fails_proves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct read reports a write-back that failed after the state was saved (the
    kernel's ``AS_ENOSPC``, met on a thin device): the bytes the state claims may be gone,
    so the state is discarded and the work redone — not a crash, not a trusted state."""
    b = await small_domain(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(RecoveryError):
        await full_after(b, out, monkeypatch, 40)
    assert saved(out)["done"]
    monkeypatch.undo()

    def read_direct_into(fd, start, end, buf):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(resume_mod, "read_direct_into", read_direct_into)
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert not result["resumed"], result["state_discarded"]
    assert "reading the images back failed (No space left on device)" in result["state_discarded"]
    assert [i["sha256"] for i in result["images"]] == b.snapshot()


async def test_a_state_that_cannot_be_written_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = await small_domain(tmp_path)
    out = tmp_path / "out"
    real = durable.atomic_write_at

    def atomic_write_at(dir_fd, name, data, **kw):
        if name == STATE_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(dir_fd, name, data, **kw)

    monkeypatch.setattr(durable, "atomic_write_at", atomic_write_at)
    with pytest.raises(RecoveryError) as caught:
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out))
    message = caught.value.message
    assert str(out / STATE_NAME) in message and "No space left on device" in message, message
    assert "run the same command again" in message


def test_the_reader_of_a_resume_falls_back_to_a_dropped_cache(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the file system refuses O_DIRECT the image's cache is dropped first."""
    from rocva.resume import DeviceReader

    data = os.urandom(3 * 4096 + 100)
    path = tmp_path / "img"
    path.write_bytes(data)
    dropped = []
    monkeypatch.setattr(resume_mod, "read_direct_into", lambda fd, a, b, buf: None)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, a, b, advice: dropped.append((a, b, advice)))
    fd = os.open(path, os.O_RDONLY)
    try:
        read = DeviceReader()
        assert bytes(read(fd, 5, 9000)) == data[5:9005] and bytes(read(fd, 12000, 5000)) == data[12000:]
        assert bytes(read(fd, len(data), 10)) == b""
    finally:
        os.close(fd)
    assert dropped == [(0, 0, os.POSIX_FADV_DONTNEED)]
