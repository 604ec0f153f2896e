"""The shape of a DRVA's status document (``status.json``, written by ``drva/status.py``)
as the MSA takes it: checked once, where the supervisor reads it (``problem``), so that
alarms, history, throughput, metrics and the status answer never meet a mistyped field.

The document is another process's JSON: a field of the wrong type (``"bytes_received":
"12 B"``, ``"domains": {...}``, ``"name": ["erp"]``) once raised in the alarm loop every
second, before ``drva_down`` was judged for any DRVA, and a NaN reached the API's answers.
The reader refuses NaN and Infinity (they are no JSON; ``cdp.msa.keeper``); here each
field that is present has its type:

* a **count** is an integer in 0..2^63-1 (never a bool);
* a **gauge** is a finite number (never a bool);
* a **flag** is a bool, a **text** a string; some may be null (as the DRVA writes them);
* ``domains`` is a list of objects, each with a ``name`` (a string); ``log`` and
  ``seed_uploads`` are objects; ``lanes`` is a list of objects, each with its ``store`` (a
  string) and ``domains`` (a list of domain ids: counts).

Fields may be absent (an older DRVA's, a test's document) and unknown fields are
passed on. A document that fails is unusable as a whole: the supervisor keeps no figure
from it, and ``drva_down`` says which field (``domains[0].bytes_received: expected a
count (an integer ≥ 0), got "12 B"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

COUNT_MAX = (1 << 63) - 1  # what every reader (Prometheus' float, the console's JS) holds
SHOWN_CHARS_MAX = 40  # of a wrong value in a message

COUNT, GAUGE, FLAG, TEXT = "count", "gauge", "flag", "text"
_EXPECTED = {COUNT: "a count (an integer ≥ 0)", GAUGE: "a finite number", FLAG: "true or false", TEXT: "a string"}

#: field -> (kind, null allowed)
DOMAIN_FIELDS: dict[str, tuple[str, bool]] = {
    "id": (COUNT, False), "name": (TEXT, False),
    "accepted_seq": (COUNT, False), "durable_seq": (COUNT, False), "sealed_seq": (COUNT, False),
    "committed_seq": (COUNT, False), "committed_ts": (COUNT, False),
    "rpo_lag_s": (GAUGE, False), "rpo_lag_bytes": (COUNT, False),
    "filter_mode": (TEXT, True), "bitmap_mode": (FLAG, False), "dirty_bytes": (COUNT, True),
    "backpressure": (FLAG, False), "connected": (FLAG, False), "catalog_ready": (FLAG, False), "fenced": (FLAG, False),
    "filter_clock_offset_s": (GAUGE, True),
    "unsealed_entries": (COUNT, False), "inflight_segments": (COUNT, False),
    **{name: (COUNT, False) for name in (
        "frames_received", "bytes_received", "duplicates_dropped", "frames_refused", "timestamps_raised",
        "timestamps_clamped", "log_entries_skipped", "marks_dropped", "resync_windows_merged", "segments_uploaded",
        "bytes_uploaded", "upload_errors", "catalog_errors")},
    "upload_latency_p50_s": (GAUGE, True), "upload_latency_p99_s": (GAUGE, True),
    "last_error": (TEXT, True),
}
LOG_FIELDS: dict[str, tuple[str, bool]] = {
    "path": (TEXT, False), "head": (COUNT, False), "tail": (COUNT, False), "data_size": (COUNT, False),
    "used_bytes": (COUNT, False), "used_ratio": (GAUGE, False), "epoch": (COUNT, False),
}
#: A store lane's (``lanes[i]``): its frame budget (drva/status.py ``lanes_status``).
LANE_FIELDS: dict[str, tuple[str, bool]] = {
    "store": (TEXT, False), "frame_budget_bytes_max": (COUNT, False), "frame_budget_held_bytes": (COUNT, False),
    "frame_budget_sessions_waiting": (COUNT, False), "frame_budget_waiting_bytes": (COUNT, False),
}
#: The seeder's upload slots (``seed_uploads``, drva/status.py ``seed_uploads_status``).
SEED_UPLOAD_FIELDS: dict[str, tuple[str, bool]] = {
    "slots": (COUNT, False), "slots_used": (COUNT, False), "sessions_waiting": (COUNT, False),
}
DRVA_FIELDS: dict[str, tuple[str, bool]] = {
    "drva": (TEXT, False), "listen": (TEXT, False), "pid": (COUNT, False), "time": (GAUGE, False),
    "uptime_s": (GAUGE, False), "backpressure": (FLAG, False), "group_commits": (COUNT, False),
    "last_commit_latency_s": (GAUGE, False), "sessions": (COUNT, False), "handshakes": (COUNT, False),
    "handshakes_refused_busy": (COUNT, False), "handshakes_refused_tls": (COUNT, False),
    "store": (TEXT, False), "store_errors": (COUNT, False), "last_store_error": (TEXT, True),
}


def shown(value: Any) -> str:
    """A wrong value as a message quotes it: JSON, control characters escaped, cut."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= SHOWN_CHARS_MAX else text[:SHOWN_CHARS_MAX] + "…"


