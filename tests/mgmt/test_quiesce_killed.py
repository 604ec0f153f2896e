"""A quiesce whose MSA died after it committed the final mark, before it ended (found by
the crash audit: killed between its unprotect and its handover record, the restarted
site had the domain off and unprotected and no record of the mark, so every rerun of
the planned failover was refused "nothing to hand over"). The handover record is now
written as soon as the mark is committed: the next quiesce asked finishes the handover
(the domain unprotected) and answers with that same mark."""

from __future__ import annotations

from typing import Any

import pytest

from cdp.errors import CdpError
from cdp.msa.daemon import FailedOver
from cdp.msa.handover import read_handover
from cdp.store.fs import FileStore
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites, reload, sha256
from rocva import RecoverOptions, Target, recover
from tests.mgmt.test_failover_job import WRITE_S, committed, failover
from tests.waiting import wait_until


@pytest.mark.parametrize("dies_after", ["power", "unprotect"])
async def test_a_planned_failover_resumes_at_the_mark_of_a_quiesce_that_died(tmp_path, monkeypatch, dies_after):
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.b) as b:
        async with running_daemon(sites.a) as a:
            await a.power("erp", True)
            await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
            real = getattr(a, dies_after)

            async def then_dies(domain: str, *args: Any) -> Any:
                await real(domain, *args)
                raise CdpError(f"site A's MSA died after its {dies_after} (injected)")

            monkeypatch.setattr(a, dies_after, then_dies)
            first = await failover(b, planned=True)
            assert first["state"] == "failed" and "injected" in first["error"], first
            assert a.powered == []
            quiesced = sites.primaries_a()
        a = reload(sites.a)
        async with running_daemon(a) as a:  # restarted on the state the dead one left
            died = a.jobs.list(name="quiesce")
            assert len(died) == 1 and died[0]["state"] == "failed", died
            with pytest.raises(FailedOver, match="handed over at its final mark"):
                await a.power("erp", True)  # the VMs stay off: the committed mark is still their final point
            second = await failover(b, planned=True)
            assert second["state"] == "succeeded", second
            out = second["output"]
            assert out["handover"]["mark"] == died[0]["args"]["mark"], (out, died)  # the dead quiesce's mark
            assert out["fork_seq"] == read_handover(a.cfg.state_dir, "erp")["seq"], out
            assert out["handover"]["lost_writes"] == 0
            assert "erp" not in a.protection and a.powered == [] and b.powered == ["erp"]
    at_fork = await recover(FileStore(sites.store), 1,
                            RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "f", timeline=2))
    assert [sha256(i["path"]) for i in at_fork["images"]] == quiesced
