"""Jobs running inside the daemon: start one in the background, answer with its record at
once (HTTP 202), or wait for its end (``?wait=1``).

Each job is ``cdp.msa.jobs.run_job`` in an asyncio task; the record file is the truth
(the CLI reads it too) — except for a final record the state directory could not take
yet, which the store keeps and serves from memory (``JobStore.finish``): ``wait``
answers with the job's own final record, never a file that still says ``running``. The runner bounds how many jobs run at once and counts finished
ones by name and state for the metrics.

A job that moves a domain between sites — a quiesce (``quiesce_claim``), a failover, a
failback or a release (``site_move``) — holds a claim on it while it runs. The direct
operations that would undo or contradict it (power, protect, unprotect, mark) are then
refused ``Busy`` naming the holder (``refuse_if_moving``), except when they are that
job's own steps: code running under a claim — the job's task and the tasks it starts, a
``claim(...)`` block — carries the claim in a context variable (``acting_claim``), and a
check lets its own claim through. No parameter to thread through, nothing a request can
set: a request's handler runs under no claim.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from cdp.errors import Busy, CdpError
from cdp.logs import get_logger
from cdp.msa.jobs import Job, JobStore, run_job

log = get_logger("cdp.msa.runner")

RUNNING_MAX = 32


class TooManyJobs(CdpError):
    """Too many jobs are running; try again when some have finished."""

    exit_code = 7  # busy, as a held lock: the same request later succeeds


#: What a claim names: (what, domain), e.g. ("site move", "erp") — see ``JobRunner.claim``.
ClaimKey = tuple[str, str]

#: The claim the running code acts under (module docstring): set in the context of a job
#: started with a claim, and inside a ``claim(...)`` block; None for a request's handler.
_acting: contextvars.ContextVar[ClaimKey | None] = contextvars.ContextVar("cdp_msa_acting_claim", default=None)


def quiesce_claim(domain: str) -> ClaimKey:
    """The claim of a quiesce of ``domain`` (``MsaDaemon.quiesce``: a handover to the peer)."""
    return ("quiesce", domain)


def site_move(domain: str) -> ClaimKey:
    """The claim that failovers, test-failover clean-ups, failbacks and releases of one
    domain share: each forks or fences a timeline, so two at once would leave two."""
    return ("failover or failback", domain)


def moving_claims(domain: str) -> tuple[ClaimKey, ...]:
    """The claims of the jobs that move ``domain`` between sites."""
    return (quiesce_claim(domain), site_move(domain))


def acting_claim() -> ClaimKey | None:
    """The claim the running code acts under (a step of the job holding it), else None."""
    return _acting.get()


class JobRunner:
    """Invariant: ``tasks`` holds exactly the jobs started here that have not ended, and
    ``len(tasks) + reserved <= running_max``: ``start`` takes its slot before its first
    ``await``, so requests that arrive together cannot all pass the check.

    Claims make operations on one domain exclusive (two failovers of one domain, or a
    failover and a failback, each forking a timeline): ``claims`` maps a key to what holds
    it, taken with no ``await`` between the check and the taking, and given back when the
    job's task ends (``start(..., claim=key)``) or the block ends (``claim(key, what)``).
    A check of ``running`` followed by an ``await`` would let a request queued behind the
    first one pass as well (found by sending two failovers at the same instant).
    """

    def __init__(self, store: JobStore, running_max: int = RUNNING_MAX) -> None:
        self.store = store
        self.running_max = running_max
        self.tasks: dict[str, asyncio.Task] = {}
        self.names: dict[str, str] = {}  # job id -> name, while running
        self.args: dict[str, dict[str, Any]] = {}  # job id -> args, while running
        self.finished: collections.Counter[tuple[str, str]] = collections.Counter()
        self.reserved = 0  # slots of jobs being started (their record not written yet)
        self._live: set[asyncio.Task] = set()  # every job task, registered or still starting
        self.claims: dict[ClaimKey, str] = {}  # key -> what holds it (a job name and id, or a request)

    def _take(self, key: ClaimKey, holder: str) -> None:
        held = self.claims.get(key)
        if held is not None:
            what, domain = key
            raise Busy(f"domain {domain}: a {what} is in progress ({held}); try again when it has ended "
                       f"(`cdp jobs`)")
        self.claims[key] = holder

    @contextlib.contextmanager
    def claim(self, key: ClaimKey, holder: str) -> Iterator[None]:
        """Hold ``key`` for the block (an operation that is not a job); Busy if it is held.
        The block acts under it (``acting_claim``)."""
        self._take(key, holder)
        token = _acting.set(key)
        try:
            yield
        finally:
            _acting.reset(token)
            del self.claims[key]

    def refuse_if_moving(self, domain: str, doing: str) -> None:
        """``Busy`` naming the holder while a job moves ``domain`` between sites
        (``moving_claims``) — unless the running code is that job's own step. No
        ``await`` in it: call it right before the change it guards, under the lock
        that change is made under."""
        acting = _acting.get()
        for key in moving_claims(domain):
            held = self.claims.get(key)
            if held is not None and key != acting:
                raise Busy(f"domain {domain}: a {key[0]} is in progress ({held}); {doing} is refused until it "
                           f"has ended (`cdp jobs`)")

    async def start(self, name: str, args: dict[str, Any], timeout_s: float,
                    work: Callable[[Job], Awaitable[Any]], *, claim: ClaimKey | None = None) -> dict[str, Any]:
        """Start job ``name``; return its first record (state ``running``). With ``claim``,
        the key is held until the job's task ends (Busy when something holds it)."""
        # Check and reserve with no await in between: this is the only place a slot is taken.
        if len(self.tasks) + self.reserved >= self.running_max:
            raise TooManyJobs(f"{len(self.tasks) + self.reserved} jobs are running (at most {self.running_max}); "
                              f"try again when some have finished")
        if claim is not None:
            self._take(claim, f"job {name}")
        self.reserved += 1
        context = contextvars.copy_context()  # the job's task, and the tasks it starts, act under its claim
        context.run(_acting.set, claim)
        loop = asyncio.get_running_loop()
        created: asyncio.Future[Job] = loop.create_future()
        ids: list[str] = []

        def on_start(job: Job) -> None:
            # The reserved slot becomes the task's in one step, inside the task, so a
            # caller cancelled while it waits below leaves no job outside the count.
            self.reserved -= 1
            ids.append(job.id)
            self.tasks[job.id], self.names[job.id], self.args[job.id] = task, name, args
            if claim is not None:
                self.claims[claim] = f"job {job.id}"
            if not created.done():
                created.set_result(job)

        def on_done(t: asyncio.Task) -> None:
            self._live.discard(t)
            if claim is not None:
                del self.claims[claim]
            if ids:
                self._done(ids[0], t)
            else:  # it ended before its record existed
                self.reserved -= 1

        task = asyncio.create_task(run_job(self.store, name, args, timeout_s, work, on_start=on_start),
                                   name=f"job-{name}", context=context)
        self._live.add(task)
        task.add_done_callback(on_done)
        await asyncio.wait({created, task}, return_when=asyncio.FIRST_COMPLETED)
        if not created.done():  # the record could not even be created
            created.cancel()
            task.result()  # raises why
        job = created.result()
        log.info("job_started", job=job.id, name=name, args=args)
        return _copy(job.record)

    def _done(self, job_id: str, task: asyncio.Task) -> None:
        if self.tasks.pop(job_id, None) is None:
            return
        name = self.names.pop(job_id)
        self.args.pop(job_id, None)
        if task.cancelled():
            state = "cancelled"
        elif task.exception() is not None:
            state = "failed"
            log.error("job_crashed", job=job_id, name=name, error=repr(task.exception()))
        else:
            record = task.result()
            state = record["state"]
            log.info("job_ended", job=job_id, name=name, state=state, error=record.get("error"))
        self.finished[(name, state)] += 1

    async def wait(self, job_id: str) -> dict[str, Any]:
        """The final record of job ``job_id`` (waits while it runs here): the one the job
        ended with, whether or not its file could be written (a full state directory)."""
        task = self.tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task})  # a bug in it is logged by _done
            if not task.cancelled() and task.exception() is None:
                return _copy(task.result())
        return self.store.get(job_id)  # unsaved final records first (JobStore.get)

    def running(self, name: str | None = None, args: dict[str, Any] | None = None) -> list[str]:
        """Ids of running jobs, optionally of one name whose args contain ``args``."""
        return [job_id for job_id, n in self.names.items()
                if (name is None or n == name)
                and (args is None or all(self.args[job_id].get(k) == v for k, v in args.items()))]

    def running_by_name(self) -> dict[str, int]:
        return dict(collections.Counter(self.names.values()))

    async def cancel_all(self) -> None:
        """Cancel every job (each ends ``cancelled``), then give the final records the
        state directory did not take one last try (``JobStore.close``)."""
        tasks = list(self._live)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()


def _copy(record: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of a live record (the job keeps changing its own)."""
    return json.loads(json.dumps(record))
