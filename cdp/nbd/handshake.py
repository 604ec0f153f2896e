"""The handshake phase of an NBD connection (docs/FORMAT.md §17.1, §17.2): the greeting,
then option haggling — LIST, INFO, STRUCTURED_REPLY, STARTTLS — until GO or EXPORT_NAME
picks an export, or ABORT ends the session.

What a client can make us buffer here is bounded by ``OPTION_BYTES_MAX`` per option
(``cdp.nbd.protocol``) and ``OPTIONS_PER_CONNECTION_MAX`` options; the server bounds
the whole phase by ``handshake_timeout_s``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from cdp.logs import get_logger
from cdp.nbd import protocol as nbd
from cdp.nbd.limits import OPTIONS_PER_CONNECTION_MAX, READ_BUFFER_BYTES
from cdp.nbd.streams import CountingReader
from cdp.tls import describe_tls_error

if TYPE_CHECKING:
    from cdp.nbd.connection import Export
    from cdp.nbd.server import NbdServer

logger = get_logger("iofilter.nbd")  # the server's logger: one stream of nbd_* events


class HandshakePhase:
    """The handshake half of a connection (``cdp.nbd.connection.Connection`` inherits it).

    Uses the connection's streams, its ``_send`` and ``_flush`` (one whole message out)
    and its byte counters, reset when STARTTLS swaps the streams; sets what the haggling
    decided: ``no_zeroes``, ``structured``, ``tls_active``, and ``export`` and
    ``limits`` once an export is chosen. The attributes below are the connection's.
    """

    server: NbdServer
    reader: CountingReader
    writer: asyncio.StreamWriter
    peer: str
    no_zeroes: bool
    structured: bool
    tls_active: bool
    export: Export | None
    limits: nbd.ExportLimits | None
    _consumed: int
    _queued_total: int
    _plain_streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None

    async def _handshake(self) -> Export | None:
        """The export chosen by GO or EXPORT_NAME, or None after ABORT."""
        await self._send(nbd.server_greeting())
        client_flags = nbd.parse_client_flags(await self._read(nbd.CLIENT_FLAGS_SIZE))
        self.no_zeroes = bool(client_flags & nbd.FLAG_C_NO_ZEROES)
        for _ in range(OPTIONS_PER_CONNECTION_MAX):
            header = await self._read(nbd.OPTION_HEADER_SIZE)
            try:
                option, length = nbd.parse_option_header(header)
            except nbd.OptionTooBig as exc:
                await self._send(nbd.pack_option_error(exc.option, nbd.REP_ERR_TOO_BIG, exc.message))
                raise
            data = await self._read(length) if length else b""
            try:
                done, export = await self._option(option, data)
            except nbd.OptionInvalid as exc:
                await self._send(nbd.pack_option_error(option, nbd.REP_ERR_INVALID, exc.message))
                continue
            if done:
                return export
        raise nbd.NbdProtocolError(f"more than {OPTIONS_PER_CONNECTION_MAX} options")

    async def _read(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self._consumed += n
        return data

    async def _option(self, option: int, data: bytes) -> tuple[bool, Export | None]:
        """Answer one option; (True, export) when haggling is over."""
        if option == nbd.OPT_STARTTLS:
            if self.server.tls is None:
                await self._send(nbd.pack_option_error(option, nbd.REP_ERR_UNSUP, "this server serves without TLS"))
                return False, None
            if self.tls_active:
                raise nbd.OptionInvalid("STARTTLS on a connection already in TLS")
            if data:
                raise nbd.OptionInvalid("STARTTLS takes no data")
            await self._send(nbd.pack_option_reply(option, nbd.REP_ACK))
            await self._start_tls()
            return False, None
        if self.server.tls is not None and not self.tls_active and option != nbd.OPT_ABORT:
            if option == nbd.OPT_EXPORT_NAME:
                # This option cannot carry an error: the protocol says hang up.
                raise nbd.NbdProtocolError("EXPORT_NAME before STARTTLS on a server that requires TLS")
            await self._send(nbd.pack_option_error(option, nbd.REP_ERR_TLS_REQD,
                                                   "this server requires TLS: send STARTTLS first"))
            return False, None
        if option == nbd.OPT_EXPORT_NAME:
            try:
                export = self.server.exports.get(nbd.parse_export_name(data))
            except nbd.OptionInvalid as exc:
                raise nbd.NbdProtocolError(f"EXPORT_NAME: {exc.message}") from None
            if export is None:
                # This option cannot carry an error: the protocol says hang up.
                raise nbd.NbdProtocolError(f"EXPORT_NAME of unknown export {data[:64]!r}")
            self._enter(export)
            await self._send(nbd.pack_export_name_reply(export.backend.size, self._tflags(export), self.no_zeroes))
            return True, export
        if option in (nbd.OPT_GO, nbd.OPT_INFO):
            name, wanted = nbd.parse_info_request(data)
            export = self.server.exports.get(name)
            if export is None:
                await self._send(nbd.pack_option_error(option, nbd.REP_ERR_UNKNOWN, f"no export named {name!r}"))
                return False, None
            await self._send(*self._info_replies(option, export, wanted))
            if option == nbd.OPT_GO:
                self._enter(export)
                return True, export
            return False, None
        if option == nbd.OPT_ABORT:
            await self._send(nbd.pack_option_reply(option, nbd.REP_ACK))
            return True, None
        if option == nbd.OPT_LIST:
            if data:
                raise nbd.OptionInvalid("LIST takes no data")
            replies = [nbd.pack_option_reply(option, nbd.REP_SERVER, nbd.pack_rep_server(e.name, e.description))
                       for e in self.server.exports.values()]
            await self._send(*replies, nbd.pack_option_reply(option, nbd.REP_ACK))
            return False, None
        if option == nbd.OPT_STRUCTURED_REPLY:
            if data:
                raise nbd.OptionInvalid("STRUCTURED_REPLY takes no data")
            self.structured = True
            await self._send(nbd.pack_option_reply(option, nbd.REP_ACK))
            return False, None
        # Meta contexts, and anything newer.
        await self._send(nbd.pack_option_error(option, nbd.REP_ERR_UNSUP, f"option {option} is not supported"))
        return False, None

    async def _start_tls(self) -> None:
        """Upgrade this connection to TLS, server side, after STARTTLS's ACK went out.

        A new reader and protocol over the TLS transport rather than
        ``StreamWriter.start_tls``: on Python 3.11 that one leaves the reader pausing and
        resuming the raw socket's transport, under the TLS layer's own flow control, so
        the reader's bound on what it buffers would no longer hold."""
        self._flush()
        await self.writer.drain()
        loop = asyncio.get_running_loop()
        reader = CountingReader(limit=READ_BUFFER_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport = await loop.start_tls(self.writer.transport, protocol, self.server.tls, server_side=True)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            logger.warning("nbd_tls_refused", peer=self.peer, reason=describe_tls_error(exc, f"NBD client {self.peer}"))
            raise ConnectionResetError("TLS handshake failed") from None
        protocol.connection_made(transport)  # start_tls does not: the protocol is new to the transport
        # The plain writer stays referenced: when collected, a StreamWriter whose transport
        # is open closes it — here the socket under the TLS session.
        self._plain_streams = (self.reader, self.writer)
        self.reader, self.writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)
        self._consumed = 0  # counted from here against the new reader
        self._queued_total = 0
        self.tls_active = True
        logger.info("nbd_tls", peer=self.peer, version=transport.get_extra_info("ssl_object").version())

    def _info_replies(self, option: int, export: Export, wanted: tuple[int, ...]) -> list[bytes]:
        sizes = export.backend.block_sizes
        # EXPORT is mandatory; BLOCK_SIZE always goes along, as our minimum is not the default 1.
        infos = [nbd.pack_info_export(export.backend.size, self._tflags(export)),
                 nbd.pack_info_block_size(sizes.minimum, sizes.preferred, sizes.maximum)]
        if nbd.INFO_NAME in wanted:
            infos.append(nbd.pack_info_string(nbd.INFO_NAME, export.name))
        if nbd.INFO_DESCRIPTION in wanted and export.description:
            infos.append(nbd.pack_info_string(nbd.INFO_DESCRIPTION, export.description))
        replies = [nbd.pack_option_reply(option, nbd.REP_INFO, info) for info in infos]
        replies.append(nbd.pack_option_reply(option, nbd.REP_ACK))
        return replies

    def _tflags(self, export: Export) -> int:
        backend = export.backend
        flags = nbd.TFLAG_HAS_FLAGS | nbd.TFLAG_SEND_FLUSH | nbd.TFLAG_SEND_FUA
        if backend.read_only:
            flags |= nbd.TFLAG_READ_ONLY
        else:
            flags |= nbd.TFLAG_SEND_TRIM | nbd.TFLAG_SEND_WRITE_ZEROES
        if self.structured:
            flags |= nbd.TFLAG_SEND_DF  # a read is always answered with one data chunk
        if backend.multi_conn_safe:
            flags |= nbd.TFLAG_CAN_MULTI_CONN
        return flags

    def _enter(self, export: Export) -> None:
        sizes = export.backend.block_sizes
        self.export = export
        self.limits = nbd.ExportLimits(export.backend.size, export.backend.read_only,
                                       sizes.minimum, sizes.maximum, self.structured)
