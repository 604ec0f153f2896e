"""The filter's spill journal (iofilter_sim/spill.py): frames past the memory buffer wait
in a bounded ring file, in order, instead of sending the filter to bitmap mode; a
journal that loses them sends the filter to a resync, never into a stall."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.frame import decode_frame
from cdp.records import KIND_RESYNC_BEGIN, KIND_WRITE
from cdp.store.fs import FileStore
from iofilter_sim.client import FilterClient
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter
from iofilter_sim.spill import SpillJournal
from tests.drva.harness import SECRET, Disk, DrvaProcess, check_store, domain_doc, drva_doc, free_port, random_writes
from tests.drva.test_crash import wait_until_committed
from tests.iofilter.fake_drva import SECRET as FAKE_SECRET
from tests.iofilter.fake_drva import FakeDrva
from tests.waiting import EVENTUALLY_S, wait_until

# ---------------------------------------------------------------- the ring, against a model

OPS = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(1, 300)),
                         st.tuples(st.just("release"), st.just(0)),
                         st.tuples(st.just("drop"), st.just(0))), max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, capacity=st.integers(1, 1000))
def test_the_ring_keeps_every_live_frame_intact(tmp_path_factory, ops, capacity) -> None:
    journal = SpillJournal(tmp_path_factory.mktemp("spill") / "d.spill", capacity)
    live: list[tuple[int, bytes]] = []  # the model: frames in order, (offset, bytes)
    try:
        for n, (op, size) in enumerate(ops):
            if op == "append":
                body = bytes([n % 251 + 1]) * size
                at = journal.append([body[: size // 2], body[size // 2:]], size)
                if at is None:  # refused only when no free run of `size` bytes exists where a ring may put it
                    assert live and size <= capacity or size > capacity
                    continue
                assert 0 <= at and at + size <= capacity
                for other_at, other in live:  # never over a frame still waiting
                    assert at + size <= other_at or other_at + len(other) <= at
                live.append((at, body))
            elif live and op == "release":
                live.pop(0)
                journal.release_oldest()
            elif live and op == "drop":
                live.pop()
                journal.drop_newest()
            assert len(journal) == len(live)
            assert journal.used_bytes == sum(len(b) for _, b in live)
            for at, body in live:
                assert journal.read(at, len(body)) == body
        if not live:  # an empty ring takes any frame that fits the file
            assert journal.append([b"x" * capacity], capacity) == 0
    finally:
        journal.close()
    assert not journal.path.exists()


def test_a_frame_wraps_to_the_start_when_the_head_has_moved(tmp_path) -> None:
    journal = SpillJournal(tmp_path / "d.spill", 100)
    assert [journal.append([b"a" * 40], 40), journal.append([b"b" * 40], 40)] == [0, 40]
    assert journal.append([b"c" * 30], 30) is None  # 20 left at the end, the head at 0
    journal.release_oldest()
    assert journal.append([b"c" * 30], 30) == 0  # wrapped: the 20 bytes at the end are a gap
    assert journal.append([b"d" * 11], 11) is None  # 10 free between the tail and the head
    assert journal.read(40, 40) == b"b" * 40 and journal.read(0, 30) == b"c" * 30
    journal.close()


# ---------------------------------------------------------------- the filter

def captured(f: DomainFilter, rng, n_batches: int, disk_size: int) -> list[tuple[np.ndarray, bytes]]:
    batches = []
    for _ in range(n_batches):
        disk, offset, length, kind, payload = random_writes(rng, [disk_size], 16, 32)
        f.capture(disk, offset, length, kind, payload)
        batches.append((offset.copy(), payload))
    return batches


def test_frames_past_the_buffer_wait_in_the_journal_and_go_out_in_order(tmp_path) -> None:
    size = 8 << 20
    disk = Disk(tmp_path / "p.img", size)
    f = DomainFilter(1, [disk], buffer_bytes_max=256 << 10, spill=SpillJournal(tmp_path / "p.img.spill", 8 << 20))
    batches = captured(f, np.random.default_rng(3), 40, size)  # ~5 MB, nothing acked
    assert f.mode == "normal" and f.stats["bitmap_entries"] == 0
    assert f.buffered_bytes <= (256 << 10) + (1 << 20) and f.spilled_bytes > 4 << 20
    assert f.stats["spilled_frames"] > 0
    # What goes on the wire, memory and journal alike, is every write once, in seq order.
    seqs, payload = [], bytearray()
    while (frame := f.next_unsent()) is not None:
        decoded = decode_frame(b"".join(bytes(p) for p in f.wire_parts(frame)))
        seqs.extend(decoded.records["seq"].tolist())
        payload += decoded.payload
        f.mark_sent()
    assert seqs == list(range(1, f.next_seq))
    assert bytes(payload) == b"".join(p for _, p in batches)
    f.on_ack(f.next_seq - 1)
    assert f.buffered_bytes == 0 and f.spilled_bytes == 0 and f.spill.used_bytes == 0 and not f.buffer
    f.close_spill()
    assert not (tmp_path / "p.img.spill").exists()


def test_a_full_journal_falls_back_to_the_bitmap_and_reuses_the_seqs(tmp_path) -> None:
    size = 8 << 20
    disk = Disk(tmp_path / "p.img", size)
    f = DomainFilter(1, [disk], buffer_bytes_max=128 << 10, spill=SpillJournal(tmp_path / "p.img.spill", 1 << 20))
    captured(f, np.random.default_rng(4), 30, size)
    assert f.mode == "bitmap" and f.stats["bitmap_entries"] == 1
    # Nothing was sent: every frame was dropped, the journal too, and numbering restarts.
    assert not f.buffer and f.spilled_bytes == 0 and f.spill.used_bytes == 0 and f.next_seq == 1
    assert f.dirty_bytes() > 0
    f.close_spill()


# ---------------------------------------------------------------- a DRVA killed under load

async def test_a_drva_restart_under_load_opens_no_window_with_the_journal(tmp_path) -> None:
    """SIGKILL the DRVA while two domains write more than their memory buffers during the
    outage: the one with a journal keeps every write in the stream (no bitmap, no resync
    window, every seq committed in order); the one without falls to bitmap mode — the
    window the journal exists to avoid. Both replay to their primaries."""
    size = 16 << 20
    port = free_port()
    doc = drva_doc(tmp_path, "drva-s", [domain_doc(1, "erp", [("vm1", "d0", size)]),
                                        domain_doc(2, "crm", [("vm2", "d0", size)])],
                   port=port, log_size="64MiB", seal_bytes="2MiB", seal_age_s=0.2)
    drva = DrvaProcess(doc, tmp_path)
    drva.start()
    disks = {1: Disk(tmp_path / "erp0.img", size), 2: Disk(tmp_path / "crm0.img", size)}
    buffer = 1 << 20
    with_journal = DomainFilter(1, [disks[1]], buffer_bytes_max=buffer,
                                spill=SpillJournal(tmp_path / "erp0.img.spill", 64 << 20))
    without = DomainFilter(2, [disks[2]], buffer_bytes_max=buffer)
    filters = [with_journal, without]
    client = FilterClient(filters, "127.0.0.1", port, SECRET.encode(), "host-1")
    client_task = asyncio.create_task(client.run())
    stop = asyncio.Event()
    written = [0]

    async def load() -> None:
        rng = np.random.default_rng(9)
        while not stop.is_set():
            for f in filters:
                batch = random_writes(rng, [size], 16, 32)
                f.capture(*batch)
                written[0] += len(batch[4])
            await asyncio.sleep(0.01)

    load_task = asyncio.create_task(load())
    try:
        await wait_until(lambda: all(f.acked_seq > 0 for f in filters), EVENTUALLY_S, "first acks")
        drva.kill()
        before = written[0]
        # Down until each domain has written 3x its memory buffer: more than it can hold.
        await wait_until(lambda: written[0] - before > 2 * 3 * buffer, EVENTUALLY_S, "writes during the outage")
        await asyncio.to_thread(drva.start)
        await wait_until(lambda: client.connections > 1, EVENTUALLY_S, "the filter to reconnect")
    finally:
        stop.set()
        await load_task
    await wait_until(lambda: all(f.mode == "normal" and f.acked_seq == f.next_seq - 1 for f in filters),
                     EVENTUALLY_S, "the filters to drain")
    store = FileStore(tmp_path / "store")
    for f in filters:
        await wait_until_committed(store, f.domain, f.next_seq - 1)
    client_task.cancel()
    await asyncio.gather(client_task, return_exceptions=True)
    drva.stop()
    assert with_journal.stats["spilled_frames"] > 0 and with_journal.spill.peak_bytes > buffer
    assert with_journal.stats["bitmap_entries"] == 0, "the journal should have held the outage"
    assert without.stats["bitmap_entries"] >= 1, "the control domain never overflowed: the test proved nothing"
    kept = await check_store(store, 1, [disks[1].sha256()], tmp_path)
    assert kept["windows"] == [] and kept["committed_seq"] == with_journal.next_seq - 1
    lost = await check_store(store, 2, [disks[2].sha256()], tmp_path)
    assert lost["windows"], "the control domain's resync window should be in its catalog"
    with_journal.close_spill()


# ---------------------------------------------------------------- a journal that loses its bytes

def _spill_a_lot(f: DomainFilter, size: int, seed: int) -> None:
    """Writes past the memory buffer, with no chance to send between them."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        f.capture(*random_writes(rng, [size], 16, 32))
    assert f.spilled_bytes > 1 << 20 and f.mode == "normal"


