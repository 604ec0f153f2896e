"""A planned failover whose recovery-site run died before its fork, rerun later
(found by the crash audit: B's rerun took the handed-over mark from its record and
never asked site A again). Meanwhile the operator at A may have followed A's power-on
refusal ("protect it here first") and run the domain there again: forking at the old
mark then lost every write A acknowledged since, reported no loss, and left both sites
running the VMs. The rerun asks A again: A answers with the same mark only while it has
not protected the domain since, and otherwise quiesces it anew; an A that cannot answer
no longer vouches for the mark, and the rerun is refused, pointing at an unplanned
failover at the latest point."""

from __future__ import annotations

from typing import Any

import pytest

import cdp.msa.failover as failover_job
from cdp.errors import CdpError
from cdp.msa.daemon import FailedOver
from cdp.msa.failover import _Quiet
from cdp.store.fs import FileStore
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites, sha256
from rocva import RecoverOptions, Target, recover
from tests.mgmt.test_failover_job import WRITE_S, committed, failover
from tests.waiting import wait_until


def appliance_dies_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first failover appliance B runs fails before its fork (B's MSA dying there);
    the targets every run was given."""
    real = failover_job._rocva_failover
    targets: list[str] = []

    async def dies_once(*args: Any, **kwargs: Any) -> Any:
        targets.append(args[3])
        if len(targets) == 1:
            raise CdpError("the recovery site's MSA died before the fork (injected)")
        return await real(*args, **kwargs)

    monkeypatch.setattr(failover_job, "_rocva_failover", dies_once)
    return targets


async def test_a_rerun_after_the_protected_site_ran_the_domain_again_fails_over_at_a_new_final_mark(
        tmp_path, monkeypatch):
    sites = make_two_sites(tmp_path)
    targets = appliance_dies_once(monkeypatch)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
        first = await failover(b, planned=True)
        assert first["state"] == "failed" and "injected" in first["error"], first
        stale = failover_job.read_record(b.cfg.state_dir, "erp")["handover"]

        # At A, the operator does what A's refusal says, and the VMs write on.
        with pytest.raises(FailedOver, match="protect it here first"):
            await a.power("erp", True)
        await a.protect("erp", a.cfg.policy("erp"), _Quiet())
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= stale["seq"] + 100, WRITE_S, "A's writes past the old mark")
        ran_to = committed(a, "erp")

        second = await failover(b, planned=True)
        assert second["state"] == "succeeded", second
        out = second["output"]
        handover = out["handover"]
        assert out["fork_seq"] == handover["seq"] >= ran_to, (out, ran_to)  # every write A committed
        assert handover["mark"] != stale["mark"] and targets[-1] == f"mark:{handover['mark']}" == out["target"]
        assert handover["lost_writes"] == 0 and handover["acked_seq"] <= out["fork_seq"]
        quiesced = sites.primaries_a()
        at_fork = await recover(FileStore(sites.store), 1,
                                RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "f", timeline=2))
        assert [sha256(i["path"]) for i in at_fork["images"]] == quiesced
        assert a.powered == [] and "erp" not in a.protection and b.powered == ["erp"]  # one site runs it


async def test_a_rerun_the_protected_site_cannot_answer_is_refused_and_an_unplanned_one_takes_over(
        tmp_path, monkeypatch):
    sites = make_two_sites(tmp_path)
    appliance_dies_once(monkeypatch)
    async with running_daemon(sites.b) as b:
        async with running_daemon(sites.a) as a:
            await a.power("erp", True)
            await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
            first = await failover(b, planned=True)
            assert first["state"] == "failed" and "injected" in first["error"], first
            handed = failover_job.read_record(b.cfg.state_dir, "erp")["handover"]
        # Site A is gone now.
        refused = await failover(b, planned=True)
        assert refused["state"] == "failed", refused
        error = refused["error"]
        assert f"{handed['mark']!r} (seq {handed['seq']}) can no longer be vouched for" in error, error
        assert "`cdp failover erp --latest`" in error and b.powered == []
        over = await failover(b, target="latest")  # not "run it again with that point"
        assert over["state"] == "succeeded", over
        assert over["output"]["fork_seq"] == handed["seq"] and over["output"]["planned"] is False
        assert b.powered == ["erp"]
