"""An interrupted recovery resumes: done groups are skipped, the result is byte-identical."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from cdp.errors import StoreUnavailable
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from rocva import Target, plan_recovery, recover
from tests.rocva.domain import DomainBuilder, file_sha256, random_workload
from tests.rocva.test_recover import seed_initial

KiB = 1 << 10


class FailAfter(FaultyStore):
    """A FaultyStore that goes offline once ``gets_ok`` GETs have been served."""

    def __init__(self, inner, gets_ok: int) -> None:
        super().__init__(inner)
        self.gets_ok = gets_ok

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if self.calls["get"] >= self.gets_ok:
            self.offline()
        return await super().get(key, offset, length)


async def domain(tmp_path: Path) -> DomainBuilder:
    rng = np.random.default_rng(8)
    b = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("vm", "a", 1 << 20), ("vm", "b", 512 * KiB)),
                            block_raw_size=4 * KiB).start()
    await seed_initial(b, 0, rng, chunk=64 * KiB)
    await random_workload(b, rng, 400, seal_every=12, max_sectors=16)
    return b


async def planning_gets(b: DomainBuilder, target) -> int:
    counting = FaultyStore(b.store)
    await plan_recovery(counting, b.domain, target)
    return counting.calls["get"]


async def test_resume_after_a_store_failure(tmp_path: Path) -> None:
    b = await domain(tmp_path)
    target = Target.latest()
    reference = await b.reference(tmp_path / "ref", b.seq)
    assert reference == b.snapshot()
    out = tmp_path / "out"
    flaky = FailAfter(b.store, await planning_gets(b, target) + 20)
    with pytest.raises(StoreUnavailable, match="offline"):
        await recover(flaky, b.domain, target, out, concurrency=1, base_batch_chunks=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".recover.lock", "recover.state.json", "vm-a.img.partial", "vm-b.img.partial"]
    state = json.loads((out / "recover.state.json").read_text())
    assert state["target_seq"] == b.seq and not state["complete"] and len(state["done"]) >= 10
    assert any(g.startswith("seg:") for g in state["done"])

    fresh = await recover(b.store, b.domain, target, tmp_path / "fresh", base_batch_chunks=2)
    result = await recover(b.store, b.domain, target, out, checksum=True, base_batch_chunks=2)
    assert result["resumed"] and result["groups_skipped"] == len(state["done"])
    assert result["groups"] == fresh["groups"] and result["bytes_skipped"] > 0
    assert result["bytes_written"] + result["bytes_skipped"] == fresh["bytes_written"]
    assert result["gets"] < fresh["gets"]
    assert [i["sha256"] for i in result["images"]] == reference
    assert [file_sha256(i["path"]) for i in fresh["images"]] == reference
    assert sorted(p.name for p in out.iterdir()) == ["vm-a.img", "vm-b.img"]


async def test_a_different_target_or_a_lost_partial_starts_over(tmp_path: Path) -> None:
    b = await domain(tmp_path)
    out = tmp_path / "out"
    flaky = FailAfter(b.store, await planning_gets(b, Target.latest()) + 10)
    with pytest.raises(StoreUnavailable):
        await recover(flaky, b.domain, Target.latest(), out, concurrency=1)
    mark = b.marks[len(b.marks) // 2]["seq"]
    result = await recover(b.store, b.domain, mark, out, checksum=True)
    assert not result["resumed"] and result["groups_skipped"] == 0
    assert [i["sha256"] for i in result["images"]] == await b.reference(tmp_path / "ref", mark)

    out2 = tmp_path / "out2"
    flaky = FailAfter(b.store, await planning_gets(b, Target.latest()) + 10)
    with pytest.raises(StoreUnavailable):
        await recover(flaky, b.domain, Target.latest(), out2, concurrency=1)
    (out2 / "vm-b.img.partial").unlink()
    result = await recover(b.store, b.domain, Target.latest(), out2, checksum=True)
    assert not result["resumed"]
    assert [i["sha256"] for i in result["images"]] == b.snapshot()


async def test_an_interrupted_publication_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between linking the first image and the second: the rerun only publishes."""
    rr = importlib.import_module("rocva.recover")  # `rocva.recover` the attribute is the function

    b = await domain(tmp_path)
    out = tmp_path / "out"
    real_publish = rr._publish

    def crash_after_first(plan, out_dir):
        first = plan.disks[0]
        (out_dir / first.image_name).hardlink_to(out_dir / (first.image_name + rr.PARTIAL_SUFFIX))
        raise OSError("power lost")

    monkeypatch.setattr(rr, "_publish", crash_after_first)
    with pytest.raises(OSError, match="power lost"):
        await recover(b.store, b.domain, Target.latest(), out)
    assert json.loads((out / "recover.state.json").read_text())["complete"] is True
    monkeypatch.setattr(rr, "_publish", real_publish)
    result = await recover(b.store, b.domain, Target.latest(), out, checksum=True)
    assert result["resumed"] and result["bytes_written"] == 0
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert sorted(p.name for p in out.iterdir()) == ["vm-a.img", "vm-b.img"]
