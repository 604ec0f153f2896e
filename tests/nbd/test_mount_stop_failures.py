"""What a writable mount does with its clients' writes when stopping goes wrong, and the
rehydration directory's refusals (FORMAT.md §18.3, §18.4, §14).

- Applying the overlay to the rehydrated images fails (a full file system, an image
  removed): the temporary overlay directory — the only copy of flushed writes — is kept,
  and the error names it and says how to apply it; the recipe it gives works.
- The image's name swapped, while serving, for a hard link to another file: nothing is
  written to that file, and ``cdp mount`` exits non-zero naming the image.
- ``--rehydrate-to`` an existing file or FIFO: a usage error (exit 2) before serving.
- A refused recovery leaves no ``.recover.lock``; a lock another holds is left alone.

Failures are injected (monkeypatch, a name removed or swapped), never by filling a file
system.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cdp.nbd import protocol as nbd
from cdp.store.fs import FileStore
from rocva import RecoverOptions, RecoveryError, Target, recover
from rocva.mount import Mount, MountOptions
from rocva.overlay import Overlay
from rocva.recover import LOCK_NAME
from tests.nbd.mount_fixtures import MOUNT_START_S, KiB, build_domain, new_builder, run_mount_to_end, start_mount
from tests.nbd.raw_client import RawClient

WRITTEN = b"\xab" * (4 * KiB)
#: Where the tests write: a block of vm1/sys.
WRITE_AT = 8 * KiB


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stop-failures")

    async def build() -> Path:
        await build_domain(await new_builder(FileStore(root / "store")), root / "store")
        return root / "store"

    return asyncio.run(build())


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch) -> Path:
    """Temporary overlay directories of in-process mounts go under the test's directory."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


async def rehydrated_mount(store: FileStore, rehydrate_to: Path, overlay_dir: Path | None = None) -> Mount:
    """A writable mount of the latest point, rehydrated into ``rehydrate_to``."""
    mount = await Mount.open(store, MountOptions(7, Target.latest(), writable=True, overlay_dir=overlay_dir,
                                                 rehydrate_to=rehydrate_to))
    done = asyncio.Event()
    mount.start_rehydration(lambda summary: done.set())
    async with asyncio.timeout(MOUNT_START_S):
        while not done.is_set() and mount.rehydrate_error is None:
            await asyncio.sleep(0.01)
    assert mount.rehydrate_error is None and mount.rehydrated, mount.rehydrate_error
    return mount


async def write_and_flush(mount: Mount) -> None:
    disk = mount.disks["vm1/sys"]
    await disk.write(WRITE_AT, WRITTEN, fua=True)
    await disk.flush()


