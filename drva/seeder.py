"""Initial seeding: a disk with existing content becomes a base image in the store.

The filter reads its primary disk chunk by chunk while the disk's live writes keep being
captured (FORMAT.md §9: ``SEED_BEGIN``, ``SEED_CHUNK``…, ``SEED_END``). This is a fuzzy
copy: a chunk may be read before or after a write that lands on it. It is made exact by
the stream: the base is recorded at ``start_seq`` (the last seq captured before the
copy began), and replaying every record after ``start_seq`` over it gives the disk at
any seq from ``end_seq`` on. Points in ``(start_seq, end_seq)`` are not consistent and
the catalog says so with a ``seeding`` window: an **open** one (``last_seq`` null) is
committed at ``SEED_BEGIN``, before any record after ``start_seq`` is read from the
session, so that no recovery or consolidation takes a point inside the copy for a
consistent one; ``SEED_END`` closes it as it commits the base (FORMAT.md §6.2).

A seed lives inside one session (invariant: a job in ``jobs`` belongs to a session that
is not closed, or has had its ``SEED_END``). It is abandoned — its uploads cancelled,
its lease dropped, its open window removed — when its session closes, when
``idle_s`` pass with no ``SEED_CHUNK`` and no upload in flight, or when a new
``SEED_BEGIN`` restarts it. An open window no live job owns (a DRVA that died
mid-seed) is removed when a session of the domain is next welcomed.

``start_seq`` may not be behind what the DRVA has accepted of the domain (``ERROR
bad_seed``, the catalog untouched): a filter sends ``SEED_BEGIN`` with the last seq it
captured, so every seq it ever sent is at or below it, and a base below would make points
already committed — marks too — part of the copy, and its ``SEED_END`` would remove the
bases before it, consolidation bases retention relies on. The catalog is held to the
same two rules as the base is committed: no window opens at or below the committed seq,
no base at or below the retention horizon is removed.

``start_seq`` may be ahead of what the DRVA has accepted: the filter numbers records
when it captures them, and sends its frames after. So ``SEED_END`` waits (at most
``end_wait_s``, and only while the session lives) for the stream to reach ``end_seq``
before the base is committed; a seed whose seqs never come is refused (``ERROR
bad_seed`` naming ``SEED_END.end_seq``) and nothing of it is committed.

Chunks are content-addressed (FORMAT.md §6.1): an all-zero chunk is never sent nor
stored, a chunk already in the store (or seen by this job) is not uploaded again. A job
relies on chunks it saw in the store only under its chunk-writer lease (FORMAT.md §11.4),
held from its first upload until its manifest is in the store, so that no chunk sweep
can delete one between the look and the manifest that names it. A lease lost before the
manifest landed is replaced, and every chunk the manifest names looked at again before
the base is committed (``_chunks_gone``). The manifest has a key of its own
(``….seed.bmf``: a consolidation's base at ``start_seq``, which the seed replaces in the
catalog, stays whole for the readers that planned on it), and is created, never written
over another (``cdp.base_image.put_manifest``): one already under its key with other
content (an earlier seed at this ``start_seq``) refuses the seed (``ERROR bad_seed``).
Uploads run with bounded concurrency; when they lag, the session stops reading, which
slows the filter down.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from cdp import wire
from cdp.base_image import chunk_namer_of, chunk_stored, encode_chunk, encode_manifest, is_zero, put_manifest
from cdp.errors import AlreadyExists, LeaseLost, StoreError
from cdp.gather import gather_bounded
from cdp.layout import base_manifest_key, chunk_key
from cdp.locks import Lease, chunk_writer_lease
from cdp.logs import get_logger
from cdp.store.base import ObjectStore
from drva import messages
from drva.shipper import backoff_s

if TYPE_CHECKING:
    from drva.daemon import Drva
    from drva.domain import DomainState
    from drva.session import Session

log = get_logger("drva.seeder")

UPLOADS_MAX = 4
CATALOG_POLL_S = 0.1  # SEED_END waits for the stream to reach its end_seq, polling
KNOWN_CHUNKS_MAX = 1 << 16  # hashes remembered to skip a stat; bounded memory
# A seed with no SEED_CHUNK and no upload in flight this long is abandoned (a filter that
# hangs without closing its connection): its lease would otherwise hold every chunk
# sweep of the store off. A filter reads a chunk (4 MiB by default) in well under this.
SEED_IDLE_S = 300.0
# SEED_END waits at most this long for the stream to reach its end_seq (the records the
# filter captured during the copy, sent behind it); then the seed is refused.
SEED_END_WAIT_S = 600.0
SEQ_MAX = (1 << 64) - 1  # FORMAT.md §1: seqs are u64
CHECK_BATCH_MAX = 1024  # chunks looked at per batch after a lost lease (``_chunks_gone``)


class UploadSlots:
    """The seeder's ``UPLOADS_MAX`` upload slots: a semaphore that also counts the slots
    held and the sessions waiting for one, for the DRVA's status (``seed_uploads``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0  # held: by an upload, or by a chunk being read for one
        self.waiting = 0  # SEED_CHUNK sessions waiting for one, reading nothing meanwhile
        self._semaphore = asyncio.Semaphore(capacity)

    async def acquire(self) -> None:
        self.waiting += 1
        try:
            await self._semaphore.acquire()  # cancelled: nothing taken (it passes a wake-up on)
        finally:
            self.waiting -= 1
        self.used += 1

    def release(self) -> None:
        assert self.used > 0, "an upload slot released that was not held"
        self.used -= 1
        self._semaphore.release()


