"""Last-writer resolution (rocva.extents) against the per-byte definition."""

from __future__ import annotations

import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rocva.extents import last_writer, last_writer_brute


def _paint(ps, pe, w, size):
    owner = np.full(size, -1, dtype=np.int64)
    for a, b, x in zip(ps.tolist(), pe.tolist(), w.tolist()):
        owner[a:b] = x
    return owner


intervals = st.lists(st.tuples(st.integers(0, 300), st.integers(1, 60)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(intervals)
def test_pieces_match_the_per_byte_definition(spans) -> None:
    start = np.array([a for a, _ in spans])
    end = np.array([a + n for a, n in spans])
    ps, pe, w = last_writer(start, end)
    size = int(end.max())
    # The pieces tile [min start, max end) and neighbours never share a winner.
    assert ps[0] == start.min() and pe[-1] == size
    assert (ps[1:] == pe[:-1]).all() and (pe > ps).all()
    assert (w[1:] != w[:-1]).all()
    expected = last_writer_brute(start, end, size)
    assert (_paint(ps, pe, w, size)[start.min():] == expected[start.min():]).all()


def test_nested_identical_and_partial_overlaps() -> None:
    # 0: [0,100)  1: [20,40) inside  2: [30,120) partial  3: [30,120) identical, newer
    ps, pe, w = last_writer(np.array([0, 20, 30, 30, 200]), np.array([100, 40, 120, 120, 210]))
    assert list(zip(ps.tolist(), pe.tolist(), w.tolist())) == [
        (0, 20, 0), (20, 30, 1), (30, 120, 3), (120, 200, -1), (200, 210, 4)]


def test_empty_input() -> None:
    ps, pe, w = last_writer(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert len(ps) == len(pe) == len(w) == 0


def test_a_quarter_million_writes_resolve_in_well_under_a_few_seconds() -> None:
    rng = np.random.default_rng(5)
    n = 262_144  # 1 GiB of 4 KiB writes
    start = rng.integers(0, 1 << 18, n) * 4096
    end = start + 4096 * rng.integers(1, 5, n)
    t = time.perf_counter()
    ps, pe, w = last_writer(start, end)
    assert time.perf_counter() - t < 5
    # Spot-check against the definition on a window of the disk.
    lo, hi = 1 << 28, (1 << 28) + (1 << 20)
    sel = (start < hi) & (end > lo)
    idx = np.flatnonzero(sel)
    brute = np.full(hi - lo, -1, dtype=np.int64)
    for i in idx.tolist():
        brute[max(start[i], lo) - lo : min(end[i], hi) - lo] = i
    got = np.full(hi - lo, -1, dtype=np.int64)
    k = np.flatnonzero((ps < hi) & (pe > lo))
    for a, b, x in zip(ps[k].tolist(), pe[k].tolist(), w[k].tolist()):
        got[max(a, lo) - lo : min(b, hi) - lo] = x
    assert (got == brute).all()
