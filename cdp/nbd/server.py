"""An asyncio NBD server: named exports over TCP and Unix sockets (docs/FORMAT.md §17).

One task per connection. A connection haggles options (``cdp.nbd.protocol``
decodes them), then reads requests in order and runs each as a task of its own — except
a WRITE without FUA to a backend that has ``submit_write`` (the filter's capture), which
is handed over with a callback that answers it — at most ``inflight_max`` requests and
``inflight_bytes_max`` payload bytes at once per connection: when either cap is reached
the reader stops reading and TCP pushes back on the client; it also stops while the
replies it owes are past ``WRITE_BUFFER_HIGH`` (a client that does not read them).
Replies go out whole, one at a time, under the connection's write lock.

Every request is checked against its export before the backend sees it. What a client
can make us buffer is bounded by ``OPTION_BYTES_MAX`` while haggling and by the
in-flight caps after. A client that breaks the protocol loses its connection (its
in-flight requests are cancelled and awaited); the other connections carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from cdp.errors import CdpError, ConfigError, LogFull
from cdp.logs import get_logger
from cdp.nbd import protocol as nbd
from cdp.nbd.backend import NbdBackend
from cdp.tls import describe_tls_error

logger = get_logger("iofilter.nbd")

#: Requests running at once per connection. Above the queue depth clients use (fio and
#: qemu: 32-64): the writes a client has in flight arrive together and are captured as one
#: batch — one frame, one dirty-map sync. At 16, a 4 KiB qd-32 job was cut into batches of
#: 16, each paying a map sync: half the IOPS (benchmarks.nbd).
INFLIGHT_MAX = 128
INFLIGHT_BYTES_MAX = 64 << 20  # payload bytes held at once per connection (two maximal requests)
CONNECTIONS_MAX = 64
#: Replies queued past this many bytes (with the socket's buffer) make the sender wait.
WRITE_BUFFER_HIGH = 4 << 20
#: What a connection's reader buffers unread (it stops reading the socket past twice this):
#: asyncio's default of 64 KiB paused and resumed the socket four times per 1 MiB write.
READ_BUFFER_BYTES = 1 << 20
#: A client gets this long to finish haggling; one that stalls is dropped.
HANDSHAKE_TIMEOUT_S = 30.0
#: Options one connection may send before it is dropped (a client looping on LIST).
OPTIONS_PER_CONNECTION_MAX = 256


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    backend: NbdBackend
    description: str = ""


def nbd_errno(exc: BaseException) -> int:
    """The NBD error for a backend failure (the protocol's mapping of errno values)."""
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return nbd.ENOSPC
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return nbd.EPERM
        if exc.errno == errno.EINVAL:
            return nbd.EINVAL
        return nbd.EIO
    if isinstance(exc, LogFull):
        return nbd.ENOSPC
    if isinstance(exc, ConfigError):
        return nbd.EINVAL
    return nbd.EIO


class _InflightBudget:
    """Requests and payload bytes in flight on one connection: at most ``requests_max``
    requests and ``bytes_max`` bytes (one request larger than ``bytes_max`` still runs, alone).

    One taker (the connection's reader loop); ``give`` is synchronous so that a finishing
    or cancelled request returns its share without awaiting anything.
    """

    def __init__(self, requests_max: int, bytes_max: int) -> None:
        self.requests_max, self.bytes_max = requests_max, bytes_max
        self.requests = 0
        self.bytes = 0
        self._changed = asyncio.Event()

    def _fits(self, cost: int) -> bool:
        return self.requests < self.requests_max and (self.bytes == 0 or self.bytes + cost <= self.bytes_max)

    async def take(self, cost: int) -> None:
        while not self._fits(cost):
            self._changed.clear()
            await self._changed.wait()
        self.requests += 1
        self.bytes += cost

    def give(self, cost: int) -> None:
        self.requests -= 1
        self.bytes -= cost
        assert self.requests >= 0 and self.bytes >= 0, (self.requests, self.bytes)
        self._changed.set()


class NbdServer:
    """Serves ``exports`` (name -> backend) to any number of listeners.

    Invariant: every connection task is in ``_connections`` until it has closed its
    socket and awaited every request task it started.
    """

    def __init__(self, exports: Mapping[str, NbdBackend], *, descriptions: Mapping[str, str] | None = None,
                 inflight_max: int = INFLIGHT_MAX, inflight_bytes_max: int = INFLIGHT_BYTES_MAX,
                 connections_max: int = CONNECTIONS_MAX, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 tls: ssl.SSLContext | None = None) -> None:
        self.exports: dict[str, Export] = {}
        for name, backend in exports.items():
            try:
                nbd.parse_export_name(name.encode())  # the same rule a client's name meets
            except nbd.OptionInvalid as exc:
                raise ConfigError(f"NBD export name {name[:64]!r}: {exc.message}") from None
            backend.block_sizes.check(backend.size, f"export {name!r}")
            self.exports[name] = Export(name, backend, (descriptions or {}).get(name, ""))
        self.inflight_max = inflight_max
        self.inflight_bytes_max = inflight_bytes_max
        self.connections_max = connections_max
        self.handshake_timeout_s = handshake_timeout_s
        # With a TLS context the server requires TLS (the protocol's FORCEDTLS): before
        # STARTTLS a client may only ABORT; no export name, size or byte goes in the clear.
        self.tls = tls
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[asyncio.Task] = set()
        self._closing = False

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on TCP; port 0 picks a free one. Returns the bound (host, port)."""
        server = await asyncio.start_server(self._accept, host, port, limit=READ_BUFFER_BYTES)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        logger.info("nbd_listening", transport="tcp", host=bound[0], port=bound[1], exports=sorted(self.exports))
        return bound[0], bound[1]

    async def start_unix(self, path: str | os.PathLike[str]) -> str:
        path = os.fspath(path)
        server = await asyncio.start_unix_server(self._accept, path, limit=READ_BUFFER_BYTES)
        self._servers.append(server)
        self._unix_paths.append(path)
        logger.info("nbd_listening", transport="unix", path=path, exports=sorted(self.exports))
        return path

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def wait_connections(self) -> None:
        """Until every connection open now has ended (closed its socket, awaited its requests)."""
        await asyncio.gather(*list(self._connections), return_exceptions=True)

    async def close(self) -> None:
        """Stop listening, drop every connection (cancelling its requests), wait for all."""
        self._closing = True
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:  # Python 3.11 leaves the socket file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = _peer_name(writer)
        if len(self._connections) >= self.connections_max:
            logger.warning("nbd_connection_refused", peer=peer, reason="connections_max",
                           connections_max=self.connections_max)
            writer.close()
            return
        self._connections.add(task)
        try:
            await _Connection(self, reader, writer, peer).run()
        except asyncio.CancelledError:
            # close() cancelled us and waits for us; asyncio's stream callback would log a
            # cancelled handler task as an error. Any other cancellation goes through.
            if not self._closing:
                raise
        finally:
            self._connections.discard(task)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "unix"


class _Connection:
    """One client: handshake, option haggling, then the transmission phase."""

    def __init__(self, server: NbdServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: str) -> None:
        self.server = server
        self.reader, self.writer, self.peer = reader, writer, peer
        self.no_zeroes = False
        self.structured = False
        self.export: Export | None = None
        self.limits: nbd.ExportLimits | None = None
        self._write_lock = asyncio.Lock()
        self._outbox: list[bytes | bytearray | memoryview] = []
        self._outbox_bytes = 0
        self._flush_scheduled = False
        self._requests: set[asyncio.Task] = set()
        self._submitted = 0  # writes handed to the backend's submit_write, not answered yet
        self._submitted_idle = asyncio.Event()
        self._submitted_idle.set()
        self._budget = _InflightBudget(server.inflight_max, server.inflight_bytes_max)
        self.served = 0  # requests answered, refused ones included
        self.refused = 0
        self.tls_active = False
        self._plain_streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def run(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the protocol asks for it
        reason = "closed"
        try:
            async with asyncio.timeout(self.server.handshake_timeout_s):
                export = await self._handshake()
            if export is not None:
                logger.info("nbd_transmission", peer=self.peer, export=export.name, structured=self.structured)
                reason = await self._transmission()
        except (asyncio.IncompleteReadError, ConnectionError):
            reason = "peer_gone"
        except TimeoutError:
            reason = "handshake_timeout"
        except nbd.NbdProtocolError as exc:
            reason = "protocol_error"
            logger.warning("nbd_protocol_error", peer=self.peer, error=exc.message)
        except Exception:  # a bug of ours: this connection ends, the server goes on
            reason = "server_error"
            logger.error("nbd_connection_failed", exc_info=True, peer=self.peer)
        finally:
            await self._cancel_requests()
            self._flush()  # what was answered before the end goes out
            self.writer.close()
            with contextlib.suppress(Exception):  # the peer may be gone already
                await self.writer.wait_closed()
        logger.info("nbd_disconnected", peer=self.peer, reason=reason, requests=self.served, refused=self.refused)

    async def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        """One whole message: no other reply can come between its parts.

        Messages are queued and written together once per loop iteration: the replies of
        a batch of writes, answered in the same iteration, go out in one ``send`` instead
        of one each (a syscall per 4 KiB reply was an eighth of an export's CPU). The
        sender waits only when the socket's buffer is past ``WRITE_BUFFER_HIGH``."""
        self._send_nowait(*parts)
        if self.writer.transport.get_write_buffer_size() + self._outbox_bytes > WRITE_BUFFER_HIGH:
            self._flush()
            async with self._write_lock:
                await self.writer.drain()

    def _send_nowait(self, *parts: bytes | bytearray | memoryview) -> None:
        """``_send`` for a callback, which cannot wait: the reader loop waits instead,
        before it reads the next request, while replies are past ``WRITE_BUFFER_HIGH``."""
        self._outbox.extend(parts)
        self._outbox_bytes += sum(map(len, parts))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        parts, self._outbox, self._outbox_bytes = self._outbox, [], 0
        if parts and not self.writer.is_closing():
            self.writer.writelines(parts)

    # ------------------------------------------------------------------ handshake

    async def _handshake(self) -> Export | None:
        """The export chosen by GO or EXPORT_NAME, or None after ABORT."""
        await self._send(nbd.server_greeting())
        client_flags = nbd.parse_client_flags(await self.reader.readexactly(nbd.CLIENT_FLAGS_SIZE))
        self.no_zeroes = bool(client_flags & nbd.FLAG_C_NO_ZEROES)
        for _ in range(OPTIONS_PER_CONNECTION_MAX):
            header = await self.reader.readexactly(nbd.OPTION_HEADER_SIZE)
            try:
                option, length = nbd.parse_option_header(header)
            except nbd.OptionTooBig as exc:
                await self._send(nbd.pack_option_error(exc.option, nbd.REP_ERR_TOO_BIG, exc.message))
                raise
            data = await self.reader.readexactly(length) if length else b""
            try:
                done, export = await self._option(option, data)
            except nbd.OptionInvalid as exc:
                await self._send(nbd.pack_option_error(option, nbd.REP_ERR_INVALID, exc.message))
                continue
            if done:
                return export
        raise nbd.NbdProtocolError(f"more than {OPTIONS_PER_CONNECTION_MAX} options")

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
        reader = asyncio.StreamReader(limit=READ_BUFFER_BYTES)
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

    # ------------------------------------------------------------------ transmission

    async def _transmission(self) -> str:
        """Read requests until DISC (returns "disc") or a protocol error / end of stream.
        Each request waits for its share of the in-flight budget before its payload is read:
        a client can make us hold at most the budget, plus what the reader buffers
        (``READ_BUFFER_BYTES``, twice that at most before it stops reading the socket)."""
        assert self.export is not None and self.limits is not None
        submit = getattr(self.export.backend, "submit_write", None)
        while True:
            if self.writer.transport.get_write_buffer_size() + self._outbox_bytes > WRITE_BUFFER_HIGH:
                self._flush()  # a client that does not read its replies: stop reading its requests
                async with self._write_lock:
                    await self.writer.drain()
            req = nbd.parse_request(await self.reader.readexactly(nbd.REQUEST_SIZE))
            if req.command == nbd.CMD_DISC:
                await self._drain_requests()
                return "disc"
            payload_len = req.length if req.command == nbd.CMD_WRITE else 0
            if payload_len > nbd.REQUEST_BYTES_MAX:
                # We will not buffer it, and cannot skip it: answer, then hang up.
                message = f"write of {req.length} bytes exceeds {nbd.REQUEST_BYTES_MAX}"
                await self._reply_error(req, nbd.EINVAL, message)
                raise nbd.NbdProtocolError(message)
            cost = max(payload_len, req.length if req.command == nbd.CMD_READ else 0)
            await self._budget.take(cost)
            try:
                payload = await self.reader.readexactly(payload_len) if payload_len else b""
            except BaseException:
                self._budget.give(cost)
                raise
            if (submit is not None and req.command == nbd.CMD_WRITE and req.length
                    and not req.flags & nbd.CMD_FLAG_FUA and self._submit(submit, req, payload, cost)):
                continue
            task = asyncio.create_task(self._serve(req, payload, cost))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    def _submit(self, submit, req: nbd.Request, payload: bytes, cost: int) -> bool:
        """Hand a plain WRITE to the backend's ``submit_write`` (no task per request, see
        ``iofilter_sim.nbd_capture.DomainCapture.submit``); False when the request must
        take the task path instead (it is refused, or the backend has no room now)."""
        if nbd.request_error(req, self.limits)[0]:
            return False  # _serve refuses it, and logs why

        def done(exc: BaseException | None) -> None:
            try:
                if exc is None:
                    self._send_nowait(nbd.pack_simple_reply(req.handle))
                else:
                    code = nbd_errno(exc)
                    logger.warning("nbd_backend_error", peer=self.peer, export=self.export.name, command=req.name,
                                   offset=req.offset, length=req.length, error=code, reason=str(exc))
                    self._send_nowait(*self._error_parts(req, code, f"{req.name} failed: {exc}"))
            finally:
                self.served += 1
                self._budget.give(cost)
                self._unsubmit()

        self._submitted += 1
        self._submitted_idle.clear()
        if submit(req.offset, payload, done):
            return True
        self._unsubmit()
        return False

    def _unsubmit(self) -> None:
        """One submitted write less (answered, or refused by the backend)."""
        self._submitted -= 1
        if not self._submitted:
            self._submitted_idle.set()

    async def _serve(self, req: nbd.Request, payload: bytes, cost: int) -> None:
        try:
            code, message = nbd.request_error(req, self.limits)
            if code:
                # Debug only: a client can send these as fast as it likes; the count is
                # in the disconnect event.
                self.refused += 1
                logger.debug("nbd_request_refused", peer=self.peer, export=self.export.name, command=req.name,
                             offset=req.offset, length=req.length, error=code, reason=message)
                await self._reply_error(req, code, message)
                return
            try:
                data = await self._run(req, payload)
            except asyncio.CancelledError:
                raise
            except (OSError, CdpError) as exc:
                code = nbd_errno(exc)
                logger.warning("nbd_backend_error", peer=self.peer, export=self.export.name, command=req.name,
                               offset=req.offset, length=req.length, error=code, reason=str(exc))
                await self._reply_error(req, code, f"{req.name} failed: {exc}")
                return
            except Exception as exc:  # a backend bug: this request fails, the export goes on
                logger.error("nbd_backend_bug", exc_info=True, peer=self.peer, export=self.export.name,
                             command=req.name)
                await self._reply_error(req, nbd.EIO, f"{req.name} failed: {type(exc).__name__}")
                return
            await self._reply_ok(req, data)
        except ConnectionError:
            # The socket went away under the reply; the reader loop sees it and cleans up.
            pass
        finally:
            self.served += 1
            self._budget.give(cost)

    async def _run(self, req: nbd.Request, payload: bytes) -> bytes | bytearray | memoryview | None:
        backend = self.export.backend
        fua = bool(req.flags & nbd.CMD_FLAG_FUA)
        if req.command == nbd.CMD_READ:
            data = await backend.read(req.offset, req.length) if req.length else b""
            if len(data) != req.length:
                raise OSError(errno.EIO, f"backend returned {len(data)} bytes for a read of {req.length}")
            return data
        if req.command == nbd.CMD_WRITE:
            if req.length:
                await backend.write(req.offset, payload, fua)
        elif req.command == nbd.CMD_FLUSH:
            await backend.flush()
        elif req.command == nbd.CMD_TRIM:
            if req.length:
                await backend.trim(req.offset, req.length)
            if fua:
                await backend.flush()
        elif req.command == nbd.CMD_WRITE_ZEROES:
            if req.length:
                may_trim = not req.flags & nbd.CMD_FLAG_NO_HOLE
                await backend.write_zeroes(req.offset, req.length, may_trim, fua)
        else:
            raise AssertionError(f"request_error let {req.name} through")
        return None

    async def _reply_ok(self, req: nbd.Request, data: bytes | bytearray | memoryview | None) -> None:
        if req.command != nbd.CMD_READ:
            await self._send(nbd.pack_simple_reply(req.handle))
        elif not self.structured:
            await self._send(nbd.pack_simple_reply(req.handle), data)
        elif req.length:
            await self._send(nbd.pack_data_chunk_header(req.handle, req.offset, req.length, done=True), data)
        else:
            await self._send(nbd.pack_none_chunk(req.handle))  # a data chunk holds at least one byte

    async def _reply_error(self, req: nbd.Request, code: int, message: str) -> None:
        await self._send(*self._error_parts(req, code, message))

    def _error_parts(self, req: nbd.Request, code: int, message: str) -> tuple[bytes]:
        if self.structured:
            return (nbd.pack_error_chunk(req.handle, code, message),)
        return (nbd.pack_simple_reply(req.handle, code),)

    async def _drain_requests(self) -> None:
        """DISC: the protocol wants every outstanding request answered first."""
        while self._requests or self._submitted:
            await asyncio.gather(*self._requests, return_exceptions=True)
            await self._submitted_idle.wait()

    async def _cancel_requests(self) -> None:
        for task in self._requests:
            task.cancel()
        while self._requests:
            await asyncio.gather(*self._requests, return_exceptions=True)
