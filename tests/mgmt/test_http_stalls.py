"""The API's listener (``cdp.msa.http_limits``) against clients that take slots and keep
them: clients that never read their answers are cut after the send timeout, plain and
TLS, also when the answer waits in a closing connection; one address holds at most its
share of the connections, also while its TLS handshakes never finish; refused requests
write a bounded number of log lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cdp.msa import http_limits
from cdp.msa.http_limits import (
    PATH_LOGGED_CHARS_MAX, ApiLimits, LimitedSite, RefusalLog, address_key, quiet_parser_errors, request_fields,
)
from cdp.pki import LeafSpec, TlsFiles, ensure_site_pki
from cdp.tls import client_context, server_context
from tests.waiting import EVENTUALLY_S, wait_until

BIG = b"x" * (4 << 20)  # more than the kernel's socket buffers take: the transport pauses writing
CLOSING_BYTES = 60_000  # under the high-water mark (64 KiB) once the kernel took its share
SEND_TIMEOUT_S = 0.5
ATTACKER = "127.0.0.2"  # the whole of 127/8 is loopback: a second address for the tests
REQUEST = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass
class Served:
    site: LimitedSite
    runner: web.AppRunner
    port: int
    client_ssl: ssl.SSLContext | None

    @property
    def url(self) -> str:
        return f"{'https' if self.client_ssl else 'http'}://127.0.0.1:{self.port}"


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=BIG)


async def _closing(request: web.Request) -> web.Response:
    # A small kernel buffer: most of the answer stays in the transport, under its high-water mark.
    request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return web.Response(body=b"x" * CLOSING_BYTES)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, *, tls: bool = False, connections_max: int = 4, header_timeout_s: float = 30.0,
                  **site_options) -> AsyncIterator[Served]:
    app = web.Application()
    app.router.add_get("/big", _big)
    app.router.add_get("/closing", _closing)
    app.router.add_get("/healthz", _healthz)
    limits = ApiLimits(header_timeout_s=header_timeout_s, connections_max=connections_max)
    runner = web.AppRunner(app, access_log=None, **limits.runner_options())
    await runner.setup()
    server_ssl = client_ssl = None
    if tls:
        files = TlsFiles(tmp_path / "tls")
        ensure_site_pki(files, "s", [LeafSpec("api", "cdp-api", ("localhost", "127.0.0.1"))])
        server_ssl, client_ssl = server_context(files.cert("api"), files.key("api")), client_context(files.ca_cert)
    site = LimitedSite(runner, "127.0.0.1", 0, connections_max, ssl_context=server_ssl,
                       handshake_timeout_s=header_timeout_s, **site_options)
    await site.start()
    try:
        yield Served(site, runner, site._server.sockets[0].getsockname()[1], client_ssl)
    finally:
        await runner.cleanup()


async def _connect(served: Served, source: str = "127.0.0.1", *, tls: bool = True
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with a tiny receive buffer (a client that will not read), from ``source``."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
    if served.client_ssl is not None and tls:
        return await asyncio.open_connection(sock=sock, ssl=served.client_ssl, server_hostname="127.0.0.1")
    return await asyncio.open_connection(sock=sock)


async def _never_reading(served: Served, data: bytes, source: str = "127.0.0.1") -> asyncio.StreamWriter:
    _, writer = await _connect(served, source)
    writer.transport.pause_reading()
    writer.write(data)
    return writer


async def _status_of_a_new_client(served: Served, source: str = "127.0.0.1") -> int:
    """A well-behaved client's answer to ``GET /healthz`` (0 when the connection ended without one)."""
    reader, writer = await _connect(served, source)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(EVENTUALLY_S):
            answer = await reader.read()
        return int(answer.split(b" ", 2)[1]) if answer else 0
    except (ConnectionError, ssl.SSLError):
        return 0
    finally:
        writer.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_clients_that_never_read_their_answers_are_cut_after_the_send_timeout(tmp_path, tls):
    """The audit's starvation: pipelined GETs of a big answer, a tiny receive buffer, never
    read — every slot was held for as long as the clients liked, TLS too."""
    async with serving(tmp_path, tls=tls, send_timeout_s=SEND_TIMEOUT_S) as served:
        hogs = [await _never_reading(served, REQUEST * 20) for _ in range(served.site.connections_max)]
        await wait_until(lambda: served.site.stalled == len(hogs), EVENTUALLY_S,
                         "the clients that do not read to be cut")
        await wait_until(lambda: served.site.open == 0, EVENTUALLY_S, "their slots to be free")
        assert await _status_of_a_new_client(served) == 200
        for writer in hogs:
            writer.close()


async def test_an_answer_left_unsent_in_a_closing_connection_is_cut_after_the_send_timeout(tmp_path):
    """An answer under the high-water mark never pauses writing; aiohttp then closes the
    idle connection, and closing waits for bytes the client never takes."""
    async with serving(tmp_path, header_timeout_s=0.2, send_timeout_s=SEND_TIMEOUT_S) as served:
        hog = await _never_reading(served, b"GET /closing HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: served.site.stalled == 1 and served.site.open == 0, EVENTUALLY_S,
                         "the closing connection with unsent bytes to be cut")
        hog.close()


async def test_a_reading_client_is_not_cut_however_long_its_answer_takes(tmp_path):
    async with serving(tmp_path, send_timeout_s=SEND_TIMEOUT_S) as served, aiohttp.ClientSession() as http:
        async with http.get(f"{served.url}/big") as resp:
            got = 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                got += len(chunk)
        assert got == len(BIG) and served.site.stalled == 0


