"""Overload (back-pressure, bitmap mode, resync) and initial seeding, in process."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from cdp.catalog import load_catalog
from cdp.replay import replay_reference
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from iofilter_sim.seeding import seed_disk
from tests.drva.harness import (
    SECRET, Disk, check_store, config, domain_doc, drva_doc, random_writes, sha256_file,
)
from tests.waiting import EVENTUALLY_S, wait_until
from tests.drva.test_crash import wait_until_committed

DISK = 32 << 20


async def start(tmp_path, log_size="64MiB", seal_bytes="2MiB", disks=1):
    doc = drva_doc(tmp_path, "drva-o", [domain_doc(1, "erp", [("vm1", f"d{i}", DISK) for i in range(disks)])],
                   log_size=log_size, seal_bytes=seal_bytes)
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    # A filter is welcomed once the domain's catalog is open (ERROR not_ready before):
    # the tests below slow the store down right after, which must not delay the open.
    await wait_until(lambda: d.domains[1].catalog_ready, EVENTUALLY_S, "the catalog open")
    return d


@pytest.mark.slow
async def test_full_log_forces_backpressure_then_bitmap_then_resync(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="drva.session")
    drva = await start(tmp_path, log_size="10MiB", seal_bytes="1MiB")
    slow = FaultyStore(FileStore(tmp_path / "store"))
    drva.shipper.store = slow
    disk = Disk(tmp_path / "erp0.img", DISK)
    f = DomainFilter(1, [disk], buffer_bytes_max=8 << 20)
    client = FilterClient([f], "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    rng = np.random.default_rng(9)
    f.capture(*random_writes(rng, [DISK], 32, 32))
    mark_seq = f.mark("before-overload")
    mark_sha = disk.sha256()
    # The store slows down: the log fills (the sender offers far more than 1 MiB per
    # 0.5 s). Slower puts only lengthen the drain below (a 10 MiB log at one segment put
    # per delay), which took past a minute at 2 s on a loaded machine.
    slow.set_delay("put", 0.5)
    saw_backpressure = False
    for _ in range(400):
        f.capture(*random_writes(rng, [DISK], 32, 64))
        saw_backpressure |= drva.committer.backpressure
        await asyncio.sleep(0.005)
        if f.mode == "bitmap" and saw_backpressure:
            break
    assert saw_backpressure and f.mode == "bitmap"
    # FILTER_STATE travels in the stream, behind the frames already sent; the DRVA reads
    # them only as the log drains below low water, one slow (0.5 s) segment upload at a
    # time: seconds on an idle machine, more under coverage. Hence no short deadline.
    # The DRVA's view is a moment, not a state to poll: once the log has drained the
    # filter resyncs and is back to normal, which can be before any poll sees "bitmap"
    # (it was, one run in three). Its log says each mode it was told.
    def told(mode: str) -> bool:
        return any(r.getMessage() == "filter_mode" and getattr(r, "fields", {}).get("mode") == mode
                   for r in caplog.records)

    await wait_until(lambda: told("bitmap"), EVENTUALLY_S, "the DRVA told of bitmap mode")
    for _ in range(20):  # live writes go on in bitmap mode
        f.capture(*random_writes(rng, [DISK], 32, 64))
        await asyncio.sleep(0.01)
    slow.set_delay("put", 0)
    await wait_until(lambda: f.mode == "normal", EVENTUALLY_S, "the resync to finish")
    assert f.stats["resyncs_completed"] >= 1
    f.capture(*random_writes(rng, [DISK], 32, 32))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter to drain")
    await wait_until(lambda: drva.domains[1].committed_seq == f.next_seq - 1, EVENTUALLY_S, "the commits")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await drva.stop()
    store = FileStore(tmp_path / "store")
    summary = await check_store(store, 1, [disk.sha256()], tmp_path)
    resync = [w for w in summary["windows"] if w["kind"] == "resync"]
    assert resync and all(w["last_seq"] is not None for w in resync)
    assert resync[0]["first_seq"] > mark_seq
    # The point before the window still recovers exactly.
    paths, _ = await replay_reference(store, 1, tmp_path / "at-mark", mark_seq)
    assert sha256_file(paths[0]) == mark_sha


@pytest.mark.slow
async def test_seeding_a_disk_with_content_while_it_is_written(tmp_path):
    drva = await start(tmp_path, disks=2)
    disks = [Disk(tmp_path / "erp0.img", DISK, fill_seed=1), Disk(tmp_path / "erp1.img", DISK, fill_seed=1)]
    f = DomainFilter(1, disks)
    client = FilterClient([f], "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    rng = np.random.default_rng(2)
    stop = asyncio.Event()

    async def load() -> None:  # live writes to the first 4 MiB of disk 0 while seeding
        while not stop.is_set():
            f.capture(*random_writes(rng, [4 << 20], 8, 32))
            await asyncio.sleep(0.005)

    load_task = asyncio.create_task(load())
    first = await seed_disk(client, f, 1, chunk_size=1 << 20)
    second = await seed_disk(client, f, 0, chunk_size=1 << 20)
    stop.set()
    await load_task
    # The disks started identical: chunks disk 0 did not change since are stored once.
    assert first["chunks_stored"] > 8
    assert second["chunks_deduplicated"] >= first["chunks_stored"] - 4
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter to drain")
    store = FileStore(tmp_path / "store")
    await wait_until_committed(store, 1, f.next_seq - 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await drva.stop()
    summary = await check_store(store, 1, [d.sha256() for d in disks], tmp_path)  # bases only
    assert sorted(b["disk"] for b in summary["bases"]) == [0, 1]
    seeding = [w for w in summary["windows"] if w["kind"] == "seeding"]
    assert len(seeding) == 2
    state, _ = await load_catalog(store, 1)
    assert all(w["last_seq"] <= state.timeline().committed_seq for w in seeding)
