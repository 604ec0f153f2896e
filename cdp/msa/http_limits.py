"""Bounds on the connections of the MSA's REST API: time to send a request head, time to
send a body, time to take an answer, how many connections are open at once (in all and
from one address), and how many log lines refused requests write.

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
* **Answer**: a client that does not read its answers (it pipelines requests and never
  reads, or keeps its receive window shut) blocks the handler writing to it, and none of
  the bounds above runs meanwhile: 128 of them held every slot for as long as they liked.
  When a connection's transport pauses writing (its buffer is over the high-water mark),
  a timer starts; the connection is aborted unless writing resumes within
  ``send_timeout_s`` — resuming takes the buffer down to the low-water mark (64 and
  16 KiB: asyncio's defaults), so a client must take some 48 KiB per ``send_timeout_s``.
  A connection that was closed with bytes still unsent (an answer under the high-water
  mark that nobody reads: closing waits for them) is seen by a check every
  ``send_timeout_s`` and then gets as long again.
* **Connections**: ``LimitedSite`` counts the connections it accepted; one more than
  ``connections_max`` is answered ``503`` (FORMAT.md §13.5, ``too_many_connections``) and
  closed at once, holding nothing. One address holds at most ``address_connections_max``
  of them (a quarter of the cap unless set; an IPv6 client's /64 counts as one address):
  its next connection is refused the same way, so that one client cannot take them all.
  Loopback clients are not held to that share unless ``loopback_shared``: they are this
  machine — ``cdp``'s verbs, or a reverse proxy that brings every remote client from
  127.0.0.1 (sharing would cut them all to a quarter). aiohttp has no such setting;
  ``web.BaseSite`` is its public base class for a listener of one's own.
* **Unreadable heads** (a line over ``FIELD_BYTES_MAX``, more than ``HEADERS_MAX``
  headers, a bad ``Content-Length``, a ``Content-Encoding`` aiohttp cannot decode):
  aiohttp's parser answers them ``400`` in text before any route or middleware runs, and
  logs each with a traceback at ERROR. ``quiet_parser_errors`` makes that one WARNING
  line with the status and the error's class (not the bytes the client sent), and no
  more than ``RefusalLog`` lets through, so that a client with no token cannot flood the
  log with tracebacks, nor with lines.
* **Refused requests in the log** (``RefusalLog``): requests refused before any work (no
  token, no such route or method, an unreadable head) are logged one by one up to
  ``REFUSALS_LOGGED_MAX`` per ``REFUSALS_INTERVAL_S``, then counted, with one summary line
  per interval; a logged path is cut to ``PATH_LOGGED_CHARS_MAX`` (``request_fields``).
* **TLS** (``ssl_context``: the site serves HTTPS): a connection is admitted (counted,
  its address's share checked) when it is accepted, then its handshake runs
  (``loop.start_tls``), within ``header_timeout_s``: so the share also bounds handshakes
  that never finish, and a failed one frees its slot at once. A connection over the cap
  gets its 503 after the handshake (a TLS client could read nothing else) while fewer
  than ``connections_max`` such refusals are under way; beyond, it is closed unanswered.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from cdp.logs import get_logger
from cdp.netaddr import peer_ip, share_key

log = get_logger("cdp.msa.http_limits")

HEADERS_MAX = 32  # header lines of a request (aiohttp's default is 128)
FIELD_BYTES_MAX = 8190  # of the request line and of one header (aiohttp's default)
ADDRESS_SHARE = 4  # one address holds at most 1/ADDRESS_SHARE of connections_max, unless set
PATH_LOGGED_CHARS_MAX = 200  # of a request path in a log line (a path may be 8,190 bytes)
METHOD_LOGGED_CHARS_MAX = 20
REFUSALS_LOGGED_MAX = 20  # refused requests logged one by one per interval; the rest are counted
REFUSALS_INTERVAL_S = 60.0
SEND_TIMEOUT_S = 30.0  # for a paused answer to resume (module docstring)


@dataclass(frozen=True)
class ApiLimits:
    """The API's bounds (module docstring); tests make them small."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    linger_s: float = 2.0
    connections_max: int = 128
    send_timeout_s: float = SEND_TIMEOUT_S
    address_connections_max: int | None = None  # None: connections_max // ADDRESS_SHARE
    loopback_shared: bool = False

    def runner_options(self) -> dict[str, Any]:
        """The ``web.AppRunner`` keywords that carry these bounds into aiohttp."""
        return {"keepalive_timeout": self.header_timeout_s, "lingering_time": self.linger_s,
                "max_headers": HEADERS_MAX, "max_line_size": FIELD_BYTES_MAX, "max_field_size": FIELD_BYTES_MAX}

    def site_options(self) -> dict[str, Any]:
        """The ``LimitedSite`` keywords that carry these bounds (besides ``connections_max``)."""
        return {"handshake_timeout_s": self.header_timeout_s, "send_timeout_s": self.send_timeout_s,
                "address_connections_max": self.address_connections_max, "loopback_shared": self.loopback_shared}


