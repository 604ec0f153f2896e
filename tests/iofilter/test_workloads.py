"""Workload generators: alignment, bounds, sizes, limits, determinism and pacing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import ConfigError
from cdp.records import KIND_WRITE, KIND_ZERO
from iofilter_sim.workloads import KINDS, MB, Pacer, WriteBatch, make_workload

MiB = 1 << 20
SIZES = [64 * MiB, 8 * MiB, 3 * MiB + 512]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def check_batch(batch: WriteBatch, disk_sizes: list[int], max_writes: int, max_bytes: int) -> None:
    """The workload contract for one batch."""
    assert batch.disk.dtype == np.uint32 and batch.offset.dtype == np.uint64
    assert batch.length.dtype == np.uint32 and batch.kind.dtype == np.uint16
    assert len(batch.disk) == len(batch.offset) == len(batch.length) == len(batch.kind)
    assert batch.count <= max_writes and batch.nbytes <= max_bytes
    length = batch.length.astype(np.int64)
    offset = batch.offset.astype(np.int64)
    assert (batch.disk < len(disk_sizes)).all()
    assert (offset % 512 == 0).all() and (length % 512 == 0).all()
    assert (length >= 512).all() and (length <= MiB).all()
    assert (offset + length <= np.asarray(disk_sizes, np.int64)[batch.disk]).all()
    assert np.isin(batch.kind, [KIND_WRITE, KIND_ZERO]).all()
    assert len(batch.payload) == int(length[batch.kind == KIND_WRITE].sum())


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_keeps_the_contract(kind: str) -> None:
    wl = make_workload(kind, SIZES, seed=3)
    total = 0
    for max_writes, max_bytes in [(1, MiB), (50, 4 * MiB), (5000, 64 * MiB), (10, 512)]:
        batch = wl.next_batch(max_writes, max_bytes)
        check_batch(batch, SIZES, max_writes, max_bytes)
        total += batch.count
        if max_bytes >= MiB:
            assert batch.count > 0
    assert total > 50
    records = batch.to_records()
    assert (records["offset"] == batch.offset).all() and (records["seq"] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_batches(kind: str) -> None:
    a, b, c = (make_workload(kind, SIZES, seed=s) for s in (5, 5, 6))
    for _ in range(3):
        x, y, z = (w.next_batch(300, 8 * MiB) for w in (a, b, c))
        for field in ("disk", "offset", "length", "kind"):
            assert (getattr(x, field) == getattr(y, field)).all()
        assert x.payload == y.payload
    assert not (x.count == z.count and (x.offset == z.offset).all())


def test_sequential_writes_each_disk_front_to_back_and_wraps() -> None:
    sizes = [MiB, 2 * MiB]
    wl = make_workload("sequential", sizes, seed=1, trim_share=0.0)
    batch = wl.next_batch(1000, 8 * MiB)
    for d, size in enumerate(sizes):
        sel = batch.disk == d
        offset, length = batch.offset[sel].astype(np.int64), batch.length[sel].astype(np.int64)
        assert offset[0] == 0
        nxt = (offset[:-1] + length[:-1]) % size
        assert (offset[1:] == nxt).all()  # each write starts where the last ended (or at 0)


def test_zipf_concentrates_on_few_regions() -> None:
    wl = make_workload("zipf", [256 * MiB], seed=2, write_size="4KiB", region_bytes=MiB)
    batch = wl.next_batch(20000, 1 << 40)
    regions = np.bincount(batch.offset // MiB, minlength=256)
    top = np.sort(regions)[::-1]
    assert top[:26].sum() > 0.5 * batch.count  # the hottest 10 % take most writes
    assert (regions > 0).sum() > 26  # ... but not all of them


def test_database_pages_and_log() -> None:
    sizes = [32 * MiB, 32 * MiB, 8 * MiB]
    wl = make_workload("database", sizes, seed=4, trim_share=0.0, log_share=0.25)
    batch = wl.next_batch(4000, 1 << 40)
    log = batch.disk == 2
    assert 0.15 < log.mean() < 0.35
    pages = batch.length[~log]
    assert set(pages.tolist()) <= {4096, 8192, 16384}
    assert (batch.offset[~log] % 4096 == 0).all()
    offset, length = batch.offset[log].astype(np.int64), batch.length[log].astype(np.int64)
    assert (offset[1:] == (offset[:-1] + length[:-1]) % (8 * MiB)).all()
    lone = make_workload("database", [8 * MiB], seed=4, log_share=1.0, trim_share=0.0)
    b = lone.next_batch(2000, 1 << 40)
    assert (b.offset >= 7 * MiB).all()  # the log is the last eighth of a lone disk
    chosen = make_workload("database", sizes, seed=4, log_disk=0, log_share=1.0)
    assert (chosen.next_batch(100, 8 * MiB).disk == 0).all()


def test_write_size_forms() -> None:
    fixed = make_workload("random", SIZES, seed=1, write_size="64KiB")
    assert set(fixed.next_batch(100, 64 * MiB).length.tolist()) == {65536}
    ranged = make_workload("random", SIZES, seed=1, write_size=["4KiB", "1MiB"])
    lengths = ranged.next_batch(2000, 1 << 40).length
    assert lengths.min() >= 4096 and lengths.max() <= MiB and np.median(lengths) < 128 * 1024
    table = make_workload("random", SIZES, seed=1, write_size={"512": 1, "1MiB": 1})
    assert set(table.next_batch(200, 1 << 40).length.tolist()) == {512, MiB}


def test_total_bytes_ends_the_workload() -> None:
    wl = make_workload("random", SIZES, seed=1, total_bytes="10MiB")
    total = 0
    while not wl.done:
        batch = wl.next_batch(7, 4 * MiB)
        assert batch.count > 0
        total += batch.nbytes
    assert total == 10 * MiB
    assert wl.next_batch(10, MiB).count == 0 and wl.delay_s() == 0.0


def drive(wl: Any, clock: FakeClock, seconds: float) -> tuple[int, int, list[float]]:
    """Run a workload the way an asyncio loop would, with a fake clock."""
    writes = nbytes = 0
    times = []
    end = clock.now + seconds
    while clock.now < end:
        batch = wl.paced_batch(4096, 16 * MiB)
        if batch.count == 0:
            delay = wl.delay_s()
            assert delay > 0
            clock.now += delay
            continue
        writes += batch.count
        nbytes += batch.nbytes
        times.append(clock.now)
        clock.now += 0.003  # the caller's own work between batches
    return writes, nbytes, times


def test_pacer_holds_a_byte_rate() -> None:
    clock = FakeClock()
    wl = make_workload("random", SIZES, seed=1, rate_mb_s=20, clock=clock)
    _, nbytes, _ = drive(wl, clock, 30.0)
    assert abs(nbytes - 20 * MB * 30) <= 2 * MiB + 0.1 * 20 * MB


def test_pacer_holds_iops() -> None:
    clock = FakeClock()
    wl = make_workload("zipf", SIZES, seed=1, iops=500, clock=clock)
    writes, _, _ = drive(wl, clock, 20.0)
    assert abs(writes - 500 * 20) <= 1 + 500 * 0.1


def test_burst_is_silent_while_off() -> None:
    clock = FakeClock()
    start = clock.now
    wl = make_workload("burst", SIZES, seed=1, rate_mb_s=10, on_s=1.0, off_s=3.0, clock=clock)
    _, nbytes, times = drive(wl, clock, 16.0)
    phase = (np.array(times) - start) % 4.0
    assert (phase < 1.0).all()
    assert abs(nbytes - 10 * MB * 4) <= 4 * (2 * MiB + MB)  # 4 on-seconds of 16


def test_unpaced_workload_is_never_held() -> None:
    wl = make_workload("sequential", SIZES, seed=1)
    assert wl.delay_s() == 0.0
    assert wl.paced_batch(100, 8 * MiB).count > 0


def test_pacer_alone() -> None:
    clock = FakeClock()
    pacer = Pacer(rate_bytes_s=1000 * 1000, clock=clock, slack_bytes=MiB)
    writes, nbytes = pacer.allowance()
    assert writes >= 1 << 40 and nbytes == MiB  # no tokens yet: just the slack
    pacer.consume(1, MiB)
    assert pacer.allowance() == (0, 0)
    assert pacer.delay_s() == pytest.approx(MiB / 1e6)
    clock.now += MiB / 1e6
    assert pacer.allowance()[1] >= MiB


@pytest.mark.parametrize("kind, options, key", [
    ("fast", {}, "workload.kind"),
    ("random", {"rate": 1}, "workload.rate"),
    ("random", {"rate_mb_s": 0}, "workload.rate_mb_s"),
    ("random", {"iops": "many"}, "workload.iops"),
    ("random", {"write_size": 1000}, "workload.write_size"),
    ("random", {"write_size": "2MiB"}, "workload.write_size"),
    ("random", {"write_size": ["64KiB", "4KiB"]}, "workload.write_size"),
    ("random", {"write_size": {"4KiB": 0}}, "workload.write_size.4KiB"),
    ("random", {"payload": "json"}, "workload.payload"),
    ("random", {"zero_share": 1.5}, "workload.zero_share"),
    ("random", {"total_bytes": 1000}, "workload.total_bytes"),
    ("random", {"seed": -1}, "workload.seed"),
    ("zipf", {"zipf_a": 0}, "workload.zipf_a"),
    ("database", {"log_disk": 3}, "workload.log_disk"),
    ("burst", {"off_s": -1}, "workload.off_s"),
    ("sequential", {"on_s": 1}, "workload.on_s"),
])
def test_bad_options_are_refused(kind: str, options: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_workload(kind, SIZES, **options)
    assert str(info.value).startswith(f"{key}: "), str(info.value)


@pytest.mark.parametrize("sizes", [[], [1000], [0], [MiB, -512]])
def test_bad_disk_sizes_are_refused(sizes: list[int]) -> None:
    with pytest.raises(ConfigError, match="^workload: "):
        make_workload("random", sizes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    sectors=st.lists(st.integers(1, 6000), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    write_size=st.sampled_from([None, "512", "1MiB", ["512", "1MiB"], {"4KiB": 1, "1MiB": 1}]),
    limits=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 8 * MiB)), min_size=1,
                    max_size=4),
)
def test_every_write_is_aligned_and_inside_its_disk(
        kind: str, sectors: list[int], seed: int, write_size: Any,
        limits: list[tuple[int, int]]) -> None:
    sizes = [s * 512 for s in sectors]
    wl = make_workload(kind, sizes, seed=seed, write_size=write_size, zero_share=0.1)
    for max_writes, max_bytes in limits:
        batch = wl.next_batch(max_writes, max_bytes)
        check_batch(batch, sizes, max_writes, max_bytes)
        if max_writes and max_bytes >= MiB:
            assert batch.count > 0
