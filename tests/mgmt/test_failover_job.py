"""Failover through the recovery site's MSA (issue 11), with both daemons in this process
and their DRVAs and simulated hosts as real subprocesses: site A's VMs write through
A's hypervisor, A is lost, site B fails the domain over from the store alone, and B's
recovered VMs go on writing on the new timeline. Site A, back with its old state,
is refused what would touch the old timeline."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from cdp.errors import CdpError
from cdp.msa.daemon import FailedOver
from cdp.msa.failover import cleanup_test_failover, run_failover, run_test_failover
from cdp.store.fs import FileStore
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import TwoSites, committed, drva_domain, make_two_sites, reload, sha256
from rocva import RecoverOptions, Target, recover
from tests.waiting import EVENTUALLY_S, wait_until

WRITE_S = 60.0  # bound on waiting for a few hundred KB of writes to be committed


async def power_off_and_commit(daemon: Any, name: str = "erp") -> int:
    """Power the domain's VMs off (the filter drains) and wait until every write it had
    acked is committed in the store; the last acked seq."""
    off = await daemon.power(name, False)
    acked = off["acked_seq"]
    assert isinstance(acked, int) and acked > 0, off
    await wait_until(lambda: committed(daemon, name) >= acked, EVENTUALLY_S, f"seq {acked} committed")
    return acked


async def run_a_then_stop(sites: TwoSites, min_seq: int = 200) -> list[str]:
    """Site A writes until its catalog holds ``min_seq`` writes, powers the VMs off (the
    filter drains), waits until everything acked is committed; returns A's primaries'
    sha256 — the latest point — and leaves A stopped."""
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= min_seq, WRITE_S, "site A's writes committed")
        await power_off_and_commit(a)
        return sites.primaries_a()


async def failover(daemon: Any, name: str = "erp", target: str = "latest", *, planned: bool = False) -> dict[str, Any]:
    mode = "planned" if planned else "unplanned"
    record = await daemon.start_job("failover", {"domain": name, "target": target, "mode": mode},
                                    lambda job: run_failover(daemon, name, target, job, planned=planned))
    return await daemon.runner.wait(record["id"])


async def test_unplanned_failover_runs_the_domain_at_b_on_a_new_timeline(tmp_path):
    sites = make_two_sites(tmp_path)
    expected = await run_a_then_stop(sites)
    shutil.rmtree(sites.a.cfg.state_dir)  # site A is gone: only the store is left

    async with running_daemon(sites.b) as b:
        record = await failover(b)
        assert record["state"] == "succeeded", record
        out = record["output"]
        assert (out["timeline"], out["parent_timeline"]) == (2, 1)
        assert out["hosts"] == ["esx-b1", "esx-b2"] and out["added_hosts"] == ["esx-b2"]  # one VM per host
        datastore = b.cfg.cluster.state_dir
        images = [datastore / "erp" / f"{vm}-{disk}.img" for vm, disk in
                  (("erp-db", "data"), ("erp-db", "log"), ("erp-app", "disk0"))]
        # The VMs already write to these images: their state at the fork is in the store.
        store = FileStore(sites.store)
        at_fork = await recover(store, 1, RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "at-fork", timeline=2))
        assert [i["sha256"] for i in await _hashed(at_fork)] == expected
        assert out["first_write_acked_s"] is not None  # a recovered VM's write was acked at B
        assert b.cfg.domain("erp").drva == b.cfg.drvas[0].listen and "erp" in b.protection
        assert b.powered == ["erp"]

        # B's VMs write on timeline 2; stop them, and what B committed is B's disks.
        await wait_until(lambda: committed(b, "erp") > out["fork_seq"] + 50, WRITE_S, "B's writes committed")
        await power_off_and_commit(b)
        b_disks = [sha256(p) for p in images]
        latest = await recover(store, 1, RecoverOptions(Target.latest(), tmp_path / "b-latest", timeline=2))
        assert [i["sha256"] for i in await _hashed(latest)] == b_disks
        assert b_disks != expected

        again = await failover(b)
        assert again["state"] == "failed" and "already failed over to site site-b" in again["error"]


async def _hashed(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**i, "sha256": sha256(i["path"])} for i in result["images"]]


async def test_site_a_back_with_its_old_state_is_fenced_and_refused(tmp_path):
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a:  # A is lost with its VMs on (power.json says so)
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
    async with running_daemon(sites.b) as b:
        record = await failover(b)
        assert record["state"] == "succeeded", record
        await b.power("erp", False)
    store = FileStore(sites.store)
    before = sorted([i.key async for i in store.list("d/")])
    a = reload(sites.a)
    async with running_daemon(a) as daemon:
        assert daemon.powered == []  # its VMs were not powered on again
        with pytest.raises(CdpError, match="runs at site site-b now .*fail the domain back"):
            await daemon.power("erp", True)
        with pytest.raises(CdpError, match="runs at site site-b now"):
            await daemon.protect("erp", daemon.cfg.policy("erp"), _NoJob())
        await wait_until(lambda: (d := drva_domain(daemon, "erp")) is not None and d.get("fenced"), EVENTUALLY_S,
                         "A's DRVA fenced")
        daemon.evaluate_alarms()
        fenced = [x for x in daemon.alarms.active_alarms() if x.kind == "fenced"]
        assert fenced and "site-b" in fenced[0].message, fenced
        assert daemon.status()["failed_over"]["erp"] == {**daemon.status()["failed_over"]["erp"], "site": "site-b",
                                                         "timeline": 2, "parent": 1}
    after = sorted([i.key async for i in store.list("d/")])
    assert after == before  # nothing site A did reached the store


class _NoJob:
    def progress(self, *args: Any) -> None:
        pass


async def test_a_failover_that_cannot_be_done_is_refused_and_leaves_nothing(tmp_path):
    sites = make_two_sites(tmp_path)
    await run_a_then_stop(sites, min_seq=20)
    store = FileStore(sites.store)
    before = sorted([i.key async for i in store.list("d/")])
    async with running_daemon(sites.b) as b:
        unknown = await failover(b, "payroll")
        assert unknown["state"] == "failed" and "no domain named payroll in" in unknown["error"], unknown
        beyond = await failover(b, "erp", "seq:999999999")
        assert beyond["state"] == "failed" and beyond["exit_code"] == 2, beyond
        assert "seq 999999999 is outside retention" in beyond["error"], beyond["error"]
        assert "nearest consistent point" in beyond["error"]
        no_mark = await failover(b, "erp", "mark:never-placed")
        assert no_mark["state"] == "failed" and "never-placed" in no_mark["error"], no_mark["error"]
        assert "erp" not in [d.name for d in b.cfg.cluster.domains] and b.protection == {} and b.powered == []
        assert not (b.cfg.state_dir / "registered.toml").exists()
        assert not (b.cfg.state_dir / "failovers" / "erp.json").exists()
        # the domain's objects are as they were (recovery leases live under l/, not d/)
        assert sorted([i.key async for i in store.list("d/")]) == before
        ok = await failover(b, "erp", "latest")  # and a good point afterwards works
        assert ok["state"] == "succeeded", ok


async def test_a_failover_that_failed_after_the_fork_resumes_when_rerun(tmp_path, monkeypatch):
    sites = make_two_sites(tmp_path)
    expected = await run_a_then_stop(sites, min_seq=20)
    async with running_daemon(sites.b) as b:
        real_protect = b.protect
        calls = []

        async def protect_fails_once(*args: Any, **kwargs: Any) -> Any:
            calls.append(args[0])
            if len(calls) == 1:
                raise CdpError("the DRVA did not start (injected)")
            return await real_protect(*args, **kwargs)

        monkeypatch.setattr(b, "protect", protect_fails_once)
        first = await failover(b)
        assert first["state"] == "failed" and "injected" in first["error"]
        second = await failover(b)
        assert second["state"] == "succeeded", second
        out = second["output"]
        assert out["resumed"] and (out["timeline"], out["parent_timeline"]) == (2, 1)  # not forked twice
        at_fork = await recover(FileStore(sites.store), 1,
                                          RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "f", timeline=2))
        assert [i["sha256"] for i in await _hashed(at_fork)] == expected


async def test_planned_failover_loses_no_write_site_a_acknowledged(tmp_path):
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 100, WRITE_S, "site A's writes committed")
        record = await failover(b, planned=True)
        assert record["state"] == "succeeded", record
        out = record["output"]
        handover = out["handover"]
        # A's last acknowledged write is at or before the final mark B failed over at.
        assert handover["lost_writes"] == 0 and handover["acked_seq"] <= out["fork_seq"] == handover["seq"]
        assert out["target"] == f"mark:{handover['mark']}" and out["planned"] is True
        quiesced = sites.primaries_a()  # A wrote nothing after the mark: its disks are every acked write
        at_fork = await recover(FileStore(sites.store), 1,
                                          RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "f", timeline=2))
        assert [i["sha256"] for i in await _hashed(at_fork)] == quiesced
        assert a.powered == [] and "erp" not in a.protection  # A stopped its VMs and its shipping
        with pytest.raises(CdpError, match="runs at site site-b now"):
            await a.power("erp", True)
        assert b.powered == ["erp"]


async def test_a_planned_failover_that_failed_before_the_fork_resumes_at_the_handed_over_mark(tmp_path, monkeypatch):
    import cdp.msa.failover as failover_job

    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
        real_appliance = failover_job._rocva_failover
        calls = []

        async def appliance_fails_once(*args: Any, **kwargs: Any) -> Any:
            calls.append(args[3])
            if len(calls) == 1:
                raise CdpError("the appliance died (injected)")
            return await real_appliance(*args, **kwargs)

        monkeypatch.setattr(failover_job, "_rocva_failover", appliance_fails_once)
        first = await failover(b, planned=True)
        assert first["state"] == "failed" and "injected" in first["error"], first
        kept = failover_job.read_record(b.cfg.state_dir, "erp")
        assert kept is not None and kept["phase"] == "started" and kept["planned"] is True
        mark = kept["handover"]["mark"]
        assert a.powered == [] and "erp" not in a.protection  # A handed over once, and only once
        assert b.protection == {} and b.powered == []  # nothing of the domain left running at B
        # Handed over: A's VMs stay off (they ran on past the final mark, unprotected, while
        # B was to fork at it and report no loss), and so they do while a quiesce runs.
        with pytest.raises(FailedOver, match="handed over at its final mark"):
            await a.power("erp", True)
        a.runner.claims[("quiesce", "erp")] = "job q-1"
        try:
            with pytest.raises(FailedOver, match="being handed over for a planned failover"):
                await a.power("erp", True)
        finally:
            del a.runner.claims[("quiesce", "erp")]
        assert a.powered == []
        quiesced = sites.primaries_a()
        second = await failover(b, planned=True)  # A would refuse a second handover: B resumes at the mark
        assert second["state"] == "succeeded", second
        out = second["output"]
        assert calls == [f"mark:{mark}", f"mark:{mark}"] and out["target"] == f"mark:{mark}"
        assert out["handover"]["lost_writes"] == 0 and out["fork_seq"] == kept["handover"]["seq"]
        at_fork = await recover(FileStore(sites.store), 1,
                                          RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "f", timeline=2))
        assert [i["sha256"] for i in await _hashed(at_fork)] == quiesced
        assert b.powered == ["erp"]


async def test_planned_failover_with_the_peer_unreachable_is_refused(tmp_path):
    sites = make_two_sites(tmp_path)
    await run_a_then_stop(sites, min_seq=20)  # A's daemon is not running
    async with running_daemon(sites.b) as b:
        record = await failover(b, planned=True)
        assert record["state"] == "failed" and record["exit_code"] == 2, record
        assert "site site-a" in record["error"] and "did not hand domain erp over" in record["error"]
        assert "fail over unplanned" in record["error"]
        assert not (b.cfg.state_dir / "failovers" / "erp.json").exists() and b.protection == {}


async def test_a_test_failover_runs_isolated_and_cleanup_leaves_b_as_it_was(tmp_path):
    sites = make_two_sites(tmp_path)
    store = FileStore(sites.store)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        inventory_before = b.cfg.cluster
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 100, WRITE_S, "site A's writes committed")
        await power_off_and_commit(a)  # A idle for a moment: the store's listing holds still
        before = sorted([i.key async for i in store.list("")])
        record = await b.start_job("failover", {"domain": "erp", "target": "latest", "mode": "test"},
                                   lambda job: run_test_failover(b, "erp", "latest", job))
        record = await b.runner.wait(record["id"])
        assert record["state"] == "succeeded", record
        assert record["output"]["test"] and b.powered == ["erp"] and b.cfg.isolated == {"erp"}
        assert b.protection == {}
        area = b.cfg.cluster.state_dir / "+test" / "erp"
        images = sorted(area.glob("*.img"))
        sums = [sha256(p) for p in images]
        assert len(images) == 3 and sorted(sums) == sorted(sites.primaries_a())
        await wait_until(lambda: [sha256(p) for p in images] != sums, WRITE_S, "the test VMs writing locally")
        after = sorted([i.key async for i in store.list("")])
        changed = set(before) ^ set(after)
        assert all(k.startswith("l/recovery/") for k in changed), changed  # leases, nothing else

        # A goes on replicating while the test runs; a real failover is refused meanwhile
        await a.power("erp", True)
        start = committed(a, "erp")
        await wait_until(lambda: committed(a, "erp") > start + 50, WRITE_S, "A replicating during the test")
        a.evaluate_alarms()
        assert not [x for x in a.alarms.active_alarms() if x.kind == "rpo_lag"]
        refused = await failover(b)
        assert refused["state"] == "failed" and "failover-cleanup erp" in refused["error"]
        assert b.status()["vms"][0]["status"]["acked_seq"] == 0  # nothing of B's reached a DRVA

        result = await cleanup_test_failover(b, "erp")
        assert result["domain"] == "erp" and not area.exists() and b.powered == []
        assert b.cfg.cluster == inventory_before and b.cfg.isolated == frozenset()
        assert not (b.cfg.state_dir / "failovers" / "erp.json").exists()
        missing = await b.start_job("failover", {"domain": "erp"}, lambda job: cleanup_test_failover(b, "erp"))
        assert (await b.runner.wait(missing["id"]))["error"].startswith("no test failover of domain erp")


async def test_a_failover_from_a_continuous_standby_applies_only_the_tail(tmp_path):
    sites = make_two_sites(tmp_path, standby=True)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 200, WRITE_S, "site A's writes committed")

        def standby_seq() -> int:
            view = next(v for v in b.status()["standby"] if v["domain"] == "erp")
            return int(view["seq"] or 0)

        await wait_until(lambda: standby_seq() >= 200, WRITE_S, "B's standby following A")
        expected_seq = await power_off_and_commit(a)
        expected = sites.primaries_a()
        await wait_until(lambda: standby_seq() >= expected_seq, WRITE_S, "B's standby at A's last write")
        record = await failover(b)
        assert record["state"] == "succeeded", record
        out = record["output"]
        assert out["warm"] is True and out["fork_seq"] == expected_seq, out
        at_fork = await recover(FileStore(sites.store), 1,
                                          RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "f", timeline=2))
        assert [i["sha256"] for i in await _hashed(at_fork)] == expected
        assert next(v for v in b.status()["standby"] if v["domain"] == "erp")["state"] == "owned here"
        assert b.powered == ["erp"] and out["first_write_acked_s"] is not None