# ---------------------------------------------------------------------- what the log says


def request_fields(method: str, path: str) -> dict[str, Any]:
    """A request's method and path as a log line gives them: cut to a bound (a request
    line may be 8,190 bytes), with the path's length when it was cut."""
    fields: dict[str, Any] = {"method": method[:METHOD_LOGGED_CHARS_MAX], "path": path[:PATH_LOGGED_CHARS_MAX]}
    if len(path) > PATH_LOGGED_CHARS_MAX:
        fields["path_chars"] = len(path)
    return fields


class RefusalLog:
    """How many refused requests are logged one by one: at most ``logged_max`` per
    ``interval_s``; the rest are counted, and said in one ``api_requests_refused`` line
    (the count by status) when the interval ends. Invariant: at most ``logged_max + 1``
    lines per interval, whatever a client sends."""

    def __init__(self, *, logged_max: int = REFUSALS_LOGGED_MAX, interval_s: float = REFUSALS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logged_max, self.interval_s, self.clock = logged_max, interval_s, clock
        self.window_start: float | None = None
        self.logged = 0  # in this interval
        self.counted: collections.Counter[int] = collections.Counter()  # status -> requests not logged
        self._flush_at: asyncio.TimerHandle | None = None

    def admit(self, status: int) -> bool:
        """True: log this refusal; False: it was counted for the interval's summary."""
        now = self.clock()
        if self.window_start is None or now - self.window_start >= self.interval_s:
            self.flush()
            self.window_start, self.logged = now, 0
        if self.logged < self.logged_max:
            self.logged += 1
            return True
        self.counted[status] += 1
        if self._flush_at is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False  # no loop (a test): the next admit or flush says it
            self._flush_at = loop.call_later(max(0.0, self.window_start + self.interval_s - now), self.flush)
        return False

    def flush(self) -> None:
        """Log the summary of the requests counted so far, if any."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if not self.counted:
            return
        counted, self.counted = self.counted, collections.Counter()
        log.warning("api_requests_refused", requests=sum(counted.values()),
                    statuses={str(status): n for status, n in sorted(counted.items())},
                    interval_s=self.interval_s, logged_one_by_one=self.logged_max,
                    reason="refused requests over the log's bound are counted, not logged one by one")


class _ParserErrorsOnOneLine(logging.Filter):
    """On aiohttp's server logger: a request its HTTP parser refused (an
    ``HttpProcessingError``) becomes one ``http_request_refused`` warning without the
    traceback and without the client's bytes — or nothing, once ``refusals`` counts them
    instead; every other record passes unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = RefusalLog()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            if not self.refusals.admit(exc.code):
                return False
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


# ---------------------------------------------------------------------- connections


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": {"status": 503, "code": "too_many_connections", "field": None, "exit_code": 7,
                                 "message": message}}, sort_keys=True).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def address_key(peer: Any, loopback_shared: bool = False) -> str | None:
    """The address whose share a connection from ``peer`` (a ``peername``) counts against:
    the IPv4 address, or the /64 of an IPv6 one (an IPv4-mapped one as IPv4); None for
    one that has no share (loopback unless ``loopback_shared``; no IP address)."""
    ip = peer_ip(peer)
    if ip is None or (ip.is_loopback and not loopback_shared):
        return None
    return share_key(ip)


