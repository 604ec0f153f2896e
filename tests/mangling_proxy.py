"""An HTTP/1.1 proxy on 127.0.0.1 (an ephemeral port) in front of a real server (moto,
Azurite) whose answers a test rewrites byte for byte: cut a listing short, flip a byte of
a read, change or drop a header, announce a size it never sends, or drop the answer after
the server acted on the request. Unlike ``tests.tcp_proxy`` (a pipe that can go down), it
reads each exchange whole; unlike an HTTP-level proxy (aiohttp's server adds its own
``Date`` to every answer, and inflates or re-frames bodies), it sends what it is told.

``async with ManglingProxy(host, port) as proxy``: ``proxy.url`` (``proxy.port``) is the
endpoint to give the client. Each request the client sends on a connection goes upstream
on a connection of its own with ``Connection: close``; the whole answer is read, parsed
(a chunked body is de-chunked) and handed to ``proxy.mangle(exchange)`` (set or unset at
any time), which returns:

- None: the answer goes back as it came;
- a ``Reply`` (``exchange.reply`` changed, or a new one): sent as it says;
- an async callable ``f(writer)``: it writes what it wants (a drip, an endless body), or
  nothing (``cut``: no answer, though the server acted), and the client's connection is
  dropped after it.

``sent`` counts the bytes written back to clients (what a test checks was never read);
``exchanges`` logs (method, path, upstream status) of each exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Headers = list[tuple[str, str]]


@dataclass
class Reply:
    """An answer; a new one (not the upstream's) is sent with its body's Content-Length."""

    status: int
    reason: str
    headers: Headers
    body: bytes = b""
    #: Sent as Content-Length when set; else the upstream's header is kept while the body
    #: is the one read (a HEAD's Content-Length is the object's size), or the body's
    #: length is sent.
    length: int | None = None
    _as_read: bytes | None = field(default=None, repr=False)  # the upstream's body; None: a new answer

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def set_header(self, name: str, value: str | None) -> Reply:
        """Replace (or with None, remove) every header ``name``."""
        self.headers = [(k, v) for k, v in self.headers if k.lower() != name.lower()]
        if value is not None:
            self.headers.append((name, value))
        return self

    def raw(self) -> bytes:
        headers = self.headers
        if self.length is not None or self._as_read is None or self.body != self._as_read:
            length = len(self.body) if self.length is None else self.length
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(length)))
        head = [f"HTTP/1.1 {self.status} {self.reason}"] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass
class Exchange:
    method: str
    path: str  # with the query
    request_headers: Headers
    reply: Reply


Mangled = Reply | Callable[[asyncio.StreamWriter], Awaitable[None]] | None


async def cut(writer: asyncio.StreamWriter) -> None:
    """No answer at all (the server did act on the request): the connection is dropped,
    as after any callable."""


def is_data_get(exchange: Exchange, key: str) -> bool:
    """A GET of the object ``key`` (not a listing, not a container or bucket call)."""
    return (exchange.method == "GET" and exchange.path.split("?")[0].endswith("/" + key)
            and "comp=list" not in exchange.path and "list-type" not in exchange.path)


class ManglingProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mangle: Callable[[Exchange], Mangled] | None = None
        self.exchanges: list[tuple[str, str, int]] = []
        self.sent = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ManglingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the client's connection is to be dropped."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ")[:2]
        headers = _headers(lines[1:])
        size = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        if any(k.lower() == "expect" for k, _ in headers):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await reader.readexactly(size)
        sent_headers = [(k, v) for k, v in headers if k.lower() not in ("connection", "expect")]
        request = "\r\n".join([lines[0]] + [f"{k}: {v}" for k, v in sent_headers] + ["Connection: close", "", ""])
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        try:
            up_writer.write(request.encode("latin-1") + body)
            await up_writer.drain()
            raw = await up_reader.read()
        finally:
            up_writer.transport.abort()
        reply = _parse(raw)
        self.exchanges.append((method, path, reply.status))
        out = None if self.mangle is None else self.mangle(Exchange(method, path, headers, reply))
        if callable(out):
            with contextlib.suppress(ConnectionError):
                await out(_Counting(self, writer))
            return False
        data = (reply if out is None else out).raw()
        writer.write(data)
        await writer.drain()
        self.sent += len(data)
        return True


class _Counting:
    """A StreamWriter that counts what is written through it into ``proxy.sent``."""

    def __init__(self, proxy: ManglingProxy, writer: asyncio.StreamWriter) -> None:
        self._proxy, self._writer = proxy, writer

    def write(self, data: bytes) -> None:
        self._proxy.sent += len(data)
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()


def _headers(lines: list[str]) -> Headers:
    return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines if line)]


def _parse(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    reply = Reply(int(status), reason[0] if reason else "", _headers(lines[1:]), body)
    if (reply.header("Transfer-Encoding") or "").lower() == "chunked":
        reply.set_header("Transfer-Encoding", None)
        reply.body = _dechunk(body)
        reply.set_header("Content-Length", str(len(reply.body)))
    reply._as_read = reply.body
    return reply


def _dechunk(body: bytes) -> bytes:
    out, at = [], 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


__all__ = ["Exchange", "Headers", "ManglingProxy", "Mangled", "Reply", "cut", "is_data_get"]
