"""Summed 64-byte headers and footers (FORMAT.md §0, §2.1, §5.1, §5.5, §6.1, §6.2, §8.1).

Each starts with a 4-byte ``magic`` and a u16 ``version`` and ends with a u64 xxh3 of
the 56 bytes before it. ``pack_summed`` writes one; ``unpack_summed`` runs the checks
they share, in the §0 order (checksum before any field is trusted), and leaves the
fields between ``version`` and the checksum to the caller's own checks.
"""

from __future__ import annotations

import json
import struct

import xxhash

from cdp.errors import ChecksumMismatch, FormatError, KeyUnavailable, TruncatedError

SUMMED = 56  # the checksum covers [0, 56) and sits at [56, 64)
#: §19.1: the envelope at both ends of an encrypted object. A decoder that finds it where
#: its own magic should be reads through a store opened without a key: it says so.
SEALED_MAGIC = b"CDPN"


def pack_summed(layout: struct.Struct, *fields: object) -> bytes:
    """Pack ``fields`` (all but the last, checksum field) and append their xxh3."""
    buf = bytearray(layout.pack(*fields, 0))
    struct.pack_into("<Q", buf, SUMMED, xxhash.xxh3_64_intdigest(buf[:SUMMED]))
    return bytes(buf)


def unpack_summed(
    layout: struct.Struct,
    buf: bytes | bytearray | memoryview,
    *,
    where: str,
    magic: bytes,
    version: int,
    what: str = "header",
    at: int = 0,
    zero: dict[str, tuple[int, int]] | None = None,
) -> tuple:
    """Check the summed ``layout`` at the start of ``buf``; return the fields after ``version``.

    The returned tuple leaves out magic, version and the checksum. Raises TruncatedError
    (short ``buf``), FormatError (magic, version), ChecksumMismatch ([0, 56)), then
    FormatError if a ``zero`` field, ``{name: (offset, size)}`` (flags, reserved), is not
    zero. Messages start with ``where`` (key, peer, log position) and give the offset of
    the field: ``at`` is where the ``what`` starts (negative: from the end, as in
    ``store.get``).
    """
    mv = memoryview(buf).cast("B")
    if len(mv) < layout.size:
        raise TruncatedError(f"{where}: {len(mv)} bytes, a {what} needs {layout.size}")
    fields = layout.unpack_from(mv)

    def fail(error: type[FormatError], offset: int, problem: str) -> None:
        raise error(f"{where}: {what} at offset {at + offset}: {problem}")

    if fields[0] != magic:
        if fields[0] == SEALED_MAGIC:
            raise KeyUnavailable(
                f"{where}: the object is encrypted (key id {bytes(mv[8:24]).hex()}, FORMAT.md §19) and this "
                f"process holds no store key: set CDP_STORE_KEY or CDP_STORE_KEY_FILE")
        fail(FormatError, 0, f"magic {fields[0]!r}, expected {magic!r}")
    if fields[1] != version:
        fail(FormatError, 4, f"version {fields[1]}, expected {version}")
    if xxhash.xxh3_64_intdigest(mv[:SUMMED]) != fields[-1]:
        fail(ChecksumMismatch, SUMMED, f"{what}_xxh3 does not match {what}[0:56]")
    for name, (offset, size) in (zero or {}).items():
        if any(mv[offset : offset + size]):
            fail(FormatError, offset, f"{name} is not zero")
    return fields[2:-1]


def checked_body(buf: memoryview, body_len: int, body_xxh3: int, *, where: str, what: str,
                 header_size: int = 64) -> memoryview:
    """The ``body_len`` bytes after a header, which must be all that follows it, checked
    against ``body_xxh3`` (``what`` names that field in the message)."""
    total = header_size + body_len
    if len(buf) != total:
        err = TruncatedError if len(buf) < total else FormatError
        raise err(f"{where}: {len(buf)} bytes, the header promises {total}")
    body = buf[header_size:]
    if xxhash.xxh3_64_intdigest(body) != body_xxh3:
        raise ChecksumMismatch(f"{where}: {what} does not match the bytes at offset {header_size}")
    return body


def checked_json_body(buf: memoryview, body_len: int, body_xxh3: int, *, where: str,
                      body_len_max: int, keys: frozenset[str] | None = None,
                      header_size: int = 64) -> dict:
    """The JSON object after a summed header (lock, deployment record): ``body_len``
    within its bound (the field at offset 12), the bytes checked against ``body_xxh3``,
    then UTF-8 JSON, an object, with exactly ``keys`` when given (an unknown key means a
    newer writer, §0)."""
    if body_len > body_len_max:
        raise FormatError(f"{where}: header at offset 12: body_len {body_len} > {body_len_max}")
    raw = checked_body(buf, body_len, body_xxh3, where=where, what="body_xxh3", header_size=header_size)
    try:
        body = json.loads(str(raw, "utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{where}: the body at offset {header_size} is not UTF-8 JSON: {exc}") from exc
    if not isinstance(body, dict) or (keys is not None and set(body) != keys):
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise FormatError(f"{where}: body keys {got}, expected {sorted(keys or ())}")
    return body