def image_block(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(WRITE_AT)
        return f.read(len(WRITTEN))


# --------------------------------------------------------------------------- the overlay is kept


async def test_a_failed_apply_keeps_the_temporary_overlay_and_says_how_to_apply_it(
        store_dir: Path, tmp_path: Path, temp_root: Path, monkeypatch) -> None:
    store = FileStore(store_dir)
    mount = await rehydrated_mount(store, tmp_path / "R")
    await write_and_flush(mount)
    overlay_dir = mount.overlay_dir.path
    assert overlay_dir.parent == temp_root

    def full(self, image_fd: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(Overlay, "apply_to", full)
        with pytest.raises(RecoveryError) as caught:
            await mount.close()
    message = caught.value.message
    assert "No space left on device" in message and str(overlay_dir) in message, message
    assert f"--overlay {overlay_dir}" in message and "--rehydrate-to" in message, message
    assert caught.value.exit_code != 0
    assert (overlay_dir / "vm1-sys.overlay.map").is_file(), "the only copy of the flushed writes was removed"
    assert image_block(tmp_path / "R" / "vm1-sys.img") != WRITTEN

    # The recipe of the message: the same point, the kept overlay, a new directory.
    again = await rehydrated_mount(store, tmp_path / "R2", overlay_dir=overlay_dir)
    summary = await again.close()
    assert summary["overlay_bytes_applied"] > 0
    assert image_block(tmp_path / "R2" / "vm1-sys.img") == WRITTEN


async def test_an_image_removed_while_serving_keeps_the_overlay(store_dir: Path, tmp_path: Path,
                                                                 temp_root: Path) -> None:
    mount = await rehydrated_mount(FileStore(store_dir), tmp_path / "R")
    await write_and_flush(mount)
    overlay_dir = mount.overlay_dir.path
    (tmp_path / "R" / "vm1-sys.img").unlink()
    with pytest.raises(RecoveryError, match=r"vm1-sys\.img was removed") as caught:
        await mount.close()
    assert str(overlay_dir) in caught.value.message
    assert (overlay_dir / "vm1-sys.overlay.map").is_file()


async def test_a_failed_flush_at_stop_keeps_the_overlay(store_dir: Path, tmp_path: Path, temp_root: Path,
                                                        monkeypatch) -> None:
    mount = await Mount.open(FileStore(store_dir), MountOptions(7, Target.latest(), writable=True))
    await write_and_flush(mount)
    overlay_dir = mount.overlay_dir.path

    async def failing_flush(self) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(Overlay, "flush", failing_flush)
        with pytest.raises(RecoveryError, match="Input/output error"):
            await mount.close()
    assert (overlay_dir / "vm1-sys.overlay.map").is_file()


async def test_a_stop_whose_first_flush_fails_names_the_overlay_with_no_map(store_dir: Path, tmp_path: Path,
                                                                              temp_root: Path, monkeypatch) -> None:
    """No flush of vm1/sys's overlay ever completed: the stop's own flush is the first, and
    it fails. The error says those writes are lost — a mount on the kept directory starts
    that overlay empty, which it then does — and names no disk that was not written."""
    mount = await Mount.open(FileStore(store_dir), MountOptions(7, Target.latest(), writable=True))
    await mount.disks["vm1/sys"].write(WRITE_AT, WRITTEN, fua=False)
    overlay_dir = mount.overlay_dir.path

    async def failing_flush(self) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(Overlay, "flush", failing_flush)
        with pytest.raises(RecoveryError, match="Input/output error") as caught:
            await mount.close()
    message = caught.value.message
    assert ("The overlay of vm1/sys has no map (no flush of it ever completed): a mount on this directory starts "
            "it empty, so the writes made through its export since this mount started are lost. The writes made "
            f"through the other exports are kept in the overlay directory {overlay_dir} (not removed)") in message, \
        message
    others = [name for name in mount.disks if name != "vm1/sys"]
    assert others and not any(f"The overlay of {name} has no map" in message for name in others), message
    assert not (overlay_dir / "vm1-sys.overlay.map").exists()

    # What the message says: the same point on the kept directory reads the block unwritten.
    again = await Mount.open(FileStore(store_dir), MountOptions(7, Target.latest(), writable=True,
                                                                overlay_dir=overlay_dir))
    try:
        assert bytes(await again.disks["vm1/sys"].read(WRITE_AT, len(WRITTEN))) != WRITTEN
    finally:
        await again.close()


async def test_a_clean_stop_still_removes_the_temporary_overlay(store_dir: Path, tmp_path: Path,
                                                                temp_root: Path) -> None:
    mount = await rehydrated_mount(FileStore(store_dir), tmp_path / "R")
    await write_and_flush(mount)
    overlay_dir = mount.overlay_dir.path
    summary = await mount.close()
    assert summary["overlay_bytes_applied"] > 0 and summary["overlay"] is None
    assert not overlay_dir.exists()
    assert image_block(tmp_path / "R" / "vm1-sys.img") == WRITTEN


# --------------------------------------------------------------------------- the image's name swapped


async def test_an_image_name_swapped_for_a_hard_link_is_not_written(store_dir: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """``cdp mount`` as a user runs it: the image's name now leads to another file (a hard
    link to a victim); the client's FUA write lands in neither that file nor, by path,
    anything else; the mount exits non-zero naming the image and the kept overlay."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the mount's temporary overlay directory
    out = tmp_path / "R"
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"V" * (64 * KiB))
    mounted = await start_mount(f"file://{store_dir}", tmp_path, "--latest", "--nbd", "127.0.0.1:0",
                                "--writable", "--rehydrate-to", str(out))
    try:
        event = await mounted.next_event()
        assert event["event"] == "rehydrated", event
        os.rename(out / "vm1-sys.img", out / "moved.img")
        os.link(victim, out / "vm1-sys.img")
        address = mounted.serving["address"]
        client = await RawClient.connect((address["host"], address["port"]))
        await client.go("vm1/sys")
        await client.request(nbd.CMD_WRITE, 1, WRITE_AT, len(WRITTEN), nbd.CMD_FLAG_FUA, WRITTEN)
        assert (await client.reply()).error == 0
        await client.request(nbd.CMD_READ, 2, WRITE_AT, len(WRITTEN))
        assert (await client.reply(len(WRITTEN))).data == WRITTEN
        await client.close()
    finally:
        mounted.proc.terminate()
        async with asyncio.timeout(MOUNT_START_S):
            await mounted.proc.communicate()
    err = mounted.stderr()
    overlay_dir = Path(mounted.serving["overlay"])
    assert mounted.proc.returncode == 6, err
    assert f"{out / 'vm1-sys.img'} now leads to another file" in err and str(overlay_dir) in err, err
    assert victim.read_bytes() == b"V" * (64 * KiB)
    assert image_block(out / "moved.img") != WRITTEN
    assert (overlay_dir / "vm1-sys.overlay.map").is_file()
    shutil.rmtree(overlay_dir)


# --------------------------------------------------------------------------- --rehydrate-to refused


async def test_rehydrate_to_a_file_or_a_fifo_is_a_usage_error(store_dir: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"not a directory\n")
    a_fifo = tmp_path / "a-fifo"
    os.mkfifo(a_fifo)
    for target in (a_file, a_fifo, a_file / "below"):
        code, out, err = await run_mount_to_end(f"file://{store_dir}", tmp_path, "--latest", "--nbd", "127.0.0.1:0",
                                                "--rehydrate-to", str(target))
        assert code == 2 and not out.strip(), (target, code, out, err)
        assert "--rehydrate-to" in err and "is not a directory" in err and "Traceback" not in err, err
    assert a_file.read_bytes() == b"not a directory\n"


# --------------------------------------------------------------------------- the recovery's lock file


async def test_a_refused_recovery_leaves_no_lock_file(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "R"
    out.mkdir()
    (out / "vm1-sys.img").write_bytes(b"someone's file\n")
    with pytest.raises(RecoveryError, match="already exists"):
        await recover(FileStore(store_dir), 7, RecoverOptions(Target.latest(), out))
    assert sorted(p.name for p in out.iterdir()) == ["vm1-sys.img"]  # no .recover.lock
    assert (out / "vm1-sys.img").read_bytes() == b"someone's file\n"


async def test_a_lock_another_recovery_holds_is_left_in_place(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "R"
    out.mkdir()
    held = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: flock tells them apart
        ino = os.fstat(held).st_ino
        with pytest.raises(RecoveryError, match="another recovery is running"):
            await recover(FileStore(store_dir), 7, RecoverOptions(Target.latest(), out))
        assert os.stat(out / LOCK_NAME).st_ino == ino
    finally:
        os.close(held)
    result = await recover(FileStore(store_dir), 7, RecoverOptions(Target.latest(), out))  # free again
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(i["path"]).name for i in result["images"])
