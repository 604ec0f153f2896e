"""Segment layouts (FORMAT.md §5): header, footer, block table, record index, validation.

The byte layouts of a segment object and the checks of §5.6 on its tail. The writer
(``cdp.segment_build``) and the reader (``cdp.segment``) share these definitions; import
the public names from ``cdp.segment``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.layout import parse_segment_key
from cdp.records import RECORD_DTYPE, check_records, payload_lengths, payload_starts
from cdp.summed import pack_summed, unpack_summed  # noqa: F401  (pack_summed: for cdp.segment_build)

SEGMENT_MAGIC = b"CDPS"
FOOTER_MAGIC = b"CDPE"
SEGMENT_VERSION = 1
BLOCK_RAW_SIZE_MIN = 4 << 10  # §5.1
BLOCK_RAW_SIZE_MAX = 16 << 20  # §5.1
BLOCK_RAW_SIZE_DEFAULT = 64 << 10  # §5.1
CODEC_STORED = 0  # §5.2
CODEC_LZ4 = 1  # §5.2

# FORMAT.md §5.1: segment header, 64 bytes; header_xxh3 (last field) covers [0, 56).
HEADER = struct.Struct("<4sHHIIQQQQQQ")
assert HEADER.size == 64, "FORMAT.md §5.1"
HEADER_ZERO = {"flags": (6, 2), "reserved": (48, 8)}  # must be zero: {name: (offset, size)}
# FORMAT.md §5.5: segment footer, 64 bytes; footer_xxh3 (last field) covers [0, 56).
FOOTER = struct.Struct("<4sHHIIQQQQQQ")
assert FOOTER.size == 64, "FORMAT.md §5.5"
FOOTER_ZERO = {"flags": (6, 2)}  # must be zero: {name: (offset, size)}
HEADER_SIZE = HEADER.size
FOOTER_SIZE = FOOTER.size

# FORMAT.md §5.3: block table entry, 40 bytes.
BLOCK_DTYPE = np.dtype(
    [
        ("stored_offset", "<u8"),
        ("stored_len", "<u4"),
        ("raw_len", "<u4"),
        ("stored_xxh3", "<u8"),
        ("raw_xxh3", "<u8"),
        ("codec", "<u2"),
        ("reserved", "V6"),
    ]
)
assert BLOCK_DTYPE.itemsize == 40, "FORMAT.md §5.3"
assert BLOCK_DTYPE.fields["codec"][1] == 32, "FORMAT.md §5.3"

# FORMAT.md §5.4: record index entry, 48 bytes.
INDEX_DTYPE = np.dtype(
    [
        ("seq", "<u8"),
        ("timestamp_ns", "<u8"),
        ("offset", "<u8"),
        ("raw_pos", "<u8"),
        ("length", "<u4"),
        ("disk", "<u4"),
        ("kind", "<u2"),
        ("reserved", "V6"),
    ]
)
assert INDEX_DTYPE.itemsize == 48, "FORMAT.md §5.4"
assert INDEX_DTYPE.fields["kind"][1] == 40, "FORMAT.md §5.4"

# The fields a record index entry shares with a record table entry (§1).
_RECORD_FIELDS = ("seq", "timestamp_ns", "offset", "length", "disk", "kind", "reserved")


def check_block_raw_size(block_raw_size: int) -> None:
    ok = BLOCK_RAW_SIZE_MIN <= block_raw_size <= BLOCK_RAW_SIZE_MAX
    if not ok or block_raw_size & (block_raw_size - 1):
        raise ValueError(
            f"block_raw_size {block_raw_size} is not a power of two in "
            f"{BLOCK_RAW_SIZE_MIN}..{BLOCK_RAW_SIZE_MAX} (FORMAT.md §5.1)"
        )


@dataclass(frozen=True, eq=False)
class SegmentIndex:
    """The validated tail of a segment: what a reader needs to find any record's payload.

    Invariant (checked by ``parse_segment_tail``, §5.6): ``records`` holds one entry per
    seq ``first_seq..last_seq`` in order, following §1; ``raw_pos`` is the running sum of
    the payload lengths (``WRITE`` and ``MARK``), ending at ``payload_raw_len``; blocks are
    contiguous from offset 64 to ``index_offset`` and every block but the last holds
    exactly ``block_raw_size`` raw bytes. ``object_size = index_offset + 40 × blocks +
    48 × records + 64``.

    ``block_raw_size`` is what the tail tells: block 0's ``raw_len``. With two or more
    blocks that equals the header's field; a one-block segment reports its whole stream
    length (0 with no payload), which maps every payload to block 0 just as well.
    Both arrays are read-only.
    """

    key: str
    domain: int
    first_seq: int
    last_seq: int
    block_raw_size: int
    payload_raw_len: int
    index_offset: int
    object_size: int
    blocks: np.ndarray
    records: np.ndarray

    @property
    def record_count(self) -> int:
        return self.last_seq - self.first_seq + 1

    @property
    def block_count(self) -> int:
        return len(self.blocks)

    def rows_for_seqs(self, first: int, last: int) -> np.ndarray:
        """The index rows (a view) with ``first <= seq <= last``, clipped to this segment."""
        lo = max(first, self.first_seq) - self.first_seq
        hi = min(last, self.last_seq) - self.first_seq + 1
        return self.records[lo:max(lo, hi)]

    def block_span(self, rows: np.ndarray) -> tuple[int, int] | None:
        """(first_block, last_block) holding the payloads of ``rows``; None if they have none."""
        plen = payload_lengths(rows)
        has = plen > 0
        if not has.any():
            return None
        begin = int(rows["raw_pos"][has].min())
        end = int((rows["raw_pos"][has] + plen[has]).max())
        return begin // self.block_raw_size, (end - 1) // self.block_raw_size


def payload_spans(
    index: SegmentIndex, rows: np.ndarray, first_block: int, raw_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of each row's payload inside ``read_blocks(…, first_block, …)``.

    ``raw_len`` is the length of those raw bytes. Rows without a payload get length 0.
    Raises ValueError when a payload is not inside the range (a caller's error).
    """
    lengths = payload_lengths(rows)
    base = np.uint64(first_block * index.block_raw_size)
    has = lengths > 0
    if has.any():
        pos = rows["raw_pos"][has]
        if (pos < base).any() or int((pos - base + lengths[has]).max()) > raw_len:
            raise ValueError(f"segment {index.key}: payloads outside blocks from {first_block}")
    starts = np.where(has, rows["raw_pos"] - np.minimum(rows["raw_pos"], base), 0)
    return starts.astype(np.int64), lengths.astype(np.int64)


