"""A new filter instance for a domain a DRVA already holds (a second ``iofilter-sim run``
against the same store): it continues after the DRVA's durable seq instead of having
its first writes taken for duplicates and silently dropped — and one that captured writes
before it could learn that seq resyncs them after it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cdp.catalog import load_catalog
from cdp.store.fs import FileStore
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter, FilterError
from tests.drva.harness import (
    SECRET, Disk, DrvaProcess, check_store, domain_doc, drva_doc, free_port, random_writes,
)
from tests.waiting import EVENTUALLY_S, wait_until
from tests.drva.test_crash import wait_until_committed

DISK = 4 << 20


async def _run_filter(port: int, disk: Disk, rng: np.random.Generator, writes: int) -> DomainFilter:
    f = DomainFilter(1, [disk])
    client = FilterClient([f], "127.0.0.1", port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter to connect")
    f.capture(*random_writes(rng, [DISK], writes, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "acks")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return f


async def test_a_second_filter_run_continues_the_domain(tmp_path):
    port = free_port()
    drva = DrvaProcess(drva_doc(tmp_path, "drva-r", [domain_doc(1, "erp", [("vm", "d0", DISK)])], port=port,
                                seal_age_s=0.1, seal_bytes="1MiB"), tmp_path)
    drva.start()
    disk = Disk(tmp_path / "d0.img", DISK)
    rng = np.random.default_rng(2)
    try:
        first = await _run_filter(port, disk, rng, 60)
        second = await _run_filter(port, disk, rng, 20)  # fewer writes than the first run
        assert second.next_seq - 1 == first.next_seq - 1 + 20
        store = FileStore(tmp_path / "store")
        await wait_until_committed(store, 1, second.next_seq - 1)
        state, _ = await load_catalog(store, 1)
        assert state.timeline().committed_seq == second.next_seq - 1
        # A filter that numbered writes before it could learn the DRVA's seq, and never
        # sent them (its host started while the DRVA was down), puts them in its bitmap,
        # numbers on after the DRVA's seqs and resyncs them: nothing lost, nothing refused.
        late = DomainFilter(1, [disk])
        late.capture(*random_writes(rng, [DISK], 5, 16))
        client = FilterClient([late], "127.0.0.1", port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        await wait_until(lambda: late.mode == "normal" and late.acked_seq == late.next_seq - 1
                         and late.acked_seq > second.next_seq - 1, EVENTUALLY_S, "the resync acked")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert late.stats["resyncs_completed"] == 1 and client.connections >= 1
        await wait_until_committed(store, 1, late.next_seq - 1)
        await check_store(store, 1, [disk.sha256()], tmp_path)
    finally:
        drva.stop()


def test_a_filter_that_already_numbered_writes_cannot_jump() -> None:
    f = DomainFilter(1, [])
    f.continue_after(41)  # nothing captured yet: fine
    assert (f.next_seq, f.acked_seq) == (42, 41)
    with pytest.raises(FilterError, match="already numbered"):
        f.continue_after(100)
