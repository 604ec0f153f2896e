"""A DRVA whose configuration shrinks or drops a disk of a domain the store already
holds stops that domain at catalog open (FORMAT.md §8.2) instead of committing a disk
list under which no point of the domain's history recovers; growing one is served."""

from __future__ import annotations

import pytest

from cdp.catalog import load_catalog
from cdp.store import FileStore
from cdp.testing.drva_config import domain_doc, drva_doc
from tests.drva.harness import config, running_drva

DISK = 4 << 20


def _doc(tmp, disks):
    return drva_doc(tmp, "drva-a", [domain_doc(1, "d1", disks)], log_size="8MiB")


@pytest.mark.parametrize("change", ["shrink", "drop", "grow"])
async def test_a_shrunk_or_dropped_disk_stops_the_domain_at_catalog_open(tmp_path, change):
    first = _doc(tmp_path, [("vm1", "d0", DISK), ("vm1", "d1", DISK)])
    async with running_drva(config(first)) as d:
        assert d.domains[1].catalog_ready
    disks = {"shrink": [("vm1", "d0", DISK // 2), ("vm1", "d1", DISK)],
             "drop": [("vm1", "d0", DISK)],
             "grow": [("vm1", "d0", 2 * DISK), ("vm1", "d1", DISK)]}[change]
    async with running_drva(config(_doc(tmp_path, disks))) as d:
        dom = d.domains[1]
        if change == "grow":
            assert dom.catalog_ready and not dom.fenced
        else:
            assert dom.fenced and not dom.catalog_ready
            assert ("shrinks disk 0" if change == "shrink" else "drops disk 1") in dom.stats.last_error
    state, _ = await load_catalog(FileStore(tmp_path / "store"), 1)
    sizes = [d["size"] for d in state.disks]
    assert sizes == ([2 * DISK, DISK] if change == "grow" else [DISK, DISK])
