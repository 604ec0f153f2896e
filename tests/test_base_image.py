"""Base-image chunks and manifests (docs/FORMAT.md §6): round trips and every corruption."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.base_image import (
    CHUNK_SIZE_MIN, CODEC_LZ4, CODEC_STORED, ZERO_HASH, _CHUNK, _MANIFEST, decode_chunk,
    decode_manifest, encode_chunk, encode_manifest, is_zero, xxh3_128,
)
from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.layout import base_manifest_key, chunk_key, parse_chunk_key

MKEY = base_manifest_key(7, 1, 1000, 2)


def _codec(obj: bytes) -> int:
    return struct.unpack_from("<H", obj, 6)[0]


def test_header_layouts_match_the_spec_tables() -> None:
    assert _CHUNK.size == 64 and _MANIFEST.size == 64
    raw = _CHUNK.pack(b"CDPK", 1, 2, 3, 4, b"h" * 16, 5, b"r" * 16, 6)
    assert raw[6:8] == b"\2\0" and raw[8:12] == struct.pack("<I", 3) and raw[12:16] == struct.pack("<I", 4)
    assert raw[16:32] == b"h" * 16 and raw[32:40] == struct.pack("<Q", 5) and raw[40:56] == b"r" * 16
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
        assert _codec(obj) == CODEC_STORED and len(obj) == 64 + size


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
    assert [_codec(obj) for _, obj, _ in _chunks()] == [CODEC_LZ4, CODEC_STORED]


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
