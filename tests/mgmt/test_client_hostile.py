"""``cdp.msa.client`` against daemons that misbehave: fake APIs on 127.0.0.1 port 0 that
answer too much, never answer, answer garbage or terminal escapes, or redirect. The
client is also a site's client of its peer (a planned failover's quiesce, a failback's
release), so whatever the other end does, the outcome is a bounded ``CdpError``."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from cdp.errors import CdpError
from cdp.msa.client import ANSWER_BYTES_MAX, WAIT_TIMEOUT_S, DaemonError, MsaClient
from cdp.msa.daemon import JOB_TIMEOUT_S

TOKEN = "client-test-token-0123456789"
MiB = 1 << 20
HUGE_BYTES = 64 * MiB  # 8x the bound: a client that reads it all is told from one that stops
HANG_GUARD_S = 30.0  # only ends a test that would hang on a client without a deadline
CONTROLS = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def app_with(*routes: tuple[str, str, Any]) -> web.Application:
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


def client(base: str, **options: Any) -> MsaClient:
    return MsaClient.at(base, TOKEN, "is the fake daemon running?", **options)


class Flood:
    """A handler that sends ``HUGE_BYTES`` (chunked, or with its Content-Length) and counts
    what the socket took before the client went away."""

    def __init__(self, *, declare_length: bool, status: int = 200) -> None:
        self.declare_length, self.status = declare_length, status
        self.sent = 0
        self.ended = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=self.status, headers={"Content-Type": "application/json"})
        if self.declare_length:
            resp.content_length = HUGE_BYTES
        try:
            await resp.prepare(request)
            chunk = b" " * MiB
            while self.sent < HUGE_BYTES:
                await resp.write(chunk)
                self.sent += len(chunk)
            await resp.write_eof()
        except (ConnectionError, OSError):
            pass  # the client closed: what it did not read was never sent
        finally:
            self.ended.set()
        return resp


# ---------------------------------------------------------------------- 1. answers have a bound


@pytest.mark.parametrize("declare_length", [False, True], ids=["chunked", "content-length"])
async def test_an_answer_over_the_bound_is_refused_not_read(declare_length):
    flood = Flood(declare_length=declare_length)
    async with serving(app_with(("GET", "/v1/status", flood.handle))) as base, client(base) as c:
        with pytest.raises(CdpError, match=f"over {ANSWER_BYTES_MAX} bytes"):
            await c.get("/v1/status")
        await asyncio.wait_for(flood.ended.wait(), HANG_GUARD_S)
    # The client stopped reading at the bound: the server could not push the rest through
    # (the loopback socket buffers hold a few MiB, not 56).
    assert flood.sent < HUGE_BYTES // 2, flood.sent


async def test_an_error_answer_over_the_bound_is_refused_not_read():
    flood = Flood(declare_length=False, status=500)
    async with serving(app_with(("POST", "/v1/failover/erp", flood.handle))) as base, client(base) as c:
        with pytest.raises(CdpError, match=f"over {ANSWER_BYTES_MAX} bytes"):
            await c.post("/v1/failover/erp", {}, wait=True)
        await asyncio.wait_for(flood.ended.wait(), HANG_GUARD_S)
    assert flood.sent < HUGE_BYTES // 2, flood.sent


async def test_a_compressed_answer_is_bounded_as_it_inflates():
    bomb = gzip.compress(b" " * HUGE_BYTES, compresslevel=9)  # 64 MiB of JSON whitespace in ~64 KiB
    assert len(bomb) < ANSWER_BYTES_MAX

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async with serving(app_with(("GET", "/v1/status", handler))) as base, client(base) as c:
        with pytest.raises(CdpError, match=f"over {ANSWER_BYTES_MAX} bytes"):
            await c.get("/v1/status")


async def test_a_larger_bound_can_be_asked_for_one_call():
    body = json.dumps({"jobs": ["x" * 100] * (ANSWER_BYTES_MAX // 100)}).encode()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async with serving(app_with(("GET", "/v1/jobs", handler))) as base, client(base) as c:
        with pytest.raises(CdpError, match="over"):
            await c.get("/v1/jobs")
        doc = await c.get("/v1/jobs", answer_bytes_max=2 * len(body))
    assert len(doc["jobs"]) == ANSWER_BYTES_MAX // 100


# ---------------------------------------------------------------------- 2. a deadline for waiting requests


def test_a_waiting_request_outlasts_the_jobs_it_waits_for_and_no_more():
    """The default deadline of a ?wait=1 request: longer than every job a client waits on
    (the peer's quiesce in a planned failover, protect and mark from the CLI), and finite."""
    waited = ("quiesce", "protect", "mark")
    assert max(JOB_TIMEOUT_S[name] for name in waited) < WAIT_TIMEOUT_S <= 2 * JOB_TIMEOUT_S["quiesce"]


async def test_a_peer_that_accepts_and_never_answers_is_given_up_on():
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    async with serving(app_with(("POST", "/v1/domains/{name}/quiesce", stall))) as base:
        async with client(base, wait_timeout_s=0.5) as c:
            async with asyncio.timeout(HANG_GUARD_S):
                with pytest.raises(CdpError, match=r"did not answer within 0\.5 s") as caught:
                    await c.post("/v1/domains/erp/quiesce", {"mark": "m"}, wait=True)
    assert not isinstance(caught.value, DaemonError)


async def test_a_peer_that_stalls_inside_its_answer_is_given_up_on():
    never = asyncio.Event()

    async def half(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"state": ')
        await never.wait()
        return resp

    async with serving(app_with(("POST", "/v1/domains/{name}/marks", half),
                                ("GET", "/v1/status", half))) as base:
        async with client(base, wait_timeout_s=0.5, request_timeout_s=0.5) as c:
            async with asyncio.timeout(HANG_GUARD_S):
                with pytest.raises(CdpError, match="did not answer within"):
                    await c.post("/v1/domains/erp/marks", {"name": "m"}, wait=True)
                with pytest.raises(CdpError, match="did not answer within"):
                    await c.get("/v1/status")


# ---------------------------------------------------------------------- 3. malformed error answers


def _error(exit_code: Any) -> dict[str, Any]:
    return {"error": {"status": 409, "code": "busy", "message": "nope", "exit_code": exit_code}}


@pytest.mark.parametrize(("body", "exit_code", "message"), [
    (json.dumps(_error("seven")).encode(), 1, "daemon: nope"),
    (json.dumps(_error({"a": 1})).encode(), 1, "daemon: nope"),
    (json.dumps(_error([7])).encode(), 1, "daemon: nope"),
    (json.dumps(_error(True)).encode(), 1, "daemon: nope"),
    (json.dumps(_error(0)).encode(), 1, "daemon: nope"),
    (json.dumps(_error(126)).encode(), 1, "daemon: nope"),
    (json.dumps(_error(-3)).encode(), 1, "daemon: nope"),
    (json.dumps(_error(7.0)).encode(), 1, "daemon: nope"),
    (json.dumps(_error(1e300)).encode(), 1, "daemon: nope"),
    (json.dumps(_error(7)).encode(), 7, "daemon: nope"),
    (json.dumps({"error": {"message": {"x": 1}, "code": ["c"], "field": 5}}).encode(), 1, "daemon: HTTP 409"),
    (json.dumps({"error": "busy"}).encode(), 1, 'daemon: HTTP 409: {"error": "busy"}'),
    (json.dumps([1, 2, 3]).encode(), 1, "daemon: HTTP 409: [1, 2, 3]"),
    (b'{"error": {"message": "\xff\xfe caf\xe9"}}', 1, "daemon: \ufffd\ufffd caf\ufffd"),
    (b'\xff\xfe not even JSON', 1, "daemon: HTTP 409: \ufffd\ufffd not even JSON"),
    (b"[" * 100_000, 1, "daemon: HTTP 409: [[["),
    (b"", 1, "daemon: HTTP 409"),
], ids=["str", "dict", "list", "bool", "zero", "126", "negative", "float", "huge-float", "seven", "types",
        "error-not-object", "array", "bad-utf8-json", "bad-utf8", "deep", "empty"])
async def test_a_malformed_error_answer_is_a_daemon_error_with_its_status(body, exit_code, message):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=409, headers={"Content-Type": "application/json; charset=utf-8"})

    async with serving(app_with(("POST", "/v1/failover/erp", handler))) as base, client(base) as c:
        with pytest.raises(DaemonError) as caught:
            await c.post("/v1/failover/erp", {"mode": "planned"})
    err = caught.value
    assert (err.status, err.exit_code) == (409, exit_code)
    assert err.message.startswith(message), err.message
    assert isinstance(err.code, str) and (err.field is None or isinstance(err.field, str))


# ---------------------------------------------------------------------- 4. escapes


async def test_escape_codes_in_an_error_answer_are_escaped():
    hostile = "\x1b]0;owned\x07\x1b[2J\x1b[31mFAKE: all good\x1b[0m\rcdp: ok \x9b31m \x7f é"

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"error": {"status": 500, "code": "x\x1b[2J", "field": "f\x07",
                                            "message": hostile, "exit_code": 1}}, status=500)

    async with serving(app_with(("GET", "/v1/status", handler))) as base, client(base) as c:
        with pytest.raises(DaemonError) as caught:
            await c.get("/v1/status")
    err = caught.value
    for text in (err.message, err.code, err.field):
        assert not CONTROLS & set(text), repr(text)
    assert "\\u001b]0;owned\\u0007" in err.message and "FAKE: all good" in err.message and "é" in err.message


