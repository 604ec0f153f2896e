"""An HTTP/1.1-aware proxy in front of moto (S3) or Azurite that injects the faults a
real object store and the network between make (issue 14, campaign 5).

It reads whole messages (a request, then its response) and, for each request, draws at
most one fault among those switched on (``set_rates``) that fit the request:

- ``error_503``: answered at once, not forwarded: 503 ``SlowDown`` (S3) or
  ``ServerBusy`` (Azure), as a store throttling its clients;
- ``error_500``: the same with 500 ``InternalError``;
- ``timeout``: not forwarded and never answered: the connection is held for
  ``timeout_s`` (past the client's read timeout), then reset;
- ``reset_get``: an object GET is forwarded; its answer's head and half its body are
  relayed, then the connection is reset (RST);
- ``reset_put``: half of a PUT's body goes upstream, then both connections are reset
  (the server sees an incomplete request: nothing is stored);
- ``truncate_get``: an object GET's answer loses its tail, ``Content-Length`` kept, and
  the connection is closed: the HTTP client can tell;
- ``short_get``: an object GET's answer loses its tail *and* its ``Content-Length`` is
  rewritten to match: the HTTP client cannot tell, only the object format can (a lying
  middlebox; used where the guarantee is "exact or refused naming the object");
- ``lost_put_reply``: a PUT is forwarded whole and the server's answer read, then the
  client's connection is reset: the object is stored, the writer does not know;
- ``slow_list``: a listing is held ``slow_list_s`` before it is forwarded.

``date_skew_s`` shifts the ``Date`` header of every answer (a store whose clock is off).
``injected`` counts the faults by kind, ``requests`` the requests by class. Everything
runs on the caller's event loop; ``close`` resets every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from collections import Counter
from dataclasses import dataclass

LOG_MAX = 200
KINDS = ("error_503", "error_500", "timeout", "reset_get", "reset_put", "truncate_get", "short_get",
         "lost_put_reply", "slow_list")
# The request classes each fault fits.
FITS = {
    "error_503": {"get", "put", "list", "head", "delete", "other"},
    "error_500": {"get", "put", "list", "head", "delete", "other"},
    "timeout": {"get", "put", "list", "head"},
    "reset_get": {"get"},
    "reset_put": {"put"},
    "truncate_get": {"get"},
    "short_get": {"get"},
    "lost_put_reply": {"put"},
    "slow_list": {"list"},
}
HEAD_BYTES_MAX = 64 << 10
# A body shorter than this is not worth cutting (an empty object, a one-line answer).
CUT_BYTES_MIN = 16


@dataclass
class _Message:
    first: str  # the request or status line
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def without(self, *names: str) -> list[tuple[str, str]]:
        drop = {n.lower() for n in names}
        return [(k, v) for k, v in self.headers if k.lower() not in drop]

    def head(self, headers: list[tuple[str, str]] | None = None) -> bytes:
        lines = [self.first] + [f"{k}: {v}" for k, v in (self.headers if headers is None else headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_head(reader: asyncio.StreamReader) -> _Message | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ConnectionError("connection closed inside a message head") from None
    except asyncio.LimitOverrunError:
        raise ConnectionError("message head too long") from None
    lines = raw[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return _Message(lines[0], headers)


async def _read_body(reader: asyncio.StreamReader, msg: _Message, *, response_to: str | None = None) -> bytes:
    """The body of ``msg`` as it travels (chunked bodies keep their framing)."""
    if response_to is not None:
        status = int(msg.first.split(" ", 2)[1])
        if response_to == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return b""
    if (msg.get("transfer-encoding") or "").lower() == "chunked":
        out = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            out += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    out += trailer
                out += b"\r\n"
                return bytes(out)
            out += await reader.readexactly(size + 2)
    length = msg.get("content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if response_to is None:
        return b""  # a request without a length has no body
    return await reader.read()  # an answer ended by the connection's end


def _classify(method: str, target: str) -> str:
    path, _, query = target.partition("?")
    if "comp=list" in query or "list-type=" in query:
        return "list"
    if "restype=container" in query:
        return "other"
    # /bucket/prefix/key (S3, path style) or /account/container/prefix/key (Azure)
    if len([p for p in path.split("/") if p]) < 3:
        return "other"
    return {"GET": "get", "PUT": "put", "HEAD": "head", "DELETE": "delete"}.get(method, "other")


class FaultProxy:
    """See the module docstring. ``flavor`` ("s3" or "azure") shapes the error answers."""

    def __init__(self, target_port: int, flavor: str, *, seed: int = 0, target_host: str = "127.0.0.1") -> None:
        assert flavor in ("s3", "azure"), flavor
        self.target = (target_host, target_port)
        self.flavor = flavor
        self.rng = random.Random(seed)
        self.rates: dict[str, float] = {}
        self.timeout_s = 4.0
        self.slow_list_s = 1.0
        self.date_skew_s = 0.0
        self.injected: Counter[str] = Counter()
        self._forced: list[str] = []
        #: (monotonic time, kind, method, target) of each fault, the first LOG_MAX.
        self.log: list[tuple[float, str, str, str]] = []
        self.requests: Counter[str] = Counter()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    # -- the plan ----------------------------------------------------------

    def set_rates(self, rates: dict[str, float]) -> None:
        """Switch faults on: kind -> probability per fitting request (0 or absent: off)."""
        unknown = set(rates) - set(KINDS)
        assert not unknown, unknown
        self.rates = {k: p for k, p in rates.items() if p > 0}

    def force(self, *kinds: str) -> None:
        """Give each of ``kinds`` to the next request it fits (before any drawn fault)."""
        assert set(kinds) <= set(KINDS), kinds
        self._forced.extend(kinds)

    def clear(self) -> None:
        """Every fault off, forced ones too."""
        self.rates = {}
        self._forced.clear()
        self.date_skew_s = 0.0

    def _draw(self, cls: str) -> str | None:
        for i, kind in enumerate(self._forced):
            if cls in FITS[kind]:
                del self._forced[i]
                return kind
        for kind in KINDS:
            p = self.rates.get(kind, 0.0)
            if p and cls in FITS[kind] and self.rng.random() < p:
                return kind
        return None

    # -- life --------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=HEAD_BYTES_MAX)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- serving -----------------------------------------------------------

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.add(cwriter)
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                req = await _read_head(creader)
                if req is None:
                    return
                method, target = req.first.split(" ", 2)[:2]
                cls = _classify(method, target)
                self.requests[cls] += 1
                # The client never waits for a "100 Continue" it will not get from here.
                expect = (req.get("expect") or "").lower() == "100-continue"
                headers = req.without("expect")
                if expect:
                    cwriter.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await _read_body(creader, req)
                fault = self._draw(cls)
                if fault == "reset_put" and len(body) < CUT_BYTES_MIN:
                    fault = None
                if fault in ("error_503", "error_500", "timeout", "slow_list", "reset_put", "lost_put_reply"):
                    self._count(fault, method, target)
                if fault in ("error_503", "error_500"):
                    cwriter.write(self._error(int(fault[-3:]), method))
                    await cwriter.drain()
                    cwriter.close()  # Connection: close, an orderly end (a reset could lose the answer)
                    return
                if fault == "timeout":
                    await asyncio.sleep(self.timeout_s)
                    return  # reset below
                if fault == "slow_list":
                    await asyncio.sleep(self.slow_list_s)
                if fault == "reset_put":
                    up = await self._upstream(up)
                    up[1].write(req.head(headers) + body[: len(body) // 2])
                    await up[1].drain()
                    return
                for reused in (up is not None, False):
                    # A kept-alive upstream connection the server closed meanwhile is no
                    # fault of ours to pass on: the request goes again on a new one.
                    if not reused and up is not None:
                        up[1].transport.abort()
                        self._writers.discard(up[1])
                        up = None
                    up = await self._upstream(up)
                    ureader, uwriter = up
                    try:
                        uwriter.write(req.head(headers) + body)
                        await uwriter.drain()
                        resp = await _read_head(ureader)
                    except ConnectionError:
                        resp = None
                    if resp is not None or not reused:
                        break
                if resp is None:
                    return
                while resp.first.split(" ", 2)[1].startswith("1"):  # an interim answer
                    resp = await _read_head(ureader)
                    if resp is None:
                        return
                rbody = await _read_body(ureader, resp, response_to=method)
                if fault == "lost_put_reply":
                    return  # stored upstream; the client's connection is reset below
                rheaders = self._skewed(resp)
                cuttable = (resp.get("content-length") is not None and method == "GET"
                            and len(rbody) >= CUT_BYTES_MIN)
                if fault in ("reset_get", "truncate_get", "short_get") and cuttable:
                    self._count(fault, method, target)
                    cut = len(rbody) // 2 if fault != "truncate_get" else len(rbody) - max(1, len(rbody) // 8)
                    if fault == "short_get":
                        rheaders = [(k, str(cut) if k.lower() == "content-length" else v) for k, v in rheaders]
                        rheaders = [(k, v) for k, v in rheaders if k.lower() != "content-md5"]
                    cwriter.write(resp.head(rheaders) + rbody[:cut])
                    await cwriter.drain()
                    if fault == "reset_get":
                        return  # reset below
                    cwriter.close()  # truncate_get / short_get: an orderly end
                    return
                cwriter.write(resp.head(rheaders) + rbody)
                await cwriter.drain()
                if (resp.get("connection") or "").lower() == "close" or (
                        resp.get("content-length") is None and
                        (resp.get("transfer-encoding") or "").lower() != "chunked" and rbody):
                    cwriter.close()
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                IndexError):
            pass
        finally:
            if up is not None:
                up[1].transport.abort()
                self._writers.discard(up[1])
            if not cwriter.is_closing():
                cwriter.transport.abort()
            self._writers.discard(cwriter)
            self._tasks.discard(task)

    async def _upstream(self, up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """``up`` when given, else a new connection to the server (the old one dropped)."""
        if up is not None:
            return up
        up = await asyncio.open_connection(*self.target, limit=HEAD_BYTES_MAX)
        self._writers.add(up[1])
        return up

    def _count(self, fault: str, method: str, target: str) -> None:
        self.injected[fault] += 1
        if len(self.log) < LOG_MAX:
            self.log.append((time.monotonic(), fault, method, target))

    def _skewed(self, resp: _Message) -> list[tuple[str, str]]:
        if not self.date_skew_s:
            return resp.headers
        when = email.utils.formatdate(time.time() + self.date_skew_s, usegmt=True)
        return [(k, when if k.lower() == "date" else v) for k, v in resp.headers]

    def _error(self, status: int, method: str) -> bytes:
        code = ("SlowDown" if self.flavor == "s3" else "ServerBusy") if status == 503 else "InternalError"
        reason = "Service Unavailable" if status == 503 else "Internal Server Error"
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>injected by the torture proxy</Message><RequestId>torture</RequestId></Error>").encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
                   ("Date", email.utils.formatdate(time.time() + self.date_skew_s, usegmt=True)),
                   ("Connection", "close")]
        if self.flavor == "azure":
            headers += [("x-ms-error-code", code), ("x-ms-request-id", "torture")]
        head = _Message(f"HTTP/1.1 {status} {reason}", headers).head()
        return head if method == "HEAD" else head + body
