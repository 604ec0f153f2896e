"""A DRVA's status document: what ``status.json`` holds and the management server shows.

Per domain: the four seq marks, RPO lag in seconds and bytes, the filter's mode
(normal / bitmap / resync), whether a filter is connected and how far its clock is off
this DRVA's, back-pressure, upload latency and error counts; for the
DRVA: log usage, group-commit figures, sessions, store errors, each store lane with its
frame budget (``lanes``: what it holds and who waits for it), the seeder's upload slots
(``seed_uploads``), and — when it ships to more than one store — each store with its
domains (``stores``, as before ``lanes``).

``status.json`` and ``requests/`` are side files: the data path (acks, shipping) never
depends on them. Their operating errors (a full file system, a directory where the file
goes) are logged by a ``SideFileReport`` and retried on the next tick; they never end the
DRVA (they once ended it with exit 70, on every restart). Nor is a file replaced that is
not a status document (``not_status``): a log partition configured at ``status.json`` was
replaced by JSON, its acked writes lost.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp.durable import atomic_write
from cdp.file_kinds import file_kind, open_regular
from cdp.logfmt import SB_MAGIC
from cdp.logs import get_logger
from cdp.meta import META_MAGIC

if TYPE_CHECKING:
    from drva.daemon import Drva
    from drva.domain import DomainState
    from drva.seeder import UploadSlots

log = get_logger("drva.status")

#: A side-file error that persists is logged again at most this often (a status write
#: fails every second while a file system is full: one line a second would flood the log).
SIDE_FILE_REPORT_INTERVAL_S = 60.0
#: A status document begins with this (``json.dumps`` of a dict): a file at ``status.json``
#: that begins otherwise is not one, and is never replaced (``write_status_file``).
STATUS_HEAD = b"{"
#: What a file that is not a status document begins with, in the words of a message.
_NOT_STATUS = ((SB_MAGIC, "a replication-log partition (FORMAT.md §3.2)"),
               (META_MAGIC, "a metadata repository (FORMAT.md §4)"))


class SideFileReport:
    """The operating errors of one side file (``event``): each distinct error is logged
    once, the same one again at most every ``SIDE_FILE_REPORT_INTERVAL_S`` (with how many
    failures there were meanwhile), and the recovery once (``<event>_cleared``)."""

    def __init__(self, event: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self.clock = clock
        self.failures = 0  # since the last success
        self._error: str | None = None  # the last error logged
        self._logged_at = 0.0

    def failed(self, path: Path, error: str) -> None:
        self.failures += 1
        now = self.clock()
        if error == self._error and now - self._logged_at < SIDE_FILE_REPORT_INTERVAL_S:
            return
        self._error, self._logged_at = error, now
        log.warning(self.event, path=str(path), error=error, failures=self.failures,
                    reason="a side file: the DRVA goes on serving and retries on its next tick")

    def succeeded(self, path: Path) -> None:
        if self._error is not None:
            log.info(f"{self.event}_cleared", path=str(path), failures=self.failures)
        self._error, self.failures = None, 0


def os_error_text(exc: OSError) -> str:
    """An ``OSError`` as a log shows it: the errno's name and text, without the path
    (the caller names the path)."""
    if exc.errno is None or not exc.strerror:
        return f"{type(exc).__name__}: {exc}"
    return f"{errno.errorcode.get(exc.errno, str(exc.errno))}: {exc.strerror}"


def write_status_file(path: Path, doc: dict[str, Any]) -> str | None:
    """Replace the status file at ``path`` with ``doc`` (atomically); why it was not, or
    None. It is written only where nothing is, or a regular file is that is empty or a
    status document (``not_status``): anything else there (a directory, a symbolic link,
    a FIFO, a partition a configuration put at ``status.json``) is left alone, never
    followed nor replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return os_error_text(exc)
    else:
        if not stat.S_ISREG(st.st_mode):
            return f"{file_kind(st.st_mode)}, not a regular file: left alone (never followed nor replaced)"
        if st.st_size and (problem := not_status(path)) is not None:
            return problem
    try:
        atomic_write(path, json.dumps(doc, indent=1).encode())
    except OSError as exc:  # ENOSPC, EIO, EACCES, a missing state_dir...
        return os_error_text(exc)
    return None


