"""The paged catalog (FORMAT.md §8) against a simple model: random commits, lost replies,
retention by a maintenance job, timelines forked and their old writers fenced, old
generations collected — on the memory and file stores, and on the real S3 (moto) and
Azure (Azurite) servers.

The model is a plain list of rows per timeline. After every step the catalog loaded
from the store must equal the writer's head, and for every timeline the rows read page
by page, and the seq found for a time, must equal the model's. Pages are shrunk (4 rows,
3 references) in most examples so that a few hundred commits build a deep tree; the
loaders never depend on those numbers (the deltas say what folds).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp import catalog_page
from cdp.catalog import CatalogState, CatalogWriter, collect_generations, list_generations, load_catalog
from cdp.catalog_fork import fork_timeline
from cdp.catalog_read import CatalogView
from cdp.errors import Fenced, StoreUnavailable
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from tests.catalog_rows import segment_rows
from tests.conftest import make_azure_store, make_s3_store, unique_name

TS0 = 1_700_000_000_000_000_000
GAP_NS = 1000  # time between two segments: a time there falls between rows
DOMAIN = 3


@dataclass
class TimelineModel:
    rows: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # tl, first, last, first_ts, last_ts
    horizon: int = 0
    committed: int = 0
    marks: list[int] = field(default_factory=list)

    def kept(self) -> list[tuple[int, int, int, int, int]]:
        return [r for r in self.rows if r[2] > self.horizon]


class Run:
    """One random history against one store."""

    def __init__(self, store, faulty: FaultyStore, rng: random.Random) -> None:
        self.store, self.faulty, self.rng = store, faulty, rng
        self.models = {1: TimelineModel()}
        self.current = 1
        self.ts = TS0
        self.writer: CatalogWriter | None = None
        self.fenced: list[CatalogWriter] = []  # writers of older timelines
        self.pending: list[tuple[int, int, int, int, int]] = []  # uploaded, not committed yet

    async def start(self) -> None:
        state = CatalogState.new(DOMAIN, "model", TS0, "site-1")
        self.writer = CatalogWriter(self.faulty, state, by="drva of site-1", owner="site-1")
        await self.writer.commit({"disks": [{"disk": 0, "vm": "vm", "name": "d", "size": 1 << 20}]})

    def _make(self, state: CatalogState) -> dict | None:
        committed = state.timeline().committed_seq
        rows = [r for r in self.pending if r[2] > committed]
        if not rows:
            return None
        return {"add_segments": segment_rows(*({"timeline": r[0], "first_seq": r[1], "last_seq": r[2],
                                                 "first_ts": r[3], "last_ts": r[4], "size": r[2] - r[1] + 1,
                                                 "payload_raw_len": 7} for r in rows))}

    async def commit(self) -> None:
        m = self.models[self.current]
        for _ in range(self.rng.randint(1, 3)):  # segments uploaded since the last commit
            last_seq = (self.pending[-1][2] if self.pending else m.committed)
            first, n = last_seq + 1, self.rng.randint(1, 5)
            first_ts = self.ts = self.ts + GAP_NS
            self.ts += n
            self.pending.append((self.current, first, first + n - 1, first_ts, self.ts))
        if self.rng.random() < 0.3:  # a reply lost: the generation lands, the writer hears an error
            self.faulty.fail_next("put", 1, StoreUnavailable, after=True)
            with contextlib.suppress(StoreUnavailable):
                await self.writer.commit_shared(self._make)
        await self.writer.commit_shared(self._make)
        m.rows.extend(self.pending)
        m.committed = self.pending[-1][2]
        self.pending = []

    async def retention(self) -> None:
        tl = self.rng.choice(sorted(self.models))
        m = self.models[tl]
        ends = [r[2] for r in m.kept()]
        if not ends:
            return
        horizon = self.rng.choice(ends)
        job = await CatalogWriter.open(self.store, DOMAIN, by="cdp consolidate")
        await job.commit({"timeline": tl, "horizon_seq": horizon})
        m.horizon = horizon

    async def fork(self) -> None:
        m = self.models[self.current]
        ends = [m.horizon] + [r[2] for r in m.kept()]
        at = self.rng.choice(ends)
        new = max(self.models) + 1
        await fork_timeline(self.store, DOMAIN, at, f"site-{new}", by="failover")
        self.models[new] = TimelineModel([r for r in m.rows if r[2] <= at], m.horizon, at)
        self.fenced.append(self.writer)
        self.writer = await CatalogWriter.open(self.faulty, DOMAIN, by=f"drva of site-{new}", owner=f"site-{new}")
        self.current = new

    async def old_writer_is_fenced(self) -> None:
        if not self.fenced:
            return
        old = self.rng.choice(self.fenced)
        tl = old.state.current
        try:
            await old.commit_shared(lambda st: {"add_segments": segment_rows({
                "timeline": tl, "first_seq": st.timeline(tl).committed_seq + 1,
                "last_seq": st.timeline(tl).committed_seq + 1, "first_ts": self.ts + 1, "last_ts": self.ts + 1,
                "size": 1, "payload_raw_len": 1})})
        except Fenced:
            return
        raise AssertionError("a writer of an older timeline was not fenced")

    async def check(self) -> None:
        state, generation = await load_catalog(self.store, DOMAIN)
        assert state == self.writer.state or generation > self.writer.generation
        assert sorted(state.timelines) == sorted(self.models) and state.current == self.current
        for tl, m in self.models.items():
            view = CatalogView(self.store, state, generation, tl)
            assert (view.committed_seq, view.horizon_seq) == (m.committed, m.horizon), tl
            rows = await view.rows_between(1, 1 << 62)
            got = list(zip(*(rows[c].tolist() for c in ("timeline", "first_seq", "last_seq", "first_ts", "last_ts"))))
            assert got == m.kept(), (tl, got[:5], m.kept()[:5])
            t = view.tl
            assert len(t.tail) < catalog_page.PAGE_ROWS
            for r in self.rng.sample(m.kept(), min(4, len(m.kept()))):
                assert await view.seq_at_time(r[4] + self.rng.randrange(GAP_NS)) == r[2]
                one = await view.rows_between(r[1], r[1])
                assert int(one["first_seq"][0]) == r[1]
            if m.rows:
                assert await view.seq_at_time(m.rows[0][3] - 1) is None

    async def collect(self) -> None:
        await collect_generations(self.store, DOMAIN, self.writer.generation)
        generations = await list_generations(self.store, DOMAIN)
        assert len(generations) <= 2 * 64 + 1


async def catalog_property(store, seed: int, steps: int, small_pages: bool) -> None:
    rng = random.Random(seed)
    patches = (mock.patch.object(catalog_page, "PAGE_ROWS", 4), mock.patch.object(catalog_page, "PAGE_FANOUT", 3))
    with contextlib.ExitStack() as stack:
        if small_pages:
            for p in patches:
                stack.enter_context(p)
        run = Run(store, FaultyStore(store), rng)
        await run.start()
        for step in range(steps):
            roll = rng.random()
            if roll < 0.65:
                await run.commit()
            elif roll < 0.75:
                await run.retention()
            elif roll < 0.8:
                await run.fork()
            elif roll < 0.85:
                await run.old_writer_is_fenced()
            elif roll < 0.9:
                await run.collect()
            else:
                await run.check()
        await run.check()


local = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
histories = given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 160), small_pages=st.booleans())


@local
@histories
def test_memory_store_matches_the_model(seed, steps, small_pages) -> None:
    asyncio.run(catalog_property(MemoryStore(), seed, steps, small_pages))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@histories
def test_file_store_matches_the_model(seed, steps, small_pages) -> None:
    with tempfile.TemporaryDirectory() as root:
        asyncio.run(catalog_property(FileStore(Path(root)), seed, steps, small_pages))


def test_a_long_history_with_real_page_sizes_matches_the_model() -> None:
    """Real page sizes: a level-1 page, retention inside pages, a fork inside a page."""
    async def go() -> None:
        store = MemoryStore()
        rng = random.Random(11)
        run = Run(store, FaultyStore(store), rng)
        await run.start()
        while run.writer.state.timeline().segments < catalog_page.PAGE_ROWS * catalog_page.PAGE_FANOUT + 100:
            await run.commit()
        assert list(run.writer.state.timeline().refs["level"]) == [1]
        await run.check()
        await run.retention()
        await run.fork()
        for _ in range(300):
            await run.commit()
        await run.old_writer_is_fenced()
        await run.check()

    asyncio.run(go())


cloud = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
cloud_histories = given(seed=st.integers(0, 2**32 - 1), steps=st.integers(20, 80))


async def _cloud(make, create: str, seed: int, steps: int) -> None:
    store = make()
    try:
        await getattr(store, create)()
        await catalog_property(store, seed, steps, True)
    finally:
        await store.close()


@cloud
@cloud_histories
def test_s3_matches_the_model(moto_server, seed, steps) -> None:
    asyncio.run(_cloud(lambda: make_s3_store(moto_server, unique_name()), "create_bucket", seed, steps))


@cloud
@cloud_histories
def test_azure_matches_the_model(azurite, seed, steps) -> None:
    asyncio.run(_cloud(lambda: make_azure_store(azurite, unique_name()), "create_container", seed, steps))
