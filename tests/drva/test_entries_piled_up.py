"""A store that is down piles a domain's durable entries up in its ``EntryQueue``, most of
them as rows (``drva.entry_queue``; its sizes shrunk here so that a few dozen frames
cross every boundary). When the store comes back, and after a restart that reads them
all back from the log, every write and every mark reaches the store as it was captured."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import drva.lanes
from cdp.catalog import load_catalog
from cdp.digest import sha256_file
from cdp.store.faulty import FaultyStore
from cdp.store.open import open_store
from cdp.testing.drva_config import domain_doc, drva_doc
from drva import entry_queue
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, check_store, config, random_writes, running_drva
from tests.waiting import EVENTUALLY_S, wait_until


DISK = 4 << 20
BATCHES = 80


@pytest.fixture
def stores(monkeypatch) -> list[FaultyStore]:
    """Every store the DRVAs open, as a FaultyStore (the newest last); the entry queue's
    sizes shrunk so that a few dozen frames cross every boundary."""
    monkeypatch.setattr(entry_queue, "HOT_MAX", 2)
    monkeypatch.setattr(entry_queue, "BLOCK_ROWS", 3)
    opened: list[FaultyStore] = []

    def faulty_store(url: str) -> FaultyStore:
        opened.append(FaultyStore(open_store(url)))
        return opened[-1]

    monkeypatch.setattr(drva.lanes, "open_store", faulty_store)
    return opened


async def test_entries_held_as_rows_through_an_outage_and_a_restart_all_ship(tmp_path, stores):
    store_dir = tmp_path / "store"
    doc = drva_doc(tmp_path, "drva-p", [domain_doc(1, "erp", [("vm1", "d0", DISK)])], store=f"file://{store_dir}",
                   seal_bytes="1MiB", seal_age_s=0.05)
    disk = Disk(tmp_path / "erp.img", DISK)
    filt = DomainFilter(1, [disk])
    rng = np.random.default_rng(11)
    marks: dict[str, int] = {}
    async with running_drva(config(doc)) as d:
        dom = d.domains[1]
        stores[-1].offline()
        client = FilterClient([filt], "127.0.0.1", d.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        try:
            for batch in range(BATCHES):
                filt.capture(*random_writes(rng, [DISK], 3, 8))
                if batch % 5 == 4:
                    marks[f"m{batch}"] = filt.mark(f"m{batch}")
                await asyncio.sleep(0.01)  # a frame of its own, mostly
            await wait_until(lambda: dom.durable_seq == filt.next_seq - 1, EVENTUALLY_S, "every write durable")
            assert dom.unsealed.rows > 0, "the outage piled no entry up as a row"
            held = [(e.first_seq, e.last_seq) for e in dom.unsealed]
            assert held[0][0] <= dom.sealed_seq + 1 and held[-1][1] == dom.durable_seq
            assert all(a[1] + 1 == b[0] for a, b in zip(held, held[1:])), "the entries held have a gap"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    # Restarted with the store back: every entry comes back from the log, as rows mostly.
    async with running_drva(config(doc)) as d:
        await wait_until(lambda: d.domains[1].committed_seq == filt.next_seq - 1, EVENTUALLY_S,
                         "every write committed")
    store = open_store(f"file://{store_dir}")
    summary = await check_store(store, 1, [sha256_file(disk.path)], tmp_path)
    assert {m["name"]: m["seq"] for m in summary["marks"]} == marks
    state, _ = await load_catalog(store, 1)
    assert state.timeline().committed_seq == filt.next_seq - 1


async def test_a_stopped_domain_gives_its_cached_frames_back_to_the_budget(tmp_path, stores):
    """Entries pile up, their frames cached, while the store is down; then the domain is
    stopped here (a fence). Nothing will seal them before a restart: their share of the
    frame cache goes back at once, rows' frames too, and the entries stay (for the log)."""
    doc = drva_doc(tmp_path, "drva-f", [domain_doc(1, "erp", [("vm1", "d0", DISK)])],
                   store=f"file://{tmp_path / 'store'}", seal_bytes="16MiB", seal_age_s=600)  # none sealed
    filt = DomainFilter(1, [Disk(tmp_path / "erp.img", DISK)])
    rng = np.random.default_rng(12)
    async with running_drva(config(doc)) as d:
        dom = d.domains[1]
        await wait_until(lambda: dom.catalog_ready, EVENTUALLY_S, "the catalog open")
        stores[-1].offline()
        client = FilterClient([filt], "127.0.0.1", d.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        try:
            for _ in range(20):
                filt.capture(*random_writes(rng, [DISK], 3, 8))
                await asyncio.sleep(0.01)
            await wait_until(lambda: dom.durable_seq == filt.next_seq - 1, EVENTUALLY_S, "every write durable")
            assert dom.unsealed.rows > 0 and d.committer.cache_bytes > 0
            assert sum(e.frame is not None for e in dom.unsealed) == len(dom.unsealed)
            held = [(e.first_seq, e.last_seq) for e in dom.unsealed]
            dom.stop("stopped by the test")
            await wait_until(lambda: d.committer.cache_bytes == 0, EVENTUALLY_S, "the cached frames given back")
            assert [(e.first_seq, e.last_seq) for e in dom.unsealed] == held  # kept for the log
            assert all(e.frame is None for e in dom.unsealed) and not list(dom.unsealed.cached())
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
