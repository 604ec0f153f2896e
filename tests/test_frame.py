"""Frame codec (docs/FORMAT.md §2): round trips, the worked example, every corruption."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings

from cdp.errors import ChecksumMismatch, FormatError, TruncatedError
from cdp.frame import HEADER_SIZE, decode_frame, decode_header, encode_frame, encode_frame_parts
from cdp.records import KIND_MARK, KIND_WRITE, RECORD_DTYPE, empty_records
from tests.frames_gen import TS0, record_batches, write_batch


def _example() -> bytes:
    records = empty_records(2)
    records[0] = (100, TS0, 4096, 512, 0, KIND_WRITE, b"\0" * 6)
    records[1] = (101, TS0, 0, 12, 0, KIND_MARK, b"\0" * 6)
    return encode_frame(7, records, b"\xab" * 512 + b"app-quiesced")


def test_worked_example():
    frame = _example()
    assert len(frame) == 668
    assert frame[:16].hex(" ") == "43 44 50 46 01 00 00 00 07 00 00 00 02 00 00 00"
    assert frame[16:32] == struct.pack("<QQ", 100, 101)
    assert frame[32:40].hex(" ") == "0c 02 00 00 00 00 00 00"
    assert frame[48:56] == bytes(8)
    assert frame[64 + 8 : 64 + 16].hex(" ") == "00 00 2a 36 fe 9c 97 17"
    assert frame[64 + 24 : 64 + 28].hex(" ") == "00 02 00 00"
    assert frame[104 + 32 : 104 + 34].hex(" ") == "02 00"
    assert frame[144:656] == b"\xab" * 512 and frame[656:] == b"app-quiesced"
    decoded = decode_frame(frame)
    assert decoded.mark_names() == [(101, "app-quiesced")]
    assert decoded.domain == 7 and decoded.first_seq == 100 and decoded.last_seq == 101


@settings(max_examples=200, deadline=None)
@given(record_batches())
def test_round_trip(batch):
    records, payload = batch
    frame = encode_frame(3, records, payload)
    decoded = decode_frame(frame)
    assert decoded.records.tobytes() == records.tobytes()
    assert bytes(decoded.payload) == payload
    starts = decoded.payload_starts()
    assert len(starts) == len(records)
    # Parts joined are the same bytes as the contiguous encoding.
    assert b"".join(bytes(p) for p in encode_frame_parts(3, records, payload)) == frame


def test_every_single_byte_flip_is_detected():
    records, payload = write_batch(10, 3, 512)
    records[1]["kind"] = KIND_MARK
    records[1]["offset"] = 0
    records[1]["length"] = 5
    payload = payload[:512] + b"mark1" + payload[1024:]
    frame = encode_frame(1, records, payload)
    for i in range(len(frame)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(frame)
            bad[i] ^= flip
            with pytest.raises(FormatError):
                decode_frame(bytes(bad))


def test_truncated_frame_is_refused_at_every_length():
    records, payload = write_batch(1, 2, 1024)
    frame = encode_frame(1, records, payload)
    for n in range(len(frame)):
        with pytest.raises(TruncatedError):
            decode_frame(frame[:n])
    with pytest.raises(FormatError, match="promises"):
        decode_frame(frame + b"\0")


def test_errors_name_the_field():
    records, payload = write_batch(1, 2, 512)
    frame = bytearray(encode_frame(1, records, payload))
    frame[0:4] = b"XXXX"
    with pytest.raises(FormatError, match="magic"):
        decode_header(frame, "peer 127.0.0.1:5000")
    frame = bytearray(encode_frame(1, records, payload))
    frame[HEADER_SIZE + 50] ^= 1
    with pytest.raises(ChecksumMismatch, match="body"):
        decode_frame(frame)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("offset", 100, "multiple of 512"),
        ("length", 0, "length not in"),
        ("kind", 9, "unknown kind"),
        ("seq", 99, "consecutive"),
        ("timestamp_ns", 0, "backwards"),
    ],
)
def test_encoder_refuses_bad_records(field, value, match):
    records, payload = write_batch(1, 2, 512)
    records[1][field] = value
    with pytest.raises(FormatError, match=match):
        encode_frame(1, records, payload)


def test_payload_length_must_match_records():
    records, payload = write_batch(1, 2, 512)
    with pytest.raises(FormatError, match="payload"):
        encode_frame(1, records, payload[:-512])


def test_decoded_views_are_read_only_and_zero_copy():
    records, payload = write_batch(1, 4, 4096)
    frame = bytearray(encode_frame(1, records, payload))
    decoded = decode_frame(frame)
    assert decoded.records.dtype == RECORD_DTYPE
    with pytest.raises((ValueError, TypeError)):
        decoded.records["seq"][0] = 5
    assert np.shares_memory(decoded.records, np.frombuffer(frame, dtype=np.uint8))
