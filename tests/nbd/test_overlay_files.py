"""The overlay directory of a writable mount with names planted in it: symbolic links, hard
links to files elsewhere, a FIFO, maps of the wrong size, a lock file that is not one.
The overlay never writes, truncates or blocks on anything but a regular file of its own,
and never reads more of a map than this disk's map holds; the mount locks only a lock
file of its own; a refusal names the file."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from cdp.errors import Busy, ConfigError, FormatError
from rocva.errors import RecoveryError
from rocva.mount import OVERLAY_LOCK_NAME, _OverlayDir
from rocva.overlay import MAP_SUFFIX, Overlay, OverlayIdentity, encode_map

SIZE = 16 * 4096
IDENTITY = OverlayIdentity(domain=7, timeline=1, seq=42, disk=0, disk_size=SIZE)
NAME = "vm-d"
PRECIOUS = b"precious data\n" * 100
#: A blocking open or read fails the test instead of hanging it.
OPEN_TIMEOUT_S = 10.0


async def _lower(offset: int, length: int) -> bytes:
    return bytes(length)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the overlay directory that nothing may change."""
    path = tmp_path / "victim"
    path.write_bytes(PRECIOUS)
    return path


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "overlay"
    path.mkdir()
    return path


async def open_overlay(directory: Path) -> Overlay:
    async with asyncio.timeout(OPEN_TIMEOUT_S):
        return await asyncio.to_thread(Overlay.open, directory, NAME, IDENTITY)


async def write_and_flush(directory: Path) -> None:
    overlay = await open_overlay(directory)
    try:
        await overlay.write(0, b"\x77" * 4096, _lower, fua=True)
        assert bytes(await overlay.read(0, 4096, _lower)) == b"\x77" * 4096
    finally:
        overlay.close()


