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
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cdp.errors import ConfigError
from cdp.logs import get_logger
from cdp.nbd.server import NbdServer
from rocva.mount import Mount, MountOptions

logger = get_logger("rocva.mount")

Emit = Callable[[dict[str, Any]], None]
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>[0-9]{1,5})")
#: Linux's limit on a Unix socket path (sun_path holds 108 bytes with the NUL).
UNIX_PATH_BYTES_MAX = 107


@dataclass(frozen=True)
class NbdAddress:
    """Where to listen: TCP ``host:port`` (port 0: any free one) or a Unix socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"


def parse_nbd_address(text: str) -> NbdAddress:
    """``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``; ConfigError naming the text otherwise."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path or "\0" in path:
            raise ConfigError(f"--nbd {text!r}: expected unix:PATH with a socket path")
        if len(os.fsencode(path)) > UNIX_PATH_BYTES_MAX:
            raise ConfigError(f"--nbd {text!r}: a Unix socket path has at most {UNIX_PATH_BYTES_MAX} bytes")
        return NbdAddress(path=path)
    found = _HOST_PORT.fullmatch(text)
    if found is None or int(found["port"]) > 65535:
        raise ConfigError(f"--nbd {text!r}: expected HOST:PORT (port 0..65535, 0 for any free one) or unix:PATH")
    return NbdAddress(host=found["v6"] or found["host"], port=int(found["port"]))


async def _listen(server: NbdServer, address: NbdAddress) -> dict[str, Any]:
    """Start the listener; what the "serving" event says about it."""
    try:
        if address.path is not None:
            path = await server.start_unix(address.path)
            return {"transport": "unix", "path": path, "uri": "nbd+unix:///?socket=" + path}
        host, port = await server.start_tcp(address.host, address.port)
    except OSError as exc:
        why = "the address is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"--nbd {address}: cannot listen: {why}") from None
    shown = f"[{host}]" if ":" in host else host
    return {"transport": "tcp", "host": host, "port": port, "uri": f"nbd://{shown}:{port}"}


async def serve_mount(store, options: MountOptions, address: NbdAddress, emit: Emit, stop: asyncio.Event
                      ) -> dict[str, Any]:
    """Serve ``options``' point at ``address`` until ``stop`` is set; the final summary.

    Events given to ``emit``: ``serving`` (once listening: address, exports, point),
    ``rehydrated`` (if ``options.rehydrate_to`` and it finished), and the returned
    summary is the ``stopped`` one."""
    mount = await Mount.open(store, options)
    server: NbdServer | None = None
    try:
        server = NbdServer(mount.disks, descriptions={n: f"domain {mount.plan.domain} seq {mount.plan.seq}"
                                                      for n in mount.disks})
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
