"""The status history the console charts (``cdp.msa.history``): bounded, only protected
domains, no sample from a DRVA that is down, columns oldest first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cdp.msa.history import FIELDS, StatusHistory


@dataclass
class View:
    name: str
    state: str
    status: dict[str, Any] | None


class Rates:
    def rates(self, drva: str, domain: str) -> dict[str, float | None]:
        return {"received_bytes_per_s": 100.0, "uploaded_bytes_per_s": None}


def _view(lag: Any, state: str = "up") -> View:
    return View("drva-1", state, {"domains": [{"name": "erp", "rpo_lag_s": lag, "rpo_lag_bytes": 4096},
                                              {"name": "web", "rpo_lag_s": 9.0, "rpo_lag_bytes": 0}]})


def test_the_ring_keeps_the_newest_samples_of_protected_domains_only():
    history = StatusHistory(samples_max=3)
    for t in range(1, 6):
        history.record(t, [_view(float(t))], {"erp"}, Rates())
    cols = history.columns("erp")
    assert list(cols) == list(FIELDS)
    assert cols["t_ns"] == [3, 4, 5] and cols["rpo_lag_s"] == [3.0, 4.0, 5.0]  # the oldest went first
    assert cols["received_bytes_per_s"] == [100.0] * 3 and cols["uploaded_bytes_per_s"] == [None] * 3
    assert history.columns("erp", since_ns=4)["t_ns"] == [5]
    assert history.columns("web") == {f: [] for f in FIELDS}  # not protected: not kept

    history.record(6, [_view(1.0, state="restarting")], {"erp"}, Rates())
    assert history.columns("erp")["t_ns"] == [3, 4, 5]  # a down DRVA's stale status is a gap
    history.record(7, [_view("x")], {"erp"}, Rates())
    assert history.columns("erp")["rpo_lag_s"][-1] is None  # another process's JSON: not trusted
    history.record(8, [_view(1.0)], set(), Rates())
    assert history.rings == {}  # unprotected: forgotten