class _Refused(asyncio.Protocol):
    """A connection refused (over the cap, or over its address's share): one canned
    answer, then closed. Reads nothing."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.answer)
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol of one admitted connection, with the send timeout (module
    docstring) and a callback when the connection ends. Every event a transport gives
    its protocol is passed on. With TLS, the layer ``start_tls`` put in between may pass
    data up before the connection is handed over (``connection_made``): it is kept until
    then. Invariant: ``release`` is called once, when the connection ends."""

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None], send_timeout_s: float,
                 on_stall: Callable[[asyncio.Transport], None]) -> None:
        self.inner = inner
        self.release: Callable[[], None] | None = release
        self.send_timeout_s = send_timeout_s
        self.on_stall = on_stall
        self.transport: asyncio.Transport | None = None
        self._early: list[bytes] | None = []  # None once made
        self._early_eof = False
        self._lost = False
        self._send_timer: asyncio.TimerHandle | None = None
        self._closing_check: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._lost:  # lost while its TLS handshake was being finished
            return
        self.transport = transport
        self._closing_check = asyncio.get_running_loop().call_later(self.send_timeout_s, self._check_closing)
        self.inner.connection_made(transport)
        early, self._early = self._early or [], None
        for data in early:
            self.inner.data_received(data)
        if self._early_eof and not self.inner.eof_received():
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
            return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._early is not None:
            self._early_eof = True
            return True  # the inner protocol decides once it has the connection
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self._start_send_timer()
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._stop_send_timer()
        self.inner.resume_writing()

    def _start_send_timer(self) -> None:
        if self._send_timer is None and not self._lost:
            self._send_timer = asyncio.get_running_loop().call_later(self.send_timeout_s, self._send_timed_out)

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _check_closing(self) -> None:
        """Closing with bytes unsent (closing waits for them): they get ``send_timeout_s``."""
        transport = self.transport
        if self._lost or transport is None:
            return
        if transport.is_closing() and transport.get_write_buffer_size() > 0:
            self._start_send_timer()
        self._closing_check = asyncio.get_running_loop().call_later(self.send_timeout_s, self._check_closing)

    def _send_timed_out(self) -> None:
        self._send_timer = None
        if self._lost or self.transport is None:
            return
        self.on_stall(self.transport)
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        was_made = self.transport is not None and not self._lost
        self._lost = True
        self._stop_send_timer()
        if self._closing_check is not None:
            self._closing_check.cancel()
            self._closing_check = None
        if self.release is not None:
            self.release()
            self.release = None
        if was_made:
            self.inner.connection_lost(exc)


class _Admission(asyncio.Protocol):
    """The first protocol of an accepted connection. With ``refusal`` it is over the cap
    (not counted) and gets that answer; else it holds a slot, and once its peer is known
    ``LimitedSite._admit`` keeps it within its address's share or refuses it. Then aiohttp
    gets it, after a TLS handshake (``LimitedSite._handshake``) when the site serves TLS."""

    def __init__(self, site: LimitedSite, refusal: bytes | None) -> None:
        self.site, self.refusal = site, refusal
        self.app: asyncio.Protocol | None = None
        self.handshake: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.app = app = self.site._admit(transport, self.refusal)
        if self.site.ssl_context is None:
            transport.set_protocol(app)
            app.connection_made(transport)
            return
        if isinstance(app, _Refused) and self.site.refusing >= self.site.connections_max:
            transport.abort()  # refusals waiting on their handshakes are bounded too: no answer for this one
            return
        transport.pause_reading()  # the ClientHello is for the TLS layer start_tls puts in between
        self.handshake = self.site._handshake(transport, app)

    def data_received(self, data: bytes) -> None:
        raise AssertionError("reading is paused until the connection is handed over")

    def connection_lost(self, exc: Exception | None) -> None:
        # Only before start_tls took the connection over (the site stopping).
        if self.handshake is not None:
            self.handshake.cancel()
        if isinstance(self.app, _Counted):
            self.app.connection_lost(exc)