def index_as_records(index_rows: np.ndarray) -> np.ndarray:
    """Record index rows (§5.4) as a ``RECORD_DTYPE`` array (§2.2), reserved bytes included."""
    out = np.empty(len(index_rows), dtype=RECORD_DTYPE)
    for field in _RECORD_FIELDS:
        out[field] = index_rows[field]
    return out


@dataclass(frozen=True, slots=True)
class Footer:
    """A segment footer whose magic, version and ``footer_xxh3`` matched (§5.5)."""

    domain: int
    block_count: int
    first_seq: int
    last_seq: int
    index_offset: int
    payload_raw_len: int
    index_xxh3: int

    @property
    def index_len(self) -> int:
        count = self.last_seq - self.first_seq + 1
        return BLOCK_DTYPE.itemsize * self.block_count + INDEX_DTYPE.itemsize * count

    @property
    def object_size(self) -> int:
        return self.index_offset + self.index_len + FOOTER_SIZE


def parse_footer(key: str, raw: memoryview, at: int) -> Footer:
    """Check a footer's magic, version, checksum and plain fields (§5.5).

    ``at`` is the footer's offset in the object, or -64 when the object size is unknown.
    """
    fields = unpack_summed(FOOTER, raw, where=f"segment {key}", what="footer", at=at,
                           magic=FOOTER_MAGIC, version=SEGMENT_VERSION, zero=FOOTER_ZERO)
    _, domain, block_count, first_seq, last_seq, index_offset, payload_raw_len, index_xxh3 = fields
    where = f"segment {key}: footer at offset {at}"
    if last_seq < first_seq:
        raise FormatError(f"{where}: last_seq {last_seq} < first_seq {first_seq}")
    if index_offset < HEADER_SIZE:
        raise FormatError(f"{where}: index_offset {index_offset} < {HEADER_SIZE}")
    return Footer(domain, block_count, first_seq, last_seq, index_offset,
                   payload_raw_len, index_xxh3)


