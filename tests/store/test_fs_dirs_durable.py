"""A file-store put returns only once its object is durable, whatever it found there:
a directory on the key's path or the object itself may have been made by a writer that
was killed (or is paused) between its ``mkdir``/``link`` and its directory sync. Found
is not durable; a power cut then takes the directory, or the object a catalog
generation names, away."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdp import durable
from cdp.errors import AlreadyExists
from cdp.store import FileStore
from cdp.store import beneath


@pytest.fixture
def synced(monkeypatch) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of every directory synced, in order."""
    seen: list[tuple[int, int]] = []
    real = durable.sync_dir

    def record(fd: int) -> None:
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(durable, "sync_dir", record)
    monkeypatch.setattr(beneath, "_linked", {})  # a fresh process: nothing known durable yet
    return seen


def _ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


async def test_a_directory_found_unsynced_is_synced_into_its_parent(tmp_path: Path, synced) -> None:
    store = FileStore(tmp_path / "store")
    (tmp_path / "store" / "c" / "ab").mkdir(parents=True)  # a killed writer's mkdirs, never synced
    await store.put("c/ab/abbb.chk", b"chunk")
    assert _ident(tmp_path / "store") in synced  # c's entry in the root
    assert _ident(tmp_path / "store" / "c") in synced  # ab's entry in c
    synced.clear()
    await store.put("c/ab/abcc.chk", b"chunk 2")  # known durable now: only the object's own sync
    assert synced == [_ident(tmp_path / "store" / "c" / "ab")]


async def test_an_object_found_by_a_create_if_absent_is_synced_before_already_exists(tmp_path: Path,
                                                                                    synced) -> None:
    store = FileStore(tmp_path / "store")
    page = tmp_path / "store" / "d" / "00000007" / "page"
    page.mkdir(parents=True)
    (page / "1-9-0-abc.pg").write_bytes(b"page")  # linked by a writer killed before its sync
    synced.clear()
    with pytest.raises(AlreadyExists):
        await store.put("d/00000007/page/1-9-0-abc.pg", b"page", if_absent=True)
    assert _ident(page) in synced
