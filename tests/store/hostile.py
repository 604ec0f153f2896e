"""Hostile servers for the S3 and Azure backends: answers the tests write themselves.

- ``FakeHttp``: an aiohttp server on 127.0.0.1 (port 0); every request goes to the
  test's ``answer(request)`` and is recorded in ``seen``.
- ``StallingServer``: reads one request whole, sends the start of an answer, then no
  other byte until it is stopped — what a slow-loris looks like to a client whose read
  timeout is longer than the call's deadline.
- ``AzuriteProxy``: a reverse proxy in front of the real Azurite whose ``edit`` hook may
  answer a request itself or change Azurite's answer (status, headers, body).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web

HOP_HEADERS = {"transfer-encoding", "connection", "keep-alive", "content-length", "content-encoding"}


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


class FakeHttp:
    """An HTTP server whose every answer comes from ``answer``."""

    def __init__(self, answer: Callable[[web.Request, bytes], Awaitable[web.StreamResponse]],
                 host: str = "127.0.0.1") -> None:
        self.answer = answer
        self.host = host
        self.seen: list[Seen] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> FakeHttp:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        return await self.answer(request, body)


def s3_listing(keys: list[str], *, truncated: bool = False, token: str | None = None,
               sizes: int = 1) -> web.Response:
    """A ListObjectsV2 answer naming ``keys`` (URL-encoded, as botocore asks)."""
    items = "".join(
        f"<Contents><Key>{escape(quote(key, safe='/'))}</Key>"
        f"<LastModified>2024-01-01T00:00:00.000Z</LastModified><ETag>\"e\"</ETag>"
        f"<Size>{sizes}</Size><StorageClass>STANDARD</StorageClass></Contents>"
        for key in keys
    )
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>bkt</Name><KeyCount>{len(keys)}</KeyCount><MaxKeys>1000</MaxKeys>"
        f"<EncodingType>url</EncodingType><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
        + (f"<NextContinuationToken>{token}</NextContinuationToken>" if token else "")
        + items + "</ListBucketResult>"
    )
    return web.Response(status=200, body=body.encode(), content_type="application/xml")


class StallingServer:
    """Reads a request (head and Content-Length body), writes ``start``, then stalls."""

    def __init__(self, start: bytes) -> None:
        self.start = start
        self.received = asyncio.Event()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()

    async def __aenter__(self) -> StallingServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()  # no new connection from here on
        self._stop.set()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            size = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    size = int(line.split(b":", 1)[1])
            if b"\r\nexpect: 100-continue" in head.lower():
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await reader.readexactly(size)
            writer.write(self.start)
            await writer.drain()
            self.received.set()
            await self._stop.wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()


Edit = Callable[[web.Request, bytes, "Answer | None"], Awaitable["Answer | None"]]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class AzuriteProxy:
    """A reverse proxy to ``target`` (Azurite). ``edit(request, body, None)`` runs first and
    may answer alone; else ``edit(request, body, answer)`` may change Azurite's answer."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.edit: Edit | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    async def __aenter__(self) -> AzuriteProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None and self._runner is not None
        await self._session.close()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.edit is not None:
            early = await self.edit(request, body, None)
            if early is not None:
                return web.Response(status=early.status, headers=early.headers, body=early.body)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}
        assert self._session is not None
        async with self._session.request(
            request.method, self.target + request.path_qs, headers=headers, data=body or None,
            skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent"), allow_redirects=False,
        ) as upstream:
            answer = Answer(upstream.status,
                            {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS},
                            await upstream.read())
        if self.edit is not None:
            answer = await self.edit(request, body, answer) or answer
        return web.Response(status=answer.status, headers=answer.headers, body=answer.body)


async def gather_listing(store: Any, prefix: str = "", start_after: str | None = None) -> tuple[list[str], Any]:
    """The keys a listing yields before it ends, and the exception that ended it (or None)."""
    keys: list[str] = []
    try:
        async for info in store.list(prefix, start_after=start_after):
            keys.append(info.key)
    except Exception as exc:
        return keys, exc
    return keys, None
