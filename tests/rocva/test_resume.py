"""An interrupted recovery resumes: done groups are skipped, the result is byte-identical."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cdp.errors import StoreUnavailable
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, file_sha256, random_workload
from rocva import RecoverOptions, RecoveryError, Target, plan_recovery, recover
from rocva.fetch import READBACK_BYTES, group_digest, unit_digest_from_file
from rocva.work_units import BASE_BATCH_CHUNKS_DEFAULT, GAP_BYTES_MAX_DEFAULT, RUN_BYTES_MAX_DEFAULT
from rocva.resume import PARTIAL_SUFFIX, all_groups, parse_state, prove
from tests.rocva.test_recover import seed_initial

KiB = 1 << 10


class FailAfter(FaultyStore):
    """A FaultyStore that goes offline once ``gets_ok`` GETs have been served."""

    def __init__(self, inner, gets_ok: int) -> None:
        super().__init__(inner)
        self.gets_ok = gets_ok

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        if self.calls["get"] >= self.gets_ok:
            self.offline()
        return await super().get(key, offset, length, max_bytes=max_bytes)


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
        await recover(flaky, b.domain, RecoverOptions(target, out, concurrency=1), base_batch_chunks=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["recover.state.json", "vm-a.img.partial", "vm-b.img.partial"]
    state = json.loads((out / "recover.state.json").read_text())
    assert state["target_seq"] == b.seq and not state["complete"] and len(state["done"]) >= 10
    assert any(g.startswith("seg:") for g in state["done"])

    fresh = await recover(b.store, b.domain, RecoverOptions(target, tmp_path / "fresh"), base_batch_chunks=2)
    result = await recover(b.store, b.domain, RecoverOptions(target, out, checksum=True), base_batch_chunks=2)
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
        await recover(flaky, b.domain, RecoverOptions(Target.latest(), out, concurrency=1))
    mark = b.marks[len(b.marks) // 2]["seq"]
    result = await recover(b.store, b.domain, RecoverOptions(mark, out, checksum=True))
    assert not result["resumed"] and result["groups_skipped"] == 0
    assert [i["sha256"] for i in result["images"]] == await b.reference(tmp_path / "ref", mark)

    out2 = tmp_path / "out2"
    flaky = FailAfter(b.store, await planning_gets(b, Target.latest()) + 10)
    with pytest.raises(StoreUnavailable):
        await recover(flaky, b.domain, RecoverOptions(Target.latest(), out2, concurrency=1))
    (out2 / "vm-b.img.partial").unlink()
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out2, checksum=True))
    assert not result["resumed"]
    assert [i["sha256"] for i in result["images"]] == b.snapshot()


async def test_an_interrupted_publication_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between linking the first image and the second: the rerun only publishes."""
    rr = importlib.import_module("rocva.recover")  # `rocva.recover` the attribute is the function

    b = await domain(tmp_path)
    out = tmp_path / "out"
    real_publish = rr._publish

    def crash_after_first(plan, out, inos):
        first = plan.disks[0]
        out.link(first.image_name + rr.PARTIAL_SUFFIX, first.image_name)
        raise OSError("power lost")

    monkeypatch.setattr(rr, "_publish", crash_after_first)
    with pytest.raises(OSError, match="power lost"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out))
    assert json.loads((out / "recover.state.json").read_text())["complete"] is True
    monkeypatch.setattr(rr, "_publish", real_publish)
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert result["resumed"] and result["bytes_written"] == 0
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert sorted(p.name for p in out.iterdir()) == ["vm-a.img", "vm-b.img"]


# ---------------------------------------------------------------------- what a resume may keep (issue 10, item 3)

UNITS = {"run_bytes_max": RUN_BYTES_MAX_DEFAULT, "gap_bytes_max": GAP_BYTES_MAX_DEFAULT,
         "base_batch_chunks": BASE_BATCH_CHUNKS_DEFAULT}


async def garbage_partials(b: DomainBuilder, out: Path, seed: int = 99):
    """The latest plan, and ``.partial`` files of random bytes of the right sizes in ``out``."""
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for d in plan.disks:
        (out / (d.image_name + PARTIAL_SUFFIX)).write_bytes(rng.bytes(d.size))
    return plan


def forge(out: Path, plan, *, complete: bool, done: dict[str, int], units: dict = UNITS) -> None:
    """A well-formed version-2 state of ``plan`` claiming the ``.partial`` files there."""
    images = [{"name": d.image_name, "size": d.size, "ino": (out / (d.image_name + PARTIAL_SUFFIX)).stat().st_ino}
              for d in plan.disks]
    doc = {"version": 2, "identity": plan.identity(), "domain": plan.domain, "target_seq": plan.seq,
           "generation": plan.generation, "units": units, "complete": complete, "images": images,
           "done": {name: f"{digest:016x}" for name, digest in done.items()}}
    (out / "recover.state.json").write_text(json.dumps(doc))


def group_names(plan, units: dict = UNITS) -> list[str]:
    return [name for name, _, _ in all_groups(plan, units)]


