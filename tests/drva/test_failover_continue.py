"""After a failover (``rocva.failover``), the recovery site's DRVA continues the domain on
the new timeline: a new filter on the recovered disks numbers its writes from the fork
seq on, everything it acks reaches the store on the new timeline, and a recovery of the
new timeline's latest point equals the recovery site's disks. The protected site's DRVA,
still running, is fenced at its next commit and serves the domain no more (issue 11)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from cdp.catalog import load_catalog
from cdp.digest import sha256_file
from cdp.store.fs import FileStore
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from rocva import RecoverOptions, Target, recover
from rocva.failover import failover
from tests.drva.harness import (EVENTUALLY_S, SECRET, Disk, config, domain_doc, drva_doc, random_writes,
                                stream_committed,
                                running_drva, wait_until)

DISK = 8 << 20


def drva_config(tmp_path, name: str, site: str):
    doc = drva_doc(tmp_path, name, [domain_doc(1, "erp", [("vm1", "d0", DISK)])], seal_bytes="1MiB",
                   seal_age_s=0.1)
    return dataclasses.replace(config(doc), site=site)


async def test_the_recovery_site_continues_the_domain_on_the_new_timeline(tmp_path) -> None:
    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(3)
    (tmp_path / "a").mkdir()
    primary_a = Disk(tmp_path / "a" / "d0.img", DISK)
    filter_a = DomainFilter(1, [primary_a])
    datastore = tmp_path / "site-b" / "datastore"
    async with running_drva(drva_config(tmp_path, "drva-a", "site-a"), check_failure=False) as drva_a:
        await stream_committed(drva_a, [filter_a], rng, 200, 32)
        at_failover = sha256_file(primary_a.path)
        result = await failover(store, 1, Target.latest(), datastore, site="site-b")
        fork_seq = result["fork_seq"]
        assert fork_seq == filter_a.next_seq - 1
        assert sha256_file(datastore / "vm1-d0.img") == at_failover

        # Site A goes on writing: its DRVA is fenced at the next commit.
        client = FilterClient([filter_a], "127.0.0.1", drva_a.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        filter_a.capture(*random_writes(rng, [DISK], 50, 32))
        await wait_until(lambda: drva_a.domains[1].fenced, EVENTUALLY_S, "site A's DRVA fenced")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert "timeline 2 (owner site-b)" in drva_a.domains[1].stats.last_error

        # Site B: a DRVA that never served the domain, a new filter on the recovered disk.
        async with running_drva(drva_config(tmp_path, "drva-b", "site-b")) as drva_b:
            primary_b = Disk(datastore / "vm1-d0.img", DISK)
            filter_b = DomainFilter(1, [primary_b])
            await stream_committed(drva_b, [filter_b], rng, 150, 32)
            assert filter_b.next_seq - 1 == fork_seq + 150  # numbered on from the fork
    state, _ = await load_catalog(store, 1)
    tl = state.timeline()
    assert (tl.id, tl.owner, tl.fork_seq, tl.committed_seq) == (2, "site-b", fork_seq, fork_seq + 150)
    recovered = await recover(store, 1, RecoverOptions(Target.latest(), tmp_path / "check", checksum=True))
    assert recovered["images"][0]["sha256"] == sha256_file(datastore / "vm1-d0.img")
    # Nothing site A wrote after the fork is on the new timeline: at the fork seq the
    # new timeline equals site A's disk at the failover.
    at_fork = await recover(store, 1, RecoverOptions(Target.seq(fork_seq), tmp_path / "fork", checksum=True))
    assert at_fork["images"][0]["sha256"] == at_failover


async def test_a_filter_is_not_welcomed_before_the_catalog_says_where_seqs_continue(tmp_path, monkeypatch) -> None:
    """The recovery site's DRVA knows the domain's durable seq only from the catalog. A
    filter that connected before the catalog opened was once welcomed with durable seq 0,
    numbered from 1, and had its acked writes dropped as already committed."""
    from drva.shipper import Shipper

    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(4)
    (tmp_path / "a").mkdir()
    async with running_drva(drva_config(tmp_path, "drva-a", "site-a")) as drva_a:
        await stream_committed(drva_a, [DomainFilter(1, [Disk(tmp_path / "a" / "d0.img", DISK)])], rng, 80, 32)
    datastore = tmp_path / "site-b"
    fork_seq = (await failover(store, 1, Target.latest(), datastore, site="site-b"))["fork_seq"]

    opened = asyncio.Event()
    real_open = Shipper.open_catalog

    async def late_open(self, dom):
        await opened.wait()
        await real_open(self, dom)

    monkeypatch.setattr(Shipper, "open_catalog", late_open)
    async with running_drva(drva_config(tmp_path, "drva-b", "site-b"), ready=False) as drva_b:
        filter_b = DomainFilter(1, [Disk(datastore / "vm1-d0.img", DISK)])
        client = FilterClient([filter_b], "127.0.0.1", drva_b.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        try:
            await wait_until(lambda: client.connections or "not_ready" in (client.last_error or ""), EVENTUALLY_S,
                             "the filter welcomed or refused")
            # Write as soon as the filter may: before the catalog opens if it was welcomed.
            if not client.connections:
                opened.set()
                await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter welcomed")
            filter_b.capture(*random_writes(rng, [DISK], 60, 32))
            await wait_until(lambda: filter_b.acked_seq == filter_b.next_seq - 1, EVENTUALLY_S, "acks")
            opened.set()
            await wait_until(lambda: drva_b.domains[1].committed_seq == filter_b.next_seq - 1, EVENTUALLY_S,
                             "every write committed")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert filter_b.next_seq - 1 == fork_seq + 60
    recovered = await recover(store, 1, RecoverOptions(Target.latest(), tmp_path / "check", checksum=True))
    assert recovered["images"][0]["sha256"] == sha256_file(datastore / "vm1-d0.img")


async def test_a_drva_taking_a_domain_over_waits_for_the_fork_instead_of_fencing(tmp_path) -> None:
    """``takeover``: the recovery site's DRVA starts while the failover rehydrates; until
    the fork it neither fences the domain nor welcomes a filter, then continues it. The
    same DRVA without takeover is fenced by the other site's timeline (site A back)."""
    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(4)
    (tmp_path / "a").mkdir()
    filter_a = DomainFilter(1, [Disk(tmp_path / "a" / "d0.img", DISK)])
    async with running_drva(drva_config(tmp_path, "drva-a", "site-a")) as drva_a:
        await stream_committed(drva_a, [filter_a], rng, 100, 32)
    doc = drva_doc(tmp_path, "drva-b", [{**domain_doc(1, "erp", [("vm1", "d0", DISK)]), "takeover": True}],
                   seal_bytes="1MiB", seal_age_s=0.1)
    cfg_b = dataclasses.replace(config(doc), site="site-b")
    assert cfg_b.domains[0].takeover
    async with running_drva(cfg_b, ready=False) as drva_b:
        dom = drva_b.domains[1]
        await wait_until(lambda: "waiting for the failover's fork" in (dom.stats.last_error or ""), EVENTUALLY_S,
                         "the takeover waiting")
        assert not dom.fenced and not dom.catalog_ready
        result = await failover(store, 1, Target.latest(), tmp_path / "datastore", site="site-b")
        await wait_until(lambda: dom.catalog_ready, EVENTUALLY_S, "the catalog open after the fork")
        assert not dom.fenced and dom.stats.last_error is None and dom.committed_seq == result["fork_seq"]
        filter_b = DomainFilter(1, [Disk(tmp_path / "datastore" / "vm1-d0.img", DISK)])
        await stream_committed(drva_b, [filter_b], rng, 50, 32)
        assert filter_b.next_seq - 1 == result["fork_seq"] + 50
    # without takeover, a DRVA of site A meets site B's timeline: fenced, as before
    async with running_drva(drva_config(tmp_path, "drva-a2", "site-a")) as drva_a2:
        assert drva_a2.domains[1].fenced and "owned by 'site-b'" in drva_a2.domains[1].stats.last_error


