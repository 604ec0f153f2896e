"""The clean-up of a domain's orphan seeding windows (``Seeder.session_opened``) while its
catalog is not open: a DRVA whose store is down at start still welcomes the filters of
the domains its metadata repository knows (``catalog_known``), and every WELCOME asked
for a clean-up. It must be one per domain however often the filters reconnect, wait for
the catalog without polling it (``DomainState.catalog_settled``), do its work once the
catalog opens, end when the domain is fenced, and be cancelled cleanly at stop."""

from __future__ import annotations

import asyncio
import gc
import logging

import numpy as np

import drva.lanes as lanes
from cdp import wire
from cdp.store.faulty import FaultyStore
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import Disk, config, running_drva, stream_committed, two_domains
from tests.drva.test_protocol import handshake
from tests.waiting import EVENTUALLY_S, wait_until

RECONNECTS = 40


async def _known_domains_with_an_orphan_window(tmp_path):
    """A DRVA's configuration whose metadata repository knows domains 1 and 2 (a write of
    each committed) and whose domain 1 has an open seeding window no job owns (a DRVA
    that stopped mid-seed); the window."""
    cfg = config(two_domains(tmp_path, "drva-o", seal_bytes="1MiB", seal_age_s=0.1))
    async with running_drva(cfg) as d:
        filters = [DomainFilter(1, [Disk(tmp_path / "a.img", 8 << 20)]),
                   DomainFilter(2, [Disk(tmp_path / "b.img", 8 << 20)])]
        await stream_committed(d, filters, np.random.default_rng(5), 8, 8)
        dom = d.domains[1]
        orphan = {"kind": "seeding", "first_seq": dom.committed_seq + 1, "last_seq": None}
        assert await d.seeder._commit_windows(dom, lambda windows: [*windows, orphan])
        assert orphan in d.shipper.writers[1].state.timeline().windows
    return cfg, orphan


def _store_down_at_start(monkeypatch) -> list[FaultyStore]:
    """Every store the next DRVA opens is offline until the test brings it back."""
    stores: list[FaultyStore] = []
    real = lanes.open_store

    def down(url: str) -> FaultyStore:
        store = FaultyStore(real(url))
        store.offline()
        stores.append(store)
        return store

    monkeypatch.setattr(lanes, "open_store", down)
    return stores


async def _reconnect(d, times: int) -> None:
    """A filter of domains 1 and 2 welcomed, and gone, ``times`` times."""
    for _ in range(times):
        reader, writer, *_ = await handshake(d, (1, 2))
        msg = await wire.read_message(reader, "t")
        assert msg.type == wire.WELCOME, msg.json("t")
        writer.close()
        await writer.wait_closed()
    await wait_until(lambda: not d.sessions and not d.session_tasks, EVENTUALLY_S, "every session ended")


async def test_reconnects_while_the_catalog_is_down_keep_one_orphan_cleanup_per_domain(tmp_path, monkeypatch):
    cfg, orphan = await _known_domains_with_an_orphan_window(tmp_path)
    stores = _store_down_at_start(monkeypatch)
    async with running_drva(cfg, ready=False) as d:
        assert all(dom.catalog_known and not dom.catalog_ready for dom in d.domains.values())
        await _reconnect(d, 1)
        tasks_after_one = len(asyncio.all_tasks())
        await _reconnect(d, RECONNECTS)
        # One clean-up per domain waits for its catalog, not one per WELCOME (there were
        # 2 x (RECONNECTS + 1), each polling the catalog ten times a second, for ever).
        assert len(d.seeder.finishing) == 2, len(d.seeder.finishing)
        assert len(asyncio.all_tasks()) <= tasks_after_one, (len(asyncio.all_tasks()), tasks_after_one)

        for store in stores:
            store.online()
        await wait_until(lambda: all(dom.catalog_ready for dom in d.domains.values()), EVENTUALLY_S,
                         "the catalogs open once the store is back")
        # The clean-up that waited did its work: the orphan window is gone.
        await wait_until(lambda: not d.seeder.finishing, EVENTUALLY_S, "the clean-ups done")
        assert orphan not in d.shipper.writers[1].state.timeline().windows
        assert d.seeder.orphan_cleanups == {}


async def test_a_waiting_cleanup_ends_when_its_domain_is_fenced_and_is_cancelled_cleanly_at_stop(
        tmp_path, monkeypatch, caplog):
    cfg, _ = await _known_domains_with_an_orphan_window(tmp_path)
    _store_down_at_start(monkeypatch)
    caplog.set_level(logging.ERROR)
    async with running_drva(cfg, ready=False) as d:
        await _reconnect(d, 3)
        cleanups = dict(d.seeder.orphan_cleanups)
        assert sorted(cleanups) == [1, 2] and not any(t.done() for t in cleanups.values())
        d.domains[2].stop("fenced by the test")  # its catalog will not open here: nothing to wait for
        await wait_until(lambda: cleanups[2].done(), EVENTUALLY_S, "domain 2's clean-up ended")
        assert cleanups[2].exception() is None and list(d.seeder.orphan_cleanups) == [1]
        waiting = cleanups[1]
    # Stopped with domain 1's clean-up waiting: cancelled, awaited, nothing left pending.
    assert waiting.cancelled()
    assert d.seeder.orphan_cleanups == {} and not d.seeder.finishing
    gc.collect()
    assert not [r for r in caplog.records if "seed_failed" in r.getMessage() or "destroyed" in r.getMessage()]