def digests_now(out: Path, plan, names, units: dict = UNITS) -> dict[str, int]:
    """The digests the groups ``names`` have in ``out``'s images as they are."""
    fds = [os.open(out / (d.image_name + PARTIAL_SUFFIX), os.O_RDONLY) for d in plan.disks]
    try:
        buf = bytearray(READBACK_BYTES)
        return {name: group_digest([unit_digest_from_file(fds, u, buf) for u in units_])
                for name, _, units_ in all_groups(plan, units) if name in names}
    finally:
        for fd in fds:
            os.close(fd)


async def test_a_forged_complete_state_over_garbage_is_not_published(tmp_path: Path) -> None:
    b = await domain(tmp_path)
    # The state file, as the code before digests wrote it, and one in today's format.
    out1 = tmp_path / "v1"
    plan = await garbage_partials(b, out1)
    (out1 / "recover.state.json").write_text(json.dumps({
        "version": 1, "identity": plan.identity(), "domain": plan.domain, "target_seq": plan.seq,
        "generation": plan.generation, "complete": True, "images": [d.image_name for d in plan.disks],
        "done": group_names(plan)}))
    out2 = tmp_path / "v2"
    await garbage_partials(b, out2)
    rng = np.random.default_rng(5)
    forge(out2, plan, complete=True, done={n: int(rng.integers(0, 1 << 63)) for n in group_names(plan)})
    for out in (out1, out2):
        result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
        assert not result["resumed"] and result["bytes_written"] == plan.bytes_to_write, out
        assert [i["sha256"] for i in result["images"]] == b.snapshot(), out
        assert sorted(p.name for p in out.iterdir()) == ["vm-a.img", "vm-b.img"]
    assert "digest" in result["state_discarded"]


async def test_a_complete_state_is_proved_outside_its_groups_too(tmp_path: Path) -> None:
    """Right digests for every group, but bytes where the disk must read zeros."""
    b = await domain(tmp_path)
    b.zero(0, 64 * KiB, 64 * KiB)  # a region no piece writes
    await b.seal()
    out = tmp_path / "out"
    plan = await garbage_partials(b, out)
    ref = tmp_path / "ref"
    await recover(b.store, b.domain, RecoverOptions(Target.latest(), ref))
    for d in plan.disks:  # the right images, plus one stray byte in the zeroed region
        (out / (d.image_name + PARTIAL_SUFFIX)).write_bytes((ref / d.image_name).read_bytes())
    with open(out / ("vm-a.img" + PARTIAL_SUFFIX), "r+b") as f:
        f.seek(100 * KiB)
        assert f.read(1) == b"\0"
        f.seek(100 * KiB)
        f.write(b"\x01")
    forge(out, plan, complete=True, done=digests_now(out, plan, group_names(plan)))
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert "should be zeros" in result["state_discarded"] and not result["resumed"]


async def test_a_forged_incomplete_state_over_garbage_is_redone(tmp_path: Path) -> None:
    b = await domain(tmp_path)
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    # The format, every group "done" or none: garbage is never built upon.
    for done in (group_names(plan), []):
        out = tmp_path / f"v1-{len(done)}"
        await garbage_partials(b, out)
        (out / "recover.state.json").write_text(json.dumps({
            "version": 1, "identity": plan.identity(), "domain": plan.domain, "target_seq": plan.seq,
            "generation": plan.generation, "complete": False, "images": [d.image_name for d in plan.disks],
            "done": done}))
        result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
        assert [i["sha256"] for i in result["images"]] == b.snapshot(), len(done)
    # Every group "done" with digests the bytes do not have: discarded, all redone.
    out = tmp_path / "wrong"
    await garbage_partials(b, out)
    forge(out, plan, complete=False, done={n: 12345 for n in group_names(plan)})
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert not result["resumed"] and "digest" in result["state_discarded"]
    assert result["bytes_written"] == plan.bytes_to_write
    # Nothing done: nothing to prove, but the garbage is cleared, not built upon (a zero
    # page of a piece is left as a hole, and would show it).
    out = tmp_path / "nothing-done"
    await garbage_partials(b, out)
    forge(out, plan, complete=False, done={})
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert result["resumed"] and result["bytes_skipped"] == 0


async def interrupted(b: DomainBuilder, out: Path, gets_after_plan: int = 20, base_batch_chunks: int = 2) -> dict:
    """A recovery of the latest point into ``out`` that the store fails part way; its state."""
    flaky = FailAfter(b.store, await planning_gets(b, Target.latest()) + gets_after_plan)
    with pytest.raises(StoreUnavailable):
        await recover(flaky, b.domain, RecoverOptions(Target.latest(), out, concurrency=1),
                      base_batch_chunks=base_batch_chunks)
    return json.loads((out / "recover.state.json").read_text())


