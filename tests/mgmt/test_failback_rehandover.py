"""A failback or a planned failover whose MSA died after the other site handed the
domain over, before it recorded the handover (found by the kills campaign,
tests/torture/kills.py): the rerun asks again, and the other site — which stopped
protecting the domain — answers with the mark it already handed over at
(``handovers/<domain>.json``), instead of refusing "nothing to hand over"."""

from __future__ import annotations

from cdp.msa.failback import read_record
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites
from tests.mgmt.test_failback_job import failback
from tests.mgmt.test_failover_job import WRITE_S, committed, failover, power_off_and_commit
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


async def test_a_planned_failover_that_died_after_the_quiesce_resumes_at_the_handed_over_mark(tmp_path):
    from cdp.msa.failover import read_record as read_failover
    from cdp.msa.handover import read_handover
    from cdp.store.fs import FileStore
    from rocva import RecoverOptions, Target, recover
    from cdp.testing.two_sites import sha256

    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
        # B asked A to quiesce for a planned failover, and died before recording the answer.
        mark = "handover-to-site-b-1"
        job = await a.start_job("quiesce", {"domain": "erp"}, lambda j: a.quiesce("erp", mark, j))
        first = await a.runner.wait(job["id"])
        assert first["state"] == "succeeded", first
        assert a.powered == [] and "erp" not in a.protection and read_failover(b.cfg.state_dir, "erp") is None
        assert read_handover(a.cfg.state_dir, "erp")["seq"] == first["output"]["seq"]
        quiesced = sites.primaries_a()

        record = await failover(b, planned=True)  # the rerun asks A again
        assert record["state"] == "succeeded", record
        out = record["output"]
        assert out["handover"]["mark"] == mark and out["target"] == f"mark:{mark}", out
        assert out["fork_seq"] == out["handover"]["seq"] == first["output"]["seq"], out
        assert out["handover"]["lost_writes"] == 0
        at_fork = await recover(FileStore(sites.store), 1,
                                          RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "f", timeline=2))
        assert [sha256(i["path"]) for i in at_fork["images"]] == quiesced
        assert b.powered == ["erp"] and a.powered == []
