"""Bytes/s received and uploaded per domain, as the MSA shows them (its status and the
console's charts), from the byte counters of the DRVAs' status documents."""

from __future__ import annotations

import collections
from typing import Any

from cdp.msa.status_doc import COUNT_MAX, domains_of
from cdp.msa.supervisor import DrvaView

RATE_SAMPLES = 6  # throughput over the last ~5 alarm ticks


class Throughput:
    """Rates over the last few samples. Invariant: at most ``RATE_SAMPLES`` samples per
    (DRVA, domain), all from one run of that DRVA."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, str], collections.deque] = {}

    def update(self, now: float, views: list[DrvaView]) -> None:
        seen = set()
        for v in views:
            for dom in domains_of(v.status):
                received, uploaded = _counter(dom.get("bytes_received")), _counter(dom.get("bytes_uploaded"))
                if received is None or uploaded is None:
                    continue  # no figure: no rate (the status check lets no such document through)
                key = (v.name, dom["name"])
                seen.add(key)
                q = self.samples.setdefault(key, collections.deque(maxlen=RATE_SAMPLES))
                sample = (now, v.pid, received, uploaded)
                if q and (q[-1][1] != sample[1] or sample[2] < q[-1][2] or sample[3] < q[-1][3]):
                    q.clear()  # the DRVA restarted: its counters started again
                q.append(sample)
        for key in [k for k in self.samples if k not in seen]:
            del self.samples[key]

    def rates(self, drva: str, domain: str) -> dict[str, float | None]:
        q = self.samples.get((drva, domain))
        if not q or len(q) < 2 or q[-1][0] <= q[0][0]:
            return {"received_bytes_per_s": None, "uploaded_bytes_per_s": None}
        dt = q[-1][0] - q[0][0]
        return {"received_bytes_per_s": round((q[-1][2] - q[0][2]) / dt),
                "uploaded_bytes_per_s": round((q[-1][3] - q[0][3]) / dt)}


def _counter(value: Any) -> int | None:
    """A DRVA's byte counter (absent: 0), or None when it is not one."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNT_MAX:
        return value
    return None
