"""A failover's record in its directory (``failover.json``, FORMAT.md §14.4) after a
failover that rehydrated and did not fork: a rerun forks only at the point its target
resolves to now, over images that hold that point — also after a standby moved them —
a record naming a point its timeline never held is refused naming the field, and what
is not a regular file at the record's name is refused without being read. Two sites
failing over one domain at once fork one timeline; the other is refused."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import load_catalog
from cdp.errors import FailoverRefused, StoreUnavailable
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload, sha256
from rocva import RecoverOptions, Target, recover
from rocva import failover as failover_mod
from rocva.errors import RecoveryError
from rocva.failover import STATE_NAME, failover
from rocva.standby import keep_warm

SITE_B = "site-b"
MiB = 1 << 20


def images(out: Path) -> list[str]:
    return [sha256(p.read_bytes()) for p in sorted(out.glob("*.img"))]


@pytest.fixture
async def written(tmp_path: Path):
    """Domain 7 of site A with 60 writes; ``at_x`` holds its disks' sha256 at ``x``."""
    b = await DomainBuilder(FileStore(tmp_path / "store")).start()
    await random_workload(b, np.random.default_rng(1), 60, seal_every=10)
    await b.seal()
    b.x, b.at_x = b.seq, b.snapshot()
    return b


async def _fail_at_the_fork(b: DomainBuilder, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failover to ``b.x`` that rehydrates, records ``rehydrated`` and fails to fork."""
    async def store_unreachable(*args, **kwargs):
        raise StoreUnavailable("the store did not answer the fork (injected)")

    monkeypatch.setattr(failover_mod, "fork_timeline", store_unreachable)
    with pytest.raises(StoreUnavailable, match="injected"):
        await failover(b.store, b.domain, Target.seq(b.x), out, site=SITE_B)
    monkeypatch.undo()
    assert json.loads((out / STATE_NAME).read_text())["phase"] == "rehydrated"
    assert images(out) == b.at_x and (await load_catalog(b.store, b.domain))[0].current == 1


async def _timeline_two_at(b: DomainBuilder, seq: int, check: Path) -> list[str]:
    state, _ = await load_catalog(b.store, b.domain)
    tl = state.timeline()
    assert (state.current, tl.owner, tl.parent, tl.fork_seq) == (2, SITE_B, 1, seq)
    at_fork = await recover(b.store, b.domain, RecoverOptions(Target.seq(seq), check, timeline=2, checksum=True))
    return [i["sha256"] for i in at_fork["images"]]


async def test_a_rerun_at_latest_after_a_failed_fork_forks_at_the_latest_point(written, tmp_path, monkeypatch):
    b = written
    out = tmp_path / "ds" / "erp"
    await _fail_at_the_fork(b, out, monkeypatch)
    await random_workload(b, np.random.default_rng(2), 60, seal_every=10)  # site A goes on writing
    await b.seal()
    latest, at_latest = b.seq, b.snapshot()
    assert latest > b.x and at_latest != b.at_x

    result = await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    assert (result["timeline"], result["parent_timeline"], result["fork_seq"]) == (2, 1, latest)
    assert images(out) == at_latest  # the VMs start on the point the new timeline starts at
    assert await _timeline_two_at(b, latest, tmp_path / "check") == at_latest


@pytest.mark.parametrize("rerun", ["latest", "the recorded point"])
async def test_a_standby_that_moved_the_images_after_a_failed_fork_leaves_no_record_to_trust(
        written, tmp_path, monkeypatch, rerun):
    """The MSA resumes the domain's standby when a failover fails before its fork: its
    next step brings the images to a later point. The record saying they hold ``x`` is
    removed before that, so a rerun — at ``latest``, or at ``x`` itself — forks over
    images that hold the fork's point."""
    b = written
    out = tmp_path / "ds" / "erp"
    await _fail_at_the_fork(b, out, monkeypatch)
    await random_workload(b, np.random.default_rng(3), 60, seal_every=10)
    await b.seal()
    latest, at_latest = b.seq, b.snapshot()

    step = await keep_warm(b.store, b.domain, out)
    assert step["seq"] == latest and images(out) == at_latest
    assert not (out / STATE_NAME).exists()

    target, seq, expected = ((Target.latest(), latest, at_latest) if rerun == "latest"
                             else (Target.seq(b.x), b.x, b.at_x))
    result = await failover(b.store, b.domain, target, out, site=SITE_B)
    assert (result["timeline"], result["fork_seq"]) == (2, seq)
    assert images(out) == expected
    assert await _timeline_two_at(b, seq, tmp_path / "check") == expected


async def test_a_standby_never_touches_the_images_of_a_failover_that_forked(written, tmp_path):
    b = written
    out = tmp_path / "ds" / "erp"
    await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    (out / "vm1-disk0.img").write_bytes(b"the recovered VM has been writing")
    with pytest.raises(RecoveryError, match="forked on these images"):
        await keep_warm(b.store, b.domain, out)
    assert (out / "vm1-disk0.img").read_bytes() == b"the recovered VM has been writing"
    assert json.loads((out / STATE_NAME).read_text())["phase"] == "forked"


@pytest.mark.parametrize("field, value, says", [
    ("seq", -5, "field 'seq' is -5, outside timeline 1"),
    ("seq", 10**6, "field 'seq' is 1000000, outside timeline 1"),
    ("parent_timeline", 9, "field 'parent_timeline' is 9, and domain 7 has no such timeline"),
])
async def test_a_record_of_a_point_its_timeline_never_held_is_refused_naming_the_field(
        written, tmp_path, field, value, says):
    b = written
    out = tmp_path / "ds"
    await recover(b.store, b.domain, RecoverOptions(Target.latest(), out))
    record = {"version": 1, "domain": b.domain, "site": SITE_B, "parent_timeline": 1, "seq": b.seq,
              "phase": "rehydrated", "timeline": None, field: value}
    (out / STATE_NAME).write_text(json.dumps(record))
    with pytest.raises(FailoverRefused, match=f"{out / STATE_NAME}: {says}"):
        await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    assert (await load_catalog(b.store, b.domain))[0].current == 1  # nothing forked


async def test_a_record_of_another_point_is_rehydrated_again(written, tmp_path):
    """A record of a point the target does not resolve to (an earlier run's) is not
    trusted: the images are rehydrated at the target's point, and the fork is there."""
    b = written
    out = tmp_path / "ds"
    await recover(b.store, b.domain, RecoverOptions(Target.latest(), out))
    (out / STATE_NAME).write_text(json.dumps({"version": 1, "domain": b.domain, "site": SITE_B,
                                              "parent_timeline": 1, "seq": 5, "phase": "rehydrated",
                                              "timeline": None}))
    result = await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    assert result["fork_seq"] == b.seq and images(out) == b.at_x


@pytest.mark.parametrize("kind", ["sparse", "link", "fifo"])
async def test_what_is_not_a_small_regular_file_at_the_record_is_refused_unread(written, tmp_path, kind):
    """A 256 MiB sparse file is read no further than the record's bound; a link (here to
    a good record) is never followed; a FIFO is never read (here a writer would hand it a
    good record)."""
    b = written
    out = tmp_path / "ds"
    out.mkdir()
    path = out / STATE_NAME
    good = json.dumps({"version": 1, "domain": b.domain, "site": SITE_B, "parent_timeline": 1, "seq": b.seq,
                       "phase": "rehydrated", "timeline": None}).encode()
    writer = None
    if kind == "sparse":
        with open(path, "wb") as f:
            f.truncate(256 * MiB)
        says = "not a failover record this version can read"
    elif kind == "link":
        (tmp_path / "elsewhere.json").write_bytes(good)
        path.symlink_to(tmp_path / "elsewhere.json")
        says = "is a symbolic link"
    else:
        os.mkfifo(path)

        def feed() -> None:
            try:
                with open(path, "wb") as w:
                    w.write(good)
            except BrokenPipeError:
                pass  # the reader opened the FIFO and closed it unread

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        says = "is not a regular file"
    tracemalloc.start()
    try:
        with pytest.raises(FailoverRefused, match=f"{path}:? {says}"):
            await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        if writer is not None:  # a reader end held open until the writer is done: it never blocks
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                writer.join()
            finally:
                os.close(fd)
    assert peak < 32 * MiB, peak
    assert (await load_catalog(b.store, b.domain))[0].current == 1


async def test_two_sites_failing_over_at_once_fork_one_timeline(written, tmp_path, monkeypatch):
    """Site C forks while site B rehydrates (B loaded the catalog, then C's whole failover
    ran, then B forks): B's fork is refused naming C's timeline, and C's stays current."""
    b = written
    real = failover_mod.fork_timeline

    async def site_c_first(store, domain, fork_seq, owner, **kwargs):
        if owner == SITE_B:
            monkeypatch.setattr(failover_mod, "fork_timeline", real)
            c = await failover(FileStore(tmp_path / "store"), domain, Target.latest(), tmp_path / "c", site="site-c")
            assert (c["timeline"], c["parent_timeline"]) == (2, 1)
        return await real(store, domain, fork_seq, owner, **kwargs)

    monkeypatch.setattr(failover_mod, "fork_timeline", site_c_first)
    with pytest.raises(FailoverRefused, match=r"timeline 1 is no longer current: timeline 2 \(owner 'site-c', "
                                              r"forked from timeline 1 at seq \d+\) is"):
        await failover(b.store, b.domain, Target.latest(), tmp_path / "b", site=SITE_B)
    state, _ = await load_catalog(b.store, b.domain)
    assert [(t, state.timeline(t).owner, state.timeline(t).parent) for t in sorted(state.timelines)] == [
        (1, "site-a", 0), (2, "site-c", 1)]
    assert state.current == 2
    assert images(tmp_path / "c") == b.at_x
