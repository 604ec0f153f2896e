"""Clients that hold the server's resources without breaking the protocol: one that stops
reading its replies, one that stalls in the middle of a request, idle ones that fill
every connection slot, and many at once against the server-wide byte budget. Each test
asserts the outcome (the close returns, the connection is dropped or kept, the reader
stops reading), with timeouts given small through the constructor, never by sleeping."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from cdp.nbd import protocol as nbd
from cdp.nbd.server import WRITE_BUFFER_HIGH, NbdServer
from tests.nbd.conftest import MiB, Served, run_tool_status
from tests.nbd.raw_client import RawClient
from tests.nbd.test_server import GatedBackend

#: Safety net of every wait below: a hang fails the test, never passes it.
WAIT_S = 10.0
#: Small enough that a test waits well under a second for the watchdog.
STALL_S = 0.2


async def until(predicate: Callable[[], bool]) -> None:
    """Until ``predicate()`` holds (it is a state of the server, polled), or fail."""
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.005)


def only_connection(server: NbdServer):
    [connection] = server._connections.values()
    return connection


async def unread_reads(client: RawClient, count: int, length: int) -> None:
    await client.go("vm/disk")
    for handle in range(count):
        await client.request(nbd.CMD_READ, handle, 0, length)


# --------------------------------------------------------------------------- finding 1


async def test_close_returns_with_a_client_that_does_not_read(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]})  # default (long) stall timeout
    address = await server.start_unix(tmp_path / "s.sock")
    client = await RawClient.connect(address)
    await unread_reads(client, 64, MiB)
    await until(lambda: only_connection(server).writer.transport.get_write_buffer_size() > 0)
    async with asyncio.timeout(WAIT_S):  # it used to wait for the client forever
        await server.close()
    assert server.connection_count == 0
    client.writer.transport.abort()


async def test_a_client_that_half_closes_without_reading_is_let_go(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]})
    address = await server.start_unix(tmp_path / "h.sock")
    try:
        client = await RawClient.connect(address)
        await unread_reads(client, 64, MiB)
        await until(lambda: only_connection(server).writer.transport.get_write_buffer_size() > 0)
        client.writer.write_eof()  # shutdown(SHUT_WR): the server reads the end of its requests
        async with asyncio.timeout(WAIT_S):  # the end of its requests ends it: no linger, no stall wait
            await server.wait_connections()
        assert server.connection_count == 0
        client.writer.transport.abort()
    finally:
        await server.close()


async def test_disc_then_no_reading_is_dropped_by_the_stall_timeout(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]}, stall_timeout_s=STALL_S)
    address = await server.start_unix(tmp_path / "d.sock")
    try:
        client = await RawClient.connect(address)
        await unread_reads(client, 64, MiB)
        await client.request(nbd.CMD_DISC, 99, 0, 0)  # DISC waits for replies it will never read
        async with asyncio.timeout(WAIT_S):
            await server.wait_connections()
        assert server.connection_count == 0
        client.writer.transport.abort()
    finally:
        await server.close()


# --------------------------------------------------------------------------- finding 5: stalls


async def test_a_request_stalled_midway_is_dropped_an_idle_client_is_not(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]}, stall_timeout_s=STALL_S)
    address = await server.start_unix(tmp_path / "m.sock")
    try:
        idle = await RawClient.connect(address)
        await idle.go("vm/disk")
        mid_header = await RawClient.connect(address)
        await mid_header.go("vm/disk")
        await mid_header.send(nbd.pack_request(nbd.CMD_READ, 1, 0, 4096)[:10])
        mid_payload = await RawClient.connect(address)
        await mid_payload.go("vm/disk")
        await mid_payload.request(nbd.CMD_WRITE, 2, 0, 64 << 10, payload=b"\x01" * 1000)
        assert await mid_header.closed_by_server()
        assert await mid_payload.closed_by_server()
        # The idle client waited as long and keeps its connection.
        await idle.request(nbd.CMD_READ, 3, 0, 4096)
        assert (await idle.reply(4096)).error == 0
        await idle.close()
    finally:
        await server.close()
    assert served.file_bytes()[:1000] == bytes(1000)  # the torn write never reached the file


async def test_a_client_that_reads_slowly_is_not_dropped(served: Served, tmp_path: Path) -> None:
    """Stalled means no progress: a client that takes its replies in bites, each well
    inside the stall timeout, keeps its connection for longer than the timeout."""
    stall_s, bite_every_s, bite = 1.0, 0.25, 256 << 10
    server = NbdServer({"vm/disk": served.backends["vm/disk"]}, stall_timeout_s=stall_s)
    address = await server.start_unix(tmp_path / "r.sock")
    try:
        client = await RawClient.connect(address)
        await unread_reads(client, 2, MiB)
        connection = only_connection(server)
        await until(lambda: connection.writer.transport.get_write_buffer_size() > 0)
        owed = 2 * (nbd.SIMPLE_REPLY_SIZE + MiB)
        bites = 0
        while owed:
            await asyncio.sleep(bite_every_s)  # the client's pace, part of what is tested
            owed -= len(await client.read(min(bite, owed)))
            bites += 1
        assert bites * bite_every_s > stall_s
        await client.request(nbd.CMD_READ, 9, 0, 512)
        assert (await client.reply(512)).error == 0
        assert connection._dropped is None
        await client.close()
    finally:
        await server.close()


# --------------------------------------------------------------------------- finding 5: the cap


async def test_an_idle_connection_gives_its_slot_to_a_new_client(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]}, connections_max=2, idle_timeout_s=0.0)
    address = await server.start_unix(tmp_path / "i.sock")
    try:
        first = await RawClient.connect(address)
        await first.go("vm/disk")
        second = await RawClient.connect(address)
        await second.go("vm/disk")
        third = await RawClient.connect(address)
        await third.go("vm/disk")  # the server was full: the connection idle longest made room
        assert await first.closed_by_server()
        assert server.connection_count == 2
        for client in (second, third):
            await client.request(nbd.CMD_READ, 1, 0, 512)
            assert (await client.reply(512)).error == 0
            await client.close()
    finally:
        await server.close()


async def test_a_busy_connection_keeps_its_slot_and_the_newcomer_is_told_why(served: Served, tmp_path: Path) -> None:
    gated = GatedBackend(served.backends["vm/disk"])
    gated.reach_count = 1
    server = NbdServer({"vm/disk": gated}, connections_max=1, idle_timeout_s=0.0)
    address = await server.start_unix(tmp_path / "b.sock")
    try:
        busy = await RawClient.connect(address)
        await busy.go("vm/disk")
        await busy.request(nbd.CMD_READ, 1, 0, 512)
        await gated.reached.wait()  # in flight: not idle, however small the idle timeout
        late = await RawClient.connect(address)
        await late.greet()
        [(option, reply_type, message)] = await late.option(nbd.OPT_GO, nbd.pack_info_request("vm/disk"))
        assert (option, reply_type) == (nbd.OPT_GO, nbd.REP_ERR_POLICY)
        assert b"maximum of 1 connections" in message
        [(_, reply_type, _)] = await late.option(nbd.OPT_ABORT)
        assert reply_type == nbd.REP_ACK
        assert await late.closed_by_server()
        gated.gate.set()
        assert (await busy.reply(512)).error == 0
        await busy.close()
    finally:
        await server.close()


async def test_qemu_over_the_cap_reports_the_reason(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]}, connections_max=1)
    address = await server.start_unix(tmp_path / "q.sock")
    try:
        holder = await RawClient.connect(address)
        await holder.go("vm/disk")
        code, _, err = await run_tool_status("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k",
                                             f"nbd+unix:///vm/disk?socket={address}")
        assert code != 0 and "maximum of 1 connections" in err, err
        await holder.close()
    finally:
        await server.close()


# --------------------------------------------------------------------------- finding 4: memory


class TrackedBackend(GatedBackend):
    """Reads return a fresh object a test can hold a weak reference to."""

    class Data(bytearray):
        pass

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.gate.set()
        self.returned: list[weakref.ref] = []

    async def read(self, offset: int, length: int) -> bytearray:
        self.running += 1
        try:
            data = self.Data(await self.inner.read(offset, length))
        finally:
            self.running -= 1
        self.returned.append(weakref.ref(data))
        return data


async def test_a_queued_reply_is_not_held_by_its_request(served: Served, tmp_path: Path) -> None:
    """A client that does not read: each read's data is handed to the transport and
    dropped by the request, while the request's budget stays taken until the replies
    are back under WRITE_BUFFER_HIGH: the transport holds no more than the budget taken
    plus WRITE_BUFFER_HIGH, and the reader stops reading. (asyncio's transport copies what
    it buffers, so a live reference to the data is the request's; uvloop's keeps the
    object itself.)"""
    if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        pytest.skip("uvloop's transport holds the data objects themselves")
    tracked = TrackedBackend(served.backends["vm/disk"])
    budget = 4 * WRITE_BUFFER_HIGH
    server = NbdServer({"vm/disk": tracked}, inflight_bytes_max=budget)
    address = await server.start_unix(tmp_path / "t.sock")
    try:
        client = await RawClient.connect(address)
        count = 2 * budget // MiB
        await unread_reads(client, count, MiB)
        connection = only_connection(server)
        transport = connection.writer.transport
        # Quiet: no read runs, every reply is handed to the transport, which is past the bound.
        await until(lambda: not tracked.running and not connection._outbox
                    and transport.get_write_buffer_size() > WRITE_BUFFER_HIGH)
        gc.collect()
        assert [ref for ref in tracked.returned if ref() is not None] == []  # only the transport has the bytes
        assert len(tracked.returned) < count  # the reader stopped reading requests
        held = connection._budget.bytes
        assert transport.get_write_buffer_size() <= held + WRITE_BUFFER_HIGH
        assert held <= budget and server.budget.bytes == held
        client.writer.transport.abort()
    finally:
        await server.close()
    assert server.budget.bytes == 0  # every share given back


async def test_the_server_budget_stops_every_reader(served: Served, tmp_path: Path) -> None:
    gated = GatedBackend(served.backends["vm/disk"])
    gated.reach_count = 2
    server = NbdServer({"vm/disk": gated}, server_inflight_bytes_max=2 * 4096)
    address = await server.start_unix(tmp_path / "sb.sock")
    try:
        first = await RawClient.connect(address)
        await first.go("vm/disk")
        for handle in range(2):
            await first.request(nbd.CMD_READ, handle, 0, 4096)
        await gated.reached.wait()  # the server's 8 KiB are taken
        first_side = only_connection(server)
        second = await RawClient.connect(address)
        await second.go("vm/disk")
        [second_side] = [c for c in server._connections.values() if c is not first_side]
        handshake_bytes = second_side._consumed
        await second.request(nbd.CMD_READ, 7, 0, 4096)
        await until(lambda: second_side._consumed == handshake_bytes + nbd.REQUEST_SIZE)  # its header is read...
        assert gated.running == 2 and server.budget.bytes == 2 * 4096  # ...and it waits for the budget
        gated.gate.set()
        assert (await second.reply(4096)).error == 0
        assert {(await first.reply(4096)).handle for _ in range(2)} == {0, 1}
        assert gated.running_max == 2
        for client in (first, second):
            await client.close()
    finally:
        await server.close()


def test_time_and_byte_bounds_are_checked(served: Served) -> None:
    from cdp.errors import ConfigError

    backends = {"vm/disk": served.backends["vm/disk"]}
    with pytest.raises(ConfigError, match="stall_timeout_s 0: expected above 0"):
        NbdServer(backends, stall_timeout_s=0)
    with pytest.raises(ConfigError, match="server_inflight_bytes_max -1: expected above 0"):
        NbdServer(backends, server_inflight_bytes_max=-1)
    with pytest.raises(ConfigError, match="close_linger_s -1: expected at least 0"):
        NbdServer(backends, close_linger_s=-1)
