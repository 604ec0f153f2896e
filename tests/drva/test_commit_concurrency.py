"""A DRVA commits its domains' catalogs concurrently (``Shipper.commit_step``): one slow
catalog round trip must not make every other domain wait its turn — with 100 domains
sealing every second, serial commits were most of their RPO (``benchmarks.scale``).
One domain's commits stay in order, and one domain's store error holds back only it."""

from __future__ import annotations

import asyncio
import re

import numpy as np

from cdp.catalog import load_catalog
from cdp.errors import StoreUnavailable
from cdp.store.fs import FileStore
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, config, domain_doc, drva_doc, random_writes, running_drva
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 4 << 20
DOMAINS = 4
CATALOG = re.compile(r"d/([0-9a-f]{8})/cat/")
PUT_DELAY_S = 0.2


class SlowCatalogStore:
    """The DRVA's store, with every catalog put held ``PUT_DELAY_S`` and counted: how
    many were in flight at once. Domain ``failing`` gets a store error instead."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.inflight = 0
        self.inflight_max = 0
        self.failing: int | None = None
        self.refused = 0

    async def put(self, key: str, data, **kwargs):
        m = CATALOG.match(key)
        if m is None:
            return await self.inner.put(key, data, **kwargs)
        if int(m.group(1), 16) == self.failing:
            self.refused += 1
            raise StoreUnavailable(f"test: catalog put of {key} refused")
        self.inflight += 1
        self.inflight_max = max(self.inflight_max, self.inflight)
        try:
            await asyncio.sleep(PUT_DELAY_S)
            return await self.inner.put(key, data, **kwargs)
        finally:
            self.inflight -= 1

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


async def test_domains_commit_concurrently_and_one_failing_store_holds_back_only_its_domain(tmp_path) -> None:
    doc = drva_doc(tmp_path, "drva-c", [domain_doc(i, f"dom{i}", [(f"vm{i}", "d0", DISK)])
                                        for i in range(1, DOMAINS + 1)], seal_bytes="1MiB", seal_age_s=0.05)
    rng = np.random.default_rng(5)
    async with running_drva(config(doc)) as d:
        slow = SlowCatalogStore(d.shipper.store)
        for writer in d.shipper.writers.values():
            writer.store = slow
        filters = [DomainFilter(i, [Disk(tmp_path / f"d{i}.img", DISK)]) for i in range(1, DOMAINS + 1)]
        client = FilterClient(filters, "127.0.0.1", d.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        try:
            for _ in range(3):  # several rounds: each domain commits more than once, in order
                for f in filters:
                    f.capture(*random_writes(rng, [DISK], 8, 16))
                await wait_until(lambda: all(d.domains[f.domain].committed_seq == f.next_seq - 1 for f in filters),
                                 EVENTUALLY_S, "every domain committed")
            # Four domains whose commits each take 0.2 s: they overlapped.
            assert slow.inflight_max >= 2, slow.inflight_max

            # Domain 1's catalog puts now fail: the others still commit; domain 1 catches up after.
            slow.failing = 1
            for f in filters:
                f.capture(*random_writes(rng, [DISK], 8, 16))
            await wait_until(lambda: all(d.domains[f.domain].committed_seq == f.next_seq - 1 for f in filters[1:]),
                             EVENTUALLY_S, "domains 2.. committed while domain 1's catalog puts fail")
            await wait_until(lambda: slow.refused >= 1, EVENTUALLY_S, "domain 1's commit refused")
            assert d.domains[1].committed_seq < filters[0].next_seq - 1
            assert d.domains[1].stats.catalog_errors >= 1
            slow.failing = None
            await wait_until(lambda: d.domains[1].committed_seq == filters[0].next_seq - 1, EVENTUALLY_S,
                             "domain 1 committed once its store answers again")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        committed = {i: d.domains[i].committed_seq for i in range(1, DOMAINS + 1)}
    # What the catalogs say is what the DRVA retired, domain by domain.
    store = FileStore(tmp_path / "store")
    for i, seq in committed.items():
        state, _ = await load_catalog(store, i)
        assert state.timeline().committed_seq == seq, (i, state.timeline().committed_seq, seq)