@dataclass(eq=False)
class SeedJob:
    domain: int
    disk: int
    disk_size: int
    chunk_size: int
    start_seq: int
    hashes: np.ndarray
    session: "Session | None" = None
    tasks: set[asyncio.Task] = field(default_factory=set)
    # Chunks seen in the store (or put) under ``lease``: valid only while it is held.
    known: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    lease: Lease | None = None
    lease_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stored: int = 0
    deduplicated: int = 0
    failed: BaseException | None = None
    ending: bool = False  # SEED_END taken: ``_end`` owns the job now
    dropped: bool = False  # abandoned: nothing of it may be committed
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set with ``dropped``
    last_active: float = 0.0  # loop time of the last SEED_CHUNK or upload done
    watchdog: asyncio.Task | None = None

    @property
    def window(self) -> dict[str, Any]:
        """The open seeding window this job keeps in the catalog until SEED_END."""
        return {"kind": "seeding", "first_seq": self.start_seq + 1, "last_seq": None}


class Seeder:
    """Turns SEED_* messages into chunks, a manifest and a catalog base (module docstring)."""

    def __init__(self, drva: "Drva", *, idle_s: float = SEED_IDLE_S, end_wait_s: float = SEED_END_WAIT_S) -> None:
        self.drva = drva
        self.jobs: dict[tuple[int, int], SeedJob] = {}
        self.slots = UploadSlots(UPLOADS_MAX)
        self.finishing: set[asyncio.Task] = set()
        self.idle_s = idle_s
        self.end_wait_s = end_wait_s
        self.ending: set[SeedJob] = set()  # jobs whose SEED_END is being committed
        # The one orphan clean-up of each domain (``session_opened``), while it runs; and
        # the domains whose clean-up must look once more when done with what it does now.
        self.orphan_cleanups: dict[int, asyncio.Task] = {}
        self._orphans_again: set[int] = set()

    async def handle(self, session: "Session", msg: wire.Message) -> None:
        from drva.session import Refused

        if msg.type == wire.SEED_CHUNK:  # only one too short for its header: the session reads the others
            wire.parse_seed_chunk(msg.body, session.where)
        doc = messages.parse(msg, session.where)  # every field present, typed, in range
        domain, disk = doc["domain"], doc["disk"]
        dom = session.domains.get(domain)
        if dom is None or not disk < len(dom.cfg.disks):
            raise Refused("bad_seed", f"{msg.name} for unknown domain/disk {domain}/{disk}")
        if msg.type == wire.SEED_BEGIN:
            await self._begin(session, dom, disk, doc)
            return
        job = self.jobs.get((domain, disk))
        if job is None or job.session is not session or job.ending:
            raise Refused("bad_seed", f"SEED_END for domain {domain} disk {disk} without SEED_BEGIN")
        end = doc["end_seq"]
        if end < job.start_seq:
            raise Refused("bad_seed", f"SEED_END.end_seq {end} of domain {domain} disk {disk} is below its "
                                      f"SEED_BEGIN.start_seq {job.start_seq}")
        job.ending = True
        self.ending.add(job)
        # Finishing waits for uploads, the stream and the catalog: not on the session's read path.
        self._spawn(self._end(session, dom, job, end))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.finishing.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("seed_failed", error=repr(task.exception()))

    # ------------------------------------------------------------------ begin

    async def _begin(self, session: "Session", dom: "DomainState", disk: int, doc: dict[str, Any]) -> None:
        from drva.session import Refused

        # Types and ranges were checked at the edge (drva.messages); what is left is
        # whether they fit this domain.
        size, chunk_size, start = doc["disk_size"], doc["chunk_size"], doc["start_seq"]
        if size != dom.cfg.disks[disk].size:
            raise Refused("bad_seed", f"disk {disk} of domain {dom.id}: size {size}, configured {dom.cfg.disks[disk].size}")
        if start >= SEQ_MAX:  # the window opens at start + 1, a u64
            raise Refused("bad_seed", f"SEED_BEGIN.start_seq {start} of domain {dom.id} disk {disk}: no seq follows it")
        if start < dom.accepted_seq:
            raise Refused("bad_seed", f"SEED_BEGIN.start_seq {start} of domain {dom.id} disk {disk} is below seq "
                                      f"{dom.accepted_seq}, which this DRVA has already accepted for the domain: "
                                      f"the copy would hide points already taken (the filter sends the last seq "
                                      f"it captured)")
        old = self.jobs.get((dom.id, disk))
        if old is not None:  # a restarted seeding: the old one is abandoned
            self._abandon(old, "restarted by a new SEED_BEGIN")
        count = -(-size // chunk_size)
        job = SeedJob(dom.id, disk, size, chunk_size, start, np.zeros((count, 16), dtype=np.uint8),
                      session=session, last_active=asyncio.get_running_loop().time())
        self.jobs[(dom.id, disk)] = job
        log.info("seed_begin", domain=dom.id, disk=disk, disk_size=size, chunk_size=chunk_size, start_seq=start)
        def after_committed(timeline: Any) -> None:
            if start < timeline.committed_seq:  # the window would open at or below it
                raise Refused("bad_seed", f"SEED_BEGIN.start_seq {start} of domain {dom.id} disk {disk} is below "
                                          f"the catalog's committed seq {timeline.committed_seq}")

        # On the session's read path on purpose: every record after start_seq comes
        # behind SEED_BEGIN in the stream, so none is taken before the window is in the
        # catalog, and no point inside the copy is ever committed as a consistent one.
        try:
            await self._commit_windows(dom, lambda windows: windows if job.window in windows
                                       else [*windows, job.window], session, check=after_committed)
        except BaseException:
            self._abandon(job, "its window could not be committed")
            raise
        if self.jobs.get((dom.id, disk)) is not job or job.dropped:
            self._abandon(job, "abandoned while its window was committed")  # removes the window again
            return
        job.watchdog = asyncio.create_task(self._watch(job))

    async def _commit_windows(self, dom: "DomainState", change: Callable[[list[dict]], list[dict]],
                              session: "Session | None" = None,
                              check: Callable[[Any], None] | None = None) -> bool:
        """Commit ``change(windows)`` to the domain's catalog (nothing if unchanged);
        False if the catalog cannot be written here (fenced) or ``session`` closed first.
        ``check(timeline)``, if given, runs on the timeline the change is made on, and
        may refuse it (raise): nothing is committed then."""
        from drva.session import Refused

        if not await self._catalog_open(dom, session):
            if dom.fenced and session is not None:
                raise Refused("fenced", f"domain {dom.id} is fenced on this DRVA", dom.id)
            return False

        def delta(state: Any) -> dict[str, Any] | None:
            if check is not None:
                check(state.timeline())
            windows = [dict(w) for w in state.timeline().windows]
            new = change(windows)
            return None if new == state.timeline().windows else {"set_windows": new}

        attempt = 0
        while True:
            try:
                await self.drva.shipper.commit_delta(dom, delta)
                return True
            except StoreError as exc:  # Fenced is not retried: it propagates
                if not exc.retryable or (session is not None and session.closed):
                    raise
                attempt += 1
                log.warning("seed_commit_failed", domain=dom.id, attempt=attempt, error=exc.message)
                await asyncio.sleep(backoff_s(attempt, self.drva.shipper.rng))

    @staticmethod
    async def _catalog_open(dom: "DomainState", session: "Session | None" = None) -> bool:
        """Wait until the domain's catalog is open (True), or it is fenced (False: it will
        not open here), or ``session``, if given, closed (False). No polling: the wait is
        on ``dom.catalog_settled`` (and the session's ``ended``), so a wait that lasts as
        long as a store outage costs nothing meanwhile."""
        while not dom.catalog_ready:
            if dom.fenced or (session is not None and session.closed):
                return False
            if session is None:
                await dom.catalog_settled.wait()
                continue
            waits = [asyncio.ensure_future(dom.catalog_settled.wait()), asyncio.ensure_future(session.ended.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return True

    # ------------------------------------------------------------------ abandoning

    def _abandon(self, job: SeedJob, reason: str) -> None:
        """Drop ``job``: no more uploads, its lease released, its open window removed
        (unless SEED_END owns it: ``_end`` closes the window itself)."""
        if self.jobs.get((job.domain, job.disk)) is job:
            del self.jobs[(job.domain, job.disk)]
        if job.dropped or job.ending:
            return  # SEED_END owns an ending job: it commits, or cleans up, by itself
        job.dropped = True
        job.gone.set()
        log.warning("seed_abandoned", domain=job.domain, disk=job.disk, start_seq=job.start_seq, reason=reason)
        for task in job.tasks:
            task.cancel()
        if job.watchdog is not None and job.watchdog is not asyncio.current_task():
            job.watchdog.cancel()
        self._spawn(self._cleanup(job))

    async def _cleanup(self, job: SeedJob) -> None:
        try:
            await asyncio.gather(*list(job.tasks), return_exceptions=True)
            await self._drop_lease(job)
            await self._remove_window(job)
        except Exception as exc:  # noqa: BLE001 - a DRVA stopping closes its store under us
            log.warning("seed_cleanup_failed", domain=job.domain, disk=job.disk, error=repr(exc))

    async def _remove_window(self, job: SeedJob) -> None:
        dom = self.drva.domains.get(job.domain)
        if dom is None or dom.fenced:
            return
        try:
            await self._commit_windows(dom, lambda windows: [w for w in windows if w != job.window or
                                                             self._owner_of(job.domain, w) is not None])
        except StoreError as exc:  # the next session of the domain removes it (session_opened)
            log.warning("seed_window_left_open", domain=job.domain, disk=job.disk, error=exc.message)

    def _owner_of(self, domain: int, window: dict) -> SeedJob | None:
        """The live job whose open window ``window`` is (None: an orphan). A job that
        SEED_END owns counts while it finishes, even once a new SEED_BEGIN replaced it."""
        for other in [*self.jobs.values(), *self.ending]:
            if other.domain == domain and not other.dropped and other.window == window:
                return other
        return None

    def session_closed(self, session: "Session") -> None:
        """A seed lives inside its session: those of ``session`` that have no SEED_END yet end."""
        for job in [j for j in self.jobs.values() if j.session is session and not j.ending]:
            self._abandon(job, "its session closed")

    def session_opened(self, session: "Session") -> None:
        """Remove the open seeding windows of ``session``'s domains that no live job owns
        (a DRVA that stopped mid-seed left them: they would hide every later point).

        One clean-up per domain at a time, however many sessions open: while a domain's
        catalog is not open (its store down at start, the domain welcomed on what the
        metadata repository knows) it waits for it, and a filter reconnecting meanwhile
        spawned one more each time, thousands of tasks that polled the catalog forever.
        A session opened while one waits is served by it (it has not looked yet); one
        opened while it commits makes it look once more when done."""
        for dom in session.domains.values():
            task = self.orphan_cleanups.get(dom.id)
            if task is not None and not task.done():
                self._orphans_again.add(dom.id)
                continue
            task = asyncio.create_task(self._remove_orphans(dom))
            self.orphan_cleanups[dom.id] = task
            self.finishing.add(task)  # cancelled by Drva.stop with the rest
            task.add_done_callback(self._finished)

    async def _remove_orphans(self, dom: "DomainState") -> None:
        def change(windows: list[dict]) -> list[dict]:
            return [w for w in windows if not (w["kind"] == "seeding" and w["last_seq"] is None)
                    or self._owner_of(dom.id, w) is not None]
        me = asyncio.current_task()
        try:
            if not await self._catalog_open(dom):
                return  # fenced: the catalog will not open here, nor be written
            while True:
                self._orphans_again.discard(dom.id)  # what the commit below sees covers it
                try:
                    await self._commit_windows(dom, change)
                except StoreError as exc:
                    log.warning("seed_window_left_open", domain=dom.id, error=exc.message)
                if dom.id not in self._orphans_again:
                    return
        finally:
            if self.orphan_cleanups.get(dom.id) is me:
                del self.orphan_cleanups[dom.id]
                self._orphans_again.discard(dom.id)

    async def _watch(self, job: SeedJob) -> None:
        """Abandon ``job`` once it has been idle for ``idle_s`` (module docstring)."""
        loop = asyncio.get_running_loop()
        while not job.dropped and not job.ending:
            idle_until = job.last_active + self.idle_s
            if loop.time() >= idle_until and not job.tasks:
                self._abandon(job, f"no SEED_CHUNK for {self.idle_s} s")
                return
            await asyncio.sleep(max(idle_until - loop.time(), CATALOG_POLL_S))

    # ------------------------------------------------------------------ chunks

    async def chunk_slot(self, session: "Session", domain: int, disk: int, chunk: int,
                         nbytes: int) -> SeedJob | None:
        """A ``SEED_CHUNK`` of ``session`` is coming, ``nbytes`` of ``chunk`` of ``disk``
        (from its header): its job once it holds an upload slot — the session reads the
        chunk then, and gives the slot to ``chunk_received`` or back (``slots.release``)
        — or None if the job was abandoned meanwhile (the chunk is read and let go).
        ``Refused`` (nothing held) for a chunk of no seed of the session, or of the wrong
        size. Upload slots bound what the DRVA holds of seed chunks: ``UPLOADS_MAX`` of
        them, however many sessions seed."""
        from drva.session import Refused

        job = self.jobs.get((domain, disk))
        if job is None or job.session is not session or job.ending or domain not in session.domains:
            raise Refused("bad_seed", f"SEED_CHUNK for domain {domain} disk {disk} without SEED_BEGIN")
        job.last_active = asyncio.get_running_loop().time()
        count = len(job.hashes)
        expect = min(job.chunk_size, job.disk_size - chunk * job.chunk_size) if chunk < count else -1
        if nbytes != expect:
            raise Refused("bad_seed", f"SEED_CHUNK {chunk} of disk {job.disk}: {nbytes} bytes, expected {expect}")
        return job if await self._slot(job) else None

    def chunk_received(self, job: SeedJob, chunk: int, data: memoryview) -> None:
        """The chunk ``chunk_slot`` held a slot for: uploaded with that slot (released when
        the upload ends), or the slot released at once for an all-zero chunk."""
        job.last_active = asyncio.get_running_loop().time()
        if job.dropped or is_zero(data):
            self.slots.release()
            return
        task = asyncio.create_task(self._upload(job, chunk, data))
        job.tasks.add(task)
        task.add_done_callback(functools.partial(self._upload_ended, job))

    def _upload_ended(self, job: SeedJob, task: asyncio.Task) -> None:
        """An upload task ended, however it ended: its slot goes back, once. A done
        callback, not ``_upload``'s ``finally``: a task cancelled before its first step (its
        seed abandoned as the chunk came: a new SEED_BEGIN, the session closed) never runs
        its coroutine, and its slot was lost for good — four such, and no seed of the DRVA
        got one again until it restarted."""
        job.tasks.discard(task)
        job.last_active = asyncio.get_running_loop().time()
        if task.cancelled() and job.failed is None:
            job.failed = asyncio.CancelledError()  # its chunk is not in the store: SEED_END must not commit
        self.slots.release()

    async def _slot(self, job: SeedJob) -> bool:
        """An upload slot for ``job`` (True), or False as soon as the job is abandoned
        (its session closed or replaced): such a session's chunk, up to 64 MiB, is let go
        then, not held until another seed's uploads free a slot."""
        if job.dropped:
            return False
        acquire = asyncio.ensure_future(self.slots.acquire())
        gone = asyncio.ensure_future(job.gone.wait())
        try:
            await asyncio.wait((acquire, gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            gone.cancel()
            if not acquire.cancel():  # it had acquired: give the slot back
                self.slots.release()
            raise
        gone.cancel()
        if acquire.cancel():  # still waiting (a cancelled acquire passes its wake-up on)
            return False
        if job.dropped:
            self.slots.release()
            return False
        return True

    async def _upload(self, job: SeedJob, chunk: int, data: memoryview) -> None:
        try:
            loop = asyncio.get_running_loop()
            store = self.drva.shipper.store_of(job.domain)  # the domain's store: its chunks and its lease
            # An encrypted store names chunks with a keyed hash (FORMAT.md §19.6).
            h, obj = await loop.run_in_executor(self.drva.pool, encode_chunk, data, chunk_namer_of(store))
            del data  # its message's body: the retries below (a store outage) need only obj
            job.hashes[chunk] = np.frombuffer(h, dtype=np.uint8)
            if h in job.known:
                job.deduplicated += 1
                return
            key = chunk_key(h)
            attempt = 0
            while True:
                try:
                    await self._hold_lease(job)
                    job.lease.check()
                    why = await chunk_stored(store, key, h, job.chunk_size)
                    if why is None:
                        job.deduplicated += 1
                    else:
                        if why != "absent":
                            log.warning("seed_chunk_rewritten", key=key, reason=why)
                        await store.put(key, obj)
                        job.stored += 1
                    break
                except StoreError as exc:
                    attempt += 1
                    log.warning("seed_upload_failed", key=key, attempt=attempt, error=exc.message)
                    await asyncio.sleep(backoff_s(attempt, self.drva.shipper.rng))
            job.known[h] = None
            while len(job.known) > KNOWN_CHUNKS_MAX:
                job.known.popitem(last=False)
        except BaseException as exc:  # remembered: SEED_END must not commit a hole
            job.failed = exc
            raise

    async def _hold_lease(self, job: SeedJob) -> None:
        async with job.lease_lock:
            if job.lease is None:
                # In the domain's store: the chunk sweep it holds off is that store's.
                job.lease = await chunk_writer_lease(
                    self.drva.shipper.store_of(job.domain),
                    owner=f"drva {self.drva.cfg.name}: seeding domain {job.domain} disk {job.disk}")

    @staticmethod
    async def _drop_lease(job: SeedJob) -> None:
        async with job.lease_lock:
            if job.lease is not None:
                lease, job.lease = job.lease, None
                job.known.clear()
                await lease.release()

    # ------------------------------------------------------------------ end

    async def _end(self, session: "Session", dom: "DomainState", job: SeedJob, end: int) -> None:
        committed = False
        try:
            while job.tasks:
                await asyncio.gather(*list(job.tasks), return_exceptions=True)
            if job.failed is not None:
                log.error("seed_failed", domain=dom.id, disk=job.disk, error=repr(job.failed))
                return
            if not await self._reach(session, dom, job, end):
                return
            committed = await self._commit_base(session, dom, job, end)
        finally:
            job.dropped = True
            self.ending.discard(job)
            if self.jobs.get((dom.id, job.disk)) is job:  # a new SEED_BEGIN may have replaced it
                del self.jobs[(dom.id, job.disk)]
            await self._drop_lease(job)
            if not committed:
                await self._remove_window(job)

    async def _reach(self, session: "Session", dom: "DomainState", job: SeedJob, end: int) -> bool:
        """Wait for the stream to reach ``end`` (module docstring); False: the seed is off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.end_wait_s
        while dom.accepted_seq < end:
            if dom.fenced:
                log.error("seed_failed", domain=dom.id, disk=job.disk, error="the domain is fenced on this DRVA")
                return False
            if session.closed or loop.time() >= deadline:
                why = (f"SEED_END.end_seq {end} of domain {dom.id} disk {job.disk} is above every seq this DRVA "
                       f"accepted for the domain (seq {dom.accepted_seq}) after {self.end_wait_s} s: the seed "
                       f"(SEED_BEGIN.start_seq {job.start_seq}) is refused")
                log.error("seed_refused", domain=dom.id, disk=job.disk, reason=why)
                if not session.closed:
                    await session.end("bad_seed", why)
                return False
            await asyncio.sleep(CATALOG_POLL_S)
        return True

    async def _commit_base(self, session: "Session", dom: "DomainState", job: SeedJob, end: int) -> bool:
        disk = job.disk
        if not await self._catalog_open(dom):  # fenced: the base can never be committed here
            log.error("seed_failed", domain=dom.id, disk=disk, error="the domain is fenced on this DRVA")
            return False
        state = self.drva.shipper.writers[dom.id].state
        timeline = state.current
        key = base_manifest_key(dom.id, timeline, job.start_seq, disk, seed=True)
        base = {"timeline": timeline, "seq": job.start_seq, "disk": disk, "key": key, "origin": "seed"}
        why = _behind_horizon(state.timeline(), job, end, base)
        if why is not None:  # and again in the delta, on the catalog it is committed to
            return await self._refuse_base(session, dom, job, why)
        data = encode_manifest(dom.id, disk, job.start_seq, job.disk_size, job.chunk_size, job.hashes)
        store = self.drva.shipper.store_of(dom.id)
        try:
            try:
                await self._put_retrying(store, key, data)
            except AlreadyExists as exc:  # an earlier seed's at this seq, of other content: never written over
                return await self._refuse_base(session, dom, job, (
                    f"the seed's base (SEED_BEGIN.start_seq {job.start_seq}) of domain {dom.id} disk {disk} cannot be "
                    f"stored: {exc.message}; seed again once the domain has a write after seq {job.start_seq}"))
            why = await self._chunks_gone(job, store, key)  # the chunks it names were seen under the lease (§11.4)
        finally:
            await self._drop_lease(job)
        if why is not None:
            return await self._refuse_base(session, dom, job, why)
        # Every chunk was read before SEED_END, after record ``end`` at the latest:
        # replaying (start, end] over the copy is exact at ``end``, not before.
        closed = ({"kind": "seeding", "first_seq": job.start_seq + 1, "last_seq": end - 1}
                  if end - 1 > job.start_seq else None)
        refused: list[str] = []

        def delta(state: Any) -> dict[str, Any] | None:
            tl = state.timeline()
            windows = [dict(w) for w in tl.windows if w != job.window]
            if closed is not None and closed not in windows:
                windows.append(closed)
            # A base of this disk inside the copy (a consolidation that raced the open
            # window, or an older DRVA's) was built from zeros, not from this content.
            stale = [{"seq": b["seq"], "disk": disk} for b in tl.bases
                     if b["disk"] == disk and job.start_seq <= b["seq"] < end and b != base]
            why = _behind_horizon(tl, job, end, base)  # a base at or below it is never removed
            if why is not None:
                refused.append(why)
                return None
            out: dict[str, Any] = {}
            if stale:
                out["remove_bases"] = stale
            if base not in tl.bases:  # else a generation of ours holds it (its reply was lost: §8.3)
                out["add_bases"] = [base]
            if windows != tl.windows:
                out["set_windows"] = windows
            return out or None

        attempt = 0
        while True:
            try:
                await self.drva.shipper.commit_delta(dom, delta)
                break
            except StoreError as exc:  # Fenced is not retried: it propagates
                if not exc.retryable:
                    raise
                attempt += 1
                log.warning("seed_commit_failed", domain=dom.id, disk=disk, attempt=attempt, error=exc.message)
                await asyncio.sleep(backoff_s(attempt, self.drva.shipper.rng))
        if refused:
            return await self._refuse_base(session, dom, job, refused[-1])
        log.info("seed_done", domain=dom.id, disk=disk, base_seq=job.start_seq, end_seq=end,
                 chunks_stored=job.stored, chunks_deduplicated=job.deduplicated)
        if not session.closed:
            session.writer.writelines(wire.control(wire.SEED_DONE, {
                "domain": dom.id, "disk": disk, "base_seq": job.start_seq,
                "chunks_stored": job.stored, "chunks_deduplicated": job.deduplicated}))
        return True

    @staticmethod
    async def _refuse_base(session: "Session", dom: "DomainState", job: SeedJob, why: str) -> bool:
        """Refuse a seed at its SEED_END: nothing of it is committed (False)."""
        log.error("seed_refused", domain=dom.id, disk=job.disk, reason=why)
        if not session.closed:
            await session.end("bad_seed", why)
        return False

    async def _put_retrying(self, store: ObjectStore, key: str, data: bytes) -> None:
        """Create the manifest (``put_manifest``: never over another one), retrying a store
        that fails; ``AlreadyExists`` (another manifest is there) is not retried."""
        attempt = 0
        while True:
            try:
                await put_manifest(store, key, data)
                return
            except AlreadyExists:
                raise
            except StoreError as exc:
                attempt += 1
                log.warning("seed_upload_failed", key=key, attempt=attempt, error=exc.message)
                await asyncio.sleep(backoff_s(attempt, self.drva.shipper.rng))

    async def _chunks_gone(self, job: SeedJob, store: ObjectStore, key: str) -> str | None:
        """Why the chunks the manifest ``key`` names (just put) cannot be relied on, or None.

        A chunk seen in the store counts only under the chunk-writer lease, held until the
        manifest naming it is in the store (FORMAT.md §11.4). A lease lost before that (a
        stall, a store outage longer than its window) let a chunk sweep on another host
        delete chunks of this seed that no manifest named yet. Then a new lease is taken
        (it waits while a sweep runs; a sweep that starts later reads this manifest) and
        every chunk the manifest names is looked at. The seed keeps no chunk's bytes: one
        chunk gone refuses it, before anything names the manifest."""
        if job.lease is None:
            return None  # nothing uploaded nor looked up: every chunk is zero
        try:
            job.lease.check()
            return None
        except LeaseLost as exc:
            log.warning("seed_lease_lost", domain=job.domain, disk=job.disk, manifest=key, error=exc.message)
        await self._drop_lease(job)
        await self._hold_lease(job)
        rows = np.unique(job.hashes, axis=0)
        missing = await self._missing(store, [r.tobytes() for r in rows if r.any()], job.chunk_size)
        log.info("seed_chunks_checked", domain=job.domain, disk=job.disk, chunks=len(rows), missing=len(missing))
        if not missing:
            return None
        return (f"chunk {missing[0]} ({len(missing)} in all) named by the seed's manifest {key} of domain {job.domain} "
                f"disk {job.disk} was deleted by a chunk sweep while the seed's chunk-writer lease was lost: the "
                f"seed is refused, nothing of it is committed; seed the disk again")

    async def _missing(self, store: ObjectStore, hashes: list[bytes], chunk_size: int) -> list[str]:
        """The keys of those chunks of ``hashes`` the store does not hold (``chunk_stored``:
        their heads are read back); a store that fails is asked again."""
        missing: list[str] = []

        async def one(h: bytes) -> None:
            key = chunk_key(h)
            attempt = 0
            while True:
                try:
                    why = await chunk_stored(store, key, h, chunk_size)
                    if why is not None:
                        log.warning("seed_chunk_missing", key=key, reason=why)
                        missing.append(key)
                    return
                except StoreError as exc:
                    attempt += 1
                    log.warning("seed_check_failed", key=key, attempt=attempt, error=exc.message)
                    await asyncio.sleep(backoff_s(attempt, self.drva.shipper.rng))

        for at in range(0, len(hashes), CHECK_BATCH_MAX):  # bounded: not one task per chunk of a large disk
            await gather_bounded((one(h) for h in hashes[at : at + CHECK_BATCH_MAX]), UPLOADS_MAX)
        return sorted(missing)


def _behind_horizon(timeline: Any, job: SeedJob, end: int, base: dict) -> str | None:
    """Why ``job``'s base (``base``) may not be committed on ``timeline``, or None: it
    would lie before the retention horizon, or replace a base at or below it (a seed
    removes the bases of its disk in its copy, ``start_seq .. end - 1``). The points
    after the horizon are recovered from the bases there (the segments before it are
    gone): removing one left the domain no recovery point at all. SEED_BEGIN refuses a
    ``start_seq`` behind what was accepted, so only a catalog changed under a seed gets here."""
    if base in timeline.bases:  # committed already: a generation of ours whose reply was lost
        return None
    horizon = timeline.horizon_seq
    kept = [b["seq"] for b in timeline.bases
            if b["disk"] == job.disk and job.start_seq <= b["seq"] < end and b["seq"] <= horizon]
    if not kept and job.start_seq >= horizon:
        return None
    return (f"the seed's base (SEED_BEGIN.start_seq {job.start_seq}) of domain {job.domain} disk {job.disk} is "
            f"not after the retention horizon (seq {horizon})"
            + (f": it would replace the base at seq {kept[0]}" if kept else ""))
