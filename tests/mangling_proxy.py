"""An HTTP proxy on 127.0.0.1 (an ephemeral port) in front of a real server (moto) that
lets a test change what the server answered: cut a listing short, flip a byte of a
read, cut a body, or drop the answer after the server acted on the request. Unlike
``tests.tcp_proxy`` (a pipe that can go down), it reads each exchange whole.

Each request from the client is sent upstream on a connection of its own (``Connection:
close``) and the whole answer is read before ``mangle(method, path, head, body)`` sees
it — ``path`` with its query string, ``head`` the status line and headers, ``body`` the
bytes (de-chunked). It returns None to forward the answer as it is, bytes to send
instead (``answer`` builds them with a matching Content-Length), or a coroutine function
taking the client's ``StreamWriter`` to do something else (``cut``: drop the connection
with no answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

Mangle = Callable[[str, str, bytes, bytes], Any]


def header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` in ``head`` (None: absent)."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def answer(head: bytes, body: bytes) -> bytes:
    """``head`` with ``body``, its Content-Length set to the body's (no other framing)."""
    lines = [line for line in head.split(b"\r\n")
             if line.split(b":", 1)[0].strip().lower() not in (b"content-length", b"transfer-encoding")]
    return b"\r\n".join(lines + [b"Content-Length: " + str(len(body)).encode(), b"", b""]) + body


async def cut(writer: asyncio.StreamWriter) -> None:
    """Drop the client's connection without an answer (the server did act on it)."""
    writer.transport.abort()


def _dechunk(raw: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += raw[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


class ManglingProxy:
    """``async with ManglingProxy(host, port) as proxy``: ``proxy.url`` is the endpoint to
    give the client; set ``proxy.mangle`` (module docstring) at any time. ``log`` holds
    (method, path, status line) of every exchange."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mangle: Mangle | None = None
        self.log: list[tuple[str, str, bytes]] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> ManglingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; False when the client is gone or the answer ended
        the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        lines = head[:-4].split(b"\r\n")
        method, path = (part.decode() for part in lines[0].split(b" ")[:2])
        size = int(header(head, b"content-length") or 0)
        if (header(head, b"expect") or b"").lower() == b"100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        keep = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"expect")]
        body = await reader.readexactly(size)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        try:
            up_writer.write(b"\r\n".join([lines[0], *keep, b"Connection: close", b"", b""]) + body)
            await up_writer.drain()
            raw = await up_reader.read()
        finally:
            up_writer.close()
        rhead, _, rbody = raw.partition(b"\r\n\r\n")
        if (header(rhead, b"transfer-encoding") or b"").lower() == b"chunked":
            rbody = _dechunk(rbody)
            rhead = answer(rhead, rbody).partition(b"\r\n\r\n")[0]
        self.log.append((method, path, rhead.split(b"\r\n", 1)[0]))
        out = self.mangle(method, path, rhead, rbody) if self.mangle is not None else None
        if callable(out):
            await out(writer)
            return False
        # As it came: a HEAD's Content-Length is the object's size, not its empty body's.
        writer.write(out if out is not None else rhead + b"\r\n\r\n" + rbody)
        await writer.drain()
        return True


__all__ = ["ManglingProxy", "Mangle", "answer", "cut", "header"]
