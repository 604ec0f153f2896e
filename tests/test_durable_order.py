"""An ack waits for ``fdatasync`` (issue 9): the order of writes, syncs and acks.

A SIGKILL test cannot see a missing sync — the page cache survives the process — and a
removed ``fdatasync`` left every other test green. Here every write and sync of the
replication log goes through ``cdp.durable`` (the one durable module), where ``DiskOrder``
records them in order, next to the points where the caller may ack (``append_batch``
returning) or does ack (the DRVA building an ``ACK``). The rule checked at each ack, for
every entry it covers: the entry's bytes were written, and every write that touched them
was followed by a sync of that file before the ack.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cdp import durable, wire
from cdp.frame import decode_frame
from cdp.logfmt import BLOCK, DATA_START, entry_stride
from cdp.meta import MetaRepository
from cdp.replog import ReplicationLog
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, config, domain_doc, drva_doc, random_writes
from tests.waiting import EVENTUALLY_S, wait_until

SIZE = DATA_START + (2 << 20)  # a 2 MiB ring: the appends below wrap it several times
DISK = 8 << 20


@dataclass(frozen=True)
class _Write:
    file: tuple[int, int]  # (st_dev, st_ino): fds are reused, inodes are not
    start: int
    end: int


@dataclass(frozen=True)
class _Sync:
    file: tuple[int, int]


@dataclass(frozen=True)
class _Ack:
    what: object


def _file_of(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class DiskOrder:
    """Records every write and sync through ``cdp.durable``, and the acks, in the order
    they completed (writes and syncs come from worker threads too, hence the lock)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[_Write | _Sync | _Ack] = []
        self._lock = threading.Lock()
        real_pwrite_all, real_sync_data, real_sync_file = durable.pwrite_all, durable.sync_data, durable.sync_file

        def pwrite_all(fd: int, buffers, offset: int) -> None:
            n = sum(memoryview(b).nbytes for b in buffers)
            real_pwrite_all(fd, buffers, offset)
            self._record(_Write(_file_of(fd), offset, offset + n))

        def sync_data(fd: int) -> None:
            real_sync_data(fd)
            self._record(_Sync(_file_of(fd)))

        def sync_file(fd: int) -> None:
            real_sync_file(fd)
            self._record(_Sync(_file_of(fd)))

        monkeypatch.setattr(durable, "pwrite_all", pwrite_all)
        monkeypatch.setattr(durable, "sync_data", sync_data)
        monkeypatch.setattr(durable, "sync_file", sync_file)

    def _record(self, event: _Write | _Sync | _Ack) -> int:
        with self._lock:
            self.events.append(event)
            return len(self.events) - 1

    def now(self) -> int:
        """The index the next event gets."""
        with self._lock:
            return len(self.events)

    def ack(self, what: object) -> int:
        return self._record(_Ack(what))

    def unsynced_at(self, at: int, file: tuple[int, int], start: int, end: int, since: int = 0) -> str | None:
        """Why bytes ``[start, end)`` of ``file`` were not durable at event ``at`` (None:
        they were): they must be covered by writes in ``[since, at)``, and every write
        touching them before ``at`` must be followed by a sync of the file before ``at``."""
        covered: list[tuple[int, int]] = []
        synced_since = False  # a sync of the file between the event looked at and ``at``
        for i in range(at - 1, -1, -1):  # backwards: one pass
            e = self.events[i]
            if isinstance(e, _Sync) and e.file == file:
                synced_since = True
            elif isinstance(e, _Write) and e.file == file and e.start < end and e.end > start:
                if not synced_since:
                    return f"written at event {i} ({e.start}..{e.end}) and not synced before event {at}"
                if i >= since:
                    covered.append((max(e.start, start), min(e.end, end)))
        at_byte = start
        for lo, hi in sorted(covered):
            if lo > at_byte:
                break
            at_byte = max(at_byte, hi)
        if at_byte < end:
            return f"bytes {at_byte}..{end} never written before event {at}"
        return None


