"""Alarm durations on the monotonic clock, and the ``timestamps_rewritten`` alarm.

The MSA's wall clock may be stepped (NTP, an operator): measured on it, a step back of a
day kept ``store_errors`` raised for that day and hid back-pressure alarms, and a step
forward fired them at once. The wall clock only dates alarms (``raised_ns``,
``cleared_ns``)."""

from __future__ import annotations

import time

from cdp.msa.alarms import KINDS, SEVERITY
from tests.mgmt.test_alarms import POLICIES, S, domain, evaluator, kinds, status, view

WALL = 1_750_000_000 * S  # the MSA's wall clock when the test starts
DAY = 86400 * S


def test_store_errors_clear_after_the_quiet_period_when_the_wall_clock_steps_back():
    ev = evaluator(store_error_quiet_s=60)
    failing = [view(status(domain("erp", upload_errors=1), domain("web")))]
    ev.evaluate(WALL, failing, POLICIES, monotonic_ns=1000 * S)
    assert ("store_errors", "erp") in kinds(ev)
    # The wall clock steps back a day; no new error; the monotonic clock goes on.
    ev.evaluate(WALL - DAY + 30 * S, failing, POLICIES, monotonic_ns=1030 * S)
    assert ("store_errors", "erp") in kinds(ev)
    _, cleared = ev.evaluate(WALL - DAY + 61 * S, failing, POLICIES, monotonic_ns=1061 * S)
    assert ("store_errors", "erp") not in kinds(ev)
    # Dated by the wall clock, as it read at each moment.
    assert [(a.kind, a.raised_ns, a.cleared_ns) for a in cleared] == [("store_errors", WALL, WALL - DAY + 61 * S)]


def test_store_errors_stay_raised_through_a_forward_step():
    ev = evaluator(store_error_quiet_s=60)
    failing = [view(status(domain("erp", upload_errors=1), domain("web")))]
    ev.evaluate(WALL, failing, POLICIES, monotonic_ns=1000 * S)
    ev.evaluate(WALL + DAY, failing, POLICIES, monotonic_ns=1001 * S)  # 1 s later, the wall a day on
    assert ("store_errors", "erp") in kinds(ev)


def test_backpressure_fires_after_its_threshold_when_the_wall_clock_steps_back():
    ev = evaluator()  # backpressure_s = 300
    held = [view(status(domain("erp", backpressure=True), domain("web"), backpressure=True))]
    ev.evaluate(WALL, held, POLICIES, monotonic_ns=0)
    for minutes in range(1, 6):
        ev.evaluate(WALL - DAY + minutes * 60 * S, held, POLICIES, monotonic_ns=minutes * 60 * S)
    ev.evaluate(WALL - DAY + 301 * S, held, POLICIES, monotonic_ns=301 * S)
    assert ("backpressure", "drva-1") in kinds(ev)
    assert "held for 301 s" in ev.active_alarms()[0].message


def test_backpressure_does_not_fire_when_the_wall_clock_steps_forward():
    ev = evaluator()
    held = [view(status(domain("erp", backpressure=True), domain("web"), backpressure=True))]
    ev.evaluate(WALL, held, POLICIES, monotonic_ns=0)
    ev.evaluate(WALL + DAY, held, POLICIES, monotonic_ns=1 * S)  # 1 s of real time, the clock a day on
    assert ("backpressure", "drva-1") not in kinds(ev)


# ------------------------------------------------------------------ timestamps_rewritten


def rewriting(raised: int = 0, clamped: int = 0) -> list:
    return [view(status(domain("erp", timestamps_raised=raised, timestamps_clamped=clamped), domain("web")))]