async def test_one_address_holds_at_most_its_share_of_the_connections(tmp_path):
    async with serving(tmp_path, connections_max=8, address_connections_max=2, loopback_shared=True) as served:
        site = served.site
        held = [await _connect(served, ATTACKER) for _ in range(2)]
        await wait_until(lambda: site.by_address.get(ATTACKER) == 2, EVENTUALLY_S, "the attacker's two connections")
        reader, writer = await _connect(served, ATTACKER)
        async with asyncio.timeout(EVENTUALLY_S):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        err = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert err["code"] == "too_many_connections" and "at most 2 from one address" in err["message"], err
        assert site.refused == site.refused_address == 1 and site.open == 2
        assert await _status_of_a_new_client(served) == 200  # another address is served
        for _, writer in held:
            writer.close()
        await wait_until(lambda: site.open == 0 and site.by_address == {}, EVENTUALLY_S, "the slots to be free")
        assert await _status_of_a_new_client(served, ATTACKER) == 200


async def test_tls_handshakes_that_never_finish_count_against_their_address(tmp_path):
    """Before, a TLS connection was attributed to nobody until its handshake ended: one
    address opening connections that never send a ClientHello held every slot."""
    async with serving(tmp_path, tls=True, connections_max=8, address_connections_max=2, loopback_shared=True,
                       header_timeout_s=60.0) as served:
        site = served.site
        silent = [await _connect(served, ATTACKER, tls=False) for _ in range(12)]
        await wait_until(lambda: site.refused_address == 10, EVENTUALLY_S, "the attacker's share to be full")
        assert site.open == 2 and site.by_address == {ATTACKER: 2}
        assert site.refusing == 8  # refusals waiting on a handshake are bounded (the cap): two got no answer
        assert await _status_of_a_new_client(served) == 200  # the others still get a slot
        for _, writer in silent:
            writer.close()
        await wait_until(lambda: site.open == 0 and site.by_address == {} and site.refusing == 0, EVENTUALLY_S,
                         "the slots to be free")


async def test_loopback_clients_are_not_held_to_the_share_by_default(tmp_path):
    """A reverse proxy on this machine brings every remote client from 127.0.0.1."""
    async with serving(tmp_path, connections_max=8) as served:
        assert served.site.address_connections_max == 2  # a quarter of the cap
        held = [await _connect(served) for _ in range(6)]
        await wait_until(lambda: served.site.open == 6, EVENTUALLY_S, "six loopback connections")
        assert served.site.refused == 0
        for _, writer in held:
            writer.close()


def test_address_keys():
    assert address_key(("203.0.113.9", 5000)) == "203.0.113.9"
    assert address_key(("::ffff:203.0.113.9", 5000, 0, 0)) == "203.0.113.9"
    assert address_key(("2001:db8:1:2:3:4:5:6", 5000, 0, 0)) == address_key(("2001:db8:1:2::9", 1, 0, 0)) \
        == "2001:db8:1:2::/64"
    assert address_key(("fe80::1%eth0", 5000, 0, 2)) == "fe80::/64"
    assert address_key(("127.0.0.1", 5000)) is None and address_key(("::1", 5000, 0, 0)) is None
    assert address_key(("127.0.0.2", 5000), loopback_shared=True) == "127.0.0.2"
    assert address_key(None) is None and address_key("/run/sock") is None


# ---------------------------------------------------------------------- the log


def test_refusals_are_logged_one_by_one_up_to_a_bound_then_counted(caplog):
    now = [0.0]
    refusals = RefusalLog(logged_max=3, interval_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="cdp.msa.http_limits"):
        admitted = [refusals.admit(401 if i % 2 else 404) for i in range(1000)]
        assert admitted[:3] == [True] * 3 and not any(admitted[3:])
        assert caplog.records == []  # the summary comes when the interval ends
        now[0] = 61.0
        assert refusals.admit(401) is True  # a new interval
    [summary] = caplog.records
    assert summary.getMessage() == "api_requests_refused"
    assert summary.fields["requests"] == 997 and summary.fields["statuses"] == {"401": 499, "404": 498}
    refusals.flush()
    assert len(caplog.records) == 1  # nothing more was counted


def test_a_logged_request_path_is_cut_and_its_length_said():
    path = "/v1/" + "a" * 8000
    fields = request_fields("GET", path)
    assert fields["path"] == path[:PATH_LOGGED_CHARS_MAX] and fields["path_chars"] == len(path)
    assert request_fields("GET" * 100, "/v1/status") == {"method": ("GET" * 100)[:20], "path": "/v1/status"}


async def test_unreadable_request_heads_write_a_bounded_number_of_log_lines(tmp_path, caplog, monkeypatch):
    """Each was one WARNING line: one client sending bad heads wrote as many lines."""
    monkeypatch.setattr(http_limits._PARSER_ERRORS, "refusals", RefusalLog(logged_max=5))
    quiet_parser_errors()
    async with serving(tmp_path, connections_max=64) as served:
        with caplog.at_level(logging.INFO):
            for _ in range(40):
                reader, writer = await _connect(served)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
                async with asyncio.timeout(EVENTUALLY_S):
                    answer = await reader.read()
                writer.close()
                assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), answer
        refused = [r for r in caplog.records if r.getMessage() == "http_request_refused"]
        assert len(refused) == 5, len(refused)
        http_limits._PARSER_ERRORS.refusals.flush()
        [summary] = [r for r in caplog.records if r.getMessage() == "api_requests_refused"]
        assert summary.fields["statuses"] == {"400": 35}
