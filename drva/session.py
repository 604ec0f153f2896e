"""One filter connection on a DRVA: handshake, frames in, acks out (FORMAT.md §9).

Every refusal is logged with its reason and answered with an ``ERROR``; a refused frame
never reaches the log (it is validated whole before it is staged), and a broken stream
closes only this connection. Frames of a domain are deduplicated by seq: records at or
below the domain's accepted seq are a resend and are dropped, a frame that overlaps is
cut to its new records, a frame after a gap is refused.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from cdp import wire
from cdp.errors import FormatError
from cdp.frame import Frame, decode_frame, encode_frame
from cdp.logs import get_logger
from cdp.records import payload_lengths, payload_starts
from drva import messages

if TYPE_CHECKING:
    from drva.daemon import Drva
    from drva.domain import DomainState

log = get_logger("drva.session")

# Before WELCOME a peer is a stranger (FORMAT.md §9.1): only HELLO, then AUTH, whose
# bodies are at most CONTROL_BODY_MAX (64 KiB); any other type is refused from its header
# before its body is read. At most HANDSHAKES_MAX connections may be between accept and
# WELCOME (more get ERROR busy at once), each for at most HANDSHAKE_TIMEOUT_S; until
# WELCOME a connection's read-ahead buffer is HANDSHAKE_READ_AHEAD_BYTES (what the largest
# handshake body needs), and reading stops while it is full (TCP flow control takes
# over). So the bytes buffered for peers not yet authenticated stay under
# HANDSHAKES_MAX x HANDSHAKE_READ_AHEAD_BYTES = 1 MiB. A welcomed filter's read-ahead
# grows to STREAM_READ_AHEAD_BYTES (SessionStream.grow).
HANDSHAKES_MAX = 16
HANDSHAKE_TIMEOUT_S = 10.0  # from accept to WELCOME sent
HANDSHAKE_READ_AHEAD_BYTES = wire.CONTROL_BODY_MAX
STREAM_READ_AHEAD_BYTES = 256 << 10
HANDSHAKE_TYPES = (wire.HELLO, wire.AUTH)
assert all(wire.body_max(t) == wire.CONTROL_BODY_MAX for t in HANDSHAKE_TYPES), "FORMAT.md §9.1"
# What a filter may send once welcomed; anything else is refused from its header.
STREAM_TYPES = frozenset((wire.FRAME, wire.SEED_BEGIN, wire.SEED_CHUNK, wire.SEED_END,
                          wire.FILTER_STATE, wire.PING, wire.PONG, wire.ERROR))
REFUSE_DRAIN_TIMEOUT_S = 2.0  # for the ERROR of a refusal to leave; then the socket closes
ACK_PERIOD_S = 1.0  # every domain's ack (and back-pressure flag) is resent at least this often
ACK_WRITE_BUFFER_MAX = 1 << 20


#: Bodies above this are read straight from the socket into their own buffer
#: (``SessionStream``); smaller ones (headers, control messages) through the read-ahead.
DIRECT_READ_BYTES = 64 << 10


class SessionStream(asyncio.BufferedProtocol):
    """A filter connection's protocol: the socket is read into buffers it hands out.

    ``asyncio.StreamReader`` copies a 1 MiB frame four times on its way in (the
    transport's bytes, the reader's buffer, a slice, ``bytes``): a third of the event
    loop's time under a DRVA-only load of ``benchmarks.ingest``. Here the kernel writes a
    body larger than ``DIRECT_READ_BYTES`` straight into the buffer that becomes the
    frame (``readexactly`` returns it, a ``bytearray``); headers and control messages go
    through a read-ahead buffer of ``limit`` bytes, allocated once.

    Invariant: unread bytes are ``_ahead[_start:_end]``; while a direct read is pending
    (``_target``), the socket's bytes go to it and the read-ahead holds none. Reading
    stops while the read-ahead is full and no direct read is pending.

    It is also the protocol of the connection's ``StreamWriter`` (``drain`` waits while
    the transport has paused writing). Not ``asyncio.streams.FlowControlMixin``: that is
    an ``asyncio.Protocol``, and uvloop reads into a protocol's buffers only when it is not.
    """

    def __init__(self, limit: int, on_connected: Callable[["SessionStream", asyncio.StreamWriter], None] | None
                 = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._limit = limit
        self._on_connected = on_connected
        # Allocated by the first read (``get_buffer``): a connection refused at accept
        # (ERROR busy) never holds one, so a flood of connects costs HANDSHAKES_MAX
        # read-aheads at most, not one per connection.
        self._ahead = bytearray()
        self._start = self._end = 0
        self._target: memoryview | None = None
        self._target_got = 0
        self._waiter: asyncio.Future | None = None
        self._eof = False
        self._exception: BaseException | None = None
        self._reading_paused = False
        self._closed = loop.create_future()
        self._writing_paused = False
        self._drain_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._connection_lost = False
        self.transport: asyncio.Transport | None = None
        self.writer: asyncio.StreamWriter | None = None

    # ------------------------------------------------------------------ protocol side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.writer = asyncio.StreamWriter(transport, self, None, self._loop)  # type: ignore[arg-type]
        if self._on_connected is not None:
            self._on_connected(self, self.writer)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._target_got:]
        if not self._ahead:
            self._ahead = bytearray(self._limit)
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._ahead):  # room only before the unread bytes: move them
            n = self._end - self._start
            self._ahead[:n] = self._ahead[self._start : self._end]
            self._start, self._end = 0, n
        return memoryview(self._ahead)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._target_got += nbytes
            if self._target_got == len(self._target):
                self._target = None  # full: the next bytes go to the read-ahead
        else:
            self._end += nbytes
            if self._end - self._start >= len(self._ahead):
                self._pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._connection_lost = True
        if exc is not None:
            self._exception = exc
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)
        for waiter in self._drain_waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _drain_helper(self) -> None:  # StreamWriter.drain waits on this
        if self._connection_lost:
            raise ConnectionResetError("Connection lost")
        if not self._writing_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future:  # StreamWriter.wait_closed
        return self._closed

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    async def _wait(self, partial: bytes | bytearray | memoryview, n: int) -> None:
        """Wait for more bytes; IncompleteReadError (or what broke the connection) at EOF."""
        if self._eof:
            if self._exception is not None and not isinstance(self._exception, ConnectionError):
                raise self._exception
            raise asyncio.IncompleteReadError(bytes(partial), n)
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def grow(self, limit: int) -> None:
        """Raise the read-ahead to ``limit`` bytes, keeping the unread ones: a filter
        once welcomed (the handshake's read-ahead is smaller, see HANDSHAKES_MAX)."""
        if limit <= self._limit:
            return
        self._limit = limit
        if self._ahead:
            ahead = bytearray(limit)
            n = self._end - self._start
            ahead[:n] = memoryview(self._ahead)[self._start : self._end]
            self._ahead, self._start, self._end = ahead, 0, n
        if self._target is None:
            self._resume_reading()  # paused while the smaller one was full: there is room now

    # ------------------------------------------------------------------ reader side

    async def readexactly(self, n: int) -> bytes | bytearray:
        """The next ``n`` bytes (``asyncio.StreamReader.readexactly``); a body above
        ``DIRECT_READ_BYTES`` comes back as the ``bytearray`` the socket was read into."""
        if n <= DIRECT_READ_BYTES and n <= self._limit:
            while self._end - self._start < n:
                self._resume_reading()
                await self._wait(memoryview(self._ahead)[self._start : self._end], n)
            data = bytes(memoryview(self._ahead)[self._start : self._start + n])
            self._start += n
            self._resume_reading()
            return data
        out = bytearray(n)
        view = memoryview(out)
        have = min(self._end - self._start, n)
        view[:have] = memoryview(self._ahead)[self._start : self._start + have]
        self._start += have
        if have == n:
            return out
        self._target, self._target_got = view, have
        try:
            while self._target_got < n:
                self._resume_reading()
                await self._wait(view[: self._target_got], n)
        finally:
            self._target = None
        return out


class Refused(Exception):
    """This session must end: an ERROR with ``code`` goes to the peer first."""

    def __init__(self, code: str, message: str, domain: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.domain = domain


def _fenced(dom: "DomainState") -> Refused:
    """The refusal of a domain this DRVA no longer writes, with the reason it stopped."""
    return Refused("fenced", f"domain {dom.id} is fenced on this DRVA: {dom.stats.last_error or 'another owner'}",
                   dom.id)


class _PeerEnded(Exception):
    """The filter ended the session (a fatal ERROR): close it, answer nothing."""


class Session:
    """A filter's connection. Invariant: ``domains`` are streamed by this session only."""

    def __init__(self, drva: "Drva", reader: "SessionStream | asyncio.StreamReader", writer: asyncio.StreamWriter,
                 handshake_deadline: float | None = None):
        self.drva = drva
        # Loop time by which WELCOME must be sent: HANDSHAKE_TIMEOUT_S from accept (a TLS
        # session's own handshake came first and spent part of it).
        self.handshake_deadline = (asyncio.get_running_loop().time() + HANDSHAKE_TIMEOUT_S
                                   if handshake_deadline is None else handshake_deadline)
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.where = f"filter session from {peer[0]}:{peer[1]}" if peer else "filter session"
        self.filter_name = "?"
        self.domains: dict[int, DomainState] = {}
        self._acked: dict[int, int] = {}
        self._ack_wanted = asyncio.Event()
        self.closed = False

    async def run(self) -> None:
        ack_task = None
        try:
            try:
                async with asyncio.timeout_at(self.handshake_deadline):
                    await self._handshake()
            except TimeoutError:
                raise Refused("timeout", f"no complete handshake in {HANDSHAKE_TIMEOUT_S} s") from None
            ack_task = asyncio.create_task(self._ack_loop())
            while True:
                msg = await wire.read_message(self.reader, self.where, STREAM_TYPES)
                await self._dispatch(msg)
        except (asyncio.IncompleteReadError, ConnectionError, _PeerEnded):
            log.info("session_closed", peer=self.where, filter=self.filter_name)
        except wire.ProtocolError as exc:
            await self._refuse(exc.code, exc.message)
        except Refused as exc:
            await self._refuse(exc.code, str(exc), exc.domain)
        except FormatError as exc:
            await self._refuse("bad_frame", exc.message)
        finally:
            self.close()  # also frees its handshake slot, if it never got past WELCOME
            if ack_task is not None:
                ack_task.cancel()
                await asyncio.gather(ack_task, return_exceptions=True)

    async def _refuse(self, code: str, message: str, domain: int | None = None) -> None:
        log.warning("session_refused", peer=self.where, filter=self.filter_name, code=code, reason=message)
        try:
            self.writer.writelines(wire.error_message(code, message, domain=domain))
            async with asyncio.timeout(REFUSE_DRAIN_TIMEOUT_S):
                await self.writer.drain()
        except TimeoutError:
            # The peer does not read: close() would wait for the flush forever.
            self.writer.transport.abort()
        except (ConnectionError, RuntimeError):
            pass  # the peer is gone: the socket closes anyway

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for dom in self.domains.values():
            if dom.session is self:
                dom.session = None
        self.drva.sessions.discard(self)
        self.drva.handshaking.discard(self)
        self.writer.close()

    # ------------------------------------------------------------------ handshake

    async def _expect(self, mtype: int) -> dict[str, Any]:
        assert mtype in HANDSHAKE_TYPES
        # Any other type is refused from its header: a stranger's FRAME header announcing
        # 66 MiB costs 16 bytes of reading, not 66 MiB.
        msg = await wire.read_message(self.reader, self.where, (mtype,))
        return messages.parse(msg, self.where)

    async def _handshake(self) -> None:
        hello = await self._expect(wire.HELLO)
        name, wanted = hello["filter"], hello["domains"]
        self.filter_name = name
        filter_nonce = bytes.fromhex(hello["nonce"])
        drva_nonce = wire.new_nonce()
        self.writer.writelines(wire.control(wire.CHALLENGE, {"drva": self.drva.cfg.name, "nonce": drva_nonce.hex()}))
        auth = await self._expect(wire.AUTH)
        expected = wire.filter_mac(self.drva.cfg.secret, filter_nonce, drva_nonce, name)
        if not wire.mac_matches(expected, auth["mac"]):
            raise Refused("bad_auth", f"authentication failed for filter {name!r}")
        accepted = {}
        for domain_id in wanted:
            dom = self.drva.domains.get(domain_id)
            if dom is None:
                raise Refused("unknown_domain", f"domain {domain_id} is not served by DRVA {self.drva.cfg.name}")
            if dom.fenced:
                raise _fenced(dom)
            if not dom.catalog_ready and not dom.catalog_known:
                # WELCOME tells the filter where to number from. A DRVA that never
                # committed this domain learns its durable seq only from the store's
                # catalog (after a failover: the fork seq); welcoming before would let
                # the filter number from 1 and have its writes taken for ones already
                # committed, acked and dropped.
                raise Refused("not_ready", f"domain {domain_id}: DRVA {self.drva.cfg.name} has not opened its "
                                           f"catalog yet; retry")
            accepted[domain_id] = dom
        # Every check passed: only now may this session take its domains over. A refused
        # HELLO must never close the live session of a domain it named.
        self._take_over(accepted)
        mac = wire.drva_mac(self.drva.cfg.secret, filter_nonce, drva_nonce, self.drva.cfg.name)
        state = {str(d.id): {"durable_seq": d.durable_seq} for d in self.domains.values()}
        self.writer.writelines(wire.control(wire.WELCOME, {"mac": mac, "domains": state}))
        await self.writer.drain()
        log.info("session_open", peer=self.where, filter=name, domains=sorted(self.domains))

    def _take_over(self, domains: dict[int, "DomainState"]) -> None:
        """Become the one session of ``domains``, closing any older one (FORMAT.md §9.2).
        No await in here: nothing can run between the last check and WELCOME."""
        for domain_id, dom in domains.items():
            if dom.session is not None and dom.session is not self:
                log.info("session_replaced", domain=domain_id, old=dom.session.where, new=self.where)
                dom.session.close()
            dom.session = self
            self.domains[domain_id] = dom
        self.drva.handshaking.discard(self)
        self.drva.sessions.add(self)
        grow = getattr(self.reader, "grow", None)
        if grow is not None:
            grow(STREAM_READ_AHEAD_BYTES)

    # ------------------------------------------------------------------ streaming

    async def _dispatch(self, msg: wire.Message) -> None:
        if msg.type == wire.FRAME:
            await self._frame(msg.body)
        elif msg.type in (wire.SEED_BEGIN, wire.SEED_CHUNK, wire.SEED_END):
            await self.drva.seeder.handle(self, msg)
        elif msg.type == wire.FILTER_STATE:
            self._filter_state(messages.parse(msg, self.where))
        elif msg.type == wire.PING:
            messages.parse(msg, self.where)
            self.writer.writelines(wire.control(wire.PONG, {}))
        elif msg.type == wire.PONG:
            messages.parse(msg, self.where)
        elif msg.type == wire.ERROR:
            doc = messages.parse(msg, self.where)
            log.warning("filter_error", peer=self.where, filter=self.filter_name, code=doc["code"],
                        reason=doc["message"], fatal=doc["fatal"])
            if doc["fatal"]:
                raise _PeerEnded()
        else:
            raise Refused("unexpected_message", f"{msg.name} is not expected from a filter")

    async def _frame(self, raw: bytes) -> None:
        frame = decode_frame(raw, self.where)
        dom = self.domains.get(frame.domain)
        if dom is None:
            raise Refused("unknown_domain", f"frame of domain {frame.domain}, not in this session's HELLO")
        if dom.fenced:
            raise _fenced(dom)
        dom.stats.frames_received += 1
        dom.stats.bytes_received += len(raw)
        if frame.last_seq <= dom.accepted_seq:
            dom.stats.duplicates_dropped += 1
            log.debug("duplicate_dropped", domain=dom.id, first_seq=frame.first_seq, last_seq=frame.last_seq)
            self.want_ack()
            return
        if frame.first_seq > dom.accepted_seq + 1:
            dom.stats.frames_refused += 1
            raise Refused("seq_gap", f"domain {dom.id}: frame starts at seq {frame.first_seq}, "
                                     f"expected {dom.accepted_seq + 1} (records are missing)")
        if frame.first_seq <= dom.accepted_seq:
            raw, frame = _cut(frame, dom.accepted_seq + 1)
        dom.newest_received_ts = int(frame.records["timestamp_ns"][-1])
        await self.drva.committer.submit(dom, raw, frame)

    def _filter_state(self, doc: dict[str, Any]) -> None:
        """``doc`` is checked whole (drva.messages): every field is there, typed, in range."""
        dom = self.domains.get(doc["domain"])
        if dom is None:
            raise Refused("unknown_domain", f"FILTER_STATE for domain {doc['domain']}, not in this session")
        if dom.filter_state.get("mode") != doc["mode"]:
            log.info("filter_mode", domain=dom.id, mode=doc["mode"], dirty_bytes=doc["dirty_bytes"])
        dom.filter_state = {k: doc[k] for k in
                            ("mode", "captured_seq", "captured_ts", "buffered_bytes", "dirty_bytes")}

    # ------------------------------------------------------------------ acks

    def want_ack(self) -> None:
        self._ack_wanted.set()

    async def _ack_loop(self) -> None:
        """Send the newest durable seq of each domain when it moved (coalesced), and at
        least every second with the current back-pressure flag."""
        while True:
            try:
                async with asyncio.timeout(ACK_PERIOD_S):
                    await self._ack_wanted.wait()
            except TimeoutError:
                self._acked.clear()  # periodic: resend the state of every domain
            self._ack_wanted.clear()
            if self.writer.transport.get_write_buffer_size() > ACK_WRITE_BUFFER_MAX:
                continue  # the filter does not read: acks are cumulative, send later
            flags = wire.ACK_BACKPRESSURE if self.drva.committer.backpressure else 0
            permille = int(self.drva.committer.usage() * 1000)
            for dom in self.domains.values():
                if self._acked.get(dom.id) == dom.durable_seq and not flags:
                    continue
                f = flags | (wire.ACK_STOPPED if dom.fenced else 0)
                self.writer.writelines(wire.ack_message(dom.id, dom.durable_seq, f, permille))
                self._acked[dom.id] = dom.durable_seq


def _cut(frame: Frame, from_seq: int) -> tuple[bytes, Frame]:
    """The records of ``frame`` from ``from_seq`` on, as a new frame (a partial resend)."""
    k = from_seq - frame.first_seq
    starts = payload_starts(payload_lengths(frame.records))
    at = int(starts[k])
    records = np.array(frame.records[k:])
    raw = encode_frame(frame.domain, records, frame.payload[at:])
    return raw, decode_frame(raw, "cut frame")
