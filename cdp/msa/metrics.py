"""Prometheus metrics of the MSA: ``GET /metrics`` in the text exposition format.

One collector reads a ``MetricsSnapshot`` at scrape time (the supervisor's views, the
policies, the active alarms, the jobs this daemon ran), so a domain that is unprotected
or a DRVA that is removed simply disappears from the next scrape — there are no stale
label sets to remove. The registry is the daemon's own, never the process-wide default.

=====================================  =======  ===============  ==============================
metric                                 type     labels           from
=====================================  =======  ===============  ==============================
cdp_domain_rpo_lag_seconds             gauge    domain, drva     status.json rpo_lag_s
cdp_domain_rpo_lag_bytes               gauge    domain, drva     rpo_lag_bytes
cdp_domain_rpo_target_seconds          gauge    domain           the domain's policy
cdp_domain_received_bytes_total        counter  domain, drva     bytes_received (throughput)
cdp_domain_uploaded_bytes_total        counter  domain, drva     bytes_uploaded (throughput)
cdp_domain_backpressure                gauge    domain, drva     backpressure (0/1)
cdp_domain_bitmap_mode                 gauge    domain, drva     bitmap_mode (0/1)
cdp_domain_fenced                      gauge    domain, drva     fenced (0/1)
cdp_domain_upload_latency_seconds      gauge    + quantile       upload_latency_p50_s / _p99_s
cdp_domain_upload_errors_total         counter  domain, drva     upload_errors
cdp_domain_catalog_errors_total        counter  domain, drva     catalog_errors
cdp_drva_up                            gauge    drva             the supervisor's state is "up"
cdp_drva_restarts_total                counter  drva             restarts after an exit
cdp_drva_log_usage_ratio               gauge    drva             log.used_ratio
cdp_alarms_active                      gauge    kind             the active alarms, every kind
cdp_jobs_running                       gauge    name             jobs running in this daemon
cdp_jobs_finished_total                counter  name, state      jobs this daemon finished
=====================================  =======  ===============  ==============================

The DRVA's counters restart at zero when the DRVA restarts; Prometheus' ``rate()``
treats that as a counter reset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from cdp.msa.config import Policy
from cdp.msa.status_doc import domains_of
from cdp.msa.supervisor import DrvaView


@dataclass(frozen=True)
class MetricsSnapshot:
    drvas: Sequence[DrvaView]
    policies: Mapping[str, Policy]
    alarms_by_kind: Mapping[str, int]
    jobs_running: Mapping[str, int] = field(default_factory=dict)  # name -> count
    jobs_finished: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (name, state) -> count


#: (metric name, help, status field, kind) of the per-domain series taken as they are.
_DOMAIN_SERIES = (
    ("cdp_domain_rpo_lag_seconds", "Time between the newest captured write and the newest write in the store.",
     "rpo_lag_s", "gauge"),
    ("cdp_domain_rpo_lag_bytes", "Bytes captured that are not in the store yet.", "rpo_lag_bytes", "gauge"),
    ("cdp_domain_received_bytes", "Bytes of writes the DRVA received for the domain.", "bytes_received", "counter"),
    ("cdp_domain_uploaded_bytes", "Bytes of segments uploaded to the store.", "bytes_uploaded", "counter"),
    ("cdp_domain_backpressure", "1 while the DRVA holds the domain's filter back.", "backpressure", "gauge"),
    ("cdp_domain_bitmap_mode", "1 while the domain's filter tracks writes in a dirty bitmap.", "bitmap_mode",
     "gauge"),
    ("cdp_domain_fenced", "1 when the DRVA stopped shipping the domain (fenced).", "fenced", "gauge"),
    ("cdp_domain_upload_errors", "Failed segment uploads.", "upload_errors", "counter"),
    ("cdp_domain_catalog_errors", "Failed catalog commits.", "catalog_errors", "counter"),
)


class MsaCollector:
    """A prometheus_client collector over ``snapshot()`` (see the module docstring)."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from self._domains(snap)
        yield from self._drvas(snap)
        alarms = GaugeMetricFamily("cdp_alarms_active", "Active alarms by kind.", labels=["kind"])
        for kind, n in sorted(snap.alarms_by_kind.items()):
            alarms.add_metric([kind], n)
        yield alarms
        running = GaugeMetricFamily("cdp_jobs_running", "Jobs running in this daemon, by name.", labels=["name"])
        for name, n in sorted(snap.jobs_running.items()):
            running.add_metric([name], n)
        yield running
        finished = CounterMetricFamily("cdp_jobs_finished", "Jobs this daemon finished, by name and final state.",
                                       labels=["name", "state"])
        for (name, state), n in sorted(snap.jobs_finished.items()):
            finished.add_metric([name, state], n)
        yield finished

    def _domains(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        families: list[tuple[Metric, str]] = []
        for name, help_text, key, kind in _DOMAIN_SERIES:
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            families.append((cls(name, help_text, labels=["domain", "drva"]), key))
        latency = GaugeMetricFamily("cdp_domain_upload_latency_seconds", "Segment upload latency (recent uploads).",
                                    labels=["domain", "drva", "quantile"])
        target = GaugeMetricFamily("cdp_domain_rpo_target_seconds", "The domain's RPO target (its policy).",
                                   labels=["domain"])
        for name, policy in sorted(snap.policies.items()):
            target.add_metric([name], policy.rpo_target_s)
        for v in snap.drvas:
            if v.status is None:
                continue  # not up: no figures rather than stale ones
            for dom in domains_of(v.status):
                labels = [dom["name"], v.name]
                for family, key in families:
                    value = _number(dom.get(key))
                    if value is not None:
                        family.add_metric(labels, value)
                for q, key in (("0.5", "upload_latency_p50_s"), ("0.99", "upload_latency_p99_s")):
                    value = _number(dom.get(key))
                    if value is not None:
                        latency.add_metric([*labels, q], value)
        for family, _ in families:
            yield family
        yield latency
        yield target

    def _drvas(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        up = GaugeMetricFamily("cdp_drva_up", "1 when the DRVA process is up and reporting.", labels=["drva"])
        restarts = CounterMetricFamily("cdp_drva_restarts", "Restarts of the DRVA after it exited.", labels=["drva"])
        usage = GaugeMetricFamily("cdp_drva_log_usage_ratio", "Used share of the DRVA's log partition (0..1).",
                                  labels=["drva"])
        for v in snap.drvas:
            up.add_metric([v.name], 1.0 if v.state == "up" else 0.0)
            restarts.add_metric([v.name], v.restarts)
            log_doc = (v.status or {}).get("log")
            ratio = _number(log_doc.get("used_ratio")) if isinstance(log_doc, dict) else None
            if ratio is not None:
                usage.add_metric([v.name], ratio)
        yield up
        yield restarts
        yield usage


def _number(value: Any) -> float | None:
    """A status field as a sample: a flag as 0/1, a finite number; None for anything else
    (the text format would carry a NaN as a value no alarm rule compares)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


class MsaMetrics:
    """The daemon's registry with its one collector; ``render()`` is a scrape."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MsaCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