def not_status(path: Path) -> str | None:
    """Why the regular file at ``path`` is not a status document to replace (it does not
    begin with ``STATUS_HEAD``), or None. One read of a few bytes a tick: the backstop
    under ``drva.config``, which refuses a partition at ``status.json`` — a log there was
    replaced by JSON, its acked writes lost."""
    head_bytes = max(len(magic) for magic, _ in _NOT_STATUS)
    try:
        fd = open_regular(path, os.O_RDONLY)
        try:
            head = os.read(fd, head_bytes)
        finally:
            os.close(fd)
    except OSError as exc:
        return os_error_text(exc)
    if head.startswith(STATUS_HEAD) or not head:
        return None
    what = next((what for magic, what in _NOT_STATUS if head.startswith(magic)), None)
    return (f"{what or 'a file that is not a status document'} (it begins {head!r}, a status document "
            f"{STATUS_HEAD!r}): left alone, never replaced; is a partition configured at this path?")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 3)


def domain_status(dom: "DomainState", backpressure: bool, marks_dropped: int = 0,
                  windows_merged: int = 0) -> dict[str, Any]:
    """One domain's part of the status. ``marks_dropped`` and ``windows_merged``: what
    its catalog head let go since the DRVA started (``Shipper.marks_dropped``,
    ``Shipper.windows_merged``; FORMAT.md §8.2)."""
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
        # The filter's clock minus this DRVA's, seconds (null: it never said); its last
        # filter's while none is connected (DomainState.filter_clock_offset_ns).
        "filter_clock_offset_s": _seconds(dom.filter_clock_offset_ns()),
        "catalog_ready": dom.catalog_ready,
        "fenced": dom.fenced,
        "unsealed_entries": len(dom.unsealed),
        "inflight_segments": len(dom.inflight),
        "frames_received": st.frames_received,
        "bytes_received": st.bytes_received,
        "duplicates_dropped": st.duplicates_dropped,
        "frames_refused": st.frames_refused,
        "timestamps_raised": st.timestamps_raised,
        "timestamps_clamped": st.timestamps_clamped,
        "log_entries_skipped": st.log_entries_skipped,
        # The oldest marks' names the catalog let go past its bound, and resync windows
        # merged past theirs (FORMAT.md §8.2): 0 unless a filter places far too many.
        "marks_dropped": marks_dropped,
        "resync_windows_merged": windows_merged,
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
    # Per domain: held back only when its store holds the log up (committer.held_back).
    held = drva.committer.held_back([lane.domains for lane in drva.lanes])
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
        "seed_uploads": seed_uploads_status(drva.seeder.slots),
        "handshakes": len(drva.handshaking) + drva.tls_handshaking,
        "handshakes_refused_busy": drva.refused_busy,
        "handshakes_refused_tls": drva.refused_tls,
        "store": drva.shipper.store.describe(),
        "store_errors": drva.shipper.store_errors,
        "last_store_error": drva.shipper.last_store_error,
        "domains": [domain_status(d, held[drva.shipper.lane_of[d.id].index], drva.shipper.marks_dropped.get(d.id, 0),
                                  drva.shipper.windows_merged.get(d.id, 0)) for d in drva.domains.values()],
        "lanes": lanes_status(drva),
        **({"stores": stores_status(drva)} if len(drva.lanes) > 1 else {}),
    }


def stores_status(drva: "Drva") -> list[dict[str, Any]]:
    """Each store of a DRVA that ships to more than one (``drva.lanes``), with its domains
    (ids): ``store`` is the first's, where a domain ships unless it names its own."""
    return [{"store": lane.store.describe(), "domains": [d.id for d in lane.domains]} for lane in drva.lanes]


def lanes_status(drva: "Drva") -> list[dict[str, Any]]:
    """Each store lane of the DRVA (``drva.lanes``, one even with a single store), with its
    domains (ids) and its frame budget (``drva.frame_budgets``, FORMAT.md §9.2): the bytes
    it grants at most (one frame larger than that is granted alone: held may exceed it),
    the bytes granted and not given back, and the sessions waiting for a share (each waits
    with one frame) with the bytes they wait for. Sessions that keep waiting while the
    held bytes stay near the maximum: the lane's frames are not staged as fast as they
    come (back-pressure: its store holds the log up, or the log is full)."""
    return [{"store": lane.store.describe(), "domains": [d.id for d in lane.domains],
             "frame_budget_bytes_max": budget.bytes_max, "frame_budget_held_bytes": budget.held,
             "frame_budget_sessions_waiting": budget.waiting, "frame_budget_waiting_bytes": budget.waiting_bytes}
            for lane, budget in zip(drva.lanes, drva.frame_budgets)]


def seed_uploads_status(slots: "UploadSlots") -> dict[str, int]:
    """The seeder's upload slots (``Seeder.slots``, FORMAT.md §9.3): how many an upload
    (or a chunk being read for one) holds, and how many ``SEED_CHUNK`` sessions wait for
    one, reading nothing meanwhile."""
    return {"slots": slots.capacity, "slots_used": slots.used, "sessions_waiting": slots.waiting}
