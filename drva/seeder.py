"""Initial seeding: a disk with existing content becomes a base image in the store.

The filter reads its primary disk chunk by chunk while the disk's live writes keep being
captured (FORMAT.md §9: ``SEED_BEGIN``, ``SEED_CHUNK``…, ``SEED_END``). This is a fuzzy
copy: a chunk may be read before or after a write that lands on it. It is made exact by
the stream: the base is recorded at ``start_seq`` (the last seq captured before the
copy began), and replaying every record after ``start_seq`` over it gives the disk at
any seq from ``end_seq`` on. Points in ``(start_seq, end_seq)`` are not consistent and
the catalog says so with a ``seeding`` window.

Chunks are content-addressed (FORMAT.md §6.1): an all-zero chunk is never sent nor
stored, a chunk already in the store (or seen by this job) is not uploaded again. A job
relies on chunks it saw in the store only under its chunk-writer lease (FORMAT.md §11.4),
held from its first upload until its manifest is in the store, so that no chunk sweep
can delete one between the look and the manifest that names it.
Uploads run with bounded concurrency; when they lag, the session stops reading, which
slows the filter down.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cdp import wire
from cdp.base_image import chunk_namer_of, encode_chunk, encode_manifest, is_zero
from cdp.errors import NotFound, StoreError
from cdp.layout import base_manifest_key, chunk_key
from cdp.locks import Lease, chunk_writer_lease
from cdp.logs import get_logger
from cdp.store.base import ObjectStore
from drva import messages
from drva.shipper import backoff_s

if TYPE_CHECKING:
    from drva.daemon import Drva
    from drva.session import Session

log = get_logger("drva.seeder")

UPLOADS_MAX = 4
CATALOG_POLL_S = 0.1  # SEED_END waits for the domain's catalog to be open, polling
KNOWN_CHUNKS_MAX = 1 << 16  # hashes remembered to skip a stat; bounded memory


@dataclass
class SeedJob:
    domain: int
    disk: int
    disk_size: int
    chunk_size: int
    start_seq: int
    hashes: np.ndarray
    tasks: set[asyncio.Task] = field(default_factory=set)
    # Chunks seen in the store (or put) under ``lease``: valid only while it is held.
    known: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    lease: Lease | None = None
    lease_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stored: int = 0
    deduplicated: int = 0
    failed: BaseException | None = None


class Seeder:
    """Turns SEED_* messages into chunks, a manifest and a catalog base (module docstring)."""

    def __init__(self, drva: "Drva") -> None:
        self.drva = drva
        self.jobs: dict[tuple[int, int], SeedJob] = {}
        self.slots = asyncio.Semaphore(UPLOADS_MAX)
        self.finishing: set[asyncio.Task] = set()

    async def handle(self, session: "Session", msg: wire.Message) -> None:
        from drva.session import Refused

        if msg.type == wire.SEED_CHUNK:
            domain, disk, chunk, data = wire.parse_seed_chunk(msg.body, session.where)
            job = self.jobs.get((domain, disk))
            if job is None or domain not in session.domains:
                raise Refused("bad_seed", f"SEED_CHUNK for domain {domain} disk {disk} without SEED_BEGIN")
            await self._chunk(job, chunk, bytes(data), session)
            return
        doc = messages.parse(msg, session.where)  # every field present, typed, in range
        domain, disk = doc["domain"], doc["disk"]
        dom = session.domains.get(domain)
        if dom is None or not disk < len(dom.cfg.disks):
            raise Refused("bad_seed", f"{msg.name} for unknown domain/disk {domain}/{disk}")
        if msg.type == wire.SEED_BEGIN:
            self._begin(dom, disk, doc)
        else:
            # Finishing waits for uploads and the catalog: not on the session's read path.
            task = asyncio.create_task(self._end(session, dom, disk, doc))
            self.finishing.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("seed_failed", error=repr(task.exception()))

    def _begin(self, dom: Any, disk: int, doc: dict[str, Any]) -> None:
        from drva.session import Refused

        # Types and ranges were checked at the edge (drva.messages); what is left is
        # whether they fit this domain.
        size, chunk_size, start = doc["disk_size"], doc["chunk_size"], doc["start_seq"]
        if size != dom.cfg.disks[disk].size:
            raise Refused("bad_seed", f"disk {disk} of domain {dom.id}: size {size}, configured {dom.cfg.disks[disk].size}")
        count = -(-size // chunk_size)
        old = self.jobs.get((dom.id, disk))
        if old is not None and old.lease is not None:  # a restarted seeding: the old one is abandoned
            task = asyncio.create_task(self._drop_lease(old))
            self.finishing.add(task)
            task.add_done_callback(self._finished)
        self.jobs[(dom.id, disk)] = SeedJob(dom.id, disk, size, chunk_size, start,
                                            np.zeros((count, 16), dtype=np.uint8))
        log.info("seed_begin", domain=dom.id, disk=disk, disk_size=size, chunk_size=chunk_size, start_seq=start)

    async def _chunk(self, job: SeedJob, chunk: int, data: bytes, session: "Session") -> None:
        from drva.session import Refused

        count = len(job.hashes)
        expect = min(job.chunk_size, job.disk_size - chunk * job.chunk_size) if chunk < count else -1
        if len(data) != expect:
            raise Refused("bad_seed", f"SEED_CHUNK {chunk} of disk {job.disk}: {len(data)} bytes, expected {expect}")
        if is_zero(data):
            return
        await self.slots.acquire()  # bounded uploads; the session waits here
        task = asyncio.create_task(self._upload(job, chunk, data))
        job.tasks.add(task)
        task.add_done_callback(job.tasks.discard)

    async def _upload(self, job: SeedJob, chunk: int, data: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
            store = self.drva.shipper.store_of(job.domain)  # the domain's store: its chunks and its lease
            # An encrypted store names chunks with a keyed hash (FORMAT.md §19.6).
            h, obj = await loop.run_in_executor(self.drva.pool, encode_chunk, data, chunk_namer_of(store))
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
                    try:
                        await store.stat(key)
                        job.deduplicated += 1
                    except NotFound:
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
        finally:
            self.slots.release()

    async def _hold_lease(self, job: SeedJob) -> None:
        async with job.lease_lock:
            if job.lease is None:
                # In the domain's store: the chunk sweep it holds off is that store's.
                job.lease = await chunk_writer_lease(
                    self.drva.shipper.store_of(job.domain),
                    owner=f"drva {self.drva.cfg.name}: seeding domain {job.domain} disk {job.disk}")

    @staticmethod
    async def _drop_lease(job: SeedJob) -> None:
        if job.lease is not None:
            lease, job.lease = job.lease, None
            job.known.clear()
            await lease.release()

    async def _end(self, session: "Session", dom: Any, disk: int, doc: dict[str, Any]) -> None:
        job = self.jobs.get((dom.id, disk))
        end = doc["end_seq"]
        if job is None or end < job.start_seq:
            log.warning("seed_refused", domain=dom.id, disk=disk, reason="SEED_END without SEED_BEGIN or bad end_seq")
            return
        while job.tasks:
            await asyncio.gather(*list(job.tasks), return_exceptions=True)
        if job.failed is not None:
            log.error("seed_failed", domain=dom.id, disk=disk, error=repr(job.failed))
            await self._drop_lease(job)
            return
        while not dom.catalog_ready:
            if dom.fenced:  # the catalog will not open: the base can never be committed here
                log.error("seed_failed", domain=dom.id, disk=disk, error="the domain is fenced on this DRVA")
                await self._drop_lease(job)
                return
            await asyncio.sleep(CATALOG_POLL_S)
        timeline = self.drva.shipper.writers[dom.id].state.current
        key = base_manifest_key(dom.id, timeline, job.start_seq, disk)
        data = encode_manifest(dom.id, disk, job.start_seq, job.disk_size, job.chunk_size, job.hashes)
        try:
            if job.lease is not None:
                job.lease.check()  # the chunks it names were seen under the lease (§11.4)
            await self._put_retrying(self.drva.shipper.store_of(dom.id), key, data)
        finally:
            await self._drop_lease(job)
        base = {"timeline": timeline, "seq": job.start_seq, "disk": disk, "key": key, "origin": "seed"}

        def delta(state: Any) -> dict[str, Any] | None:
            tl = state.timeline()
            if base in tl.bases:
                return None  # a generation of ours holds it already (its reply was lost: §8.3)
            windows = list(tl.windows)
            # Every chunk was read before SEED_END, after record ``end`` at the latest:
            # replaying (start, end] over the copy is exact at ``end``, not before.
            if end - 1 > job.start_seq:
                windows.append({"kind": "seeding", "first_seq": job.start_seq + 1, "last_seq": end - 1})
            return {"add_bases": [base], "set_windows": windows}

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
        del self.jobs[(dom.id, disk)]
        log.info("seed_done", domain=dom.id, disk=disk, base_seq=job.start_seq, end_seq=end,
                 chunks_stored=job.stored, chunks_deduplicated=job.deduplicated)
        if not session.closed:
            session.writer.writelines(wire.control(wire.SEED_DONE, {
                "domain": dom.id, "disk": disk, "base_seq": job.start_seq,
                "chunks_stored": job.stored, "chunks_deduplicated": job.deduplicated}))

    async def _put_retrying(self, store: ObjectStore, key: str, data: bytes) -> None:
        attempt = 0
        while True:
            try:
                await store.put(key, data)
                return
            except StoreError as exc:
                attempt += 1
                log.warning("seed_upload_failed", key=key, attempt=attempt, error=exc.message)
                await asyncio.sleep(backoff_s(attempt, self.drva.shipper.rng))
