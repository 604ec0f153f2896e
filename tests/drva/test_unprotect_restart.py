"""A domain unprotected (``cdp unprotect``: an unprotect request, then a configuration
without it) while its frames are still in the log: the DRVA restarts, reports what it no
longer ships, and keeps serving the other domains with nothing of theirs lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from cdp.store.fs import FileStore
from drva.requests import write_unprotect_request
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (
    SECRET, Disk, DrvaProcess, check_store, domain_doc, drva_doc, free_port, random_writes,
    wait_until, write_toml,
)
from tests.waiting import EVENTUALLY_S
from tests.drva.test_crash import wait_until_committed

DISK = 4 << 20


async def test_unprotected_domain_frames_do_not_stop_the_drva(tmp_path):
    port = free_port()
    erp, web = domain_doc(1, "erp", [("vm1", "d0", DISK)]), domain_doc(2, "web", [("vm2", "d0", DISK)])
    doc = drva_doc(tmp_path, "drva-u", [erp, web], port=port, seal_age_s=30, seal_bytes="64MiB")
    drva = DrvaProcess(doc, tmp_path)
    drva.start()
    disks = {1: Disk(tmp_path / "erp.img", DISK), 2: Disk(tmp_path / "web.img", DISK)}
    filters = {d: DomainFilter(d, [disks[d]]) for d in (1, 2)}
    client = FilterClient(list(filters.values()), "127.0.0.1", port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    rng = np.random.default_rng(5)
    for f in filters.values():
        f.capture(*random_writes(rng, [DISK], 40, 16))
    await wait_until(lambda: all(f.acked_seq == f.next_seq - 1 for f in filters.values()), EVENTUALLY_S, "acks")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    drva.kill()  # both domains' frames are durable in the log, none is in the store yet
    doc["domains"] = [erp]
    doc["seal"] = {"bytes": "1MiB", "age_s": 0.2}
    write_toml(doc, drva.path)
    write_unprotect_request(Path(doc["state_dir"]), 2, "web")  # what `cdp unprotect web` writes first
    drva.start()
    client = FilterClient([filters[1]], "127.0.0.1", port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    filters[1].capture(*random_writes(rng, [DISK], 40, 16))
    await wait_until(lambda: filters[1].acked_seq == filters[1].next_seq - 1, EVENTUALLY_S, "erp acks")
    store = FileStore(tmp_path / "store")
    await wait_until_committed(store, 1, filters[1].next_seq - 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    drva.stop()
    await check_store(store, 1, [disks[1].sha256()], tmp_path)
    logs = drva.log_path.read_text()
    assert '"unconfigured_domain_frames_dropped"' in logs and '"domain":2' in logs
