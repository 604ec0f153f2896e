"""``vms_down``: a domain powered on here whose VMs do not run (its host restarting after
an exit or a failed start, never placed, or not up past the start grace) is a critical
alarm, cleared once they run — the hosts a full state directory kept down went unseen."""

from __future__ import annotations

from cdp.hypervisor import VmsDown
from cdp.msa.alarms import KINDS, SEVERITY, AlarmEvaluator
from cdp.msa.config import Alarms

S = 1_000_000_000


def _down(state: str, for_s: float, **kw) -> VmsDown:
    fields = dict(domain="erp", host="esx-a1", state=state, for_s=for_s, restarts=1, last_exit=None,
                  last_error=None, retry_in_s=None)
    fields.update(kw)
    return VmsDown(**fields)


def test_vms_down_is_raised_named_and_cleared() -> None:
    ev = AlarmEvaluator(Alarms(log_usage_pct=90, backpressure_s=300), start_grace_s=15.0)
    assert "vms_down" in KINDS and SEVERITY["vms_down"] == "critical"
    # A host being started for a power change is no alarm within the grace.
    raised, _ = ev.evaluate(1 * S, [], {}, vms_down=[_down("starting", 3.0)])
    assert raised == []
    raised, _ = ev.evaluate(2 * S, [], {}, vms_down=[_down(
        "not placed", 0.5, last_error="esx-a1.toml: No space left on device", retry_in_s=2.0)])
    assert [(a.kind, a.subject, a.subject_kind) for a in raised] == [("vms_down", "erp", "domain")]
    assert "could not be started: esx-a1.toml: No space left on device; tried again in 2.0 s" in raised[0].message
    raised, cleared = ev.evaluate(3 * S, [], {}, vms_down=[_down("starting", 20.0)])
    assert raised == [] and cleared == [] and "has not come up 20 s" in ev.active_alarms()[0].message
    _, cleared = ev.evaluate(4 * S, [], {}, vms_down=[])
    assert [a.kind for a in cleared] == ["vms_down"] and ev.active_alarms() == []
