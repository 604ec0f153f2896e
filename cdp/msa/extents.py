"""Serving an extent stream (FORMAT.md §16) from this site's disk images.

The recovery site answers ``POST /v1/failback/{name}/extents`` with the bytes of its
quiesced disks that the site failing back asks for (``cdp.msa.failback.extent_files``
says whether it may, and which files). Reads run on their own threads, one batch ahead
of the socket, so a cold disk's latency overlaps the sending; a stream holds at most two
batches (``BATCH_BYTES_MAX``) in memory.

``serve_files`` is the same answer without an MSA: the benchmark's stand-in for the
recovery site's daemon (``benchmarks.failback``) and the tests'.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from cdp.errors import FormatError
from cdp.extent_stream import (
    PIECE,
    REQUEST_BYTES_MAX,
    STREAM,
    TRAILER,
    ExtentRequest,
    parse_request,
    piece_head,
    pieces,
    stream_header,
    trailer,
)
from cdp.logs import get_logger
from cdp.msa.api_input import content_encoding

log = get_logger("msa.extents")

BATCH_BYTES_MAX = 4 << 20
READ_THREADS = 8  # outstanding reads of one site: a cold disk serves random reads faster at depth
CONTENT_TYPE = "application/octet-stream"
_readers: ThreadPoolExecutor | None = None


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


def _batches(req: ExtentRequest) -> list[list[tuple[int, int, int]]]:
    out: list[list[tuple[int, int, int]]] = [[]]
    size = 0
    for piece in pieces(req):
        if size + piece[2] > BATCH_BYTES_MAX and out[-1]:
            out.append([])
            size = 0
        out[-1].append(piece)
        size += piece[2]
    return [b for b in out if b]


async def send_extents(request: web.Request, req: ExtentRequest, files: Mapping[int, tuple[Path, int]],
                       where: str) -> web.StreamResponse:
    """Answer ``req`` from ``files`` (disk id -> image path and its size), every range of
    which has been checked to lie inside its disk. An error after the head is sent ends
    the connection without the trailer: the reader sees a stream cut short."""
    fds: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    try:
        for disk in req.disks:
            path, size = files[disk]
            fds[disk] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if os.fstat(fds[disk]).st_size < size:
                raise BadExtentRequest(409, f"{where}: disk {disk}'s image is shorter than the disk")
        batches = _batches(req)
        length = STREAM.size + TRAILER.size + req.byte_count + PIECE.size * sum(len(b) for b in batches)
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        resp.content_length = length
        await resp.prepare(request)
        ahead = None
        try:
            await resp.write(stream_header(req))
            ahead = loop.run_in_executor(_pool(), _read_batch, fds, batches[0]) if batches else None
            for k, batch in enumerate(batches):
                assert ahead is not None
                data = await ahead
                ahead = (loop.run_in_executor(_pool(), _read_batch, fds, batches[k + 1])
                         if k + 1 < len(batches) else None)
                for (disk, offset, _), piece in zip(batch, data):
                    await resp.write(piece_head(disk, offset, piece))
                    await resp.write(piece)
            await resp.write(trailer(sum(len(b) for b in batches), req.byte_count))
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
            req = await read_request(request, 30.0)
            if (req.domain, req.seq) != (domain, seq):
                raise BadExtentRequest(409, f"serving domain {domain} at seq {seq}, asked for domain {req.domain} "
                                            f"at seq {req.seq}")
            check_inside(req, files, "extents")
        except BadExtentRequest as exc:
            return web.json_response({"error": {"status": exc.status, "message": exc.message}}, status=exc.status)
        return await send_extents(request, req, files, "extents")

    app = web.Application()
    app.router.add_post("/extents", handler)
    return app
