"""SIGKILL a DRVA 10 times under load (issue acceptance): afterwards no gap, no
duplicate, and every write the filter saw acknowledged is in the store."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from cdp.catalog import load_catalog
from cdp.store.fs import FileStore
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (
    SECRET, Disk, DrvaProcess, check_store, domain_doc, drva_doc, free_port, random_writes,
)
from tests.waiting import EVENTUALLY_S, wait_until, wait_until_async

KILLS = 10
DISK = 32 << 20


@pytest.mark.slow
async def test_sigkill_drva_ten_times_under_load(tmp_path):
    port = free_port()
    doc = drva_doc(tmp_path, "drva-k", [domain_doc(1, "erp", [("vm1", "d0", DISK), ("vm1", "d1", DISK)]),
                                        domain_doc(2, "crm", [("vm2", "d0", DISK)])],
                   port=port, log_size="48MiB", seal_bytes="2MiB", seal_age_s=0.2)
    drva = DrvaProcess(doc, tmp_path)
    drva.start()
    disks = {1: [Disk(tmp_path / "erp0.img", DISK), Disk(tmp_path / "erp1.img", DISK)],
             2: [Disk(tmp_path / "crm0.img", DISK)]}
    filters = [DomainFilter(d, disks[d]) for d in (1, 2)]
    client = FilterClient(filters, "127.0.0.1", port, SECRET.encode(), "host-1")
    client_task = asyncio.create_task(client.run())
    stop = asyncio.Event()

    async def load() -> None:
        rng = np.random.default_rng(7)
        while not stop.is_set():
            for f in filters:
                f.capture(*random_writes(rng, [d.size for d in f.disks], 16, 32))
            await asyncio.sleep(0.01)  # ~15-20 MB/s per domain

    load_task = asyncio.create_task(load())
    rng = random.Random(11)
    acked_at_kill: list[dict[int, int]] = []
    try:
        for i in range(KILLS):
            await wait_until(lambda: client.connections > i, EVENTUALLY_S, "the filter to reconnect")
            # Kill under load, with acks flowing: some acked since the restart, then a
            # random moment (the sleep picks when to kill, it waits for nothing).
            acked = {f.domain: f.acked_seq for f in filters}
            await wait_until(lambda: all(f.acked_seq > acked[f.domain] for f in filters), EVENTUALLY_S,
                             f"acks after restart {i}")
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            drva.kill()
            acked_at_kill.append({f.domain: f.acked_seq for f in filters})
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await asyncio.to_thread(drva.start)
        await wait_until(lambda: client.connections > KILLS, EVENTUALLY_S, "the filter to reconnect")
        await wait_until(lambda: all(f.acked_seq > acked_at_kill[-1][f.domain] for f in filters), EVENTUALLY_S,
                         "acks after the last restart")
    finally:
        stop.set()
        await load_task
    assert client.connections >= KILLS + 1
    await wait_until(lambda: all(f.mode == "normal" and f.acked_seq == f.next_seq - 1 for f in filters),
                     EVENTUALLY_S, "the filters to drain")
    store = FileStore(tmp_path / "store")
    for f in filters:
        await wait_until_committed(store, f.domain, f.next_seq - 1)
    client_task.cancel()
    await asyncio.gather(client_task, return_exceptions=True)
    drva.stop()
    for f in filters:
        summary = await check_store(store, f.domain, [d.sha256() for d in disks[f.domain]], tmp_path)
        for acked in acked_at_kill:
            assert acked[f.domain] <= summary["committed_seq"]
        assert summary["committed_seq"] == f.next_seq - 1
        assert acked_at_kill[-1][f.domain] > 0, "nothing was acked: the test proved nothing"
    assert "drva_started" in drva.log_path.read_text()


async def wait_until_committed(store, domain: int, seq: int, timeout_s: float = EVENTUALLY_S) -> None:
    """Wait until the store's catalog of ``domain`` holds ``seq`` committed."""
    async def committed() -> bool:
        state, _ = await load_catalog(store, domain)
        return state is not None and state.timeline().committed_seq >= seq

    await wait_until_async(committed, timeout_s, f"domain {domain}'s catalog to commit seq {seq}")
