"""Status history: what the console charts over time (RPO lag, throughput), per domain.

The DRVAs' status documents say how things are *now*; nothing kept how they were a
minute ago. The MSA's alarm loop reads them every ``ALARM_INTERVAL_S`` (1 s) anyway, so
it hands each reading to ``StatusHistory.record`` too: one sample per protected domain
whose DRVA is up, kept in memory only (a restarted MSA starts an empty chart — the
store's catalog, not this, is the record of what was protected).

Invariant: at most ``samples_max`` samples per domain (a ring: the oldest goes first),
and rings only for the domains protected at the last ``record`` — so the memory is
bounded by ``samples_max`` × the site's protected domains (3600 × 5 numbers ≈ 150 KB a
domain). ``GET /v1/domains/{name}/history`` answers a ring as columns, the shape a chart
library draws without reshaping.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from typing import Any, Protocol

from cdp.msa.status_doc import domains_of

SAMPLES_MAX = 3600  # one hour at the alarm loop's 1 s
FIELDS = ("t_ns", "rpo_lag_s", "rpo_lag_bytes", "received_bytes_per_s", "uploaded_bytes_per_s")


class _View(Protocol):
    name: str
    state: str
    status: dict[str, Any] | None


class _Rates(Protocol):
    def rates(self, drva: str, domain: str) -> dict[str, float | None]: ...


def _number(value: Any) -> float | None:
    """A status field as a finite number, or None (a status document is another process's
    JSON: a NaN kept here made every answer of the ring invalid JSON for an hour)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an int too large for a float
        return None


class StatusHistory:
    """Per-domain rings of status samples (see the module docstring for the invariant)."""

    def __init__(self, samples_max: int = SAMPLES_MAX) -> None:
        assert samples_max >= 1
        self.samples_max = samples_max
        self.rings: dict[str, collections.deque[tuple[Any, ...]]] = {}

    def record(self, now_ns: int, views: Iterable[_View], protected: Iterable[str], throughput: _Rates) -> None:
        """One sample per protected domain a DRVA that is up reports on."""
        wanted = set(protected)
        for name in [n for n in self.rings if n not in wanted]:
            del self.rings[name]
        for v in views:
            if v.state != "up":
                continue  # a down DRVA's status is stale: a gap in the chart, not a flat line
            for dom in domains_of(v.status):
                name = dom["name"]
                if name not in wanted:
                    continue
                rates = throughput.rates(v.name, name)
                sample = (now_ns, _number(dom.get("rpo_lag_s")), _number(dom.get("rpo_lag_bytes")),
                          _number(rates.get("received_bytes_per_s")), _number(rates.get("uploaded_bytes_per_s")))
                ring = self.rings.setdefault(name, collections.deque(maxlen=self.samples_max))
                ring.append(sample)

    def columns(self, domain: str, since_ns: int = 0) -> dict[str, list[Any]]:
        """The samples of ``domain`` taken after ``since_ns``, oldest first, as one list per field."""
        rows = [s for s in self.rings.get(domain, ()) if s[0] > since_ns]
        return {field: [row[i] for row in rows] for i, field in enumerate(FIELDS)}
