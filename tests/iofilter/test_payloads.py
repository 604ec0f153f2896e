"""Payload bytes: compressibility per style, zero share, determinism; write-size parsing."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest

from cdp.errors import ConfigError
from iofilter_sim.payloads import (
    DEFAULT_SIZES, POOL_BYTES, PayloadSource, parse_size, parse_write_size, trace_payload,
    trace_payloads,
)

KiB = 1 << 10


def lz4_ratio(payload: bytes, lengths: list[int]) -> float:
    """Raw / compressed, compressing each write on its own (as a segment block would)."""
    compressed, at = 0, 0
    for n in lengths:
        compressed += len(lz4.block.compress(payload[at : at + n], store_size=False))
        at += n
    return len(payload) / compressed


@pytest.mark.parametrize("style, lo, hi", [
    ("text", 1.8, 3.5),
    ("mixed", 1.25, 1.9),
    ("random", 0.9, 1.05),
])
def test_compressibility_per_style(style: str, lo: float, hi: float) -> None:
    lengths = [64 * KiB] * 48 + [256 * KiB] * 4
    payload = PayloadSource(style, seed=1, zero_share=0.0).batch(np.array(lengths))
    assert len(payload) == sum(lengths)
    assert lo <= lz4_ratio(payload, lengths) <= hi


def test_zero_share() -> None:
    lengths = np.full(2000, 4096)
    for share, lo, hi in [(0.0, 0, 0), (0.02, 10, 80), (0.5, 800, 1200), (1.0, 2000, 2000)]:
        payload = PayloadSource("random", seed=2, zero_share=share).batch(lengths)
        writes = np.frombuffer(payload, np.uint8).reshape(2000, 4096)
        zero = int((~writes.any(axis=1)).sum())
        assert lo <= zero <= hi, (share, zero)


def test_deterministic_by_seed_and_large_batches() -> None:
    lengths = np.array([512, 4096, 1 << 20, 3 * (1 << 20)] * 8)  # 33 MiB: several pool passes
    a = PayloadSource("mixed", seed=9).batch(lengths)
    b = PayloadSource("mixed", seed=9).batch(lengths)
    c = PayloadSource("mixed", seed=10).batch(lengths)
    assert a == b and a != c and len(a) == int(lengths.sum()) > POOL_BYTES
    source = PayloadSource("text", seed=9)
    assert len(source.take(4096)) == 4096 and source.batch(np.array([], int)) == b""


def test_trace_payload_is_a_function_of_seq() -> None:
    assert trace_payload(7, 4096) == trace_payload(7, 4096)
    assert trace_payload(7, 4096) != trace_payload(8, 4096)
    assert trace_payload(7, 8192)[:4096] == trace_payload(7, 4096)
    long = trace_payload(3, POOL_BYTES + 5 * KiB)  # wraps around the pool
    assert len(long) == POOL_BYTES + 5 * KiB and long[:8192] == trace_payload(3, 8192)
    seqs, offsets, lengths = np.array([7, 3, 3]), np.array([512, 0, POOL_BYTES]), [1024, 512, 4096]
    assert trace_payloads(seqs, offsets, np.array(lengths)) == (
        trace_payload(7, 1536)[512:] + long[:512] + long[POOL_BYTES : POOL_BYTES + 4096])


def test_parse_sizes() -> None:
    assert parse_size("64MiB", "x") == 64 << 20
    assert parse_size("4k", "x") == 4096 and parse_size(" 1 GiB ", "x") == 1 << 30
    assert parse_size(512, "x") == 512 and parse_size("512", "x") == 512
    for bad in ("64MB", "1.5GiB", "", True, None, "-1"):
        with pytest.raises(ConfigError, match="^x: expected a size"):
            parse_size(bad, "x")
    assert parse_write_size(None, "x") is DEFAULT_SIZES
    assert parse_write_size("mix", "x") is DEFAULT_SIZES
    table = parse_write_size({"4KiB": 3, "64KiB": 1}, "x")
    assert table.sizes.tolist() == [4096, 65536] and table.mean == pytest.approx(19456)
    ranged = parse_write_size(["512", "1MiB"], "x")
    assert ranged.sizes[0] == 512 and ranged.sizes[-1] == 1 << 20
    with pytest.raises(ConfigError, match=r"^x\[1\]: expected a multiple of 512"):
        parse_write_size(["512", 1000], "x")
    with pytest.raises(ConfigError, match=r"^x: expected \[smallest, largest\]"):
        parse_write_size([512], "x")
