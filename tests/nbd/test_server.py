"""The server's own bounds and bookkeeping: requests and bytes in flight, cancellation on a
dropped connection, the connection cap, the handshake timeout, backend errors mapped to
NBD errors. Backends here wrap the test's FileBackend; outcomes are counted, not timed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cdp.errors import LogFull
from cdp.nbd import protocol as nbd
from cdp.nbd.backend import FileBackend
from cdp.nbd.server import INFLIGHT_MAX, NbdServer
from tests.nbd.conftest import Served
from tests.nbd.raw_client import RawClient
from tests.nbd.test_hostile import still_serves


class GatedBackend:
    """A FileBackend whose reads wait at a gate: requests stay in flight until a test opens it."""

    def __init__(self, inner: FileBackend) -> None:
        self.inner = inner
        self.size, self.read_only, self.block_sizes = inner.size, inner.read_only, inner.block_sizes
        self.multi_conn_safe = inner.multi_conn_safe
        self.gate = asyncio.Event()
        self.running = 0
        self.running_max = 0
        self.cancelled = 0
        self.reached = asyncio.Event()
        self.reach_count = INFLIGHT_MAX

    async def read(self, offset: int, length: int) -> bytes:
        self.running += 1
        self.running_max = max(self.running_max, self.running)
        if self.running >= self.reach_count:
            self.reached.set()
        try:
            await self.gate.wait()
            return await self.inner.read(offset, length)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int) -> None:
        await self.inner.trim(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        await self.inner.write_zeroes(offset, length, may_trim, fua)


@pytest.fixture
def gated(served: Served) -> GatedBackend:
    return GatedBackend(served.backends["vm/disk"])


async def test_inflight_cap_and_out_of_order_replies(served: Served, gated: GatedBackend, tmp_path) -> None:
    server = NbdServer({"vm/disk": gated})
    address = await server.start_unix(tmp_path / "g.sock")
    try:
        client = await RawClient.connect(address)
        await client.go("vm/disk", structured=True)
        n = INFLIGHT_MAX + 8
        for handle in range(n):
            await client.request(nbd.CMD_READ, handle, handle * 4096, 4096)
        await gated.reached.wait()  # INFLIGHT_MAX reads are at the gate; the rest wait unread
        gated.gate.set()
        handles = set()
        for _ in range(n):
            got = await client.reply()
            assert got.error == 0 and got.data == bytes(4096)
            handles.add(got.handle)
        assert handles == set(range(n))
        assert gated.running_max == INFLIGHT_MAX
        await client.close()
    finally:
        await server.close()


async def test_dropped_connection_cancels_requests_in_flight(served: Served, gated: GatedBackend, tmp_path) -> None:
    server = NbdServer({"vm/disk": gated})
    address = await server.start_unix(tmp_path / "g.sock")
    gated.reach_count = 5
    try:
        client = await RawClient.connect(address)
        await client.go("vm/disk")
        for handle in range(5):
            await client.request(nbd.CMD_READ, handle, 0, 4096)
        await gated.reached.wait()
        await client.close()
        await server.wait_connections()
        assert server.connection_count == 0
        assert (gated.cancelled, gated.running) == (5, 0)
        # The server takes new clients on the same export.
        client = await RawClient.connect(address)
        await client.go("vm/disk")
        gated.gate.set()
        await client.request(nbd.CMD_READ, 1, 0, 512)
        assert (await client.reply(512)).error == 0
        await client.close()
    finally:
        await server.close()
    await still_serves(served)


async def test_inflight_bytes_cap(served: Served, gated: GatedBackend, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": gated}, inflight_bytes_max=2 * 4096)
    address = await server.start_unix(tmp_path / "g.sock")
    gated.reach_count = 2
    try:
        client = await RawClient.connect(address)
        await client.go("vm/disk")
        for handle in range(6):
            await client.request(nbd.CMD_READ, handle, 0, 4096)
        await gated.reached.wait()
        gated.gate.set()
        for _ in range(6):
            assert (await client.reply(4096)).error == 0
        assert gated.running_max == 2  # two 4 KiB reads fill 8 KiB
        await client.close()
    finally:
        await server.close()


async def test_a_stalled_handshake_neither_blocks_others_nor_stays(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]}, handshake_timeout_s=0.5)
    address = await server.start_unix(tmp_path / "t.sock")
    try:
        stalled = await RawClient.connect(address)
        await stalled.read(18)  # greeted, then silent
        good = await RawClient.connect(address)
        await good.go("vm/disk")
        await good.request(nbd.CMD_READ, 1, 0, 512)
        assert (await good.reply(512)).error == 0
        assert await stalled.closed_by_server()  # the handshake timeout dropped it
        await good.close()
    finally:
        await server.close()


async def test_connection_cap(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]}, connections_max=1)
    address = await server.start_unix(tmp_path / "c.sock")
    try:
        first = await RawClient.connect(address)
        await first.go("vm/disk")
        second = await RawClient.connect(address)  # over the cap: told so, then closed
        await second.greet()
        [(_, reply_type, _)] = await second.option(nbd.OPT_GO, nbd.pack_info_request("vm/disk"))
        assert reply_type == nbd.REP_ERR_POLICY
        await second.send(nbd.pack_option(nbd.OPT_ABORT))
        assert await second.closed_by_server()
        await first.request(nbd.CMD_READ, 1, 0, 512)
        assert (await first.reply(512)).error == 0
        await first.close()
        await server.wait_connections()
        third = await RawClient.connect(address)
        await third.go("vm/disk")
        await third.close()
    finally:
        await server.close()


class FailingBackend(GatedBackend):
    """Writes fail with whatever ``error`` holds; reads work."""

    def __init__(self, inner: FileBackend) -> None:
        super().__init__(inner)
        self.gate.set()
        self.error: BaseException = OSError(errno.EIO, "disk on fire")

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        raise self.error


@pytest.mark.parametrize(("error", "want"), [
    (OSError(errno.ENOSPC, "full"), nbd.ENOSPC),
    (OSError(errno.EDQUOT, "quota"), nbd.ENOSPC),
    (OSError(errno.EROFS, "ro"), nbd.EPERM),
    (OSError(errno.EIO, "io"), nbd.EIO),
    (LogFull("replication log full"), nbd.ENOSPC),
    (KeyError("a backend bug"), nbd.EIO),
])
@pytest.mark.parametrize("structured", [False, True])
async def test_backend_errors_map_to_nbd_errors(served: Served, tmp_path: Path, error: BaseException, want: int,
                                                structured: bool) -> None:
    failing = FailingBackend(served.backends["vm/disk"])
    failing.error = error
    server = NbdServer({"vm/disk": failing})
    address = await server.start_unix(tmp_path / "f.sock")
    try:
        client = await RawClient.connect(address)
        await client.go("vm/disk", structured=structured)
        await client.request(nbd.CMD_WRITE, 1, 0, 512, payload=b"\x01" * 512)
        assert (await client.reply()).error == want
        await client.request(nbd.CMD_READ, 2, 0, 512)  # the connection goes on
        got = await client.reply(512)
        assert (got.error, got.handle, got.data) == (0, 2, bytes(512))
        await client.close()
    finally:
        await server.close()
    await still_serves(served)


async def test_disc_answers_requests_in_flight_first(served: Served, gated: GatedBackend, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": gated})
    address = await server.start_unix(tmp_path / "d.sock")
    gated.reach_count = 3
    try:
        client = await RawClient.connect(address)
        await client.go("vm/disk")
        for handle in range(3):
            await client.request(nbd.CMD_READ, handle, 0, 512)
        await gated.reached.wait()
        await client.request(nbd.CMD_DISC, 9, 0, 0)
        gated.gate.set()
        handles = {(await client.reply(512)).handle for _ in range(3)}
        assert handles == {0, 1, 2}
        assert await client.closed_by_server()
        assert gated.cancelled == 0
    finally:
        await server.close()


def test_bad_configuration_is_refused(served: Served, tmp_path: Path) -> None:
    from cdp.errors import ConfigError
    from cdp.nbd.backend import BlockSizes

    with pytest.raises(ConfigError, match="NUL"):
        NbdServer({"vm\x00disk": served.backends["vm/disk"]})
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))  # not a multiple of 512
    with pytest.raises(ConfigError, match="multiple of the minimum"):
        FileBackend(odd)
    for sizes in (BlockSizes(minimum=3), BlockSizes(preferred=256), BlockSizes(maximum=64 << 20),
                  BlockSizes(minimum=4096, preferred=4096, maximum=4096 * 3 + 512)):
        with pytest.raises(ConfigError):
            FileBackend(served.files["vm/disk"], block_sizes=sizes)
    with pytest.raises(ConfigError, match="no-such"):
        FileBackend(tmp_path / "no-such.img")


async def test_close_removes_the_unix_socket(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]})
    path = Path(await server.start_unix(tmp_path / "u.sock"))
    assert path.is_socket()
    await server.close()
    assert not path.exists()


class SubmittingBackend(GatedBackend):
    """A backend with ``submit_write`` (the capture's path): plain writes are held until the
    test answers them, in any order; ``room`` False makes it refuse (the task path runs)."""

    def __init__(self, inner: FileBackend) -> None:
        super().__init__(inner)
        self.submitted: dict[int, tuple[bytes, object]] = {}  # offset -> (data, done)
        self.written: list[tuple[int, bool]] = []  # (offset, fua) through write()
        self.room = True
        self.arrived = asyncio.Event()
        self.gate.set()  # reads are not held here

    def submit_write(self, offset: int, data: bytes, done) -> bool:
        if not self.room:
            return False
        self.submitted[offset] = (bytes(data), done)
        self.arrived.set()
        return True

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.written.append((offset, fua))
        await self.inner.write(offset, data, fua)

    async def until_submitted(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.submitted) < n:
                self.arrived.clear()
                await self.arrived.wait()

    def answer(self, offset: int, exc: BaseException | None = None) -> None:
        data, done = self.submitted.pop(offset)
        if exc is None:
            self.inner._write(offset, data, False)
        done(exc)


@contextlib.asynccontextmanager
async def submitting_server(served: Served, tmp_path: Path) -> AsyncIterator[tuple[SubmittingBackend, NbdServer, str]]:
    """A server of ``vm/disk`` through a SubmittingBackend on a Unix socket: (backend, server, address)."""
    backend = SubmittingBackend(served.backends["vm/disk"])
    server = NbdServer({"vm/disk": backend})
    address = await server.start_unix(tmp_path / "s.sock")
    try:
        yield backend, server, address
    finally:
        await server.close()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
async def test_plain_writes_are_submitted_and_answered_when_done(served: Served, tmp_path: Path,
                                                                 structured: bool) -> None:
    async with submitting_server(served, tmp_path) as (backend, server, address):
        client = await RawClient.connect(address)
        await client.go("vm/disk", structured=structured)
        for handle in range(3):
            await client.request(nbd.CMD_WRITE, handle, handle * 4096, 4096, payload=bytes([handle + 1]) * 4096)
        await client.request(nbd.CMD_WRITE, 7, 5 * 4096, 512, nbd.CMD_FLAG_FUA, payload=b"f" * 512)
        await backend.until_submitted(3)
        assert (await client.reply()).handle == 7  # FUA goes through write(), answered first
        assert backend.written == [(5 * 4096, True)]
        backend.answer(2 * 4096)
        backend.answer(0, OSError(errno.ENOSPC, "no room"))
        backend.answer(4096)
        got = [await client.reply() for _ in range(3)]
        assert [(r.handle, r.error) for r in got] == [(2, 0), (0, nbd.ENOSPC), (1, 0)]
        disk = served.file_bytes()
        assert disk[4096:3 * 4096] == bytes([2]) * 4096 + bytes([3]) * 4096
        assert disk[:4096] == bytes(4096)
        # A write refused by submit_write (no room) takes the task path.
        backend.room = False
        await client.request(nbd.CMD_WRITE, 8, 8 * 4096, 4096, payload=b"r" * 4096)
        assert (await client.reply()).handle == 8
        assert backend.written[-1] == (8 * 4096, False)
        assert served.file_bytes()[8 * 4096 : 9 * 4096] == b"r" * 4096
        # A write the server refuses never reaches submit_write, nor does an empty one.
        backend.room = True
        await client.request(nbd.CMD_WRITE, 9, 1, 512, payload=bytes(512))
        assert (await client.reply()).error == nbd.EINVAL
        await client.request(nbd.CMD_WRITE, 10, 4096, 0)
        assert (await client.reply()).error == 0
        assert not backend.submitted
        await client.close()


async def test_disc_waits_for_submitted_writes(served: Served, tmp_path: Path) -> None:
    async with submitting_server(served, tmp_path) as (backend, server, address):
        client = await RawClient.connect(address)
        await client.go("vm/disk")
        for handle in range(2):
            await client.request(nbd.CMD_WRITE, handle, handle * 4096, 4096, payload=b"w" * 4096)
        await backend.until_submitted(2)
        await client.request(nbd.CMD_DISC, 9, 0, 0)
        await asyncio.sleep(0.05)
        assert server.connection_count == 1  # still open: two writes are not answered
        backend.answer(4096)
        backend.answer(0)
        assert {(await client.reply()).handle for _ in range(2)} == {0, 1}
        assert await client.closed_by_server()


async def test_a_submitted_write_answered_after_its_connection_closed(served: Served, tmp_path: Path) -> None:
    """The client went away: the answer goes nowhere, the budget is returned, the server serves on."""
    async with submitting_server(served, tmp_path) as (backend, server, address):
        client = await RawClient.connect(address)
        await client.go("vm/disk")
        await client.request(nbd.CMD_WRITE, 1, 0, 4096, payload=b"w" * 4096)
        await backend.until_submitted(1)
        await client.close()
        await server.wait_connections()
        backend.answer(0)
        await asyncio.sleep(0)
        client = await RawClient.connect(address)
        await client.go("vm/disk")
        await client.request(nbd.CMD_READ, 2, 0, 4096)
        got = await client.reply(4096)
        assert (got.error, got.data) == (0, b"w" * 4096)
        await client.close()
