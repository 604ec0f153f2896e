"""cdp.direct_io: a new file's data written past the page cache, exactly."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from cdp import direct_io
from cdp.store.fs import FileStore

SIZES = [0, 1, 4095, 4096, 4097, direct_io.STAGE_BYTES - 1, direct_io.STAGE_BYTES,
         2 * direct_io.STAGE_BYTES + 4096 + 123]


@pytest.mark.parametrize("size", SIZES)
def test_write_direct_writes_exactly_the_data(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "obj"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        source = memoryview(bytearray(b"\0" + data))[1:]  # an unaligned source
        wrote = direct_io.write_direct(fd, source)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT  # left as it was
    finally:
        os.close(fd)
    if not wrote:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")  # the fallback is tested below
    assert path.read_bytes() == data


def test_a_refused_direct_write_leaves_the_file_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that takes the flag but refuses the write: False, nothing written,
    and the store writes the object buffered instead."""
    def refuse(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwritev", refuse)  # what cdp.durable.pwrite_all writes with
    path = tmp_path / "obj"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        assert direct_io.write_direct(fd, os.urandom(3 << 20)) is False
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert path.stat().st_size == 0


def test_a_file_system_without_o_direct_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fcntl = fcntl.fcntl

    def no_direct(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(direct_io.fcntl, "fcntl", no_direct)
    path = tmp_path / "obj"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        assert direct_io.write_direct(fd, os.urandom(3 << 20)) is False
    finally:
        os.close(fd)
    assert path.stat().st_size == 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "refused"])
async def test_file_store_puts_large_objects_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   direct: bool) -> None:
    if not direct:
        monkeypatch.setattr("cdp.store.fs.write_direct", lambda fd, data: False)
    store = FileStore(tmp_path / "store")
    objects = {f"seg/{i}": os.urandom(n) for i, n in
               enumerate([direct_io.DIRECT_MIN_BYTES - 1, direct_io.DIRECT_MIN_BYTES, (5 << 20) + 777])}
    for key, data in objects.items():
        await store.put(key, memoryview(bytearray(data)))
    for key, data in objects.items():
        assert await store.get(key) == data
        assert await store.get(key, 4000, 5000) == data[4000:9000]
        assert (await store.stat(key)).size == len(data)
