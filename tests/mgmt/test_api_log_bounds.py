"""The daemon's API against a client with no token that floods it: each refused request
was one INFO line with the whole path (up to 8,190 bytes), ~32 MB/s of log from one
connection; and the listener's bounds reach the daemon's API (``ApiLimits.site_options``)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket


from cdp.msa import api
from cdp.msa.http_limits import PATH_LOGGED_CHARS_MAX, REFUSALS_LOGGED_MAX, ApiLimits
from cdp.testing.site import installed_site, running_daemon
from tests.waiting import EVENTUALLY_S, wait_until

REFUSED_REQUESTS = 400
LONG_PATH = "/v1/" + "a" * 8000
STATUS_LINE = re.compile(rb"HTTP/1\.1 [0-9]{3} [^\r]*")


async def _answers(host: str, port: int, data: bytes, count: int, source: str = "127.0.0.1") -> list[bytes]:
    """Send ``data`` (pipelined requests) and read ``count`` answers' status lines."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(data)
    got = b""
    async with asyncio.timeout(EVENTUALLY_S):
        while len(STATUS_LINE.findall(got)) < count:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            got += chunk
    writer.close()
    return STATUS_LINE.findall(got)


async def test_refused_requests_write_a_bounded_number_of_short_log_lines(tmp_path, caplog):
    site = await installed_site(tmp_path / "site", protect=())
    async with running_daemon(site) as daemon:
        listen = daemon.cfg.api_listen
        one = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"
        long = f"GET {LONG_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        with caplog.at_level(logging.INFO, logger="cdp.msa.api"):
            lines = await _answers(listen.host, listen.port, long + one * REFUSED_REQUESTS, REFUSED_REQUESTS + 1)
        assert len(lines) == REFUSED_REQUESTS + 1 and all(b" 401 " in line for line in lines), lines[:3]
        logged = [r for r in caplog.records if r.name == "cdp.msa.api" and r.getMessage() == "api_request"]
        assert len(logged) == REFUSALS_LOGGED_MAX, len(logged)
        first = logged[0].fields
        assert len(first["path"]) == PATH_LOGGED_CHARS_MAX and first["path_chars"] == len(LONG_PATH), first
        daemon._api.app[api.REFUSALS].flush()
        [summary] = [r for r in caplog.records if r.getMessage() == "api_requests_refused"]
        assert summary.fields["statuses"] == {"401": REFUSED_REQUESTS + 1 - REFUSALS_LOGGED_MAX}
        assert len(json.dumps(summary.fields)) < 1000


async def test_the_address_share_reaches_the_daemons_api(tmp_path):
    limits = ApiLimits(address_connections_max=2, loopback_shared=True, send_timeout_s=0.5)
    site = await installed_site(tmp_path / "site", protect=())
    async with running_daemon(site, api_limits=limits) as daemon:
        listener = next(iter(daemon._api.sites))
        assert listener.send_timeout_s == 0.5
        listen = daemon.cfg.api_listen
        held = [await asyncio.open_connection(listen.host, listen.port, local_addr=("127.0.0.2", 0))
                for _ in range(2)]
        await wait_until(lambda: listener.by_address.get("127.0.0.2") == 2, EVENTUALLY_S, "two held connections")
        [refused] = await _answers(listen.host, listen.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 1,
                                   source="127.0.0.2")
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        [served] = await _answers(listen.host, listen.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 1)
        assert served.startswith(b"HTTP/1.1 200 "), served
        for _, writer in held:
            writer.close()
