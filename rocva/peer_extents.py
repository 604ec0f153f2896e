"""Reading the recovery site's quiesced disks for a failback (FORMAT.md §16).

``copy_from_peer`` sends an extent request to the site the domain runs at and writes
the stream's bytes into this site's disks, in place, then fsyncs them. The request is
cut into ``STREAMS`` parts sent at once (``extent_stream.split``): the other site reads
its disks at that depth, and the bytes of one stream are written while the others
arrive. Every piece is checked (``StreamReader``) before a byte of it is written; a
refusal, an unreachable site or a bad stream raises ``PeerUnavailable``, and whatever
was written is rewritten by the caller from the store (the same ranges, the same
content).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from cdp import durable
from cdp.bounded_read import read_at_most
from cdp.errors import CdpError, FormatError, TruncatedError
from cdp.extent_stream import PIECE, STREAM, TRAILER, ExtentRequest, StreamReader, encode_request, split
from cdp.msa.extents import CONTENT_TYPE, STREAMS_MAX
from cdp.tls import client_context, describe_tls_error
from cdp.tomlread import printable

STREAMS = STREAMS_MAX  # the most the other site serves at once for a domain (429 past it)
WRITE_BATCH_BYTES = 4 << 20  # written by one thread call; a stream holds at most this much
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0  # between two reads of a stream: the other site's disk or network stalled
# The whole copy must go at least this fast: a peer that trickles a byte now and then
# (never READ_TIMEOUT_S apart) would hold the failback for days instead of letting it read
# the store. The streams share one link, so the deadline counts the bytes of all of them.
PEER_BYTES_PER_S_MIN = 1 << 20
PEER_DEADLINE_BASE_S = 60.0  # on top: connecting, the other site's first reads
ERROR_BYTES_MAX = 64 << 10  # of a refusal's body, read and parsed (a §13.5 body is < 1 KiB)


class PeerUnavailable(CdpError):
    """The other site did not serve the ranges (refused, unreachable, or a bad stream)."""


@dataclass(frozen=True)
class Peer:
    """Where the ranges come from: ``url`` of the extents route, the bearer ``token``
    (never shown), and ``name`` for messages (the site)."""

    url: str
    token: str
    name: str
    ca: Path | None = None  # https: the peer site's CA certificate, the only one trusted

    def __repr__(self) -> str:  # the token stays out of logs and tracebacks
        return f"Peer(url={self.url!r}, name={self.name!r})"


def _write(batch: list[tuple[int, int, list[memoryview]]]) -> None:
    # No early writeback (sync_file_range) of what a batch wrote: measured, it made the
    # final fsync no shorter (the disk is busy with the other site's reads meanwhile)
    # and stalled the streams it ran in.
    for fd, offset, parts in batch:
        durable.pwrite_all(fd, parts, offset)


class _Parser:
    """An extent stream cut into the chunks it arrives in, checked by ``reader``: each
    piece's bytes stay views of those chunks (checksummed, then written with one
    ``pwritev``), never joined — on this machine's 2 cores the receiving loop is busy
    enough without copying every byte once more."""

    def __init__(self, reader: StreamReader, fds: Mapping[int, int]) -> None:
        self.reader, self.fds = reader, fds
        self.state, self.need = "header", STREAM.size
        self.small = bytearray()  # a header, piece head or trailer being assembled
        self.head = b""
        self.parts: list[memoryview] = []
        self.got = 0
        self.ready: list[tuple[int, int, list[memoryview]]] = []  # checked pieces: (fd, offset, parts)
        self.ready_bytes = 0

    def feed(self, chunk: bytes) -> None:
        mv = memoryview(chunk)
        pos, end = 0, len(mv)
        reader = self.reader
        while pos < end:
            if self.state == "data":
                take = min(end - pos, self.need - self.got)
                self.parts.append(mv[pos:pos + take])
                self.got += take
                pos += take
                if self.got == self.need:
                    reader.check(self.head, self.parts)
                    _, disk, offset, _, _, _ = PIECE.unpack(self.head)
                    self.ready.append((self.fds[disk], offset, self.parts))
                    self.ready_bytes += self.need
                    self.parts = []
                    self._after_piece()
                continue
            if self.state == "end":
                raise FormatError(f"{reader.where}: bytes after the trailer")
            take = min(end - pos, self.need - len(self.small))
            self.small += mv[pos:pos + take]
            pos += take
            if len(self.small) < self.need:
                continue
            buf, self.small = bytes(self.small), bytearray()
            if self.state == "header":
                reader.header(buf)
                self._after_piece()
            elif self.state == "head":
                _, _, length, _ = reader.piece(buf)
                self.head, self.state, self.need, self.got = buf, "data", length, 0
            else:
                reader.trailer(buf)
                self.state = "end"

    def _after_piece(self) -> None:
        self.state, self.need = ("trailer", TRAILER.size) if self.reader.done else ("head", PIECE.size)

    def take(self) -> tuple[list[tuple[int, int, list[memoryview]]], int]:
        out, n = self.ready, self.ready_bytes
        self.ready, self.ready_bytes = [], 0
        return out, n


async def _one(session: aiohttp.ClientSession, peer: Peer, req: ExtentRequest, fds: Mapping[int, int],
               pool: ThreadPoolExecutor, progress: Callable[[int], None] | None) -> int:
    where = f"extent stream from site {peer.name}"
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
    async with session.post(peer.url, data=encode_request(req), timeout=timeout,
                            headers={"Authorization": f"Bearer {peer.token}", "Content-Type": CONTENT_TYPE}) as resp:
        if resp.status != 200:
            raise PeerUnavailable(f"site {peer.name} refused the extent request: {await _refusal(resp)}")
        parser = _Parser(StreamReader(req, where), fds)
        written = 0
        async for chunk in resp.content.iter_any():
            parser.feed(chunk)
            if parser.ready_bytes >= WRITE_BATCH_BYTES:
                batch, size = parser.take()
                await loop.run_in_executor(pool, _write, batch)
                written += size
                if progress is not None:
                    progress(size)
        if parser.state != "end":
            raise TruncatedError(f"{where}: the stream ended at offset {parser.reader.at} before its trailer: "
                                 f"the connection was cut")
        batch, size = parser.take()
        if batch:
            await loop.run_in_executor(pool, _write, batch)
            written += size
            if progress is not None:
                progress(size)
        return written


async def _refusal(resp: aiohttp.ClientResponse) -> str:
    """What a refusal says: the message of its §13.5 body, read no further than
    ``ERROR_BYTES_MAX`` (a peer answered 1 GiB), else its status; escaped for a log line."""
    try:
        raw = await read_at_most(resp.content, ERROR_BYTES_MAX)
        doc = json.loads(raw.decode("utf-8", errors="replace"))
        message = doc["error"]["message"]
    except (ValueError, KeyError, TypeError, RecursionError, aiohttp.ClientError):
        message = None
    if not isinstance(message, str) or not message:
        return f"HTTP {resp.status}"
    return printable(message[:500])


def deadline_s(byte_count: int, bytes_per_s_min: float = PEER_BYTES_PER_S_MIN,
               base_s: float = PEER_DEADLINE_BASE_S) -> float:
    """How long reading ``byte_count`` bytes from the other site may take."""
    return base_s + byte_count / bytes_per_s_min


async def copy_from_peer(peer: Peer, req: ExtentRequest, fds: Mapping[int, int], *, streams: int = STREAMS,
                         progress: Callable[[int], None] | None = None,
                         bytes_per_s_min: float = PEER_BYTES_PER_S_MIN, deadline_base_s: float = PEER_DEADLINE_BASE_S
                         ) -> int:
    """Write ``req``'s ranges, read from ``peer``, into ``fds`` (disk id -> an open image,
    read-write) and fsync them; bytes written. ``PeerUnavailable`` on any failure, and
    when the streams are not all read within ``deadline_s`` of the request's bytes."""
    parts = split(req, streams)
    limit_s = deadline_s(req.byte_count, bytes_per_s_min, deadline_base_s)
    try:
        with ThreadPoolExecutor(max(1, len(parts)), thread_name_prefix="peer-write") as pool:
            # The peer's CA alone (cdp.tls), when its API is HTTPS (ConfigError naming the file).
            connector = aiohttp.TCPConnector(ssl=client_context(peer.ca)) if peer.ca is not None else None
            async with aiohttp.ClientSession(connector=connector) as session:
                tasks = [asyncio.ensure_future(_one(session, peer, part, fds, pool, progress)) for part in parts]
                deadline = asyncio.timeout(limit_s)
                try:
                    async with deadline:
                        done = await asyncio.gather(*tasks)
                except TimeoutError:
                    if not deadline.expired():
                        raise  # a socket's own timeout: below
                    raise PeerUnavailable(f"site {peer.name} ({peer.url}) did not send {req.byte_count} bytes within "
                                          f"{limit_s:g} s (at least {bytes_per_s_min / (1 << 20):g} MiB/s): "
                                          f"too slow, or stalled") from None
                finally:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
            await _fsync_all(fds)
    except PeerUnavailable:
        raise
    except aiohttp.ClientPayloadError:
        raise PeerUnavailable(f"extent stream from site {peer.name} ended early: the connection was cut "
                              f"before its trailer") from None
    except TruncatedError as exc:
        raise PeerUnavailable(f"extent stream from site {peer.name} ended early: {exc.message}") from None
    except FormatError as exc:
        raise PeerUnavailable(exc.message) from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise PeerUnavailable(describe_tls_error(exc.certificate_error, f"site {peer.name} ({peer.url})",
                                                 peer.ca)) from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise PeerUnavailable(f"site {peer.name} ({peer.url}): {type(exc).__name__}: {exc}") from None
    return sum(done)


async def _fsync_all(fds: Mapping[int, int]) -> None:
    await asyncio.gather(*(asyncio.to_thread(os.fsync, fd) for fd in set(fds.values())))
