"""``drva.entry_queue.EntryQueue``: a domain's unsealed log entries behave as a deque of
``LogEntry`` objects, whether they are held as objects or as rows, and cost a bounded
amount of memory each while a store is down and they pile up."""

from __future__ import annotations

import collections
import copy
import dataclasses
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.logfmt import entry_stride
from drva import entry_queue
from drva.config import DomainConfig
from drva.domain import DomainState, LogEntry, SegmentJob
from drva.entry_queue import EntryQueue

TS0 = 1_800_000_000_000_000_000


def _entry(seq: int, n: int, ts: int, marks: bool, resync: bool, frame: bool) -> LogEntry:
    return LogEntry(pos=seq * 8192, first_seq=seq, last_seq=seq + n - 1, nbytes=4096 * n + 64,
                    first_ts=ts, last_ts=ts + n, arrived=1000.0 + seq / 7,
                    marks=[(seq, f"m{seq}", ts)] if marks else [],
                    resync=[(7, seq)] if resync else [], frame=("frame", seq) if frame else None)


def _fields(entry: LogEntry) -> tuple:
    return dataclasses.astuple(entry)


appends = st.tuples(st.just("append"), st.integers(1, 3), st.integers(-50, 50), st.booleans(), st.booleans(),
                    st.booleans())
# Appends outnumber the rest, so that the queue grows past its objects into rows and blocks.
ops = st.lists(st.one_of(
    appends, appends, appends, appends,
    st.tuples(st.just("popleft")),
    st.tuples(st.just("raise"), st.integers(-20, 400)),
    st.tuples(st.just("index"), st.integers(-30, 30)),
    st.tuples(st.just("clear"), st.integers(0, 9)),  # clears when 0: rarely
), max_size=150)


@given(ops)
@settings(max_examples=300, deadline=None)
def test_the_queue_is_a_deque_of_entries(monkeypatch_ops: list) -> None:
    # Small blocks, so that a few dozen entries cross every boundary: objects, rows, blocks.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(entry_queue, "HOT_MAX", 3)
        mp.setattr(entry_queue, "BLOCK_ROWS", 4)
        queue, model = EntryQueue(), collections.deque()
        seq = 1
        for op in monkeypatch_ops:
            if op[0] == "append":
                _, n, dts, marks, resync, frame = op
                entry = _entry(seq, n, TS0 + seq * 10 + dts, marks, resync, frame)
                seq += n
                queue.append(entry)
                model.append(copy.deepcopy(entry))
            elif op[0] == "popleft":
                if not model:
                    with pytest.raises(IndexError):
                        queue.popleft()
                    continue
                assert _fields(queue.popleft()) == _fields(model.popleft())
            elif op[0] == "raise":
                floor = TS0 + op[1] * 10
                got = queue.raise_ts(floor)
                for entry in model:
                    entry.raise_ts(floor)
                    floor = entry.last_ts
                assert got == floor
            elif op[0] == "index":
                if -len(model) <= op[1] < len(model):
                    assert _fields(queue[op[1]]) == _fields(model[op[1]])
                else:
                    with pytest.raises(IndexError):
                        queue[op[1]]
            elif op[1] == 0:
                queue.clear()
                model.clear()
            assert len(queue) == len(model) and bool(queue) == bool(model)
            assert queue.nbytes == sum(e.nbytes for e in model)
            assert queue.strides == sum(entry_stride(e.nbytes) for e in model)
            if model:
                assert queue.last_ts == model[-1].last_ts
        assert [_fields(e) for e in queue] == [_fields(e) for e in model]


def test_raising_timestamps_reaches_rows_in_every_block(monkeypatch) -> None:
    monkeypatch.setattr(entry_queue, "HOT_MAX", 2)
    monkeypatch.setattr(entry_queue, "BLOCK_ROWS", 3)
    # Stamped back and forth (a filter's clock stepped back, then on), marks on most.
    made = [_entry(s, 2, TS0 + (s * 37 % 23) * 40, s % 4 != 1, False, s % 4 == 0) for s in range(1, 60, 2)]
    queue, model = EntryQueue(made), copy.deepcopy(made)
    assert queue.rows == len(made) - 2
    floor = TS0 + 500
    got = queue.raise_ts(floor)
    for entry in model:
        entry.raise_ts(floor)
        floor = entry.last_ts
    assert got == floor
    assert [_fields(e) for e in queue] == [_fields(e) for e in model]
    assert [_fields(queue.popleft()) for _ in model] == [_fields(e) for e in model]


def test_an_entry_out_of_the_queue_does_not_change_it() -> None:
    queue = EntryQueue(_entry(s, 1, TS0 + s, True, False, False) for s in range(1, 10_000))
    assert queue.rows > 0
    got = queue[-1]
    got.marks.append((0, "x", 0))
    got.last_ts = 0
    assert queue[-1].marks == [(9999, "m9999", TS0 + 9999)] and queue[-1].last_ts == TS0 + 10_000