def parse_segment_tail(key: str, tail: bytes | bytearray | memoryview, object_size: int) -> SegmentIndex:
    """Validate the footer, block table and record index (§5.6) from the object's tail.

    ``tail`` is the last ``len(tail)`` bytes of an object of ``object_size`` bytes; it
    must hold the whole index and the footer. ``key`` is the object's §7 key: the footer's
    domain and seq range must be the ones it names (an object under the wrong name is
    refused, not read as other seqs).
    """
    mv = memoryview(tail).cast("B")
    if len(mv) > object_size:
        raise ValueError(f"segment {key}: a tail of {len(mv)} bytes for {object_size} bytes")
    if len(mv) < FOOTER_SIZE or object_size < HEADER_SIZE + FOOTER_SIZE:
        raise TruncatedError(
            f"segment {key}: {object_size} bytes, a segment needs at least "
            f"{HEADER_SIZE + FOOTER_SIZE}"
        )
    footer = parse_footer(key, mv[-FOOTER_SIZE:], object_size - FOOTER_SIZE)
    named_domain, _, named_first, named_last = parse_segment_key(key)
    if (footer.domain, footer.first_seq, footer.last_seq) != (named_domain, named_first, named_last):
        raise FormatError(
            f"segment {key}: footer at offset {object_size - FOOTER_SIZE}: domain {footer.domain}, "
            f"seqs {footer.first_seq}..{footer.last_seq}; the key names domain {named_domain}, "
            f"seqs {named_first}..{named_last}"
        )
    if footer.object_size != object_size:
        raise FormatError(
            f"segment {key}: footer at offset {object_size - FOOTER_SIZE}: index_offset "
            f"{footer.index_offset}, {footer.block_count} blocks and "
            f"{footer.last_seq - footer.first_seq + 1} records make {footer.object_size} "
            f"bytes, the object has {object_size}"
        )
    need = footer.index_len + FOOTER_SIZE
    if len(mv) < need:
        raise TruncatedError(
            f"segment {key}: the tail holds {len(mv)} bytes, the index and footer need {need}"
        )
    raw = mv[len(mv) - need : len(mv) - FOOTER_SIZE]
    if xxhash.xxh3_64_intdigest(raw) != footer.index_xxh3:
        raise ChecksumMismatch(
            f"segment {key}: index_xxh3 does not match the block table and record index "
            f"at offset {footer.index_offset}"
        )
    table_len = BLOCK_DTYPE.itemsize * footer.block_count
    # Copies: the index outlives the (possibly large) buffer it came from.
    blocks = np.frombuffer(raw, dtype=BLOCK_DTYPE, count=footer.block_count).copy()
    records = np.frombuffer(raw, dtype=INDEX_DTYPE, offset=table_len).copy()
    block_raw_size = _check_blocks(key, footer, blocks)
    _check_index(key, footer, records)
    blocks.flags.writeable = False
    records.flags.writeable = False
    return SegmentIndex(
        key, footer.domain, footer.first_seq, footer.last_seq, block_raw_size,
        footer.payload_raw_len, footer.index_offset, object_size, blocks, records,
    )


