"""Segment writer (FORMAT.md §5): frames of one domain in, one segment object out.

Everything works on batches: the record tables of the frames are concatenated with
numpy; all-zero ``WRITE`` payloads are found with one OR-reduction (``reduceat``) per
mark-free run of payloads and become ``ZERO`` records. The payload stream is the frames'
payloads in order, less the zero writes: a frame without a zero write is used in place
(a view, no copy), one with zero writes is gathered once (``np.compress`` over 512-byte
sectors). The stream is cut into blocks — views, but for a block that straddles two
frames, which is copied — and the blocks are compressed and summed in a few batches on
the executor when one is given (lz4 and xxhash release the GIL; a batch per task keeps
the executor's own cost per block out of it).

``build_segment_info`` returns what the writer knows besides the bytes (``BuiltSegment``:
payload bytes, seqs, times, stored sizes), so that a caller need not parse the object
it just built.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash

from cdp.errors import FormatError
from cdp.frame import Frame
from cdp.records import (
    KIND_MARK,
    KIND_WRITE,
    KIND_ZERO,
    RECORD_DTYPE,
    SECTOR,
    check_records,
    payload_lengths,
    payload_starts,
)
from cdp.segment_format import (
    BLOCK_DTYPE,
    BLOCK_RAW_SIZE_DEFAULT,
    CODEC_LZ4,
    CODEC_STORED,
    FOOTER,
    FOOTER_MAGIC,
    HEADER,
    HEADER_SIZE,
    INDEX_DTYPE,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    check_block_raw_size,
    pack_summed,
)


#: Blocks are packed on an executor in at most this many tasks per segment: a task per
#: 64 KiB block cost the executor's hand-over (tens of microseconds) 256 times a segment.
PACK_TASKS_MAX = 4
#: Blocks are packed in groups of this many (a task takes whole groups), and a block's
#: codec depends only on the blocks before it in its group: a segment's bytes are the
#: same whether or not it was packed on an executor, and however it was split.
PACK_GROUP_BLOCKS = 8
#: After a block that LZ4 made less than 1/2**POOR_SHIFT smaller (a "poor" block: nearly
#: incompressible data, such as fio's, encrypted or media files), the next block of the
#: group is first tried on its first SAMPLE_BYTES; it is stored as it is unless the
#: sample saves that much. LZ4 costs most on such data (~500 MB/s on fio's buffers, which
#: it makes 6.5 % smaller, against ~3.6 GB/s on random bytes), so the DRVA spent a third
#: of its CPU on it (benchmarks.nbd's 1 MiB job) for a few percent of the store.
POOR_SHIFT = 3
SAMPLE_BYTES = 4 << 10


@dataclass(frozen=True, slots=True)
class BuiltSegment:
    """A segment object and what its writer knows of it (the footer's and header's
    figures, without parsing them back)."""

    data: bytes
    first_seq: int
    last_seq: int
    first_ts: int
    last_ts: int
    record_count: int
    block_count: int
    payload_raw_len: int  # bytes of the payload stream (the footer's ``payload_raw_len``)
    payload_stored_len: int  # bytes of its blocks as stored

    @property
    def size(self) -> int:
        return len(self.data)


def build_segment(
    domain: int,
    frames: Sequence[Frame],
    *,
    block_raw_size: int = BLOCK_RAW_SIZE_DEFAULT,
    executor: Executor | None = None,
) -> bytes:
    """Encode the frames of one domain, with contiguous seqs, as one segment (§5).

    ``WRITE`` records whose payload is all zero bytes become ``ZERO`` records. Blocks are
    compressed on ``executor`` when one is given.
    """
    return build_segment_info(domain, frames, block_raw_size=block_raw_size, executor=executor).data


def build_segment_info(
    domain: int,
    frames: Sequence[Frame],
    *,
    block_raw_size: int = BLOCK_RAW_SIZE_DEFAULT,
    executor: Executor | None = None,
) -> BuiltSegment:
    """``build_segment``, with what the writer knows of the object (``BuiltSegment``)."""
    if not frames:
        raise ValueError("build_segment needs at least one frame")
    where = f"segment to build (domain {domain})"
    expected = frames[0].first_seq
    for i, frame in enumerate(frames):
        if frame.domain != domain:
            raise FormatError(f"{where}: frame {i} belongs to domain {frame.domain}")
        if frame.first_seq != expected:
            raise FormatError(
                f"{where}: frame {i} starts at seq {frame.first_seq}, expected {expected}"
            )
        expected = frame.last_seq + 1
    sources = [(f.records, memoryview(f.payload).cast("B")) for f in frames]
    return _build(domain, sources, block_raw_size, executor, where)


def build_segment_from_arrays(
    domain: int,
    records: np.ndarray,
    payload: bytes | bytearray | memoryview,
    *,
    block_raw_size: int = BLOCK_RAW_SIZE_DEFAULT,
    executor: Executor | None = None,
) -> bytes:
    """Like ``build_segment`` for one ``RECORD_DTYPE`` array and its frame-style payload."""
    if records.dtype != RECORD_DTYPE:
        raise TypeError(f"records must have RECORD_DTYPE, got {records.dtype}")
    if len(records) == 0:
        raise ValueError("a segment holds at least one record")
    where = f"segment to build (domain {domain})"
    sources = [(records, memoryview(payload).cast("B"))]
    return _build(domain, sources, block_raw_size, executor, where).data


def _build(
    domain: int,
    sources: list[tuple[np.ndarray, memoryview]],
    block_raw_size: int,
    executor: Executor | None,
    where: str,
) -> BuiltSegment:
    check_block_raw_size(block_raw_size)
    # np.concatenate always copies: the kinds may be rewritten below without touching
    # the caller's (read-only) frame views.
    records = np.concatenate([r for r, _ in sources])
    first_seq = int(records["seq"][0])
    # The author refuses a bad record, not only the reader.
    check_records(records, first_seq, where)
    spans = _payload_spans(records, sources, where)
    pieces = _cut_blocks(spans, block_raw_size)
    raw_len = sum(len(p) for p in pieces)
    if executor is None or len(pieces) <= PACK_GROUP_BLOCKS:
        packed = _pack_blocks(pieces)
    else:
        groups = -(-len(pieces) // PACK_GROUP_BLOCKS)
        step = -(-groups // PACK_TASKS_MAX) * PACK_GROUP_BLOCKS  # whole groups per task
        packed = [b for batch in executor.map(_pack_blocks, [pieces[a : a + step]
                                                             for a in range(0, len(pieces), step)]) for b in batch]

    table = _block_table(pieces, packed)
    stored_len = int(table["stored_len"].sum(dtype=np.uint64))
    index_offset = HEADER_SIZE + stored_len
    index = _record_index(records)
    table_bytes = table.view(np.uint8)
    index_bytes = index.view(np.uint8)
    summer = xxhash.xxh3_64()
    summer.update(table_bytes)
    summer.update(index_bytes)
    last_seq = int(records["seq"][-1])
    first_ts, last_ts = int(records["timestamp_ns"][0]), int(records["timestamp_ns"][-1])
    header = pack_summed(
        HEADER, SEGMENT_MAGIC, SEGMENT_VERSION, 0, domain, block_raw_size, first_seq,
        last_seq, first_ts, last_ts, 0,
    )
    footer = pack_summed(
        FOOTER, FOOTER_MAGIC, SEGMENT_VERSION, 0, domain, len(packed), first_seq,
        last_seq, index_offset, raw_len, summer.intdigest(),
    )
    parts = [header, *(p[0] for p in packed), table_bytes, index_bytes, footer]
    return BuiltSegment(b"".join(parts), first_seq, last_seq, first_ts, last_ts, len(records),
                        len(packed), raw_len, stored_len)


def _cut_blocks(spans: list[memoryview], block_raw_size: int) -> list[memoryview]:
    """The payload stream (``spans`` back to back) cut into blocks of ``block_raw_size``
    (the last one shorter): a view into its span, or a copy when it straddles spans."""
    blocks: list[memoryview] = []
    partial: list[memoryview] = []  # the start of a block that straddles spans
    partial_len = 0
    for span in spans:
        at = 0
        if partial:
            take = min(block_raw_size - partial_len, len(span))
            partial.append(span[:take])
            partial_len += take
            at = take
            if partial_len < block_raw_size:
                continue
            blocks.append(memoryview(b"".join(partial)))
            partial, partial_len = [], 0
        whole = at + (len(span) - at) // block_raw_size * block_raw_size
        blocks.extend(span[a : a + block_raw_size] for a in range(at, whole, block_raw_size))
        if whole < len(span):
            partial, partial_len = [span[whole:]], len(span) - whole
    if partial:
        blocks.append(partial[0] if len(partial) == 1 else memoryview(b"".join(partial)))
    return blocks


def _pack_blocks(pieces: list[memoryview]) -> list[tuple[bytes | memoryview, int, int, int]]:
    """Pack ``pieces``, consecutive blocks of which the first starts a group
    (``PACK_GROUP_BLOCKS``): each group on its own, and in a group a block after a poor
    one first tried on a sample (``POOR_SHIFT``)."""
    packed: list[tuple[bytes | memoryview, int, int, int]] = []
    poor = False
    for i, raw in enumerate(pieces):
        if i % PACK_GROUP_BLOCKS == 0:
            poor = False  # a group's first block is always tried whole
        if poor and len(raw) > SAMPLE_BYTES and not _saves_enough(raw[:SAMPLE_BYTES]):
            raw_sum = xxhash.xxh3_64_intdigest(raw)
            packed.append((raw, raw_sum, raw_sum, CODEC_STORED))
            continue
        block = _pack_block(raw)
        poor = len(block[0]) > len(raw) - (len(raw) >> POOR_SHIFT)
        packed.append(block)
    return packed


def _saves_enough(sample: memoryview) -> bool:
    """LZ4 makes ``sample`` at least 1/2**POOR_SHIFT smaller."""
    return len(lz4.block.compress(sample, store_size=False)) <= len(sample) - (len(sample) >> POOR_SHIFT)


def _block_table(pieces: list[memoryview], packed: list[tuple]) -> np.ndarray:
    """The §5.3 block table: blocks stored back to back from offset 64."""
    table = np.zeros(len(packed), dtype=BLOCK_DTYPE)
    table["stored_len"] = [len(p[0]) for p in packed]
    table["raw_len"] = [len(p) for p in pieces]
    table["raw_xxh3"] = [p[1] for p in packed]
    table["stored_xxh3"] = [p[2] for p in packed]
    table["codec"] = [p[3] for p in packed]
    table["stored_offset"] = HEADER_SIZE + payload_starts(table["stored_len"].astype(np.uint64))
    return table


def _record_index(records: np.ndarray) -> np.ndarray:
    """The §5.4 record index; ``raw_pos`` of a record without payload is where the next starts."""
    index = np.zeros(len(records), dtype=INDEX_DTYPE)
    for field in ("seq", "timestamp_ns", "offset", "length", "disk", "kind"):
        index[field] = records[field]
    index["raw_pos"] = payload_starts(payload_lengths(records))
    return index


def _pack_block(raw: memoryview) -> tuple[bytes | memoryview, int, int, int]:
    """(stored bytes, raw_xxh3, stored_xxh3, codec) of one block; LZ4 only when smaller."""
    raw_sum = xxhash.xxh3_64_intdigest(raw)
    packed = lz4.block.compress(raw, store_size=False)
    if len(packed) < len(raw):
        return packed, raw_sum, xxhash.xxh3_64_intdigest(packed), CODEC_LZ4
    return raw, raw_sum, raw_sum, CODEC_STORED


def _pieces(kind: np.ndarray) -> list[tuple[int, int, bool]]:
    """Split rows [0, n) into mark-free runs and single MARK rows: (lo, hi, is_mark).

    Inside a mark-free run every payload is a WRITE's, a multiple of 512 bytes, so the
    run's payload bytes can be viewed as u64 words and as 512-byte sectors. MARKs are
    rare (a few per hour), so a Python step per MARK is fine.
    """
    pieces = []
    lo = 0
    for m in np.flatnonzero(kind == KIND_MARK).tolist():
        if m > lo:
            pieces.append((lo, m, False))
        pieces.append((m, m + 1, True))
        lo = m + 1
    if len(kind) > lo:
        pieces.append((lo, len(kind), False))
    return pieces


def _zero_writes(kind, starts, plen, payload, pieces) -> np.ndarray:
    """Rows that are WRITEs with an all-zero payload: one OR-reduction per mark-free run."""
    zero = np.zeros(len(kind), dtype=bool)
    for lo, hi, is_mark in pieces:
        if is_mark:
            continue
        w = lo + np.flatnonzero(kind[lo:hi] == KIND_WRITE)
        if not len(w):
            continue
        p0 = int(starts[w[0]])
        span = int(plen[lo:hi].sum())
        words = np.frombuffer(payload, dtype=np.uint64, count=span // 8, offset=p0)
        firsts = ((starts[w] - np.uint64(p0)) // np.uint64(8)).astype(np.intp)
        zero[w] = np.bitwise_or.reduceat(words, firsts) == 0
    return zero


def _gather(kind, starts, plen, zero, payload, pieces, out: np.ndarray, pos: int) -> int:
    """Copy the kept payloads of one source into ``out`` at ``pos``; return the new pos."""
    src = np.frombuffer(payload, dtype=np.uint8)
    for lo, hi, is_mark in pieces:
        p0 = int(starts[lo])
        span = int(plen[lo:hi].sum())
        if not span:
            continue
        if is_mark or not zero[lo:hi].any():
            out[pos : pos + span] = src[p0 : p0 + span]
            pos += span
            continue
        # Drop the zero WRITEs sector by sector: one vectorised gather for the run.
        w = lo + np.flatnonzero(kind[lo:hi] == KIND_WRITE)
        keep = np.repeat(~zero[w], (plen[w] // np.uint64(SECTOR)).astype(np.intp))
        kept = int(np.count_nonzero(keep)) * SECTOR
        if kept:
            sectors = np.frombuffer(payload, dtype=f"V{SECTOR}", count=span // SECTOR, offset=p0)
            np.compress(keep, sectors, out=out[pos : pos + kept].view(f"V{SECTOR}"))
        pos += kept
    return pos


def _payload_spans(records: np.ndarray, sources, where: str) -> list[memoryview]:
    """Turn all-zero WRITEs of ``records`` into ZEROs; return the payload stream (§5.2)
    as spans to be read back to back: a source's payload itself when it keeps all of it,
    else its kept payloads gathered into a new buffer."""
    spans: list[memoryview] = []
    row = 0
    for recs, payload in sources:
        kind = recs["kind"]
        plen = payload_lengths(recs)
        starts = payload_starts(plen)
        described = int(plen.sum())
        if described != len(payload):
            raise FormatError(
                f"{where}: records from seq {int(recs['seq'][0])} describe {described} "
                f"payload bytes, got {len(payload)}"
            )
        pieces = _pieces(kind)
        zero = _zero_writes(kind, starts, plen, payload, pieces)
        row_kinds = records["kind"][row : row + len(recs)]
        row_kinds[zero] = KIND_ZERO
        row += len(recs)
        if not zero.any():
            if len(payload):
                spans.append(payload)
            continue
        out = np.empty(int(payload_lengths(records[row - len(recs) : row]).sum()), dtype=np.uint8)
        pos = _gather(kind, starts, plen, zero, payload, pieces, out, 0)
        assert pos == len(out), (pos, len(out))
        if pos:
            spans.append(memoryview(out).cast("B"))
    return spans