def _fits(kind: str, value: Any) -> bool:
    if kind == COUNT:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNT_MAX
    if kind == GAUGE:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == FLAG:
        return isinstance(value, bool)
    return isinstance(value, str)


def _fields_problem(doc: Mapping[str, Any], fields: Mapping[str, tuple[str, bool]], where: str) -> str | None:
    for name, (kind, nullable) in fields.items():
        if name not in doc:
            continue
        value = doc[name]
        if value is None and nullable:
            continue
        if not _fits(kind, value):
            return f"{where}{name}: expected {_EXPECTED[kind]}{' or null' if nullable else ''}, got {shown(value)}"
    return None


def problem(doc: Mapping[str, Any]) -> str | None:
    """Why the status document ``doc`` cannot be used, naming the field; None if it can."""
    if (found := _fields_problem(doc, DRVA_FIELDS, "")) is not None:
        return found
    for name, fields in (("log", LOG_FIELDS), ("seed_uploads", SEED_UPLOAD_FIELDS)):
        if (found := _object_problem(doc, name, fields)) is not None:
            return found
    if (found := _objects_problem(doc, "lanes", "store", LANE_FIELDS, _lane_domains_problem)) is not None:
        return found
    if (found := _objects_problem(doc, "domains", "name", DOMAIN_FIELDS)) is not None:
        return found
    stores = doc.get("stores", [])
    if not isinstance(stores, list) or not all(
            isinstance(s, dict) and isinstance(s.get("store"), str) and isinstance(s.get("domains"), list)
            and all(_fits(COUNT, d) for d in s["domains"]) for s in stores):
        return f"stores: expected a list of {{store: string, domains: [count]}}, got {shown(stores)}"
    return None


def _object_problem(doc: Mapping[str, Any], name: str, fields: Mapping[str, tuple[str, bool]]) -> str | None:
    """Why the object ``doc[name]`` (absent: none) is not one of ``fields``, or None."""
    if name not in doc:
        return None
    if not isinstance(doc[name], dict):
        return f"{name}: expected an object, got {shown(doc[name])}"
    return _fields_problem(doc[name], fields, f"{name}.")


def _objects_problem(doc: Mapping[str, Any], name: str, key: str, fields: Mapping[str, tuple[str, bool]],
                     more: Callable[[Mapping[str, Any], str], str | None] | None = None) -> str | None:
    """Why ``doc[name]`` (absent: an older DRVA's) is not a list of objects, each with its
    ``key`` and ``fields`` (and passing ``more``, given the object and where it is), or None."""
    items = doc.get(name, [])
    if not isinstance(items, list):
        return f"{name}: expected a list of objects, got {shown(items)}"
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            return f"{where}: expected an object, got {shown(item)}"
        if key not in item:
            return f"{where}.{key}: missing"
        if more is not None and (found := more(item, where)) is not None:
            return found
        if (found := _fields_problem(item, fields, f"{where}.")) is not None:
            return found
    return None


def _lane_domains_problem(lane: Mapping[str, Any], where: str) -> str | None:
    """Why a store lane's ``domains`` is not a list of domain ids, or None."""
    ids = lane.get("domains", [])
    if not isinstance(ids, list) or not all(_fits(COUNT, d) for d in ids):
        return f"{where}.domains: expected a list of domain ids ({_EXPECTED[COUNT]}), got {shown(ids)}"
    return None


def domains_of(status: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The domains of a status document (checked by ``problem``), [] without one. What a
    check let through is all there is; this only spares each reader the guard."""
    domains = (status or {}).get("domains")
    if not isinstance(domains, list):
        return []
    return [d for d in domains if isinstance(d, dict) and isinstance(d.get("name"), str)]
