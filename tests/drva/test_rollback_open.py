"""A DRVA whose store lost the newest catalog generations of a domain (a rollback, or the
wrong store) while it was down: at open, its metadata repository knows it committed
further than the catalog says. It must stop that domain with an error that says so —
committing on top would leave a gap its trimmed log cannot fill — and serve the others
(issue 10, item 4). Before this check it logged the mismatch and went on."""

from __future__ import annotations


import numpy as np

from cdp.catalog import list_generations, load_catalog
from cdp.layout import catalog_key
from cdp.store.fs import FileStore
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (EVENTUALLY_S, Disk, config, running_drva, stream_committed, two_domains,
                                wait_until)

DISK = 8 << 20


async def test_a_catalog_behind_the_drva_metadata_stops_only_that_domain(tmp_path) -> None:
    cfg = config(two_domains(tmp_path, "drva-r", DISK, seal_bytes="1MiB", seal_age_s=0.1))
    disks = [Disk(tmp_path / "erp.img", DISK), Disk(tmp_path / "crm.img", DISK)]
    filters = [DomainFilter(1, [disks[0]]), DomainFilter(2, [disks[1]])]
    rng = np.random.default_rng(5)
    async with running_drva(cfg) as d:
        await stream_committed(d, filters, rng, 64, 16)
        seen = d.domains[1].committed_seq
    store = FileStore(tmp_path / "store")
    generations = await list_generations(store, 1)
    assert len(generations) > 1
    for g in generations[1:]:  # back to the catalog's first generation: committed seq 0
        await store.delete(catalog_key(1, g))
    assert (await load_catalog(store, 1))[0].timeline().committed_seq < seen

    async with running_drva(cfg) as d:
        await wait_until(lambda: d.domains[1].fenced and d.domains[2].catalog_ready, EVENTUALLY_S,
                         "domain 1 stopped, domain 2 open")
        error = d.domains[1].stats.last_error
        assert error.startswith("ROLLED BACK") and str(seen) in error, error
        assert str(tmp_path) not in error  # no path in what a filter and the API are told
        # Nothing was committed on top of the rolled-back catalog...
        assert await list_generations(store, 1) == generations[:1]
        # ... and the other domain goes on.
        await stream_committed(d, filters[1:], rng, 32, 16)
        assert d.status()["domains"][0]["fenced"] is True
