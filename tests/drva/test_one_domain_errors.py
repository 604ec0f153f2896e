"""One domain's trouble stops that domain, not the DRVA, and drops none of its data.

* A log entry of one domain that cannot be read back (EIO: a bad sector) once ended the
  sealer, and the whole DRVA with it (exit 70): now that domain stops (``seal_failed``,
  naming the partition) and the other keeps acking and shipping.
* A timeline the metadata repository records that the catalog does not hold once sent
  the domain into ``Shipper._adopt``, which drops every unshipped log entry of it (the
  failback path, FORMAT.md §8.5): now only a timeline the catalog holds is adopted; any
  other value stops the domain with its entries kept."""

from __future__ import annotations

import asyncio
import dataclasses
import errno

import numpy as np
import pytest

from cdp.catalog_fork import fork_timeline
from cdp.errors import LogError
from cdp.meta import MetaRepository
from cdp.replog import ReplicationLog
from cdp.store import open_store
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (
    SECRET,
    Disk,
    config,
    random_writes,
    running_drva,
    stream_committed,
    two_domains,
)
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 4 << 20
WRITES = 12


def _configs(tmp):
    """(holding, shipping): the same DRVA sealing nothing while the test runs, and sealing at once."""
    holding = config(two_domains(tmp, "drva-x", size=DISK, log_size="8MiB", seal_bytes="64MiB",
                                 seal_age_s=3600.0, site="site-a"))
    return holding, dataclasses.replace(holding, seal_age_s=0.1)


def _filters(tmp):
    return {i: DomainFilter(i, [Disk(tmp / f"dom{i}.img", DISK)]) for i in (1, 2)}


async def _stream_acked(drva, filters, seed: int) -> None:
    """WRITES more writes per filter, streamed until all are acked (durable in the log)."""
    client = FilterClient(list(filters), "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter connected")
        rng = np.random.default_rng(seed)
        for f in filters:
            f.capture(*random_writes(rng, [DISK], WRITES, 16))
        await wait_until(lambda: all(f.acked_seq == f.next_seq - 1 for f in filters), EVENTUALLY_S,
                         "every write acked")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _no_task_failed(drva):
    if drva.failure is not None:
        raise AssertionError(f"a DRVA task failed (a real DRVA exits 70): {drva.failure!r}")


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"),
    LogError("log partition (test): cannot read the entry (Input/output error)"),
], ids=["OSError", "LogError"])
async def test_an_unreadable_entry_stops_its_domain_only(tmp_path, monkeypatch, error):
    holding, shipping = _configs(tmp_path)
    filters = _filters(tmp_path)
    async with running_drva(holding) as d:
        await _stream_acked(d, filters.values(), 1)
        bad = {e.pos for e in d.domains[2].unsealed}  # read back from the log after the restart
    real_read_view = ReplicationLog.read_view

    def read_view(self, pos):
        if pos in bad:
            raise error
        return real_read_view(self, pos)

    monkeypatch.setattr(ReplicationLog, "read_view", read_view)
    async with running_drva(shipping) as d:
        def settled() -> bool:
            _no_task_failed(d)
            return d.domains[2].fenced and d.domains[1].committed_seq == filters[1].acked_seq

        await wait_until(settled, EVENTUALLY_S, "domain 2 stopped, domain 1 committed")
        named = str(shipping.log_path) if isinstance(error, OSError) else "log partition (test)"
        assert named in d.domains[2].stats.last_error and "domain 2 is stopped" in d.domains[2].stats.last_error
        assert d.domains[2].committed_seq == 0
        # Domain 1 goes on: more writes are acked and shipped.
        await stream_committed(d, [filters[1]], np.random.default_rng(2), WRITES, 16)
        assert d.domains[1].committed_seq == filters[1].acked_seq
        _no_task_failed(d)


async def _committed_then_held(tmp):
    """Both domains: WRITES committed, then WRITES more acked and left in the log."""
    holding, shipping = _configs(tmp)
    filters = _filters(tmp)
    async with running_drva(shipping) as d:
        await stream_committed(d, list(filters.values()), np.random.default_rng(1), WRITES, 16)
        committed = d.domains[1].committed_seq
    async with running_drva(holding) as d:
        await _stream_acked(d, filters.values(), 3)
        held = [(e.first_seq, e.last_seq) for e in d.domains[1].unsealed]
    assert held and held[-1][1] == filters[1].acked_seq > committed
    return holding, shipping, filters, committed, held


def _record_timeline(cfg, domain: int, timeline) -> None:
    with MetaRepository.open(cfg.meta_path) as meta:
        doc = meta.read()
        doc["domains"][str(domain)]["timeline"] = timeline
        meta.write(doc)


async def test_a_timeline_the_catalog_does_not_hold_adopts_nothing(tmp_path):
    holding, _, _, committed, held = await _committed_then_held(tmp_path)
    _record_timeline(holding, 1, 99)  # another store's, or a damaged repository's
    async with running_drva(holding) as d:
        assert d.domains[1].fenced and "timeline 99" in d.domains[1].stats.last_error
        assert [(e.first_seq, e.last_seq) for e in d.domains[1].unsealed] == held  # nothing dropped
        assert d.domains[1].committed_seq == committed
        assert not d.domains[2].fenced  # the other domain is served
        _no_task_failed(d)


async def test_a_failback_timeline_the_catalog_holds_is_still_adopted(tmp_path):
    holding, _, _, committed, _ = await _committed_then_held(tmp_path)
    store = open_store(holding.store_url)
    try:
        await fork_timeline(store, 1, committed, "site-a", parent=1)  # failed over and back here
    finally:
        await store.close()
    async with running_drva(holding) as d:
        assert not d.domains[1].fenced
        assert len(d.domains[1].unsealed) == 0  # the old timeline's entries: dropped, as §8.5 says
        assert d.domains[1].committed_seq == committed
        assert d.shipper.writers[1].state.current == 2