def test_rewritten_timestamps_raise_a_major_alarm_naming_the_domain_and_the_counts():
    assert "timestamps_rewritten" in KINDS and SEVERITY["timestamps_rewritten"] == "major"
    ev = evaluator(timestamps_quiet_s=600)
    ev.evaluate(WALL, rewriting(), POLICIES, monotonic_ns=0)
    assert kinds(ev) == set()
    raised, _ = ev.evaluate(WALL + S, rewriting(clamped=7), POLICIES, monotonic_ns=1 * S)
    assert [(a.kind, a.subject, a.severity) for a in raised] == [("timestamps_rewritten", "erp", "major")]
    text = raised[0].message
    assert "domain erp" in text and "DRVA drva-1" in text
    assert "0 raised" in text and "7 lowered" in text and "--at" in text and "later" in text
    # Still rising: the same alarm, its counts kept current.
    ev.evaluate(WALL + 60 * S, rewriting(raised=2, clamped=9), POLICIES, monotonic_ns=60 * S)
    assert kinds(ev) == {("timestamps_rewritten", "erp")}
    assert "2 raised" in ev.active_alarms()[0].message and "9 lowered" in ev.active_alarms()[0].message


def test_rewritten_timestamps_clear_after_a_monotonic_quiet_period():
    ev = evaluator(timestamps_quiet_s=600)
    ev.evaluate(WALL, rewriting(), POLICIES, monotonic_ns=0)
    ev.evaluate(WALL + S, rewriting(raised=3), POLICIES, monotonic_ns=1 * S)
    # Counters steady; the wall clock steps back a day: the quiet period runs on regardless.
    ev.evaluate(WALL - DAY, rewriting(raised=3), POLICIES, monotonic_ns=300 * S)
    assert kinds(ev) == {("timestamps_rewritten", "erp")}
    ev.evaluate(WALL - DAY + 400 * S, rewriting(raised=3), POLICIES, monotonic_ns=602 * S)
    assert kinds(ev) == set()
    # ... and a forward step does not clear a fresh one early.
    ev.evaluate(WALL, rewriting(raised=4), POLICIES, monotonic_ns=700 * S)
    ev.evaluate(WALL + DAY, rewriting(raised=4), POLICIES, monotonic_ns=701 * S)
    assert kinds(ev) == {("timestamps_rewritten", "erp")}


def test_a_restarted_drva_counts_from_zero_and_the_first_look_counts():
    ev = evaluator(timestamps_quiet_s=600)
    # The first status seen (an MSA that just started) already has rewrites: raised.
    ev.evaluate(WALL, rewriting(clamped=1), POLICIES, monotonic_ns=0)
    assert kinds(ev) == {("timestamps_rewritten", "erp")}
    ev.evaluate(WALL, rewriting(clamped=1), POLICIES, monotonic_ns=601 * S)
    assert kinds(ev) == set()
    # A new DRVA process starts at 0: no rise.
    ev.evaluate(WALL, [view(status(domain("erp"), domain("web")), pid=101)], POLICIES, monotonic_ns=602 * S)
    assert kinds(ev) == set()
    ev.forget_subjects(set())
    assert not ev._rewrites_seen and not ev._rewrite_at_ns


def test_the_daemon_times_alarms_on_the_monotonic_clock(monkeypatch):
    """``MsaDaemon.evaluate_alarms`` with the wall clock stepped back a day: the store
    error's quiet period still ends a minute (monotonic) later."""
    from types import SimpleNamespace

    from cdp.msa.daemon import MsaDaemon

    clocks = {"wall": WALL, "mono": 1000 * S}
    monkeypatch.setattr(time, "time_ns", lambda: clocks["wall"])
    monkeypatch.setattr(time, "monotonic_ns", lambda: clocks["mono"])
    views = [view(status(domain("erp", upload_errors=1), domain("web")))]
    daemon = SimpleNamespace(
        supervisor=SimpleNamespace(views=lambda: views), alarms=evaluator(store_error_quiet_s=60),
        hypervisor=SimpleNamespace(vms_not_up=lambda: []), powered=[],
        certificates=SimpleNamespace(in_use=lambda views: []), protection=POLICIES, cfg=SimpleNamespace(drvas=[SimpleNamespace(name="drva-1")]),
        throughput=SimpleNamespace(update=lambda *a: None), history=SimpleNamespace(record=lambda *a: None))
    MsaDaemon.evaluate_alarms(daemon)
    assert ("store_errors", "erp") in kinds(daemon.alarms)
    clocks["wall"], clocks["mono"] = WALL - DAY + 61 * S, 1061 * S
    MsaDaemon.evaluate_alarms(daemon)
    assert ("store_errors", "erp") not in kinds(daemon.alarms)
