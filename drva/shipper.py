"""From the log to the store: seal segments, upload them, commit the catalog, trim.

Three steps, each callable on its own (tests call them directly; the daemon runs them in
short loops):

* ``seal_step`` cuts a domain's durable-but-unsealed log entries into a segment when they
  reach ``seal_bytes`` or their oldest is ``seal_age_s`` old. Frames come from the
  committer's frame cache, or are read back from the log; the segment is built on a
  thread pool, its blocks compressed on a pool of their own (``PACK_THREADS``: lz4 and
  xxhash release the GIL, so a segment's blocks use every core), and the builder says
  what it built (``build_segment_info``): nothing is parsed back.
* upload workers put sealed segments, with bounded concurrency and retries (exponential
  backoff with jitter, forever: an outage shows as RPO lag and errors, never as loss).
* ``commit_step`` names uploaded segments in the catalog, in seq order, after they are
  durable in the store (conditional create: losing it means another owner — fenced),
  records the committed seq in the metadata repository, then trims the log behind the
  oldest entry any domain still needs. A generation in the way whose bytes stay bad
  over several reads (``CorruptGeneration``) is no proof of another owner: that
  domain's commits pause, with a growing wait, and are tried again.

Each store the DRVA ships to is a lane (``drva.lanes``): a step given a lane works on
that lane's domains only, and segments go to their domain's lane's store.

Memory is bounded: per lane, at most ``upload_concurrency + 2`` sealed segments are held
(being put, waiting in the lane's queue, or handed to it by the sealer), a segment's bytes
are dropped once uploaded, and beyond the frame cache entries wait in the log, not in RAM.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cdp.catalog import CatalogState, CatalogWriter, CorruptGeneration, collect_generations
from cdp.catalog_page import ROW_FIELDS
from cdp.catalog_state import MARKS_MAX
from cdp.errors import CdpError, Fenced, LogError, StoreError
from cdp.frame import decode_frame
from cdp.gather import gather_bounded
from cdp.layout import segment_key
from cdp.logs import get_logger
from cdp.meta import MetaRepository
from cdp.records import KIND_RESYNC_BEGIN
from cdp.replog import ReplicationLog
from cdp.segment import build_segment_info
from cdp.store.base import ObjectStore
from drva.committer import GroupCommitter
from drva.domain import DomainState, SegmentJob, entry_frame
from drva.lanes import StoreLane

log = get_logger("drva.shipper")

RETRY_BASE_S = 0.1
RETRY_MAX_S = 5.0
#: The longest pause of a domain's commits while a catalog generation in their way stays
#: corrupt (``Shipper._corrupt_generation``): each try reads it a few times, and a
#: commit round of the lane waits for that.
CORRUPT_RETRY_MAX_S = 30.0
#: Threads compressing a segment's blocks. A sealer alone on one thread kept up with
#: 60 % of what the log took on a 2-core machine (the log filled up behind it).
PACK_THREADS = max(2, min(4, os.cpu_count() or 2))
#: Domains whose catalog commits are in flight at once (``commit_step``): enough to
#: overlap the store's round trips, as many as a store client's connection pool serves.
COMMIT_CONCURRENCY = 8
#: The most ``resync`` windows a DRVA keeps in a timeline's head (FORMAT.md §8.2): past
#: it, the two neighbouring closed ones with the fewest seqs between them become one
#: (``_bounded_windows``). A resync follows an outage or a full filter buffer: at one an
#: hour that is five and a half months, and retention drops the old ones first. Each
#: window is ~70 bytes of every delta that changes them (``set_windows`` is the whole
#: list) and of every snapshot: ~290 KB at most. Unbounded, a filter sending RESYNC_BEGIN
#: and RESYNC_END by turns grew the head, and each delta, by a window per pair.
RESYNC_WINDOWS_MAX = 4096
#: A domain's ``marks_dropped`` and ``resync_windows_merged`` warnings are logged at most
#: this often (a filter flooding marks past ``MARKS_MAX`` drops some at every commit).
CUT_LOG_INTERVAL_S = 60.0


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter, capped."""
    return rng.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(attempt, 16)))


