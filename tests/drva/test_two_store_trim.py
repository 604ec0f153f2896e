"""A DRVA shipping to two stores trims its log only behind what its durable metadata
records committed (FORMAT.md §4): each lane commits on its own, and one lane's trim, its
target once taken after its metadata write, dropped entries another lane had just
committed while the metadata on disk still named that lane's older seq. A crash right
then (both files just synced) left a gap in the log after the recorded seq, and the
restarted DRVA stopped the domain, its acked entries unshipped behind it.

Every trim that returns while some domain's committed seq is ahead of the durable
metadata is checked the way a power cut would: the log and the metadata are copied
(both were just synced) and a DRVA is started on the copies."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np

from cdp.meta import MetaRepository
from cdp.replog import ReplicationLog
from cdp.testing.drva_config import domain_doc, drva_doc
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, config, random_writes, running_drva

DISK = 4 << 20
SNAPSHOTS = 3
RUN_S = 20.0  # bound on writing until SNAPSHOTS such trims happened
META_WRITE_DELAY_S = 0.03  # a slower metadata device: the other lane's commit lands meanwhile


def _doc(root: Path, stores: Path) -> dict:
    crm = {**domain_doc(2, "crm", [("vm2", "d0", DISK)]), "store": f"file://{stores / 'store-b'}"}
    return drva_doc(root, "drva-s", [domain_doc(1, "erp", [("vm1", "d0", DISK)]), crm],
                    store=f"file://{stores / 'store-a'}", version=2, seal_bytes="1MiB", seal_age_s=0.05,
                    log_size="16MiB")


async def test_a_trim_never_outruns_the_durable_metadata_of_another_lane(tmp_path, monkeypatch):
    durable: dict[int, int] = {}
    snaps: list[Path] = []
    running: dict[str, Drva] = {}
    real_write, real_trim = MetaRepository.write, ReplicationLog.trim

    def meta_write(self, doc):
        time.sleep(META_WRITE_DELAY_S)  # in the write's worker thread
        real_write(self, doc)
        durable.update({int(k): v["committed_seq"] for k, v in doc["domains"].items()})

    def trim(self, target):
        real_trim(self, target)
        d = running.get("d")
        if d is None or len(snaps) >= SNAPSHOTS:
            return
        if any(dom.committed_seq > durable.get(i, 0) for i, dom in d.domains.items()):
            snap = tmp_path / f"snap{len(snaps)}" / "drva-s"
            snap.mkdir(parents=True)
            shutil.copy(d.cfg.log_path, snap / "replog")
            shutil.copy(d.cfg.meta_path, snap / "meta")
            snaps.append(snap.parent)

    monkeypatch.setattr(MetaRepository, "write", meta_write)
    monkeypatch.setattr(ReplicationLog, "trim", trim)
    filters = [DomainFilter(1, [Disk(tmp_path / "erp.img", DISK)]), DomainFilter(2, [Disk(tmp_path / "crm.img", DISK)])]
    rng = np.random.default_rng(3)
    async with running_drva(config(_doc(tmp_path, tmp_path))) as d:
        running["d"] = d
        client = FilterClient(filters, "127.0.0.1", d.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        try:
            deadline = time.monotonic() + RUN_S
            while time.monotonic() < deadline and len(snaps) < SNAPSHOTS:
                for f in filters:
                    f.capture(*random_writes(rng, [DISK], 16, 16))
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            running.clear()
    assert snaps, "no trim ran while a lane's commit was ahead of the metadata: the test proved nothing"
    monkeypatch.setattr(MetaRepository, "write", real_write)
    monkeypatch.setattr(ReplicationLog, "trim", real_trim)
    for snap in snaps:
        restarted = Drva(config(_doc(snap, tmp_path)), exit_on_task_failure=False)
        await restarted.start()
        try:
            stopped = {i: dom.stats.last_error for i, dom in restarted.domains.items() if dom.fenced}
        finally:
            await restarted.stop()
        assert not stopped, (snap.name, stopped)
