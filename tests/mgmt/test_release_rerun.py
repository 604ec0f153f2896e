"""The release a failback asks of the site the domain had failed over to, interrupted
(found by the crash audit: B unregistered the domain first, and a release killed before
it moved the images aside and removed its failover record was refused "nothing to
release" ever after — A's failback stuck at phase ``protected``, and B kept
``<datastore>/erp/``, on which a later failover to B failed once A had quiesced). The
release now unregisters last and a rerun finishes it, even from the state the old
order left; a new failover checks for unreleased disks before asking A to stop."""

from __future__ import annotations

from pathlib import Path

import pytest

import cdp.msa.failback as failback_job
from cdp.errors import CdpError
from cdp.msa import registry
from cdp.msa.failback import read_record, release_failed_over
from cdp.msa.failover import read_record as read_failover
from cdp.msa.handover import read_handover
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites
from tests.mgmt.test_failback_job import failback
from tests.mgmt.test_failover_job import WRITE_S, committed, failover
from tests.waiting import wait_until


@pytest.mark.parametrize("left", ["registered", "unregistered (the old order)"])
async def test_an_interrupted_release_is_finished_by_the_failbacks_rerun(tmp_path, monkeypatch, left):
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
        over = await failover(b, planned=True)
        assert over["state"] == "succeeded", over
        await wait_until(lambda: committed(b, "erp") > over["output"]["fork_seq"] + 20, WRITE_S, "B's writes")

        real_move = failback_job._move_images_aside
        moves: list[str] = []

        def move_dies_once(datastore: Path, name: str) -> Path | None:
            moves.append(name)
            if len(moves) == 1:
                raise CdpError("site B's MSA died in the release (injected)")
            return real_move(datastore, name)

        monkeypatch.setattr(failback_job, "_move_images_aside", move_dies_once)
        first = await failback(a)
        assert first["state"] == "failed" and "did not release it" in first["error"], first
        assert read_record(a.cfg.state_dir, "erp")["phase"] == "protected"
        images = b.cfg.cluster.state_dir / "erp"
        if left.startswith("unregistered"):  # what a release killed there before this fix left
            registry.save_registry(b.cfg.state_dir, registry.without_domain(
                registry.load_registry(b.cfg.state_dir, "site-b"), "erp"))
            b.reload_config()
        assert images.is_dir() and read_failover(b.cfg.state_dir, "erp") is not None

        second = await failback(a)
        assert second["state"] == "succeeded", second
        release = second["output"]["release"]
        assert release["released"] is True and release["runs_at"] == "site-a", release
        kept = Path(release["images_kept"])
        assert kept.parent == b.cfg.cluster.state_dir / "+released" and kept.name.startswith("erp-"), kept
        assert sorted(p.name for p in kept.glob("*.img")), kept
        assert not images.exists() and read_failover(b.cfg.state_dir, "erp") is None
        assert "erp" not in registry.registered_domains(registry.load_registry(b.cfg.state_dir, "site-b"))
        assert not any(d.name == "erp" for d in b.cfg.cluster.domains) and b.powered == []
        assert a.powered == ["erp"] and read_record(a.cfg.state_dir, "erp")["phase"] == "done"
        again = await release_failed_over(b, "erp")  # an answer lost on the way: asked again
        assert again["released"] is True and again["already"] is True, again

        # Unreleased disks at B (a release that never finished): a new failover is
        # refused before it asks A to stop anything.
        kept.rename(images)
        refused = await failover(b, planned=True)
        assert refused["state"] == "failed" and "were never released" in refused["error"], refused
        assert "`cdp failback erp` at site site-a" in refused["error"]
        assert a.powered == ["erp"] and "erp" in a.protection and read_handover(a.cfg.state_dir, "erp") is None
