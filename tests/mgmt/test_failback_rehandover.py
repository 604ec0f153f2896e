"""A failback whose MSA died after the other site handed the domain back, before it
recorded the handover (found by the kills campaign, tests/torture/kills.py): the rerun
asks again, and the other site — which stopped protecting the domain — answers with the
mark it already handed back at, instead of refusing "nothing to hand over"."""

from __future__ import annotations

from cdp.msa.failback import read_record
from tests.mgmt.site_fixture import running_daemon
from tests.mgmt.test_failback_job import failback
from tests.mgmt.test_failover_job import WRITE_S, committed, failover, power_off_and_commit
from tests.mgmt.two_sites import make_two_sites
from tests.waiting import wait_until


async def test_a_failback_that_died_after_the_handover_resumes_at_the_handed_back_mark(tmp_path):
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
        await power_off_and_commit(a)
        over = await failover(b, target="latest")
        assert over["state"] == "succeeded", over
        await wait_until(lambda: committed(b, "erp") > over["output"]["fork_seq"] + 20, WRITE_S, "B's writes")
        # A's first failback: B quiesced and handed the domain back; A died before recording it.
        mark = "handover-to-site-a-1"
        job = await b.start_job("quiesce", {"domain": "erp"}, lambda j: b.quiesce("erp", mark, j))
        first = await b.runner.wait(job["id"])
        assert first["state"] == "succeeded", first
        assert b.powered == [] and "erp" not in b.protection
        assert read_record(a.cfg.state_dir, "erp") is None

        record = await failback(a)
        assert record["state"] == "succeeded", record
        out = record["output"]
        assert out["handover"]["mark"] == mark and out["target"] == f"mark:{mark}", out
        assert out["fork_seq"] == out["handover"]["seq"] == first["output"]["seq"], out
        assert a.powered == ["erp"] and b.powered == [] and out["release"]["released"] is True
