"""FileStore stays below its root: no symbolic link is followed, no special file used.

The daemons run as root. A link planted in the store (a directory component, an
object's name, a lease directory) must not make a get read, a put write, or a delete
unlink anything outside the root; a FIFO planted under a key must not hang a get.
Each case runs twice: with openat2 (where the kernel has it) and with the
component-by-component walk that replaces it under seccomp or on old kernels.

A hard-linked object is a regular file: a get reads it (whoever can link a file into
the store can as well copy it there), and a put or delete only replaces or removes the
store's own name for it, never writes the file the link shares.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cdp import locks
from cdp.errors import AlreadyExists, InvalidKey, NotFound, PreconditionFailed, StoreError
from cdp.store import FileStore
from cdp.store import beneath

VICTIM = b"precious data outside the store root"
SECRET = b"root-only secret: hunter2"
#: A FIFO open that blocked would hang the test: fail it instead.
HANG_S = 10


@pytest.fixture(params=["openat2", "walk"])
def mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """How keys are resolved: openat2, or the O_NOFOLLOW walk (forced)."""
    if request.param == "walk":
        monkeypatch.setattr(beneath, "_openat2_works", False)
    else:
        monkeypatch.setattr(beneath, "_openat2_works", None)  # probed on first use
    yield request.param


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the store, with files the store must never touch."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "victim.seg").write_bytes(VICTIM)
    (out / "secret").write_bytes(SECRET)
    return out


@pytest.fixture
async def store(tmp_path: Path, mechanism: str) -> AsyncIterator[FileStore]:
    s = FileStore(tmp_path / "store")
    await s.put("d/00000007/keep.cat", b"a real object")  # probes openat2 (mechanism)
    if mechanism == "openat2" and not beneath._openat2_works:
        pytest.skip("openat2 refused here (seccomp or kernel): the walk case covers this host")
    yield s
    await s.close()


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry below ``directory``: inode, mode and (for regular files) bytes."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        out[str(path.relative_to(directory))] = (st.st_ino, st.st_mode, data)
    return out


async def keys(store: FileStore, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


def refused(where: str, found: str = "a symbolic link", expected: str = "a directory"):  # type: ignore[no-untyped-def]
    """pytest.raises for the confinement error: a StoreError naming the name found."""
    return pytest.raises(StoreError, match=f"refused: '{where}' is {found}, where {expected}")


async def test_a_round_trip_still_works(store: FileStore, tmp_path: Path) -> None:
    etag = await store.put("d/00000007/seg/00000001/0001.seg", b"0123456789")
    assert await store.get("d/00000007/seg/00000001/0001.seg") == b"0123456789"
    assert await store.get("d/00000007/seg/00000001/0001.seg", 2, 3) == b"234"
    assert await store.get("d/00000007/seg/00000001/0001.seg", -4) == b"6789"
    assert store.read_blocking("d/00000007/seg/00000001/0001.seg", 8) == b"89"
    assert (await store.stat("d/00000007/seg/00000001/0001.seg")).etag == etag
    assert await keys(store) == ["d/00000007/keep.cat", "d/00000007/seg/00000001/0001.seg"]
    assert await keys(store, "d/00000007/seg/") == ["d/00000007/seg/00000001/0001.seg"]
    await store.put("top", b"at the root", if_absent=True)
    with pytest.raises(AlreadyExists):
        await store.put("top", b"again", if_absent=True)
    new = await store.put("top", b"replaced", if_match=(await store.stat("top")).etag)
    with pytest.raises(PreconditionFailed):
        await store.put("top", b"stale", if_match=etag)
    assert (await store.stat("top")).etag == new and await store.get("top") == b"replaced"
    await store.delete("d/00000007/seg/00000001/0001.seg")
    assert not (tmp_path / "store" / "d" / "00000007" / "seg").exists()  # pruned
    with pytest.raises(NotFound):
        await store.get("d/00000007/seg/00000001/0001.seg")
    with pytest.raises(NotFound):
        await store.get("d/00000007")  # a directory is no object
    assert list((tmp_path / "store").rglob(".tmp-*")) == []


async def test_a_symlinked_directory_is_never_followed(store: FileStore, tmp_path: Path, outside: Path) -> None:
    os.symlink(outside, tmp_path / "store" / "d" / "00000007" / "seg")
    before = snapshot(outside)
    victim, link = "d/00000007/seg/victim.seg", "d/00000007/seg"
    with refused(link):
        await store.get(victim)
    with refused(link):
        await store.get(victim, 3, 4)
    with refused(link):
        store.read_blocking(victim, 0, 8)
    with refused(link):
        await store.stat(victim)
    for data, conditions in ((b"x", {}), (b"x", {"if_absent": True}), (b"x", {"if_match": "1-2-3"})):
        with refused(link):
            await store.put(victim, data, **conditions)
        with refused(link):
            await store.put("d/00000007/seg/planted.seg", data, **conditions)
    with refused(link):
        await store.put("d/00000007/seg/new/deeper.seg", b"x")  # would mkdir through it
    with refused(link):
        await store.delete(victim)
    with refused(link):
        await keys(store, "d/00000007/seg/")
    assert await keys(store) == ["d/00000007/keep.cat"]  # a walk skips the link
    assert await keys(store, "d/00000007/") == ["d/00000007/keep.cat"]
    assert snapshot(outside) == before
    assert list((tmp_path / "store").rglob(".tmp-*")) == []


async def test_a_symlinked_object_is_never_followed(store: FileStore, tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "store" / "d" / "00000007" / "x.cat"
    os.symlink(outside / "secret", link)
    before = snapshot(outside)
    expected = r"an object \(a regular file\)"
    with refused("d/00000007/x.cat", expected=expected):
        await store.get("d/00000007/x.cat")
    with refused("d/00000007/x.cat", expected=expected):
        store.read_blocking("d/00000007/x.cat", 5, 5)
    with refused("d/00000007/x.cat", expected=expected):
        await store.stat("d/00000007/x.cat")
    for conditions in ({}, {"if_absent": True}, {"if_match": "1-2-3"}):
        with refused("d/00000007/x.cat", expected=expected):
            await store.put("d/00000007/x.cat", b"new", **conditions)
    with refused("d/00000007/x.cat", expected=expected):
        await store.delete("d/00000007/x.cat")
    assert await keys(store) == ["d/00000007/keep.cat"]
    assert link.is_symlink() and snapshot(outside) == before
    assert list((tmp_path / "store").rglob(".tmp-*")) == []


async def test_a_symlinked_lease_directory_is_refused(store: FileStore, tmp_path: Path, outside: Path) -> None:
    (tmp_path / "store" / "l" / "recovery").mkdir(parents=True)
    lease_dir = tmp_path / "store" / "l" / "recovery" / "00000007"
    os.symlink(outside, lease_dir)
    before = snapshot(outside)
    with refused("l/recovery/00000007"):
        await locks.recovery_lease(store, 7, owner="test recovery")
    with refused("l/recovery/00000007"):
        await locks.list_locks(store, locks.recovery_prefix(7))
    assert snapshot(outside) == before

    # A lease taken before its directory is swapped for a link: its release (a delete)
    # must not remove the same name outside.
    lease_dir.unlink()
    lease = await locks.recovery_lease(store, 7, owner="test recovery")
    name = lease.key.rsplit("/", 1)[1]
    shutil.move(tmp_path / "store" / "l" / "recovery" / "00000007", tmp_path / "moved")
    (outside / name).write_bytes(b"a file that shares the lease's name")
    os.symlink(outside, lease_dir)
    before = snapshot(outside)
    with refused("l/recovery/00000007"):
        await store.put(lease.key, b"renewal", if_match=lease.etag)
    await lease.release()  # logs lock_release_failed: the lease expires by itself
    assert snapshot(outside) == before


async def test_a_fifo_is_no_object(store: FileStore, tmp_path: Path, outside: Path) -> None:
    fifo = tmp_path / "store" / "d" / "00000007" / "0001.seg"
    os.mkfifo(fifo)
    key = "d/00000007/0001.seg"
    expected = r"an object \(a regular file\)"
    async with asyncio.timeout(HANG_S):
        with refused(key, "a FIFO", expected):
            await store.get(key)
        with refused(key, "a FIFO", expected):
            await store.get(key, 0, 10)
        with refused(key, "a FIFO", expected):
            await asyncio.to_thread(store.read_blocking, key, 0, 10)
        with refused(key, "a FIFO", expected):
            await store.stat(key)
        for conditions in ({}, {"if_absent": True}, {"if_match": "1-2-3"}):
            with refused(key, "a FIFO", expected):
                await store.put(key, b"x", **conditions)
        with refused(key, "a FIFO", expected):
            await store.delete(key)
        with refused("d/00000007/0001.seg", "a FIFO"):
            await store.put("d/00000007/0001.seg/below", b"x")
    assert await keys(store) == ["d/00000007/keep.cat"]
    assert fifo.is_fifo()


async def test_a_hard_link_is_read_but_never_written_through(
    store: FileStore, tmp_path: Path, outside: Path
) -> None:
    victim = outside / "victim.seg"
    os.link(victim, tmp_path / "store" / "d" / "00000007" / "linked.seg")
    key = "d/00000007/linked.seg"
    assert await store.get(key) == VICTIM  # a regular file: read (module docstring)
    with pytest.raises(AlreadyExists):
        await store.put(key, b"x", if_absent=True)
    await store.put(key, b"replaced by rename")
    assert victim.read_bytes() == VICTIM and victim.stat().st_nlink == 1
    assert await store.get(key) == b"replaced by rename"

    os.unlink(tmp_path / "store" / "d" / "00000007" / "linked.seg")
    os.link(victim, tmp_path / "store" / "d" / "00000007" / "linked.seg")
    await store.put(key, b"replaced if it matched", if_match=(await store.stat(key)).etag)
    assert victim.read_bytes() == VICTIM and victim.stat().st_nlink == 1

    os.unlink(tmp_path / "store" / "d" / "00000007" / "linked.seg")
    os.link(victim, tmp_path / "store" / "d" / "00000007" / "linked.seg")
    await store.delete(key)  # the store's name only
    assert victim.read_bytes() == VICTIM and victim.stat().st_nlink == 1


async def test_a_file_where_a_directory_is_expected_keeps_its_errors(store: FileStore) -> None:
    with pytest.raises(InvalidKey, match="directory part"):
        await store.put("d/00000007/keep.cat/below", b"x")
    with pytest.raises(NotFound):
        await store.get("d/00000007/keep.cat/below")
    assert await keys(store, "d/00000007/keep.cat/") == []


async def test_a_root_reached_through_a_link_is_configuration(tmp_path: Path, mechanism: str) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    async with FileStore(tmp_path / "alias") as store:
        await store.put("a/b", b"1")
        assert await store.get("a/b") == b"1"
    assert (tmp_path / "real" / "a" / "b").read_bytes() == b"1"


async def test_a_root_removed_or_replaced_is_opened_again(tmp_path: Path, mechanism: str) -> None:
    root = tmp_path / "store"
    store = FileStore(root)
    await store.put("a/b", b"first")
    shutil.rmtree(root)
    with pytest.raises(NotFound):
        await store.get("a/b")
    assert await keys(store) == []
    await store.put("a/b", b"second")  # the root is made again
    assert (root / "a" / "b").read_bytes() == b"second"
    root.rename(tmp_path / "old")
    (root / "a").mkdir(parents=True)
    (root / "a" / "c").write_bytes(b"in the new root")
    assert await store.get("a/c") == b"in the new root"
    await store.close()


async def test_no_fd_is_left_open(tmp_path: Path, outside: Path, mechanism: str) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    store = FileStore(tmp_path / "store")
    await store.put("d/00000007/x.cat", b"1")
    os.symlink(outside, tmp_path / "store" / "d" / "00000007" / "seg")
    for _ in range(20):
        for call in (store.get("d/00000007/seg/victim.seg"), store.put("d/00000007/seg/a/b", b"x"),
                     store.delete("d/00000007/seg/victim.seg"), store.stat("d/00000007/seg/victim.seg")):
            with pytest.raises(StoreError):
                await call
        await store.get("d/00000007/x.cat")
        await store.delete("nothing/here")
    await store.close()
    assert open_fds() == before
