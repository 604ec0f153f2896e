"""A filter connection's socket reader: large bodies are received in place (FORMAT.md §9).

``SessionStream`` is the protocol of every filter connection of a DRVA (``drva.session``
runs the session on top of it).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

#: Bodies above this are read straight from the socket into their own buffer
#: (``SessionStream``); smaller ones (headers, control messages) through the read-ahead.
DIRECT_READ_BYTES = 64 << 10


class BodyStalled(Exception):
    """No byte of a body being read arrived for its ``stall_s`` (``SessionStream.readexactly``)."""

    def __init__(self, got: int, n: int, stall_s: float) -> None:
        super().__init__(f"no byte for {stall_s:g} s with {got} of {n} bytes received")
        self.got, self.n, self.stall_s = got, n, stall_s


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
        self._received = 0  # bytes the socket gave, ever (a stalled body is one it stopped giving)
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
        self._received += nbytes
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

    async def readexactly(self, n: int, head: bytes = b"", stall_s: float | None = None) -> bytes | bytearray:
        """The next ``n`` bytes (``asyncio.StreamReader.readexactly``); a body above
        ``DIRECT_READ_BYTES`` comes back as the ``bytearray`` the socket was read into.

        ``head``: bytes of the body already read (its first ``len(head)``: a frame's
        header, read first to know what the body is for); the result starts with them and
        the stream gives the ``n - len(head)`` that follow. ``stall_s``: ``BodyStalled``
        once no byte has arrived for that long while the body is not all there (the peer
        stopped in the middle of it)."""
        if n <= DIRECT_READ_BYTES and n <= self._limit:
            want = n - len(head)
            if self._end - self._start < want:
                watch = _StallWatch(self, stall_s) if stall_s is not None else None
                try:
                    while self._end - self._start < want:
                        self._resume_reading()
                        await self._wait(memoryview(self._ahead)[self._start : self._end], want)
                        if watch is not None and watch.stalled:
                            raise BodyStalled(len(head) + self._end - self._start, n, stall_s)
                finally:
                    if watch is not None:
                        watch.stop()
            data = bytes(memoryview(self._ahead)[self._start : self._start + want])
            self._start += want
            self._resume_reading()
            return head + data if head else data
        out = bytearray(n)
        view = memoryview(out)
        view[: len(head)] = head
        have = min(self._end - self._start, n - len(head))
        view[len(head) : len(head) + have] = memoryview(self._ahead)[self._start : self._start + have]
        self._start += have
        have += len(head)
        if have == n:
            return out
        self._target, self._target_got = view, have
        watch = _StallWatch(self, stall_s) if stall_s is not None else None
        try:
            while self._target_got < n:
                self._resume_reading()
                await self._wait(view[: self._target_got], n)
                if watch is not None and watch.stalled:
                    raise BodyStalled(self._target_got, n, stall_s)
        finally:
            self._target = None
            if watch is not None:
                watch.stop()
        return out


class _StallWatch:
    """While a body is read from ``stream``: once ``stall_s`` pass with no byte arriving,
    ``stalled`` is set and the reader woken. One timer, looking four times per period,
    not a timeout per wake-up: a large body arrives in many pieces."""

    def __init__(self, stream: SessionStream, stall_s: float) -> None:
        self.stream, self.stall_s = stream, stall_s
        self.stalled = False
        self._got = stream._received
        self._since = stream._loop.time()
        self._timer: asyncio.TimerHandle | None = stream._loop.call_later(stall_s / 4, self._check)

    def _check(self) -> None:
        stream = self.stream
        now = stream._loop.time()
        if stream._received != self._got:
            self._got, self._since = stream._received, now
        elif now - self._since >= self.stall_s:
            self._timer = None
            self.stalled = True
            stream._wake()
            return
        self._timer = stream._loop.call_later(self.stall_s / 4, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