def _body(rng: random.Random, i: int) -> bytes:
    n = rng.choice([100, 3000, 4096 - 64, 9000, 60000])
    return (b"%08d" % i) * (n // 8)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_append_batch_returns_only_once_every_entry_is_synced(tmp_path: Path, monkeypatch, direct: bool) -> None:
    path = tmp_path / "replog"
    ReplicationLog.format(path, SIZE)
    order = DiskOrder(monkeypatch)
    rng = random.Random(9)
    problems = []
    with ReplicationLog.open(path, direct=direct) as log:
        file = _file_of(log._fd)
        for i in range(300):
            bodies = [_body(rng, i * 10 + j) for j in range(rng.randint(1, 6))]
            if log.fits([len(b) for b in bodies]) < len(bodies):
                log.trim(log.tail)  # make room: the ring wraps, and PAD entries come in
            since = order.now()
            positions = log.append_batch([[b] for b in bodies])
            at = order.ack(f"batch {i}")  # append_batch returned: the caller may ack now
            for pos, b in zip(positions, bodies):
                phys = DATA_START + pos % log.data_size
                why = order.unsynced_at(at, file, phys, phys + entry_stride(len(b)), since)
                if why is not None:
                    problems.append(f"batch {i}, entry at position {pos}: {why}")
        assert log.tail > 3 * log.data_size  # several laps, so lap ends fell inside batches
    assert problems == []


def test_trim_returns_only_once_the_new_head_is_synced(tmp_path: Path, monkeypatch) -> None:
    # FORMAT.md §3.4: freed bytes are reused only once the superblock naming the new head
    # is durable; the log counts them free (``durable_head``) when trim returns.
    path = tmp_path / "replog"
    ReplicationLog.format(path, SIZE)
    order = DiskOrder(monkeypatch)
    with ReplicationLog.open(path) as log:
        file = _file_of(log._fd)
        positions = log.append_batch([[b"x" * 5000] for _ in range(4)])
        since = order.now()
        log.trim(positions[2])
        at = order.ack("trim")
        copy = log._sb.copy_index()
        assert order.unsynced_at(at, file, copy * BLOCK, (copy + 1) * BLOCK, since) is None


def test_a_metadata_write_returns_only_once_synced(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "meta"
    MetaRepository.format(path, slot_size=BLOCK)
    order = DiskOrder(monkeypatch)
    with MetaRepository.open(path, slot_size=BLOCK) as meta:
        file = _file_of(meta._fd)
        for gen in range(2, 6):
            since = order.now()
            meta.write({"generation": gen})
            at = order.ack(f"generation {gen}")
            slot = gen % 2
            assert order.unsynced_at(at, file, slot * BLOCK, (slot + 1) * BLOCK, since) is None


async def test_the_drva_acks_a_seq_only_once_its_log_entry_is_synced(tmp_path: Path, monkeypatch) -> None:
    """End to end: a filter streams to an in-process DRVA; every ACK the DRVA builds
    (``wire.ack_message``, called right before it is written to the socket) is checked
    against the log entries holding the seqs it acks."""
    # Nothing is sealed (so nothing is trimmed): after the run the log still holds every
    # entry, which maps each seq to the bytes that had to be durable.
    doc = drva_doc(tmp_path, "drva-d", [domain_doc(1, "erp", [("vm1", "d0", DISK)])],
                   seal_bytes="256MiB", seal_age_s=3600.0)
    order = DiskOrder(monkeypatch)
    acks: list[tuple[int, int, int]] = []  # (event index, domain, durable seq)
    real_ack_message = wire.ack_message

    def ack_message(domain: int, durable_seq: int, *args, **kwargs):
        acks.append((order.ack((domain, durable_seq)), domain, durable_seq))
        return real_ack_message(domain, durable_seq, *args, **kwargs)

    monkeypatch.setattr(wire, "ack_message", ack_message)
    drva = Drva(config(doc), exit_on_task_failure=False)
    await drva.start()
    file = _file_of(drva.log._fd)
    f = DomainFilter(1, [Disk(tmp_path / "d0.img", DISK)])
    client = FilterClient([f], "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    try:
        rng = np.random.default_rng(4)
        for _ in range(40):  # many small batches: many group commits, many acks
            f.capture(*random_writes(rng, [DISK], 16, 16))
            await asyncio.sleep(0)
        await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "every write to be acked")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await drva.stop()
    with ReplicationLog.open(doc["log"]["path"], readonly=True) as log:
        entries = []
        for pos, body in log.entries():
            frame = decode_frame(body)
            phys = DATA_START + pos % log.data_size
            entries.append((frame.domain, frame.first_seq, pos, phys, phys + entry_stride(len(body))))
    assert entries and acks and max(seq for _, _, seq in acks) == f.next_seq - 1
    problems = []
    for at, domain, seq in acks:
        for dom, first_seq, pos, start, end in entries:
            if dom == domain and first_seq <= seq:
                why = order.unsynced_at(at, file, start, end)
                if why is not None:
                    problems.append(f"ACK of seq {seq}: entry at position {pos} (seq {first_seq}..): {why}")
    assert problems == [], problems[:5]


def test_the_c_library_functions_are_found_once_and_typed():
    """``cdp.libc``: the functions the os module lacks come from the process's own
    symbols, typed; an unknown one is None (callers then do without)."""
    import ctypes

    from cdp import durable, fallocate, memory
    from cdp.libc import libc_function

    assert fallocate.available and durable._sync_file_range is not None and memory.bound_malloc()
    fn = libc_function(["no_such_function_here", "getpid"], [], ctypes.c_int)
    assert fn is not None and fn() == os.getpid()
    assert libc_function(["no_such_function_here"], []) is None
