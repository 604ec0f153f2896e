"""The socket's two ends under an NBD connection: a reader that counts what it is fed,
and a close that never waits longer than its bound (docs/FORMAT.md §17.4)."""

from __future__ import annotations

import asyncio


class CountingReader(asyncio.StreamReader):
    """A StreamReader that counts the bytes fed to it: with the bytes the connection has
    read from it, the watchdog tells a partial request from an idle connection, and a
    client that sends slowly from one that stopped."""

    received = 0

    def feed_data(self, data: bytes) -> None:
        self.received += len(data)
        super().feed_data(data)


async def close_stream(writer: asyncio.StreamWriter, linger_s: float | None) -> None:
    """Close ``writer``'s socket: after what is queued has left, for at most ``linger_s``,
    else (or with None) at once, dropping it. Never waits past the bound, cancelled or not."""
    transport = writer.transport
    if linger_s is None:
        transport.abort()
        return
    writer.close()
    try:
        async with asyncio.timeout(linger_s):
            await writer.wait_closed()
    except TimeoutError:
        transport.abort()  # the peer reads nothing: the send buffer would never drain
    except asyncio.CancelledError:
        transport.abort()
        raise
    except OSError:  # the peer is gone already (a reset, a TLS error)
        transport.abort()


def peer_name(writer: asyncio.StreamWriter) -> str:
    """``host:port`` of a TCP client, ``unix`` for a Unix socket's (it has no name)."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "unix"
