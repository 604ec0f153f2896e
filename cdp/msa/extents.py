"""Serving an extent stream (FORMAT.md §16) from this site's disk images.

The recovery site answers ``POST /v1/failback/{name}/extents`` with the bytes of its
quiesced disks that the site failing back asks for (``cdp.msa.failback.extent_files``
says whether it may, and which files). Reads run on their own threads, one batch ahead
of the socket, so a cold disk's latency overlaps the sending; a stream holds at most two
batches (``BATCH_BYTES_MAX``, ``BATCH_PIECES_MAX``) in memory, made from the request's
range arrays as the stream goes (a list of every piece of a 4 Mi-range request took
980 MiB). At most ``STREAMS_MAX`` streams of one domain are sent at once; past that the
answer is 429 (``too_many_streams``).

``serve_files`` is the same answer without an MSA: the benchmark's stand-in for the
recovery site's daemon (``benchmarks.failback``) and the tests'.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from cdp.errors import FormatError
from cdp.extent_stream import (
    PIECE,
    PIECE_BYTES_MAX,
    REQUEST_BYTES_MAX,
    STREAM,
    TRAILER,
    ExtentRequest,
    parse_request,
    piece_head,
    stream_header,
    trailer,
)
from cdp.logs import get_logger
from cdp.msa.api_input import ApiError, content_encoding

log = get_logger("msa.extents")

BATCH_BYTES_MAX = 4 << 20
BATCH_PIECES_MAX = 8192  # 4 MiB of 512-byte pieces; a batch of 1-byte ones stays small too
RANGES_PER_STEP = 1 << 16  # ranges turned into Python ints at a time
READ_THREADS = 8  # outstanding reads of one site: a cold disk serves random reads faster at depth
#: Extent streams of one domain sent at once: what a failback asks for (``rocva.peer_extents``
#: sends this many); each may hold its request's range arrays (up to 64 MiB on the wire).
STREAMS_MAX = 8
CONTENT_TYPE = "application/octet-stream"
_readers: ThreadPoolExecutor | None = None
_streams: dict[str, int] = {}  # domain name -> its extent streams being read or sent


def _pool() -> ThreadPoolExecutor:
    global _readers
    if _readers is None:
        _readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="extents")
    return _readers


class BadExtentRequest(Exception):
    """A request this site will not answer: ``status`` and the message (no path in it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def read_request(request: web.Request, timeout_s: float) -> ExtentRequest:
    """The request body, bounded in size and time, parsed (``BadExtentRequest`` otherwise)."""
    if request.content_type != CONTENT_TYPE:
        raise BadExtentRequest(415, f"Content-Type {request.content_type[:80]!r}: an extent request is "
                                    f"{CONTENT_TYPE} (FORMAT.md §16.1)")
    encoding = content_encoding(request)
    if encoding is not None:
        raise BadExtentRequest(415, f"Content-Encoding {encoding[:80]!r}: an extent request is sent as it is "
                                    f"(identity)")
    if (request.content_length or 0) > REQUEST_BYTES_MAX:
        raise BadExtentRequest(413, f"extent request: {request.content_length} bytes, at most {REQUEST_BYTES_MAX}")
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.read(1 << 20):
                buf += chunk
                if len(buf) > REQUEST_BYTES_MAX:
                    raise BadExtentRequest(413, f"extent request: more than {REQUEST_BYTES_MAX} bytes")
    except TimeoutError:
        raise BadExtentRequest(408, f"extent request: not received within {timeout_s:g} s") from None
    except RequestPayloadError as exc:  # a chunked body that breaks its framing
        raise BadExtentRequest(400, f"extent request: could not be read: {str(exc)[:80]!r}") from None
    try:
        return parse_request(buf)
    except FormatError as exc:
        raise BadExtentRequest(400, exc.message) from None


def _read_batch(fds: Mapping[int, int], batch: list[tuple[int, int, int]]) -> list[bytes]:
    out = []
    for disk, offset, length in batch:
        data = os.pread(fds[disk], length, offset)
        if len(data) != length:
            raise OSError(f"disk {disk}: {len(data)} bytes at offset {offset}, expected {length}")
        out.append(data)
    return out


def piece_count(req: ExtentRequest) -> int:
    """How many pieces the stream answering ``req`` has (``cdp.extent_stream.pieces``),
    from the range arrays."""
    return sum(int(((end - start + PIECE_BYTES_MAX - 1) // PIECE_BYTES_MAX).sum()) for start, end in req.ranges)


def batches(req: ExtentRequest) -> Iterator[list[tuple[int, int, int]]]:
    """The pieces of ``req``'s stream, ``(disk, offset, length)`` in order, in batches of
    at most ``BATCH_BYTES_MAX`` bytes and ``BATCH_PIECES_MAX`` pieces, made as they are
    taken: what is held is one batch and ``RANGES_PER_STEP`` ranges, whatever the
    request's size."""
    batch: list[tuple[int, int, int]] = []
    size = 0
    for disk, (start, end) in zip(req.disks, req.ranges):
        for k in range(0, len(start), RANGES_PER_STEP):
            for a, b in zip(start[k:k + RANGES_PER_STEP].tolist(), end[k:k + RANGES_PER_STEP].tolist()):
                for offset in range(a, b, PIECE_BYTES_MAX):
                    length = min(PIECE_BYTES_MAX, b - offset)
                    if batch and (size + length > BATCH_BYTES_MAX or len(batch) >= BATCH_PIECES_MAX):
                        yield batch
                        batch, size = [], 0
                    batch.append((disk, offset, length))
                    size += length
    if batch:
        yield batch


@contextmanager
def stream_slot(domain: str, where: str) -> Iterator[None]:
    """One of the ``STREAMS_MAX`` streams of ``domain`` (its name, as the route names it),
    held from before its request body is read until its answer is sent: a request's
    range arrays may be 64 MiB, so a peer sending many of them at once is refused (429)
    before they are read, not after. Checked and taken with no await between."""
    if _streams.get(domain, 0) >= STREAMS_MAX:
        raise ApiError(429, "too_many_streams", f"{where}: {STREAMS_MAX} extent streams of the domain are being "
                                                f"sent already, the most at once: send this one when one ends",
                       "request body", exit_code=7)
    _streams[domain] = _streams.get(domain, 0) + 1
    try:
        yield
    finally:
        _streams[domain] -= 1
        if not _streams[domain]:
            del _streams[domain]


async def send_extents(request: web.Request, req: ExtentRequest, files: Mapping[int, tuple[Path, int]],
                       where: str) -> web.StreamResponse:
    """Answer ``req`` from ``files`` (disk id -> image path and its size), every range of
    which has been checked to lie inside its disk, inside the caller's ``stream_slot``.
    An error after the head is sent ends the connection without the trailer: the reader
    sees a stream cut short. Before the head, an ``ApiError`` 409 when an image is
    shorter than its disk."""
    return await _send(request, req, files, where)


async def _send(request: web.Request, req: ExtentRequest, files: Mapping[int, tuple[Path, int]],
                where: str) -> web.StreamResponse:
    fds: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    try:
        for disk in req.disks:
            path, size = files[disk]
            fds[disk] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if os.fstat(fds[disk]).st_size < size:
                raise ApiError(409, "failover_refused", f"{where}: disk {disk}'s image is shorter than the disk",
                               "request body")
        count = piece_count(req)
        length = STREAM.size + TRAILER.size + req.byte_count + PIECE.size * count
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        resp.content_length = length
        await resp.prepare(request)
        ahead = None
        try:
            await resp.write(stream_header(req))
            todo = batches(req)
            batch = next(todo, None)
            ahead = loop.run_in_executor(_pool(), _read_batch, fds, batch) if batch is not None else None
            while batch is not None:
                assert ahead is not None
                data = await ahead
                following = next(todo, None)
                ahead = (loop.run_in_executor(_pool(), _read_batch, fds, following)
                         if following is not None else None)
                for (disk, offset, _), piece in zip(batch, data):
                    await resp.write(piece_head(disk, offset, piece))
                    await resp.write(piece)
                batch = following
            await resp.write(trailer(count, req.byte_count))
            await resp.write_eof()
            log.info("extents_sent", where=where, ranges=req.range_count, bytes=req.byte_count)
        except (OSError, ConnectionError) as exc:
            # The head is sent: no error answer can follow it. Cut the connection, so the
            # reader sees a stream without its trailer.
            log.error("extents_failed", where=where, error=f"{type(exc).__name__}: {exc}")
            if request.transport is not None:
                request.transport.close()
        finally:
            if ahead is not None:
                await asyncio.wait([ahead])  # the reader thread's fds close below
        return resp
    finally:
        for fd in fds.values():
            os.close(fd)


def check_inside(req: ExtentRequest, files: Mapping[int, tuple[Path, int]], where: str) -> None:
    """Every disk of ``req`` is one of ``files`` and every range lies inside it."""
    for disk, (_, end) in zip(req.disks, req.ranges):
        if disk not in files:
            raise BadExtentRequest(400, f"{where}: disk {disk} is not one of the domain's disks "
                                        f"({', '.join(map(str, sorted(files)))})")
        if len(end) and int(end[-1]) > files[disk][1]:
            raise BadExtentRequest(400, f"{where}: disk {disk}: a range ends at {int(end[-1])}, past its "
                                        f"{files[disk][1]} bytes")


def serve_files(domain: int, seq: int, files: Mapping[int, tuple[Path, int]], token: str) -> web.Application:
    """An application answering ``POST /extents`` for ``domain`` at ``seq`` from ``files``
    (bearer ``token``), for the benchmark and the tests: the route without the MSA."""

    async def handler(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": {"status": 401, "message": "bad token"}}, status=401)
        try:
            with stream_slot(str(domain), "extents"):
                req = await read_request(request, 30.0)
                if (req.domain, req.seq) != (domain, seq):
                    raise BadExtentRequest(409, f"serving domain {domain} at seq {seq}, asked for domain "
                                                f"{req.domain} at seq {req.seq}")
                check_inside(req, files, "extents")
                return await send_extents(request, req, files, "extents")
        except (BadExtentRequest, ApiError) as exc:
            return web.json_response({"error": {"status": exc.status, "message": exc.message}}, status=exc.status)

    app = web.Application()
    app.router.add_post("/extents", handler)
    return app
