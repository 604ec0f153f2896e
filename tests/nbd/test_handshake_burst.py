"""Seventeen well-behaved clients connecting together (a boot storm), each haggling
~300 ms as a TLS client over a WAN does: with the handshake cap (16) the 17th evicted the
first mid-handshake. A connection is evicted only once it has haggled
``HANDSHAKE_EVICT_AFTER_S``; a newcomer waits for a slot (FORMAT.md §17.4)."""
import asyncio
from pathlib import Path

from cdp.nbd import protocol as nbd
from cdp.nbd.server import NbdServer
from tests.nbd.conftest import Served
from tests.nbd.raw_client import RawClient


async def _client(address, i, results):
    c = await RawClient.connect(address)
    await c.greet()
    await c.send(nbd.pack_option(nbd.OPT_STRUCTURED_REPLY))
    await c.option_replies()
    await asyncio.sleep(0.3)  # a slow (TLS, WAN) client: mid-handshake
    try:
        replies = await c.option(nbd.OPT_GO, nbd.pack_info_request("vm/disk"))
        results[i] = replies[-1][1] == nbd.REP_ACK
    except Exception as exc:  # dropped
        results[i] = repr(exc)
    await c.close()


async def test_a_burst_of_slow_clients_over_the_handshake_cap_is_served_whole(served: Served, tmp_path: Path) -> None:
    server = NbdServer({"vm/disk": served.backends["vm/disk"]})
    address = await server.start_unix(tmp_path / "e.sock")
    results = {}
    try:
        tasks = []
        for i in range(17):
            tasks.append(asyncio.create_task(_client(address, i, results)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
    finally:
        await server.close()
    assert all(v is True for v in results.values()), results
