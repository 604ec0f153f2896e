"""An asyncio NBD server: named exports over TCP and Unix sockets (docs/FORMAT.md §17).

One task per connection. A connection haggles options (``cdp.nbd.protocol``
decodes them), then reads requests in order and runs each as a task of its own — except
a WRITE without FUA to a backend that has ``submit_write`` (the filter's capture), which
is handed over with a callback that answers it — at most ``inflight_max`` requests and
``inflight_bytes_max`` payload bytes at once per connection, and
``server_inflight_bytes_max`` bytes over all connections: when a cap is reached the
reader stops reading and TCP pushes back on the client. A request's bytes (its WRITE
payload, or its READ's data) count from before its payload is read until its reply is
queued *and* the replies waiting to be sent are at most ``WRITE_BUFFER_HIGH``: what a
client that does not read its replies makes us hold stays within the caps (plus
``WRITE_BUFFER_HIGH``). Replies go out whole: each is queued in one piece.

Every request is checked against its export before the backend sees it. What a client
can make us buffer is bounded by ``OPTION_BYTES_MAX`` while haggling and by the
in-flight caps after. A client that breaks the protocol loses its connection (its
in-flight requests are cancelled and awaited); the other connections carry on.

Time bounds (§17.4): the handshake (``handshake_timeout_s``); a client that owes us
bytes — the rest of a request, or the reading of replies we queued — and moves none for
``stall_timeout_s`` is dropped (a watchdog timer per connection: an ``asyncio.timeout``
per request cost 13 us); an idle connection is never dropped for being idle, only when
the server is full and a new client needs its slot (``idle_timeout_s``); a connection's
close waits at most ``close_linger_s`` for its last replies to leave, and not at all
when the server is closing or the client left, stalled or was evicted (``_linger_s``).
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
#: Payload bytes held at once by all connections: without it 64 connections could pin
#: 64 x 64 MiB. 256 MiB is four connections at their cap, or 64 at a qd-64 of 64 KiB.
SERVER_INFLIGHT_BYTES_MAX = 256 << 20
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
#: A client that owes us bytes (the rest of a request, or reading the replies queued for
#: it) and moves none for this long is dropped. Real clients never pause mid-request and
#: read replies as they come; a minute allows for a congested link (progress resets it).
STALL_TIMEOUT_S = 60.0
#: A connection idle this long (nothing in flight, nothing owed either way) gives its slot
#: to a new client when the server is full. Idle connections are otherwise kept: qemu
#: (without reconnect-delay, its default) and the kernel client fail the disk when the
#: server drops them, and an idle guest may not touch its disk for hours.
IDLE_TIMEOUT_S = 300.0
#: A closing connection waits this long for its last replies to leave: asyncio reports a
#: close only once the send buffer has drained, which it never does if the peer stopped
#: reading. Then the socket is aborted.
CLOSE_LINGER_S = 5.0
#: A client over the connection cap gets the greeting and NBD_REP_ERR_POLICY for each
#: option, for at most this long and this many options, then is closed; at most
#: REFUSING_MAX such exchanges at once (past that, a new client is closed at once).
REFUSE_TIMEOUT_S = 5.0
REFUSE_OPTIONS_MAX = 8
REFUSING_MAX = 16


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


class _ServerBudget:
    """Payload bytes in flight over every connection of a server: at most ``bytes_max``
    (one request larger than that still runs, alone). Changed only by ``_InflightBudget``."""

    def __init__(self, bytes_max: int) -> None:
        self.bytes_max = bytes_max
        self.bytes = 0
        self.changed = asyncio.Event()

    def fits(self, cost: int) -> bool:
        return self.bytes == 0 or self.bytes + cost <= self.bytes_max


class _InflightBudget:
    """Requests and payload bytes in flight on one connection: at most ``requests_max``
    requests and ``bytes_max`` bytes (one request larger than ``bytes_max`` still runs,
    alone), and within the server's budget ``shared``.

    One taker (the connection's reader loop); ``give`` is synchronous so that a finishing
    or cancelled request returns its share without awaiting anything.
    """

    def __init__(self, requests_max: int, bytes_max: int, shared: _ServerBudget) -> None:
        self.requests_max, self.bytes_max = requests_max, bytes_max
        self.shared = shared
        self.requests = 0
        self.bytes = 0
        self._changed = asyncio.Event()

    def _fits(self, cost: int) -> bool:
        return self.requests < self.requests_max and (self.bytes == 0 or self.bytes + cost <= self.bytes_max)

    async def take(self, cost: int) -> None:
        while True:
            if not self._fits(cost):
                changed = self._changed
            elif not self.shared.fits(cost):
                changed = self.shared.changed  # another connection's give() sets it
            else:
                break
            changed.clear()
            await changed.wait()
        self.requests += 1
        self.bytes += cost
        self.shared.bytes += cost

    def give(self, cost: int) -> None:
        self.requests -= 1
        self.bytes -= cost
        self.shared.bytes -= cost
        assert self.requests >= 0 and self.bytes >= 0 and self.shared.bytes >= 0, (self.requests, self.bytes)
        self._changed.set()
        self.shared.changed.set()


class _CountingReader(asyncio.StreamReader):
    """A StreamReader that counts the bytes fed to it: with the bytes the connection has
    read from it, the watchdog tells a partial request from an idle connection, and a
    client that sends slowly from one that stopped."""

    received = 0

    def feed_data(self, data: bytes) -> None:
        self.received += len(data)
        super().feed_data(data)


class NbdServer:
    """Serves ``exports`` (name -> backend) to any number of listeners.

    Invariant: every connection task is in ``_connections`` until it has closed its
    socket and awaited every request task it started.
    """

    def __init__(self, exports: Mapping[str, NbdBackend], *, descriptions: Mapping[str, str] | None = None,
                 inflight_max: int = INFLIGHT_MAX, inflight_bytes_max: int = INFLIGHT_BYTES_MAX,
                 connections_max: int = CONNECTIONS_MAX, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 tls: ssl.SSLContext | None = None, server_inflight_bytes_max: int = SERVER_INFLIGHT_BYTES_MAX,
                 stall_timeout_s: float = STALL_TIMEOUT_S, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 close_linger_s: float = CLOSE_LINGER_S) -> None:
        self.exports: dict[str, Export] = {}
        for name, backend in exports.items():
            try:
                nbd.parse_export_name(name.encode())  # the same rule a client's name meets
            except nbd.OptionInvalid as exc:
                raise ConfigError(f"NBD export name {name[:64]!r}: {exc.message}") from None
            backend.block_sizes.check(backend.size, f"export {name!r}")
            self.exports[name] = Export(name, backend, (descriptions or {}).get(name, ""))
        _check_bounds(stall_timeout_s=stall_timeout_s, server_inflight_bytes_max=server_inflight_bytes_max,
                      idle_timeout_s=idle_timeout_s, close_linger_s=close_linger_s)
        self.inflight_max = inflight_max
        self.inflight_bytes_max = inflight_bytes_max
        self.connections_max = connections_max
        self.handshake_timeout_s = handshake_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.close_linger_s = close_linger_s
        self.budget = _ServerBudget(server_inflight_bytes_max)
        # With a TLS context the server requires TLS (the protocol's FORCEDTLS): before
        # STARTTLS a client may only ABORT; no export name, size or byte goes in the clear.
        self.tls = tls
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: dict[asyncio.Task, _Connection] = {}
        self._refusing: set[asyncio.Task] = set()
        self._closing = False

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        """asyncio.start_server's protocol, with a reader that counts what it is fed."""
        loop = asyncio.get_running_loop()
        return asyncio.StreamReaderProtocol(_CountingReader(limit=READ_BUFFER_BYTES, loop=loop), self._accept,
                                            loop=loop)

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on TCP; port 0 picks a free one. Returns the bound (host, port)."""
        server = await asyncio.get_running_loop().create_server(self._protocol, host, port)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        logger.info("nbd_listening", transport="tcp", host=bound[0], port=bound[1], exports=sorted(self.exports))
        return bound[0], bound[1]

    async def start_unix(self, path: str | os.PathLike[str]) -> str:
        path = os.fspath(path)
        server = await asyncio.get_running_loop().create_unix_server(self._protocol, path)
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
        """Stop listening, drop every connection (cancelling its requests, aborting its
        socket: a client that does not read cannot hold this up), wait for all."""
        self._closing = True
        for server in self._servers:
            server.close()
        tasks = [*self._connections, *self._refusing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:  # Python 3.11 leaves the socket file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths.clear()

    async def _accept(self, reader: _CountingReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = _peer_name(writer)
        try:
            if len(self._connections) >= self.connections_max and not await self._evict_idle():
                await self._refuse(reader, writer, peer)
                return
            if self._closing:  # accepted as close() began: close() does not wait for us
                writer.transport.abort()
                return
            connection = _Connection(self, reader, writer, peer)
            self._connections[task] = connection
            try:
                await connection.run()
            finally:
                del self._connections[task]
        except asyncio.CancelledError:
            # close() cancelled us and waits for us; asyncio's stream callback would log a
            # cancelled handler task as an error. Any other cancellation goes through.
            if not self._closing:
                raise

    async def _evict_idle(self) -> bool:
        """At the connection cap: drop the connection idle longest, if one has been idle
        for ``idle_timeout_s``, and wait until it is gone. False when none has."""
        now = asyncio.get_running_loop().time()
        idle = [(c.idle_for(now), task) for task, c in self._connections.items()]
        idle = [(seconds, task) for seconds, task in idle if seconds is not None and seconds >= self.idle_timeout_s]
        if not idle:
            return False
        seconds, task = max(idle, key=lambda pair: pair[0])
        victim = self._connections[task]
        logger.info("nbd_idle_evicted", peer=victim.peer, idle_s=round(seconds, 1),
                    connections_max=self.connections_max)
        victim.drop("evicted_idle")
        await asyncio.wait([task])
        return True

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        """A client over the connection cap: the protocol has no refusal before the
        options, so it gets the greeting and NBD_REP_ERR_POLICY, with the reason, for each
        option (qemu and libnbd print it), within REFUSE_TIMEOUT_S; then the close."""
        logger.warning("nbd_connection_refused", peer=peer, reason="connections_max",
                       connections_max=self.connections_max)
        task = asyncio.current_task()
        if len(self._refusing) >= REFUSING_MAX or self._closing:
            writer.transport.abort()
            return
        self._refusing.add(task)
        message = f"the server is at its maximum of {self.connections_max} connections: try again later"
        try:
            async with asyncio.timeout(REFUSE_TIMEOUT_S):
                await _refuse_options(reader, writer, message)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, nbd.NbdProtocolError):
            pass  # the client went, stalled or broke the protocol: it is closed all the same
        finally:
            self._refusing.discard(task)
            await _close_stream(writer, None if self._closing else self.close_linger_s)


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


async def _close_stream(writer: asyncio.StreamWriter, linger_s: float | None) -> None:
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


def _check_bounds(*, stall_timeout_s: float, server_inflight_bytes_max: int, idle_timeout_s: float,
                  close_linger_s: float) -> None:
    """ConfigError naming the argument: the first two must be above zero (a watchdog
    every quarter of 0 s would spin), the others at least zero."""
    for name, value, minimum_excluded in (("stall_timeout_s", stall_timeout_s, True),
                                          ("server_inflight_bytes_max", server_inflight_bytes_max, True),
                                          ("idle_timeout_s", idle_timeout_s, False),
                                          ("close_linger_s", close_linger_s, False)):
        if value < 0 or (minimum_excluded and value == 0):
            raise ConfigError(f"NBD server {name} {value}: expected {'above' if minimum_excluded else 'at least'} 0")


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
        self._loop = asyncio.get_running_loop()
        self._write_lock = asyncio.Lock()
        self._outbox: list[bytes | bytearray | memoryview] = []
        self._outbox_bytes = 0
        self._flush_scheduled = False
        self._requests: set[asyncio.Task] = set()
        self._submitted = 0  # writes handed to the backend's submit_write, not answered yet
        self._submitted_idle = asyncio.Event()
        self._submitted_idle.set()
        self._budget = _InflightBudget(server.inflight_max, server.inflight_bytes_max, server.budget)
        # What the watchdog looks at: bytes read from ``reader`` (vs its ``received``),
        # bytes handed to the transport (less its buffer: bytes sent), and what the reader
        # loop waits for from the client (None: nothing, "header" or "payload").
        self._consumed = 0
        self._queued_total = 0
        self._awaiting: str | None = None
        self._active_at = self._loop.time()  # last reply handed to the transport
        self._watchdog: asyncio.TimerHandle | None = None
        self._progress = (0, 0)
        self._quiet_since = 0.0
        self._dropped: str | None = None  # why drop() ended the connection
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
            self._stop_watchdog()
            await self._cancel_requests()
            self._flush()  # what was answered before the end goes out
            await _close_stream(self.writer, self._linger_s(reason))
        reason = self._dropped or reason
        logger.info("nbd_disconnected", peer=self.peer, reason=reason, requests=self.served, refused=self.refused)

    def _linger_s(self, reason: str) -> float | None:
        """How long the close may wait for the last replies (None: abort at once). They
        are owed to a client that ended the session by the protocol (DISC, ABORT), and to
        one that broke it when an error reply explains why (TOO_BIG, a WRITE too large) —
        then only if the transport still buffers it, as an abort would drop it."""
        if self.server._closing or self._dropped is not None:
            return None
        if reason in ("disc", "closed"):
            return self.server.close_linger_s
        if reason == "protocol_error" and self.writer.transport.get_write_buffer_size():
            return self.server.close_linger_s
        return None

    def drop(self, reason: str) -> None:
        """End this connection now (the watchdog, or the server evicting it): its socket
        is aborted, so every wait on it ends and ``run`` cleans up."""
        if self._dropped is None:
            self._dropped = reason
            logger.info("nbd_dropped", peer=self.peer, reason=reason)
        self.writer.transport.abort()

    def idle_for(self, now: float) -> float | None:
        """Seconds this connection has been idle in the transmission phase — nothing in
        flight, no part of a request read, no reply unsent — or None when it is not idle."""
        if self._awaiting != "header" or self._requests or self._submitted or self._dropped is not None:
            return None
        if self.reader.received > self._consumed or self._outbox_bytes:
            return None
        if self.writer.transport.get_write_buffer_size():
            return None
        return now - self._active_at

    # ------------------------------------------------------------------ watchdog

    def _start_watchdog(self) -> None:
        self._progress = (self.reader.received, self._sent_total())
        self._quiet_since = self._loop.time()
        self._watchdog = self._loop.call_later(self.server.stall_timeout_s / 4, self._watch)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _watch(self) -> None:
        """Timer, four times per ``stall_timeout_s``: drops a client that owes us bytes
        and has moved none since ``stall_timeout_s`` ago."""
        now = self._loop.time()
        progress = (self.reader.received, self._sent_total())
        if progress != self._progress or not self._owes():
            self._progress, self._quiet_since = progress, now
        elif now - self._quiet_since >= self.server.stall_timeout_s:
            self._watchdog = None
            self.drop("stalled")
            return
        self._watchdog = self._loop.call_later(self.server.stall_timeout_s / 4, self._watch)

    def _owes(self) -> bool:
        """The client owes us bytes: replies it has not read, or the rest of a request."""
        if self.writer.transport.get_write_buffer_size():
            return True
        if self._awaiting == "payload":
            return True
        return self._awaiting == "header" and self.reader.received > self._consumed

    def _sent_total(self) -> int:
        return self._queued_total - self.writer.transport.get_write_buffer_size()

    async def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        """One whole message, then a wait while the replies owed are past ``WRITE_BUFFER_HIGH``."""
        self._send_nowait(*parts)
        await self._writable()

    def _send_nowait(self, *parts: bytes | bytearray | memoryview) -> None:
        """One whole message: no other reply can come between its parts.

        Messages are queued and written together once per loop iteration: the replies of
        a batch of writes, answered in the same iteration, go out in one ``send`` instead
        of one each (a syscall per 4 KiB reply was an eighth of an export's CPU)."""
        self._outbox.extend(parts)
        self._outbox_bytes += sum(map(len, parts))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    async def _writable(self) -> None:
        """Until the replies owed (queued, and in the transport's buffer) are at most
        ``WRITE_BUFFER_HIGH``. For a client that reads none, the watchdog drops the
        connection, and this ends with ConnectionResetError."""
        while self.writer.transport.get_write_buffer_size() + self._outbox_bytes > WRITE_BUFFER_HIGH:
            if self.writer.is_closing():
                raise ConnectionResetError("connection closed while replies were owed")
            self._flush()
            async with self._write_lock:
                await self.writer.drain()

    def _flush(self) -> None:
        self._flush_scheduled = False
        parts, self._outbox = self._outbox, []
        queued, self._outbox_bytes = self._outbox_bytes, 0
        if parts and not self.writer.is_closing():
            self.writer.writelines(parts)
            self._queued_total += queued
            self._active_at = self._loop.time()

    # ------------------------------------------------------------------ handshake

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
        reader = _CountingReader(limit=READ_BUFFER_BYTES)
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

    # ------------------------------------------------------------------ transmission

    async def _transmission(self) -> str:
        """Read requests until DISC (returns "disc") or a protocol error / end of stream.
        Each request waits for its share of the in-flight budget before its payload is read:
        a client can make us hold at most the budget, plus ``WRITE_BUFFER_HIGH`` of replies
        not yet sent, plus what the reader buffers (``READ_BUFFER_BYTES``, twice that at
        most before it stops reading the socket). The watchdog runs meanwhile."""
        assert self.export is not None and self.limits is not None
        self._start_watchdog()
        try:
            return await self._read_requests()
        finally:
            self._stop_watchdog()

    async def _read_requests(self) -> str:
        submit = getattr(self.export.backend, "submit_write", None)
        reader = self.reader
        while True:
            if self.writer.transport.get_write_buffer_size() + self._outbox_bytes > WRITE_BUFFER_HIGH:
                await self._writable()  # a client that does not read its replies: stop reading its requests
            self._awaiting = "header"  # idle until its first byte, partial after (the watchdog tells)
            header = await reader.readexactly(nbd.REQUEST_SIZE)
            self._awaiting = None
            self._consumed += nbd.REQUEST_SIZE
            req = nbd.parse_request(header)
            if req.command == nbd.CMD_DISC:
                await self._drain_requests()
                return "disc"
            payload_len = req.length if req.command == nbd.CMD_WRITE else 0
            if payload_len > nbd.REQUEST_BYTES_MAX:
                # We will not buffer it, and cannot skip it: answer, then hang up.
                message = f"write of {req.length} bytes exceeds {nbd.REQUEST_BYTES_MAX}"
                self._reply_error(req, nbd.EINVAL, message)
                raise nbd.NbdProtocolError(message)
            cost = max(payload_len, req.length if req.command == nbd.CMD_READ else 0)
            await self._budget.take(cost)
            try:
                payload = await self._read_payload(payload_len) if payload_len else b""
            except BaseException:
                self._budget.give(cost)
                raise
            if (submit is not None and req.command == nbd.CMD_WRITE and req.length
                    and not req.flags & nbd.CMD_FLAG_FUA and self._submit(submit, req, payload, cost)):
                continue
            task = asyncio.create_task(self._serve(req, payload, cost))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    async def _read_payload(self, n: int) -> bytes:
        self._awaiting = "payload"
        payload = await self.reader.readexactly(n)
        self._awaiting = None
        self._consumed += n
        return payload

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
        """Answer one request; its share of the budget is given back once its reply is
        queued and the replies owed are back under ``WRITE_BUFFER_HIGH`` — the reply's
        bytes then sit in the transport, and count until they could leave it."""
        try:
            await self._answer(req, payload)
            payload = b""  # the reply is queued (and the READ's data with it): hold nothing while it waits
            if self.writer.transport.get_write_buffer_size() + self._outbox_bytes > WRITE_BUFFER_HIGH:
                await self._writable()
        except ConnectionError:
            # The socket went away under the reply; the reader loop sees it and cleans up.
            pass
        finally:
            self.served += 1
            self._budget.give(cost)

    async def _answer(self, req: nbd.Request, payload: bytes) -> None:
        """Run ``req`` and queue its reply (or its error)."""
        code, message = nbd.request_error(req, self.limits)
        if code:
            # Debug only: a client can send these as fast as it likes; the count is
            # in the disconnect event.
            self.refused += 1
            logger.debug("nbd_request_refused", peer=self.peer, export=self.export.name, command=req.name,
                         offset=req.offset, length=req.length, error=code, reason=message)
            self._reply_error(req, code, message)
            return
        try:
            data = await self._run(req, payload)
        except asyncio.CancelledError:
            raise
        except (OSError, CdpError) as exc:
            code = nbd_errno(exc)
            logger.warning("nbd_backend_error", peer=self.peer, export=self.export.name, command=req.name,
                           offset=req.offset, length=req.length, error=code, reason=str(exc))
            self._reply_error(req, code, f"{req.name} failed: {exc}")
            return
        except Exception as exc:  # a backend bug: this request fails, the export goes on
            logger.error("nbd_backend_bug", exc_info=True, peer=self.peer, export=self.export.name,
                         command=req.name)
            self._reply_error(req, nbd.EIO, f"{req.name} failed: {type(exc).__name__}")
            return
        self._reply_ok(req, data)

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

    def _reply_ok(self, req: nbd.Request, data: bytes | bytearray | memoryview | None) -> None:
        if req.command != nbd.CMD_READ:
            self._send_nowait(nbd.pack_simple_reply(req.handle))
        elif not self.structured:
            self._send_nowait(nbd.pack_simple_reply(req.handle), data)
        elif req.length:
            self._send_nowait(nbd.pack_data_chunk_header(req.handle, req.offset, req.length, done=True), data)
        else:
            self._send_nowait(nbd.pack_none_chunk(req.handle))  # a data chunk holds at least one byte

    def _reply_error(self, req: nbd.Request, code: int, message: str) -> None:
        self._send_nowait(*self._error_parts(req, code, message))

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