def test_a_domain_holding_many_entries_costs_under_100_bytes_each() -> None:
    """The store is down: 100,000 one-write frames are durable and not sealed. As objects
    they took 484 bytes each (a 64 GiB log of 4 KiB frames: 7.7 GB of RAM)."""
    dom = DomainState(DomainConfig(1, "erp", ()))
    entries = 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for seq in range(1, entries + 1):
            assert dom.add_durable(LogEntry(seq * 4160, seq, seq, 4096, TS0 + seq, TS0 + seq, 1.0, [], []))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / entries < 100, f"{held / entries:.0f} bytes an entry"
    assert dom.log_bytes() == entries * entry_stride(4096)
    assert dom.unsealed_bytes() == entries * 4096 and dom.unsealed[-1].last_seq == entries


def test_log_bytes_count_unsealed_and_inflight_entries_until_committed() -> None:
    dom = DomainState(DomainConfig(1, "erp", ()))
    for seq in range(1, 11):
        dom.add_durable(_entry(seq, 1, TS0 + seq, False, False, False))
    stride = entry_stride(4096 + 64)
    assert dom.log_bytes() == 10 * stride
    sealed = [dom.unsealed.popleft() for _ in range(4)]
    dom.inflight.append(SegmentJob(1, "k", b"", sealed, 0, 0, 4 * stride))
    dom.staged_bytes = 100
    assert dom.log_bytes() == 10 * stride + 100
    dom.inflight.popleft()
    dom.committed_seq = 4
    assert dom.log_bytes() == 6 * stride + 100
    dom.stop("test")
    assert dom.log_bytes() == 0


async def _durable_frames(tmp_path, frames: int, cache_bytes_max: int):
    """A committer that made ``frames`` one-write frames of domain 1 durable, none sealed."""
    from cdp.frame import decode_frame
    from cdp.replog import ReplicationLog
    from drva.committer import GroupCommitter
    from tests.drva.harness import config, two_domains
    from tests.drva.test_protocol import frame

    path = tmp_path / "replog"
    ReplicationLog.format(path, 64 << 20)
    log = ReplicationLog.open(path)
    dom = DomainState(config(two_domains(tmp_path, "drva-a")).domains[0])
    committer = GroupCommitter(log, staging_bytes_max=64 << 20, high_water=0.9, low_water=0.8,
                               on_durable=lambda _: None, cache_bytes_max=cache_bytes_max)
    for i in range(frames):
        raw = frame(i + 1, n=1)
        committer.stage(dom, raw, decode_frame(raw, "t"))
        if (i + 1) % 50 == 0:
            while committer._staged:
                await committer.step()
    return log, dom, committer


@pytest.mark.parametrize("how", ["sealed", "adopted"])
async def test_the_frame_cache_budget_comes_back_from_entries_held_as_rows(tmp_path, monkeypatch, how):
    """Frames cached past the first entries are kept with their rows, and their share of
    the committer's cache budget comes back when they are sealed, or dropped with the
    queue (a timeline adopted). Charged while the row dropped the frame, the budget
    leaked for good at every outage, and nothing was cached any more."""
    monkeypatch.setattr(entry_queue, "HOT_MAX", 8)
    monkeypatch.setattr(entry_queue, "BLOCK_ROWS", 16)
    log, dom, committer = await _durable_frames(tmp_path, 200, cache_bytes_max=1 << 30)
    try:
        assert dom.unsealed.rows == 192 and committer.cache_bytes > 0
        assert sum(e.frame is not None for e in dom.unsealed) == 200  # every one cached, rows too
        if how == "sealed":  # as Shipper._seal does it
            entries = list(dom.unsealed)
            committer.uncache(entries)
            for _ in entries:
                dom.unsealed.popleft()
        else:  # as Shipper._adopt does it
            committer.uncache(list(dom.unsealed.cached()))
            dom.unsealed.clear()
        assert committer.cache_bytes == 0 and not dom.unsealed
    finally:
        log.close()


async def test_a_stopped_domains_new_entries_take_no_frame_cache(tmp_path):
    """Frames made durable after the domain was stopped are not cached: nothing seals them."""
    from cdp.frame import decode_frame
    from tests.drva.test_protocol import frame

    log, dom, committer = await _durable_frames(tmp_path, 50, cache_bytes_max=1 << 30)
    try:
        before = committer.cache_bytes
        assert before > 0
        dom.stop("test")
        for seq in range(51, 61):
            raw = frame(seq, n=1)
            committer.stage(dom, raw, decode_frame(raw, "t"))
        while committer._staged:
            await committer.step()
        assert dom.durable_seq == 60 and committer.cache_bytes == before
        assert all(e.frame is None for e in list(dom.unsealed)[50:])
    finally:
        log.close()