class LimitedSite(web.BaseSite):
    """A TCP listener for a ``web.AppRunner`` that serves at most ``connections_max``
    connections at once, at most ``address_connections_max`` of them from one address
    (module docstring). Invariants: ``open`` counts the connections admitted that have not
    ended, and never exceeds ``connections_max``; ``by_address[a]`` counts those of
    address ``a`` (no entry at zero), and never exceeds ``address_connections_max``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, connections_max: int, *,
                 ssl_context: ssl.SSLContext | None = None, handshake_timeout_s: float = 10.0,
                 send_timeout_s: float = SEND_TIMEOUT_S, address_connections_max: int | None = None,
                 loopback_shared: bool = False) -> None:
        super().__init__(runner)
        self.host, self.port, self.connections_max = host, port, connections_max
        self.address_connections_max = (address_connections_max if address_connections_max is not None
                                         else max(1, connections_max // ADDRESS_SHARE))
        self.ssl_context, self.handshake_timeout_s = ssl_context, handshake_timeout_s
        self.send_timeout_s, self.loopback_shared = send_timeout_s, loopback_shared
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.refused = 0  # over the cap or over an address's share
        self.refused_address = 0  # of those, over an address's share
        self.stalled = 0  # aborted: their answers were not taken within send_timeout_s
        self.refusing = 0  # TLS refusals whose handshake (then their 503) is under way
        self._handshakes: set[asyncio.Task[None]] = set()
        self._answer = _refusal(f"the API has {connections_max} connections open already (at most "
                                f"{connections_max}); try again shortly")
        self._address_answer = _refusal(f"this address has {self.address_connections_max} connections open "
                                        f"already (at most {self.address_connections_max} from one address); "
                                        f"try again shortly")

    @property
    def name(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://{self.host}:{self.port}"

    def _protocol(self) -> asyncio.Protocol:
        # Counted when the connection is accepted (the factory is called before the
        # transport exists), so a burst of accepts cannot overshoot the cap.
        if self.open >= self.connections_max:
            self.refused += 1
            return _Admission(self, self._answer)
        self.open += 1
        return _Admission(self, None)

    def _admit(self, transport: asyncio.Transport, refusal: bytes | None) -> asyncio.Protocol:
        """The protocol of a connection just accepted: refused, or counted for aiohttp."""
        if refusal is not None:
            return _Refused(refusal)
        key = address_key(transport.get_extra_info("peername"), self.loopback_shared)
        if key is not None and self.by_address.get(key, 0) >= self.address_connections_max:
            self.refused += 1
            self.refused_address += 1
            self._release(None)
            return _Refused(self._address_answer)
        if key is not None:
            self.by_address[key] = self.by_address.get(key, 0) + 1
        server = self._runner.server
        assert server is not None, "the runner is set up before its site starts"
        return _Counted(server(), lambda: self._release(key), self.send_timeout_s, self._stalled)

    def _release(self, key: str | None) -> None:
        self.open -= 1
        if key is not None:
            self.by_address[key] -= 1
            if not self.by_address[key]:
                del self.by_address[key]

    def _stalled(self, transport: asyncio.Transport) -> None:
        self.stalled += 1
        peer = transport.get_extra_info("peername")
        log.info("api_connection_stalled", peer=str(peer[0]) if isinstance(peer, tuple) else None,
                 unsent_bytes=transport.get_write_buffer_size(), send_timeout_s=self.send_timeout_s,
                 reason="the client did not take its answer in time: connection aborted")

    def _handshake(self, transport: asyncio.Transport, app: asyncio.Protocol) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._start_tls(transport, app))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)
        if isinstance(app, _Refused):
            self.refusing += 1
            task.add_done_callback(self._refused_handshake_done)
        return task

    def _refused_handshake_done(self, task: asyncio.Task[None]) -> None:
        self.refusing -= 1

    async def _start_tls(self, transport: asyncio.Transport, app: asyncio.Protocol) -> None:
        assert self.ssl_context is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, app, self.ssl_context, server_side=True, ssl_handshake_timeout=self.handshake_timeout_s)
        except asyncio.CancelledError:
            app.connection_lost(None)
            raise
        except Exception as exc:  # a failed or late handshake: start_tls closed the connection
            app.connection_lost(exc if isinstance(exc, OSError) else None)
            return
        if tls is None:  # lost as the handshake ended: its connection_lost is on its way
            app.connection_lost(None)
            return
        app.connection_made(tls)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.host, self.port, reuse_address=True)

    async def stop(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await super().stop()
