"""Base images: content-addressed chunks and per-disk manifests (FORMAT.md §6).

A base image is a full copy of one disk at a seq. The disk is cut into fixed-size
chunks; each chunk that is not all zeros is stored once under the hex of its
``xxh3_128`` (``cdp.layout.chunk_key``), and a manifest lists the chunk hashes of the
disk in order, sixteen zero bytes standing for an all-zero chunk (never stored).

This module is the codec only: ``encode_chunk``/``decode_chunk``,
``encode_manifest``/``decode_manifest`` and ``is_zero``. Every check follows the rule of
§0: a checksum is verified right after the bytes are read, before a field is trusted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash

from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.layout import parse_base_manifest_key
from cdp.summed import checked_body, pack_summed, unpack_summed

CHUNK_MAGIC = b"CDPK"
MANIFEST_MAGIC = b"CDPB"
VERSION = 1
CODEC_STORED = 0  # §6.1
CODEC_LZ4 = 1  # §6.1
CHUNK_SIZE_MIN = 64 << 10  # §6.2
CHUNK_SIZE_MAX = 64 << 20  # §6.2
CHUNK_SIZE_DEFAULT = 4 << 20  # §6.2
HASH_BYTES = 16
ZERO_HASH = bytes(HASH_BYTES)  # §6.2: the manifest entry of an all-zero chunk
SECTOR = 512

# FORMAT.md §6.1: chunk header, 64 bytes; header_xxh3 (last field) covers [0, 56).
_CHUNK = struct.Struct("<4sHHII16sQ16sQ")
assert _CHUNK.size == 64, "FORMAT.md §6.1"
_CHUNK_ZERO = {"reserved": (40, 16)}  # must be zero: {name: (offset, size)}
# FORMAT.md §6.2: manifest header, 64 bytes; header_xxh3 (last field) covers [0, 56).
_MANIFEST = struct.Struct("<4sHHIIQQIIQQQ")
assert _MANIFEST.size == 64, "FORMAT.md §6.2"
_MANIFEST_ZERO = {"flags": (6, 2), "reserved": (48, 8)}  # must be zero: {name: (offset, size)}
HEADER_SIZE = 64

# The first bytes is_zero looks at before it scans the rest: non-zero data almost
# always fails here, so a random chunk costs one small read, not a full pass.
_ZERO_PROBE_BYTES = 4096


def xxh3_128(raw: bytes | bytearray | memoryview) -> bytes:
    """``xxh3_128(raw)`` as the 16 little-endian bytes FORMAT.md §0 stores."""
    return xxhash.xxh3_128_intdigest(raw).to_bytes(HASH_BYTES, "little")


def is_zero(buf: bytes | bytearray | memoryview | np.ndarray) -> bool:
    """True when every byte of ``buf`` is zero (numpy: a probe, then u64 words)."""
    a = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.view(np.uint8).ravel()
    if a[:_ZERO_PROBE_BYTES].any():
        return False
    words = len(a) // 8
    if a[words * 8 :].any():
        return False
    return not a[: words * 8].view(np.uint64).any()


# --------------------------------------------------------------------------- chunks


def encode_chunk(raw: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """(hash16, object) of one chunk (§6.1): LZ4 block when smaller, else stored.

    ``hash16`` is ``xxh3_128(raw)`` as stored; the key is ``cdp.layout.chunk_key(hash16)``.
    An all-zero chunk is never stored: the caller checks ``is_zero`` first.
    """
    mv = memoryview(raw).cast("B")
    if not 1 <= len(mv) <= CHUNK_SIZE_MAX:
        raise ValueError(f"a chunk holds 1..{CHUNK_SIZE_MAX} bytes, got {len(mv)}")
    if is_zero(mv):
        raise ValueError("an all-zero chunk is never stored (FORMAT.md §6.1)")
    h = xxh3_128(mv)
    packed = lz4.block.compress(mv, store_size=False)
    codec, stored = (CODEC_LZ4, packed) if len(packed) < len(mv) else (CODEC_STORED, mv)
    header = pack_summed(
        _CHUNK, CHUNK_MAGIC, VERSION, codec, len(mv), len(stored), h,
        xxhash.xxh3_64_intdigest(stored), bytes(16),
    )
    return h, header + bytes(stored)


def decode_chunk(name: str, obj: bytes | bytearray | memoryview, expected_hash: bytes | None) -> bytes:
    """Verify a chunk object (§6.1) and return its raw bytes.

    ``name`` (the key) is used in messages; ``expected_hash`` (16 bytes, the key's or
    the manifest's) must equal the header's ``raw_xxh3_128`` when given.
    """
    mv = memoryview(obj).cast("B")
    where = f"chunk {name}"
    codec, raw_len, stored_len, raw_hash, stored_xxh3, _ = unpack_summed(
        _CHUNK, mv, where=where, magic=CHUNK_MAGIC, version=VERSION, zero=_CHUNK_ZERO
    )
    if codec not in (CODEC_STORED, CODEC_LZ4):
        raise FormatError(f"{where}: header at offset 6: unknown codec {codec}")
    if not 1 <= raw_len <= CHUNK_SIZE_MAX:
        raise FormatError(f"{where}: header at offset 8: raw_len {raw_len} not in 1..{CHUNK_SIZE_MAX}")
    if codec == CODEC_STORED and stored_len != raw_len:
        raise FormatError(f"{where}: header at offset 12: stored_len {stored_len} != raw_len {raw_len}")
    if expected_hash is not None and raw_hash != bytes(expected_hash):
        raise FormatError(
            f"{where}: header at offset 16: raw_xxh3_128 {raw_hash.hex()} is not the "
            f"expected {bytes(expected_hash).hex()}"
        )
    stored = checked_body(mv, stored_len, stored_xxh3, where=where, what="stored_xxh3",
                          header_size=HEADER_SIZE)
    if codec == CODEC_STORED:
        raw = bytes(stored)
    else:
        try:
            raw = lz4.block.decompress(stored, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as exc:
            raise FormatError(f"{where}: LZ4 data at offset 64 does not decompress") from exc
    if len(raw) != raw_len or xxh3_128(raw) != raw_hash:
        raise ChecksumMismatch(f"{where}: xxh3_128 of the {len(raw)} raw bytes is not raw_xxh3_128")
    return raw


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class Manifest:
    """A verified base manifest (§6.2): the chunks of disk ``disk`` after every record ≤ ``seq``.

    Invariant: ``hashes`` is a read-only ``(chunk_count, 16)`` uint8 array with
    ``chunk_count = ceil(disk_size / chunk_size)``; an all-zero row is an all-zero chunk.
    """

    key: str
    domain: int
    disk: int
    seq: int
    disk_size: int
    chunk_size: int
    hashes: np.ndarray

    @property
    def chunk_count(self) -> int:
        return len(self.hashes)

    def chunk_len(self, i: int) -> int:
        """Bytes of chunk ``i``: ``chunk_size`` except for a shorter last chunk."""
        return min(self.chunk_size, self.disk_size - i * self.chunk_size)

    def zero_mask(self) -> np.ndarray:
        """True for each chunk that is all zeros (not stored)."""
        return ~self.hashes.any(axis=1)

    def hash_of(self, i: int) -> bytes:
        return self.hashes[i].tobytes()


def _hash_rows(hashes: np.ndarray) -> np.ndarray:
    """Hashes as a C-contiguous (n, 16) uint8 array, from (n, 16) uint8 or V16/S16."""
    a = np.asarray(hashes)
    if a.dtype.kind in "VS" and a.dtype.itemsize == HASH_BYTES and a.ndim == 1:
        a = np.ascontiguousarray(a).view(np.uint8).reshape(-1, HASH_BYTES)
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != HASH_BYTES:
        raise TypeError(f"hashes must be (n, 16) uint8 or V16/S16, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def _check_geometry(disk_size: int, chunk_size: int) -> str | None:
    """What is wrong with a manifest's disk_size/chunk_size, or None (§6.2)."""
    if disk_size % SECTOR:
        return f"disk_size {disk_size} is not a multiple of {SECTOR}"
    if chunk_size & (chunk_size - 1) or not CHUNK_SIZE_MIN <= chunk_size <= CHUNK_SIZE_MAX:
        return f"chunk_size {chunk_size} is not a power of two in {CHUNK_SIZE_MIN}..{CHUNK_SIZE_MAX}"
    return None


def encode_manifest(
    domain: int, disk: int, seq: int, disk_size: int, chunk_size: int, hashes: np.ndarray
) -> bytes:
    """Encode a base manifest (§6.2); ``hashes`` has one row per chunk, zeros for zero chunks."""
    rows = _hash_rows(hashes)
    problem = _check_geometry(disk_size, chunk_size)
    if problem:
        raise ValueError(f"manifest to encode: {problem}")
    count = -(-disk_size // chunk_size)
    if len(rows) != count:
        raise ValueError(f"manifest to encode: {len(rows)} hashes, ceil(disk_size/chunk_size) is {count}")
    table = rows.tobytes()
    header = pack_summed(
        _MANIFEST, MANIFEST_MAGIC, VERSION, 0, domain, disk, seq, disk_size, chunk_size,
        count, xxhash.xxh3_64_intdigest(table), 0,
    )
    return header + table


def decode_manifest(key: str, data: bytes | bytearray | memoryview) -> Manifest:
    """Verify a base manifest object (§6.2) stored under ``key``, which must name it (§7)."""
    mv = memoryview(data).cast("B")
    where = f"manifest {key}"
    key_domain, _, key_seq, key_disk = parse_base_manifest_key(key)
    _, domain, disk, seq, disk_size, chunk_size, count, table_xxh3, _ = unpack_summed(
        _MANIFEST, mv, where=where, magic=MANIFEST_MAGIC, version=VERSION, zero=_MANIFEST_ZERO
    )
    problem = _check_geometry(disk_size, chunk_size)
    if problem:
        raise FormatError(f"{where}: header: {problem}")
    if count != -(-disk_size // chunk_size):
        raise FormatError(f"{where}: header at offset 36: chunk_count {count} != ceil(disk_size/chunk_size)")
    expected = HEADER_SIZE + HASH_BYTES * count
    if len(mv) != expected:
        err = TruncatedError if len(mv) < expected else FormatError
        raise err(f"{where}: {len(mv)} bytes, the header promises {expected}")
    table = mv[HEADER_SIZE:]
    if xxhash.xxh3_64_intdigest(table) != table_xxh3:
        raise ChecksumMismatch(f"{where}: table_xxh3 does not match the entries at offset 64")
    if (domain, seq, disk) != (key_domain, key_seq, key_disk):
        raise FormatError(f"{where}: header says domain {domain}, seq {seq}, disk {disk}; the key does not")
    hashes = np.frombuffer(table, dtype=np.uint8).reshape(count, HASH_BYTES).copy()
    hashes.flags.writeable = False
    return Manifest(key, domain, disk, seq, disk_size, chunk_size, hashes)