def _damage(f: DomainFilter, how: str) -> int:
    """Damage the journal under the filter; the first seq it held."""
    first = next(frame for frame in f.buffer if frame.spilled_at >= 0)
    if how == "truncated":
        os.truncate(f.spill.path, 0)
    else:  # one byte of the first spilled frame's payload, as a bad sector would
        with open(f.spill.path, "r+b") as fh:
            fh.seek(first.spilled_at + first.nbytes - 1)
            byte = fh.read(1)
            fh.seek(first.spilled_at + first.nbytes - 1)
            fh.write(bytes([byte[0] ^ 0xFF]))
    return first.first_seq


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
async def test_a_damaged_journal_sends_the_filter_to_a_resync_not_into_a_stall(tmp_path, how: str) -> None:
    """Frames never sent are in the journal when it loses its bytes: they go to the
    bitmap, the filter resyncs, and the DRVA's latest point is the primary. (Before, the
    session ended on the short read, and every reconnect met the same frame again.)"""
    size = 8 << 20
    disk = PrimaryDisk(tmp_path / "d.img", size)
    f = DomainFilter(1, [disk], buffer_bytes_max=256 << 10, frame_bytes_max=64 << 10,
                     spill=SpillJournal(tmp_path / "d.img.spill", 16 << 20))
    _spill_a_lot(f, size, 5)
    _damage(f, how)
    fake = FakeDrva()
    await fake.start()
    client = FilterClient([f], "127.0.0.1", fake.port, FAKE_SECRET, "host-1")
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: f.mode == "normal" and f.acked_seq == f.next_seq - 1 == fake.durable_seq,
                         EVENTUALLY_S, "the resync acked")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()
    assert f.stats["spill_frames_lost"] > 0 and f.stats["resyncs_completed"] == 1
    assert f.spill.broken is not None and f.spilled_bytes == 0 and f.spill.used_bytes == 0
    assert fake.gaps == [] and client.connections == 1  # no session ended over it
    assert fake.image(0, size) == disk.read(0, size)
    f.close_spill()


