"""The retention sweep's page rule after a fork (FORMAT.md §8.4): a page names no timeline
and forked timelines reuse seq numbers, so a page is deleted only when every timeline
lets it go — and the current timeline, whose writer commits while the sweep runs, only
once its horizon has passed the page. Here the current timeline's writer folds a page
between the sweep's catalog load and its deletes (inside its listing of pages): that
page must survive, and the head that names it must stay readable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.catalog import load_catalog
from cdp.catalog_page import ref_key
from cdp.catalog_read import CatalogView
from cdp.catalog_state import CatalogState
from cdp.layout import page_prefix
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder
from rocva import RecoverOptions, recover, retention
from rocva.consolidate import consolidate

DISK_BYTES = 64 << 10
PAGE_ROWS = 256  # segments folded into a level-0 page (§8.4)


class HookedStore:
    """``inner``, but the first listing of the domain's pages runs ``hook`` first: the
    sweep lists pages after it loaded the catalog and before it deletes."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner, self.hook = inner, None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def list(self, prefix: str, **kw):
        if self.hook is not None and "/page/" in prefix:
            hook, self.hook = self.hook, None
            await hook()
        async for info in self.inner.list(prefix, **kw):
            yield info


async def _forked(store: MemoryStore, rng: np.random.Generator) -> DomainBuilder:
    """Timeline 1 to seq 600 (a segment per 10 seqs), timeline 2 forked at 100 with 10
    writes of its own."""
    b = await DomainBuilder(store, disks=(("vm", "d", DISK_BYTES),), ns_per_seq=10**9).start()
    at_fork = None
    for _ in range(600):
        b.write(0, int(rng.integers(0, DISK_BYTES // 512)) * 512, rng.bytes(512))
        if b.seq % 10 == 0:
            await b.seal()
        if b.seq == 100:
            at_fork = [bytearray(m) for m in b.model]
    await b.seal()
    await b.fork(100, at_fork, "site-b")
    for _ in range(10):
        b.write(0, int(rng.integers(0, DISK_BYTES // 512)) * 512, rng.bytes(512))
    await b.seal()
    return b


async def _referenced_pages(store, state: CatalogState, generation: int) -> set[str]:
    """Every page key some timeline's head reaches, through every level."""
    out: set[str] = set()
    for tl in state.timelines:
        view = CatalogView(store, state, generation, tl)

        await _walk(view, view.tl.refs, out)
    return out


async def _walk(view: CatalogView, refs: np.ndarray, out: set[str]) -> None:
    for ref in refs:
        out.add(ref_key(view.domain_id, ref))
        page = await view.page(ref)
        if page.level:
            await _walk(view, page.entries, out)


async def _stored_pages(store, domain: int) -> set[str]:
    return {i.key async for i in store.list(page_prefix(domain))}


async def test_a_page_the_current_timeline_folds_during_the_sweep_is_kept(tmp_path: Path):
    inner = MemoryStore()
    rng = np.random.default_rng(3)
    b = await _forked(inner, rng)
    store = HookedStore(inner)

    async def current_writer_goes_on() -> None:  # PAGE_ROWS segments: a level-0 page is folded
        for _ in range(PAGE_ROWS):
            b.write(0, int(rng.integers(0, DISK_BYTES // 512)) * 512, rng.bytes(512))
            await b.seal()

    store.hook = current_writer_goes_on
    job = await consolidate(store, b.domain, older_than_s=0, retention_s=0, now_ns=b.ts(700) + 10**12,
                            scratch_dir=tmp_path)
    assert store.hook is None, "the writer did not run inside the sweep: the test would prove nothing"
    assert [(t["timeline"], t["horizon_seq"]) for t in job["timelines"]] == [(2, 110), (1, 600)]
    state, generation = await load_catalog(inner, b.domain)
    tl = state.timeline()
    assert tl.id == 2 and len(tl.refs) == 1 and int(tl.refs[0]["first_seq"]) == 111
    # Every page a head names is in the store (the folded one among them)...
    named = await _referenced_pages(inner, state, generation)
    assert named and named <= await _stored_pages(inner, b.domain)
    assert job["sweep"]["pages_deleted"] == 0
    # ...and the newest point of timeline 2 is recovered to what the disks held.
    out = await recover(inner, b.domain, RecoverOptions(tl.committed_seq, tmp_path / "out", checksum=True))
    assert out["images"][0]["sha256"] == hashlib.sha256(b.model[0]).hexdigest()


async def test_once_the_current_horizon_passes_a_page_the_sweep_deletes_it(tmp_path: Path):
    """Conservative, not leaky: the page kept above goes when retention passes it."""
    store = MemoryStore()
    rng = np.random.default_rng(5)
    b = await _forked(store, rng)
    for _ in range(PAGE_ROWS + 10):
        b.write(0, int(rng.integers(0, DISK_BYTES // 512)) * 512, rng.bytes(512))
        await b.seal()
    pages = await _stored_pages(store, b.domain)
    assert pages
    job = await consolidate(store, b.domain, older_than_s=0, retention_s=0, now_ns=b.ts(b.seq) + 10**12,
                            scratch_dir=tmp_path)
    assert job["sweep"]["pages_deleted"] == len(pages)
    assert await _stored_pages(store, b.domain) == set()
    state, generation = await load_catalog(store, b.domain)
    assert await _referenced_pages(store, state, generation) == set()


def _state(timelines: list[tuple[int, int]], current: int) -> CatalogState:
    """A head with timelines ``1..n`` of ``(horizon_seq, committed_seq)``."""
    state = CatalogState.new(7, "dom", 1, "site-a")
    base = state.timelines[1]
    for k, (h, c) in enumerate(timelines, start=1):
        t = base.copy()
        t.id, t.horizon_seq, t.committed_seq = k, h, c
        state.timelines[k] = t
    state.current = current
    return state


seqs = st.integers(0, 1000)


@given(tls=st.lists(st.tuples(seqs, seqs).map(sorted), min_size=1, max_size=4), data=st.data())
def test_a_page_the_current_timeline_may_still_hold_is_never_expired(tls, data):
    """Whatever the other timelines: a page ending above the current timeline's horizon
    stays (its writer may have folded it after the load); one ending at or below every
    horizon goes."""
    current = data.draw(st.integers(1, len(tls)))
    state = _state([tuple(t) for t in tls], current)
    first = data.draw(seqs)
    last = data.draw(st.integers(first, 1100))
    cur_h = state.timeline().horizon_seq
    if last > cur_h:
        assert not retention.page_expired(state, first, last)
    if last <= min(h for h, _ in tls):
        assert retention.page_expired(state, first, last)
    # A non-current timeline never keeps a page beyond its (final) rows.
    if retention.page_expired(state, first, last):
        assert all(last <= h or (k != current and first > c) for k, (h, c) in enumerate(tls, start=1))


@pytest.mark.parametrize("committed", [110, 366])
def test_a_non_current_timeline_lets_go_of_pages_beyond_its_rows(committed):
    # timeline 1 stopped at 600 (its horizon 600): a page 111..366 is not its own rows
    # (or wholly behind its horizon); timeline 2 is current with horizon 400.
    state = _state([(600, 600), (400, max(committed, 400))], 2)
    assert retention.page_expired(state, 111, 366)
    # timeline 2 current with its horizon at 110: the page may be its newest.
    state = _state([(600, 600), (110, committed)], 2)
    assert not retention.page_expired(state, 111, 366)
    # timeline 1 current (never consolidated), timeline 2 dead at 110: 111..366 is timeline 1's.
    state = _state([(0, 600), (110, 110)], 1)
    assert not retention.page_expired(state, 111, 366)
