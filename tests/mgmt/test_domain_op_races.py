"""Direct operations on a domain while a job moves it between sites (found by the race
audit: each window widened by a gate in the job). While a quiesce, failover, failback or
release holds the domain's claim (``cdp.msa.runner``), power, protect, unprotect and mark
asked directly are refused ``409 busy`` naming the job; the job's own steps — the same
daemon methods — go through. Around it: a quiesce that fails before its handover resumes
the VMs it paused; a failback never runs VMs that met the old, fenced timeline; a failed
failover leaves no ``takeover``; a mark whose request was delivered is not reported as
never placed; a killed quiesce leaves no domain in ``power.json`` to power on unasked.

Site A's daemon (and B's for the failover) run in this process; their DRVAs and
simulated hosts are real subprocesses."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

import cdp.msa.failback as failback_job
import cdp.msa.failover as failover_job
import cdp.msa.marks as marks
from cdp.errors import Busy, CdpError
from cdp.msa.daemon import FailedOver
from cdp.msa.failover import _Quiet
from cdp.msa.handover import read_handover
from cdp.msa.power import load_power, save_power
from cdp.testing.site import Site, make_site, running_daemon
from cdp.testing.two_sites import committed, make_two_sites, reload
from drva.requests import requests_dir
from tests.mgmt.test_failover_job import WRITE_S, run_a_then_stop
from tests.waiting import EVENTUALLY_S, wait_until


async def call(site: Site, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, site.api + path, json=body if body is not None else {},
                                headers=site.headers) as resp:
            return resp.status, json.loads(await resp.text())


async def busy(site: Site, method: str, path: str, body: Any, holder: str) -> str:
    """The request is refused 409 busy naming ``holder``; its message."""
    status, doc = await call(site, method, path, body)
    assert status == 409 and doc["error"]["code"] == "busy", (path, status, doc)
    assert holder in doc["error"]["message"], doc
    return doc["error"]["message"]


async def test_a_quiesce_refuses_protect_unprotect_and_mark_and_keeps_its_handover(tmp_path, monkeypatch):
    """A protect during a quiesce deleted the handover record and was then undone by the
    quiesce's unprotect; a power-on after it was accepted while the recovery site forks
    at the handed-over mark (both sites ran the VMs)."""
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
        at_power_off, gate = asyncio.Event(), asyncio.Event()
        real_power = a.power

        async def power(domain: str, on: bool) -> Any:
            if not on and not at_power_off.is_set():  # the quiesce's own step, after its handover record
                at_power_off.set()
                await gate.wait()
            return await real_power(domain, on)

        monkeypatch.setattr(a, "power", power)
        status, job = await call(sites.a, "POST", "/v1/domains/erp/quiesce", {"mark": "final-1"})
        assert status == 202, job
        await asyncio.wait_for(at_power_off.wait(), EVENTUALLY_S)
        assert read_handover(a.cfg.state_dir, "erp")["mark"] == "final-1"
        await busy(sites.a, "POST", "/v1/domains/erp/protect", {}, job["id"])
        await busy(sites.a, "POST", "/v1/domains/erp/unprotect", None, job["id"])
        await busy(sites.a, "POST", "/v1/domains/erp/marks", {"name": "m1"}, job["id"])
        await busy(sites.a, "POST", "/v1/domains/erp/power", {"on": False}, job["id"])
        with pytest.raises(Busy, match="a quiesce is in progress"):
            await a.protect("erp", a.cfg.policy("erp"), _Quiet())  # called directly: the same rule
        gate.set()
        done = await a.runner.wait(job["id"])
        assert done["state"] == "succeeded", done
        assert done["output"]["mark"] == "final-1" and "erp" not in a.protection and a.powered == []
        assert read_handover(a.cfg.state_dir, "erp")["mark"] == "final-1"  # still keeps the VMs off
        with pytest.raises(FailedOver, match="handed over at its final mark"):
            await a.power("erp", True)
        assert a.runner.claims == {}


async def test_a_quiesce_that_fails_after_its_pause_resumes_the_vms(tmp_path, monkeypatch):
    """The pause was never undone: the VMs stayed powered on and issued no write, for
    good (a power-on of a running domain changes nothing). (The audit's way to make the
    mark fail, an unprotect during the quiesce, is refused now: the mark fails here.)"""
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
        at_mark, gate = asyncio.Event(), asyncio.Event()

        async def mark_fails(cfg: Any, domain: str, name: str, timeout_s: float = 30.0) -> dict:
            at_mark.set()
            await gate.wait()
            raise CdpError(f"domain {domain}: mark {name!r} was not committed (injected)")

        monkeypatch.setattr(marks, "request_mark", mark_fails)
        status, job = await call(sites.a, "POST", "/v1/domains/erp/quiesce", {"mark": "final-1"})
        assert status == 202, job
        await asyncio.wait_for(at_mark.wait(), EVENTUALLY_S)
        assert "erp" in a.hypervisor.paused
        gate.set()
        done = await a.runner.wait(job["id"])
        assert done["state"] == "failed" and "injected" in done["error"], done
        assert "erp" not in a.hypervisor.paused and a.powered == ["erp"] and "erp" in a.protection
        assert read_handover(a.cfg.state_dir, "erp") is None
        control = json.loads((a.cfg.state_dir / "hypervisor" / "esx-a1.control.json").read_text())
        assert control == {"pause": []}, control
        after = committed(a, "erp")
        await wait_until(lambda: committed(a, "erp") > after + 20, WRITE_S, "the resumed VMs' writes committed")


async def test_a_failover_refuses_unprotect_and_power_and_never_keeps_takeover(tmp_path, monkeypatch):
    """At the recovery site, an unprotect after the fork and before the power-on made
    the failover report success with the VMs running unprotected (nothing shipped); and
    a failover that failed kept the domain in ``supervisor.takeover`` for good."""
    sites = make_two_sites(tmp_path)
    await run_a_then_stop(sites, min_seq=50)
    async with running_daemon(sites.b) as b:
        real_power = b.power
        at_power_on, gate = asyncio.Event(), asyncio.Event()
        fails = ["once"]

        async def power(domain: str, on: bool) -> Any:
            if on and fails:
                fails.pop()
                raise CdpError("the host did not start (injected)")
            if on:
                at_power_on.set()
                await gate.wait()
            return await real_power(domain, on)

        monkeypatch.setattr(b, "power", power)
        status, first = await call(sites.b, "POST", "/v1/failover/erp", {"target": "latest"})
        assert status == 202, first
        first = await b.runner.wait(first["id"])
        assert first["state"] == "failed" and "injected" in first["error"], first
        assert failover_job.read_record(b.cfg.state_dir, "erp")["phase"] == "forked"
        assert b.supervisor.takeover == set()  # a restart of its DRVA fences, it no longer waits for a fork

        status, job = await call(sites.b, "POST", "/v1/failover/erp", {"target": "latest"})  # resumes
        assert status == 202, job
        await asyncio.wait_for(at_power_on.wait(), WRITE_S)
        assert "erp" in b.protection
        await busy(sites.b, "POST", "/v1/domains/erp/unprotect", None, job["id"])
        await busy(sites.b, "POST", "/v1/domains/erp/protect", {}, job["id"])
        with pytest.raises(Busy, match="a failover or failback is in progress"):
            await real_power("erp", False)
        gate.set()
        done = await b.runner.wait(job["id"])
        assert done["state"] == "succeeded", done
        assert "erp" in b.protection and b.powered == ["erp"] and b.supervisor.takeover == set()
        fork = done["output"]["fork_seq"]
        await wait_until(lambda: committed(b, "erp") > fork + 20, WRITE_S, "B's writes committed")


async def test_a_failback_runs_no_vm_on_the_old_timeline(tmp_path, monkeypatch):
    """A power-on while a failback was at phase ``forked`` (before its protect restarted
    the DRVA on the new timeline) was accepted: the VMs' filter met the old, fenced
    timeline, nothing they wrote was ever acknowledged, and the failback reported
    success. The phases are forged here (the appliance and the other site are not what
    is tested); the failback's own steps run through the API, under its claim."""
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 20, WRITE_S, "site A's writes committed")
        pid = next(v.pid for v in a.hypervisor.views() if v.domain == "erp")
        record = {"version": 1, "domain": "erp", "id": 1, "site": "site-a", "peer": "site-b",
                  "target": "mark:handover-to-site-a-1", "phase": "handed_over", "started_ns": time.time_ns(),
                  "handover": {"site": "site-b", "mark": "handover-to-site-a-1", "seq": 1, "acked_seq": 1}}
        failback_job.write_record(a.cfg.state_dir, record)
        status, job = await call(sites.a, "POST", "/v1/failback/erp")
        assert status == 202, job
        refused = await a.runner.wait(job["id"])  # the appliance would write the disks under them
        assert refused["state"] == "failed" and "VMs are on at site site-a" in refused["error"], refused

        failback_job.write_record(a.cfg.state_dir, {**record, "phase": "forked", "appliance": {"fork_seq": 1}})
        with pytest.raises(FailedOver, match="phase forked"):
            await a.power("erp", True)
        at_protect, gate = asyncio.Event(), asyncio.Event()
        real_protect = a.protect
        powered_at_protect: list[list[str]] = []

        async def protect(domain: str, policy: Any, job: Any, **kw: Any) -> Any:
            powered_at_protect.append(list(a.powered))
            at_protect.set()
            await gate.wait()
            return await real_protect(domain, policy, job, **kw)

        async def released(daemon: Any, name: str, job: Any) -> dict[str, Any]:
            return {"domain": name, "released": True}

        monkeypatch.setattr(a, "protect", protect)
        monkeypatch.setattr(failback_job, "_release", released)
        status, job = await call(sites.a, "POST", "/v1/failback/erp")
        assert status == 202, job
        await asyncio.wait_for(at_protect.wait(), EVENTUALLY_S)
        assert powered_at_protect == [[]]  # the VMs that ran on the old timeline went off first
        status, doc = await call(sites.a, "POST", "/v1/domains/erp/power", {"on": True})
        assert status == 409 and doc["error"]["code"] in ("busy", "failed_over"), doc
        await busy(sites.a, "POST", "/v1/domains/erp/unprotect", None, job["id"])
        gate.set()
        done = await a.runner.wait(job["id"])
        assert done["state"] == "succeeded", done
        assert failback_job.read_record(a.cfg.state_dir, "erp")["phase"] == "done"
        assert a.powered == ["erp"]
        view = next(v for v in a.hypervisor.views() if v.domain == "erp")
        assert view.pid != pid  # a new host, started once its DRVA serves the new timeline
        after = committed(a, "erp")
        await wait_until(lambda: committed(a, "erp") > after + 20, WRITE_S, "the restarted VMs' writes committed")


