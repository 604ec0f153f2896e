"""The failback's extent route (FORMAT.md §16) between sites that misbehave, over loopback
TCP (port 0): the reader (``rocva.peer_extents``) against a peer that answers a refusal
of 64 MiB or trickles its stream, and the server (``cdp.msa.extents``) against a peer
asking for the most it may — each bounded, and each refusal a ``PeerUnavailable`` so
the failback reads the store instead."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from cdp.extent_stream import (
    PIECE_BYTES_MAX,
    RANGES_MAX,
    encode_request,
    parse_request,
    piece_head,
    pieces,
    request_for,
    stream_header,
    trailer,
)
from cdp.msa import extents
from cdp.msa.extents import BATCH_BYTES_MAX, BATCH_PIECES_MAX, CONTENT_TYPE, STREAMS_MAX, serve_files
from rocva.peer_extents import ERROR_BYTES_MAX, Peer, PeerUnavailable, copy_from_peer
from tests.waiting import EVENTUALLY_S, wait_until

TOKEN = "extents-test-token-0123456789"
MiB = 1 << 20
HUGE_BYTES = 64 * MiB
HANG_GUARD_S = 60.0  # only ends a test that would hang: never reached when the code is right
CONTROLS = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
def disk(tmp_path: Path) -> int:
    """An open 1 MiB image to write into; closed after the test."""
    path = tmp_path / "mine.img"
    path.write_bytes(bytes(MiB))
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


REQ = request_for(7, 10, [0], [(np.array([0, 8192], np.int64), np.array([4096, 65536], np.int64))])


# ---------------------------------------------------------------------- the reader: 6. refusals are read bounded


@pytest.mark.parametrize("declare_length", [False, True], ids=["chunked", "content-length"])
async def test_a_refusal_of_64_mib_is_not_read_whole(disk, declare_length):
    sent = 0
    ended = asyncio.Event()

    async def refuse(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        await request.read()
        resp = web.StreamResponse(status=500, headers={"Content-Type": "application/json"})
        if declare_length:
            resp.content_length = HUGE_BYTES
        try:
            await resp.prepare(request)
            while sent < HUGE_BYTES:
                await resp.write(b" " * MiB)
                sent += MiB
            await resp.write_eof()
        except (ConnectionError, OSError):
            pass  # the reader went away: the rest was never sent
        finally:
            ended.set()
        return resp

    app = web.Application()
    app.router.add_post("/extents", refuse)
    async with serving(app) as base:
        with pytest.raises(PeerUnavailable, match="site b refused the extent request: HTTP 500"):
            await copy_from_peer(Peer(base + "/extents", TOKEN, "b"), REQ, {0: disk}, streams=1)
        await asyncio.wait_for(ended.wait(), HANG_GUARD_S)
    assert sent < HUGE_BYTES // 2, sent  # the socket buffers hold a few MiB; the reader took 64 KiB


async def test_a_refusals_message_is_read_and_escaped(disk):
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": {"status": 409, "message": "not handed back\x1b]0;pwned\x07\x9b2J"}},
                                 status=409)

    app = web.Application()
    app.router.add_post("/extents", refuse)
    async with serving(app) as base:
        with pytest.raises(PeerUnavailable, match="refused the extent request: not handed back") as err:
            await copy_from_peer(Peer(base + "/extents", TOKEN, "b"), REQ, {0: disk}, streams=1)
    assert not CONTROLS & set(err.value.message), repr(err.value.message)
    assert ERROR_BYTES_MAX <= 64 << 10


# ---------------------------------------------------------------------- the reader: 7. a deadline from the bytes


async def test_a_peer_that_trickles_is_given_up_on_so_the_store_is_read(disk):
    """A valid stream, one byte every 50 ms: never the 60 s between reads that
    ``READ_TIMEOUT_S`` waits for, and its 60 KiB would take most of an hour. The deadline
    (0.5 s here + the bytes at 1 MiB/s) ends it."""
    stop = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        req = parse_request(await request.read())
        stream = bytearray(stream_header(req))  # a valid stream: only its pace is wrong
        for disk_id, offset, length in pieces(req):
            stream += piece_head(disk_id, offset, bytes(length)) + bytes(length)
        stream += trailer(len(pieces(req)), req.byte_count)
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        resp.content_length = len(stream)
        await resp.prepare(request)
        for byte in stream:
            if stop.is_set():
                break
            await resp.write(bytes([byte]))
            await asyncio.sleep(0.05)  # the peer's pace (the attack), not a wait for anything
        return resp

    app = web.Application()
    app.router.add_post("/extents", trickle)
    async with serving(app) as base:
        try:
            async with asyncio.timeout(HANG_GUARD_S):
                with pytest.raises(PeerUnavailable, match=r"did not send 61440 bytes within 0\.5\d* s"):
                    await copy_from_peer(Peer(base + "/extents", TOKEN, "b"), REQ, {0: disk}, streams=1,
                                         deadline_base_s=0.5)
        finally:
            stop.set()


# ---------------------------------------------------------------------- the server: 8. bounded per request and per domain


def test_batches_are_the_pieces_in_order_and_bounded():
    rng = np.random.default_rng(7)
    cases = [
        [(np.array([0]), np.array([5 * PIECE_BYTES_MAX + 3]))],  # one range cut into pieces
        [(np.arange(0, 40_000, 2), np.arange(1, 40_000, 2))],  # 20,000 one-byte ranges: the piece bound
    ]
    for _ in range(5):
        cuts = np.unique(rng.integers(0, 64 * MiB, 400))
        cuts = cuts[: len(cuts) // 2 * 2]
        cases.append([(cuts[0::2], cuts[1::2]), (np.array([0]), np.array([3 * MiB]))])
    for ranges in cases:
        req = request_for(1, 2, list(range(len(ranges))), ranges)
        got = list(extents.batches(req))
        assert [p for batch in got for p in batch] == pieces(req)
        assert extents.piece_count(req) == len(pieces(req))
        for batch in got:
            assert batch and len(batch) <= BATCH_PIECES_MAX
            assert sum(n for _, _, n in batch) <= BATCH_BYTES_MAX or len(batch) == 1


async def test_a_request_of_a_million_ranges_is_served_without_a_list_of_them(tmp_path):
    """1 Mi one-sector ranges (a quarter of the most a request may hold): a list of every
    piece took more than the request, its parse and the reader's copy together (980 MiB for
    4 Mi ranges). The reader here takes the header and the first pieces, then goes."""
    ranges = RANGES_MAX // 4
    image = tmp_path / "theirs.img"
    with open(image, "wb") as f:
        f.truncate(ranges * 1024)
    start = np.arange(ranges, dtype=np.int64) * 1024
    body = encode_request(request_for(7, 10, [0], [(start, start + 512)]))
    app = serve_files(7, 10, {0: (image, ranges * 1024)}, TOKEN)
    tracemalloc.start()
    try:
        async with serving(app) as base, aiohttp.ClientSession() as session:
            async with session.post(base + "/extents", data=body, headers={
                    "Authorization": f"Bearer {TOKEN}", "Content-Type": CONTENT_TYPE}) as resp:
                assert resp.status == 200
                assert len(await resp.content.readexactly(MiB)) == MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # What is held: the request (16 MiB, here twice: sent and received), its ranges parsed,
    # one batch. A list of its pieces alone was over 250 MiB.
    assert peak < 4 * len(body), (peak >> 20, len(body) >> 20)


async def test_streams_of_a_domain_past_the_most_at_once_are_429(tmp_path):
    image = tmp_path / "theirs.img"
    with open(image, "wb") as f:
        f.truncate(HUGE_BYTES)  # each stream is 64 MiB: it cannot end while its reader does not read
    body = encode_request(request_for(7, 10, [0], [(np.array([0]), np.array([HUGE_BYTES]))]))
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": CONTENT_TYPE}
    app = serve_files(7, 10, {0: (image, HUGE_BYTES)}, TOKEN)
    async with serving(app) as base, aiohttp.ClientSession() as session:
        held = []
        try:
            for _ in range(STREAMS_MAX):  # each answered 200 and being sent: its slot is taken
                resp = await session.post(base + "/extents", data=body, headers=headers)
                held.append(resp)
                assert resp.status == 200
            async with session.post(base + "/extents", data=body, headers=headers) as refused:
                assert refused.status == 429
                doc = await refused.json()
            assert "extent streams of the domain are being sent already" in doc["error"]["message"]
        finally:
            for resp in held:
                resp.close()
        # Once those readers are gone, their slots are free again.
        await wait_until(lambda: not extents._streams, EVENTUALLY_S, "the closed streams' slots to be released")
        async with session.post(base + "/extents", data=encode_request(REQ), headers=headers) as again:
            assert again.status == 200
            await again.read()


async def test_bodies_being_read_hold_the_domains_slots(tmp_path):
    """A peer opening many requests of 64 MiB and sending their bodies slowly: each holds
    its slot while its body is read, so the one past ``STREAMS_MAX`` is refused before a
    byte of its body is read (it was read whole, then refused)."""
    image = tmp_path / "theirs.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    app = serve_files(7, 10, {0: (image, 1 << 20)}, TOKEN)
    head = (f"POST /extents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {64 << 20}\r\n\r\n").encode()
    async with serving(app) as base:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        slow = []
        try:
            for _ in range(STREAMS_MAX):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(head + b"\0" * 4096)  # a body begun, never finished
                await writer.drain()
                slow.append(writer)
            await wait_until(lambda: extents._streams.get("7") == STREAMS_MAX, EVENTUALLY_S,
                             "the slow bodies to take every slot")
            async with aiohttp.ClientSession() as session:
                async with session.post(base + "/extents", data=encode_request(REQ), headers={
                        "Authorization": f"Bearer {TOKEN}", "Content-Type": CONTENT_TYPE}) as refused:
                    assert refused.status == 429
        finally:
            for writer in slow:
                writer.close()
        await wait_until(lambda: not extents._streams, EVENTUALLY_S, "the dropped bodies' slots to be released")
