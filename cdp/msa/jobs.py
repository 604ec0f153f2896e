"""Jobs: every management operation runs as a job with a name, a timeout, progress and a
kept output — the seed's run-command model (FORMAT.md §13).

A job is one JSON file ``<state_dir>/jobs/<id>.json``, rewritten atomically (temporary
file, fsync, rename) at each state change and at most ``PROGRESS_WRITES_PER_S`` times a
second for progress, so the CLI and the daemon (which share the directory) and a
follower (``cdp jobs ID``) always read a whole record. Records older than the retention
period (default 60 days) are pruned. A job the process never finished (the process
died) is reported as ``abandoned`` by whoever reads it: its ``pid`` is gone.

The state directory's file system may be full or read-only (``cdp.msa.state_fs``). A
progress write is a side effect: one that fails is logged (once, then at most every
``PROGRESS_LOG_EVERY_S``) and the work goes on. A job's final record is what its
callers wait for: when it cannot be written it is kept in memory (``JobStore.get`` and
``list`` serve it, so ``?wait=1`` and ``cdp jobs --follow`` see the job end) and written
again in the background, after 0.5 s, doubling to ``RETRY_MAX_S``, until it is on disk.

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
from cdp.msa.state_fs import StateUnwritable, error_text, fs_problem, hint, is_unwritable, watch

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
PROGRESS_LOG_EVERY_S = 60.0  # a job's failing progress writes: logged once, then at most this often
RETRY_FIRST_S = 0.5  # an unwritten final record: written again after this, doubling...
RETRY_MAX_S = 10.0  # ...up to this (a record is a few KB: the disk freed, it is written within this)
RETRY_LOG_EVERY_S = 60.0  # a record still unwritten: logged at the first retry, then at most this often
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
        self._write_failed_at: float | None = None  # when a failed progress write was last logged

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
        """Progress and events, best effort: a record that cannot be rewritten (a full
        state file system) must not fail the work it describes; the final record says
        how it ended (``JobStore.finish``)."""
        self._last_write = time.monotonic()
        try:
            self.store.write(self.record)
        except OSError as exc:
            self._progress_unwritten(exc)

    def _progress_unwritten(self, exc: OSError) -> None:
        now = time.monotonic()
        if self._write_failed_at is not None and now - self._write_failed_at < PROGRESS_LOG_EVERY_S:
            return
        self._write_failed_at = now
        log.warning("job_progress_unwritten", job=self.id, error=error_text(exc),
                    reason="the job goes on; its final record is kept until it can be written")


class JobStore:
    """The job records of one state directory."""

    def __init__(self, root: Path, retention_s: float = RETENTION_DEFAULT_S,
                 kept_max: int = RECORDS_KEPT_MAX) -> None:
        self.root = Path(root)
        self.retention_s = retention_s
        self.kept_max = kept_max
        self._created = 0  # records created here since the directory was last counted
        self.watch = watch(self.root.parent)  # the state directory's file system (cdp.msa.state_fs)
        # Final records not on disk yet (module docstring), served in their stead, and
        # the task writing them again.
        self.unsaved: dict[str, dict[str, Any]] = {}
        self._retry_task: asyncio.Task | None = None

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
            self.write(record)
        except OSError as exc:  # nothing ran: the job is refused, naming the file and why
            raise StateUnwritable(f"job records {self.root}: cannot write a record ({error_text(exc)}): "
                                  f"{hint(exc.errno) or 'the state directory must be a writable directory'}",
                                  exc.errno) from exc
        self._created += 1
        if self._created >= RECORDS_CHECK_EVERY:
            self._created = 0
            self._cap(keep=job.id)
        return job

    def write(self, record: dict[str, Any]) -> None:
        """Replace the record's file; ``OSError`` naming it (``atomic_write``'s own errors
        name no file), told to the state directory's watch either way."""
        path = self.path(record["id"])
        try:
            atomic_write(path, json.dumps(record, sort_keys=True).encode())
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(path)
            self.watch.failed(path, exc)
            raise
        self.watch.succeeded()

    def finish(self, record: dict[str, Any]) -> None:
        """Write a job's final record; never raises ``OSError``: a record that cannot be
        written is kept and served from memory, and written again in the background
        (module docstring)."""
        try:
            self.write(record)
        except OSError as exc:
            self.unsaved[record["id"]] = record
            log.error("job_record_unwritten", job=record["id"], state=record["state"], error=error_text(exc),
                      retry_in_s=RETRY_FIRST_S, reason="kept in memory and served from there until it is written")
            self._retry_later()
            return
        self.unsaved.pop(record["id"], None)

    def _retry_later(self) -> None:
        if self._retry_task is not None and not self._retry_task.done():
            return
        try:
            self._retry_task = asyncio.get_running_loop().create_task(self._write_unsaved(), name="job-records-retry")
        except RuntimeError:  # no event loop (a synchronous caller): the record stays in memory only
            log.warning("job_record_retry_unscheduled", jobs=sorted(self.unsaved))

    async def _write_unsaved(self) -> None:
        """Write the unsaved final records again, with a bounded back-off, until none is left."""
        delay_s, tries, logged_at = RETRY_FIRST_S, 0, None
        while self.unsaved:
            await asyncio.sleep(delay_s)
            tries += 1
            for job_id, record in list(self.unsaved.items()):
                try:
                    await asyncio.to_thread(self.write, record)
                except OSError as exc:
                    now = time.monotonic()
                    if logged_at is None or now - logged_at >= RETRY_LOG_EVERY_S:
                        logged_at = now
                        log.warning("job_record_still_unwritten", job=job_id, error=error_text(exc), tries=tries,
                                    unsaved=len(self.unsaved), retry_in_s=min(RETRY_MAX_S, delay_s * 2))
                    continue
                if self.unsaved.get(job_id) is record:
                    del self.unsaved[job_id]
                log.info("job_record_written", job=job_id, state=record["state"], tries=tries)
            delay_s = min(RETRY_MAX_S, delay_s * 2)

    async def close(self) -> None:
        """The daemon stops: one last try at the unsaved records, then no more retries (a
        record left ``running`` on disk reads as ``abandoned`` once this process is gone)."""
        if self._retry_task is not None:
            self._retry_task.cancel()
            await asyncio.gather(self._retry_task, return_exceptions=True)
            self._retry_task = None
        for job_id, record in list(self.unsaved.items()):
            try:
                await asyncio.to_thread(self.write, record)
            except OSError as exc:
                log.error("job_record_lost", job=job_id, state=record["state"], error=error_text(exc))
                continue
            self.unsaved.pop(job_id, None)

    def describe(self, exc: OSError) -> str:
        """A job's error from ``exc``: ``<file>: <cause>``. An unwritable file system's
        error that names no file (``atomic_write``'s do not: power.json, a handover
        record...) is the state directory's when ``statvfs`` says it is full or read-only
        there: named so, with what to do, rather than a bare "No space left on device"."""
        if exc.filename is None and is_unwritable(exc) and fs_problem(self.watch.state_dir) is not None:
            self.watch.failed(self.watch.state_dir, exc)
            return f"{error_text(exc, self.watch.state_dir)} ({hint(exc.errno)})"
        return error_text(exc)

    def get(self, job_id: str) -> dict[str, Any]:
        path = self.path(job_id)
        unsaved = self.unsaved.get(job_id)
        if unsaved is not None:  # ended, and newer than its file
            return json.loads(json.dumps(unsaved))
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
        """Every record's id, oldest first (an id starts with its creation time, UTC), with
        those kept in memory (``unsaved``)."""
        try:
            names = os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):  # no records (a create says what is wrong)
            names = []
        ids = {n[:-5] for n in names if n.endswith(".json") and JOB_ID.fullmatch(n[:-5])}
        return sorted(ids | set(self.unsaved))

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
        store.finish(record)
        raise
    except OSError as exc:  # an operating error (a file, a permission, a full disk), not a bug
        record["state"], record["error"] = "failed", store.describe(exc)
        record["exit_code"] = 1
    except Exception as exc:
        record["state"], record["error"] = "failed", f"internal error: {type(exc).__name__}: {exc}"
        record["ended_ns"] = time.time_ns()
        store.finish(record)
        raise
    record["ended_ns"] = time.time_ns()
    store.finish(record)  # never raises: the record is served from memory until it is on disk
    return record