async def test_unprotect_waits_for_a_mark_and_a_delivered_mark_is_not_said_never_placed(tmp_path, monkeypatch):
    """A mark job reported failed ("no mark was committed") once its domain was
    unprotected under it, and the mark was committed anyway when the domain was
    protected again: an unprotect asked while a mark job of the domain runs is refused,
    and a mark whose request its DRVA passed on says it may still be committed."""
    site = make_site(tmp_path / "site")
    drva = site.cfg.drva_of(site.cfg.domain("erp"))
    box = requests_dir(site.cfg.drva_state_dir(drva))

    async def deliver() -> None:  # what the DRVA does with a request it passes to the filter
        while not list(box.glob("mark-*.json")):
            await asyncio.sleep(0.01)
        for path in box.glob("mark-*.json"):
            path.unlink()

    delivering = asyncio.create_task(deliver())
    with pytest.raises(CdpError) as err:
        await marks.request_mark(site.cfg, "erp", "m-late", timeout_s=0.5)
    await delivering
    assert "still be committed when its log ships" in err.value.message and "'m-late'" in err.value.message, err.value.message
    assert "cdp points erp" in err.value.message

    async with running_daemon(site) as daemon:
        at_mark, gate = asyncio.Event(), asyncio.Event()

        async def held(cfg: Any, domain: str, name: str, timeout_s: float = 30.0) -> dict:
            at_mark.set()
            await gate.wait()
            return {"domain": domain, "name": name, "seq": 1, "ts": 0}

        monkeypatch.setattr(marks, "request_mark", held)
        status, job = await call(site, "POST", "/v1/domains/erp/marks", {"name": "m1"})
        assert status == 202, job
        await asyncio.wait_for(at_mark.wait(), EVENTUALLY_S)
        message = await busy(site, "POST", "/v1/domains/erp/unprotect", None, job["id"])
        assert "a mark is being placed" in message
        gate.set()
        assert (await daemon.runner.wait(job["id"]))["state"] == "succeeded"
        status, doc = await call(site, "POST", "/v1/domains/erp/unprotect")
        assert status == 200 and doc["protected"] is False, doc