async def test_after_a_failback_the_old_site_drva_adopts_the_new_timeline_and_drops_its_old_entries(tmp_path):
    """Site A's DRVA holds writes of the old timeline it never shipped (fenced after the
    failover) — more of them than site B wrote on the new one. After the failback
    (``rocva.failback``) forks a timeline for A at B's last point, A's DRVA, restarted,
    must drop those entries (the failback rewrote where they landed) instead of shipping
    them onto A's new timeline, and go on from the fork."""
    from cdp.dirtymap import DirtyMap
    from rocva.failback import LocalDisk, failback

    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(8)
    (tmp_path / "a").mkdir()
    primary_a = Disk(tmp_path / "a" / "d0.img", DISK)
    map_a = DirtyMap.open(primary_a.path, DISK, 1)
    filter_a = DomainFilter(1, [primary_a], dirty_maps=[map_a])
    datastore = tmp_path / "site-b" / "datastore"
    cfg_a = drva_config(tmp_path, "drva-a", "site-a")
    async with running_drva(cfg_a, check_failure=False) as drva_a:
        await stream_committed(drva_a, [filter_a], rng, 100, 32)
        result = await failover(store, 1, Target.latest(), datastore, site="site-b")
        fork_seq = result["fork_seq"]
        client = FilterClient([filter_a], "127.0.0.1", drva_a.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        filter_a.capture(*random_writes(rng, [DISK], 300, 32))  # acked into A's log, never shipped
        await wait_until(lambda: drva_a.domains[1].fenced and filter_a.acked_seq == filter_a.next_seq - 1,
                         EVENTUALLY_S, "site A's DRVA fenced, every write acked")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    filter_a.close_maps()
    async with running_drva(drva_config(tmp_path, "drva-b", "site-b")) as drva_b:
        filter_b = DomainFilter(1, [Disk(datastore / "vm1-d0.img", DISK)])
        await stream_committed(drva_b, [filter_b], rng, 100, 32)
    final = fork_seq + 100  # fewer than A's 300 leftovers: seqs A's log holds past B's last point

    out = await failback(store, 1, Target.seq(final), site="site-a", disks=[LocalDisk(0, primary_a.path, DISK)],
                         logs=[cfg_a.log_path])
    assert out["disks"][0]["mode"] == "delta" and out["disks"][0]["ranges"]["log"] > 0, out
    assert sha256_file(primary_a.path) == sha256_file(datastore / "vm1-d0.img")

    async with running_drva(cfg_a) as drva_a:  # back with its old log and metadata
        dom = drva_a.domains[1]
        await wait_until(lambda: dom.catalog_ready, EVENTUALLY_S, "the catalog open")
        assert not dom.fenced and dom.committed_seq == final and not dom.unsealed
        filter_a2 = DomainFilter(1, [primary_a])
        await stream_committed(drva_a, [filter_a2], rng, 60, 32)
        assert filter_a2.next_seq - 1 == final + 60
    state, _ = await load_catalog(store, 1)
    tl = state.timeline()
    assert (tl.id, tl.owner, tl.parent, tl.fork_seq, tl.committed_seq) == (3, "site-a", 2, final, final + 60)
    latest = await recover(store, 1, RecoverOptions(Target.latest(), tmp_path / "t3", checksum=True))
    assert latest["images"][0]["sha256"] == sha256_file(primary_a.path)
