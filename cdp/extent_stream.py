"""Extent streams (FORMAT.md §16): byte ranges of a site's disks, asked for and sent.

A failback (issue 12) reads the recovery site's quiesced disks where the two histories
may differ. The protected site sends an *extent request* — per disk, sorted disjoint
``[start, end)`` ranges — and the recovery site answers with an *extent stream*: a
header, the requested bytes in request order cut into pieces of at most
``PIECE_BYTES_MAX`` (each with a checksum over its head and bytes), and a trailer that
counts them, so a stream cut short is told from a complete one.

Both sides treat the other's bytes as hostile: ``parse_request`` bounds every count
before it allocates, and ``StreamReader`` accepts only the piece it expects next.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.summed import checked_body, pack_summed, unpack_summed

VERSION = 1
REQUEST_MAGIC, STREAM_MAGIC, PIECE_MAGIC, TRAILER_MAGIC = b"CDPQ", b"CDPY", b"CDPP", b"CDPZ"
# magic, version, flags, domain, disk_count, seq, range_count, body_len, body_xxh3, reserved, header_xxh3
REQUEST = struct.Struct("<4sHHIIQQQQQQ")
# magic, version, flags, domain, reserved, seq, range_count, byte_count, reserved, reserved, header_xxh3
STREAM = struct.Struct("<4sHHIIQQQQQQ")
# magic, disk, offset, length, reserved, xxh3 (of piece[0:24] ‖ the bytes)
PIECE = struct.Struct("<4sIQIIQ")
# magic, version, flags, reserved, reserved, piece_count, byte_count, reserved, reserved, reserved, trailer_xxh3
TRAILER = struct.Struct("<4sHHIIQQQQQQ")
assert REQUEST.size == STREAM.size == TRAILER.size == 64 and PIECE.size == 32, "FORMAT.md §16"
DISK_ENTRY = np.dtype([("disk", "<u4"), ("reserved", "<u4"), ("range_count", "<u8")])
RANGE = np.dtype([("start", "<u8"), ("end", "<u8")])
assert DISK_ENTRY.itemsize == RANGE.itemsize == 16, "FORMAT.md §16"

PIECE_BYTES_MAX = 1 << 20
DISKS_MAX = 4096
# A request of 4 Mi ranges is 64 MiB: more than a failback of a 64 TiB domain at 5 %
# changed in 64 KiB writes would ask for; bounds what a peer can make the server hold.
RANGES_MAX = 4 << 20
REQUEST_BYTES_MAX = REQUEST.size + DISKS_MAX * DISK_ENTRY.itemsize + RANGES_MAX * RANGE.itemsize

Ranges = tuple[np.ndarray, np.ndarray]  # (start, end) int64, sorted, disjoint, non-empty


@dataclass(frozen=True)
class ExtentRequest:
    """Per disk id, the ranges asked for; ``seq`` is the point the disks must be at."""

    domain: int
    seq: int
    disks: tuple[int, ...]
    ranges: tuple[Ranges, ...]

    @property
    def range_count(self) -> int:
        return sum(len(r[0]) for r in self.ranges)

    @property
    def byte_count(self) -> int:
        return sum(int((r[1] - r[0]).sum()) for r in self.ranges)


def _check_ranges(start: np.ndarray, end: np.ndarray, where: str, size: int | None = None) -> None:
    if len(start) and (np.any(end <= start) or np.any(start[1:] < end[:-1])):
        raise FormatError(f"{where}: ranges must be non-empty, sorted and disjoint")
    if size is not None and len(end) and int(end[-1]) > size:
        raise FormatError(f"{where}: a range ends at {int(end[-1])}, past the disk's {size} bytes")


def encode_request(req: ExtentRequest) -> bytes:
    if len(req.disks) != len(req.ranges) or len(set(req.disks)) != len(req.disks) or len(req.disks) > DISKS_MAX:
        raise ValueError("one entry per distinct disk, at most DISKS_MAX")
    table = np.zeros(len(req.disks), DISK_ENTRY)
    table["disk"] = req.disks
    table["range_count"] = [len(r[0]) for r in req.ranges]
    rows = np.zeros(req.range_count, RANGE)
    at = 0
    for disk, (start, end) in zip(req.disks, req.ranges):
        _check_ranges(start, end, f"extent request, disk {disk}")
        rows["start"][at:at + len(start)] = start
        rows["end"][at:at + len(start)] = end
        at += len(start)
    body = table.tobytes() + rows.tobytes()
    head = pack_summed(REQUEST, REQUEST_MAGIC, VERSION, 0, req.domain, len(req.disks), req.seq, len(rows),
                       len(body), xxhash.xxh3_64_intdigest(body), 0)
    return head + body


def parse_request(buf: bytes | bytearray | memoryview, where: str = "extent request") -> ExtentRequest:
    """The request in ``buf`` (all of it), every field checked (FORMAT.md §16.1)."""
    mv = memoryview(buf).cast("B")
    if len(mv) > REQUEST_BYTES_MAX:
        raise FormatError(f"{where}: {len(mv)} bytes, at most {REQUEST_BYTES_MAX}")
    domain, disk_count, seq, range_count, body_len, body_xxh3 = unpack_summed(
        REQUEST, mv, where=where, magic=REQUEST_MAGIC, version=VERSION,
        zero={"flags": (6, 2), "reserved": (48, 8)})[1:7]
    if disk_count > DISKS_MAX or range_count > RANGES_MAX:
        raise FormatError(f"{where}: {disk_count} disks and {range_count} ranges, at most {DISKS_MAX} and {RANGES_MAX}")
    if body_len != disk_count * DISK_ENTRY.itemsize + range_count * RANGE.itemsize:
        raise FormatError(f"{where}: header at offset 32: body_len {body_len} does not match {disk_count} disks "
                          f"and {range_count} ranges")
    body = checked_body(mv, body_len, body_xxh3, where=where, what="body_xxh3", header_size=REQUEST.size)
    table = np.frombuffer(body, DISK_ENTRY, disk_count)
    rows = np.frombuffer(body, RANGE, range_count, offset=disk_count * DISK_ENTRY.itemsize)
    if np.any(table["reserved"]):
        raise FormatError(f"{where}: a disk entry's reserved field is not zero")
    if int(table["range_count"].sum(dtype=np.uint64)) != range_count:
        raise FormatError(f"{where}: the disk entries' range counts do not add up to range_count {range_count}")
    if len(np.unique(table["disk"])) != disk_count:
        raise FormatError(f"{where}: a disk is named twice")
    if range_count and int(rows["end"].max()) >= 1 << 62:
        raise FormatError(f"{where}: a range ends past 2^62")
    ranges, at = [], 0
    for entry in table:
        n = int(entry["range_count"])
        start = rows["start"][at:at + n].astype(np.int64)
        end = rows["end"][at:at + n].astype(np.int64)
        _check_ranges(start, end, f"{where}, disk {int(entry['disk'])}")
        ranges.append((start, end))
        at += n
    return ExtentRequest(domain, seq, tuple(int(d) for d in table["disk"]), tuple(ranges))


def stream_header(req: ExtentRequest) -> bytes:
    return pack_summed(STREAM, STREAM_MAGIC, VERSION, 0, req.domain, 0, req.seq, req.range_count, req.byte_count,
                       0, 0)


def trailer(piece_count: int, byte_count: int) -> bytes:
    return pack_summed(TRAILER, TRAILER_MAGIC, VERSION, 0, 0, 0, piece_count, byte_count, 0, 0, 0)


def piece_head(disk: int, offset: int, data: bytes | bytearray | memoryview) -> bytes:
    head = bytearray(PIECE.pack(PIECE_MAGIC, disk, offset, len(data), 0, 0))
    h = xxhash.xxh3_64(head[:24])
    h.update(data)
    struct.pack_into("<Q", head, 24, h.intdigest())
    return bytes(head)


def pieces(req: ExtentRequest) -> list[tuple[int, int, int]]:
    """``(disk, offset, length)`` of every piece of the stream answering ``req``, in order."""
    out = []
    for disk, (start, end) in zip(req.disks, req.ranges):
        for a, b in zip(start.tolist(), end.tolist()):
            for p in range(a, b, PIECE_BYTES_MAX):
                out.append((disk, p, min(PIECE_BYTES_MAX, b - p)))
    return out


class StreamReader:
    """Checks an extent stream answering ``req`` as it arrives: the header first, then
    exactly the pieces ``pieces(req)`` lists, in order, then the trailer. Every method
    raises ``FormatError`` (``ChecksumMismatch``, ``TruncatedError``) naming ``where``
    and the stream offset."""

    def __init__(self, req: ExtentRequest, where: str) -> None:
        self.req, self.where = req, where
        self._expect = pieces(req)
        self._next = 0
        self.at = 0  # stream offset
        self.byte_count = 0

    def header(self, buf: bytes) -> None:
        domain, _, seq, range_count, byte_count = unpack_summed(
            STREAM, buf, where=self.where, magic=STREAM_MAGIC, version=VERSION,
            zero={"flags": (6, 2), "reserved": (12, 4), "reserved2": (40, 16)})[1:6]
        if (domain, seq, range_count, byte_count) != (self.req.domain, self.req.seq, self.req.range_count,
                                                     self.req.byte_count):
            raise FormatError(f"{self.where}: stream header (domain {domain}, seq {seq}, {range_count} ranges, "
                              f"{byte_count} bytes) does not answer the request (domain {self.req.domain}, seq "
                              f"{self.req.seq}, {self.req.range_count} ranges, {self.req.byte_count} bytes)")
        self.at = STREAM.size

    @property
    def done(self) -> bool:
        return self._next == len(self._expect)

    def piece(self, head: bytes) -> tuple[int, int, int, int]:
        """The next piece's ``(disk, offset, length, xxh3)`` from its 32-byte head; its
        bytes go to ``check``."""
        if len(head) < PIECE.size:
            raise TruncatedError(f"{self.where}: stream ends at offset {self.at + len(head)}, inside a piece head")
        magic, disk, offset, length, reserved, digest = PIECE.unpack(head)
        if magic != PIECE_MAGIC or reserved or self.done:
            what = "a piece head" if not self.done else "the trailer"
            raise FormatError(f"{self.where}: at offset {self.at}: expected {what}, got magic {magic!r}")
        want = self._expect[self._next]
        if (disk, offset, length) != want:
            raise FormatError(f"{self.where}: piece at offset {self.at} is disk {disk} [{offset}, +{length}), "
                              f"expected disk {want[0]} [{want[1]}, +{want[2]})")
        return disk, offset, length, digest

    def check(self, head: bytes, data: bytes | bytearray | memoryview | Sequence[memoryview]) -> None:
        """The piece's bytes (one buffer, or the parts it arrived in) against its head's xxh3."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        _, disk, offset, _, _, digest = PIECE.unpack(head)
        h = xxhash.xxh3_64(head[:24])
        for part in parts:
            h.update(part)
        if h.intdigest() != digest:
            raise ChecksumMismatch(f"{self.where}: piece at offset {self.at} (disk {disk}, offset {offset}): xxh3 "
                                   f"does not match its bytes")
        length = sum(len(p) for p in parts)
        self._next += 1
        self.at += PIECE.size + length
        self.byte_count += length

    def trailer(self, buf: bytes) -> None:
        if not self.done:
            raise FormatError(f"{self.where}: trailer at offset {self.at} before the last piece")
        piece_count, byte_count = unpack_summed(
            TRAILER, buf, where=self.where, magic=TRAILER_MAGIC, version=VERSION, what="trailer", at=self.at,
            zero={"flags": (6, 2), "reserved": (8, 8), "reserved2": (32, 24)})[3:5]
        if (piece_count, byte_count) != (len(self._expect), self.byte_count):
            raise FormatError(f"{self.where}: trailer counts {piece_count} pieces and {byte_count} bytes, the stream "
                              f"held {len(self._expect)} and {self.byte_count}")


