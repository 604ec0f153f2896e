"""Record batches for tests: hypothesis strategies and a deterministic generator.

Payloads are a function of (seq, disk, offset) so that a test can rebuild the bytes any
record should carry without keeping them.
"""

from __future__ import annotations

import numpy as np
import xxhash
from hypothesis import strategies as st

from cdp.records import (
    KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE, KIND_ZERO, SECTOR, empty_records,
)

TS0 = 1_700_000_000_000_000_000


def payload_for(seq: int, length: int, style: str = "mixed") -> bytes:
    """Deterministic bytes for record ``seq``: compressible text-like, random or zeros."""
    if style == "zero":
        return bytes(length)
    rng = np.random.default_rng(seq)
    if style == "random":
        return rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    words = rng.integers(0, 16, length // 8 + 1, dtype=np.uint8)
    return (b"%016x" % xxhash.xxh3_64_intdigest(words.tobytes()) * (length // 16 + 1))[:length]


@st.composite
def record_batches(draw, max_records: int = 12, max_sectors: int = 64):
    """(records, payload) with consecutive seqs and every kind, drawn by hypothesis."""
    n = draw(st.integers(1, max_records))
    first_seq = draw(st.integers(1, 1 << 40))
    records = empty_records(n)
    parts = []
    ts = TS0 + draw(st.integers(0, 1 << 30))
    for i in range(n):
        kind = draw(st.sampled_from(
            [KIND_WRITE] * 6 + [KIND_ZERO, KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END]))
        seq = first_seq + i
        ts += draw(st.integers(0, 10**6))
        r = records[i]
        r["seq"], r["timestamp_ns"], r["kind"] = seq, ts, kind
        if kind in (KIND_WRITE, KIND_ZERO):
            r["disk"] = draw(st.integers(0, 3))
            r["offset"] = draw(st.integers(0, 1 << 20)) * SECTOR
            r["length"] = draw(st.integers(1, max_sectors)) * SECTOR
            if kind == KIND_WRITE:
                style = draw(st.sampled_from(["mixed", "random", "zero"]))
                parts.append(payload_for(seq, int(r["length"]), style))
        elif kind == KIND_MARK:
            name = draw(st.text(min_size=1, max_size=40)).encode()[:255] or b"m"
            r["length"] = len(name)
            parts.append(name)
        else:
            r["disk"] = draw(st.integers(0, 3))
    return records, b"".join(parts)


def write_batch(first_seq: int, count: int, length: int, *, disk: int = 0,
                style: str = "mixed", ts: int = TS0) -> tuple[np.ndarray, bytes]:
    """``count`` WRITE records of ``length`` bytes each, at deterministic offsets."""
    records = empty_records(count)
    seqs = np.arange(first_seq, first_seq + count, dtype=np.uint64)
    records["seq"] = seqs
    records["timestamp_ns"] = ts + seqs * 1000
    records["offset"] = (seqs * 7919 % 4096) * length
    records["length"] = length
    records["disk"] = disk
    payload = b"".join(payload_for(int(s), length, style) for s in seqs)
    return records, payload
