"""Segment objects: every record of one domain for a contiguous seq range (FORMAT.md §5).

::

    segment := header(64) block_0 … block_{n-1} block_table record_index footer(64)

The code lives in three modules; import everything from this one:

- ``cdp.segment_format``: the layouts (structs and numpy dtypes, sizes asserted next to
  their §), ``SegmentIndex`` and ``parse_segment_tail``, the §5.6 checks of the tail;
- ``cdp.segment_build``: ``build_segment``, the batch writer (``build_segment_info``: with
  what it knows of the object, ``BuiltSegment``);
- here: the readers. ``read_segment_index`` fetches footer, block table and record index
  with one suffix GET (a second one only when the index is larger than the guess, and
  no ``stat``: the footer gives the object size); ``read_blocks`` fetches just the
  blocks a reader needs with one ranged GET and verifies them (``read_block_list``: the
  same, one buffer per block; ``fetch_blocks`` + ``unpack_blocks``: the GET and the
  block-by-block verification as two steps); ``decode_segment`` verifies a whole
  object (scrub, tests).

Every byte of a segment is under exactly one checksum. Each checksum is checked right
after its bytes are read and before any field under it is trusted; LZ4 only ever sees
bytes whose ``stored_xxh3`` matched. Errors name the object key, the offset and the field.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash

from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.segment_build import BuiltSegment, build_segment, build_segment_from_arrays, build_segment_info
from cdp.segment_format import (
    BLOCK_DTYPE,
    BLOCK_RAW_SIZE_DEFAULT,
    BLOCK_RAW_SIZE_MAX,
    BLOCK_RAW_SIZE_MIN,
    CODEC_LZ4,
    CODEC_STORED,
    FOOTER_MAGIC,
    FOOTER_SIZE,
    HEADER,
    HEADER_SIZE,
    HEADER_ZERO,
    INDEX_DTYPE,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    SegmentIndex,
    index_as_records,
    parse_footer,
    parse_segment_tail,
    payload_spans,
)
from cdp.store.base import ObjectStore
from cdp.summed import unpack_summed

__all__ = [
    "BLOCK_DTYPE", "BLOCK_RAW_SIZE_DEFAULT", "BLOCK_RAW_SIZE_MAX", "BLOCK_RAW_SIZE_MIN",
    "CODEC_LZ4", "CODEC_STORED", "FOOTER_MAGIC", "FOOTER_SIZE", "HEADER_SIZE", "INDEX_DTYPE",
    "SEGMENT_MAGIC", "SEGMENT_VERSION", "TAIL_GUESS_DEFAULT", "BuiltSegment", "SegmentHeader", "SegmentIndex",
    "build_segment", "build_segment_from_arrays", "build_segment_info", "decode_segment", "fetch_blocks",
    "index_as_records", "lz4_decompress", "parse_segment_header", "parse_segment_tail", "payload_spans",
    "read_block_list", "read_blocks", "read_payloads", "read_segment_index", "unpack_blocks",
]

#: Bytes of the first (suffix) GET of a segment's tail: 64 KiB holds the index of
#: about 1300 records; a larger index costs one more GET.
TAIL_GUESS_DEFAULT = 64 << 10


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """A segment header (§5.1) whose magic, version, checksum and ranges were checked."""

    domain: int
    block_raw_size: int
    first_seq: int
    last_seq: int
    first_ts: int
    last_ts: int


def parse_segment_header(key: str, raw: bytes | bytearray | memoryview) -> SegmentHeader:
    """Validate the 64-byte header at the start of ``raw`` (§5.1)."""
    fields = unpack_summed(HEADER, raw, where=f"segment {key}", magic=SEGMENT_MAGIC,
                           version=SEGMENT_VERSION, zero=HEADER_ZERO)
    _, domain, block_raw_size, first_seq, last_seq, first_ts, last_ts, _ = fields
    where = f"segment {key}: header at offset 0"
    in_range = BLOCK_RAW_SIZE_MIN <= block_raw_size <= BLOCK_RAW_SIZE_MAX
    if not in_range or block_raw_size & (block_raw_size - 1):
        raise FormatError(
            f"{where}: block_raw_size {block_raw_size} is not a power of two in "
            f"{BLOCK_RAW_SIZE_MIN}..{BLOCK_RAW_SIZE_MAX}"
        )
    if last_seq < first_seq or last_ts < first_ts:
        raise FormatError(f"{where}: last_seq/last_ts before first_seq/first_ts")
    return SegmentHeader(domain, block_raw_size, first_seq, last_seq, first_ts, last_ts)


async def read_segment_index(store: ObjectStore, key: str, *, tail_guess: int = TAIL_GUESS_DEFAULT) -> SegmentIndex:
    """Fetch and validate a segment's tail (§5.6): one suffix GET, two if the index is big.

    The object size comes from the footer (``index_offset + index + 64``), so no ``stat``
    is needed; when the first GET returned the whole object its length must agree.
    """
    assert tail_guess >= HEADER_SIZE + FOOTER_SIZE, tail_guess
    tail = await store.get(key, offset=-tail_guess)
    whole = len(tail) < tail_guess
    if len(tail) < HEADER_SIZE + FOOTER_SIZE:
        raise TruncatedError(
            f"segment {key}: {len(tail)} bytes, a segment needs at least {HEADER_SIZE + FOOTER_SIZE}"
        )
    at = len(tail) - FOOTER_SIZE if whole else -FOOTER_SIZE
    footer = parse_footer(key, memoryview(tail)[-FOOTER_SIZE:], at)
    size = footer.object_size
    if (whole and size != len(tail)) or size < len(tail):
        raise FormatError(
            f"segment {key}: footer: index_offset {footer.index_offset} and the index make "
            f"{size} bytes, the object has {'' if whole else 'at least '}{len(tail)}"
        )
    need = footer.index_len + FOOTER_SIZE
    if len(tail) < need:
        missing = need - len(tail)
        head = await store.get(key, offset=size - need, length=missing)
        if len(head) != missing:
            raise TruncatedError(
                f"segment {key}: index at offset {size - need}: got {len(head)} bytes, "
                f"expected {missing}"
            )
        tail = head + tail
    return parse_segment_tail(key, tail, size)


@functools.cache
def _lz4_decompress_safe():
    """liblz4's ``LZ4_decompress_safe(src, dst, srcSize, dstCapacity)`` through ctypes, or
    None (then python-lz4 decompresses).

    Why: python-lz4 has no "decompress into". Its ``decompress`` mallocs the output,
    decompresses, copies it into a new bytes object and frees the first buffer; for 1 MiB
    blocks glibc serves both from fresh mappings, so every block costs 512 page faults
    and a copy made holding the GIL: 13.7 ms per 16 MiB against 2.5 ms for LZ4 alone
    into a reused buffer (measured). ``LZ4_decompress_safe`` is liblz4's stable public
    API and never reads or writes outside the two buffers whatever the input; ctypes
    releases the GIL for the call.

    It is taken from the liblz4 that python-lz4's extension carries (and exports), which
    this process has loaded already: never from ``ctypes.util.find_library``, which runs
    ``ldconfig`` in a child process. A child forked while a recovery holds its
    directory's lock holds the lock too, until it execs or dies: a recovery killed with
    its process group then left the lock held for a moment after it was reaped, and an
    immediate rerun was refused as "another recovery is running" (seen in the kill
    campaign). Decoding never starts a process.
    """
    try:
        from lz4.block import _block as extension  # its file, to reach the liblz4 it links in
    except ImportError:  # another python-lz4 layout: python-lz4's own decompress
        return None
    name = getattr(extension, "__file__", None)
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).LZ4_decompress_safe
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def lz4_decompress(stored: bytes | bytearray | memoryview, raw_len: int, *, out: bytearray | None = None
                   ) -> bytes | memoryview:
    """An LZ4 block (no frame, no size prefix) decompressed, as ``lz4.block.decompress(
    stored, uncompressed_size=raw_len)`` does it: at most ``raw_len`` bytes (fewer when
    the stream holds fewer: the caller checks the length and the checksum), raising
    ``lz4.block.LZ4BlockError`` when LZ4 refuses the input. With ``out`` (at least
    ``raw_len`` bytes) the bytes go there and the result is a view of it, valid until
    the caller reuses it."""
    # Looked up on first use, not at import: loading the library costs every process
    # importing this module (the CLI, each DRVA) time it may never need.
    decompress_safe = _lz4_decompress_safe()
    if decompress_safe is None:
        return lz4.block.decompress(stored, uncompressed_size=raw_len)
    if out is None or len(out) < raw_len:
        out = bytearray(raw_len)
    src = np.frombuffer(stored, dtype=np.uint8)  # a pointer to read-only bytes, no copy
    dst = np.frombuffer(out, dtype=np.uint8)
    n = decompress_safe(src.ctypes.data, dst.ctypes.data, len(src), raw_len)
    if n < 0:
        raise lz4.block.LZ4BlockError(f"LZ4_decompress_safe: error at input byte {-n - 1}")
    return memoryview(out)[:n]


def _unpack_block(key: str, number: int, row: tuple, stored: memoryview,
                  out: bytearray | None = None) -> bytes | memoryview:
    """Verify one block's stored bytes, decompress them, verify the raw bytes (§5.3).

    ``out``: a buffer of at least ``raw_len`` bytes to decompress into; the result is
    then a view of it, valid until the caller reuses it."""
    stored_offset, stored_len, raw_len, stored_xxh3, raw_xxh3, codec, _ = row
    where = f"segment {key}: block {number} at offset {stored_offset}"
    if len(stored) != stored_len:
        raise TruncatedError(f"{where}: {len(stored)} stored bytes, stored_len is {stored_len}")
    if xxhash.xxh3_64_intdigest(stored) != stored_xxh3:
        raise ChecksumMismatch(f"{where}: stored_xxh3 does not match the {stored_len} stored bytes")
    if codec == CODEC_STORED:
        raw = stored
    else:
        try:
            raw = lz4_decompress(stored, raw_len, out=out)
        except lz4.block.LZ4BlockError as exc:
            raise FormatError(f"{where}: LZ4 block does not decompress to raw_len {raw_len}") from exc
    if len(raw) != raw_len:
        raise FormatError(f"{where}: decompressed to {len(raw)} bytes, raw_len is {raw_len}")
    if xxhash.xxh3_64_intdigest(raw) != raw_xxh3:
        raise ChecksumMismatch(f"{where}: raw_xxh3 does not match the decompressed bytes")
    return raw


def _block_jobs(key: str, rows: np.ndarray, first_block: int, stored: memoryview) -> list[tuple]:
    """Arguments of ``_unpack_block`` for contiguous blocks whose stored bytes are ``stored``."""
    base = int(rows["stored_offset"][0]) if len(rows) else 0
    jobs = []
    for k, row in enumerate(rows.tolist()):
        a = row[0] - base
        jobs.append((key, first_block + k, row, stored[a : a + row[1]]))
    return jobs


def _joined(raws: list[bytes | memoryview]) -> bytes:
    return bytes(raws[0]) if len(raws) == 1 else b"".join(raws)


def _check_block_range(index: SegmentIndex, first_block: int, last_block: int) -> None:
    if not 0 <= first_block <= last_block < index.block_count:
        raise ValueError(
            f"segment {index.key}: blocks {first_block}..{last_block} not in 0..{index.block_count - 1}"
        )


async def fetch_blocks(store: ObjectStore, index: SegmentIndex, first_block: int, last_block: int) -> bytes:
    """The *stored* (still compressed, not yet verified) bytes of blocks
    ``first_block..last_block``: one ranged GET, its length checked. ``unpack_blocks``
    verifies and decompresses them."""
    start, length = stored_span(index, first_block, last_block)
    data = await store.get(index.key, offset=start, length=length)
    if len(data) != length:
        raise TruncatedError(
            f"segment {index.key}: blocks {first_block}..{last_block} at offset {start}: "
            f"got {len(data)} bytes, expected {length}"
        )
    return data


def stored_span(index: SegmentIndex, first_block: int, last_block: int) -> tuple[int, int]:
    """(offset, length) in the segment object of the stored bytes of blocks
    ``first_block..last_block``: the range ``fetch_blocks`` gets."""
    _check_block_range(index, first_block, last_block)
    rows = index.blocks[first_block : last_block + 1]
    start = int(rows["stored_offset"][0])
    return start, int(rows["stored_offset"][-1]) + int(rows["stored_len"][-1]) - start


def unpack_blocks(
    index: SegmentIndex, first_block: int, last_block: int, stored: bytes | bytearray | memoryview,
    *, out: bytearray | None = None,
) -> Iterator[bytes | memoryview]:
    """Verify and decompress, one block at a time and in order, the stored bytes that
    ``fetch_blocks`` returned: yields each block's raw bytes (``block_raw_size`` each but
    maybe the last), only after its ``stored_xxh3`` and ``raw_xxh3`` matched.

    Lazy on purpose: a caller that uses each block as it comes (``rocva.fetch`` writes
    it out) holds one raw block at a time instead of the run's whole payload stream.
    ``out`` (at least ``index.block_raw_size`` bytes): every block is decompressed into
    it, so a yielded block is only valid until the next one is asked for (no allocation,
    no page faults per block). A codec-0 block is a view into ``stored``.
    """
    _check_block_range(index, first_block, last_block)
    rows = index.blocks[first_block : last_block + 1]
    for job in _block_jobs(index.key, rows, first_block, memoryview(stored).cast("B")):
        yield _unpack_block(*job, out)


def unpack_block_groups(
    index: SegmentIndex, first_block: int, last_block: int, stored: bytes | bytearray | memoryview,
    *, out: bytearray, wanted: Sequence[bool], group_bytes: int,
) -> Iterator[tuple[int, memoryview]]:
    """Like ``unpack_blocks``, but yields ``(k, raw)`` per group of consecutive wanted
    blocks (``k``: the group's first block, relative to ``first_block``), the group's
    blocks decompressed one after the other into ``out`` (at least ``group_bytes`` and
    one ``block_raw_size`` bytes): at most ``group_bytes`` raw bytes or one block per group.
    Each block is verified as ``unpack_blocks`` does. A block flagged False in ``wanted``
    (one flag per block of the range) is neither verified nor decompressed: a reader that
    fetched it only to join two needed blocks in one GET (``rocva.fetch``) uses none of
    its bytes. ``raw`` is valid until the next group is asked for.

    Why: a reader's per-block work in Python (finding the pieces, the zero-page scan)
    costs the same for 64 KiB as for 1 MiB; grouping keeps the small blocks that let a
    delta fetch little from slowing a full recovery down."""
    _check_block_range(index, first_block, last_block)
    rows = index.blocks[first_block : last_block + 1]
    jobs = _block_jobs(index.key, rows, first_block, memoryview(stored).cast("B"))
    dst = memoryview(out)
    k = 0
    while k < len(jobs):
        if not wanted[k]:
            k += 1
            continue
        start, filled = k, 0
        while k < len(jobs) and wanted[k] and (filled == 0 or filled + jobs[k][2][2] <= group_bytes):
            raw = _unpack_block(*jobs[k], dst[filled:])
            if not (isinstance(raw, memoryview) and raw.obj is out):  # decompressed in place, or:
                dst[filled : filled + len(raw)] = raw  # a stored (codec 0) block, a view of ``stored``
            filled += len(raw)
            k += 1
        yield start, dst[:filled]


async def read_block_list(
    store: ObjectStore, index: SegmentIndex, first_block: int, last_block: int, *, executor: Executor | None = None
) -> list[bytes | memoryview]:
    """The raw bytes of blocks ``first_block..last_block`` (inclusive), one buffer per
    block, each verified (``stored_xxh3``, then ``raw_xxh3`` after decompression); their
    concatenation is ``read_blocks``'s result, without the copy that makes it one object.
    One ranged GET; decompression runs on ``executor`` (one job per block) if given.
    """
    data = await fetch_blocks(store, index, first_block, last_block)
    rows = index.blocks[first_block : last_block + 1]
    jobs = _block_jobs(index.key, rows, first_block, memoryview(data))
    if executor is None:
        return [_unpack_block(*job) for job in jobs]
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(executor, _unpack_block, *j) for j in jobs)))


async def read_blocks(
    store: ObjectStore, index: SegmentIndex, first_block: int, last_block: int, *, executor: Executor | None = None
) -> bytes:
    """The raw payload-stream bytes of blocks ``first_block..last_block`` (inclusive), as
    one object: ``read_block_list`` joined. The result starts at stream position
    ``first_block × index.block_raw_size``. (A bulk reader that can use the blocks one by
    one should use ``read_block_list`` or ``fetch_blocks`` + ``unpack_blocks``: the join
    is a copy of every byte into freshly faulted memory.)
    """
    return _joined(await read_block_list(store, index, first_block, last_block, executor=executor))


async def read_payloads(
    store: ObjectStore, index: SegmentIndex, rows: np.ndarray, *, executor: Executor | None = None
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(raw, starts, lengths): the payload of row ``i`` is ``raw[starts[i]:starts[i] + lengths[i]]``.

    ``rows`` are index rows of this segment (e.g. ``index.rows_for_seqs(a, b)`` or a
    selection of them); one GET fetches the blocks that hold their payloads. Rows
    without a payload (``ZERO``, ``RESYNC_*``) get length 0.
    """
    span = index.block_span(rows)
    if span is None:
        empty = np.zeros(len(rows), dtype=np.int64)
        return b"", empty, empty.copy()
    raw = await read_blocks(store, index, span[0], span[1], executor=executor)
    starts, lengths = payload_spans(index, rows, span[0], len(raw))
    return raw, starts, lengths


def decode_segment(key: str, data: bytes | bytearray | memoryview) -> tuple[SegmentIndex, bytes]:
    """Verify a whole segment object (§5.6); return its index and its payload stream."""
    mv = memoryview(data).cast("B")
    if len(mv) < HEADER_SIZE + FOOTER_SIZE:
        raise TruncatedError(
            f"segment {key}: {len(mv)} bytes, a segment needs at least {HEADER_SIZE + FOOTER_SIZE}"
        )
    index = parse_segment_tail(key, mv, len(mv))
    header = parse_segment_header(key, mv)
    _check_header_agrees(key, header, index)
    jobs = _block_jobs(key, index.blocks, 0, mv[HEADER_SIZE : index.index_offset])
    raw = _joined([_unpack_block(*job) for job in jobs]) if jobs else b""
    return index, raw


def _check_header_agrees(key: str, header: SegmentHeader, index: SegmentIndex) -> None:
    """§5.6: the header agrees with the footer (domain, seqs) and the index (ts, blocks)."""
    recs = index.records
    pairs = [
        ("domain", header.domain, index.domain),
        ("first_seq", header.first_seq, index.first_seq),
        ("last_seq", header.last_seq, index.last_seq),
        ("first_ts", header.first_ts, int(recs["timestamp_ns"][0])),
        ("last_ts", header.last_ts, int(recs["timestamp_ns"][-1])),
    ]
    if index.block_count > 1:
        pairs.append(("block_raw_size", header.block_raw_size, index.block_raw_size))
    for field, got, expected in pairs:
        if got != expected:
            raise FormatError(
                f"segment {key}: header at offset 0: {field} {got}, the footer/index say {expected}"
            )
    if index.block_raw_size > header.block_raw_size:
        raise FormatError(
            f"segment {key}: header at offset 0: block_raw_size {header.block_raw_size} is "
            f"smaller than block 0 ({index.block_raw_size} raw bytes)"
        )