async def test_a_killed_quiesce_leaves_no_domain_to_power_on_at_a_later_restart(tmp_path, monkeypatch):
    """A quiesce killed between its handover record and its power-off left the domain in
    power.json, and nothing removed it: once the domain was protected here again, the
    next restart powered its VMs on unasked."""
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 50, WRITE_S, "site A's writes committed")
        at_power_off = asyncio.Event()
        real_power = a.power

        async def power(domain: str, on: bool) -> Any:
            if not on:
                at_power_off.set()
                await asyncio.Event().wait()  # the daemon stops here (SIGTERM: its jobs are cancelled)
            return await real_power(domain, on)

        monkeypatch.setattr(a, "power", power)
        status, job = await call(sites.a, "POST", "/v1/domains/erp/quiesce", {"mark": "final-1"})
        assert status == 202, job
        await asyncio.wait_for(at_power_off.wait(), EVENTUALLY_S)
    assert load_power(sites.a.cfg) == ["erp"] and read_handover(sites.a.cfg.state_dir, "erp") is not None

    async with running_daemon(reload(sites.a)) as a:
        assert a.powered == [] and load_power(a.cfg) == []  # refused, and no longer listed
        save_power(a.cfg, ["erp"])  # as a daemon without that rule left it
        status, again = await call(sites.a, "POST", "/v1/domains/erp/quiesce", {"mark": "final-2"})
        assert status == 202, again
        again = await a.runner.wait(again["id"])
        assert again["state"] == "succeeded" and again["output"]["again"] is True, again
        assert again["output"]["mark"] == "final-1" and "erp" not in a.protection
        assert load_power(a.cfg) == []
        status, protect = await call(sites.a, "POST", "/v1/domains/erp/protect", {})
        assert status == 202, protect
        assert (await a.runner.wait(protect["id"]))["state"] == "succeeded"
        assert read_handover(a.cfg.state_dir, "erp") is None
    async with running_daemon(reload(sites.a)) as a:
        assert a.powered == [] and "erp" in a.protection  # off until asked
