"""``marks_dropped``: a domain's DRVA let the names of its oldest marks go past the
catalog's cap (``MARKS_MAX`` per timeline, FORMAT.md §8.2). Before, only the DRVA's status
counter and a log line said so: ``cdp recover --mark NAME`` stopped finding marks and no
alarm told anyone. A warning while the DRVA's counter is above 0; the counter is per DRVA
process, so the alarm clears when the DRVA restarts."""

from __future__ import annotations

import json
from typing import Any

from cdp import catalog_state
from cdp.msa.alarms import KINDS, SEVERITY
from cdp.msa.status_doc import problem
from cdp.msa.supervisor import DrvaView
from drva import shipper
from tests.drva.harness import config, running_drva, two_domains
from tests.drva.test_hostile_filter import marks, welcomed
from tests.drva.test_protocol import send_frame
from tests.mgmt.test_alarms import POLICIES, S, domain, evaluator, kinds, status, view
from tests.waiting import EVENTUALLY_S, wait_until


def dropped(count: Any, *, pid: int = 100) -> list[DrvaView]:
    return [view(status(domain("erp", marks_dropped=count), domain("web")), pid=pid)]


def test_marks_dropped_past_the_cap_is_a_warning_naming_the_domain_the_count_the_cap_and_what_still_works():
    assert "marks_dropped" in KINDS and SEVERITY["marks_dropped"] == "warning"
    ev = evaluator()
    for none in (0, None):  # none dropped, or a DRVA older than the counter
        ev.evaluate(1 * S, dropped(none), POLICIES)
        assert kinds(ev) == set(), none
    raised, _ = ev.evaluate(2 * S, dropped(3), POLICIES)
    assert [(a.kind, a.subject, a.subject_kind, a.severity) for a in raised] == [
        ("marks_dropped", "erp", "domain", "warning")]
    text = raised[0].message
    assert text.startswith("domain erp: DRVA drva-1 dropped the names of 3 marks since it started"), text
    assert "at most 131,072 marks" in text and "--mark no longer finds them" in text, text
    assert "recoverable by --seq and --at" in text and "cleared when the DRVA restarts" in text, text
    # More dropped: the same alarm, its count kept current.
    raised, _ = ev.evaluate(3 * S, dropped(140_000), POLICIES)
    assert raised == [] and "140,000 marks" in ev.active_alarms()[0].message
    assert ev.counts_by_kind()["marks_dropped"] == 1


def test_it_stays_while_the_drva_is_down_and_clears_when_it_restarts():
    """The counter only grows while a DRVA runs: the new process's 0 clears it."""
    ev = evaluator()
    ev.evaluate(1 * S, dropped(7, pid=100), POLICIES)
    assert kinds(ev) == {("marks_dropped", "erp")}
    down = [view(None, state="restarting", restarts=1, last_exit=-9)]
    _, cleared = ev.evaluate(2 * S, down, POLICIES)  # its domains cannot be judged meanwhile
    assert cleared == [] and kinds(ev) == {("marks_dropped", "erp"), ("drva_down", "drva-1")}
    _, cleared = ev.evaluate(3 * S, dropped(0, pid=200), POLICIES)
    assert {(a.kind, a.subject) for a in cleared} == {("marks_dropped", "erp"), ("drva_down", "drva-1")}
    assert kinds(ev) == set()
    assert [a.kind for a in ev.recent_alarms()].count("marks_dropped") == 1


def test_a_mistyped_counter_is_refused_by_the_check_and_never_an_alarm():
    for bad in ("lots", -1, True, 1.5, 1 << 80):
        doc = status(domain("erp", marks_dropped=bad))
        assert f"domains[0].marks_dropped: expected a count (an integer ≥ 0), got {json.dumps(bad)}" in problem(doc)
        ev = evaluator()  # past the check (a bug): judged as no count, never raising
        ev.evaluate(1 * S, dropped(bad), POLICIES)
        assert kinds(ev) == set(), bad


async def test_a_drva_that_drops_marks_raises_it_from_its_status_file_and_its_restart_clears_it(
        tmp_path, monkeypatch):
    """A real DRVA whose cap is 5 marks gets 16 (11 names dropped); the MSA reads the
    status file it writes. The DRVA restarts (a new one on the same state): cleared."""
    monkeypatch.setattr(catalog_state, "MARKS_MAX", 5)
    monkeypatch.setattr(shipper, "MARKS_MAX", 5)
    cfg = config(two_domains(tmp_path, "drva-1"))
    policies = {"erp": POLICIES["erp"]}
    ev = evaluator()

    async def judged(d, at_s: int) -> tuple[list, list]:
        assert await d.write_status()
        doc = json.loads(cfg.status_path.read_text())
        assert problem(doc) is None, problem(doc)
        return ev.evaluate(at_s * S, [DrvaView("drva-1", "127.0.0.1:1", ("erp",), "up", 5.0, doc["pid"], 0, None,
                                               None, None, doc, 0.5)], policies)

    async with running_drva(cfg) as d:
        _, writer = await welcomed(d)
        raised, _ = await judged(d, 1)
        assert raised == []
        for first in range(1, 17, 4):
            await send_frame(writer, marks(first, [f"m{s}".encode() for s in range(first, first + 4)]))
        await wait_until(lambda: d.domains[1].committed_seq == 16, EVENTUALLY_S, "16 marks committed")
        raised, _ = await judged(d, 2)
        assert [(a.kind, a.subject) for a in raised] == [("marks_dropped", "erp")]
        assert "dropped the names of 11 marks since it started" in raised[0].message, raised[0].message
        writer.close()
    async with running_drva(cfg) as d:  # restarted: its counter starts at 0
        _, cleared = await judged(d, 3)
        assert [(a.kind, a.subject) for a in cleared] == [("marks_dropped", "erp")]
        assert ev.active_alarms() == []
