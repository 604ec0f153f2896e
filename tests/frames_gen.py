"""Record batches for tests, drawn by hypothesis (``record_batches``).

The deterministic generator (``TS0``, ``payload_for``, ``write_batch``) lives in
``cdp.testing.records``, shared with the benchmarks; it is re-exported here for the
tests that import it from this module.
"""

from __future__ import annotations

from hypothesis import strategies as st

from cdp.records import (
    KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE, KIND_ZERO, SECTOR, empty_records,
)
from cdp.testing.records import TS0, payload_for, write_batch  # noqa: F401  (write_batch: tests import it from here)


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