async def test_a_broken_answer_is_one_line_without_escape_codes():
    """An answer HTTP cannot parse: aiohttp's own message spans lines (it draws a caret
    under the bad byte); the error is one line, escape codes and all escaped."""
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-A\x1b[2J: b\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client(f"http://127.0.0.1:{port}") as c:
            with pytest.raises(CdpError) as caught:
                await c.get("/v1/status")
    finally:
        server.close()
        await server.wait_closed()
    assert not CONTROLS & set(caught.value.message), repr(caught.value.message)


# ---------------------------------------------------------------------- 5. no redirect followed


async def test_a_redirect_is_an_error_and_is_not_followed():
    reached: list[tuple[str, str | None]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append((request.method, request.headers.get("Authorization")))
        return web.json_response({"state": "succeeded", "output": {}})

    async def same_origin(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async with serving(app_with(("*", "/elsewhere", elsewhere))) as other:
        async def cross_origin(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(other + "/elsewhere")

        async with serving(app_with(("POST", "/v1/failover/{name}/release", same_origin),
                                    ("POST", "/v1/domains/{name}/quiesce", cross_origin),
                                    ("*", "/elsewhere", elsewhere))) as base, client(base) as c:
            with pytest.raises(DaemonError, match="HTTP 302: a redirect") as found:
                await c.post("/v1/failover/erp/release", {})
            with pytest.raises(DaemonError, match="HTTP 307: a redirect") as temporary:
                await c.post("/v1/domains/erp/quiesce", {"mark": "m"}, wait=True)
    assert (found.value.status, temporary.value.status) == (302, 307)
    assert reached == []  # neither the same origin's nor another's: the token went nowhere else