def _first(bad: np.ndarray) -> int | None:
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def _check_blocks(key: str, footer: Footer, blocks: np.ndarray) -> int:
    """§5.6 rules of the block table; returns the block stride (block 0's raw_len)."""
    n = len(blocks)

    def fail(k: int, field: str, what: str) -> None:
        at = footer.index_offset + BLOCK_DTYPE.itemsize * k
        raise FormatError(f"segment {key}: block {k} (table entry at offset {at}): {field} {what}")

    if n == 0:
        if footer.payload_raw_len:
            fail(0, "block_count", f"is 0 but payload_raw_len is {footer.payload_raw_len}")
        if footer.index_offset != HEADER_SIZE:
            fail(0, "index_offset", f"{footer.index_offset} with no blocks, expected {HEADER_SIZE}")
        return 0
    raw_len = blocks["raw_len"].astype(np.uint64)
    stored_len = blocks["stored_len"].astype(np.uint64)
    stride = int(raw_len[0])
    reserved = blocks.view(np.uint8).reshape(n, BLOCK_DTYPE.itemsize)[:, 34:]
    checks = [
        (reserved.any(axis=1), "reserved", "bytes are not zero"),
        (blocks["codec"] > CODEC_LZ4, "codec", f"unknown (expected {CODEC_STORED} or {CODEC_LZ4})"),
        (raw_len == 0, "raw_len", "is 0"),
        (stored_len == 0, "stored_len", "is 0"),
        ((blocks["codec"] == CODEC_STORED) & (stored_len != raw_len), "stored_len",
         "differs from raw_len for a stored (codec 0) block"),
        (raw_len[:-1] != stride, "raw_len", f"differs from block 0's {stride} before the last block"),
        (raw_len > stride, "raw_len", f"exceeds block 0's {stride}"),
    ]
    for bad, field, what in checks:
        k = _first(bad)
        if k is not None:
            fail(k, field, what)
    if n > 1 and (stride & (stride - 1) or not BLOCK_RAW_SIZE_MIN <= stride <= BLOCK_RAW_SIZE_MAX):
        fail(0, "raw_len", f"{stride} is not a block_raw_size (power of two, 4 KiB..16 MiB)")
    if stride > BLOCK_RAW_SIZE_MAX:  # one block: shorter than block_raw_size, never above its maximum
        fail(0, "raw_len", f"{stride} exceeds the largest block_raw_size {BLOCK_RAW_SIZE_MAX} (16 MiB)")
    total = int(raw_len.sum())
    if total != footer.payload_raw_len:
        fail(n - 1, "raw_len", f"sum {total} differs from payload_raw_len {footer.payload_raw_len}")
    expected = HEADER_SIZE + payload_starts(stored_len)
    k = _first(blocks["stored_offset"] != expected)
    if k is not None:
        fail(k, "stored_offset", f"{int(blocks['stored_offset'][k])}, expected {int(expected[k])}")
    end = int(expected[-1] + stored_len[-1])
    if end != footer.index_offset:
        fail(n - 1, "stored_len", f"ends the blocks at {end}, index_offset is {footer.index_offset}")
    return stride


def _check_index(key: str, footer: Footer, records: np.ndarray) -> None:
    """§5.6 rules of the record index: §1 rules per record, then raw_pos consistency."""
    at = footer.index_offset + BLOCK_DTYPE.itemsize * footer.block_count
    where = f"segment {key}: record index at offset {at} (48-byte entries)"
    check_records(index_as_records(records), footer.first_seq, where)
    plen = payload_lengths(records)
    expected = payload_starts(plen)
    i = _first(records["raw_pos"] != expected)
    if i is not None:
        raise FormatError(
            f"{where}: entry {i} (seq {footer.first_seq + i}, offset {at + 48 * i}): raw_pos "
            f"{int(records['raw_pos'][i])}, expected {int(expected[i])} from the lengths before it"
        )
    total = int(plen.sum())
    if total != footer.payload_raw_len:
        raise FormatError(
            f"{where}: the payload lengths sum to {total}, "
            f"footer payload_raw_len is {footer.payload_raw_len}"
        )

