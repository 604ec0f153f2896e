"""Continuous rehydration (``rocva.standby``): a standby kept warm round after round holds
exactly the domain at the newest consistent point — zero-filled writes and ZEROs over
old data included (the tail is punched before it is written) — writes only the tail,
survives an interrupted apply, and a failover from it applies the tail only; a point
before it falls back to a cold rehydration."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload, sha256
from rocva import Target
from rocva.failover import failover
from rocva.plan import build_plan, load_state
from rocva.standby import STATE_NAME, _punch, keep_warm
from rocva.target import resolve_target

SITE_B = "site-b"


def images(out: Path) -> list[str]:
    return [sha256(p.read_bytes()) for p in sorted(out.glob("*.img"))]


async def _round(b: DomainBuilder, rng: np.random.Generator, ops: int) -> None:
    await random_workload(b, rng, ops, seal_every=6, marks=False)
    await b.seal()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(2, 5))
async def test_a_standby_follows_the_domain_round_after_round(tmp_path_factory, seed, rounds):
    root = tmp_path_factory.mktemp("standby")
    rng = np.random.default_rng(seed)
    b = await DomainBuilder(FileStore(root / "store")).start()
    await _round(b, rng, 40)
    out = root / "datastore" / "erp"
    first = await keep_warm(b.store, b.domain, out)
    assert first["cold"] and first["seq"] == b.seq and images(out) == b.snapshot()
    for _ in range(rounds):
        await _round(b, rng, int(rng.integers(1, 60)))
        step = await keep_warm(b.store, b.domain, out)
        assert not step["cold"] and step["seq"] == b.seq, step
        assert images(out) == b.snapshot()
    assert json.loads((out / STATE_NAME).read_text())["phase"] == "ready"


async def test_only_the_tail_is_written_and_a_resync_window_is_not_a_standby_point(tmp_path):
    b = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("vm1", "d0", 4 << 20),)).start()
    b.write(0, 0, np.random.default_rng(1).bytes(4 << 20))
    await b.seal()
    out = tmp_path / "erp"
    await keep_warm(b.store, b.domain, out)
    b.write(0, 8192, b"\x07" * 4096)
    await b.seal()
    step = await keep_warm(b.store, b.domain, out)
    assert step["bytes_written"] == 4096 and images(out) == b.snapshot()
    consistent = b.snapshot()
    b.resync_begin()
    b.write(0, 0, b"\x09" * 512)
    await b.seal()  # the resync is not over: no new consistent point
    step = await keep_warm(b.store, b.domain, out)
    assert step["bytes_written"] == 0 and images(out) == consistent
    b.resync_end()
    b.write(0, 4096, b"\x05" * 512)  # the first consistent point after the window
    await b.seal()
    step = await keep_warm(b.store, b.domain, out)
    assert step["seq"] == b.seq and images(out) == b.snapshot()


async def test_an_interrupted_apply_is_finished_by_the_next_step(tmp_path):
    rng = np.random.default_rng(5)
    b = await DomainBuilder(FileStore(tmp_path / "store")).start()
    await _round(b, rng, 50)
    out = tmp_path / "erp"
    await keep_warm(b.store, b.domain, out)
    before = json.loads((out / STATE_NAME).read_text())
    await _round(b, rng, 50)
    # A crash half-way through an apply: recorded as applying, the tail's extents punched,
    # none of them written yet.
    view = await load_state(b.store, b.domain)
    plan = await build_plan(b.store, view, await resolve_target(view, Target.seq(b.seq)), after_seq=before["seq"])
    fds = [os.open(out / d.image_name, os.O_RDWR) for d in plan.disks]
    try:
        _punch(plan, fds)
    finally:
        for fd in fds:
            os.close(fd)
    (out / STATE_NAME).write_text(json.dumps({**before, "phase": "applying", "to": b.seq}))
    assert images(out) != b.snapshot()
    step = await keep_warm(b.store, b.domain, out)
    assert not step["cold"] and step["seq"] == b.seq and images(out) == b.snapshot()


async def test_a_failover_applies_the_standby_tail_or_falls_back_cold(tmp_path):
    rng = np.random.default_rng(9)
    b = await DomainBuilder(FileStore(tmp_path / "store")).start()
    await _round(b, rng, 60)
    early = b.seq
    early_disks = b.snapshot()
    await _round(b, rng, 60)
    out = tmp_path / "datastore" / "erp"
    await keep_warm(b.store, b.domain, out)
    await _round(b, rng, 30)  # the standby is behind by one round
    result = await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    assert result["warm"] and result["fork_seq"] == b.seq and images(out) == b.snapshot()
    assert not (out / STATE_NAME).exists()

    # a second domain store: a standby ahead of the point asked for is discarded, cold
    b2 = await DomainBuilder(FileStore(tmp_path / "store2")).start()
    rng2 = np.random.default_rng(9)
    await _round(b2, rng2, 60)
    assert b2.seq == early and b2.snapshot() == early_disks
    await _round(b2, rng2, 60)
    out2 = tmp_path / "datastore2" / "erp"
    await keep_warm(b2.store, b2.domain, out2)
    result = await failover(b2.store, b2.domain, Target.seq(early), out2, site=SITE_B)
    assert not result["warm"] and result["fork_seq"] == early and images(out2) == early_disks
