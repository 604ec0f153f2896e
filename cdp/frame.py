"""Frame codec: a batch of consecutive records of one domain (docs/FORMAT.md §2).

The same bytes travel on the wire and sit in the replication log. Encoding and
validation work on whole batches: the record table is a numpy structured array, the
payload a memoryview, and the only per-frame Python work is a header ``struct`` and two
xxh3 passes. ``decode_frame`` returns views into the caller's buffer, not copies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.records import (
    KIND_MARK,
    RECORD_DTYPE,
    check_records,
    payload_lengths,
    payload_starts,
)
from cdp.summed import pack_summed, unpack_summed

FRAME_MAGIC = b"CDPF"
FRAME_VERSION = 1
RECORD_COUNT_MAX = 65536  # §2.1
PAYLOAD_LEN_MAX = 64 << 20  # §2.1

# FORMAT.md §2.1: frame header, 64 bytes. The last field, header_xxh3, covers [0, 56).
_HEADER = struct.Struct("<4sHHIIQQQQQQ")
assert _HEADER.size == 64, "FORMAT.md §2.1"
HEADER_SIZE = _HEADER.size
_HEADER_ZERO = {"flags": (6, 2), "reserved": (48, 8)}  # must be zero: {name: (offset, size)}

FRAME_LEN_MAX = HEADER_SIZE + RECORD_COUNT_MAX * RECORD_DTYPE.itemsize + PAYLOAD_LEN_MAX


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The validated header of a frame: enough to size and route the rest."""

    domain: int
    record_count: int
    first_seq: int
    last_seq: int
    payload_len: int
    body_xxh3: int

    @property
    def frame_len(self) -> int:
        return HEADER_SIZE + self.record_count * RECORD_DTYPE.itemsize + self.payload_len


@dataclass(frozen=True, slots=True)
class Frame:
    """A validated frame. ``records`` and ``payload`` are read-only views of its bytes."""

    header: FrameHeader
    records: np.ndarray
    payload: memoryview

    @property
    def domain(self) -> int:
        return self.header.domain

    @property
    def first_seq(self) -> int:
        return self.header.first_seq

    @property
    def last_seq(self) -> int:
        return self.header.last_seq

    def payload_starts(self) -> np.ndarray:
        """Offset of each record's payload inside ``payload``."""
        return payload_starts(payload_lengths(self.records))

    def mark_names(self) -> list[tuple[int, str]]:
        """(seq, name) of every MARK record; marks are rare, so a list is fine here."""
        idx = np.flatnonzero(self.records["kind"] == KIND_MARK)
        if not len(idx):
            return []
        starts = self.payload_starts()
        out = []
        for i in idx:
            a = int(starts[i])
            name = bytes(self.payload[a : a + int(self.records["length"][i])])
            out.append((int(self.records["seq"][i]), name.decode("utf-8", "replace")))
        return out


def encode_frame_parts(
    domain: int, records: np.ndarray, payload: bytes | bytearray | memoryview
) -> tuple[bytes, memoryview, memoryview]:
    """Encode a frame as (header, record_table, payload) for zero-copy ``writev``/``sendmsg``.

    ``records`` must be a ``RECORD_DTYPE`` array with consecutive seqs. The record rules
    are checked here too: a bad frame is refused by its author, not only by its reader.
    """
    if records.dtype != RECORD_DTYPE:
        raise TypeError(f"records must have RECORD_DTYPE, got {records.dtype}")
    count = len(records)
    if not 1 <= count <= RECORD_COUNT_MAX:
        raise FormatError(f"frame: record_count {count} not in 1..{RECORD_COUNT_MAX}")
    payload = memoryview(payload).cast("B")
    first_seq = int(records["seq"][0])
    check_records(records, first_seq, "frame to encode")
    expected = int(payload_lengths(records).sum())
    if expected != len(payload):
        raise FormatError(
            f"frame to encode: records describe {expected} payload bytes, got {len(payload)}"
        )
    if len(payload) > PAYLOAD_LEN_MAX:
        raise FormatError(f"frame to encode: payload {len(payload)} > {PAYLOAD_LEN_MAX}")
    table = memoryview(np.ascontiguousarray(records)).cast("B")
    body = xxhash.xxh3_64()
    body.update(table)
    body.update(payload)
    header = pack_summed(
        _HEADER, FRAME_MAGIC, FRAME_VERSION, 0, domain, count,
        first_seq, first_seq + count - 1, len(payload), body.intdigest(), 0,
    )
    return header, table, payload


def encode_frame(domain: int, records: np.ndarray, payload: bytes | bytearray | memoryview) -> bytes:
    """Encode a frame into one contiguous ``bytes`` (FORMAT.md §2)."""
    return b"".join(encode_frame_parts(domain, records, payload))


def decode_header(buf: bytes | bytearray | memoryview, where: str = "frame") -> FrameHeader:
    """Validate the 64-byte header at the start of ``buf`` (§2.3 checks 1–4)."""
    _, domain, count, first_seq, last_seq, payload_len, body_xxh3, _ = unpack_summed(
        _HEADER, buf, where=where, magic=FRAME_MAGIC, version=FRAME_VERSION, zero=_HEADER_ZERO
    )
    if not 1 <= count <= RECORD_COUNT_MAX:
        raise FormatError(f"{where}: record_count {count} not in 1..{RECORD_COUNT_MAX}")
    if last_seq != first_seq + count - 1:
        raise FormatError(
            f"{where}: last_seq {last_seq} != first_seq {first_seq} + record_count {count} - 1"
        )
    if payload_len > PAYLOAD_LEN_MAX:
        raise FormatError(f"{where}: payload_len {payload_len} > {PAYLOAD_LEN_MAX}")
    return FrameHeader(domain, count, first_seq, last_seq, payload_len, body_xxh3)


def decode_frame(buf: bytes | bytearray | memoryview, where: str = "frame") -> Frame:
    """Validate a whole frame (§2.3) and return views of its record table and payload.

    ``buf`` must hold exactly one frame. ``where`` names the source in error messages
    (a peer address, a log position).
    """
    mv = memoryview(buf).cast("B")
    header = decode_header(mv, where)
    table_len = header.record_count * RECORD_DTYPE.itemsize
    if len(mv) < header.frame_len:
        raise TruncatedError(f"{where}: {len(mv)} bytes, the header promises {header.frame_len}")
    if len(mv) > header.frame_len:
        raise FormatError(f"{where}: {len(mv)} bytes, the header promises {header.frame_len}")
    body = mv[HEADER_SIZE:].toreadonly()
    if xxhash.xxh3_64_intdigest(body) != header.body_xxh3:
        raise ChecksumMismatch(f"{where}: frame body checksum mismatch (seqs {header.first_seq}..{header.last_seq})")
    records = np.frombuffer(body, dtype=RECORD_DTYPE, count=header.record_count)
    payload = body[table_len:]
    check_records(records, header.first_seq, where)
    described = int(payload_lengths(records).sum())
    if described != header.payload_len:
        raise FormatError(
            f"{where}: records describe {described} payload bytes, payload_len is {header.payload_len}"
        )
    return Frame(header, records, payload)
