"""A domain fenced on a DRVA (its timeline now belongs to another site) must not hold
back the DRVA's other domains: not the replication log (issue 9, defect 1: the fenced
domain's entries will never be committed here, so the log trims past them), and not
their filter's session (the filter leaves the fenced domain out of its next HELLO)."""

from __future__ import annotations

import asyncio

import numpy as np

from cdp.catalog_fork import fork_timeline
from cdp.store.fs import FileStore
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, config, domain_doc, drva_doc, random_writes, wait_until

DISK = 16 << 20
LOG = "8MiB"  # much less than what domain 2 writes after the fence
WAIT_S = 60.0


async def test_a_fenced_domain_does_not_stop_the_log_from_trimming(tmp_path) -> None:
    doc = drva_doc(tmp_path, "drva-f", [domain_doc(1, "erp", [("vm1", "d0", DISK)]),
                                        domain_doc(2, "crm", [("vm2", "d0", DISK)])],
                   log_size=LOG, seal_bytes="1MiB", seal_age_s=0.2)
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    disks = [Disk(tmp_path / "erp.img", DISK), Disk(tmp_path / "crm.img", DISK)]
    filters = [DomainFilter(1, [disks[0]]), DomainFilter(2, [disks[1]])]
    client = FilterClient(filters, "127.0.0.1", d.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    rng = np.random.default_rng(8)
    try:
        for f, disk in zip(filters, disks):
            f.capture(*random_writes(rng, [DISK], 16, 16))
        await wait_until(lambda: all(d.domains[f.domain].committed_seq == f.next_seq - 1 for f in filters),
                         WAIT_S, "both domains committed")
        # Another site takes domain 1 over: the DRVA's next commit of it is fenced.
        await fork_timeline(FileStore(tmp_path / "store"), 1, d.domains[1].committed_seq, "site-b")
        filters[0].capture(*random_writes(rng, [DISK], 16, 16))
        await wait_until(lambda: d.domains[1].fenced, WAIT_S, "domain 1 fenced")
        # Domain 1's filter writes on: its next frame is refused as fenced, the session
        # ends, and the filter must come back without domain 1 (a HELLO naming it would
        # be refused whole, and domain 2 would stop with it).
        filters[0].capture(*random_writes(rng, [DISK], 16, 16))
        await wait_until(lambda: filters[0].fenced, WAIT_S, "the filter to learn domain 1 is fenced")
        # Domain 2 writes three times the log's size: only trimming past domain 1 makes room.
        written = 0
        while written < 3 * (8 << 20):
            batch = random_writes(rng, [DISK], 32, 64)
            filters[1].capture(*batch)
            written += int(batch[2][batch[3] == 0].sum())
            await wait_until(lambda: filters[1].acked_seq >= filters[1].next_seq - 64, WAIT_S, "domain 2 acked")
        await wait_until(lambda: d.domains[2].committed_seq == filters[1].next_seq - 1, WAIT_S, "domain 2 committed")
        assert filters[1].mode == "normal"  # never fell back to the dirty-region bitmap
        assert d.domains[1].fenced and not d.domains[2].fenced
        assert client.connections >= 2  # reconnected after the refusal, for domain 2 alone
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await d.stop()
    assert d.failure is None
