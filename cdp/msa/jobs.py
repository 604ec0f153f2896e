"""Jobs: every management operation runs as a job with a name, a timeout, progress and a
kept output — the seed's run-command model (FORMAT.md §13).

A job is one JSON file ``<state_dir>/jobs/<id>.json``, rewritten atomically (temporary
file, fsync, rename) at each state change and at most ``PROGRESS_WRITES_PER_S`` times a
second for progress, so the CLI and the daemon (which share the directory) and a
follower (``cdp jobs ID``) always read a whole record. Records older than the retention
period (default 60 days) are pruned. A job the process never finished (the process
died) is reported as ``abandoned`` by whoever reads it: its ``pid`` is gone.

::

    store = JobStore(state_dir / "jobs")
    record = await run_job(store, "consolidate", {"domain": "erp"}, timeout_s=3600,
                           work=lambda job: consolidate(..., progress=job.progress))
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cdp.durable import atomic_write
from cdp.errors import CdpError, ConfigError, NotFound
from cdp.file_kinds import open_regular
from cdp.logs import get_logger
from cdp.msa.procs import pid_alive

log = get_logger("cdp.msa.jobs")

JOB_VERSION = 1
STATES = ("running", "succeeded", "failed", "timed_out", "cancelled", "abandoned")
FINAL = frozenset(("succeeded", "failed", "timed_out", "cancelled"))
EVENTS_MAX = 200  # the newest progress messages kept in a record
PROGRESS_WRITES_PER_S = 2.0
RETENTION_DEFAULT_S = 60 * 86400.0
JOB_ID_CHARS_MAX = 128  # a name of 64 and the 23 characters around it, with room to spare
JOB_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{JOB_ID_CHARS_MAX}}}")
#: Records kept at most: past it the oldest are deleted, whatever their age. A client
#: looping on a cheap request wrote 300 records a second (14 GB a day, kept 60 days).
RECORDS_KEPT_MAX = 10_000
RECORDS_CHECK_EVERY = 64  # creations between two counts of the directory (a count of 10,000 names: ~5 ms)
RECORD_BYTES_MAX = 4 << 20  # a record is a few KB (200 events at most); a larger file is not one of ours
#: The keys and JSON types every record has; a file without them is refused naming it.
RECORD_KEYS: dict[str, type | tuple[type, ...]] = {
    "version": int, "id": str, "name": str, "args": dict, "state": str, "created_ns": int,
    "ended_ns": (int, type(None)), "pid": int, "progress": dict, "events": list,
}


class Job:
    """A running job's handle: progress and messages go to its record."""

    def __init__(self, store: JobStore, record: dict[str, Any]) -> None:
        self.store = store
        self.record = record
        self._last_write = 0.0

    @property
    def id(self) -> str:
        return self.record["id"]

    def progress(self, phase: str | int, done: int | None = None, total: int | None = None) -> None:
        """``progress(phase, done, total)`` or ``progress(done, total)``; written throttled."""
        if not isinstance(phase, str):
            phase, done, total = self.record["progress"].get("phase") or "", phase, done
        self.record["progress"] = {"phase": phase, "done": done, "total": total}
        now = time.monotonic()
        if now - self._last_write >= 1 / PROGRESS_WRITES_PER_S:
            self._write()

    def event(self, message: str) -> None:
        events = self.record["events"]
        events.append({"ts_ns": time.time_ns(), "message": message})
        del events[:-EVENTS_MAX]
        self._write()

    def _write(self) -> None:
        self._last_write = time.monotonic()
        self.store.write(self.record)


