"""One NBD client's connection: the handshake (``cdp.nbd.handshake``), then the
transmission phase — requests read in order, each run as a task of its own
(``cdp.nbd.commands``) or, a WRITE without FUA to a backend with ``submit_write``, handed
over with a callback that answers it — within the connection's share of the in-flight
budgets (``cdp.nbd.budget``), its replies batched per loop turn, its progress watched
(``cdp.nbd.watchdog``). The server that accepts, admits and evicts connections, and
what the bounds mean: ``cdp.nbd.server``.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdp.errors import CdpError
from cdp.logs import get_logger
from cdp.nbd import protocol as nbd
from cdp.nbd.backend import NbdBackend
from cdp.nbd.budget import ConnectionBudget
from cdp.nbd.commands import error_reply, nbd_errno, ok_reply, run_command
from cdp.nbd.handshake import HandshakePhase
from cdp.nbd.limits import WRITE_BUFFER_HIGH
from cdp.nbd.streams import CountingReader, close_stream
from cdp.nbd.watchdog import StallWatchdog

if TYPE_CHECKING:
    from cdp.nbd.server import NbdServer

__all__ = ["Connection", "Export"]

logger = get_logger("iofilter.nbd")


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    backend: NbdBackend
    description: str = ""


class Connection(HandshakePhase):
    """One client: handshake and option haggling (``HandshakePhase``), then the
    transmission phase."""

    def __init__(self, server: NbdServer, reader: CountingReader, writer: asyncio.StreamWriter, peer: str) -> None:
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
        self._budget = ConnectionBudget(server.inflight_max, server.inflight_bytes_max, server.budget)
        # What the watchdog looks at: bytes read from ``reader`` (vs its ``received``),
        # bytes handed to the transport (less its buffer: bytes sent), and what the reader
        # loop waits for from the client (None: nothing, "header" or "payload").
        self._consumed = 0
        self._queued_total = 0
        self._awaiting: str | None = None
        self._active_at = self._loop.time()  # last reply handed to the transport
        self._watchdog = StallWatchdog(self._loop, server.stall_timeout_s, self._bytes_moved, self._owes,
                                       self._stalled)
        self._dropped: str | None = None  # why drop() ended the connection
        self.accepted_at = self._loop.time()
        self.haggling = True  # in the handshake: no export chosen yet
        self.served = 0  # requests answered, refused ones included
        self.refused = 0
        self.tls_active = False
        self._plain_streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def run(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the protocol asks for it
        reason = "closed"
        first_option = self._loop.call_later(self.server.first_option_timeout_s, self._first_option_due)
        try:
            try:
                async with asyncio.timeout(self.server.handshake_timeout_s):
                    export = await self._handshake()
            finally:
                first_option.cancel()
                self.haggling = False
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
            self._watchdog.stop()
            await self._cancel_requests()
            self._flush()  # what was answered before the end goes out
            await close_stream(self.writer, self._linger_s(reason))
        reason = self._dropped or reason
        logger.info("nbd_disconnected", peer=self.peer, reason=reason, requests=self.served, refused=self.refused)

    @property
    def dropped(self) -> str | None:
        """Why ``drop`` ended this connection (None: it did not)."""
        return self._dropped

    def _first_option_due(self) -> None:
        """``first_option_timeout_s`` after accept: a client that has not sent its flags
        and an option header yet (nor started TLS, which takes one) is dropped."""
        if self.haggling and not self.tls_active and self.reader.received < (
                nbd.CLIENT_FLAGS_SIZE + nbd.OPTION_HEADER_SIZE):
            self.drop("no_first_option")

    def _linger_s(self, reason: str) -> float | None:
        """How long the close may wait for the last replies (None: abort at once). They
        are owed to a client that ended the session by the protocol (DISC, ABORT), and to
        one that broke it when an error reply explains why (TOO_BIG, a WRITE too large) —
        then only if the transport still buffers it, as an abort would drop it."""
        if self.server.closing or self._dropped is not None:
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

    def _bytes_moved(self) -> tuple[int, int]:
        """(bytes received, bytes sent): the watchdog's measure of progress."""
        return self.reader.received, self._sent_total()

    def _stalled(self) -> None:
        self.drop("stalled")

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

    # ------------------------------------------------------------------ transmission
    # (the handshake before it is HandshakePhase's: cdp.nbd.handshake)

    async def _transmission(self) -> str:
        """Read requests until DISC (returns "disc") or a protocol error / end of stream.
        Each request waits for its share of the in-flight budget before its payload is read:
        a client can make us hold at most the budget, plus ``WRITE_BUFFER_HIGH`` of replies
        not yet sent, plus what the reader buffers (``READ_BUFFER_BYTES``, twice that at
        most before it stops reading the socket). The watchdog runs meanwhile."""
        assert self.export is not None and self.limits is not None
        self._watchdog.start()
        try:
            return await self._read_requests()
        finally:
            self._watchdog.stop()

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
            task = asyncio.create_task(self._serve(req, payload))
            self._requests.add(task)
            task.add_done_callback(functools.partial(self._served, cost))

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
                    self._reply_error(req, code, f"{req.name} failed: {exc}")
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

    async def _serve(self, req: nbd.Request, payload: bytes) -> None:
        """Answer one request; it ends once its reply is queued and the replies owed are
        back under ``WRITE_BUFFER_HIGH`` — the reply's bytes then sit in the transport, and
        count until they could leave it (``_served`` gives its share back then)."""
        try:
            await self._answer(req, payload)
            payload = b""  # the reply is queued (and the READ's data with it): hold nothing while it waits
            if self.writer.transport.get_write_buffer_size() + self._outbox_bytes > WRITE_BUFFER_HIGH:
                await self._writable()
        except ConnectionError:
            # The socket went away under the reply; the reader loop sees it and cleans up.
            pass

    def _served(self, cost: int, task: asyncio.Task) -> None:
        """A request task ended, however it ended: its share of the budget goes back, once.
        A done callback, not ``_serve``'s ``finally``: a task cancelled before its first
        step (its connection ended as it was created) never runs its coroutine, and its
        share would stay taken for good — past the server's budget, every later client
        would wait forever."""
        self._requests.discard(task)
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
            data = await run_command(self.export.backend, req, payload)
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
        self._send_nowait(*ok_reply(req, data, self.structured))

    def _reply_error(self, req: nbd.Request, code: int, message: str) -> None:
        self._send_nowait(*error_reply(req, code, message, self.structured))

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
