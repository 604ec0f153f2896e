"""Extent requests and streams (FORMAT.md §16): the format, and a real server and client
over loopback TCP — the bytes land exactly, and every damaged, cut or refused stream is
an error naming the peer, never a write of unchecked bytes."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.errors import ChecksumMismatch, FormatError
from cdp.extent_stream import (
    PIECE_BYTES_MAX,
    ExtentRequest,
    StreamReader,
    encode_request,
    parse_request,
    piece_head,
    pieces,
    request_for,
    split,
    stream_header,
    trailer,
)
from cdp.msa.extents import serve_files
from rocva.peer_extents import Peer, PeerUnavailable, copy_from_peer

TOKEN = "s3cret-token-for-tests"


@st.composite
def requests(draw) -> ExtentRequest:
    disks = draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4, unique=True))
    ranges = []
    for _ in disks:
        cuts = sorted(draw(st.lists(st.integers(0, 1 << 24), max_size=12, unique=True)))
        cuts = cuts[: len(cuts) // 2 * 2]
        ranges.append((np.array(cuts[0::2], np.int64), np.array(cuts[1::2], np.int64)))
    return ExtentRequest(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**63)), tuple(disks), tuple(ranges))


@settings(max_examples=200, deadline=None)
@given(requests(), st.data())
def test_request_round_trips_and_any_flipped_byte_is_refused(req, data):
    buf = encode_request(req)
    back = parse_request(buf)
    assert (back.domain, back.seq, back.disks) == (req.domain, req.seq, req.disks)
    for (a, b), (c, d) in zip(back.ranges, req.ranges):
        assert a.tolist() == c.tolist() and b.tolist() == d.tolist()
    at = data.draw(st.integers(0, len(buf) - 1))
    bad = bytearray(buf)
    bad[at] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(FormatError):
        parse_request(bytes(bad))
    with pytest.raises(FormatError):
        parse_request(buf[: data.draw(st.integers(0, len(buf) - 1))])


@settings(max_examples=100, deadline=None)
@given(requests(), st.integers(1, 9))
def test_split_keeps_every_range_once_in_order(req, parts):
    got = split(req, parts)
    assert len(got) <= parts
    flat = [(d, a, b) for r in got for d, (s, e) in zip(r.disks, r.ranges) for a, b in zip(s.tolist(), e.tolist())]
    want = [(d, a, b) for d, (s, e) in zip(req.disks, req.ranges) for a, b in zip(s.tolist(), e.tolist())]
    assert flat == want


def test_parse_refuses_overlapping_and_unsorted_ranges():
    for start, end in (([0, 10], [20, 30]), ([10, 0], [20, 5]), ([5], [5])):
        head = encode_request(ExtentRequest(1, 2, (0,), ((np.zeros(0, np.int64), np.zeros(0, np.int64)),)))
        body = np.zeros(1, [("disk", "<u4"), ("reserved", "<u4"), ("range_count", "<u8")])
        body["range_count"] = len(start)
        rows = np.array(list(zip(start, end)), [("start", "<u8"), ("end", "<u8")])
        raw = body.tobytes() + rows.tobytes()
        import xxhash

        from cdp.extent_stream import REQUEST, REQUEST_MAGIC, VERSION
        from cdp.summed import pack_summed

        buf = pack_summed(REQUEST, REQUEST_MAGIC, VERSION, 0, 1, 1, 2, len(start), len(raw),
                          xxhash.xxh3_64_intdigest(raw), 0) + raw
        assert head  # a well-formed empty request encodes
        with pytest.raises(FormatError, match="sorted and disjoint"):
            parse_request(buf)


def test_reader_refuses_a_piece_out_of_order_and_a_flipped_data_byte():
    req = request_for(7, 9, [1], [(np.array([0, 3 * PIECE_BYTES_MAX]), np.array([4096, 3 * PIECE_BYTES_MAX + 10]))])
    reader = StreamReader(req, "stream from test")
    reader.header(stream_header(req))
    (d0, o0, n0), (d1, o1, n1) = pieces(req)
    with pytest.raises(FormatError, match="expected disk 1 \\[0, \\+4096\\)"):
        reader.piece(piece_head(d1, o1, bytes(n1)))
    data = bytearray(os.urandom(n0))
    head = piece_head(d0, o0, data)
    reader.piece(head)
    data[100] ^= 4
    with pytest.raises(ChecksumMismatch, match="offset 64"):
        reader.check(head, data)


def test_reader_refuses_a_trailer_that_counts_otherwise():
    req = request_for(7, 9, [1], [(np.array([0]), np.array([512]))])
    reader = StreamReader(req, "s")
    reader.header(stream_header(req))
    data = bytes(512)
    head = piece_head(1, 0, data)
    reader.piece(head)
    reader.check(head, data)
    with pytest.raises(FormatError, match="trailer counts"):
        reader.trailer(trailer(2, 512))


def _images(tmp_path: Path, size: int) -> tuple[dict, dict]:
    theirs, mine = {}, {}
    for disk in (3, 4):
        src, dst = tmp_path / f"b{disk}.img", tmp_path / f"a{disk}.img"
        src.write_bytes(os.urandom(size))
        dst.write_bytes(os.urandom(size))
        theirs[disk] = (src, size)
        mine[disk] = dst
    return theirs, mine


def _ranges(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    blocks = np.sort(rng.choice(size // 4096, size // 4096 // 10, replace=False)).astype(np.int64)
    start = blocks * 4096
    end = start + 4096 * rng.integers(1, 4, len(start))
    end = np.minimum(end, np.append(start[1:], size))
    return start, end


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/extents"


def _open(mine: dict) -> dict[int, int]:
    return {d: os.open(p, os.O_RDWR) for d, p in mine.items()}


async def test_copy_from_peer_writes_exactly_the_ranges(tmp_path):
    size = 8 << 20
    theirs, mine = _images(tmp_path, size)
    before = {d: p.read_bytes() for d, p in mine.items()}
    ranges = {3: _ranges(size, 1), 4: (np.array([0]), np.array([size]))}  # a whole disk: pieces of 1 MiB
    req = request_for(5, 77, [3, 4], [ranges[3], ranges[4]])
    runner, url = await _serve(serve_files(5, 77, theirs, TOKEN))
    fds = _open(mine)
    seen = []
    try:
        written = await copy_from_peer(Peer(url, TOKEN, "b"), req, fds, streams=3, progress=seen.append)
    finally:
        for fd in fds.values():
            os.close(fd)
        await runner.cleanup()
    assert written == req.byte_count == sum(seen)
    for disk, path in mine.items():
        want = bytearray(before[disk])
        src = theirs[disk][0].read_bytes()
        for a, b in zip(*[x.tolist() for x in ranges[disk]]):
            want[a:b] = src[a:b]
        assert path.read_bytes() == bytes(want)


async def test_refusals_and_bad_streams_are_peer_unavailable_and_name_the_site(tmp_path):
    size = 1 << 20
    theirs, mine = _images(tmp_path, size)
    req = request_for(5, 77, [3], [(np.array([0, 8192]), np.array([4096, 65536]))])

    async def cut(request: web.Request) -> web.StreamResponse:  # the header and half a piece, then gone
        resp = web.StreamResponse()
        await resp.prepare(request)
        data = theirs[3][0].read_bytes()[:4096]
        await resp.write(stream_header(req) + piece_head(3, 0, data) + data[:100])
        request.transport.close()
        return resp

    async def flipped(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        data = bytearray(theirs[3][0].read_bytes()[:4096])
        head = piece_head(3, 0, data)
        data[7] ^= 1
        await resp.write(stream_header(req) + head + bytes(data))
        await resp.write_eof()
        return resp

    bad = web.Application()
    bad.router.add_post("/cut", cut)
    bad.router.add_post("/flipped", flipped)
    runner, url = await _serve(serve_files(5, 77, theirs, TOKEN))
    bad_runner, bad_url = await _serve(bad)
    bad_base = bad_url.rsplit("/", 1)[0]
    fds = _open(mine)
    before = mine[3].read_bytes()
    try:
        with pytest.raises(PeerUnavailable, match="site b refused.*bad token") as err:
            await copy_from_peer(Peer(url, "wrong", "b"), req, fds)
        assert TOKEN not in str(err.value) and "wrong" not in str(err.value)
        with pytest.raises(PeerUnavailable, match="asked for domain 5 at seq 78"):
            await copy_from_peer(Peer(url, TOKEN, "b"), request_for(5, 78, [3], req.ranges), fds)
        with pytest.raises(PeerUnavailable, match="disk 9 is not one of"):
            await copy_from_peer(Peer(url, TOKEN, "b"), request_for(5, 77, [9], req.ranges), fds)
        with pytest.raises(PeerUnavailable, match="past its 1048576 bytes"):
            await copy_from_peer(Peer(url, TOKEN, "b"),
                                 request_for(5, 77, [3], [(np.array([0]), np.array([size + 512]))]), fds)
        with pytest.raises(PeerUnavailable, match="ended early"):
            await copy_from_peer(Peer(f"{bad_base}/cut", TOKEN, "b"), req, fds, streams=1)
        with pytest.raises(PeerUnavailable, match="xxh3 does not match"):
            await copy_from_peer(Peer(f"{bad_base}/flipped", TOKEN, "b"), req, fds, streams=1)
        with pytest.raises(PeerUnavailable, match="site b"):
            await copy_from_peer(Peer("http://127.0.0.1:1/extents", TOKEN, "b"), req, fds)
    finally:
        for fd in fds.values():
            os.close(fd)
        await runner.cleanup()
        await bad_runner.cleanup()
    assert mine[3].read_bytes() == before  # nothing unchecked was written


def test_piece_head_layout_matches_format():
    data = b"x" * 512
    head = piece_head(2, 4096, data)
    magic, disk, offset, length, reserved, _ = struct.unpack("<4sIQIIQ", head)
    assert (magic, disk, offset, length, reserved) == (b"CDPP", 2, 4096, 512, 0)


def test_header_and_trailer_layouts_match_format():
    req = request_for(7, 9, [1], [(np.array([0]), np.array([512]))])
    head = stream_header(req)
    assert head[:4] == b"CDPY" and struct.unpack_from("<IIQQQ", head, 8) == (7, 0, 9, 1, 512)
    tail = trailer(3, 4096)
    assert tail[:4] == b"CDPZ" and struct.unpack_from("<QQQ", tail, 8) == (0, 3, 4096)
    assert not any(tail[32:56]) and not any(head[40:56])
