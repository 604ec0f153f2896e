"""Alarms: each condition fires and clears, from status documents fed to the evaluator;
plus one live RPO alarm from a real DRVA whose filter never gets its writes into the store."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from cdp.msa.alarms import KINDS, AlarmEvaluator
from cdp.msa.config import Alarms, Policy
from cdp.msa.supervisor import DrvaView
from cdp.testing.site import installed_site, running_daemon
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, random_writes
from tests.waiting import EVENTUALLY_S, wait_until

# Held writes are captured at this pace while the test waits for the RPO alarm.
HELD_CAPTURE_EVERY_S = 0.2

S = 1_000_000_000  # ns
POLICIES = {"erp": Policy(rpo_target_s=30.0), "web": Policy(rpo_target_s=60.0)}


def domain(name: str, **fields: Any) -> dict[str, Any]:
    doc = {"name": name, "rpo_lag_s": 0.0, "rpo_lag_bytes": 0, "bitmap_mode": False, "dirty_bytes": None,
           "backpressure": False, "fenced": False, "upload_errors": 0, "catalog_errors": 0, "last_error": None}
    doc.update(fields)
    return doc


def status(*domains: dict[str, Any], used_ratio: float = 0.1, backpressure: bool = False) -> dict[str, Any]:
    return {"drva": "drva-1", "pid": 100, "time": 0, "log": {"used_ratio": used_ratio, "used_bytes": 1,
                                                             "data_size": 10},
            "backpressure": backpressure, "domains": list(domains)}


def view(st: dict[str, Any] | None, *, state: str = "up", pid: int = 100, restarts: int = 0,
         state_for_s: float = 5.0, age_s: float | None = 0.5, last_exit: int | None = None) -> DrvaView:
    return DrvaView("drva-1", "127.0.0.1:1", ("erp", "web"), state, state_for_s, pid, restarts, last_exit,
                    "log_open_failed: disk gone" if last_exit else None, 1.0 if state == "restarting" else None,
                    st, age_s)


def evaluator(**kw: Any) -> AlarmEvaluator:
    return AlarmEvaluator(Alarms(log_usage_pct=90, backpressure_s=300), **kw)


def kinds(ev: AlarmEvaluator) -> set[tuple[str, str]]:
    return {(a.kind, a.subject) for a in ev.active_alarms()}


def test_quiet_site_has_no_alarms():
    ev = evaluator()
    raised, cleared = ev.evaluate(1 * S, [view(status(domain("erp"), domain("web")))], POLICIES)
    assert raised == cleared == [] and ev.active_alarms() == []
    assert ev.counts_by_kind() == dict.fromkeys(KINDS, 0)


def test_rpo_lag_fires_above_the_domain_target_and_clears():
    ev = evaluator()
    raised, _ = ev.evaluate(1 * S, [view(status(domain("erp", rpo_lag_s=31.0, rpo_lag_bytes=5 << 20),
                                                domain("web", rpo_lag_s=31.0)))], POLICIES)
    assert [(a.kind, a.subject, a.severity) for a in raised] == [("rpo_lag", "erp", "major")]  # web's target is 60
    assert "31.0 s exceeds its target 30 s" in raised[0].message and "5,242,880 bytes" in raised[0].message
    # Still lagging: the same alarm, its message kept current, nothing raised again.
    raised, _ = ev.evaluate(2 * S, [view(status(domain("erp", rpo_lag_s=45.0), domain("web")))], POLICIES)
    assert raised == [] and "45.0 s" in ev.active_alarms()[0].message
    _, cleared = ev.evaluate(3 * S, [view(status(domain("erp", rpo_lag_s=2.0), domain("web")))], POLICIES)
    assert [(a.kind, a.subject, a.raised_ns, a.cleared_ns) for a in cleared] == [("rpo_lag", "erp", 1 * S, 3 * S)]
    assert ev.active_alarms() == [] and ev.recent_alarms() == cleared


def test_log_usage_fires_above_the_threshold_and_clears():
    ev = evaluator()
    ev.evaluate(1 * S, [view(status(domain("erp"), used_ratio=0.95))], POLICIES)
    assert kinds(ev) == {("log_usage", "drva-1")}
    assert "95.0 % full" in ev.active_alarms()[0].message
    ev.evaluate(2 * S, [view(status(domain("erp"), used_ratio=0.5))], POLICIES)
    assert kinds(ev) == set()


def test_backpressure_fires_only_when_held_longer_than_the_threshold():
    ev = evaluator()
    held = [view(status(domain("erp", backpressure=True), backpressure=True))]
    ev.evaluate(0, held, POLICIES)
    ev.evaluate(299 * S, held, POLICIES)
    assert kinds(ev) == set()
    ev.evaluate(301 * S, held, POLICIES)
    assert kinds(ev) == {("backpressure", "drva-1")}
    ev.evaluate(302 * S, [view(status(domain("erp")))], POLICIES)
    assert kinds(ev) == set()
    # Released in between: the clock starts again.
    ev.evaluate(303 * S, held, POLICIES)
    ev.evaluate(400 * S, held, POLICIES)
    assert kinds(ev) == set()


def test_bitmap_mode_and_fenced_fire_and_clear():
    ev = evaluator()
    ev.evaluate(1 * S, [view(status(domain("erp", bitmap_mode=True, dirty_bytes=65536),
                                    domain("web", fenced=True, last_error="AlreadyExists: generation 9")))],
                POLICIES)
    assert kinds(ev) == {("bitmap_mode", "erp"), ("fenced", "web")}
    sev = {a.kind: a.severity for a in ev.active_alarms()}
    assert sev == {"bitmap_mode": "major", "fenced": "critical"}
    assert any("AlreadyExists: generation 9" in a.message for a in ev.active_alarms())
    ev.evaluate(2 * S, [view(status(domain("erp"), domain("web")))], POLICIES)
    assert kinds(ev) == set()


def test_store_errors_fire_when_counters_rise_and_clear_after_a_quiet_period():
    ev = evaluator(store_error_quiet_s=60)
    ev.evaluate(0, [view(status(domain("erp")))], POLICIES)
    failing = domain("erp", upload_errors=3, last_error="StoreUnavailable: 503 from the store")
    ev.evaluate(1 * S, [view(status(failing))], POLICIES)
    assert kinds(ev) == {("store_errors", "erp")}
    assert "503 from the store" in ev.active_alarms()[0].message
    # Counters steady (last_error stays: it is sticky in the DRVA): clears after the quiet period.
    ev.evaluate(30 * S, [view(status(failing))], POLICIES)
    assert kinds(ev) == {("store_errors", "erp")}
    ev.evaluate(62 * S, [view(status(failing))], POLICIES)
    assert kinds(ev) == set()
    # A catalog error later fires again.
    ev.evaluate(70 * S, [view(status(domain("erp", upload_errors=3, catalog_errors=1,
                                             last_error="StoreTimeout: catalog put")))], POLICIES)
    assert kinds(ev) == {("store_errors", "erp")}
    # A restarted DRVA (new pid) starts its counters at 0: that is no new error.
    ev.evaluate(200 * S, [view(status(domain("erp")), pid=101)], POLICIES)
    assert kinds(ev) == set()


def test_drva_down_while_restarting_keeps_domain_alarms_until_it_reports_again():
    ev = evaluator()
    ev.evaluate(1 * S, [view(status(domain("erp", rpo_lag_s=40.0)))], POLICIES)
    assert kinds(ev) == {("rpo_lag", "erp")}
    raised, cleared = ev.evaluate(2 * S, [view(None, state="restarting", last_exit=-9)], POLICIES)
    assert [(a.kind, a.subject, a.severity) for a in raised] == [("drva_down", "drva-1", "critical")]
    assert "killed by SIGKILL" in raised[0].message and "disk gone" in raised[0].message
    assert cleared == []  # erp cannot be judged while its DRVA is down: its alarm stays
    assert kinds(ev) == {("rpo_lag", "erp"), ("drva_down", "drva-1")}
    ev.evaluate(3 * S, [view(None, state="starting", state_for_s=1.0, pid=101, restarts=1)], POLICIES)
    # Started again, not reporting yet: nothing is judged, so both alarms stay.
    assert kinds(ev) == {("rpo_lag", "erp"), ("drva_down", "drva-1")}
    ev.evaluate(4 * S, [view(status(domain("erp")), pid=101, restarts=1)], POLICIES)
    assert kinds(ev) == set()
    assert sorted(a.kind for a in ev.recent_alarms()) == ["drva_down", "rpo_lag"]


def test_drva_down_when_it_never_comes_up_or_stops_reporting():
    ev = evaluator(start_grace_s=15, stale_s=10)
    ev.evaluate(1 * S, [view(None, state="starting", state_for_s=16.0)], POLICIES)
    assert "has not come up" in ev.active_alarms()[0].message
    ev.evaluate(2 * S, [view(status(domain("erp")), age_s=11.0)], POLICIES)
    assert kinds(ev) == {("drva_down", "drva-1")} and "not reporting" in ev.active_alarms()[0].message
    ev.evaluate(3 * S, [view(status(domain("erp")), age_s=1.0)], POLICIES)
    assert kinds(ev) == set()


def test_unprotected_domain_alarm_clears_and_history_is_bounded():
    ev = evaluator(history_max=5)
    for i in range(20):
        ev.evaluate((2 * i + 1) * S, [view(status(domain("erp", rpo_lag_s=99.0)))], POLICIES)
        ev.evaluate((2 * i + 2) * S, [view(status(domain("erp")))], POLICIES)
    assert len(ev.recent_alarms()) == 5
    assert len({a.id for a in ev.recent_alarms()}) == 5
    ev.evaluate(100 * S, [view(status(domain("erp", rpo_lag_s=99.0)))], POLICIES)
    # Unprotected: no policy, so no judgement, and its alarm clears.
    ev.evaluate(101 * S, [view(status(domain("erp", rpo_lag_s=99.0)))], {"web": POLICIES["web"]})
    assert kinds(ev) == set()


def test_raised_and_cleared_alarms_are_logged(caplog):
    ev = evaluator()
    with caplog.at_level(logging.INFO, logger="cdp.msa.alarms"):
        ev.evaluate(1 * S, [view(status(domain("erp", bitmap_mode=True)))], POLICIES)
        ev.evaluate(2 * S, [view(status(domain("erp")))], POLICIES)
    events = [(r.getMessage(), r.fields["kind"], r.fields["subject"]) for r in caplog.records]
    assert events == [("alarm_raised", "bitmap_mode", "erp"), ("alarm_cleared", "bitmap_mode", "erp")]
    assert caplog.records[1].fields["cleared_ns"] == 2 * S


async def test_live_rpo_alarm_fires_and_clears(tmp_path):
    """A real DRVA, a 1 s RPO target: the filter holds its frames back while it keeps
    capturing (and reporting what it captured), so the captured writes run ahead of the store;
    once it lets them go they are committed and the alarm clears."""
    site = await installed_site(tmp_path / "site")
    async with running_daemon(site) as daemon:
        record = await daemon.runner.start("protect", {"domain": "erp"}, 60,
                                           lambda job: daemon.protect("erp", Policy(rpo_target_s=1.0), job))
        assert (await daemon.runner.wait(record["id"]))["state"] == "succeeded"
        spec = site.cfg.domain("erp")
        disks = [Disk(tmp_path / f"erp{i}.img", d.disk.size) for i, d in enumerate(spec.disks)]
        filt = DomainFilter(spec.id, disks)
        client = FilterClient([filt], spec.drva.host, spec.drva.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        rng = np.random.default_rng(3)

        def erp() -> dict[str, Any]:
            st = daemon.supervisor.view("drva-1").status or {}
            return next((d for d in st.get("domains", []) if d["name"] == "erp"), {})

        def rpo_alarm() -> bool:
            daemon.evaluate_alarms()
            return ("rpo_lag", "erp") in kinds(daemon.alarms)
        try:
            filt.capture(*random_writes(rng, [d.size for d in disks], 8, 8))
            await wait_until(lambda: erp().get("committed_seq") == filt.next_seq - 1, EVENTUALLY_S,
                             "the first commit")
            filt.next_unsent = lambda: None  # hold every new frame in the filter (acks would lift a
            deadline = time.monotonic() + EVENTUALLY_S  # back-pressure flag set by hand)
            while not rpo_alarm():
                filt.capture(*random_writes(rng, [d.size for d in disks], 4, 8))
                await asyncio.sleep(HELD_CAPTURE_EVERY_S)  # the load; the loop waits for the alarm
                assert time.monotonic() < deadline, f"no RPO alarm after {EVENTUALLY_S:g} s of held writes: {erp()}"
            alarm = daemon.alarms.active[("rpo_lag", "erp")]
            assert "exceeds its target 1 s" in alarm.message
            del filt.next_unsent
            client._wake.set()
            await wait_until(lambda: erp().get("committed_seq") == filt.next_seq - 1, EVENTUALLY_S,
                             "the held writes")
            await wait_until(lambda: not rpo_alarm(), EVENTUALLY_S, "the RPO alarm to clear")
            assert alarm in daemon.alarms.recent_alarms() and alarm.cleared_ns is not None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