def a_valid_map() -> bytes:
    """The map a flushed, empty overlay of this disk leaves behind."""
    return encode_map(IDENTITY, 4096, bytes(-(-SIZE // 4096) // 8))


# --------------------------------------------------------------------------- the overlay file


@pytest.mark.parametrize("plant", ["hard_link", "symlink"])
async def test_a_planted_overlay_file_without_a_map_is_replaced_not_written(directory: Path, victim: Path,
                                                                           plant: str) -> None:
    data = directory / (NAME + ".overlay")
    if plant == "hard_link":
        os.link(victim, data)
    else:
        os.symlink(victim, data)
    await write_and_flush(directory)
    assert victim.read_bytes() == PRECIOUS  # neither truncated nor written through the link
    assert not data.is_symlink() and data.stat().st_nlink == 1
    assert data.stat().st_ino != victim.stat().st_ino and data.stat().st_size == SIZE


async def test_a_hard_link_under_a_map_refuses_the_reopen(directory: Path, victim: Path) -> None:
    await write_and_flush(directory)  # a real overlay, with its map
    data = directory / (NAME + ".overlay")
    data.unlink()
    victim.write_bytes(PRECIOUS.ljust(SIZE, b"\x00"))
    os.link(victim, data)  # the same size as the disk: only the link count tells
    with pytest.raises(RecoveryError, match=rf"{re.escape(str(data))} has 2 hard links"):
        await open_overlay(directory)
    assert victim.read_bytes() == PRECIOUS.ljust(SIZE, b"\x00")


async def test_a_map_without_its_overlay_file_is_refused_by_name(directory: Path) -> None:
    await write_and_flush(directory)
    (directory / (NAME + ".overlay")).unlink()
    with pytest.raises(FormatError, match=rf"{re.escape(str(directory / (NAME + '.overlay')))} is missing"):
        await open_overlay(directory)


# --------------------------------------------------------------------------- the map


async def test_a_fifo_as_the_map_is_refused_without_blocking(directory: Path) -> None:
    fifo = directory / (NAME + MAP_SUFFIX)
    os.mkfifo(fifo)
    with pytest.raises(RecoveryError, match=rf"{re.escape(str(fifo))} is not a regular file"):
        await open_overlay(directory)


async def test_a_link_to_dev_zero_as_the_map_is_refused(directory: Path) -> None:
    link = directory / (NAME + MAP_SUFFIX)
    os.symlink("/dev/zero", link)
    with pytest.raises(RecoveryError, match=rf"{re.escape(str(link))} is a symbolic link"):
        await open_overlay(directory)


async def test_a_hard_linked_map_is_refused(directory: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "map-elsewhere"
    elsewhere.write_bytes(a_valid_map())
    os.link(elsewhere, directory / (NAME + MAP_SUFFIX))
    with pytest.raises(RecoveryError, match="2 hard links"):
        await open_overlay(directory)


async def test_a_map_longer_than_its_header_promises_is_refused_unread(directory: Path) -> None:
    """A valid header followed by a 1 GiB hole: refused from its size, not read."""
    path = directory / (NAME + MAP_SUFFIX)
    path.write_bytes(a_valid_map())
    os.truncate(path, 1 << 30)
    promised = len(a_valid_map())
    with pytest.raises(FormatError, match=rf"{re.escape(str(path))}: {1 << 30} bytes, the header promises {promised}"):
        await open_overlay(directory)


async def test_a_map_of_another_disk_is_still_named_as_such(directory: Path) -> None:
    """The header is checked before the size: a map made for a larger disk (so a longer
    file) is refused as another disk's (ConfigError), not as a damaged file."""
    other = OverlayIdentity(domain=7, timeline=1, seq=42, disk=0, disk_size=4 * SIZE)
    (directory / (NAME + MAP_SUFFIX)).write_bytes(encode_map(other, 4096, bytes(-(-4 * SIZE // 4096) // 8)))
    with pytest.raises(ConfigError, match="disk_size"):
        await open_overlay(directory)


async def test_a_short_map_is_refused(directory: Path) -> None:
    path = directory / (NAME + MAP_SUFFIX)
    path.write_bytes(a_valid_map()[:40])
    with pytest.raises(FormatError, match=rf"{re.escape(str(path))}: 40 bytes"):
        await open_overlay(directory)


async def test_the_map_is_replaced_not_written_through_a_planted_link(directory: Path, victim: Path) -> None:
    """A flush replaces the map by rename: a link planted under its name after the open
    is replaced, never written through."""
    overlay = await open_overlay(directory)
    try:
        os.symlink(victim, directory / (NAME + MAP_SUFFIX))
        await overlay.write(0, b"\x11" * 4096, _lower, fua=True)
    finally:
        overlay.close()
    assert victim.read_bytes() == PRECIOUS
    assert not (directory / (NAME + MAP_SUFFIX)).is_symlink()
    reopened = await open_overlay(directory)
    try:
        assert bytes(await reopened.read(0, 4096, _lower)) == b"\x11" * 4096
    finally:
        reopened.close()


# --------------------------------------------------------------------------- the lock file


async def lock_directory(directory: Path) -> _OverlayDir:
    async with asyncio.timeout(OPEN_TIMEOUT_S):
        return await asyncio.to_thread(_OverlayDir.make, directory)


@pytest.mark.parametrize("plant,found", [("symlink", "a symbolic link"), ("dangling_symlink", "a symbolic link"),
                                         ("fifo", "a FIFO"), ("directory", "a directory"),
                                         ("hard_link", "a file with 2 hard links")])
async def test_a_planted_lock_file_is_refused_by_name(directory: Path, victim: Path, plant: str,
                                                      found: str) -> None:
    """Each used to end cdp mount with a bare OSError (exit 1: "Too many levels of symbolic
    links") or to lock a file that is not the mount's own."""
    lock = directory / OVERLAY_LOCK_NAME
    if plant == "symlink":
        os.symlink(victim, lock)
    elif plant == "dangling_symlink":
        os.symlink(directory / "nowhere", lock)
    elif plant == "fifo":
        os.mkfifo(lock)
    elif plant == "directory":
        lock.mkdir()
    else:
        os.link(victim, lock)
    with pytest.raises(RecoveryError, match=rf"^{re.escape(str(lock))}: {found} where the overlay directory's "
                                            rf"lock file is expected") as refused:
        await lock_directory(directory)
    assert refused.value.exit_code == 6
    assert victim.read_bytes() == PRECIOUS
    assert not (directory / "nowhere").exists()  # a dangling link's target is not created


async def test_the_lock_file_is_created_then_reused_and_held(directory: Path) -> None:
    first = await lock_directory(directory)
    try:
        assert (directory / OVERLAY_LOCK_NAME).stat().st_nlink == 1
        with pytest.raises(Busy, match="another cdp mount uses it"):
            await lock_directory(directory)
    finally:
        first.close(keep=True)
    again = await lock_directory(directory)  # the lock file left behind is the mount's own: reused
    again.close(keep=True)


# ---------------------------------------------------------------------- another user's files

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="files of another user take root to make")


@needs_root
async def test_an_overlay_of_another_users_files_is_refused(directory: Path) -> None:
    """The map and the overlay file of another user: they could have written the map (its
    checksums are no signature), or hold the file open and change what is served after
    every check. Each is refused by name."""
    await write_and_flush(directory)
    os.chown(directory / (NAME + ".overlay"), NOBODY, NOBODY)
    with pytest.raises(RecoveryError, match=rf"{re.escape(NAME)}\.overlay belongs to uid {NOBODY}, not to this "
                                            rf"mount's \(uid 0\)"):
        await open_overlay(directory)
    os.chown(directory / (NAME + MAP_SUFFIX), NOBODY, NOBODY)
    with pytest.raises(RecoveryError, match=rf"{re.escape(NAME + MAP_SUFFIX)} belongs to uid {NOBODY}"):
        await open_overlay(directory)


@needs_root
@pytest.mark.parametrize("setup,problem", [
    (lambda d: d.chmod(0o777), "may be written by other users (mode 0777)"),
    (lambda d: d.chmod(0o770), "may be written by other users (mode 0770)"),
    (lambda d: os.chown(d, NOBODY, NOBODY), f"is owned by uid {NOBODY}"),
    (lambda d: os.chown(d.parent, NOBODY, NOBODY), f"is owned by uid {NOBODY}"),
])
async def test_an_overlay_directory_another_user_controls_is_refused(directory: Path, setup, problem: str) -> None:
    """Such a user could plant the overlay's files, or swap the directory between the
    mount's lock and its overlays: refused before anything is made or locked there."""
    setup(directory)
    with pytest.raises(ConfigError, match=re.escape(problem)) as refused:
        await lock_directory(directory)
    assert str(refused.value).startswith(f"--overlay {directory}: ")
    assert not (directory / OVERLAY_LOCK_NAME).exists()


@needs_root
async def test_a_lock_file_of_another_user_is_refused(directory: Path) -> None:
    """Held locked by its owner, it kept every mount out of the directory (Busy)."""
    lock = directory / OVERLAY_LOCK_NAME
    lock.write_bytes(b"")
    os.chown(lock, NOBODY, NOBODY)
    with pytest.raises(RecoveryError, match=rf"a file of uid {NOBODY} where the overlay directory's lock file"):
        await lock_directory(directory)


async def test_a_missing_overlay_directory_is_made_ours_alone(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "overlay"
    before = os.umask(0)
    try:
        made = await lock_directory(directory)
    finally:
        os.umask(before)
    try:
        assert (directory.stat().st_mode & 0o777, directory.parent.stat().st_mode & 0o777) == (0o700, 0o700)
    finally:
        made.close(keep=True)


async def test_temporary_maps_a_crash_left_are_removed_and_nothing_else(directory: Path, victim: Path) -> None:
    """A crash between staging a map and renaming it leaves ``.tmp-<map>-<12 hex>``: the
    next open removes those names (a link among them is unlinked, never followed), and
    leaves every other name alone."""
    stale = directory / f".tmp-{NAME}{MAP_SUFFIX}-0123456789ab"
    stale.write_bytes(b"half a map")
    linked = directory / f".tmp-{NAME}{MAP_SUFFIX}-ba9876543210"
    os.symlink(victim, linked)
    others = [directory / f".tmp-other{MAP_SUFFIX}-0123456789ab", directory / f".tmp-{NAME}{MAP_SUFFIX}-xyz"]
    for path in others:
        path.write_bytes(b"not ours")
    overlay = await open_overlay(directory)
    overlay.close()
    assert not os.path.lexists(stale) and not os.path.lexists(linked)
    assert all(path.read_bytes() == b"not ours" for path in others) and victim.read_bytes() == PRECIOUS
