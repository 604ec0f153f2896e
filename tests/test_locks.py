"""Lock objects (FORMAT.md §11.1): round trip, every corruption detected and named."""

from __future__ import annotations

import struct

import pytest

from cdp.errors import FormatError
from cdp.locks import KIND_RECOVERY, NO_DOMAIN, _HEADER, decode_lock, encode_lock

BODY = {"owner": "cdp recover", "host": "h", "pid": 42, "token": "ab" * 16, "created_ns": 5}
KEY = "l/recovery/00000007/" + "cd" * 16 + ".lock"


def test_header_layout_matches_the_spec_table() -> None:
    assert _HEADER.size == 64
    blob = encode_lock(KIND_RECOVERY, 7, 123, BODY)
    magic, version, kind, domain, body_len, expires = struct.unpack_from("<4sHHIIQ", blob)
    assert (magic, version, kind, domain, body_len, expires) == (b"CDPX", 1, 4, 7, len(blob) - 64, 123)


def test_round_trip_and_liveness() -> None:
    lk = decode_lock(KEY, encode_lock(KIND_RECOVERY, 7, 10_000_000_000, BODY))
    assert lk.body == BODY and lk.domain == 7 and lk.expires_ns == 10_000_000_000
    assert lk.live(10_000_000_000, skew_s=0) and not lk.live(10_000_000_001, skew_s=0)
    assert lk.live(10_000_000_001 + 10**9 - 2, skew_s=1)  # others allow for clock skew
    assert "cdp recover" in lk.describe() and KEY in lk.describe()
    assert decode_lock(KEY, encode_lock(1, NO_DOMAIN, 1, BODY)).domain == NO_DOMAIN


def test_every_flipped_byte_and_truncation_is_detected() -> None:
    blob = encode_lock(KIND_RECOVERY, 7, 123, BODY)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(FormatError, match=f"lock {KEY}"):
            decode_lock(KEY, bytes(bad))
    for n in range(len(blob)):
        with pytest.raises(FormatError):
            decode_lock(KEY, blob[:n])


def test_a_body_with_unknown_keys_is_refused() -> None:
    with pytest.raises(FormatError, match="body keys"):
        decode_lock(KEY, encode_lock(KIND_RECOVERY, 7, 1, {**BODY, "extra": 1}))
