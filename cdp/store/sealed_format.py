"""The sealed object format of FORMAT.md §19, as pure functions.

A sealed object is an envelope (64 bytes: key id, a random salt, the plaintext length,
its own xxh3), the plaintext cut into pages of ``PAGE_BYTES``, each AES-256-GCM with its
own tag, and the envelope again at the end. A page's nonce is its index; its key is the
object's own (derived from the data key and the salt); its associated data binds the
envelope, the object's key (name), the page index and whether it is the last page — so a
page cannot be changed, dropped, reordered or moved to another object or position
unnoticed.

``seal`` makes a sealed object, ``open_range`` opens any plaintext range of one from its
pages' bytes, and sizes go both ways without reading anything (``sealed_size``,
``plain_size``). The store that seals every object it puts and opens every object it
gets: ``cdp.store.crypt``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cdp.errors import IntegrityError
from cdp.store.base import Bytes
from cdp.store.storekeys import SALT_BYTES, StoreKey
from cdp.summed import SEALED_MAGIC, SUMMED, pack_summed

VERSION = 1
PAGE_SHIFT = 16  # §19.2: 64 KiB pages in version 1 (another size is another version)
PAGE_BYTES = 1 << PAGE_SHIFT
TAG_BYTES = 16  # AES-GCM tag
ENVELOPE_BYTES = 64
SEALED_PAGE_BYTES = PAGE_BYTES + TAG_BYTES
# §19.1: envelope = magic, version, page_shift, flags, key_id, salt, plain_len, reserved, xxh3.
ENVELOPE = struct.Struct("<4sHBB16s16sQQQ")
assert ENVELOPE.size == ENVELOPE_BYTES, "FORMAT.md §19.1"
ENVELOPE_ZERO = {"flags": (7, 1), "reserved": (48, 8)}
_AAD_TAIL = struct.Struct("<QB")  # §19.3: page index, last-page flag
_NONCE = struct.Struct("<Q4x")  # §19.3: the page index, 12 bytes


def page_count(plain_len: int) -> int:
    """Pages of a sealed object: an empty object still has one (empty) page, which
    carries the last-page tag, so truncation to the envelope is detected."""
    return max(1, -(-plain_len // PAGE_BYTES))


def sealed_size(plain_len: int) -> int:
    """§19.2: the size of the sealed object of ``plain_len`` bytes."""
    return 2 * ENVELOPE_BYTES + plain_len + TAG_BYTES * page_count(plain_len)


def plain_size(size: int) -> int | None:
    """The plaintext size of a sealed object of ``size`` bytes; None when no sealed object
    has that size."""
    rest = size - 2 * ENVELOPE_BYTES
    if rest < TAG_BYTES:
        return None
    full, last = divmod(rest, SEALED_PAGE_BYTES)
    if last == 0:
        return full * PAGE_BYTES
    if last < TAG_BYTES or (last == TAG_BYTES and full > 0):
        return None  # a partial tag, or an empty page after full ones: never written
    return full * PAGE_BYTES + last - TAG_BYTES


def sealed_bound(max_bytes: int | None) -> int | None:
    """The inner store's bound for a plaintext bound: a sealed object of at most
    ``max_bytes`` of plaintext is at most this large (``sealed_size`` grows with it)."""
    return None if max_bytes is None else sealed_size(max_bytes)


def page_offset(index: int) -> int:
    """Object offset of sealed page ``index``."""
    return ENVELOPE_BYTES + index * SEALED_PAGE_BYTES


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed, checksummed envelope (§19.1) and the AEAD of its object."""

    raw: bytes  # the 64 bytes as stored
    key: StoreKey
    plain_len: int
    aead: AESGCM

    @property
    def pages(self) -> int:
        return page_count(self.plain_len)

    @property
    def size(self) -> int:
        return sealed_size(self.plain_len)

    def page_len(self, index: int) -> int:
        """Plaintext bytes of page ``index``."""
        return min(PAGE_BYTES, self.plain_len - index * PAGE_BYTES)


def summed_ok(mv: memoryview) -> bool:
    """Whether the 64 bytes at the start of ``mv`` carry their own xxh3 (§0)."""
    return xxhash.xxh3_64_intdigest(mv[:SUMMED]) == int.from_bytes(mv[SUMMED:ENVELOPE_BYTES], "little")


