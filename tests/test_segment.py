"""Segment objects (docs/FORMAT.md §5): round trips, ranged reads, every corruption."""

from __future__ import annotations

import asyncio
import struct
from concurrent.futures import ThreadPoolExecutor

import lz4.block
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.frame import decode_frame, encode_frame
from cdp.layout import segment_key
from cdp.records import (
    KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE, KIND_ZERO, RECORD_DTYPE,
    empty_records,
)
from cdp.segment import (
    BLOCK_DTYPE, CODEC_LZ4, CODEC_STORED, FOOTER_SIZE, HEADER_SIZE, INDEX_DTYPE,
    build_segment, build_segment_from_arrays, build_segment_info, decode_segment, index_as_records,
    fetch_blocks, parse_segment_tail, read_block_list, read_blocks, read_payloads,
    read_segment_index, unpack_blocks,
)
import cdp.segment as segment_module
from cdp.segment_build import PACK_GROUP_BLOCKS, POOR_SHIFT, SAMPLE_BYTES
from cdp.segment_format import FOOTER, HEADER
from cdp.store.memory import MemoryStore

TS0 = 1_700_000_000_000_000_000
BLOCK = 64 << 10  # the default block_raw_size
STYLES = ("zero", "random", "text", "sparse", "poor")


def _payload(seq: int, length: int, style: str) -> bytes:
    """Deterministic payload bytes of one record in one of four styles."""
    rng = np.random.default_rng(seq)
    if style == "zero":
        return bytes(length)
    if style == "sparse":  # all zero but one byte: the zero detector must notice it
        buf = bytearray(length)
        buf[int(rng.integers(0, length))] = 1 + int(rng.integers(0, 255))
        return bytes(buf)
    if style == "random":
        return rng.bytes(length)
    if style == "poor":  # random but for 8 bytes in 64 repeated: LZ4 saves ~6 %, under 1/8
        rows = np.frombuffer(rng.bytes(-(-length // 64) * 64), dtype=np.uint8).copy().reshape(-1, 64)
        rows[:, 56:] = rows[:, :8]
        return rows.tobytes()[:length]
    return (b"block %012d of seq %d;" % (seq, seq) * (length // 16 + 1))[:length]


class _Batch:
    """Records and payloads built one record at a time, plus what the segment must hold."""

    def __init__(self, first_seq: int) -> None:
        self.rows: list[tuple] = []
        self.payloads: list[bytes] = []  # per record, b"" for no payload
        self.seq = first_seq
        self.ts = TS0

    def add(self, kind: int, *, length: int = 0, offset: int = 0, disk: int = 0,
            style: str = "text", name: bytes = b"m", dts: int = 1000) -> None:
        self.ts += dts
        payload = b""
        if kind == KIND_WRITE:
            payload = _payload(self.seq, length, style)
        elif kind == KIND_MARK:
            payload, length, offset, disk = name, len(name), 0, 0
        elif kind in (KIND_RESYNC_BEGIN, KIND_RESYNC_END):
            length, offset = 0, 0
        self.rows.append((self.seq, self.ts, offset, length, disk, kind, b"\0" * 6))
        self.payloads.append(payload)
        self.seq += 1

    def records(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        return np.array(self.rows[lo:hi], dtype=RECORD_DTYPE)

    def payload(self, lo: int = 0, hi: int | None = None) -> bytes:
        return b"".join(self.payloads[lo:hi])

    def frames(self, domain: int, cuts: list[int]):
        bounds = [0, *cuts, len(self.rows)]
        return [decode_frame(encode_frame(domain, self.records(a, b), self.payload(a, b)))
                for a, b in zip(bounds, bounds[1:]) if b > a]

    def expected(self) -> tuple[np.ndarray, bytes]:
        """The records as the segment stores them (all-zero WRITEs as ZERO) and the stream."""
        recs = self.records()
        kept = []
        for i, p in enumerate(self.payloads):
            if recs["kind"][i] == KIND_WRITE and not any(p):
                recs["kind"][i] = KIND_ZERO
            else:
                kept.append(p)
        return recs, b"".join(kept)


@st.composite
def batches(draw):
    batch = _Batch(draw(st.integers(1, 1 << 40)))
    for _ in range(draw(st.integers(1, 24))):
        kind = draw(st.sampled_from([KIND_WRITE] * 6 + [KIND_ZERO, KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END]))
        sectors = draw(st.one_of(st.integers(1, 8), st.integers(1, 512)))  # 512 B .. 256 KiB
        batch.add(kind, length=sectors * 512, offset=draw(st.integers(0, 1 << 30)) * 512,
                  disk=draw(st.integers(0, 3)), style=draw(st.sampled_from(STYLES)),
                  name=draw(st.binary(min_size=1, max_size=255)), dts=draw(st.integers(0, 10**6)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(batch.rows) - 1)), max_size=4)))
    return batch, cuts


def _check_index_matches(index, batch: _Batch, domain: int) -> None:
    recs, stream = batch.expected()
    assert index.domain == domain
    assert (index.first_seq, index.last_seq) == (int(recs["seq"][0]), int(recs["seq"][-1]))
    assert index.payload_raw_len == len(stream)
    assert np.array_equal(index_as_records(index.records), recs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.integers(12, 20), st.sampled_from([128, 1024, 65536]), st.data())
def test_round_trip(drawn, log_block, tail_guess, data) -> None:
    batch, cuts = drawn
    domain = 7
    obj = build_segment(domain, batch.frames(domain, cuts), block_raw_size=1 << log_block)
    key = segment_key(domain, 1, batch.rows[0][0], batch.rows[-1][0])
    index, stream = decode_segment(key, obj)
    _check_index_matches(index, batch, domain)
    assert stream == batch.expected()[1]
    assert obj == build_segment_from_arrays(domain, batch.records(), batch.payload(),
                                            block_raw_size=1 << log_block)

    async def via_store() -> None:
        store = MemoryStore()
        await store.put(key, obj)
        tail_index = await read_segment_index(store, key, tail_guess=tail_guess)
        assert tail_index.object_size == len(obj)
        for name in ("domain", "first_seq", "last_seq", "block_raw_size", "payload_raw_len", "index_offset"):
            assert getattr(tail_index, name) == getattr(index, name)
        assert np.array_equal(tail_index.blocks, index.blocks)
        assert np.array_equal(tail_index.records, index.records)
        if index.block_count:
            a = data.draw(st.integers(0, index.block_count - 1))
            b = data.draw(st.integers(a, index.block_count - 1))
            raw = await read_blocks(store, tail_index, a, b)
            brs = index.block_raw_size
            assert raw == stream[a * brs : (b + 1) * brs]
        lo = data.draw(st.integers(index.first_seq, index.last_seq))
        hi = data.draw(st.integers(lo, index.last_seq))
        rows = tail_index.rows_for_seqs(lo, hi)
        raw, starts, lengths = await read_payloads(store, tail_index, rows)
        for row, s, n in zip(rows, starts.tolist(), lengths.tolist()):
            i = int(row["seq"]) - index.first_seq
            want = batch.payloads[i] if row["kind"] in (KIND_WRITE, KIND_MARK) else b""
            assert raw[s : s + n] == want

    asyncio.run(via_store())


def test_layouts_match_the_spec_tables() -> None:
    assert HEADER.size == 64 and FOOTER.size == 64
    assert BLOCK_DTYPE.itemsize == 40 and INDEX_DTYPE.itemsize == 48
    offsets = {name: BLOCK_DTYPE.fields[name][1] for name in BLOCK_DTYPE.names}
    assert offsets == {"stored_offset": 0, "stored_len": 8, "raw_len": 12, "stored_xxh3": 16,
                       "raw_xxh3": 24, "codec": 32, "reserved": 34}
    offsets = {name: INDEX_DTYPE.fields[name][1] for name in INDEX_DTYPE.names}
    assert offsets == {"seq": 0, "timestamp_ns": 8, "offset": 16, "raw_pos": 24, "length": 32,
                       "disk": 36, "kind": 40, "reserved": 42}
    # Header and footer: each field at its §5.1/§5.5 offset (distinct values, then unpack).
    fields = (b"CDPS", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    raw = HEADER.pack(*fields)
    assert raw[8:12] == struct.pack("<I", 3) and raw[12:16] == struct.pack("<I", 4)
    assert raw[16:24] == struct.pack("<Q", 5) and raw[48:56] == struct.pack("<Q", 9)
    raw = FOOTER.pack(b"CDPE", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert raw[12:16] == struct.pack("<I", 4) and raw[32:40] == struct.pack("<Q", 7)
    assert raw[40:48] == struct.pack("<Q", 8) and raw[56:64] == struct.pack("<Q", 10)


def _small_batch() -> _Batch:
    """A few KiB of payload over several 4 KiB blocks, every kind, odd MARK lengths."""
    b = _Batch(100)
    b.add(KIND_WRITE, length=2048, offset=4096, style="text")
    b.add(KIND_WRITE, length=1024, offset=0, disk=1, style="random")
    b.add(KIND_MARK, name=b"app-quiesced")
    b.add(KIND_ZERO, length=8192, offset=1 << 20)
    b.add(KIND_WRITE, length=512, offset=512, style="zero")
    b.add(KIND_WRITE, length=1536, offset=512, style="sparse")
    b.add(KIND_MARK, name=b"x")
    b.add(KIND_WRITE, length=4096, offset=8192, style="text")
    b.add(KIND_RESYNC_BEGIN)
    b.add(KIND_RESYNC_END)
    b.add(KIND_WRITE, length=6144, offset=65536, disk=2, style="random")
    return b


SMALL_KEY = "d/00000007/seg/00000001/0000000000000064-000000000000006e.seg"


def _small_segment() -> bytes:
    b = _small_batch()
    return build_segment(7, b.frames(7, [3, 7]), block_raw_size=4096)


def test_small_segment_shape() -> None:
    obj = _small_segment()
    index, stream = decode_segment(SMALL_KEY, obj)
    assert index.block_count >= 3
    assert set(index.blocks["codec"].tolist()) == {CODEC_STORED, CODEC_LZ4}
    assert index.records["kind"].tolist() == [0, 0, 2, 1, 1, 0, 2, 0, 3, 4, 0]
    _check_index_matches(index, _small_batch(), 7)
    assert stream == _small_batch().expected()[1]
    assert len(obj) < 16 << 10


def test_every_byte_flip_is_detected() -> None:
    obj = _small_segment()
    buf = bytearray(obj)
    for pos in range(len(buf)):
        for mask in (0x01, 0xFF):
            buf[pos] ^= mask
            with pytest.raises(FormatError):
                decode_segment(SMALL_KEY, buf)
            buf[pos] ^= mask
    assert bytes(buf) == obj


def test_every_truncation_and_extension_is_detected() -> None:
    obj = _small_segment()
    for n in range(len(obj)):
        with pytest.raises(FormatError):
            decode_segment(SMALL_KEY, obj[:n])
    for extra in (b"\0", b"\0" * 64, obj[-64:]):
        with pytest.raises(FormatError):
            decode_segment(SMALL_KEY, obj + extra)


def test_every_flip_after_the_header_is_detected_by_ranged_reads() -> None:
    obj = _small_segment()

    async def run() -> None:
        store = MemoryStore()
        for pos in range(HEADER_SIZE, len(obj)):
            bad = bytearray(obj)
            bad[pos] ^= 0x01
            await store.put(SMALL_KEY, bad)
            with pytest.raises(FormatError):
                index = await read_segment_index(store, SMALL_KEY, tail_guess=1024)
                await read_blocks(store, index, 0, index.block_count - 1)

    asyncio.run(run())


# --------------------------------------------------------------------------- validation


def _resum(buf: bytearray) -> bytearray:
    """Recompute every checksum of the index, footer and header after an edit."""
    (*fields, _) = FOOTER.unpack_from(buf, len(buf) - FOOTER_SIZE)
    index_offset = fields[7]
    fields[9] = xxhash.xxh3_64_intdigest(bytes(buf[index_offset : len(buf) - FOOTER_SIZE]))
    footer = bytearray(FOOTER.pack(*fields, 0))
    struct.pack_into("<Q", footer, 56, xxhash.xxh3_64_intdigest(bytes(footer[:56])))
    buf[len(buf) - FOOTER_SIZE :] = footer
    struct.pack_into("<Q", buf, 56, xxhash.xxh3_64_intdigest(bytes(buf[:56])))
    return buf


def _edit(obj: bytes, table: str, row: int, field: str, value) -> bytearray:
    index, _ = decode_segment(SMALL_KEY, obj)
    dtype = BLOCK_DTYPE if table == "blocks" else INDEX_DTYPE
    base = index.index_offset + (0 if table == "blocks" else 40 * index.block_count)
    buf = bytearray(obj)
    arr = np.frombuffer(buf, dtype=dtype, count=1, offset=base + dtype.itemsize * row)
    arr[field] = value
    return _resum(buf)


@pytest.mark.parametrize(
    "table,row,field,value,message",
    [
        ("records", 3, "raw_pos", 1, "raw_pos"),
        ("records", 2, "seq", 5, "seq is not consecutive"),
        ("records", 4, "timestamp_ns", 1, "timestamp_ns goes backwards"),
        ("records", 5, "kind", 9, "unknown kind"),
        ("records", 0, "offset", 100, "multiple of 512"),
        ("records", 1, "reserved", b"\1" + b"\0" * 5, "reserved"),
        ("blocks", 1, "stored_offset", 65, "stored_offset"),
        ("blocks", 0, "raw_len", 2048, "raw_len"),
        ("blocks", 1, "codec", 7, "codec"),
        ("blocks", 2, "reserved", b"\0\0\0\0\0\1", "reserved"),
    ],
)
def test_checksummed_but_invalid_index_is_refused(table, row, field, value, message) -> None:
    bad = _edit(_small_segment(), table, row, field, value)
    with pytest.raises(FormatError, match=message) as err:
        decode_segment(SMALL_KEY, bad)
    assert SMALL_KEY in str(err.value)
    assert not isinstance(err.value, ChecksumMismatch)


def test_header_must_agree_with_footer_and_index() -> None:
    obj = _small_segment()
    for offset, field in ((8, "domain"), (32, "first_ts"), (40, "last_ts"), (24, "last_seq")):
        buf = bytearray(obj)
        fmt = "<I" if offset == 8 else "<Q"
        (value,) = struct.unpack_from(fmt, buf, offset)
        struct.pack_into(fmt, buf, offset, value + 1)
        with pytest.raises(FormatError, match=field):
            decode_segment(SMALL_KEY, _resum(buf))


def test_key_must_name_the_footer_range() -> None:
    obj = _small_segment()
    for key in (segment_key(7, 1, 100, 111), segment_key(7, 1, 99, 110), segment_key(8, 1, 100, 110), "x"):
        with pytest.raises(FormatError, match="key"):
            decode_segment(key, obj)


def test_tail_must_hold_the_index() -> None:
    obj = _small_segment()
    with pytest.raises(TruncatedError):
        parse_segment_tail(SMALL_KEY, obj[-100:], len(obj))
    with pytest.raises(FormatError, match="the object has"):
        parse_segment_tail(SMALL_KEY, obj[-2000:], len(obj) + 1)


# --------------------------------------------------------------------------- build rules


def test_zero_writes_after_odd_marks_are_found() -> None:
    b = _Batch(1)
    b.add(KIND_MARK, name=b"abc")  # 3 bytes: the next payload is not 8-byte aligned
    b.add(KIND_WRITE, length=1024, style="zero")
    b.add(KIND_WRITE, length=512, style="sparse")
    b.add(KIND_WRITE, length=1536, style="zero")
    b.add(KIND_MARK, name=b"12345")
    b.add(KIND_WRITE, length=512, style="sparse")
    b.add(KIND_WRITE, length=512, style="zero")
    obj = build_segment(1, b.frames(1, []), block_raw_size=4096)
    index, stream = decode_segment(segment_key(1, 1, 1, 7), obj)
    assert index.records["kind"].tolist() == [2, 1, 0, 1, 2, 0, 1]
    assert stream == b.expected()[1]
    assert index.records["raw_pos"].tolist() == [0, 3, 3, 515, 515, 520, 1032]


def test_all_zero_payloads_make_no_blocks() -> None:
    b = _Batch(1)
    b.add(KIND_WRITE, length=4096, style="zero")
    b.add(KIND_RESYNC_BEGIN)
    obj = build_segment(1, b.frames(1, []))
    index, stream = decode_segment(segment_key(1, 1, 1, 2), obj)
    assert index.block_count == 0 and stream == b"" and index.index_offset == HEADER_SIZE
    assert index.block_span(index.records) is None


def test_build_segment_info_says_what_the_object_holds() -> None:
    # Frames of 3 x 12 KiB cut into 16 KiB blocks: blocks straddle frames (copied) or lie
    # inside one (views); a zero write drops out of one frame's span.
    b = _Batch(1)
    for i in range(30):
        b.add(KIND_WRITE, length=12288, offset=i * 12288, style="zero" if i == 7 else STYLES[1 + i % 3])
    b.add(KIND_MARK, name=b"after")
    frames = b.frames(4, [3, 6, 9, 12, 15])
    with ThreadPoolExecutor(2) as pool:
        for executor in (None, pool):
            built = build_segment_info(4, frames, block_raw_size=16384, executor=executor)
            assert built.data == build_segment(4, frames, block_raw_size=16384)
            key = segment_key(4, 1, 1, 31)
            index, stream = decode_segment(key, built.data)
            assert stream == b.expected()[1]
            assert (built.payload_raw_len, built.block_count, built.size) == (len(stream), index.block_count,
                                                                              len(built.data))
            assert (built.first_seq, built.last_seq, built.record_count) == (1, 31, 31)
            assert built.first_ts == int(index.records["timestamp_ns"][0])
            assert built.last_ts == int(index.records["timestamp_ns"][-1])
            assert built.payload_stored_len == int(index.blocks["stored_len"].sum())


def test_executor_gives_the_same_bytes() -> None:
    b = _Batch(1)
    for i in range(40):
        b.add(KIND_WRITE, length=16384, offset=i * 16384, style=STYLES[i % 4])
    frames = b.frames(3, [10, 20])
    plain = build_segment(3, frames, block_raw_size=16384)
    key = segment_key(3, 1, 1, 40)
    with ThreadPoolExecutor(2) as pool:
        assert build_segment(3, frames, block_raw_size=16384, executor=pool) == plain

        async def read() -> bytes:
            store = MemoryStore()
            await store.put(key, plain)
            index = await read_segment_index(store, key)
            return await read_blocks(store, index, 0, index.block_count - 1, executor=pool)

        assert asyncio.run(read()) == decode_segment(key, plain)[1]


def _lz4_saves(raw: bytes) -> int:
    return len(raw) - len(lz4.block.compress(raw, store_size=False))


def _poor(raw_len: int, stored_len: int) -> bool:
    return stored_len > raw_len - (raw_len >> POOR_SHIFT)


def test_a_block_after_a_poor_one_is_stored_unless_a_sample_compresses() -> None:
    # 64 KiB blocks, one write each. LZ4 saves ~6 % of a "poor" block: the first of a
    # group is compressed (tried whole), the next ones stored untried; a text block after
    # a poor one shows on its sample that it compresses, and is; a group starts afresh.
    styles = ["poor"] * 4 + ["text"] + ["poor"] * 3 + ["poor", "poor", "text", "random", "poor"]
    b = _Batch(1)
    for i, style in enumerate(styles):
        b.add(KIND_WRITE, length=BLOCK, offset=i * BLOCK, style=style)
    frames = b.frames(5, [3, 9])
    key = segment_key(5, 1, 1, len(styles))
    obj = build_segment(5, frames)
    index, stream = decode_segment(key, obj)
    assert stream == b.expected()[1]
    codecs = ["L" if c == CODEC_LZ4 else "S" for c in index.blocks["codec"].tolist()]
    assert "".join(codecs) == "LSSSLLSS" + "LSLSS"
    assert all(_lz4_saves(p) > 0 for p, s in zip(b.payloads, styles) if s == "poor")  # LZ4 would help a little
    with ThreadPoolExecutor(2) as pool:
        assert build_segment(5, frames, executor=pool) == obj


@given(st.lists(st.sampled_from(["poor", "text", "random", "zero"]), min_size=1, max_size=40),
       st.integers(1, 3), st.sampled_from([4096, 8192, 16384]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stored_untried_blocks_only_follow_a_poor_block_of_their_group(styles, blocks_per_write,
                                                                       block_raw_size) -> None:
    b = _Batch(1)
    for i, style in enumerate(styles):
        b.add(KIND_WRITE, length=blocks_per_write * block_raw_size - 512 * (i % 3), offset=i << 20, style=style)
    frames = b.frames(2, [len(styles) // 2] if len(styles) > 1 else [])
    obj = build_segment(2, frames, block_raw_size=block_raw_size)
    key = segment_key(2, 1, 1, len(styles))
    index, stream = decode_segment(key, obj)
    assert stream == b.expected()[1]
    with ThreadPoolExecutor(2) as pool:
        assert build_segment(2, frames, block_raw_size=block_raw_size, executor=pool) == obj
    blocks = index.blocks
    for k in range(index.block_count):
        raw = stream[k * block_raw_size:(k + 1) * block_raw_size]
        if blocks["codec"][k] == CODEC_STORED and _lz4_saves(raw) > 0:
            # Stored though LZ4 would have made it smaller: never a group's first block,
            # never after a block that compressed well, never a block no larger than a sample.
            assert k % PACK_GROUP_BLOCKS, k
            assert _poor(int(blocks["raw_len"][k - 1]), int(blocks["stored_len"][k - 1])), k
            assert len(raw) > SAMPLE_BYTES, k


def test_build_refuses_bad_input() -> None:
    b = _Batch(10)
    for _ in range(4):
        b.add(KIND_WRITE, length=512)
    frames = b.frames(5, [2])
    with pytest.raises(FormatError, match="starts at seq"):
        build_segment(5, [frames[1], frames[0]])
    with pytest.raises(FormatError, match="domain"):
        build_segment(6, frames)
    with pytest.raises(ValueError, match="block_raw_size"):
        build_segment(5, frames, block_raw_size=3000)
    with pytest.raises(ValueError):
        build_segment(5, [])
    with pytest.raises(FormatError, match="payload"):
        build_segment_from_arrays(5, b.records(), b.payload()[:-1])
    recs = b.records()
    recs["seq"][2] += 1
    with pytest.raises(FormatError, match="seq"):
        build_segment_from_arrays(5, recs, b.payload())


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    async def get(self, key, offset=0, length=None, *, max_bytes=None):
        self.calls.append(("get", offset, length))
        return await super().get(key, offset, length, max_bytes=max_bytes)

    async def stat(self, key):
        self.calls.append(("stat",))
        return await super().stat(key)


def test_index_reads_take_one_get_or_two_for_a_big_index() -> None:
    b = _Batch(1)
    for i in range(2000):  # 2000 × 48 bytes of index: more than the 64 KiB guess
        b.add(KIND_WRITE, length=512, offset=512 * i, style="text")
    big = build_segment(9, b.frames(9, []), block_raw_size=1 << 16)
    big_key = segment_key(9, 1, 1, 2000)
    small = _small_segment()

    async def run() -> None:
        store = _CountingStore()
        await store.put(SMALL_KEY, small)
        await store.put(big_key, big)
        await read_segment_index(store, SMALL_KEY)
        assert store.calls == [("get", -65536, None)]
        store.calls.clear()
        index = await read_segment_index(store, big_key)
        assert [c[0] for c in store.calls] == ["get", "get"]
        assert index.record_count == 2000 and index.object_size == len(big)
        store.calls.clear()
        raw = await read_blocks(store, index, 1, 2)
        assert len(store.calls) == 1 and len(raw) == 2 << 16

    asyncio.run(run())


def test_corrupt_block_error_names_key_block_and_offset() -> None:
    obj = _small_segment()
    index, _ = decode_segment(SMALL_KEY, obj)
    at = int(index.blocks["stored_offset"][1])
    bad = bytearray(obj)
    bad[at + 3] ^= 0x40

    async def run() -> None:
        store = MemoryStore()
        await store.put(SMALL_KEY, bad)
        tail = await read_segment_index(store, SMALL_KEY)
        assert (await read_blocks(store, tail, 0, 0)) == decode_segment(SMALL_KEY, obj)[1][:4096]
        with pytest.raises(ChecksumMismatch, match=f"{SMALL_KEY}: block 1 at offset {at}: stored_xxh3"):
            await read_blocks(store, tail, 0, 2)

    asyncio.run(run())


@pytest.mark.parametrize("ctypes_lz4", [True, False])
def test_block_list_and_unpack_give_the_joined_bytes(ctypes_lz4: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_block_list, fetch_blocks + unpack_blocks (reused buffer or not, executor or
    not) and read_blocks agree, with liblz4 through ctypes and with python-lz4."""
    if ctypes_lz4 and segment_module._lz4_decompress_safe() is None:
        pytest.skip("no liblz4 to call")
    if not ctypes_lz4:
        monkeypatch.setattr(segment_module, "_lz4_decompress_safe", lambda: None)
    obj = _small_segment()
    index, stream = decode_segment(SMALL_KEY, obj)
    brs = index.block_raw_size

    async def run(pool) -> None:
        store = MemoryStore()
        await store.put(SMALL_KEY, obj)
        for a in range(index.block_count):
            for b in range(a, index.block_count):
                want = stream[a * brs : (b + 1) * brs]
                parts = await read_block_list(store, index, a, b, executor=pool)
                assert [len(p) for p in parts] == index.blocks["raw_len"][a : b + 1].tolist()
                assert b"".join(parts) == want == await read_blocks(store, index, a, b, executor=pool)
                stored = await fetch_blocks(store, index, a, b)
                for out in (None, bytearray(brs)):
                    got = b"".join(bytes(p) for p in unpack_blocks(index, a, b, stored, out=out))
                    assert got == want

    asyncio.run(run(None))
    with ThreadPoolExecutor(2) as pool:
        asyncio.run(run(pool))


@pytest.mark.parametrize("ctypes_lz4", [True, False])
def test_unpack_blocks_checks_each_block_before_yielding_it(ctypes_lz4: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if ctypes_lz4 and segment_module._lz4_decompress_safe() is None:
        pytest.skip("no liblz4 to call")
    if not ctypes_lz4:
        monkeypatch.setattr(segment_module, "_lz4_decompress_safe", lambda: None)
    obj = _small_segment()
    index, stream = decode_segment(SMALL_KEY, obj)
    first = int(index.blocks["stored_offset"][0])
    last = index.block_count - 1
    end = int(index.blocks["stored_offset"][-1]) + int(index.blocks["stored_len"][-1])
    at = int(index.blocks["stored_offset"][1])
    bad = bytearray(obj[first:end])
    bad[at - first + 1] ^= 0x01
    blocks = unpack_blocks(index, 0, last, bytes(bad))
    assert bytes(next(blocks)) == stream[: index.block_raw_size]
    with pytest.raises(ChecksumMismatch, match=f"block 1 at offset {at}: stored_xxh3"):
        next(blocks)
    with pytest.raises(TruncatedError, match=f"block {last} at offset .*stored_len is"):
        list(unpack_blocks(index, 0, last, obj[first : end - 1]))
    with pytest.raises(ValueError, match="not in 0.."):
        list(unpack_blocks(index, 0, last + 1, obj[first:end]))
    # LZ4 itself refusing (reachable only with a matching stored_xxh3) is a FormatError.
    lz4_row = int(np.flatnonzero(index.blocks["codec"] == CODEC_LZ4)[0])
    row = index.blocks[lz4_row : lz4_row + 1].tolist()[0]
    junk = b"\xff" * 64
    forged = (row[0], len(junk), row[2], xxhash.xxh3_64_intdigest(junk), *row[4:])
    with pytest.raises(FormatError, match=f"block {lz4_row} at offset .*LZ4 block does not decompress"):
        segment_module._unpack_block(SMALL_KEY, lz4_row, forged, memoryview(junk), bytearray(row[2]))
    raw_len = row[2]
    stored = memoryview(obj)[row[0] : row[0] + row[1]]
    out = bytearray(raw_len + 100)
    raw = segment_module.lz4_decompress(stored, raw_len, out=out)
    assert bytes(raw) == stream[lz4_row * index.block_raw_size :][:raw_len]
    assert raw.obj is out if isinstance(raw, memoryview) else segment_module._lz4_decompress_safe() is None


def test_records_view_is_readonly_and_rows_for_seqs_clips() -> None:
    index, _ = decode_segment(SMALL_KEY, _small_segment())
    assert not index.records.flags.writeable and not index.blocks.flags.writeable
    assert index.rows_for_seqs(0, 101)["seq"].tolist() == [100, 101]
    assert index.rows_for_seqs(110, 10**6)["seq"].tolist() == [110]
    assert len(index.rows_for_seqs(200, 300)) == 0
    assert empty_records(0).dtype == RECORD_DTYPE
