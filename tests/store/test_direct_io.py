"""cdp.direct_io: a new file's data written, and any range of a file read, past the page
cache, exactly."""

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


READ_SIZE = 2 * direct_io.STAGE_BYTES + 4096 + 123  # three stages, the last one partial
READ_RANGES = [(0, READ_SIZE), (0, 1), (1, 4095), (4095, 4097), (4096, 8192), (READ_SIZE - 10, READ_SIZE),
               (direct_io.STAGE_BYTES - 1, direct_io.STAGE_BYTES + 1), (123, direct_io.STAGE_BYTES + 77),
               (0, direct_io.STAGE_BYTES), (4096, 2 * direct_io.STAGE_BYTES + 4096), (7, 7)]


@pytest.fixture
def read_file(tmp_path: Path):
    data = os.urandom(READ_SIZE)
    path = tmp_path / "obj"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.mark.parametrize("start,end", READ_RANGES)
def test_read_direct_reads_exactly_the_range(read_file, start: int, end: int) -> None:
    fd, data = read_file
    got = direct_io.read_direct(fd, start, end)
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT  # left as it was
    if got is None:
        pytest.skip("this file system refuses O_DIRECT")  # the fallback is tested below
    assert isinstance(got, bytes) and got == data[start:end]


def test_read_direct_stops_at_the_end_of_the_file(read_file) -> None:
    """A range past the end returns what there is, as pread does (the store's caller
    resolves ranges against the size first; a file cut short meanwhile reads short)."""
    fd, data = read_file
    got = direct_io.read_direct(fd, READ_SIZE - 5000, READ_SIZE + 9000)
    if got is None:
        pytest.skip("this file system refuses O_DIRECT")
    assert got == data[-5000:]


def test_a_refused_direct_read_says_so(read_file, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag taken but the read refused: None, and the store reads buffered."""
    def refuse(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    fd, _ = read_file
    monkeypatch.setattr(os, "preadv", refuse)
    assert direct_io.read_direct(fd, 0, 8192) is None
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT


def test_a_direct_read_error_is_raised(read_file, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other error (here, after a first stage was read) is the read's, not a refusal."""
    fd, _ = read_file
    if direct_io.read_direct(fd, 0, 1) is None:
        pytest.skip("this file system refuses O_DIRECT")
    real = os.preadv
    calls = []

    def fail_second(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", fail_second)
    try:
        with pytest.raises(OSError) as err:
            direct_io.read_direct(fd, 0, READ_SIZE)
    finally:
        monkeypatch.setattr(os, "preadv", real)
    assert err.value.errno == errno.EIO and calls == [0, direct_io.STAGE_BYTES]
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "refused"])
async def test_file_store_gets_ranges_of_large_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       direct: bool) -> None:
    """Objects of DIRECT_MIN_BYTES or more are read with O_DIRECT (where refused: buffered);
    every range comes back exact either way."""
    read = []
    real = direct_io.read_direct

    def spy(fd: int, start: int, end: int) -> bytes | None:
        read.append((start, end))
        return real(fd, start, end) if direct else None

    monkeypatch.setattr("cdp.store.fs.read_direct", spy)
    store = FileStore(tmp_path / "store")
    small, large = os.urandom(direct_io.DIRECT_MIN_BYTES - 1), os.urandom(READ_SIZE)
    await store.put("small", small)
    await store.put("large", large)
    assert await store.get("small") == small and await store.get("small", 10, 20) == small[10:30]
    assert read == []  # small objects are read buffered (they were written so)
    for start, end in READ_RANGES:
        assert await store.get("large", start, end - start) == large[start:end]
    assert await store.get("large") == large
    assert len(read) == len(READ_RANGES) + 1


@pytest.mark.parametrize("start,end", READ_RANGES)
def test_read_direct_into_gives_a_view_of_exactly_the_range(read_file, start: int, end: int) -> None:
    fd, data = read_file
    buf = direct_io.ReadBuffer()
    got = direct_io.read_direct_into(fd, start, end, buf)
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    if got is None:
        pytest.skip("this file system refuses O_DIRECT")
    assert isinstance(got, memoryview) and got == data[start:end]
    assert got.obj is buf.window(0).obj  # no copy: the view is into the buffer


def test_a_read_buffer_is_reused_and_grows(read_file) -> None:
    """Reads into one buffer reuse its memory while they fit, and it grows for a larger
    one; each view is right when it is taken (and the next read overwrites it)."""
    fd, data = read_file
    buf = direct_io.ReadBuffer()
    first = direct_io.read_direct_into(fd, 10, 5000, buf)
    if first is None:
        pytest.skip("this file system refuses O_DIRECT")
    assert first == data[10:5000]
    memory = first.obj
    second = direct_io.read_direct_into(fd, 4096, direct_io.STAGE_BYTES, buf)
    assert second == data[4096 : direct_io.STAGE_BYTES] and second.obj is memory
    big = direct_io.read_direct_into(fd, 1, READ_SIZE, buf)
    assert big == data[1:] and big.obj is not memory and len(big.obj) >= READ_SIZE + 1


def test_a_refused_read_into_says_so(read_file, monkeypatch: pytest.MonkeyPatch) -> None:
    fd, _ = read_file

    def refuse(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "preadv", refuse)
    assert direct_io.read_direct_into(fd, 0, 8192, direct_io.ReadBuffer()) is None
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT


async def test_file_store_get_into(tmp_path: Path) -> None:
    """A large object comes back as a view into the buffer, a small one as bytes; both
    exact, and a missing key is NotFound as for get."""
    from cdp.errors import NotFound

    store = FileStore(tmp_path / "store")
    small, large = os.urandom(1000), os.urandom(READ_SIZE)
    await store.put("small", small)
    await store.put("large", large)
    buf = direct_io.ReadBuffer()
    got = await store.get_into("small", 10, 20, buf)
    assert isinstance(got, bytes) and got == small[10:30]
    for start, end in READ_RANGES:
        got = await store.get_into("large", start, end - start, buf)
        assert got == large[start:end]
        if isinstance(got, memoryview):
            assert got.obj is buf.window(0).obj
    assert await store.get_into("large", 0, None, buf) == large
    with pytest.raises(NotFound):
        await store.get_into("absent", 0, None, buf)
