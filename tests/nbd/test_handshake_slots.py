"""Sockets that connect and never finish the NBD handshake: at most ``handshakes_max`` of
them haggle at once (the one haggling longest is dropped for a newcomer), one that sends
nothing is dropped ``first_option_timeout_s`` after accept, and none of them locks a
real client out. And ``NbdServer.close()`` removes its Unix socket file only if it is
still the socket it bound."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from cdp.nbd import protocol as nbd
from cdp.nbd.limits import CONNECTIONS_MAX
from cdp.nbd.server import NbdServer
from tests.nbd.conftest import Served
from tests.nbd.raw_client import RawClient

#: A real client's handshake and first read, however loaded the machine.
CLIENT_S = 10.0


async def _silent(address: str, count: int) -> list[asyncio.StreamWriter]:
    """``count`` connections that read the greeting (or the end of the stream, when the
    server dropped it) and never send a byte: each has been through the server's accept."""
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_unix_connection(address)
        async with asyncio.timeout(CLIENT_S):
            await reader.read(18)
        writers.append(writer)
    return writers


async def test_sockets_that_never_finish_the_handshake_lock_no_client_out(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]})  # the default caps and timeouts
    address = await server.start_unix(tmp_path / "h.sock")
    silent = await _silent(address, CONNECTIONS_MAX)
    try:
        async with asyncio.timeout(CLIENT_S):  # refused at the cap, it waited 30 s per silent socket
            client = await RawClient.connect(address)
            await client.go("vm/disk")
            await client.request(nbd.CMD_READ, 1, 0, 512)
            assert (await client.reply(512)).error == 0
        assert server.connection_count < CONNECTIONS_MAX  # the silent ones hold a few slots at most
        await client.close()
    finally:
        for w in silent:
            w.close()
        await server.close()


async def test_a_socket_that_sends_no_option_is_dropped_early(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]})
    server.first_option_timeout_s = 0.2  # read at each accept
    address = await server.start_unix(tmp_path / "f.sock")
    try:
        idle = await RawClient.connect(address)
        slow = await RawClient.connect(address)
        await slow.greet()  # its flags, and an option soon after: a real client
        await slow.send(nbd.pack_option(nbd.OPT_STRUCTURED_REPLY))
        assert await idle.closed_by_server()  # well before the 30 s handshake timeout
        [(_, reply_type, _)] = await slow.option_replies()
        assert reply_type == nbd.REP_ACK
        replies = await slow.option(nbd.OPT_GO, nbd.pack_info_request("vm/disk"))
        assert replies[-1][1] == nbd.REP_ACK
        await slow.close()
    finally:
        await server.close()


async def test_close_leaves_a_file_that_replaced_its_socket(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]})
    path = tmp_path / "s.sock"
    await server.start_unix(path)
    os.unlink(path)
    path.write_text("not the server's socket")
    other = tmp_path / "o.sock"
    server2 = NbdServer({"vm/disk": served.backends["vm/disk"]})
    await server2.start_unix(other)
    await server.close()
    assert path.read_text() == "not the server's socket"
    # Its own socket, still in place, is removed.
    assert other.exists()
    await server2.close()
    assert not other.exists()


async def test_close_leaves_another_servers_socket_at_its_path(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]})
    path = tmp_path / "r.sock"
    await server.start_unix(path)
    os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))  # another server took the path over
        await server.close()
        assert path.exists()
    finally:
        listener.close()
