"""Bounds on the connections of the MSA's REST API: time to send a request head, time to
send a body, and how many connections are open at once.

Without them a client that opens a connection and sends half a request holds a socket,
a task and a parse buffer for ever (issue 10: 1,000 such sockets stayed open 80 s).

* **Head**: aiohttp closes a connection that has no complete request head
  ``header_timeout_s`` after it opened or after its last answer (its
  ``keepalive_timeout``, which aiohttp arms at connection start and re-arms after each
  answer, and which fires only while it waits for a request: a running request is never
  cut). A head is at most ``HEADERS_MAX`` lines of ``FIELD_BYTES_MAX``.
* **Body**: the handlers read a body within ``body_timeout_s`` (``cdp.msa.api.read_body``),
  408 otherwise, and the connection is closed after at most ``linger_s`` (aiohttp's
  ``lingering_time``: what the client still sends is read and dropped that long, so that
  it sees the answer rather than a reset).
* **Connections**: ``LimitedSite`` counts the connections it accepted; one more than
  ``connections_max`` is answered ``503`` (FORMAT.md §13.5, ``too_many_connections``) and
  closed at once, holding nothing. aiohttp has no such setting; ``web.BaseSite`` is its
  public base class for a listener of one's own.
* **Unreadable heads** (a line over ``FIELD_BYTES_MAX``, more than ``HEADERS_MAX``
  headers, a bad ``Content-Length``, a ``Content-Encoding`` aiohttp cannot decode):
  aiohttp's parser answers them ``400`` in text before any route or middleware runs, and
  logs each with a traceback at ERROR. ``quiet_parser_errors`` makes that one WARNING
  line with the status and the error's class (not the bytes the client sent), so that a
  client with no token cannot flood the log with tracebacks.
* **TLS** (``ssl_context``: the site serves HTTPS): the handshake has ``header_timeout_s``
  too. A connection is counted from its accept, but asyncio tells the protocol nothing
  of a handshake that fails (a plain-HTTP client, a client that does not trust the
  certificate): such a connection is released once its handshake deadline has passed
  without the connection being made, so refused handshakes cannot use up the cap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

HEADERS_MAX = 32  # header lines of a request (aiohttp's default is 128)
FIELD_BYTES_MAX = 8190  # of the request line and of one header (aiohttp's default)
HANDSHAKE_SLACK_S = 1.0  # a TLS connection not made this long after its handshake deadline is released


@dataclass(frozen=True)
class ApiLimits:
    """The API's bounds (module docstring); tests make them small."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    linger_s: float = 2.0
    connections_max: int = 128

    def runner_options(self) -> dict[str, Any]:
        """The ``web.AppRunner`` keywords that carry these bounds into aiohttp."""
        return {"keepalive_timeout": self.header_timeout_s, "lingering_time": self.linger_s,
                "max_headers": HEADERS_MAX, "max_line_size": FIELD_BYTES_MAX, "max_field_size": FIELD_BYTES_MAX}


class _ParserErrorsOnOneLine(logging.Filter):
    """On aiohttp's server logger: a request its HTTP parser refused (an
    ``HttpProcessingError``) becomes one ``http_request_refused`` warning without the
    traceback and without the client's bytes; every other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args, record.exc_info, record.exc_text = "http_request_refused", (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.fields = {"status": exc.code, "error": type(exc).__name__}
        return True


_PARSER_ERRORS = _ParserErrorsOnOneLine()


def quiet_parser_errors() -> None:
    """Install the filter (once per process; idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if _PARSER_ERRORS not in logger.filters:
        logger.addFilter(_PARSER_ERRORS)


def _refusal(connections_max: int) -> bytes:
    body = json.dumps({"error": {
        "status": 503, "code": "too_many_connections", "field": None, "exit_code": 7,
        "message": f"the API has {connections_max} connections open already (at most {connections_max}); "
                   f"try again shortly"}}, sort_keys=True).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Refused(asyncio.Protocol):
    """A connection over the cap: one canned answer, then closed. Reads nothing."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.answer)
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol of one connection, with a callback when the connection ends.
    Every event a transport gives its protocol is passed on unchanged."""

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None],
                 made_within_s: float | None = None) -> None:
        self.inner = inner
        self.release: Callable[[], None] | None = release
        # TLS: connection_made comes after the handshake, and never if it fails.
        self._unmade = (asyncio.get_running_loop().call_later(made_within_s, self._never_made)
                        if made_within_s is not None else None)

    def _never_made(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._unmade is not None:
            self._unmade.cancel()
            if self.release is None:  # made after its deadline (cannot happen: the handshake has one)
                transport.close()
                return
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.release is not None:
            self.release()
            self.release = None
        self.inner.connection_lost(exc)


class LimitedSite(web.BaseSite):
    """A TCP listener for a ``web.AppRunner`` that serves at most ``connections_max``
    connections at once. Invariant: ``open`` counts the connections handed to aiohttp
    that have not ended; it never exceeds ``connections_max``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, connections_max: int, *,
                 ssl_context: ssl.SSLContext | None = None, handshake_timeout_s: float = 10.0) -> None:
        super().__init__(runner)
        self.host, self.port, self.connections_max = host, port, connections_max
        self.ssl_context, self.handshake_timeout_s = ssl_context, handshake_timeout_s
        self.open = 0
        self.refused = 0
        self._answer = _refusal(connections_max)

    @property
    def name(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://{self.host}:{self.port}"

    def _protocol(self) -> asyncio.Protocol:
        # Counted when the connection is accepted (the factory is called before the
        # transport exists), so a burst of accepts cannot overshoot the cap.
        if self.open >= self.connections_max:
            self.refused += 1
            return _Refused(self._answer)
        server = self._runner.server
        assert server is not None, "the runner is set up before its site starts"
        self.open += 1
        made_within_s = self.handshake_timeout_s + HANDSHAKE_SLACK_S if self.ssl_context is not None else None
        return _Counted(server(), self._release, made_within_s)

    def _release(self) -> None:
        self.open -= 1

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        tls = ({"ssl": self.ssl_context, "ssl_handshake_timeout": self.handshake_timeout_s}
               if self.ssl_context is not None else {})
        self._server = await loop.create_server(self._protocol, self.host, self.port, reuse_address=True, **tls)