def split(req: ExtentRequest, parts: int) -> list[ExtentRequest]:
    """``req`` cut into at most ``parts`` requests of about equal bytes, each a contiguous
    run of its ranges (for streams in parallel; each stays local on the disks). A range
    is never cut."""
    counts = [len(r[0]) for r in req.ranges]
    if not sum(counts):
        return []
    slot = np.repeat(np.arange(len(req.disks)), counts)
    start = np.concatenate([r[0] for r in req.ranges])
    end = np.concatenate([r[1] for r in req.ranges])
    cum = np.cumsum(end - start)
    # Part k ends after the range where the running total first reaches k/parts of it.
    bounds = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts, side="left") + 1
    edges = np.unique(np.concatenate(([0], np.minimum(bounds, len(start)), [len(start)])))
    out = []
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
        disks, ranges = [], []
        for k in np.unique(slot[a:b]).tolist():
            sel = slice(a + int(np.searchsorted(slot[a:b], k, "left")), a + int(np.searchsorted(slot[a:b], k, "right")))
            disks.append(req.disks[k])
            ranges.append((start[sel], end[sel]))
        out.append(ExtentRequest(req.domain, req.seq, tuple(disks), tuple(ranges)))
    return out


def request_for(domain: int, seq: int, disks: Sequence[int], ranges: Sequence[Ranges]) -> ExtentRequest:
    """A request for the non-empty ``ranges`` of ``disks`` (empty ones left out)."""
    keep = [k for k, r in enumerate(ranges) if len(r[0])]
    return ExtentRequest(domain, seq, tuple(int(disks[k]) for k in keep),
                         tuple((np.asarray(ranges[k][0], np.int64), np.asarray(ranges[k][1], np.int64))
                               for k in keep))
