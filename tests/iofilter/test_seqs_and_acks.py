"""A seq once sent names one write for good, and only what was sent can be acked.

A frame sent on a connection that then drops may sit staged at the DRVA, not durable at
the next WELCOME, and become durable later. A filter that dropped it to the bitmap and
numbered new writes with its seqs had them dropped by the DRVA as duplicates — and
acked: recovery at the latest point differed from the primary. An ACK of a seq the
filter never sent answered FLUSHes and unflagged the dirty-region maps for writes the
DRVA never received.
"""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdp.dirtymap import DirtyMap, read_dirty_map
from cdp.records import KIND_WRITE
from iofilter_sim.client import FilterClient
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter
from iofilter_sim.nbd_capture import CapturedDisk, DomainCapture
from tests.iofilter.fake_drva import SECRET, FakeDrva, frame_contents
from tests.waiting import EVENTUALLY_S, wait_until

R = 64 << 10  # the region of a small disk
SIZE = 4 << 20


def write(f: DomainFilter, regions: list[int], byte: int) -> None:
    """One batch: 4 KiB of ``byte`` at the start of each region."""
    n = len(regions)
    f.capture(np.zeros(n, np.uint32), np.array(regions, np.uint64) * R, np.full(n, 4096, np.uint32),
              np.full(n, KIND_WRITE, np.uint8), bytes([byte]) * 4096 * n)


async def connected(f: DomainFilter, fake: FakeDrva) -> tuple[FilterClient, asyncio.Task]:
    client = FilterClient([f], "127.0.0.1", fake.port, SECRET, "host-1")
    task = asyncio.create_task(client.run())
    await wait_until(lambda: client.connected, EVENTUALLY_S, "the first WELCOME")
    return client, task


async def stopped(task: asyncio.Task, fake: FakeDrva) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await fake.close()


# ---------------------------------------------------------------- hole: seqs reused after a reconnect

async def test_frames_staged_at_the_drva_before_a_reconnect_keep_their_seqs(tmp_path) -> None:
    """Frames B are staged at the DRVA, not durable, when the connection drops under
    back-pressure; live writes then fill the buffer into bitmap mode; B becomes durable;
    the VM writes D over B. Recovery at the latest point must hold D."""
    disk = PrimaryDisk(tmp_path / "d.img", SIZE)
    f = DomainFilter(1, [disk], buffer_bytes_max=256 << 10)
    fake = FakeDrva()
    await fake.start()
    client, task = await connected(f, fake)
    write(f, list(range(16)), ord("A"))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1 == fake.accepted, EVENTUALLY_S, "A acked")
    fake.hold()  # the log device stalls: what comes now is staged, not durable
    for i in range(16):
        write(f, [i], ord("B"))  # a frame each
    b_last = f.next_seq - 1
    await wait_until(lambda: fake.accepted == b_last, EVENTUALLY_S, "B staged at the DRVA")
    fake.backpressure = True
    fake.ack()
    await wait_until(lambda: f.backpressure, EVENTUALLY_S, "the back-pressure seen")
    before = client.connections
    fake.drop()
    await wait_until(lambda: client.connections > before, EVENTUALLY_S, "the reconnect")
    k = 0
    while f.mode != "bitmap":  # live writes, with nothing acked, fill the buffer
        write(f, [32 + k % 16], ord("C"))
        k += 1
    assert f.next_seq > b_last, f"seqs {f.next_seq}..{b_last} were sent before, and are numbered again"
    fake.release()  # B is durable now
    write(f, list(range(16)), ord("D"))
    await wait_until(lambda: f.mode == "normal" and f.acked_seq == f.next_seq - 1 == fake.durable_seq,
                     EVENTUALLY_S, "the resync acked")
    await stopped(task, fake)
    assert fake.gaps == []
    assert fake.image(0, SIZE) == disk.read(0, SIZE), "the latest point differs from the primary"


OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(1, 24)),  # regions in one batch
    st.tuples(st.just("send"), st.integers(1, 8)),  # frames
    st.tuples(st.just("ack"), st.floats(0, 1)),  # how far into what the DRVA holds
    st.tuples(st.just("reconnect"), st.booleans()),  # True: the DRVA restarted, losing what was not durable
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, seed=st.integers(0, 2**16))
@example(ops=[("write", 8), ("send", 8), ("reconnect", False), ("write", 24), ("write", 24),
              ("write", 24), ("write", 8), ("send", 8), ("ack", 1.0)], seed=0)
