"""The shared checks of 64-byte summed headers and footers (cdp.summed, FORMAT.md §0)."""

from __future__ import annotations

import struct

import pytest
import xxhash

from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.summed import pack_summed, unpack_summed

# magic, version, flags, value, reserved (16 bytes), checksum: 4+2+2+32+16+8 = 64.
LAYOUT = struct.Struct("<4sHH32s16sQ")
ZERO = {"flags": (6, 2), "reserved": (40, 16)}


def _header(**changes: object) -> bytes:
    fields = {"magic": b"TEST", "version": 1, "flags": 0, "value": b"v" * 32, "reserved": bytes(16)}
    fields.update(changes)
    return pack_summed(LAYOUT, *fields.values())


def _unpack(buf, **kwargs):
    return unpack_summed(LAYOUT, buf, where="test obj", magic=b"TEST", version=1, zero=ZERO, **kwargs)


def _resum(buf: bytearray) -> bytes:
    struct.pack_into("<Q", buf, 56, xxhash.xxh3_64_intdigest(bytes(buf[:56])))
    return bytes(buf)


def test_round_trip_returns_the_fields_between_version_and_checksum() -> None:
    raw = _header()
    assert len(raw) == 64 and isinstance(raw, bytes)
    assert struct.unpack_from("<Q", raw, 56)[0] == xxhash.xxh3_64_intdigest(raw[:56])
    assert _unpack(raw) == (0, b"v" * 32, bytes(16))
    assert _unpack(memoryview(raw + b"body")) == (0, b"v" * 32, bytes(16))


@pytest.mark.parametrize(
    "buf,error,message",
    [
        (_header()[:63], TruncatedError, "test obj: 63 bytes, a header needs 64"),
        (_header(magic=b"XXXX"), FormatError, r"test obj: header at offset 0: magic b'XXXX', expected b'TEST'"),
        (_header(version=2), FormatError, "test obj: header at offset 4: version 2, expected 1"),
        (_header(flags=1), FormatError, "test obj: header at offset 6: flags is not zero"),
        (_header(reserved=b"\0" * 15 + b"\1"), FormatError, "test obj: header at offset 40: reserved is not zero"),
    ],
)
def test_each_check_raises_its_class_naming_where_and_offset(buf, error, message) -> None:
    with pytest.raises(error, match=f"^{message}$") as err:
        _unpack(buf)
    assert type(err.value) is error


def test_checksum_is_checked_before_any_field() -> None:
    buf = bytearray(_header())
    buf[20] ^= 1
    with pytest.raises(ChecksumMismatch, match=r"header at offset 56: header_xxh3 does not match header\[0:56\]"):
        _unpack(buf)
    buf[6] = 1  # a non-zero flag under a bad checksum is a checksum error first
    with pytest.raises(ChecksumMismatch):
        _unpack(buf)
    assert _unpack(_resum(bytearray(_header())))  # resumming an intact header is harmless


def test_every_byte_flip_is_refused() -> None:
    raw = _header()
    for pos in range(64):
        for mask in (0x01, 0x80, 0xFF):
            buf = bytearray(raw)
            buf[pos] ^= mask
            with pytest.raises(FormatError):
                _unpack(buf)


def test_offsets_count_from_at_and_what_names_the_struct() -> None:
    buf = bytearray(_header())
    buf[50] = 1
    bad = _resum(buf)
    with pytest.raises(FormatError, match="test obj: footer at offset 1040: reserved is not zero"):
        _unpack(bad, what="footer", at=1000)
    with pytest.raises(FormatError, match="test obj: footer at offset -24: reserved is not zero"):
        _unpack(bad, what="footer", at=-64)
    buf = bytearray(_header())
    buf[20] ^= 1
    with pytest.raises(ChecksumMismatch, match="footer at offset 1056: footer_xxh3 does not match footer"):
        _unpack(buf, what="footer", at=1000)


def test_fields_not_listed_as_zero_are_left_to_the_caller() -> None:
    raw = _header(flags=7)
    assert unpack_summed(LAYOUT, raw, where="x", magic=b"TEST", version=1) == (7, b"v" * 32, bytes(16))
