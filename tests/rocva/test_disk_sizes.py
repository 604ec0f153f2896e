"""A disk of a domain never shrinks nor leaves its catalog (FORMAT.md §8.2): its history
holds writes up to its old end, and a recovery of any point refuses records of a disk the
catalog does not list or past its end. A catalog that says otherwise (written before the
rule) is reported by ``cdp verify``, which passed it while no point recovered."""

from __future__ import annotations

import numpy as np
import pytest

from cdp.catalog_state import CatalogState
from cdp.errors import FormatError
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptions, Target, recover
from rocva.verify import verify


async def _built() -> DomainBuilder:
    b = await DomainBuilder(MemoryStore(), domain=7, name="dom").start()
    await random_workload(b, np.random.default_rng(1), 20, seal_every=10, max_sectors=8)
    await b.seal()
    return b


@pytest.mark.parametrize("change", ["shrink", "drop"])
async def test_a_delta_that_shrinks_or_drops_a_disk_is_refused(change: str) -> None:
    b = await _built()
    disks = [dict(d) for d in b.disks]
    if change == "shrink":
        disks[0]["size"] = 4096
    else:
        disks = disks[1:]
    with pytest.raises(FormatError, match="shrinks disk 0" if change == "shrink" else "drops disk 0"):
        await b._commit({"disks": disks})
    grown = [dict(d) for d in b.disks]
    grown[0]["size"] += 1 << 20
    await b._commit({"disks": grown})  # growing a disk, or adding one, is allowed


async def test_verify_reports_records_past_a_shrunk_disk(tmp_path, monkeypatch) -> None:
    b = await _built()
    disks = [dict(d) for d in b.disks]
    disks[0]["size"] = 4096
    with monkeypatch.context() as m:  # a catalog written before the rule
        m.setattr(CatalogState, "_disks_after", lambda self, disks, where: disks)
        await b._commit({"disks": disks})
    report = await verify(b.store, 7, deep=True)
    assert not report["ok"]
    assert any("writes past the end of the disk" in p["problem"] for p in report["problems"]), report["problems"]
    with pytest.raises(FormatError, match="writes past the end of the disk"):
        await recover(b.store, 7, RecoverOptions(Target.latest(), tmp_path / "out"))
