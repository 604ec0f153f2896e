"""Base-image chunks and manifests (docs/FORMAT.md §6): round trips and every corruption."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.base_image import (
    _CHUNK, _CHUNK2, _MANIFEST, CHUNK_SIZE_MIN, CODEC_LZ4, CODEC_STORED, SUB_BLOCK_BYTES, SUB_BLOCK_DTYPE,
    ZERO_HASH, chunk_head_bytes, decode_chunk, decode_chunk_head, decode_manifest, encode_chunk, encode_chunk_v1,
    encode_manifest, is_zero, xxh3_128,
)
from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.layout import base_manifest_key, chunk_key, parse_chunk_key

MKEY = base_manifest_key(7, 1, 1000, 2)


def _codecs(obj: bytes) -> list[int]:
    """The codec of each sub-block of a version-2 chunk."""
    count = struct.unpack_from("<I", obj, 32)[0]
    return np.frombuffer(obj, SUB_BLOCK_DTYPE, count, 64)["codec"].tolist()


def test_header_layouts_match_the_spec_tables() -> None:
    assert _CHUNK.size == 64 and _MANIFEST.size == 64
    raw = _CHUNK.pack(b"CDPK", 1, 2, 3, 4, b"h" * 16, 5, b"r" * 16, 6)
    assert raw[6:8] == b"\2\0" and raw[8:12] == struct.pack("<I", 3) and raw[12:16] == struct.pack("<I", 4)
    assert raw[16:32] == b"h" * 16 and raw[32:40] == struct.pack("<Q", 5) and raw[40:56] == b"r" * 16
    raw = _CHUNK2.pack(b"CDPK", 2, 0, 3, 4, b"h" * 16, 5, 6, 7, 8, 9)
    assert raw[8:12] == struct.pack("<I", 3) and raw[12:16] == struct.pack("<I", 4) and raw[16:32] == b"h" * 16
    assert raw[32:36] == struct.pack("<I", 5) and raw[36:40] == struct.pack("<I", 6)
    assert raw[40:48] == struct.pack("<Q", 7) and raw[48:56] == struct.pack("<Q", 8)
    entry = np.array([(1, 2, 3, 4, 5, 6)], dtype=SUB_BLOCK_DTYPE).tobytes()
    assert entry == struct.pack("<QIHHQQ", 1, 2, 3, 4, 5, 6)
    raw = _MANIFEST.pack(b"CDPB", 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert raw[12:16] == struct.pack("<I", 3) and raw[16:24] == struct.pack("<Q", 4)
    assert raw[32:36] == struct.pack("<I", 6) and raw[36:40] == struct.pack("<I", 7)
    assert raw[40:48] == struct.pack("<Q", 8) and raw[56:64] == struct.pack("<Q", 10)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["random", "text", "sparse"]), st.integers(1, 256 << 10), st.integers(0, 2**32))
def test_chunk_round_trip(style, size, seed) -> None:
    rng = np.random.default_rng(seed)
    if style == "random":
        raw = rng.bytes(size)
    elif style == "text":
        raw = (b"chunk %d " % seed * (size // 6 + 1))[:size]
    else:
        buf = bytearray(size)
        buf[int(rng.integers(0, size))] = 1
        raw = bytes(buf)
    h, obj = encode_chunk(raw)
    assert h == xxh3_128(raw) == xxhash.xxh3_128_intdigest(raw).to_bytes(16, "little")
    key = chunk_key(h)
    assert decode_chunk(key, obj, parse_chunk_key(key)) == raw
    assert decode_chunk(key, obj, None) == raw
    if style == "random" and size > 64:
        assert set(_codecs(obj)) == {CODEC_STORED} and len(obj) == chunk_head_bytes(size) + size


def test_all_zero_chunks_are_never_stored() -> None:
    with pytest.raises(ValueError, match="all-zero"):
        encode_chunk(bytes(4096))
    with pytest.raises(ValueError):
        encode_chunk(b"")


@pytest.mark.parametrize("n", [0, 1, 7, 8, 4095, 4096, 4097, 1 << 20])
def test_is_zero(n) -> None:
    assert is_zero(bytes(n))
    assert is_zero(memoryview(bytearray(n)))
    assert is_zero(np.zeros(n // 8, dtype=np.uint64))
    for pos in {0, n // 2, n - 1} if n else ():
        buf = bytearray(n)
        buf[pos] = 0x80
        assert not is_zero(buf)


def _chunks() -> list[tuple[str, bytes, bytes]]:
    out = []
    for raw in ((b"compressible chunk " * 200)[:3000], np.random.default_rng(3).bytes(700)):
        h, obj = encode_chunk(raw)
        out.append((chunk_key(h), obj, h))
    return out


def test_chunk_codecs_are_both_exercised() -> None:
    assert [_codecs(obj) for _, obj, _ in _chunks()] == [[CODEC_LZ4], [CODEC_STORED]]


@pytest.mark.parametrize("which", [0, 1])
def test_every_chunk_byte_flip_and_truncation_is_detected(which) -> None:
    key, obj, h = _chunks()[which]
    buf = bytearray(obj)
    for pos in range(len(buf)):
        for mask in (0x01, 0xFF):
            buf[pos] ^= mask
            with pytest.raises(FormatError):
                decode_chunk(key, buf, h)
            buf[pos] ^= mask
    for n in range(len(obj)):
        with pytest.raises(FormatError):
            decode_chunk(key, obj[:n], h)
    with pytest.raises(FormatError):
        decode_chunk(key, obj + b"\0", h)


def test_chunk_under_the_wrong_hash_is_refused() -> None:
    (key, obj, h), (_, _, other) = _chunks()
    with pytest.raises(FormatError, match="expected"):
        decode_chunk(key, obj, other)


def test_chunk_with_a_resummed_but_wrong_raw_hash_is_refused() -> None:
    """A header that is self-consistent but names other content: the xxh3_128 check catches it."""
    key, obj, h = _chunks()[0]
    buf = bytearray(obj)
    buf[16] ^= 1
    struct.pack_into("<Q", buf, 56, xxhash.xxh3_64_intdigest(bytes(buf[:56])))
    bad_hash = bytes(buf[16:32])
    with pytest.raises(ChecksumMismatch, match="xxh3_128"):
        decode_chunk(key, buf, bad_hash)


# --------------------------------------------------------------------------- sub-blocks (version 2)


def _raw(style: str, size: int, seed: int) -> bytes:
    """Chunk content: incompressible, text, or random runs between zero runs (so that
    some sub-blocks are all zeros, some stored, some LZ4); never all zeros."""
    rng = np.random.default_rng(seed)
    if style == "random":
        raw = bytearray(rng.bytes(size))
    elif style == "text":
        raw = bytearray((b"chunk %d " % seed * (size // 6 + 1))[:size])
    else:
        raw = bytearray(size)
        for _ in range(int(rng.integers(1, 6))):
            a = int(rng.integers(0, size))
            n = int(rng.integers(1, 3 * SUB_BLOCK_BYTES))
            raw[a : a + n] = rng.bytes(len(raw[a : a + n]))
    if not any(raw):
        raw[-1] = 1
    return bytes(raw)


def _partial(key: str, obj: bytes, h: bytes, raw_len: int, start: int, end: int) -> bytes:
    """Raw bytes ``[start, end)`` as a partial reader gets them: the head, then the span."""
    table = decode_chunk_head(key, obj[: chunk_head_bytes(raw_len)], h, raw_len)
    assert table is not None
    first, last = table.blocks_for(start, end)
    offset, length = table.span(first, last)
    raw = table.decode(first, last, obj[offset : offset + length])
    return bytes(raw[start - first * SUB_BLOCK_BYTES : end - first * SUB_BLOCK_BYTES])


_STYLES = st.sampled_from(["random", "text", "runs"])


@settings(max_examples=60, deadline=None)
@given(_STYLES, st.integers(1, 5 * SUB_BLOCK_BYTES + 100), st.integers(0, 2**32), st.data())
def test_sub_block_round_trip_whole_and_partial(style, size, seed, data) -> None:
    raw = _raw(style, size, seed)
    h, obj = encode_chunk(raw)
    key = chunk_key(h)
    assert struct.unpack_from("<HH", obj, 4) == (2, 0) and h == xxh3_128(raw)
    assert decode_chunk(key, obj, h) == raw and decode_chunk(key, obj, None) == raw
    for _ in range(3):
        start = data.draw(st.integers(0, size - 1))
        end = data.draw(st.integers(start + 1, size))
        assert _partial(key, obj, h, size, start, end) == raw[start:end]
    codecs = _codecs(obj)
    assert len(codecs) == -(-size // SUB_BLOCK_BYTES)
    if style == "random" and size > 64:
        assert set(codecs) == {CODEC_STORED}


def test_sub_blocks_mix_codecs_and_a_zero_sub_block_compresses() -> None:
    raw = np.random.default_rng(1).bytes(SUB_BLOCK_BYTES) + bytes(SUB_BLOCK_BYTES) + b"x" * 100
    h, obj = encode_chunk(raw)
    assert _codecs(obj) == [CODEC_STORED, CODEC_LZ4, CODEC_LZ4]
    assert len(obj) < chunk_head_bytes(len(raw)) + SUB_BLOCK_BYTES + 1000
    assert _partial(chunk_key(h), obj, h, len(raw), SUB_BLOCK_BYTES + 5, len(raw)) == raw[SUB_BLOCK_BYTES + 5 :]


@settings(max_examples=25, deadline=None)
@given(_STYLES, st.integers(0, 2**32))
def test_version_1_chunks_still_decode(style, seed) -> None:
    raw = _raw(style, 3 * SUB_BLOCK_BYTES + 17, seed)
    h, obj = encode_chunk_v1(raw)
    assert struct.unpack_from("<H", obj, 4)[0] == 1
    assert decode_chunk(chunk_key(h), obj, h) == raw
    assert decode_chunk_head(chunk_key(h), obj[: chunk_head_bytes(len(raw))], h, len(raw)) is None


_FLIP_SIZE = 2 * SUB_BLOCK_BYTES + 3000  # three sub-blocks: stored, LZ4, a short last one
_FLIP_CASES = {
    style: encode_chunk(_raw(style, _FLIP_SIZE, 5)) for style in ("random", "runs", "text")
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_FLIP_CASES)), st.data(), st.sampled_from([0x01, 0x80, 0xFF]))
def test_any_flipped_byte_is_detected_by_whole_and_partial_reads(style, data, mask) -> None:
    h, obj = _FLIP_CASES[style]
    key = chunk_key(h)
    pos = data.draw(st.integers(0, len(obj) - 1))
    bad = bytearray(obj)
    bad[pos] ^= mask
    with pytest.raises(FormatError, match=key):
        decode_chunk(key, bad, h)
    head = chunk_head_bytes(_FLIP_SIZE)
    table = decode_chunk_head(key, obj, h, _FLIP_SIZE)
    if pos < head:  # the header or the table: any partial read checks them
        start = data.draw(st.integers(0, _FLIP_SIZE - 1))
        end = start + 1
    else:  # a sub-block: a partial read that fetches it
        k = int(np.searchsorted(table.entries["stored_offset"], pos, side="right")) - 1
        start = k * SUB_BLOCK_BYTES + data.draw(st.integers(0, table.block_raw_len(k) - 1))
        end = data.draw(st.integers(start + 1, _FLIP_SIZE))
    with pytest.raises(FormatError, match=key):
        _partial(key, bytes(bad), h, _FLIP_SIZE, start, end)


def test_partial_reads_refuse_a_short_head_or_span_and_the_wrong_length() -> None:
    h, obj = _FLIP_CASES["runs"]
    key = chunk_key(h)
    head = chunk_head_bytes(_FLIP_SIZE)
    for n in (0, 5, 63, 64, head - 1):
        with pytest.raises(FormatError):
            decode_chunk_head(key, obj[:n], h, _FLIP_SIZE)
    with pytest.raises(FormatError, match="raw_len"):
        decode_chunk_head(key, obj[:head], h, _FLIP_SIZE - 512)
    table = decode_chunk_head(key, obj[:head], h, _FLIP_SIZE)
    offset, length = table.span(1, 2)
    with pytest.raises(TruncatedError, match="sub-blocks 1..2"):
        table.decode(1, 2, obj[offset : offset + length - 1])
    with pytest.raises(FormatError, match="expected"):
        decode_chunk_head(key, obj[:head], _FLIP_CASES["text"][0], _FLIP_SIZE)


def test_a_resummed_table_that_breaks_its_rules_is_refused() -> None:
    """A table whose checksums were recomputed but whose entries are not contiguous: the
    structural checks name the entry and field."""
    h, obj = _FLIP_CASES["runs"]
    key = chunk_key(h)
    bad = bytearray(obj)
    struct.pack_into("<Q", bad, 64 + 32, struct.unpack_from("<Q", bad, 64 + 32)[0] + 1)  # entry 1's offset
    head = chunk_head_bytes(_FLIP_SIZE)
    struct.pack_into("<Q", bad, 40, xxhash.xxh3_64_intdigest(bytes(bad[64:head])))
    struct.pack_into("<Q", bad, 56, xxhash.xxh3_64_intdigest(bytes(bad[:56])))
    with pytest.raises(FormatError, match="table entry 1 at offset 96: stored_offset"):
        decode_chunk(key, bad, h)


# --------------------------------------------------------------------------- manifests


def _hashes(n: int, seed: int = 0) -> np.ndarray:
    rows = np.frombuffer(np.random.default_rng(seed).bytes(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    rows[::3] = 0  # every third chunk is all zeros
    return rows


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 4000), st.integers(16, 20), st.integers(0, 2**32))
def test_manifest_round_trip(sectors, log_chunk, seq) -> None:
    disk_size = sectors * 512 * 37
    chunk_size = 1 << log_chunk
    n = -(-disk_size // chunk_size)
    hashes = _hashes(n, seq)
    key = base_manifest_key(3, 1, seq, 1)
    m = decode_manifest(key, encode_manifest(3, 1, seq, disk_size, chunk_size, hashes))
    assert (m.domain, m.disk, m.seq, m.disk_size, m.chunk_size) == (3, 1, seq, disk_size, chunk_size)
    assert np.array_equal(m.hashes, hashes) and m.chunk_count == n
    assert np.array_equal(m.zero_mask(), ~hashes.any(axis=1))
    if n:
        assert sum(m.chunk_len(i) for i in range(n)) == disk_size
        assert m.hash_of(0) == ZERO_HASH


def test_manifest_accepts_v16_and_s16_rows() -> None:
    rows = _hashes(5)
    a = encode_manifest(7, 2, 1000, 5 * CHUNK_SIZE_MIN, CHUNK_SIZE_MIN, rows)
    assert encode_manifest(7, 2, 1000, 5 * CHUNK_SIZE_MIN, CHUNK_SIZE_MIN, rows.view("V16").ravel()) == a
    assert encode_manifest(7, 2, 1000, 5 * CHUNK_SIZE_MIN, CHUNK_SIZE_MIN, rows.view("S16").ravel()) == a


def test_manifest_encode_refuses_bad_geometry() -> None:
    with pytest.raises(ValueError, match="hashes"):
        encode_manifest(7, 2, 1000, 5 * CHUNK_SIZE_MIN, CHUNK_SIZE_MIN, _hashes(4))
    with pytest.raises(ValueError, match="chunk_size"):
        encode_manifest(7, 2, 1000, 3 << 16, 3 << 16, _hashes(1))
    with pytest.raises(ValueError, match="disk_size"):
        encode_manifest(7, 2, 1000, 1000, CHUNK_SIZE_MIN, _hashes(1))
    with pytest.raises(TypeError):
        encode_manifest(7, 2, 1000, CHUNK_SIZE_MIN, CHUNK_SIZE_MIN, np.zeros((1, 8), np.uint8))


def test_every_manifest_byte_flip_and_truncation_is_detected() -> None:
    disk_size = 9 * CHUNK_SIZE_MIN + 512
    obj = encode_manifest(7, 2, 1000, disk_size, CHUNK_SIZE_MIN, _hashes(10))
    decode_manifest(MKEY, obj)
    buf = bytearray(obj)
    for pos in range(len(buf)):
        for mask in (0x01, 0xFF):
            buf[pos] ^= mask
            with pytest.raises(FormatError):
                decode_manifest(MKEY, buf)
            buf[pos] ^= mask
    for n in range(len(obj)):
        with pytest.raises(FormatError):
            decode_manifest(MKEY, obj[:n])
    with pytest.raises(TruncatedError):
        decode_manifest(MKEY, obj[:-1])
    with pytest.raises(FormatError):
        decode_manifest(MKEY, obj + b"\0" * 16)


def test_manifest_must_match_its_key() -> None:
    obj = encode_manifest(7, 2, 1000, CHUNK_SIZE_MIN, CHUNK_SIZE_MIN, _hashes(1))
    with pytest.raises(FormatError, match="key"):
        decode_manifest(base_manifest_key(7, 1, 1001, 2), obj)
    with pytest.raises(FormatError):
        decode_manifest("not/a/manifest", obj)
