"""What every campaign returns, so that the totals add up (issue 14's acceptance line).

A campaign counts what it did (``cases``, ``faults``, ``kills``, ``crash_states``), what it
checked (``acked_checked``: acknowledged seqs looked for after a crash, a kill or a fault)
and what broke. ``lost``, ``false_fences`` and ``daemon_crashes`` are the three figures the
acceptance wants at 0; ``failures`` counts every other broken guarantee a campaign checks
(a 5xx, an error body off FORMAT.md §13.5, a refused frame found in the log, memory over
its bound). ``problems`` keeps the first few messages, for a person to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Counters summed over campaigns, in the order the JSON line gives them.
COUNTERS = ("cases", "faults", "kills", "acked_checked", "lost", "false_fences", "daemon_crashes",
            "crash_states", "failures")
# The counters that must be 0 for a run to pass (with ``failures``, every other guarantee).
MUST_BE_ZERO = ("lost", "false_fences", "daemon_crashes", "failures")
PROBLEMS_KEPT = 20  # messages kept per campaign; the counters keep counting past them


@dataclass
class Result:
    """One campaign's figures (or the total of several)."""

    campaign: str
    cases: int = 0
    faults: int = 0
    kills: int = 0
    acked_checked: int = 0
    lost: int = 0
    false_fences: int = 0
    daemon_crashes: int = 0
    crash_states: int = 0
    failures: int = 0
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    # What a campaign measured besides the counters (RSS, statuses seen, ...): for the report.
    notes: dict[str, Any] = field(default_factory=dict)

    def problem(self, counter: str, message: str, count: int = 1) -> None:
        """Count ``count`` under ``counter`` (one of MUST_BE_ZERO) and keep the message."""
        assert counter in MUST_BE_ZERO, counter
        setattr(self, counter, getattr(self, counter) + count)
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append(message)

    @property
    def passed(self) -> bool:
        return all(getattr(self, c) == 0 for c in MUST_BE_ZERO)

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {c: getattr(self, c) for c in COUNTERS}
        out["elapsed_s"] = round(self.elapsed_s, 2)
        return out


def total(results: list[Result]) -> Result:
    """The sum of every counter and of the elapsed times."""
    out = Result("total")
    for r in results:
        for f in fields(Result):
            if f.name in COUNTERS or f.name == "elapsed_s":
                setattr(out, f.name, getattr(out, f.name) + getattr(r, f.name))
    return out