def corrupt_backoff_s(attempt: int, rng: random.Random) -> float:
    """The pause after the ``attempt``-th commit that met a corrupt generation: doubling,
    with jitter, up to ``CORRUPT_RETRY_MAX_S`` (never near 0: each try costs reads)."""
    return rng.uniform(0.5, 1.0) * min(CORRUPT_RETRY_MAX_S, 2 * RETRY_BASE_S * 2 ** min(attempt, 16))


class Shipper:
    """Seal, upload, commit and trim for every domain of one DRVA."""

    def __init__(self, *, name: str, site: str, log_: ReplicationLog, lanes: list[StoreLane], meta: MetaRepository,
                 committer: GroupCommitter, domains: dict[int, DomainState], seal_bytes: int,
                 seal_age_s: float, upload_concurrency: int, pool: ThreadPoolExecutor) -> None:
        self.name = name
        self.site = site
        self.log = log_
        self.lanes = lanes
        self.lane_of = {dom.id: lane for lane in lanes for dom in lane.domains}
        assert set(self.lane_of) == set(domains), "every domain ships to exactly one store"
        self.meta = meta
        self.committer = committer
        self.domains = domains
        self.seal_bytes = seal_bytes
        self.seal_age_s = seal_age_s
        self.pool = pool
        # Not ``pool``: a build waits on its blocks' tasks, and builds run on ``pool``.
        self.pack_pool = ThreadPoolExecutor(PACK_THREADS, thread_name_prefix="drva-pack")
        self.upload_concurrency = upload_concurrency
        self.writers: dict[int, CatalogWriter] = {}
        # One catalog commit at a time per domain: the sealer and the seeder both commit.
        self.catalog_locks = {d: asyncio.Lock() for d in domains}
        self._frames_released: set[int] = set()  # stopped domains whose cached frames went back (_release_frames)
        # The lanes' catalog committers share the metadata repository and the log: one
        # of them at a time records its commits and trims.
        self.meta_lock = asyncio.Lock()
        self.rng = random.Random()
        self.store_errors = 0
        self.last_store_error: str | None = None
        # Old catalog generations are deleted off the commit path, one domain at a time per store.
        self._collecting: dict[int, asyncio.Task] = {}  # lane index -> its collection
        self._collected: dict[int, int] = {}
        # domain -> (commits in a row that met a corrupt generation, monotonic time before
        # which its commits pause): ``_corrupt_generation``.
        self._corrupt: dict[int, tuple[int, float]] = {}
        # Per domain, since this DRVA started: the oldest marks its head let go past
        # MARKS_MAX, and the resync windows merged past RESYNC_WINDOWS_MAX (the status's
        # ``marks_dropped``, ``resync_windows_merged``); ``_cut``: what the delta being
        # committed does so (``_delta``), counted once it is committed.
        self.marks_dropped: dict[int, int] = {d: 0 for d in domains}
        self.windows_merged: dict[int, int] = {d: 0 for d in domains}
        self._cut: dict[int, tuple[int, int]] = {}
        self._cut_logged: dict[int, float] = {}

    @property
    def store(self) -> ObjectStore:
        """The configuration's ``store`` (lane 0): the only one of a one-store DRVA."""
        return self.lanes[0].store

    @store.setter
    def store(self, store: ObjectStore) -> None:  # tests swap in a fault-injecting store
        self.lanes[0].store = store

    @property
    def uploaded(self) -> asyncio.Event:
        """Lane 0's upload event (``StoreLane.uploaded``)."""
        return self.lanes[0].uploaded

    def store_of(self, domain: int) -> ObjectStore:
        """The store domain ``domain`` (an id) lives in."""
        return self.lane_of[domain].store

    # ------------------------------------------------------------------ catalog open

    async def open_catalog(self, dom: DomainState) -> None:
        """Load (or create) the domain's catalog; drop log entries it already names.
        ``Fenced`` when the current timeline is not this DRVA's site's (FORMAT.md §8.5)."""
        by, disks, store = f"drva {self.name}@{self.site}", dom.cfg.catalog_disks(), self.store_of(dom.id)
        writer = await CatalogWriter.open(store, dom.id, by=by, owner=self.site)
        if writer is None:
            state = CatalogState.new(dom.id, dom.cfg.name, time.time_ns(), self.site)
            writer = CatalogWriter(store, state, by=by, owner=self.site)
        writer.check_owner()
        current = writer.state.timeline()
        if dom.meta_timeline and dom.meta_timeline != current.id:
            unknown = _unknown_timeline(dom, writer.state)
            if unknown is not None:
                # Adopting would drop the domain's unshipped log entries on the word of a
                # value that names no timeline of this catalog: stop it, keep them.
                dom.stop(unknown)
                log.error("timeline_unknown", domain=dom.id, reason=unknown)
                return
            self._adopt(dom, current)
        behind = self._behind_metadata(dom, writer)
        if behind is not None:
            # Committing on top would put rows after a gap the log can no longer fill (its
            # entries were trimmed once committed): stop this domain, loudly, and no other.
            dom.fenced = True
            dom.stats.last_error = behind
            log.error("catalog_behind_metadata", domain=dom.id, reason=behind)
            return

        def disks_delta(state: CatalogState) -> dict[str, Any] | None:
            # None once a generation holds them: ours, whose reply was lost (§8.3).
            return None if state.disks == disks and writer.generation else {"disks": disks}

        if writer.generation == 0 or writer.state.disks != disks:
            await self._commit(dom, writer, disks_delta)
        self.writers[dom.id] = writer
        committed = writer.state.timeline().committed_seq
        dom.committed_seq = committed  # never below the metadata's: _behind_metadata stopped that
        while dom.unsealed and dom.unsealed[0].last_seq <= dom.committed_seq:
            # Committed before a restart; only the trim was lost.
            self.committer.uncache([dom.unsealed.popleft()])
        # What follows the catalog's newest timestamp may not be stamped before it (a log
        # of a DRVA that did not raise timestamps yet may hold such frames).
        dom.raise_ts_floor(_newest_ts(writer.state.timeline()))
        # Nothing is sealed before the catalog is open (seal_step waits for it).
        dom.sealed_seq = dom.committed_seq
        if dom.accepted_seq < dom.committed_seq:  # durable_seq <= accepted_seq always
            dom.accepted_seq = dom.durable_seq = dom.committed_seq
        dom.catalog_ready = True
        log.info("catalog_open", domain=dom.id, generation=writer.generation,
                 committed_seq=committed, pending_entries=len(dom.unsealed))

    def _adopt(self, dom: DomainState, current: Any) -> None:
        """The domain is this site's again on a timeline this DRVA never wrote: another
        site failed it over, and it was failed back here (``rocva.failback``), forked at
        ``current.fork_seq``. What this DRVA holds of its old timeline — its log entries
        and its committed seq — is not part of the new one: the failback rewrote the
        primaries where those writes landed. Drop them; the domain continues from the
        catalog's committed seq, as on a first open."""
        held = dom.unsealed  # counted, not made objects of: it may hold millions of rows
        dropped = len(held)
        first_seq, last_seq = (held[0].first_seq, held[-1].last_seq) if dropped else (None, None)
        self.committer.uncache(list(held.cached()))
        held.clear()
        dom.committed_seq = dom.sealed_seq = dom.accepted_seq = dom.durable_seq = current.committed_seq
        dom.committed_ts = dom.accepted_ts = 0  # open_catalog raises it to the timeline's newest
        log.warning("timeline_adopted", domain=dom.id, old_timeline=dom.meta_timeline, timeline=current.id,
                    parent=current.parent, fork_seq=current.fork_seq, entries_dropped=dropped,
                    first_seq=first_seq, last_seq=last_seq,
                    reason="the domain came back to this site on a timeline forked from another site's")
        dom.meta_timeline = current.id

    def _behind_metadata(self, dom: DomainState, writer: CatalogWriter) -> str | None:
        """Why the store's catalog is older than what this DRVA committed to it, as its
        metadata repository recorded (None: it is not). Then generations were removed —
        a rollback (FORMAT.md §0) — or the store is not the one this DRVA wrote to."""
        committed = writer.state.timeline().committed_seq  # 0 for a catalog created here
        if dom.committed_seq <= committed:
            return None
        return (f"ROLLED BACK: the store's catalog of domain {dom.id} is committed up to seq {committed}, "
                f"but this DRVA committed up to seq {dom.committed_seq} (its metadata repository): catalog "
                f"generations were removed, or this is not the store it wrote to; the domain is stopped "
                f"here (cdp verify --metadata shows the problem)")

    # ------------------------------------------------------------------ seal

    async def seal_step(self, now: float | None = None, force: bool = False, lane: StoreLane | None = None) -> int:
        """Seal at most one segment per domain (of ``lane``, or of every lane) that is
        due; return how many were sealed."""
        now = time.monotonic() if now is None else now
        sealed = 0
        for dom in self.domains.values() if lane is None else lane.domains:
            if dom.fenced:
                self._release_frames(dom)
                continue
            # Before the catalog is open we do not know which entries it already names.
            if not dom.unsealed or not dom.catalog_ready:
                continue
            due = force or dom.unsealed_bytes() >= self.seal_bytes or (
                now - dom.unsealed[0].arrived >= self.seal_age_s)
            if due:
                try:
                    await self._seal(dom)
                except CdpError as exc:  # its frames cannot make a segment: this domain stops, not the DRVA
                    self._stop(dom, "seal_failed", exc)
                    continue
                sealed += 1
        return sealed

    def _release_frames(self, dom: DomainState) -> None:
        """A stopped domain's entries stay until the DRVA restarts (their log space is
        not held back: ``trim``), but nothing seals them: give their cached frames' share
        of the committer's budget back to the domains that ship, once (the committer
        caches no frame of a stopped domain). Held, they kept up to the whole budget
        from every other domain until a restart."""
        if dom.id in self._frames_released:
            return
        self._frames_released.add(dom.id)
        released = dom.unsealed.drop_frames()
        if released:
            self.committer.uncache(released)
            log.info("fenced_frames_released", domain=dom.id, entries=len(released),
                     bytes=sum(e.nbytes for e in released))

    def _stop(self, dom: DomainState, event: str, exc: CdpError) -> None:
        reason = (f"{type(exc).__name__}: {exc.message}; domain {dom.id} is stopped on this DRVA "
                  f"(its other domains go on)")
        dom.stop(reason)
        log.error(event, domain=dom.id, reason=reason)

    async def _seal(self, dom: DomainState) -> None:
        entries, nbytes = [], 0
        for e in dom.unsealed:
            if entries and nbytes + e.nbytes > self.seal_bytes:
                break
            entries.append(e)
            nbytes += e.nbytes
        loop = asyncio.get_running_loop()
        data, raw_len = await loop.run_in_executor(self.pool, self._build, dom.id, entries)
        key = segment_key(dom.id, self.writers[dom.id].state.current, entries[0].first_seq, entries[-1].last_seq)
        self.committer.uncache(entries)
        held = dom.unsealed.strides  # the queue's running total: what these entries take is what leaves it
        for _ in entries:
            dom.unsealed.popleft()
        job = SegmentJob(dom.id, key, data, entries, raw_len, len(data), held - dom.unsealed.strides)
        dom.inflight.append(job)
        dom.sealed_seq = job.last_seq
        await self.lane_of[dom.id].queue.put(job)  # waits while its uploaders are busy: bounded memory

    def _build(self, domain: int, entries: list) -> tuple[bytes, int]:
        frames = [entry_frame(e, e.frame if e.frame is not None else self._read_frame(e.pos)) for e in entries]
        built = build_segment_info(domain, frames, executor=self.pack_pool)
        return built.data, built.payload_raw_len

    def _read_frame(self, pos: int) -> Any:
        """The frame logged at ``pos``, read back; ``LogError`` when the device fails the
        read (EIO: a bad sector), so that ``seal_step`` stops this domain and no other."""
        where = f"{self.log.path} position {pos}"
        try:
            body = self.log.read_view(pos)
        except OSError as exc:
            raise LogError(f"log partition {self.log.path}: cannot read the entry at position {pos} "
                           f"({exc.strerror or exc})") from exc
        return decode_frame(body, where)

    def close(self) -> None:
        """Stop the block compressors (after the tasks that use them)."""
        self.pack_pool.shutdown()

    # ------------------------------------------------------------------ upload

    async def upload_worker(self, lane: StoreLane | None = None) -> None:
        """Put ``lane``'s sealed segments (lane 0's by default), one at a time, forever."""
        queue = (lane or self.lanes[0]).queue
        while True:
            job = await queue.get()
            try:
                await self.upload(job)
            finally:
                queue.task_done()

    async def upload(self, job: SegmentJob) -> None:
        dom = self.domains[job.domain]
        lane = self.lane_of[job.domain]
        t0 = time.monotonic()
        while True:
            try:
                await lane.store.put(job.key, job.data)
                break
            except StoreError as exc:
                job.upload_attempts += 1
                dom.stats.upload_errors += 1
                self._store_error(dom, "upload_failed", exc, key=job.key, attempt=job.upload_attempts)
                await asyncio.sleep(backoff_s(job.upload_attempts, self.rng))
        dom.stats.upload_latency_s.append(time.monotonic() - t0)
        dom.stats.segments_uploaded += 1
        dom.stats.bytes_uploaded += len(job.data)
        job.data = b""  # durable in the store: the bytes are not needed any more
        job.uploaded = True
        lane.uploaded.set()

    def _store_error(self, dom: DomainState, event: str, exc: CdpError, **fields: Any) -> None:
        self.store_errors += 1
        self.last_store_error = dom.stats.last_error = f"{type(exc).__name__}: {exc.message}"
        log.warning(event, domain=dom.id, error=self.last_store_error, **fields)

    # ------------------------------------------------------------------ commit + trim

    async def commit_step(self, lane: StoreLane | None = None) -> int:
        """Commit every domain's (of ``lane``, or of every lane) uploaded head-of-line
        segments; trim. Returns segments.

        Domains commit concurrently (``COMMIT_CONCURRENCY`` at once): each commit is a
        store round trip (a conditional create: tens of milliseconds on S3 or Azure),
        and one after the other a round over 100 domains took their sum, which every
        domain's commit waited for. One domain's commits stay in order under its
        catalog lock. (On the file store, ``benchmarks.scale`` at 100 domains showed no
        difference either way: its round trips are short.)"""
        now = time.monotonic()
        ready = [dom for dom in (self.domains.values() if lane is None else lane.domains)
                 if dom.inflight and dom.inflight[0].uploaded and not dom.fenced and dom.id in self.writers
                 and self._corrupt.get(dom.id, (0, 0.0))[1] <= now]
        done = sum(await gather_bounded((self._commit_uploaded(dom) for dom in ready), COMMIT_CONCURRENCY))
        if done:
            async with self.meta_lock:
                # The document and the trim target from one snapshot (no await between):
                # another lane's commit may land while this write is in its thread, and a
                # target taken after it would trim that lane's entries while the durable
                # metadata still names its older committed seq (a restart then found a gap
                # in the log and stopped the domain, its acked entries behind it unshipped).
                doc, target = self.meta_doc(), self._trim_target()
                await asyncio.to_thread(self.meta.write, doc)
                await self.trim(target)
        return done

    async def _commit_uploaded(self, dom: DomainState) -> int:
        """Commit ``dom``'s uploaded head-of-line segments; how many were retired. A store
        error or a fence is the domain's own: counted and logged, the others go on."""
        try:
            await self.commit_delta(dom, lambda state: self._delta(dom, state))
        except StoreError as exc:
            dom.stats.catalog_errors += 1
            self._store_error(dom, "catalog_commit_failed", exc)
            return 0
        except Fenced:
            return 0
        except CorruptGeneration as exc:  # before CdpError: it is no refusal, and no fence
            self._corrupt_generation(dom, exc)
            return 0
        except CdpError as exc:  # the catalog refused the delta: retrying cannot change that
            dom.stats.catalog_errors += 1
            self._stop(dom, "catalog_commit_refused", exc)
            return 0
        if self._corrupt.pop(dom.id, None) is not None:
            log.info("catalog_generation_readable", domain=dom.id, generation=self.writers[dom.id].generation)
        self._count_cut(dom)
        return self._committed(dom)

    def _count_cut(self, dom: DomainState) -> None:
        """Count (and say, at most every ``CUT_LOG_INTERVAL_S``) the marks and resync
        windows the delta just committed let go (``_delta``)."""
        marks, windows = self._cut.pop(dom.id, (0, 0))
        if not marks and not windows:
            return
        self.marks_dropped[dom.id] += marks
        self.windows_merged[dom.id] += windows
        now = time.monotonic()
        if now - self._cut_logged.get(dom.id, -float("inf")) < CUT_LOG_INTERVAL_S:
            return
        self._cut_logged[dom.id] = now
        if self.marks_dropped[dom.id]:
            log.warning("marks_dropped", domain=dom.id, marks_dropped=self.marks_dropped[dom.id],
                        marks_max=MARKS_MAX,
                        reason=f"the catalog keeps the newest {MARKS_MAX} marks of a timeline: the oldest ones' "
                               f"names are gone (their points stay recoverable by seq and time)")
        if self.windows_merged[dom.id]:
            log.warning("resync_windows_merged", domain=dom.id, windows_merged=self.windows_merged[dom.id],
                        windows_max=RESYNC_WINDOWS_MAX,
                        reason=f"the catalog keeps at most {RESYNC_WINDOWS_MAX} resync windows of a timeline: "
                               f"neighbouring ones were merged, and the points between them are not offered")

    def _corrupt_generation(self, dom: DomainState, exc: CorruptGeneration) -> None:
        """A generation in the way of ``dom``'s commit stayed corrupt over several reads.
        It may be this writer's own whose reply was lost (FORMAT.md §8.3): fencing on it
        stopped the domain until a restart. Instead its commits pause (a growing wait:
        ``corrupt_backoff_s``) and are tried again — its entries stay in the log, as in
        a store outage — and the error is counted and logged, which raises an MSA's
        ``store_errors`` alarm."""
        attempt = self._corrupt.get(dom.id, (0, 0.0))[0] + 1
        wait = corrupt_backoff_s(attempt, self.rng)
        self._corrupt[dom.id] = (attempt, time.monotonic() + wait)
        dom.stats.catalog_errors += 1
        self.store_errors += 1
        self.last_store_error = dom.stats.last_error = f"{type(exc).__name__}: {exc.message}"
        log.error("catalog_generation_corrupt", domain=dom.id, key=exc.key, attempt=attempt,
                  retry_in_s=round(wait, 3), error=exc.message)

    def _committed(self, dom: DomainState) -> int:
        """Retire the in-flight segments the catalog now names; return how many."""
        committed = self.writers[dom.id].state.timeline().committed_seq
        n = 0
        while dom.inflight and dom.inflight[0].last_seq <= committed:
            job = dom.inflight.popleft()
            dom.committed_seq, dom.committed_ts = job.last_seq, job.entries[-1].last_ts
            n += 1
        return n

    def _delta(self, dom: DomainState, state: CatalogState) -> dict[str, Any] | None:
        """The delta naming the uploaded head-of-line segments ``state`` does not hold yet
        (a generation of ours whose reply was lost may hold some: FORMAT.md §8.3)."""
        tl = state.timeline()
        self._cut[dom.id] = (0, 0)
        jobs = []
        for job in dom.inflight:
            if not job.uploaded:
                break
            if job.last_seq > tl.committed_seq:
                jobs.append(job)
        if not jobs:
            return None
        cols: dict[str, list[int]] = {name: [] for name in ROW_FIELDS}
        for j in jobs:
            for name, value in (("timeline", tl.id), ("first_seq", j.first_seq), ("last_seq", j.last_seq),
                                ("object_last_seq", j.last_seq), ("first_ts", j.entries[0].first_ts),
                                ("last_ts", j.entries[-1].last_ts), ("size", j.size),
                                ("payload_raw_len", j.payload_raw_len)):
                cols[name].append(value)
        delta: dict[str, Any] = {"add_segments": cols}
        marks = [{"name": n, "seq": s, "ts": t} for j in jobs for e in j.entries for s, n, t in e.marks]
        if marks:
            delta["add_marks"] = marks
        events = [ev for j in jobs for e in j.entries for ev in e.resync]
        merged = 0
        if events:
            windows = _apply_resync(tl.windows, events)
            delta["set_windows"], merged = _bounded_windows(windows, RESYNC_WINDOWS_MAX)
        # The head keeps the newest MARKS_MAX marks (CatalogState.apply_delta).
        self._cut[dom.id] = (max(0, len(tl.marks) + len(marks) - MARKS_MAX), merged)
        return delta

    async def commit_delta(self, dom: DomainState, make_delta: Callable[[CatalogState], dict | None]) -> None:
        """Commit ``make_delta(state)`` to the domain's catalog, under its catalog lock."""
        async with self.catalog_locks[dom.id]:
            await self._commit(dom, self.writers[dom.id], make_delta)

    async def _commit(self, dom: DomainState, writer: CatalogWriter,
                      make_delta: Callable[[CatalogState], dict | None]) -> None:
        """``writer.commit_shared``: our own lost reply and consolidation/retention
        generations are handled there (FORMAT.md §8.3); what it refuses is a fence."""
        try:
            await writer.commit_shared(make_delta)
        except Fenced as exc:
            dom.fenced = True
            dom.stats.last_error = exc.message
            log.error("fenced", domain=dom.id, generation=writer.next_generation, reason=exc.message)
            raise
        self._collect_soon(dom.id, writer)

    def _collect_soon(self, domain: int, writer: CatalogWriter) -> None:
        """Delete generations older than the previous snapshot (FORMAT.md §8.1), in the
        background so that no commit waits for it; one collection at a time per store."""
        if writer.snapshots_written <= self._collected.get(domain, 0):
            return
        lane = self.lane_of[domain].index
        if lane in self._collecting and not self._collecting[lane].done():
            return
        self._collected[domain] = writer.snapshots_written
        self._collecting[lane] = asyncio.create_task(self._collect(domain, writer.snapshots_written))

    async def _collect(self, domain: int, generation: int) -> None:
        try:
            result = await collect_generations(self.store_of(domain), domain, generation)
        except CdpError as exc:  # a later snapshot tries again (a store error; a clock off the store's)
            log.warning("catalog_collect_failed", domain=domain, error=exc.message)
            return
        if result["deleted"] or result["deferred_by"]:
            log.info("catalog_collected", domain=domain, generation=generation, **result)

    def _trim_target(self) -> int:
        """The log position every entry before which is committed to a store, as the
        domains stand now. A fenced domain's entries will never be committed by this DRVA:
        they hold no log space back from the other domains."""
        needed = [p for d in self.domains.values() if not d.fenced and (p := d.first_needed_pos()) is not None]
        return min(needed) if needed else self.committer.durable_end

    async def trim(self, target: int) -> None:
        """Trim the log to ``target`` (``_trim_target``, taken with the metadata document
        the caller made durable first)."""
        if target > self.log.head:
            await asyncio.to_thread(self.log.trim, target)
            self.committer.poke()

    def meta_doc(self) -> dict[str, Any]:
        """The metadata document (FORMAT.md §4): each served domain's commit, and its id
        and name as configured (``drva.partitions`` checks them at the next start)."""
        return {"drva": self.name, "domains": {
            str(d.id): {"committed_seq": d.committed_seq, "committed_ts": d.committed_ts,
                        "generation": self.writers[d.id].generation if d.id in self.writers else 0,
                        "timeline": self.writers[d.id].state.current if d.id in self.writers else 0,
                        "name": d.cfg.name}
            for d in self.domains.values()}}