async def test_a_resume_checks_the_done_groups_and_clears_the_rest(tmp_path: Path) -> None:
    b = await domain(tmp_path)
    units = {**UNITS, "base_batch_chunks": 2}
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    # Garbage everywhere outside the done groups' pieces: resumed, the garbage cleared.
    out = tmp_path / "outside"
    state = await interrupted(b, out)
    assert len(state["done"]) >= 10
    fds = [os.open(out / (d.image_name + PARTIAL_SUFFIX), os.O_RDWR) for d in plan.disks]
    try:
        _, keep = prove(plan, fds, units, digests_now(out, plan, state["done"], units), complete=False)
        rng = np.random.default_rng(1)
        dirty = 0
        for d, fd, pieces in zip(plan.disks, fds, keep):
            starts = np.concatenate([o for o, _ in pieces]).astype(np.int64) if pieces else np.zeros(0, np.int64)
            ends = starts + (np.concatenate([n for _, n in pieces]).astype(np.int64) if pieces else 0)
            order = np.argsort(starts)
            gaps = zip(np.concatenate([[0], ends[order]]).tolist(), np.concatenate([starts[order], [d.size]]).tolist())
            for a, z in gaps:
                if z > a:
                    os.pwrite(fd, rng.bytes(z - a), a)
                    dirty += z - a
    finally:
        for fd in fds:
            os.close(fd)
    assert dirty > 0
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True), base_batch_chunks=2)
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert result["resumed"] and result["groups_skipped"] == len(state["done"]) and not result["state_discarded"]
    assert all(len(v) == 16 for v in state["done"].values())  # a digest per group

    # One byte changed inside a done group: the state is discarded, everything redone.
    out = tmp_path / "inside"
    state = await interrupted(b, out)
    name, _, group = next(g for g in all_groups(plan, units) if g[0] in state["done"] and g[1] > 0)
    unit = group[0]
    path = out / (plan.disks[int(unit.slot[0])].image_name + PARTIAL_SUFFIX)
    with open(path, "r+b") as f:
        f.seek(int(unit.offset[0]))
        byte = f.read(1)
        f.seek(int(unit.offset[0]))
        f.write(bytes([byte[0] ^ 0xFF]))
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True), base_batch_chunks=2)
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert not result["resumed"] and name in result["state_discarded"]
    assert result["bytes_written"] == plan.bytes_to_write


async def test_a_resume_cut_into_other_units_starts_over(tmp_path: Path) -> None:
    b = await domain(tmp_path)
    out = tmp_path / "out"
    await interrupted(b, out)  # base groups of 2 chunks
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))  # of 64
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert not result["resumed"] and result["groups_skipped"] == 0


async def test_a_state_cut_before_gaps_parses_and_is_not_resumed(tmp_path: Path) -> None:
    """A state written before runs read through gaps (no gap_bytes_max) still claims its
    images, but its runs were cut otherwise: never resumed, redone whole."""
    b = await domain(tmp_path)
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    old = {k: v for k, v in UNITS.items() if k != "gap_bytes_max"}
    doc = {"version": 2, "identity": plan.identity(), "domain": 1, "target_seq": 1, "generation": 1,
           "units": old, "complete": False, "done": {}, "images": [{"name": "vm-a.img", "size": 1, "ino": None}]}
    saved = parse_state(doc)
    assert saved.units == old and not saved.resumes(plan, UNITS)
    with pytest.raises(ValueError, match="units.gap_bytes_max"):
        parse_state({**doc, "units": {**UNITS, "gap_bytes_max": -1}})
    out = tmp_path / "out"
    state = await interrupted(b, out, base_batch_chunks=BASE_BATCH_CHUNKS_DEFAULT)
    assert state["units"] == UNITS and state["done"]  # as it is, it would be resumed
    state["units"] = old
    (out / "recover.state.json").write_text(json.dumps(state))
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert not result["resumed"] and result["groups_skipped"] == 0


async def test_a_malformed_state_claims_nothing(tmp_path: Path) -> None:
    b = await domain(tmp_path)
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    for i, text in enumerate(["{", "[]", '{"version": 2}', "\xff", "[" * 100000, json.dumps({
            "version": 2, "identity": plan.identity(), "domain": 1, "target_seq": 1, "generation": 1,
            "units": 5, "complete": False, "done": {}, "images": [{"name": "vm-a.img", "size": 1, "ino": 1}]}),
            json.dumps({
            "version": 2, "identity": plan.identity(), "domain": 1, "target_seq": 1, "generation": 1,
            "units": UNITS, "complete": True, "done": {},
            "images": [{"name": "../../etc/x.img", "size": 1, "ino": 1}]})]):
        out = tmp_path / f"m{i}"
        out.mkdir()
        (out / "recover.state.json").write_text(text, errors="surrogateescape")
        # No partial: all fresh.
        result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, checksum=True))
        assert not result["resumed"] and [i["sha256"] for i in result["images"]] == b.snapshot()
        # With a partial there, an unusable state claims nothing: the partial is refused.
        out = tmp_path / f"p{i}"
        out.mkdir()
        (out / "recover.state.json").write_text(text, errors="surrogateescape")
        (out / "vm-a.img.partial").write_bytes(b"x")
        with pytest.raises(RecoveryError, match="no recover.state.json claims it"):
            await recover(b.store, b.domain, RecoverOptions(Target.latest(), out))
        assert (out / "vm-a.img.partial").read_bytes() == b"x"
