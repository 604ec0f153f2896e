"""Seeding holes a review reproduced (each test failed before the fix):

1. a consolidation during a seed built a base of zeros plus writes inside the copy, and
   recovery then used it (the seeding window was only committed at SEED_END);
2. an abandoned seed kept its chunk-writer lease for ever, so no chunk sweep ran;
3. a SEED_BEGIN/SEED_END with a seq the stream never reaches wiped every point.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from cdp import locks, wire
from cdp.base_image import is_zero
from cdp.catalog import load_catalog
from cdp.store.fs import FileStore
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from rocva import RecoverOptions, recover, recoverable_ranges
from rocva.consolidate import consolidate
from rocva.plan import load_state
from rocva.retention import sweep_chunks
from tests.drva.harness import SECRET, Disk, config, domain_doc, drva_doc, random_writes
from tests.drva.test_crash import wait_until_committed
from tests.waiting import EVENTUALLY_S, wait_until, wait_until_async

DISK = 8 << 20
CHUNK = 1 << 20


async def _start(tmp_path, disk_size=DISK, **kw):
    doc = drva_doc(tmp_path, "drva-o", [domain_doc(1, "erp", [("vm1", "d0", disk_size)])], **kw)
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    await wait_until(lambda: d.domains[1].catalog_ready, EVENTUALLY_S, "the catalog open")
    disk = Disk(tmp_path / "erp0.img", disk_size, fill_seed=1)
    f = DomainFilter(1, [disk])
    client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    await wait_until(lambda: client.connected, EVENTUALLY_S, "the filter connected")
    return d, disk, f, client, task


def _begin(start_seq: int, size: int = DISK) -> list:
    return wire.control(wire.SEED_BEGIN, {"domain": 1, "disk": 0, "disk_size": size, "chunk_size": CHUNK,
                                          "start_seq": start_seq})


def _end(end_seq: int) -> list:
    return wire.control(wire.SEED_END, {"domain": 1, "disk": 0, "end_seq": end_seq})


async def _stop(d, task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await d.stop()


async def _open_windows(store) -> list[dict]:
    state, _ = await load_catalog(store, 1)
    return [w for w in state.timeline().windows if w["last_seq"] is None]


async def _no_writer_lease(store) -> bool:
    return not await locks.live_locks(store, locks.writer_prefix(), skew_s=0)


# ------------------------------------------------------------------ hole 1


async def test_consolidation_during_a_seed_builds_no_base_and_recovery_is_the_primary(tmp_path):
    d, disk, f, client, task = await _start(tmp_path, log_size="64MiB", seal_bytes="1MiB", seal_age_s=0.1)
    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(2)
    start_seq = f.next_seq - 1
    await client.send_seed([_begin(start_seq)])
    # The open window is in the catalog (before any record after start_seq is).
    assert await wait_until_async(lambda: _open_windows(store), EVENTUALLY_S, "the open window") == [
        {"kind": "seeding", "first_seq": start_seq + 1, "last_seq": None}]
    n = DISK // CHUNK
    mid = None
    for i in range(n):
        f.capture(*random_writes(rng, [1 << 20], 8, 16))  # live writes to the first MiB
        data = f.disks[0].read(i * CHUNK, CHUNK)
        if not is_zero(data):
            await client.send_seed([wire.seed_chunk_message(1, 0, i, data)])
        if i == n // 2:  # mid-seed: the periodic consolidation job runs
            await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
            await wait_until_committed(store, 1, f.next_seq - 1)
            state = await load_state(store, 1)
            assert all(b <= start_seq for _, b in recoverable_ranges(state)), "no point inside the copy"
            mid = await consolidate(FileStore(tmp_path / "store"), 1, older_than_s=0,
                                    now_ns=time.time_ns() + 10**9)
    assert mid is not None and mid["bases_added"] == 0
    end_seq = f.next_seq - 1
    await client.send_seed([_end(end_seq)])
    await wait_until(lambda: client.seed_done.get((1, 0)) is not None, EVENTUALLY_S, "SEED_DONE")
    f.capture(*random_writes(rng, [1 << 20], 8, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    await wait_until_committed(store, 1, f.next_seq - 1)
    await _stop(d, task)
    state, _ = await load_catalog(store, 1)
    tl = state.timeline()
    assert [(b["seq"], b["origin"]) for b in tl.bases] == [(start_seq, "seed")]
    assert tl.windows == [{"kind": "seeding", "first_seq": start_seq + 1, "last_seq": end_seq - 1}]
    r = await recover(store, 1, RecoverOptions(tl.committed_seq, tmp_path / "out", checksum=True))
    assert r["images"][0]["sha256"] == disk.sha256()
    # After the seed, consolidation works again, at a point after the copy.
    after = await consolidate(store, 1, older_than_s=0, now_ns=time.time_ns() + 10**9)
    assert after["consolidated_seq"] is not None and after["consolidated_seq"] >= end_seq
    r = await recover(store, 1, RecoverOptions(tl.committed_seq, tmp_path / "out2", checksum=True))
    assert r["images"][0]["sha256"] == disk.sha256()


# ------------------------------------------------------------------ hole 2


async def test_a_seed_whose_filter_dies_drops_its_lease_and_window(tmp_path):
    d, disk, f, client, task = await _start(tmp_path)
    store = FileStore(tmp_path / "store")
    await client.send_seed([_begin(f.next_seq - 1)])
    for i in range(3):
        await client.send_seed([wire.seed_chunk_message(1, 0, i, f.disks[0].read(i * CHUNK, CHUNK))])
    await wait_until_async(lambda: locks.live_locks(store, locks.writer_prefix(), skew_s=0), EVENTUALLY_S,
                           "the seed's writer lease")
    # Its three chunks stored (the sweep below must find them to delete), no manifest yet.
    await wait_until(lambda: len(list((tmp_path / "store" / "c").rglob("*.chk"))) == 3, EVENTUALLY_S,
                     "the seed's chunks stored")
    task.cancel()  # the filter dies mid-seed
    await asyncio.gather(task, return_exceptions=True)
    await wait_until(lambda: not d.seeder.jobs and not d.seeder.finishing, EVENTUALLY_S, "the seed dropped")
    assert await _no_writer_lease(store)
    assert await _open_windows(store) == []
    swept = await sweep_chunks(store, ttl_s=5, skew_s=0)  # not Busy: the chunks of the dead seed go
    assert swept["chunks_deleted"] == 3
    await d.stop()


async def test_an_idle_seed_is_dropped_while_its_session_lives(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="drva.seeder")
    d, disk, f, client, task = await _start(tmp_path)
    d.seeder.idle_s = 0.5
    store = FileStore(tmp_path / "store")
    await client.send_seed([_begin(f.next_seq - 1)])
    await client.send_seed([wire.seed_chunk_message(1, 0, 0, f.disks[0].read(0, CHUNK))])
    await wait_until(lambda: any(r.getMessage() == "seed_abandoned" for r in caplog.records), EVENTUALLY_S,
                     "the idle seed abandoned")
    await wait_until(lambda: not d.seeder.jobs and not d.seeder.finishing, EVENTUALLY_S, "its clean-up")
    assert await _no_writer_lease(store)
    assert await _open_windows(store) == []
    assert client.connected and client.connections == 1  # the session goes on
    # ... and its stream still commits consistent points.
    f.capture(*random_writes(np.random.default_rng(3), [DISK], 10, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    await wait_until_committed(store, 1, f.next_seq - 1)
    assert recoverable_ranges(await load_state(store, 1))[-1][1] == f.next_seq - 1
    await _stop(d, task)


async def test_seed_end_below_start_is_refused_and_drops_the_lease(tmp_path):
    d, disk, f, client, task = await _start(tmp_path)
    store = FileStore(tmp_path / "store")
    f.capture(*random_writes(np.random.default_rng(4), [DISK], 10, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    start = f.next_seq - 1
    await client.send_seed([_begin(start)])
    await client.send_seed([wire.seed_chunk_message(1, 0, 0, f.disks[0].read(0, CHUNK))])
    await client.send_seed([_end(start - 1)])
    await wait_until(lambda: "SEED_END.end_seq" in (client.last_error or ""), EVENTUALLY_S, "the refusal")
    await wait_until(lambda: not d.seeder.jobs and not d.seeder.finishing, EVENTUALLY_S, "the seed dropped")
    assert await _no_writer_lease(store)
    assert await _open_windows(store) == []
    await _stop(d, task)


# ------------------------------------------------------------------ hole 3


async def test_a_seed_at_a_seq_the_stream_never_reaches_commits_nothing(tmp_path):
    d, disk, f, client, task = await _start(tmp_path, disk_size=4 << 20)
    d.seeder.end_wait_s = 0.5
    store = FileStore(tmp_path / "store")
    f.capture(*random_writes(np.random.default_rng(1), [4 << 20], 50, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    await wait_until_committed(store, 1, f.next_seq - 1)
    before = recoverable_ranges(await load_state(store, 1))
    assert before == [(0, f.next_seq - 1)]
    bogus = 2**63
    await client.send_seed([_begin(bogus, 4 << 20)])
    await client.send_seed([wire.seed_chunk_message(1, 0, 0, f.disks[0].read(0, CHUNK))])
    await client.send_seed([_end(bogus)])
    await wait_until(lambda: "SEED_END.end_seq" in (client.last_error or ""), EVENTUALLY_S, "the refusal")
    await wait_until(lambda: not d.seeder.jobs and not d.seeder.finishing, EVENTUALLY_S, "the seed dropped")
    assert client.seed_done.get((1, 0)) is None
    state = await load_state(store, 1)
    assert state.bases == [] and state.windows == []
    assert recoverable_ranges(state) == before
    assert await _no_writer_lease(store)
    await _stop(d, task)


async def test_seed_end_waits_for_records_the_filter_sends_behind_it(tmp_path):
    """start_seq/end_seq ahead of what the DRVA accepted is the normal case (the filter
    numbers records as it captures them): the seed waits for them, and is taken."""
    d, disk, f, client, task = await _start(tmp_path, disk_size=4 << 20)
    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(5)
    f.capture(*random_writes(rng, [4 << 20], 20, 16))  # captured, not sent yet
    start = f.next_seq - 1
    await client.send_seed([_begin(start, 4 << 20)])
    for i in range(4):
        await client.send_seed([wire.seed_chunk_message(1, 0, i, f.disks[0].read(i * CHUNK, CHUNK))])
    f.capture(*random_writes(rng, [4 << 20], 20, 16))
    await client.send_seed([_end(f.next_seq - 1)])
    await wait_until(lambda: client.seed_done.get((1, 0)) is not None, EVENTUALLY_S, "SEED_DONE")
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    await wait_until_committed(store, 1, f.next_seq - 1)
    await _stop(d, task)
    state = await load_state(store, 1)
    assert [(b["seq"], b["origin"]) for b in state.bases] == [(start, "seed")]
    r = await recover(store, 1, RecoverOptions(state.committed_seq, tmp_path / "out", checksum=True))
    assert r["images"][0]["sha256"] == disk.sha256()


# ------------------------------------------------------------------ a replaced session's chunk


async def test_a_replaced_session_waiting_for_an_upload_slot_lets_its_chunk_go(tmp_path):
    """Every upload slot is taken (another seed's uploads, against a slow store); a
    session's SEED_CHUNK waits for one, holding its chunk (up to 64 MiB). The filter
    reconnects: the new session replaces the old, whose seed is abandoned — and the
    chunk it waited with was still held until a slot freed, one more per reconnection."""
    from drva.seeder import UPLOADS_MAX

    d, disk, f, client, task = await _start(tmp_path)
    slots = d.seeder.slots
    for _ in range(UPLOADS_MAX):
        await slots.acquire()
    await client.send_seed([_begin(f.next_seq - 1)])
    await client.send_seed([wire.seed_chunk_message(1, 0, 0, f.disks[0].read(0, CHUNK))])
    await wait_until(lambda: slots.waiting == 1, EVENTUALLY_S, "the chunk waiting for a slot")
    old = next(iter(d.sessions))
    task.cancel()  # the host's process goes; its session, waiting in the seeder, does not notice
    await asyncio.gather(task, return_exceptions=True)
    again = FilterClient([DomainFilter(1, [disk])], "127.0.0.1", d.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(again.run())
    await wait_until(lambda: again.connected and old.closed, EVENTUALLY_S, "the new session in the old one's place")
    await wait_until(lambda: not slots.waiting, EVENTUALLY_S, "the replaced session's chunk let go")
    assert not d.seeder.jobs
    for _ in range(UPLOADS_MAX):
        slots.release()
    assert slots.used == 0  # no slot taken by the abandoned chunk
    await _stop(d, task)
