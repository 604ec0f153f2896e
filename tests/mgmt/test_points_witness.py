"""Issue 10, item 4, through the MSA: the points it lists (and the verify it runs) are
checked against what the domain's DRVA last recorded in its metadata repository, so a
catalog rolled back in the store is shown even when it left no trace there."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdp.catalog import load_catalog
from cdp.meta import MetaRepository
from cdp.msa import operations
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload
from cdp.testing.site import make_site


def record_commit(path: Path, domain: int, timeline: int, committed_seq: int, generation: int) -> None:
    with MetaRepository.open(path) as meta:
        meta.write({"drva": "drva-1", "domains": {str(domain): {
            "committed_seq": committed_seq, "committed_ts": 0, "generation": generation, "timeline": timeline}}})


async def test_points_through_the_msa_show_a_catalog_older_than_the_drva_saw(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    cfg = site.cfg
    erp = cfg.domain("erp")
    b = await DomainBuilder(FileStore(Path(cfg.store_url.removeprefix("file://"))), domain=erp.id).start()
    await random_workload(b, np.random.default_rng(9), 40, seal_every=8)
    head, generation = await load_catalog(b.store, erp.id)
    tl = head.timeline()
    meta_path = cfg.drva_of(erp).meta_path
    assert operations.seen_by_drva(cfg, "erp") == ()  # installed, never committed: no witness yet

    record_commit(meta_path, erp.id, tl.id, tl.committed_seq, generation)
    assert (await operations.points(cfg, "erp"))["problems"] == []

    record_commit(meta_path, erp.id, tl.id, tl.committed_seq + 100, generation + 3)
    problems = (await operations.points(cfg, "erp"))["problems"]
    assert len(problems) == 1 and "rolled back" in problems[0]["problem"], problems
    assert "DRVA drva-1" in problems[0]["problem"] and str(meta_path) not in problems[0]["problem"]

    meta_path.write_bytes(b"\xff" * 8192)  # unreadable: logged, and the store's checks still run
    assert (await operations.points(cfg, "erp"))["problems"] == []
