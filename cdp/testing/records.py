"""Deterministic record batches for the tests and the benchmarks.

Payloads are a function of the record's seq (and length and style) so that a test can rebuild
the bytes any record should carry without keeping them.
"""

from __future__ import annotations

import numpy as np
import xxhash

from cdp.records import empty_records

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
