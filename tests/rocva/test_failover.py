"""Failover from the store alone (``rocva.failover``, issue 11): the recovered disks equal
the protected disks at the chosen point, the domain continues on a new timeline owned by
the recovery site, the protected site's writer is fenced, a rerun is harmless — also
after a crash between the fork and its record — and what cannot be failed over is
refused with what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import load_catalog
from cdp.errors import FailoverRefused, Fenced, NotFound
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload, sha256
from rocva import InvalidTarget, RecoverOptions, Target, recover
from rocva import failover as failover_mod
from rocva.failover import STATE_NAME, failover

SITE_B = "site-b"


@pytest.fixture
async def protected(tmp_path: Path):
    """Domain 7 written by site A (the builder's owner), with marks and several segments;
    ``latest`` holds the disks' sha256 at its last seq."""
    b = await DomainBuilder(FileStore(tmp_path / "store")).start()
    marks = await random_workload(b, np.random.default_rng(11), 160, seal_every=12)
    b.marks_shas = marks
    b.latest = b.snapshot()
    return b


def images(out: Path) -> list[str]:
    return [sha256(p.read_bytes()) for p in sorted(out.glob("*.img"))]


async def test_a_failover_at_latest_rehydrates_forks_and_fences_the_protected_site(protected, tmp_path):
    b = protected
    out = tmp_path / "datastore" / "erp"
    result = await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    assert images(out) == b.latest
    state, _ = await load_catalog(b.store, b.domain)
    tl = state.timeline()
    assert (result["timeline"], result["parent_timeline"], result["fork_seq"]) == (tl.id, 1, b.seq)
    assert tl.owner == SITE_B and tl.parent == 1 and tl.fork_seq == b.seq and tl.committed_seq == b.seq
    # Site A's writer is fenced at its next commit, naming the new timeline, its owner, the fork.
    b.write(0, 0, b"\x01" * 512)
    with pytest.raises(Fenced, match=rf"timeline {tl.id} \(owner {SITE_B}\) forked from timeline 1 at seq {b.seq - 1}"):
        await b.seal()
    # A rerun finds the failover done and touches nothing.
    (out / "vm1-disk0.img").write_bytes(b"the recovered VM has been writing")
    again = await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    assert again["resumed"] and again["timeline"] == tl.id and again["images"] is None
    assert (await load_catalog(b.store, b.domain))[0].current == tl.id
    assert (out / "vm1-disk0.img").read_bytes() == b"the recovered VM has been writing"


async def test_a_failover_at_a_mark_before_the_damage(protected, tmp_path):
    b = protected
    name, seq = next((m["name"], m["seq"]) for m in b.marks if m["seq"] in b.marks_shas)
    shas = b.marks_shas[seq]
    assert shas != b.latest  # the later writes (the "damage") are not recovered
    out = tmp_path / "at-mark"
    result = await failover(b.store, b.domain, Target.mark(name), out, site=SITE_B)
    assert images(out) == shas and result["fork_seq"] == seq
    # The new timeline holds the parent's history up to the mark: every earlier point too.
    recovered = await recover(b.store, b.domain, RecoverOptions(Target.latest(), tmp_path / "check", checksum=True))
    assert [im["sha256"] for im in recovered["images"]] == shas


async def test_a_crash_between_the_fork_and_its_record_does_not_fork_twice(protected, tmp_path, monkeypatch):
    b = protected
    out = tmp_path / "ds"
    real = failover_mod._write_state
    calls = []

    def crash_on_forked(out_dir, doc):
        calls.append(doc["phase"])
        if doc["phase"] == "forked" and len(calls) == 2:
            raise OSError(5, "power lost after the fork")
        real(out_dir, doc)

    monkeypatch.setattr(failover_mod, "_write_state", crash_on_forked)
    with pytest.raises(OSError):
        await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    forked, _ = await load_catalog(b.store, b.domain)
    assert forked.current == 2
    result = await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    state, _ = await load_catalog(b.store, b.domain)
    assert sorted(state.timelines) == [1, 2] and result["timeline"] == 2 and result["resumed"]
    assert images(out) == b.latest


@pytest.mark.parametrize("killed", ["before_the_record", "before_the_fork"])
async def test_a_failover_killed_after_its_images_were_published_resumes(protected, tmp_path, monkeypatch, killed):
    """The appliance dies after the recovery published the images (and removed its own
    state), before its record says ``rehydrated`` — or after that, before the fork. The
    rerun must not refuse ("already exists: a recovery never overwrites an image", found
    by the kills campaign): no VM ran on them, so it rehydrates again, or forks at the
    recorded seq."""
    b = protected
    out = tmp_path / "ds" / "erp"
    if killed == "before_the_record":
        def killed_before_the_record(out_dir, doc):
            raise OSError(5, "killed after the images were published")

        monkeypatch.setattr(failover_mod, "_write_state", killed_before_the_record)
    else:
        async def killed_before_the_fork(*args, **kwargs):
            raise OSError(5, "killed before the fork")

        monkeypatch.setattr(failover_mod, "fork_timeline", killed_before_the_fork)
    with pytest.raises(OSError, match="killed"):
        await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    assert images(out) == b.latest and (await load_catalog(b.store, b.domain))[0].current == 1
    monkeypatch.undo()  # the rerun's appliance lives
    (out / "vm1-disk0.img.dirty").write_bytes(b"a sidecar of the images' earlier life")
    result = await failover(b.store, b.domain, Target.latest(), out, site=SITE_B)
    state, _ = await load_catalog(b.store, b.domain)
    assert result["timeline"] == state.current == 2 and result["fork_seq"] == b.seq
    assert images(out) == b.latest and not (out / "vm1-disk0.img.dirty").exists()


async def test_what_cannot_be_failed_over_is_refused_with_what_to_do(protected, tmp_path):
    b = protected
    with pytest.raises(NotFound, match="nothing to fail over"):
        await failover(b.store, 99, Target.latest(), tmp_path / "x", site=SITE_B)
    with pytest.raises(InvalidTarget):
        await failover(b.store, b.domain, Target.seq(b.seq + 1000), tmp_path / "y", site=SITE_B)
    with pytest.raises(FailoverRefused, match="already runs on timeline 1 owned by site 'site-a'"):
        await failover(b.store, b.domain, Target.latest(), tmp_path / "z", site="site-a")
    assert (await load_catalog(b.store, b.domain))[0].current == 1  # nothing forked
    await failover(b.store, b.domain, Target.latest(), tmp_path / "done", site=SITE_B)
    # Failed over already: another directory (another operator) cannot do it again.
    with pytest.raises(FailoverRefused, match="already runs on timeline 2 owned by site 'site-b'"):
        await failover(b.store, b.domain, Target.latest(), tmp_path / "again", site=SITE_B)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / STATE_NAME).write_text("{not json")
    with pytest.raises(FailoverRefused, match="not a failover record"):
        await failover(b.store, b.domain, Target.latest(), tmp_path / "junk", site="site-c")