def _unknown_timeline(dom: DomainState, state: CatalogState) -> str | None:
    """Why the timeline the metadata repository records for ``dom`` (not the catalog's
    current one) is no ground to adopt the current one (``Shipper._adopt``), or None: it
    is a timeline this catalog holds, so the catalog does say another one is current
    now. Anything else — not an id, or one the catalog never had (another store, a
    forged or damaged repository) — says nothing of a failback."""
    recorded = dom.meta_timeline
    if type(recorded) is int and recorded in state.timelines:
        return None
    return (f"the metadata repository records timeline {recorded!r} for domain {dom.id}, which its catalog "
            f"does not hold (timelines {sorted(state.timelines)}, current {state.current}): not adopting "
            f"timeline {state.current} (that would drop the domain's {len(dom.unsealed)} unshipped log "
            f"entries); the domain is stopped here (cdp verify --metadata shows the problem)")


def _newest_ts(timeline: Any) -> int:
    """The newest timestamp a timeline's catalog rows hold (0: none)."""
    if len(timeline.tail):
        return int(timeline.tail["last_ts"][-1])
    if len(timeline.refs):
        return int(timeline.refs["last_ts"][-1])
    return 0


def _apply_resync(windows: list[dict], events: list[tuple[int, int]]) -> list[dict]:
    """The catalog's window list after RESYNC_BEGIN/END records (kind, seq), in order.

    The events act on the first open ``resync`` window of the list (a DRVA only ever
    has one: it opens one only when none is, at the end of the list). It is found once,
    and after an END the next one from there on: one pass over the list and one step
    per event, not a pass over the windows per event (60,000 events of one frame, on
    the event loop, once held every domain's sessions for 28 s)."""
    out = [dict(w) for w in windows]
    open_at = _open_resync(out, 0)
    for kind, seq in events:
        if kind == KIND_RESYNC_BEGIN:
            if open_at is None:
                out.append({"kind": "resync", "first_seq": seq, "last_seq": None})
                open_at = len(out) - 1
        elif open_at is not None:
            # FORMAT.md §1: the stream is consistent again from the RESYNC_END record on.
            out[open_at]["last_seq"] = seq - 1
            open_at = _open_resync(out, open_at + 1)
    return out


