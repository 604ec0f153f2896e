"""The in-flight budget comes back whole however a request ends (FORMAT.md §17.4).

A request takes its share before its task exists; a task cancelled before its first step
(its connection ended as the reader loop created it) never runs its coroutine, so a share
given back only in the coroutine's ``finally`` stayed taken for good: eight clients that
pipelined 32 MiB READs and hung up left the server's 256 MiB counted, and every later
client waited forever for a reply. Outcomes are counted, never timed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from cdp.nbd import protocol as nbd
from cdp.nbd.server import NbdServer
from tests.nbd.conftest import MiB, Served
from tests.nbd.raw_client import RawClient
from tests.nbd.test_hostile_clients import WAIT_S, only_connection, until
from tests.nbd.test_server import GatedBackend

READ_BYTES = 1 * MiB


async def test_a_request_cancelled_before_it_ran_gives_its_share_back(served: Served, tmp_path: Path) -> None:
    """One request in flight at a time; the server's budget is one READ. The client sends
    two READs and hangs up while the first waits in the backend. When the first ends, the
    reader loop takes the second's share, creates its task, finds the end of the stream
    and cancels the task before it ran: the share must still come back."""
    gated = GatedBackend(served.backends["vm/disk"])
    gated.reach_count = 1
    server = NbdServer({"vm/disk": gated}, inflight_max=1, server_inflight_bytes_max=READ_BYTES)
    address = await server.start_unix(tmp_path / "b.sock")
    try:
        client = await RawClient.connect(address)
        await client.go("vm/disk")
        await client.request(nbd.CMD_READ, 1, 0, READ_BYTES)
        await client.request(nbd.CMD_READ, 2, READ_BYTES, READ_BYTES)
        async with asyncio.timeout(WAIT_S):
            await gated.reached.wait()  # the first READ is in the backend, the second waits for its share
        connection = only_connection(server)
        client.writer.transport.abort()
        await until(lambda: connection.reader.at_eof())  # both headers read, then the end of the stream
        gated.gate.set()
        await until(lambda: server.connection_count == 0)
        assert server.budget.bytes == 0, f"{server.budget.bytes} bytes of budget held by no connection"

        fresh = await RawClient.connect(address)  # served: the budget has room again
        await fresh.go("vm/disk")
        await fresh.request(nbd.CMD_READ, 7, 0, 4096)
        reply = await fresh.reply(4096)  # waited forever before (RawClient bounds the wait)
        assert (reply.error, reply.handle, len(reply.data)) == (0, 7, 4096)
        await fresh.close()
    finally:
        gated.gate.set()
        await server.close()
    assert server.budget.bytes == 0


async def test_clients_that_pipeline_large_reads_and_hang_up_leave_no_budget_behind(served: Served,
                                                                                      tmp_path: Path) -> None:
    """The auditor's case: several clients each pipeline READs of many times the budget of
    one connection and abort at once; afterwards nothing is held and a new client is served."""
    server = NbdServer({"vm/disk": served.backends["vm/disk"]}, inflight_bytes_max=2 * READ_BYTES,
                       server_inflight_bytes_max=4 * READ_BYTES)
    host, port = await server.start_tcp("127.0.0.1", 0)
    try:
        for _ in range(8):
            client = await RawClient.connect((host, port))
            await client.go("vm/disk")
            await client.send(*(nbd.pack_request(nbd.CMD_READ, h, (h % 4) * READ_BYTES, READ_BYTES)
                                for h in range(8)))
            client.writer.transport.abort()
        await until(lambda: server.connection_count == 0)
        assert server.budget.bytes == 0
        fresh = await RawClient.connect((host, port))
        await fresh.go("vm/disk")
        await fresh.request(nbd.CMD_READ, 9, 0, 4096)
        reply = await fresh.reply(4096)
        assert (reply.error, reply.handle) == (0, 9)
        await fresh.close()
    finally:
        await server.close()
    assert server.budget.bytes == 0