class JobStore:
    """The job records of one state directory."""

    def __init__(self, root: Path, retention_s: float = RETENTION_DEFAULT_S,
                 kept_max: int = RECORDS_KEPT_MAX) -> None:
        self.root = Path(root)
        self.retention_s = retention_s
        self.kept_max = kept_max
        self._created = 0  # records created here since the directory was last counted

    def path(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            shown = repr(job_id)[:JOB_ID_CHARS_MAX]
            raise ConfigError(f"job id {shown}: expected 1..{JOB_ID_CHARS_MAX} ASCII letters, digits, '-' and '_'")
        return self.root / f"{job_id}.json"

    def create(self, name: str, args: dict[str, Any], timeout_s: float) -> Job:
        now = time.time_ns()
        record = {
            "version": JOB_VERSION, "id": f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now / 1e9))}-"
                                          f"{name}-{secrets.token_hex(3)}",
            "name": name, "args": args, "state": "running", "timeout_s": timeout_s,
            "created_ns": now, "ended_ns": None, "pid": os.getpid(),
            "progress": {"phase": None, "done": None, "total": None},
            "events": [], "output": None, "error": None,
        }
        job = Job(self, record)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            job._write()
        except OSError as exc:
            raise CdpError(f"job records {self.root}: cannot write a record ({exc.strerror}): the state "
                           f"directory must be a writable directory") from exc
        self._created += 1
        if self._created >= RECORDS_CHECK_EVERY:
            self._created = 0
            self._cap(keep=job.id)
        return job

    def write(self, record: dict[str, Any]) -> None:
        atomic_write(self.path(record["id"]), json.dumps(record, sort_keys=True).encode())

    def get(self, job_id: str) -> dict[str, Any]:
        path = self.path(job_id)
        try:
            with open(path, "rb", opener=open_regular) as f:
                data = f.read(RECORD_BYTES_MAX + 1)
        except FileNotFoundError:
            raise NotFound(f"no job {job_id} in {self.root}") from None
        except OSError as exc:
            raise CdpError(f"job record {path}: unreadable ({exc.strerror or type(exc).__name__})") from exc
        record = _checked_record(path, job_id, data)
        if record["state"] == "running" and not pid_alive(record["pid"]):
            record["state"] = "abandoned"  # its process is gone; the record says how far it got
        return record

    def _ids(self) -> list[str]:
        """Every record's id, oldest first (an id starts with its creation time, UTC)."""
        try:
            names = os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):  # no records (a create says what is wrong)
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and JOB_ID.fullmatch(n[:-5]))

    def list(self, *, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` records (optionally of one ``name``), newest first. A record
        that does not read as one is skipped and logged, never the end of the listing."""
        ids = self._ids()
        if name is not None:  # by the id's name part, so that only candidates are read
            ids = [i for i in ids if i.endswith(f"-{name}-{i[-6:]}")]
        out = []
        for job_id in reversed(ids):
            try:
                record = self.get(job_id)
            except NotFound:
                continue  # pruned meanwhile
            except CdpError as exc:
                log.warning("job_record_skipped", id=job_id, error=exc.message)
                continue
            if name is None or record["name"] == name:
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    def prune(self, now_ns: int | None = None) -> int:
        """Delete records last written more than ``retention_s`` ago (a record is written
        for the last time when its job ends), then the oldest past ``kept_max``; return
        how many. By file name and time: no record is parsed for its age, and a malformed
        one goes like any other."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        gone = 0
        for job_id in self._ids():
            try:
                written_ns = os.lstat(self.root / f"{job_id}.json").st_mtime_ns
            except FileNotFoundError:
                continue
            if now_ns - written_ns > self.retention_s * 1e9:
                gone += self._delete(job_id)
        return gone + self._cap()

    def _cap(self, keep: str | None = None) -> int:
        """Delete the oldest records past ``kept_max`` (not a job whose process still runs
        it, nor ``keep``); return how many."""
        ids = self._ids()
        gone = 0
        for job_id in ids[: max(0, len(ids) - self.kept_max)]:
            if job_id != keep and not self._running(job_id):
                gone += self._delete(job_id)
        if gone:
            log.warning("job_records_capped", deleted=gone, kept_max=self.kept_max)
        return gone

    def _running(self, job_id: str) -> bool:
        try:
            return self.get(job_id)["state"] == "running"
        except CdpError:
            return False

    def _delete(self, job_id: str) -> int:
        try:
            os.unlink(self.root / f"{job_id}.json")
        except FileNotFoundError:
            return 0
        return 1


def _checked_record(path: Path, job_id: str, data: bytes) -> dict[str, Any]:
    """The record in ``data`` (file ``path``), or a CdpError naming the file and what is
    wrong: a planted or damaged file must not stop a listing, a prune or a daemon start
    with a traceback."""
    if len(data) > RECORD_BYTES_MAX:
        raise CdpError(f"job record {path}: over {RECORD_BYTES_MAX} bytes, not a job record")
    try:
        record = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CdpError(f"job record {path}: not JSON ({str(exc)[:80]})") from None
    if not isinstance(record, dict):
        raise CdpError(f"job record {path}: expected a JSON object, got {type(record).__name__}")
    for key, kind in RECORD_KEYS.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise CdpError(f"job record {path}: {key}: missing or not of the expected type")
    if record["version"] != JOB_VERSION or record["id"] != job_id or record["state"] not in STATES:
        raise CdpError(f"job record {path}: expected version {JOB_VERSION}, id {job_id!r} (its file's name) "
                       f"and a state in {', '.join(STATES)}")
    return record


async def run_job(store: JobStore, name: str, args: dict[str, Any], timeout_s: float,
                  work: Callable[[Job], Awaitable[Any]], *, on_start: Callable[[Job], None] | None = None
                  ) -> dict[str, Any]:
    """Run ``work(job)`` as job ``name``; return its final record. ``work``'s result (a JSON
    value) becomes the record's ``output``; a ``CdpError`` or an ``OSError`` (an operating
    error) its ``error`` (state ``failed``); the timeout cancels it (``timed_out``), and so
    does a cancellation (``cancelled``, re-raised). Other exceptions are bugs: recorded,
    re-raised."""
    job = store.create(name, args, timeout_s)
    if on_start is not None:
        on_start(job)
    record = job.record
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
    # that arrives as the work ends, and the daemon's stop must reach every job.
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            record["output"] = await work(job)
        record["state"] = "succeeded"
    except TimeoutError as exc:
        if deadline.expired():
            record["state"], record["error"] = "timed_out", f"did not finish within {timeout_s:g} s"
        else:  # the work's own timeout (an operating error, e.g. a socket's): it failed
            record["state"], record["error"] = "failed", f"timed out: {exc or type(exc).__name__}"
            record["exit_code"] = 1
    except CdpError as exc:
        record["state"], record["error"] = "failed", exc.message
        record["exit_code"] = exc.exit_code
    except asyncio.CancelledError:
        record["state"], record["error"] = "cancelled", "cancelled"
        record["ended_ns"] = time.time_ns()
        store.write(record)
        raise
    except OSError as exc:  # an operating error (a file, a permission, a full disk), not a bug
        record["state"], record["error"] = "failed", f"{exc.strerror or str(exc) or type(exc).__name__}" + (
            f": {exc.filename}" if exc.filename else "")
        record["exit_code"] = 1
    except Exception as exc:
        record["state"], record["error"] = "failed", f"internal error: {type(exc).__name__}: {exc}"
        record["ended_ns"] = time.time_ns()
        store.write(record)
        raise
    record["ended_ns"] = time.time_ns()
    store.write(record)
    return record