def _open_resync(windows: list[dict], start: int) -> int | None:
    """The index of the first open ``resync`` window at or after ``start``, or None."""
    return next((i for i in range(start, len(windows))
                 if windows[i]["kind"] == "resync" and windows[i]["last_seq"] is None), None)


def _bounded_windows(windows: list[dict], most: int) -> tuple[list[dict], int]:
    """(``windows`` with at most ``most`` ``resync`` windows, how many were merged away).

    Past ``most``, neighbouring closed ``resync`` windows (in list order, which is seq
    order for them: each is opened after the last one closed) are merged, those with the
    fewest seqs between them first (ties: the oldest first). The merged window covers the
    seqs between them too: those points are no longer offered as consistent — fewer
    recovery points, never an inconsistent one, and no record is lost. Other windows
    stay as they are, where they are."""
    resync = [i for i, w in enumerate(windows) if w["kind"] == "resync"]
    excess = len(resync) - most
    if excess <= 0:
        return windows, 0
    pairs = [(windows[b]["first_seq"] - windows[a]["last_seq"], k)
             for k, (a, b) in enumerate(zip(resync, resync[1:]))
             if windows[a]["last_seq"] is not None and windows[b]["last_seq"] is not None]
    joined = {k for _, k in sorted(pairs)[:excess]}  # pair k joins resync[k] and resync[k + 1]
    out, gone = list(windows), set()
    k = 0
    while k < len(resync) - 1:
        if k not in joined:
            k += 1
            continue
        end = k
        while end in joined:
            end += 1
        group = [windows[i] for i in resync[k : end + 1]]
        out[resync[k]] = {"kind": "resync", "first_seq": min(w["first_seq"] for w in group),
                          "last_seq": max(w["last_seq"] for w in group)}
        gone.update(resync[k + 1 : end + 1])
        k = end + 1
    return [w for i, w in enumerate(out) if i not in gone], len(gone)
