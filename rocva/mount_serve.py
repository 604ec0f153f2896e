"""``cdp mount`` from start to stop: open the mount, listen, say so, serve until told to
stop, close in order, report.

The order matters for the caller: the one "serving" event is emitted only once the
listener accepts connections (a test or a benchmark waits for it), and ``stop`` (an
event the CLI sets on SIGINT/SIGTERM) leads to: the server closed (its connections'
requests cancelled and awaited), then the mount closed (``rocva.mount.Mount.close``),
then the "stopped" event with the summary.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import Callable
from typing import Any

from cdp.errors import ConfigError
from cdp.logs import get_logger
from cdp.nbd.address import NbdAddress
from cdp.nbd.server import NbdServer
from cdp.store.base import ObjectStore
from rocva.mount import Mount, MountOptions

logger = get_logger("rocva.mount")

Emit = Callable[[dict[str, Any]], None]
async def _listen(server: NbdServer, address: NbdAddress) -> dict[str, Any]:
    """Start the listener; what the "serving" event says about it."""
    try:
        if address.path is not None:
            path = await server.start_unix(address.path)
            scheme = "nbds+unix" if server.tls is not None else "nbd+unix"
            return {"transport": "unix", "path": path, "uri": f"{scheme}:///?socket={path}",
                    "tls": server.tls is not None}
        host, port = await server.start_tcp(address.host, address.port)
    except OSError as exc:
        why = "the address is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"--nbd {address}: cannot listen: {why}") from None
    shown = f"[{host}]" if ":" in host else host
    scheme = "nbds" if server.tls is not None else "nbd"
    return {"transport": "tcp", "host": host, "port": port, "uri": f"{scheme}://{shown}:{port}",
            "tls": server.tls is not None}


async def serve_mount(store: ObjectStore, options: MountOptions, address: NbdAddress, emit: Emit, stop: asyncio.Event,
                      tls: ssl.SSLContext | None = None, allow_uids: frozenset[int] = frozenset(),
                      allow_remote: bool = False) -> dict[str, Any]:
    """Serve ``options``' point at ``address`` until ``stop`` is set; the final summary.

    Events given to ``emit``: ``serving`` (once listening: address, exports, point),
    ``rehydrated`` (if ``options.rehydrate_to`` and it finished), and the returned
    summary is the ``stopped`` one. With ``tls`` every client must STARTTLS first.
    ``allow_uids``: users let in besides root and our uid; ``allow_remote``: the operator
    said a TCP address other than loopback may be served (``cdp.nbd.peers``)."""
    mount = await Mount.open(store, options)
    server: NbdServer | None = None
    try:
        server = NbdServer(mount.disks, descriptions={n: f"domain {mount.plan.domain} seq {mount.plan.seq}"
                                                      for n in mount.disks}, tls=tls, allow_uids=allow_uids,
                           allow_remote=allow_remote)
        listening = await _listen(server, address)
        emit({"event": "serving", "address": listening, **mount.describe()})
        if options.rehydrate_to is not None:
            mount.start_rehydration(lambda summary: emit({"event": "rehydrated", **summary}))
        await stop.wait()
        logger.info("mount_stopping", domain=mount.plan.domain, connections=server.connection_count)
    finally:
        if server is not None:
            await server.close()
        summary = await mount.close()
    return {"event": "stopped", **summary}
