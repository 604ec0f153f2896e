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
from cdp.msa.procs import pid_alive

JOB_VERSION = 1
STATES = ("running", "succeeded", "failed", "timed_out", "cancelled", "abandoned")
FINAL = frozenset(("succeeded", "failed", "timed_out", "cancelled"))
EVENTS_MAX = 200  # the newest progress messages kept in a record
PROGRESS_WRITES_PER_S = 2.0
RETENTION_DEFAULT_S = 60 * 86400.0
JOB_ID_CHARS_MAX = 128  # a name of 64 and the 23 characters around it, with room to spare
JOB_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{JOB_ID_CHARS_MAX}}}")


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

    def __init__(self, root: Path, retention_s: float = RETENTION_DEFAULT_S) -> None:
        self.root = Path(root)
        self.retention_s = retention_s

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
        return job

    def write(self, record: dict[str, Any]) -> None:
        atomic_write(self.path(record["id"]), json.dumps(record, sort_keys=True).encode())

    def get(self, job_id: str) -> dict[str, Any]:
        path = self.path(job_id)
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise NotFound(f"no job {job_id} in {self.root}") from None
        except (OSError, ValueError) as exc:
            raise CdpError(f"job record {path}: unreadable: {exc}") from exc
        if record.get("state") == "running" and not pid_alive(record.get("pid", 0)):
            record["state"] = "abandoned"  # its process is gone; the record says how far it got
        return record

    def list(self, *, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` records (optionally of one ``name``), newest first."""
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*.json"), reverse=True):
            try:
                record = self.get(path.stem)
            except CdpError:
                continue
            if name is None or record["name"] == name:
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    def prune(self, now_ns: int | None = None) -> int:
        """Delete records that ended more than ``retention_s`` ago; return how many."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        gone = 0
        for record in self.list(limit=1 << 30):
            ended = record.get("ended_ns") or (record["created_ns"] if record["state"] == "abandoned" else None)
            if ended is not None and now_ns - ended > self.retention_s * 1e9:
                self.path(record["id"]).unlink(missing_ok=True)
                gone += 1
        return gone


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
        record["state"], record["error"] = "failed", f"{exc.strerror or type(exc).__name__}" + (
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
