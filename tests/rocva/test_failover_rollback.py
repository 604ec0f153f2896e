"""The recovery site's MSA rolling back a failover job whose appliance failed before the
fork (``cdp.msa.failover``): the appliance's own record in the datastore
(``failover.json``, FORMAT.md §14.4) goes with the job's, so that the rerun — once the
protected site wrote more — forks at the point it asks for, over images holding it. An
appliance that died after its fork leaves its record, and the rerun recognises the
fork. Both daemons run in this process; their DRVAs and simulated hosts are real
subprocesses."""

from __future__ import annotations

import json
from typing import Any

from cdp.errors import CdpError, StoreUnavailable
from cdp.store.fs import FileStore
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import committed, make_two_sites
from rocva import RecoverOptions, Target, recover
from rocva import failover as rocva_failover
from rocva.failover import STATE_NAME
from tests.mgmt.test_failover_job import _hashed, failover, power_off_and_commit, run_a_then_stop
from tests.waiting import wait_until

WRITE_S = 60.0  # bound on waiting for a few hundred KB of writes to be committed


def _in_process_appliance(sites: Any, monkeypatch: Any, *, dies: str) -> Any:
    """``_rocva_failover`` run in this process (where a fault can be injected), once:
    ``dies`` "at_the_fork" (the store fails it: nothing forked) or "after_the_fork"
    (forked, then killed before its record says so)."""
    async def appliance(cfg: Any, domain_id: int, name: str, target: str, job: Any, env: Any, **kwargs: Any) -> Any:
        with monkeypatch.context() as m:
            if dies == "at_the_fork":
                async def unreachable(*args: Any, **kwargs: Any) -> Any:
                    raise StoreUnavailable("the store did not answer the fork (injected)")

                m.setattr(rocva_failover, "fork_timeline", unreachable)
            else:
                real_write = rocva_failover._write_state

                def killed_after_the_fork(out_dir: Any, doc: dict[str, Any]) -> None:
                    if doc["phase"] == "forked":
                        raise OSError(5, "the appliance was killed after the fork (injected)")
                    real_write(out_dir, doc)

                m.setattr(rocva_failover, "_write_state", killed_after_the_fork)
            try:
                await rocva_failover.failover(FileStore(sites.store), domain_id, Target.parse(target),
                                              cfg.cluster.state_dir / name, site=cfg.site)
            except (OSError, CdpError) as exc:
                raise CdpError(f"the appliance failed: {exc}") from None
        raise AssertionError("the injected fault did not happen")

    return appliance


async def test_a_failover_whose_fork_failed_leaves_no_record_and_the_rerun_forks_at_the_later_point(
        tmp_path, monkeypatch):
    import cdp.msa.failover as failover_job

    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 100, WRITE_S, "site A's writes committed")
        real_appliance = failover_job._rocva_failover
        monkeypatch.setattr(failover_job, "_rocva_failover",
                            _in_process_appliance(sites, monkeypatch, dies="at_the_fork"))
        first = await failover(b)
        assert first["state"] == "failed" and "injected" in first["error"], first
        datastore = b.cfg.cluster.state_dir / "erp"
        assert sorted(p.name for p in datastore.glob("*.img"))  # the rehydrated images stay ...
        assert not (datastore / STATE_NAME).exists()  # ... and no record says which point they hold
        assert not (b.cfg.state_dir / "failovers" / "erp.json").exists() and b.protection == {}

        # A goes on writing, then stops: the rerun's latest point is A's last write.
        start = committed(a, "erp")
        await wait_until(lambda: committed(a, "erp") > start + 50, WRITE_S, "A writing after the failed failover")
        final = await power_off_and_commit(a)
        expected = sites.primaries_a()
        monkeypatch.setattr(failover_job, "_rocva_failover", real_appliance)
        second = await failover(b)
        assert second["state"] == "succeeded", second
        out = second["output"]
        assert (out["timeline"], out["parent_timeline"], out["fork_seq"]) == (2, 1, final), out
        at_fork = await recover(FileStore(sites.store), 1,
                                RecoverOptions(Target.seq(final), tmp_path / "at-fork", timeline=2))
        assert [i["sha256"] for i in await _hashed(at_fork)] == expected


async def test_an_appliance_killed_after_its_fork_keeps_its_record_and_the_rerun_recognises_the_fork(
        tmp_path, monkeypatch):
    import cdp.msa.failover as failover_job

    sites = make_two_sites(tmp_path)
    expected = await run_a_then_stop(sites, min_seq=20)
    async with running_daemon(sites.b) as b:
        real_appliance = failover_job._rocva_failover
        monkeypatch.setattr(failover_job, "_rocva_failover",
                            _in_process_appliance(sites, monkeypatch, dies="after_the_fork"))
        first = await failover(b)
        assert first["state"] == "failed" and "injected" in first["error"], first
        kept = json.loads((b.cfg.cluster.state_dir / "erp" / STATE_NAME).read_text())
        assert kept["phase"] == "rehydrated"  # the catalog holds its fork: the record stays
        monkeypatch.setattr(failover_job, "_rocva_failover", real_appliance)
        second = await failover(b)
        assert second["state"] == "succeeded", second
        out = second["output"]
        assert out["resumed"] and (out["timeline"], out["parent_timeline"], out["fork_seq"]) == (2, 1, kept["seq"])
        at_fork = await recover(FileStore(sites.store), 1,
                                RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "f", timeline=2))
        assert [i["sha256"] for i in await _hashed(at_fork)] == expected