def test_a_seq_on_the_wire_names_one_write_for_good(tmp_path_factory, ops, seed) -> None:
    """A model DRVA takes whatever is sent (first content of a seq wins, as it drops
    duplicates); through sends, acks, reconnects and bitmap entries, a seq is never sent
    twice with different content, and once everything is drained the DRVA's replay is
    the primary, byte for byte."""
    rng = np.random.default_rng(seed)
    disk = PrimaryDisk(tmp_path_factory.mktemp("seqs") / "d.img", SIZE)
    f = DomainFilter(1, [disk], buffer_bytes_max=96 << 10, frame_bytes_max=16 << 10)
    drva = FakeDrva()  # not served: its frame taking is the model
    sent: dict[int, tuple] = {}  # every seq's content, as first sent
    durable = 0

    def send(frames: int) -> None:
        for _ in range(frames):
            frame = f.next_unsent()
            if frame is None:
                return
            body = b"".join(bytes(memoryview(p).cast("B")) for p in f.wire_parts(frame))
            for seq, content in frame_contents(body)[2].items():
                assert sent.setdefault(seq, content) == content, f"seq {seq} sent again with other content"
            drva.take(body)
            f.mark_sent()

    for op, arg in ops:
        if op == "write":
            regions = rng.integers(0, SIZE // R, arg).tolist()
            write(f, regions, int(rng.integers(1, 256)))
        elif op == "send":
            send(arg)
        elif op == "ack":
            durable = max(durable, f.acked_seq + int(arg * (drva.accepted - f.acked_seq)))
            f.on_ack(durable)
        else:
            if arg:
                drva.cap = durable
                drva.forget_staged()
                drva.cap = None
            f.on_ack(durable)  # WELCOME
            f.rewind()
    for _ in range(1000):  # drain: the path is healthy from now on
        if f.mode == "normal" and f.next_unsent() is None and f.acked_seq == f.next_seq - 1:
            break
        send(1000)
        f.on_ack(drva.accepted)
        f.resync_step(True)
    assert f.mode == "normal" and f.acked_seq == f.next_seq - 1 == drva.accepted
    assert drva.gaps == []
    assert drva.image(0, SIZE) == disk.read(0, SIZE)


# ---------------------------------------------------------------- hole: an ack of what was never sent

async def test_an_ack_beyond_what_was_sent_is_refused_and_a_flush_waits(tmp_path) -> None:
    disk = PrimaryDisk(tmp_path / "d.img", 1 << 20)
    dirty_map = DirtyMap.open(disk.path, disk.size, 1)
    f = DomainFilter(1, [disk], dirty_maps=[dirty_map])
    fake = FakeDrva()
    await fake.start()
    fake.hold()  # nothing is durable yet
    client, task = await connected(f, fake)
    capture = DomainCapture(f, [disk], name="dom")
    capture.start()
    exported = CapturedDisk(capture, 0)
    await exported.write(0, b"A" * 4096, fua=False)
    await wait_until(lambda: fake.accepted == 1, EVENTUALLY_S, "the write at the DRVA")
    flush = asyncio.create_task(exported.flush())
    before = client.connections
    fake.ack(1_000_000)  # a seq the filter never numbered
    await wait_until(lambda: client.connections > before or flush.done(), EVENTUALLY_S, "a reconnect or the flush")
    assert not flush.done(), "the FLUSH returned on an ack of a write the DRVA never received"
    assert f.acked_seq == 0 and "only up to seq 1" in (client.last_error or ""), client.last_error
    f.clear_acked_regions(keep_s=0)  # what a clear pass would do now
    flags, _ = read_dirty_map(dirty_map.path, disk.size)
    assert flags[0], "the map unflagged a region whose write is not durable anywhere"
    fake.release()
    async with asyncio.timeout(EVENTUALLY_S):
        await flush
    assert f.acked_seq == 1
    await capture.close()
    await stopped(task, fake)
    dirty_map.close(clean=False)