@pytest.mark.parametrize("drva_restarted", [False, True])
async def test_spilled_frames_sent_then_lost_keep_their_seqs_and_are_resynced(tmp_path, drva_restarted: bool) -> None:
    """Spilled frames were sent, staged at the DRVA, not durable; the connection drops
    and the journal loses them. Their seqs may be the DRVA's: each is resent as a filler
    of RESYNC_BEGIN records — dropped as a duplicate where the DRVA kept the frame, a
    resync window opened where a restart lost it — and their regions are resynced."""
    size = 8 << 20
    disk = PrimaryDisk(tmp_path / "d.img", size)
    f = DomainFilter(1, [disk], buffer_bytes_max=256 << 10, frame_bytes_max=64 << 10,
                     spill=SpillJournal(tmp_path / "d.img.spill", 16 << 20))
    fake = FakeDrva()
    await fake.start()
    fake.hold()  # everything stays staged
    client = FilterClient([f], "127.0.0.1", fake.port, FAKE_SECRET, "host-1")
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: client.connected, EVENTUALLY_S, "the WELCOME")
        _spill_a_lot(f, size, 6)
        await wait_until(lambda: fake.accepted == f.next_seq - 1, EVENTUALLY_S, "every frame sent")
        lost_first = _damage(f, "truncated")
        if drva_restarted:
            fake.forget_staged()
        before = client.connections
        fake.drop()
        await wait_until(lambda: f.stats["spill_frames_lost"] > 0, EVENTUALLY_S, "the resend to meet the damage")
        assert client.connections == before + 1 and f.mode == "bitmap"
        fake.release()
        await wait_until(lambda: f.mode == "normal" and f.acked_seq == f.next_seq - 1 == fake.durable_seq,
                         EVENTUALLY_S, "the resync acked")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()
    assert fake.gaps == []
    assert fake.image(0, size) == disk.read(0, size)
    if drva_restarted:  # the filler opened the window, the resync closed it
        assert fake.records[lost_first][0] == KIND_RESYNC_BEGIN
        assert fake.windows() == [(lost_first, fake.windows()[0][1])] and fake.windows()[0][1] is not None
    else:  # the DRVA's frames stand; the resync's own window follows them
        assert fake.records[lost_first][0] == KIND_WRITE
        assert all(first > lost_first for first, _ in fake.windows())
    f.close_spill()
