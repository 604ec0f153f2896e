"""Base images: content-addressed chunks and per-disk manifests (FORMAT.md §6).

A base image is a full copy of one disk at a seq. The disk is cut into fixed-size
chunks; each chunk that is not all zeros is stored once under the hex of its
``xxh3_128`` (``cdp.layout.chunk_key``), and a manifest lists the chunk hashes of the
disk in order, sixteen zero bytes standing for an all-zero chunk (never stored).

A chunk object (version 2) is cut into 64 KiB sub-blocks behind a table, so that a
reader who needs a few ranges of a chunk (a failback's delta) fetches the header and
table (``chunk_head_bytes``, ``decode_chunk_head``) and then only the sub-blocks that
cover them (``ChunkTable.span``, ``ChunkTable.decode``); ``decode_chunk`` reads a whole
object of either version.

This module is the codec: ``encode_chunk``/``decode_chunk``,
``encode_manifest``/``decode_manifest`` and ``is_zero``. Every check follows the rule of
§0: a checksum is verified right after the bytes are read, before a field is trusted.
It also holds ``put_manifest``, the one way a manifest enters the store: created, never
written over another (seeding and consolidation both use it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash

from cdp.errors import AlreadyExists, ChecksumMismatch, FormatError, NotFound, TruncatedError
from cdp.layout import parse_base_manifest_key
from cdp.segment import _lz4_decompress_safe
from cdp.store.base import ObjectStore, TooLarge, get_bounded
from cdp.summed import checked_body, pack_summed, unpack_summed

CHUNK_MAGIC = b"CDPK"
MANIFEST_MAGIC = b"CDPB"
VERSION = 1  # manifests (§6.2) and the first chunk layout (§6.1, read only)
VERSION_CHUNK = 2  # the chunk layout written (§6.1)
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
# FORMAT.md §6.1, version 2: chunk header, 64 bytes, then one table entry per sub-block.
_CHUNK2 = struct.Struct("<4sHHII16sIIQQQ")
assert _CHUNK2.size == 64, "FORMAT.md §6.1"
_CHUNK2_ZERO = {"flags": (6, 2), "reserved": (36, 4), "reserved2": (48, 8)}
SUB_BLOCK_BYTES = 64 << 10  # §6.1: raw bytes per sub-block of a version-2 chunk (the last may be shorter)
SUB_BLOCK_DTYPE = np.dtype([("stored_offset", "<u8"), ("stored_len", "<u4"), ("codec", "<u2"),
                            ("reserved", "<u2"), ("stored_xxh3", "<u8"), ("raw_xxh3", "<u8")])
assert SUB_BLOCK_DTYPE.itemsize == 32, "FORMAT.md §6.1"
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


#: A chunk's name function: raw bytes -> the 16 bytes of its name (§6.1). None means
#: ``xxh3_128``; an encrypted store names chunks with a keyed hash (§19.6).
Namer = Callable[[bytes | bytearray | memoryview], bytes] | None


def chunk_hash(raw: bytes | bytearray | memoryview, namer: Namer = None) -> bytes:
    """The 16 bytes that name the chunk ``raw`` (key, manifest entry, header, §6.1)."""
    return xxh3_128(raw) if namer is None else namer(raw)


def chunk_namer_of(store: ObjectStore) -> Namer:
    """How ``store`` names chunks: its ``chunk_namer`` (an encrypted store, §19.6), looked
    for through wrappers (``inner``); None (``xxh3_128``) for a plaintext store."""
    layer: object = store
    while layer is not None:
        namer = getattr(layer, "chunk_namer", None)
        if namer is not None:
            return namer
        layer = getattr(layer, "inner", None)
    return None


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


def encode_chunk(raw: bytes | bytearray | memoryview, namer: Namer = None) -> tuple[bytes, bytes]:
    """(hash16, object) of one chunk, version 2 (§6.1): 64 KiB sub-blocks, each LZ4
    block when smaller, else stored, behind a table that lets a reader fetch only some.

    ``hash16`` is ``chunk_hash(raw, namer)`` (``xxh3_128`` unless the store is encrypted);
    the key is ``cdp.layout.chunk_key(hash16)``. An all-zero chunk is never stored: the
    caller checks ``is_zero`` first.
    """
    mv = _chunk_raw(raw)
    count = -(-len(mv) // SUB_BLOCK_BYTES)
    table = np.zeros(count, dtype=SUB_BLOCK_DTYPE)
    stored_parts = []
    at = HEADER_SIZE + SUB_BLOCK_DTYPE.itemsize * count
    for k in range(count):
        sub = mv[k * SUB_BLOCK_BYTES : (k + 1) * SUB_BLOCK_BYTES]
        packed = lz4.block.compress(sub, store_size=False)
        codec, stored = (CODEC_LZ4, packed) if len(packed) < len(sub) else (CODEC_STORED, bytes(sub))
        table[k] = (at, len(stored), codec, 0, xxhash.xxh3_64_intdigest(stored), xxhash.xxh3_64_intdigest(sub))
        stored_parts.append(stored)
        at += len(stored)
    table_bytes = table.tobytes()
    h = chunk_hash(mv, namer)
    header = pack_summed(_CHUNK2, CHUNK_MAGIC, VERSION_CHUNK, 0, len(mv), SUB_BLOCK_BYTES, h, count, 0,
                         xxhash.xxh3_64_intdigest(table_bytes), 0)
    return h, b"".join([header, table_bytes, *stored_parts])


def encode_chunk_v1(raw: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """(hash16, object) of one chunk in version 1 (§6.1.1: one LZ4 block for the whole
    chunk). No longer written by the engine; kept so that tests can make the version-1
    objects a store may still hold."""
    mv = _chunk_raw(raw)
    h = xxh3_128(mv)
    packed = lz4.block.compress(mv, store_size=False)
    codec, stored = (CODEC_LZ4, packed) if len(packed) < len(mv) else (CODEC_STORED, mv)
    header = pack_summed(
        _CHUNK, CHUNK_MAGIC, VERSION, codec, len(mv), len(stored), h,
        xxhash.xxh3_64_intdigest(stored), bytes(16),
    )
    return h, header + bytes(stored)


def _chunk_raw(raw: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(raw).cast("B")
    if not 1 <= len(mv) <= CHUNK_SIZE_MAX:
        raise ValueError(f"a chunk holds 1..{CHUNK_SIZE_MAX} bytes, got {len(mv)}")
    if is_zero(mv):
        raise ValueError("an all-zero chunk is never stored (FORMAT.md §6.1)")
    return mv


def _version_of(mv: memoryview) -> int | None:
    """The ``version`` field of a chunk object (None: too short to hold one; the header
    checks then say what is wrong). Read before the checksum only to pick the layout
    whose checks follow: both layouts sum the same 56 bytes."""
    return struct.unpack_from("<H", mv, 4)[0] if len(mv) >= 6 else None


def decode_chunk(name: str, obj: bytes | bytearray | memoryview, expected_hash: bytes | None, *,
                 out: bytearray | None = None, namer: Namer = None, check_name: bool = True) -> bytes | memoryview:
    """Verify a whole chunk object (§6.1, version 1 or 2) and return its raw bytes.

    ``name`` (the key) is used in messages; ``expected_hash`` (16 bytes, the key's or
    the manifest's) must equal the header's ``raw_xxh3_128`` when given. Every
    sub-block of a version-2 object is verified, then ``xxh3_128`` of the whole.
    ``out``: a buffer to decode a version-2 chunk into when it is large enough (the
    result is then a view of it, valid until the caller reuses it): a fresh 4 MiB per
    chunk cost a page fault per 4 KiB, as for segment blocks (``cdp.segment._scratch``).
    ``namer``: the store's chunk names (``chunk_namer_of``), for the check of the whole;
    ``check_name`` False skips that one check, for a sealed store's object only: its seal
    binds its bytes to its key, which holds the name (FORMAT.md §19.6).
    """
    assert check_name or namer is not None, "only a sealed store's chunk may skip its name check"
    mv = memoryview(obj).cast("B")
    if _version_of(mv) == VERSION:
        return _decode_chunk_v1(name, mv, expected_hash, namer, check_name)
    table = decode_chunk_head(name, mv, expected_hash)
    assert table is not None
    size = table.stored_end
    if len(mv) != size:
        err = TruncatedError if len(mv) < size else FormatError
        raise err(f"chunk {name}: {len(mv)} bytes, the header and table promise {size}")
    raw = memoryview(out)[: table.raw_len] if out is not None and len(out) >= table.raw_len \
        else memoryview(bytearray(table.raw_len))
    table.decode_into(0, table.block_count - 1, mv[table.stored_start :], raw)
    if check_name and chunk_hash(raw, namer) != table.raw_hash:
        raise ChecksumMismatch(f"chunk {name}: {_hash_name(namer)} of the {len(raw)} raw bytes is not raw_xxh3_128")
    return raw if out is not None else raw.obj


def _hash_name(namer: Namer) -> str:
    return "xxh3_128" if namer is None else "the keyed chunk name (§19.6)"


def _decode_chunk_v1(name: str, mv: memoryview, expected_hash: bytes | None, namer: Namer = None,
                     check_name: bool = True) -> bytes:
    where = f"chunk {name}"
    codec, raw_len, stored_len, raw_hash, stored_xxh3 = _chunk_v1_header(where, mv, expected_hash)
    stored = checked_body(mv, stored_len, stored_xxh3, where=where, what="stored_xxh3",
                          header_size=HEADER_SIZE)
    if codec == CODEC_STORED:
        raw = bytes(stored)
    else:
        try:
            raw = lz4.block.decompress(stored, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as exc:
            raise FormatError(f"{where}: LZ4 data at offset 64 does not decompress") from exc
    if len(raw) != raw_len or (check_name and chunk_hash(raw, namer) != raw_hash):
        raise ChecksumMismatch(f"{where}: {_hash_name(namer)} of the {len(raw)} raw bytes is not raw_xxh3_128")
    return raw


def _chunk_v1_header(where: str, mv: memoryview, expected_hash: bytes | None) -> tuple[int, int, int, bytes, int]:
    """A version-1 chunk's 64-byte header, verified: (codec, raw_len, stored_len, raw hash, stored_xxh3)."""
    codec, raw_len, stored_len, raw_hash, stored_xxh3, _ = unpack_summed(
        _CHUNK, mv, where=where, magic=CHUNK_MAGIC, version=VERSION, zero=_CHUNK_ZERO
    )
    if codec not in (CODEC_STORED, CODEC_LZ4):
        raise FormatError(f"{where}: header at offset 6: unknown codec {codec}")
    if not 1 <= raw_len <= CHUNK_SIZE_MAX:
        raise FormatError(f"{where}: header at offset 8: raw_len {raw_len} not in 1..{CHUNK_SIZE_MAX}")
    if codec == CODEC_STORED and stored_len != raw_len:
        raise FormatError(f"{where}: header at offset 12: stored_len {stored_len} != raw_len {raw_len}")
    _check_expected(where, raw_hash, expected_hash)
    return codec, raw_len, stored_len, raw_hash, stored_xxh3


def _check_expected(where: str, raw_hash: bytes, expected_hash: bytes | None) -> None:
    if expected_hash is not None and raw_hash != bytes(expected_hash):
        raise FormatError(
            f"{where}: header at offset 16: raw_xxh3_128 {raw_hash.hex()} is not the "
            f"expected {bytes(expected_hash).hex()}"
        )


def chunk_head_bytes(raw_len: int) -> int:
    """Bytes of a version-2 chunk's header and sub-block table for ``raw_len`` raw bytes:
    what a partial reader GETs first (the manifest gives ``raw_len``)."""
    return HEADER_SIZE + SUB_BLOCK_DTYPE.itemsize * -(-raw_len // SUB_BLOCK_BYTES)


def chunk_bytes_max(chunk_len: int) -> int:
    """The largest chunk object (FORMAT.md §6.1) holding ``chunk_len`` raw bytes, of either
    version: the header, the table and each sub-block stored as it is or smaller
    (version 1: the header and one block no larger than the raw bytes). A larger object
    under a chunk's key is refused before it is read."""
    return chunk_head_bytes(chunk_len) + chunk_len


@dataclass(frozen=True)
class ChunkTable:
    """The verified header and sub-block table of a version-2 chunk (§6.1).

    Invariant: ``entries`` (read-only, ``SUB_BLOCK_DTYPE``) hold ``block_count =
    ceil(raw_len / SUB_BLOCK_BYTES)`` sub-blocks stored contiguously from
    ``stored_start`` (right after the table) to ``stored_end`` (the object's size), each
    with a known codec and a length that codec allows.
    """

    name: str
    raw_len: int
    raw_hash: bytes
    entries: np.ndarray

    @property
    def block_count(self) -> int:
        return len(self.entries)

    @property
    def stored_start(self) -> int:
        return HEADER_SIZE + SUB_BLOCK_DTYPE.itemsize * self.block_count

    @property
    def stored_end(self) -> int:
        return int(self.entries["stored_offset"][-1]) + int(self.entries["stored_len"][-1])

    def block_raw_len(self, k: int) -> int:
        return min(SUB_BLOCK_BYTES, self.raw_len - k * SUB_BLOCK_BYTES)

    def blocks_for(self, start: int, end: int) -> tuple[int, int]:
        """(first, last): the sub-blocks holding raw bytes ``[start, end)`` (``end > start``)."""
        if not 0 <= start < end <= self.raw_len:
            raise ValueError(f"chunk {self.name}: raw range [{start}, {end}) not in [0, {self.raw_len})")
        return start // SUB_BLOCK_BYTES, (end - 1) // SUB_BLOCK_BYTES

    def span(self, first: int, last: int) -> tuple[int, int]:
        """(object offset, length) of the stored bytes of sub-blocks ``first..last``."""
        if not 0 <= first <= last < self.block_count:
            raise ValueError(f"chunk {self.name}: sub-blocks {first}..{last} not in 0..{self.block_count - 1}")
        start = int(self.entries["stored_offset"][first])
        end = int(self.entries["stored_offset"][last]) + int(self.entries["stored_len"][last])
        return start, end - start

    def decode_into(self, first: int, last: int, stored: bytes | bytearray | memoryview, out: memoryview) -> None:
        """Verify sub-blocks ``first..last`` from their stored bytes (``stored``, from
        ``span(first, last)`` on: anything after is ignored) and decompress them into
        ``out``, which holds their raw bytes (``out[0]`` is sub-block ``first``'s first)."""
        src = memoryview(stored).cast("B")
        base = int(self.entries["stored_offset"][first])
        need = self.span(first, last)[1]
        if len(src) < need:
            raise TruncatedError(f"chunk {self.name}: sub-blocks {first}..{last} at offset {base}: "
                                 f"{len(src)} stored bytes, the table promises {need}")
        # liblz4 called with addresses into the two buffers, taken once: per sub-block,
        # lz4_decompress's own lookups cost more than decompressing 64 KiB (measured).
        decompress_safe = _lz4_decompress_safe()
        src_at = np.frombuffer(src, dtype=np.uint8).ctypes.data if decompress_safe and len(src) else 0
        dst_at = np.frombuffer(out, dtype=np.uint8).ctypes.data if decompress_safe and len(out) else 0
        at = 0
        for k, row in enumerate(self.entries[first : last + 1].tolist(), first):
            offset, stored_len, codec, _, stored_xxh3, raw_xxh3 = row
            a = offset - base
            part = src[a : a + stored_len]
            if xxhash.xxh3_64_intdigest(part) != stored_xxh3:
                raise ChecksumMismatch(f"chunk {self.name}: sub-block {k} at offset {offset}: stored_xxh3 "
                                       f"does not match the {stored_len} stored bytes")
            n = min(SUB_BLOCK_BYTES, self.raw_len - k * SUB_BLOCK_BYTES)
            dst = out[at : at + n]
            if codec == CODEC_STORED:
                dst[:] = part
            elif decompress_safe is not None:
                got = decompress_safe(src_at + a, dst_at + at, stored_len, n)
                if got != n:
                    raise FormatError(f"chunk {self.name}: sub-block {k} at offset {offset}: LZ4 block "
                                      f"does not decompress to {n} bytes")
            else:
                try:
                    dst[:] = lz4.block.decompress(part, uncompressed_size=n)
                except (lz4.block.LZ4BlockError, ValueError) as exc:
                    raise FormatError(f"chunk {self.name}: sub-block {k} at offset {offset}: LZ4 block "
                                      f"does not decompress to {n} bytes") from exc
            if xxhash.xxh3_64_intdigest(dst) != raw_xxh3:
                raise ChecksumMismatch(f"chunk {self.name}: sub-block {k} at offset {offset}: raw_xxh3 does not "
                                       "match the decompressed bytes")
            at += n

    def decode(self, first: int, last: int, stored: bytes | bytearray | memoryview) -> bytearray:
        """The raw bytes of sub-blocks ``first..last``, verified (see ``decode_into``)."""
        raw = bytearray(min(self.raw_len, (last + 1) * SUB_BLOCK_BYTES) - first * SUB_BLOCK_BYTES)
        self.decode_into(first, last, stored, memoryview(raw))
        return raw


def decode_chunk_head(name: str, head: bytes | bytearray | memoryview, expected_hash: bytes | None,
                      raw_len: int | None = None) -> ChunkTable | None:
    """Verify the header and sub-block table at the start of ``head`` (a chunk object's
    first ``chunk_head_bytes(raw_len)`` bytes or more) and return them; None for a
    version-1 chunk, which has no table (then only the whole object can be read).

    ``expected_hash`` as in ``decode_chunk``; ``raw_len``, when given (the manifest's
    chunk length), must equal the header's.
    """
    mv = memoryview(head).cast("B")
    if _version_of(mv) == VERSION:
        return None
    where = f"chunk {name}"
    _, raw_len_h, block_bytes, raw_hash, count, _, table_xxh3, _ = unpack_summed(
        _CHUNK2, mv, where=where, magic=CHUNK_MAGIC, version=VERSION_CHUNK, zero=_CHUNK2_ZERO
    )
    if not 1 <= raw_len_h <= CHUNK_SIZE_MAX:
        raise FormatError(f"{where}: header at offset 8: raw_len {raw_len_h} not in 1..{CHUNK_SIZE_MAX}")
    if block_bytes != SUB_BLOCK_BYTES:
        raise FormatError(f"{where}: header at offset 12: sub_block_size {block_bytes}, expected {SUB_BLOCK_BYTES}")
    if count != -(-raw_len_h // SUB_BLOCK_BYTES):
        raise FormatError(f"{where}: header at offset 32: block_count {count} != ceil(raw_len / sub_block_size)")
    _check_expected(where, raw_hash, expected_hash)
    if raw_len is not None and raw_len != raw_len_h:
        raise FormatError(f"{where}: header at offset 8: raw_len {raw_len_h}, the manifest needs {raw_len}")
    end = chunk_head_bytes(raw_len_h)
    if len(mv) < end:
        raise TruncatedError(f"{where}: {len(mv)} bytes, the header and table need {end}")
    if xxhash.xxh3_64_intdigest(mv[HEADER_SIZE:end]) != table_xxh3:
        raise ChecksumMismatch(f"{where}: table_xxh3 does not match the sub-block table at offset {HEADER_SIZE}")
    entries = np.frombuffer(mv[HEADER_SIZE:end], dtype=SUB_BLOCK_DTYPE).copy()
    entries.flags.writeable = False
    _check_table(where, entries, raw_len_h, end)
    return ChunkTable(name, raw_len_h, raw_hash, entries)


def _check_table(where: str, entries: np.ndarray, raw_len: int, stored_start: int) -> None:
    """The table's own rules (§6.1): codecs, lengths, sub-blocks contiguous after it."""
    count = len(entries)
    raw = np.full(count, SUB_BLOCK_BYTES, dtype=np.int64)
    raw[-1] = raw_len - (count - 1) * SUB_BLOCK_BYTES
    offset = entries["stored_offset"].astype(np.int64)
    length = entries["stored_len"].astype(np.int64)
    expect = stored_start + np.concatenate(([0], np.cumsum(length)[:-1]))
    bad = [
        ("codec", entries["codec"] > CODEC_LZ4, "unknown codec"),
        ("reserved", entries["reserved"] != 0, "reserved is not zero"),
        ("stored_len", length < 1, "stored_len is 0"),
        ("stored_len", (entries["codec"] == CODEC_STORED) & (length != raw), "stored_len != the raw length"),
        ("stored_len", (entries["codec"] == CODEC_LZ4) & (length >= raw), "LZ4 not smaller than the raw length"),
        ("stored_offset", offset != expect, "not right after the previous sub-block"),
    ]
    for field, mask, problem in bad:
        if mask.any():
            k = int(np.flatnonzero(mask)[0])
            at = HEADER_SIZE + SUB_BLOCK_DTYPE.itemsize * k + SUB_BLOCK_DTYPE.fields[field][1]
            raise FormatError(f"{where}: table entry {k} at offset {at}: {field}: {problem}")


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


async def chunk_stored(store: ObjectStore, key: str, hash16: bytes, chunk_size: int) -> str | None:
    """Why the chunk ``hash16`` (at most ``chunk_size`` raw bytes) must be written under
    ``key``, or None when ``store`` holds it there: what a writer that deduplicates
    (seeding, consolidation) asks before it skips an upload.

    The chunk's header and table are read back and verified (checksums, the hash they
    name), not just looked up: a HEAD that answers for an object the store does not
    hold (a caching proxy, a store still listing what a chunk sweep deleted) made the
    writer skip the upload and commit a manifest naming a chunk that was never there,
    which only a recovery found out. An object under the key that is not this chunk
    (corrupt, of another format, too large) is written over: the reason says which."""
    try:
        head = await store.get(key, 0, chunk_head_bytes(chunk_size), max_bytes=chunk_bytes_max(chunk_size))
    except NotFound:
        return "absent"
    except TooLarge as exc:
        return f"not a chunk: {exc}"
    mv = memoryview(head).cast("B")
    try:
        if decode_chunk_head(key, mv, hash16) is None:  # version 1: no table, its header only
            _chunk_v1_header(f"chunk {key}", mv[:HEADER_SIZE], hash16)
    except FormatError as exc:
        return f"not this chunk: {exc}"
    return None


#: A manifest deleted between a lost create and the read of what was found there is
#: created again at most this many times (only a retention sweep deletes manifests).
PUT_MANIFEST_ATTEMPTS_MAX = 3


async def put_manifest(store: ObjectStore, key: str, data: bytes) -> bool:
    """Create the manifest ``data`` under ``key``; a manifest is never overwritten
    (FORMAT.md §6.2, §7). True when this call created it; False when the very same bytes
    were there already (an earlier attempt whose reply was lost, a rerun). Another
    manifest under the key (the base of another writer at that seq) is left as it is:
    ``AlreadyExists`` naming the key. Why: a seed put at the key of a consolidation base
    at its ``start_seq`` replaced that base's content with its fuzzy copy before the
    catalog changed, and a recovery at that seq returned wrong bytes, every checksum
    passing."""
    for _ in range(PUT_MANIFEST_ATTEMPTS_MAX):
        try:
            await store.put(key, data, if_absent=True)
            return True
        except AlreadyExists:
            pass
        try:
            found = await get_bounded(store, key, len(data))
        except NotFound:
            continue  # gone again (a sweep): create it
        except TooLarge:  # larger than ours: other content, refused below unread
            found = b""
        if bytes(found) == bytes(data):
            return False
        raise AlreadyExists(f"base manifest {key} already exists in {store.describe()} with other content (another "
                            f"writer's base of that disk at that seq): a manifest is never overwritten")
    raise AlreadyExists(f"base manifest {key}: created and deleted again {PUT_MANIFEST_ATTEMPTS_MAX} times in a row")
