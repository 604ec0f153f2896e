"""Consolidation and retention against a domain a DRVA is writing (FORMAT.md §8.3): the
job's catalog generations race the DRVA's; the DRVA absorbs them (never fenced), nothing
acked is lost, and the latest point recovers to the primaries."""

from __future__ import annotations

import asyncio

import numpy as np

from cdp.catalog import load_catalog
from cdp.store.fs import FileStore
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from rocva import RecoverOptions, recover
from rocva.consolidate import consolidate
from rocva.verify import verify
from tests.drva.harness import (
    SECRET, Disk, DrvaProcess, domain_doc, drva_doc, free_port, random_writes,
)
from tests.drva.test_crash import wait_until_committed
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 16 << 20
# Consolidation jobs that must commit a catalog generation while the DRVA writes.
JOBS_COMMITTED_MIN = 3


async def test_consolidation_races_a_live_drva(tmp_path):
    port = free_port()
    doc = drva_doc(tmp_path, "drva-c", [domain_doc(1, "erp", [("vm1", "d0", DISK), ("vm1", "d1", DISK)])],
                   port=port, log_size="48MiB", seal_bytes="1MiB", seal_age_s=0.1)
    drva = DrvaProcess(doc, tmp_path)
    drva.start()
    disks = [Disk(tmp_path / "d0.img", DISK), Disk(tmp_path / "d1.img", DISK)]
    filt = DomainFilter(1, disks)
    client = FilterClient([filt], "127.0.0.1", port, SECRET.encode(), "host-1")
    client_task = asyncio.create_task(client.run())
    store = FileStore(tmp_path / "store")
    stop = asyncio.Event()

    async def load() -> None:
        rng = np.random.default_rng(3)
        while not stop.is_set():
            filt.capture(*random_writes(rng, [d.size for d in disks], 8, 32))
            await asyncio.sleep(0.01)

    jobs = []

    async def maintain() -> None:
        # Something to consolidate first: segments the DRVA committed.
        await wait_until_committed(store, 1, 1)
        while not stop.is_set():
            jobs.append(await consolidate(store, 1, older_than_s=0.3, retention_s=1.0, scratch_dir=tmp_path,
                                          sweep_all_chunks=True))
            await asyncio.sleep(0.2)  # paces the jobs; it waits for nothing

    def raced_enough() -> bool:
        committed = [j for j in jobs if j["generation"] is not None]
        return len(committed) >= JOBS_COMMITTED_MIN and sum(j["segments_removed"] for j in jobs) > 0

    load_task, maint_task = asyncio.create_task(load()), asyncio.create_task(maintain())
    try:
        # Until the jobs did what the test checks, however long a slow machine takes.
        await wait_until(lambda: raced_enough() or maint_task.done(), EVENTUALLY_S,
                         f"{JOBS_COMMITTED_MIN} consolidations committed while the DRVA writes")
    finally:
        stop.set()
        await asyncio.gather(load_task, maint_task)
    await wait_until(lambda: filt.mode == "normal" and filt.acked_seq == filt.next_seq - 1, EVENTUALLY_S,
                     "the drain")
    await wait_until_committed(store, 1, filt.next_seq - 1)
    client_task.cancel()
    await asyncio.gather(client_task, return_exceptions=True)
    status = drva.status()
    drva.stop()
    logs = drva.log_path.read_text()
    committed = [j for j in jobs if j["generation"] is not None]
    assert len(committed) >= JOBS_COMMITTED_MIN, jobs
    assert "catalog_caught_up" in logs and '"fenced"' not in logs
    assert [d["fenced"] for d in status["domains"]] == [False]
    state, _ = await load_catalog(store, 1)
    assert state.timeline().committed_seq == filt.next_seq - 1 and state.timeline().horizon_seq > 0
    assert sum(j["segments_removed"] for j in jobs) > 0
    result = await recover(store, 1, RecoverOptions("latest", tmp_path / "out", checksum=True))
    assert [im["sha256"] for im in result["images"]] == [d.sha256() for d in disks]
    report = await verify(store, 1, deep=True)
    assert report["ok"], report["problems"]
