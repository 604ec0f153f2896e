"""What the NBD server does with a new client when it is at its connection cap
(docs/FORMAT.md §17.4): the connection idle longest gives up its slot if it has been
idle for ``idle_timeout_s``; otherwise the newcomer is refused, in words a client can
print, and closed.

The protocol has no refusal before the options, so a refused client gets the greeting
and then ``NBD_REP_ERR_POLICY`` with the reason for each option it sends (qemu and
libnbd print it), rather than a silent close. The server (``cdp.nbd.server``) keeps the
bookkeeping: which connections there are, which refusals run, whether it is closing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TypeVar

from cdp.nbd import protocol as nbd
from cdp.nbd.limits import REFUSE_OPTIONS_MAX, REFUSE_TIMEOUT_S

K = TypeVar("K")


def longest_idle(idle_s: Iterable[tuple[K, float | None]], idle_timeout_s: float) -> tuple[K, float] | None:
    """(key, seconds) of the connection idle longest among those idle for at least
    ``idle_timeout_s`` (``idle_s``: each connection's key and idle seconds, None when it
    is not idle); None when no connection is."""
    idle = [(key, seconds) for key, seconds in idle_s if seconds is not None and seconds >= idle_timeout_s]
    if not idle:
        return None
    return max(idle, key=lambda pair: pair[1])


async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: str) -> None:
    """The greeting, then ``NBD_REP_ERR_POLICY`` with ``message`` for each option, for at
    most REFUSE_OPTIONS_MAX options and REFUSE_TIMEOUT_S; returns early when the client
    goes, stalls or breaks the protocol. The caller closes the socket."""
    try:
        async with asyncio.timeout(REFUSE_TIMEOUT_S):
            await _refuse_options(reader, writer, message)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, nbd.NbdProtocolError):
        pass  # the client went, stalled or broke the protocol: it is closed all the same


async def _refuse_options(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: str) -> None:
    writer.write(nbd.server_greeting())
    nbd.parse_client_flags(await reader.readexactly(nbd.CLIENT_FLAGS_SIZE))
    for _ in range(REFUSE_OPTIONS_MAX):
        option, length = nbd.parse_option_header(await reader.readexactly(nbd.OPTION_HEADER_SIZE))
        if option == nbd.OPT_EXPORT_NAME:
            return  # this option cannot carry an error: the protocol says hang up
        if length:
            await reader.readexactly(length)  # at most OPTION_BYTES_MAX (parse_option_header)
        if option == nbd.OPT_ABORT:
            writer.write(nbd.pack_option_reply(option, nbd.REP_ACK))
            return
        writer.write(nbd.pack_option_error(option, nbd.REP_ERR_POLICY, message))
