"""FileStore specifics: on-disk layout, crash safety of put, temp files, fsyncs."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from cdp import durable

from cdp.errors import AlreadyExists, InvalidKey, NotFound, StoreUnavailable
from cdp.store import FileStore
from cdp.store import fs as fs_module


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")] if root.exists() else []


async def test_layout_key_is_a_file_under_root(root: Path) -> None:
    store = FileStore(root)
    await store.put("d/00000007/seg/0001.seg", b"abc")
    assert (root / "d" / "00000007" / "seg" / "0001.seg").read_bytes() == b"abc"
    assert temp_files(root) == []


def failing_write(after_bytes: int):  # type: ignore[no-untyped-def]
    """A write_all that writes some bytes, then fails like a full disk."""

    def write(fd: int, data: Any, chunk_bytes_max: int = 0) -> None:
        os.write(fd, bytes(memoryview(data)[:after_bytes]))
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


async def test_a_put_failing_midway_leaves_no_object(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(root)
    monkeypatch.setattr(fs_module, "write_all", failing_write(10))
    with pytest.raises(StoreUnavailable, match="ENOSPC"):
        await store.put("a/b", b"x" * 100)
    with pytest.raises(NotFound):
        await store.get("a/b")
    assert not (root / "a" / "b").exists()
    assert temp_files(root) == []
    assert [i async for i in store.list()] == []


async def test_a_failed_overwrite_keeps_the_old_object(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(root)
    await store.put("a/b", b"old object")
    monkeypatch.setattr(fs_module, "write_all", failing_write(3))
    with pytest.raises(StoreUnavailable):
        await store.put("a/b", b"new object, longer")
    with pytest.raises(StoreUnavailable):
        await store.put("a/b", b"new", if_absent=True)
    assert await store.get("a/b") == b"old object"
    assert temp_files(root) == []


async def test_a_failed_fsync_leaves_no_object(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(root)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(fs_module.os, "fsync", fsync)
    with pytest.raises(StoreUnavailable, match="EIO"):
        await store.put("k", b"data")
    assert not (root / "k").exists()
    assert temp_files(root) == []


async def test_leftover_temp_files_are_ignored(root: Path) -> None:
    store = FileStore(root)
    await store.put("a/b", b"1")
    (root / "a" / ".tmp-deadbeef").write_bytes(b"half an obj")
    (root / ".tmp-0011").write_bytes(b"")
    (root / "not a key").write_bytes(b"foreign file")
    assert [i.key async for i in store.list()] == ["a/b"]
    assert [i.key async for i in store.list("a/")] == ["a/b"]
    await store.put("a/c", b"2")  # a leftover does not disturb new puts
    assert [i.key async for i in store.list()] == ["a/b", "a/c"]


async def test_put_fsyncs_the_file_and_every_new_directory(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root.mkdir()
    synced: list[Path] = []
    real = durable.sync_dir

    def spy(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    # directories made by the store, then the rename done by cdp.durable.publish_at
    monkeypatch.setattr(durable, "sync_dir", spy)
    store = FileStore(root)
    await store.put("x/y/z", b"1")
    # x made in root, y made in x, then the rename into y
    assert synced == [root, root / "x", root / "x" / "y"]


async def test_delete_prunes_empty_directories_but_not_root(root: Path) -> None:
    store = FileStore(root)
    await store.put("a/b/c/d", b"1")
    await store.put("a/e", b"2")
    await store.delete("a/b/c/d")
    assert not (root / "a" / "b").exists()
    assert (root / "a").is_dir()
    await store.delete("a/e")
    assert root.is_dir() and list(root.iterdir()) == []


async def test_a_key_cannot_also_be_a_directory(root: Path) -> None:
    store = FileStore(root)
    await store.put("a/b", b"1")
    with pytest.raises(InvalidKey, match="directory part"):
        await store.put("a", b"2")
    with pytest.raises(NotFound):
        await store.get("a")
    with pytest.raises(NotFound):
        await store.stat("a")
    await store.delete("a")  # not an object: nothing to do
    await store.put("f", b"3")
    with pytest.raises(InvalidKey, match="directory part"):
        await store.put("f/g", b"4")
    with pytest.raises(NotFound):
        await store.get("f/g")


async def test_if_absent_on_a_directory_name_is_not_already_exists(root: Path) -> None:
    store = FileStore(root)
    await store.put("a/b", b"1")
    with pytest.raises(InvalidKey):
        await store.put("a", b"2", if_absent=True)


async def test_if_absent_leaves_no_temp_file(root: Path) -> None:
    store = FileStore(root)
    await store.put("k", b"1", if_absent=True)
    with pytest.raises(AlreadyExists):
        await store.put("k", b"2", if_absent=True)
    assert temp_files(root) == []


async def test_missing_root_is_an_empty_store(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "nowhere")
    assert [i async for i in store.list()] == []
    with pytest.raises(NotFound):
        await store.stat("x")
    await store.delete("x")
    assert store.describe() == f"file://{tmp_path / 'nowhere'}"


async def test_concurrent_put_and_delete_in_one_directory(root: Path) -> None:
    """delete prunes empty directories; a put racing with it must still land."""
    import asyncio

    store = FileStore(root)
    for round_ in range(20):
        await asyncio.gather(store.put(f"r/{round_}/a", b"a"), store.delete(f"r/{round_}/b"))
        await asyncio.gather(store.delete(f"r/{round_}/a"), store.put(f"r/{round_}/b", b"b"))
        assert await store.get(f"r/{round_}/b") == b"b"
