"""The MSA's REST API under load (issue 10, items 8 and 9): the limit of running jobs
holds under parallel requests; half-sent requests are closed after the header and body
timeouts; connections beyond the cap are refused at once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time

import aiohttp

from cdp.msa.http_limits import ApiLimits, LimitedSite
from cdp.msa.runner import RUNNING_MAX
from cdp.testing.site import TOKEN, installed_site, running_daemon
from tests.drva.harness import wait_until
from tests.mgmt.test_api import Api, api  # noqa: F401  (the fixture)

PARALLEL_MARKS = 150


async def test_parallel_job_requests_never_exceed_the_running_limit(api: Api):
    """150 mark requests at once (no filter is connected, so each job waits for its mark):
    exactly RUNNING_MAX start, the rest are 503 too_many_jobs, and no job is over the limit."""
    answers = await asyncio.gather(*(api.call("POST", "/v1/domains/erp/marks", {"name": f"m{i}"})
                                     for i in range(PARALLEL_MARKS)))
    by_status = collections.Counter(status for status, _, _ in answers)
    assert by_status == {202: RUNNING_MAX, 503: PARALLEL_MARKS - RUNNING_MAX}, by_status
    for status, doc, _ in answers:
        if status == 503:
            assert doc["error"]["code"] == "too_many_jobs" and doc["error"]["exit_code"] == 7, doc
    records = api.daemon.jobs.list(limit=1000)
    assert len(records) == RUNNING_MAX and all(r["state"] == "running" for r in records)
    assert len(api.daemon.runner.tasks) == RUNNING_MAX
    # A slot frees when a job ends: then one more starts, and only one.
    victim = next(iter(api.daemon.runner.tasks.values()))
    victim.cancel()
    await asyncio.gather(victim, return_exceptions=True)
    answers = await asyncio.gather(*(api.call("POST", "/v1/domains/erp/marks", {"name": f"n{i}"})
                                     for i in range(10)))
    assert collections.Counter(status for status, _, _ in answers) == {202: 1, 503: 9}


# ---------------------------------------------------------------------- half-sent requests, connections


@contextlib.asynccontextmanager
async def limited_daemon(tmp_path, limits: ApiLimits):
    site = await installed_site(tmp_path / "site", protect=())
    async with running_daemon(site, api_limits=limits) as daemon:
        yield site, daemon


def _site_of(daemon) -> LimitedSite:
    [site] = daemon._api.sites
    return site


async def _open(site, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(site.cfg.api_listen.host, site.cfg.api_listen.port)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def _until_closed(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection (within ``within_s``)."""
    answer = b""
    async with asyncio.timeout(within_s):
        try:
            while chunk := await reader.read(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


PARTIAL = (b"", b"G", b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthoriz",
           b"POST /v1/domains/erp/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json")


async def test_half_sent_request_heads_are_closed_after_the_header_timeout(tmp_path):
    limits = ApiLimits(header_timeout_s=1.0, body_timeout_s=30.0, connections_max=64)
    async with limited_daemon(tmp_path, limits) as (site, daemon):
        t0 = time.monotonic()
        conns = [await _open(site, PARTIAL[i % len(PARTIAL)]) for i in range(40)]

        async def dribble(writer: asyncio.StreamWriter) -> None:  # a byte at a time never completes a head
            with contextlib.suppress(ConnectionError):
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)
        slow_reader, slow_writer = await _open(site, b"")
        slow = asyncio.create_task(dribble(slow_writer))
        answers = await asyncio.gather(*(_until_closed(r, 15) for r, _ in conns), _until_closed(slow_reader, 15))
        elapsed = time.monotonic() - t0
        slow.cancel()
        for _, writer in conns + [(slow_reader, slow_writer)]:
            writer.close()
        assert all(a == b"" for a in answers), answers  # closed, nothing answered
        assert limits.header_timeout_s * 0.9 <= elapsed < limits.header_timeout_s + 10, elapsed
        await wait_until(lambda: _site_of(daemon).open == 0, 5, "the server to drop them all")
        # A request sent in time is served as ever, also on a connection kept alive.
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.get(site.api + "/healthz") as resp:
                    assert resp.status == 200


async def test_a_body_that_stops_is_answered_408_after_the_body_timeout(tmp_path):
    limits = ApiLimits(header_timeout_s=30.0, body_timeout_s=1.0, connections_max=64)
    async with limited_daemon(tmp_path, limits) as (site, daemon):
        t0 = time.monotonic()
        reader, writer = await _open(site, (
            f"POST /v1/domains/erp/verify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"deep\":").encode())
        async with asyncio.timeout(15):
            first = await reader.read(1)
        answered = time.monotonic() - t0
        answer = first + await _until_closed(reader, 15)
        closed = time.monotonic() - t0
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        err = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert err["field"] == "request body" and err["code"] == "timeout", err
        assert limits.body_timeout_s * 0.9 <= answered < limits.body_timeout_s + 5, answered
        assert closed < limits.body_timeout_s + limits.linger_s + 5, closed
        assert (await asyncio.to_thread(daemon.jobs.list)) == []


async def test_connections_beyond_the_cap_are_refused_at_once(tmp_path):
    cap, extra = 16, 200
    limits = ApiLimits(header_timeout_s=60.0, body_timeout_s=60.0, connections_max=cap)
    async with limited_daemon(tmp_path, limits) as (site, daemon):
        listener = _site_of(daemon)
        held = [await _open(site, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") for _ in range(cap)]
        await wait_until(lambda: listener.open == cap, 5, "the held connections")
        refused = [await _open(site, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") for _ in range(extra)]
        t0 = time.monotonic()
        answers = await asyncio.gather(*(_until_closed(r, 10) for r, _ in refused))
        assert time.monotonic() - t0 < limits.header_timeout_s / 2  # not the header timeout: at once
        for answer in answers:  # the 503 (or a reset, when it came before the request was read)
            if answer:
                assert answer.startswith(b"HTTP/1.1 503 "), answer
                assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "too_many_connections"
        # Closed at once, the socket may reset before the client reads the answer (a
        # request it never read was in its buffer): the reason is best effort, the refusal not.
        assert any(answers), "refusals carry their reason"
        assert listener.refused == extra and listener.open == cap
        assert len(daemon._api.server.connections) <= cap  # aiohttp holds no more than the cap
        for _, writer in held + refused:
            writer.close()
        await wait_until(lambda: listener.open == 0, 5, "the held connections to end")
        async with aiohttp.ClientSession() as http:  # the slots are free again
            async with http.get(site.api + "/healthz") as resp:
                assert resp.status == 200
