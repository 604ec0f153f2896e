"""A DRVA's status document: what ``status.json`` holds and the management server shows.

Per domain: the four seq marks, RPO lag in seconds and bytes, the filter's mode
(normal / bitmap / resync) and back-pressure, upload latency and error counts; for the
DRVA: log usage, group-commit figures, sessions, store errors, and — when it ships to more
than one store — each store with its domains.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drva.daemon import Drva
    from drva.domain import DomainState


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def domain_status(dom: "DomainState", backpressure: bool) -> dict[str, Any]:
    st = dom.stats
    lat = list(st.upload_latency_s)
    return {
        "id": dom.id,
        "name": dom.cfg.name,
        "accepted_seq": dom.accepted_seq,
        "durable_seq": dom.durable_seq,
        "sealed_seq": dom.sealed_seq,
        "committed_seq": dom.committed_seq,
        "committed_ts": dom.committed_ts,
        "rpo_lag_s": round(dom.rpo_lag_s(), 3),
        "rpo_lag_bytes": dom.rpo_lag_bytes(),
        "filter_mode": dom.filter_state.get("mode"),
        "bitmap_mode": dom.filter_state.get("mode") == "bitmap",
        "dirty_bytes": dom.filter_state.get("dirty_bytes"),
        "backpressure": backpressure,
        "connected": dom.session is not None,
        "catalog_ready": dom.catalog_ready,
        "fenced": dom.fenced,
        "unsealed_entries": len(dom.unsealed),
        "inflight_segments": len(dom.inflight),
        "frames_received": st.frames_received,
        "bytes_received": st.bytes_received,
        "duplicates_dropped": st.duplicates_dropped,
        "frames_refused": st.frames_refused,
        "timestamps_raised": st.timestamps_raised,
        "log_entries_skipped": st.log_entries_skipped,
        "segments_uploaded": st.segments_uploaded,
        "bytes_uploaded": st.bytes_uploaded,
        "upload_errors": st.upload_errors,
        "catalog_errors": st.catalog_errors,
        "upload_latency_p50_s": _percentile(lat, 0.5),
        "upload_latency_p99_s": _percentile(lat, 0.99),
        "last_error": st.last_error,
    }


def build_status(drva: "Drva") -> dict[str, Any]:
    log_stats = drva.log.stats()
    backpressure = drva.committer.backpressure
    return {
        "drva": drva.cfg.name,
        "listen": f"{drva.cfg.host}:{drva.port}",
        "pid": os.getpid(),
        "time": time.time(),
        "uptime_s": round(time.time() - drva.started, 1),
        "log": {
            "path": str(drva.cfg.log_path),
            "head": log_stats.head,
            "tail": log_stats.tail,
            "data_size": log_stats.data_size,
            "used_bytes": log_stats.used_bytes,
            "used_ratio": round(log_stats.used_bytes / log_stats.data_size, 4),
            "epoch": log_stats.epoch,
        },
        "backpressure": backpressure,
        "group_commits": drva.committer.commits,
        "last_commit_latency_s": round(drva.committer.commit_latency_s, 5),
        "sessions": len(drva.sessions),
        "handshakes": len(drva.handshaking) + drva.tls_handshaking,
        "handshakes_refused_busy": drva.refused_busy,
        "handshakes_refused_tls": drva.refused_tls,
        "store": drva.shipper.store.describe(),
        "store_errors": drva.shipper.store_errors,
        "last_store_error": drva.shipper.last_store_error,
        "domains": [domain_status(d, backpressure) for d in drva.domains.values()],
        **({"stores": stores_status(drva)} if len(drva.lanes) > 1 else {}),
    }


def stores_status(drva: "Drva") -> list[dict[str, Any]]:
    """Each store of a DRVA that ships to more than one (``drva.lanes``), with its domains
    (ids): ``store`` is the first's, where a domain ships unless it names its own."""
    return [{"store": lane.store.describe(), "domains": [d.id for d in lane.domains]} for lane in drva.lanes]