def _aad(envelope: bytes, name: bytes, index: int, last: bool) -> bytes:
    """§19.3: the envelope's first 56 bytes, the page index, the last-page flag, the key."""
    return b"".join((envelope[:56], _AAD_TAIL.pack(index, last), name))


def seal(key: StoreKey, name: str, data: Bytes, salt: bytes | None = None,
         into: bytearray | None = None) -> tuple[bytes, bytearray | memoryview]:
    """(envelope, sealed object) of ``data`` stored under ``name`` with ``key`` (§19).
    Pages are sealed into one buffer of the final size (no per-page objects, no join):
    a new ``bytearray``, or the start of ``into`` when it is large enough (a view)."""
    view = memoryview(data).cast("B")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    envelope = pack_summed(ENVELOPE, SEALED_MAGIC, VERSION, PAGE_SHIFT, 0, key.key_id, salt, len(view), 0)
    aead = key.object_aead(salt)
    count = page_count(len(view))
    encoded = name.encode("ascii")
    size = sealed_size(len(view))
    if into is not None and len(into) >= size:
        out: bytearray | memoryview = memoryview(into)[:size]
    else:
        out = bytearray(size)
    mv = memoryview(out)
    mv[:ENVELOPE_BYTES] = envelope
    mv[-ENVELOPE_BYTES:] = envelope
    for index in range(count):
        page = view[index * PAGE_BYTES : (index + 1) * PAGE_BYTES]
        at = page_offset(index)
        aead.encrypt_into(_NONCE.pack(index), page, _aad(envelope, encoded, index, index == count - 1),
                          mv[at : at + len(page) + TAG_BYTES])
    return envelope, out


def open_range(env: Envelope, name: str, where: str, sealed: memoryview, start: int, end: int,
               out: Bytes | None = None) -> bytearray | memoryview:
    """Plaintext ``[start, end)`` (``0 <= start < end <= plain_len``, or ``0, 0`` for an empty
    object, whose one empty page is still checked) from the sealed bytes of
    its pages (``sealed`` starts at the first one's offset; anything after the last is
    ignored). Whole pages are opened straight into the result; only a page cut by the
    range goes through a buffer of its own, so a large read is not copied again.

    ``out``: a writable buffer of at least ``end - start`` bytes to open into (the result
    is then a view of its start); else a fresh ``bytearray``. On an error, what was
    written into ``out`` is unchecked and must not be used."""
    encoded = name.encode("ascii")
    first = start // PAGE_BYTES
    last = (end - 1) // PAGE_BYTES if end > start else first
    if out is None:
        result = out = bytearray(end - start)
        mv = memoryview(out)
    else:
        mv = memoryview(out).cast("B")[: end - start]
        if len(mv) != end - start or mv.readonly:
            raise ValueError(f"open_range: a writable buffer of {end - start} bytes is needed, not {len(mv)}")
        result = mv
    # The associated data and nonce of every page differ only in the page index and
    # last-page flag: one buffer each, patched per page (§19.3).
    aad = bytearray(b"".join((env.raw[:56], bytes(_AAD_TAIL.size), encoded)))
    nonce = bytearray(_NONCE.size)
    pages, plain_total, decrypt_into = env.pages, env.plain_len, env.aead.decrypt_into
    at = 0
    for index in range(first, last + 1):
        page_start = index * PAGE_BYTES
        plain_len = min(PAGE_BYTES, plain_total - page_start)
        stored = plain_len + TAG_BYTES
        piece = sealed[at : at + stored]
        if len(piece) != stored:
            raise IntegrityError(f"{where}: page {index} at offset {page_offset(index)}: {len(piece)} bytes, the "
                                 f"envelope promises {stored}: the object is truncated")
        lo, hi = max(start, page_start), min(end, page_start + plain_len)
        whole = lo == page_start and hi == page_start + plain_len
        target = mv[lo - start : hi - start] if whole else memoryview(bytearray(plain_len))
        _AAD_TAIL.pack_into(aad, 56, index, index == pages - 1)
        _NONCE.pack_into(nonce, 0, index)
        try:
            decrypt_into(bytes(nonce), piece, aad, target)
        except InvalidTag:
            raise IntegrityError(f"{where}: page {index} at offset {page_offset(index)}: authentication failed (a "
                                 f"byte was changed, or the page was moved from another object or place)") from None
        if not whole:
            mv[lo - start : hi - start] = target[lo - page_start : hi - page_start]
        at += stored
    return result
