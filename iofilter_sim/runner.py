"""Run a simulated cluster against running DRVAs: disks, filters, clients, workloads.

``ClusterRunner`` opens every protected VM's primary disk, gives each domain a
``DomainFilter`` and each DRVA endpoint a ``FilterClient``, then drives each domain's
workload (or a block trace) at its pace — or, with ``RunOptions.nbd``, serves every disk
as an NBD export and captures what real block clients write (``iofilter_sim.nbd_site``).
Marks are placed while it runs; ``drain`` waits until every captured write is acked;
``summary`` reports what happened.

Each mark is recorded (``marks``, ``RunOptions.marks_log``) with the sha256 of the
domain's primaries at the mark — the oracle recovery at the mark is checked against.
Hashing a disk takes as long as reading it (a minute for 16 GiB), so it never runs on the
event loop, where it stopped capture, acks and NBD serving of every domain of the host,
and never holds the VMs' writes: one worker thread reads the disks as they were at the
mark while the VMs write on (``SnapshotDisk``: a write first keeps the bytes it
overwrites where the thread has not read yet). The mark's record is complete, and its
line appended to the log, once the thread is done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from cdp.dirtymap import DirtyMap
from cdp.errors import ConfigError
from cdp.durable import atomic_write
from cdp.file_kinds import open_regular
from cdp.inventory import Cluster, DomainSpec
from cdp.logs import get_logger
from cdp.small_file import read_json_file
from cdp.tls import client_context
from iofilter_sim.client import FilterClient
from iofilter_sim.mark_hash import MARK_HASHES_PENDING_MAX, MarkHash, SnapshotDisk
from iofilter_sim.cluster import domain_workload
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import BUFFER_BYTES_MAX, DomainFilter, FilterError
from iofilter_sim.nbd_site import NbdFace, NbdListen
from iofilter_sim.seeding import seed_disk
from iofilter_sim.spill import SPILL_BYTES_MAX, SpillJournal
from iofilter_sim.trace import TraceWorkload
from iofilter_sim.workloads import Workload, make_workload

log = get_logger("iofilter.runner")

BATCH_WRITES_MAX = 4096
BATCH_BYTES_MAX = 4 << 20
STATUS_INTERVAL_S = 0.5
STATUS_ERROR_LOG_EVERY_S = 60.0  # a status write that goes on failing the same way is logged this seldom
CONTROL_BYTES_MAX = 1 << 20  # {'pause': [domain, ...]}
MARK_SETTLE_WAIT_S = 10.0


@dataclass
class RunOptions:
    workload: str | None = None  # override every domain's workload kind
    workload_options: dict[str, Any] = field(default_factory=dict)
    trace: Path | None = None  # replay this MSR trace into ``trace_domain``
    trace_domain: str | None = None
    trace_speed: float | None = None
    buffer_bytes_max: int = BUFFER_BYTES_MAX
    seed_disks: bool = False  # seed every disk's existing content first
    # Wait this long for each DRVA's first WELCOME before writing: a domain the DRVA
    # already holds continues after its durable seq (FilterClient), which is only
    # possible before the first write is numbered.
    connect_wait_s: float = 10.0
    # For the hypervisor that runs this simulator (cdp.hypervisor.simulator): a status
    # document rewritten every STATUS_INTERVAL_S, and each mark appended as a JSON line
    # (with the primaries' sha256 at it, once hashed: module docstring) to ``marks_log``.
    status_path: Path | None = None
    marks_log: Path | None = None
    # ``{"pause": [domain, ...]}``: those domains' workloads stop issuing writes (their
    # filters stay connected: a mark can still be placed). Read at start and by
    # ``read_control`` (the simulator calls it on SIGUSR1).
    control_path: Path | None = None
    # Domains whose VMs run isolated: their writes go to the primaries only, no DRVA.
    isolated: frozenset[str] = frozenset()
    # The summary's sha256 of every disk (a supervisor that reads the status does
    # without: hashing terabytes at every power-off would be the slowest part of it).
    hash_at_end: bool = True
    # Each mark's record has the sha256 of its domain's disks at the mark (hashed in a
    # worker thread, module docstring); False: ``null`` there, and nothing is read.
    hash_marks: bool = True
    # Keep a dirty-region map (cdp.dirtymap) next to each disk of a replicated domain.
    dirty_maps: bool = True
    # Frames past the memory buffer wait in a spill journal of at most this many bytes
    # beside the domain's first disk (``<image>.spill``, iofilter_sim.spill); 0: none.
    spill_bytes_max: int = SPILL_BYTES_MAX
    # Serve the disks over NBD instead of running workloads (real block clients write).
    nbd: NbdListen | None = None
    # Connect to the DRVAs with TLS, trusting this CA only (``--tls-ca``; the cluster
    # file's ``[tls] ca`` when None), and expect this name in their certificates.
    tls_ca: Path | None = None
    tls_server_name: str | None = None


class ClusterRunner:
    """A running simulated site (see the module docstring)."""

    def __init__(self, cluster: Cluster, secret: bytes, opts: RunOptions | None = None) -> None:
        self.cluster = cluster
        self.secret = secret
        self.opts = opts or RunOptions()
        self.disks: dict[str, list[PrimaryDisk]] = {}
        self.filters: dict[str, DomainFilter] = {}
        self.clients: list[FilterClient] = []
        self.client_of: dict[str, FilterClient] = {}
        self.workloads: dict[str, Workload] = {}
        self.marks: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._give_up = asyncio.Event()  # stop waiting in ``drain`` too
        self.pause: set[str] = set()  # domains whose workloads must not write (control file)
        self.paused: set[str] = set()  # ... and that stopped writing: their loops saw it
        self.started = time.monotonic()
        self.nbd: NbdFace | None = None
        # Mark hashes (module docstring): one thread, so the marks log keeps mark order.
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mark-hash")
        self._settling: dict[asyncio.Future, MarkHash | None] = {}  # marks not yet recorded

    async def start(self) -> None:
        self.read_control()
        for dom in self.cluster.domains:
            self.disks[dom.name] = [SnapshotDisk.for_disk(d.disk) for d in dom.disks]
            maps = None
            if self.opts.dirty_maps and dom.name not in self.opts.isolated:
                maps = [DirtyMap.open(d.disk.image, d.disk.size, dom.id) for d in dom.disks]
                for m in maps:
                    if m.left.any():
                        log.warning("dirty_regions_left", domain=dom.name, map=str(m.path),
                                    bytes=int(m.left.sum()) * m.region_bytes, reason=m.left_reason)
            spill = None
            if self.opts.spill_bytes_max and dom.name not in self.opts.isolated:
                spill = SpillJournal(f"{dom.disks[0].disk.image}.spill", self.opts.spill_bytes_max)
            self.filters[dom.name] = DomainFilter(dom.id, self.disks[dom.name],
                                                  buffer_bytes_max=self.opts.buffer_bytes_max, dirty_maps=maps,
                                                  spill=spill)
            if self.opts.nbd is None:
                self.workloads[dom.name] = self._workload(dom)
        tls_ca = self.opts.tls_ca or self.cluster.tls_ca
        tls = client_context(tls_ca) if tls_ca is not None else None  # ConfigError naming the file
        server_name = self.opts.tls_server_name or self.cluster.tls_server_name
        for endpoint in self.cluster.drvas:
            doms = tuple(d for d in self.cluster.domains_of(endpoint) if d.name not in self.opts.isolated)
            if not doms:
                continue
            client = FilterClient([self.filters[d.name] for d in doms], endpoint.host, endpoint.port,
                                  self.secret, f"{self.cluster.site}-filter", site=self.cluster.site,
                                  tls=tls, server_name=server_name)
            client.on_mark = self._requested_mark
            self.clients.append(client)
            for d in doms:
                self.client_of[d.name] = client
            self._tasks.append(asyncio.create_task(client.run(), name=f"client-{endpoint}"))
        if self.opts.status_path is not None:
            self._tasks.append(asyncio.create_task(self._write_status_every(self.opts.status_path), name="status"))
        deadline = time.monotonic() + self.opts.connect_wait_s
        while (any(c.connections == 0 for c in self.clients) and time.monotonic() < deadline
               and not self._stop.is_set()):
            await asyncio.sleep(0.02)
        for c in self.clients:
            if c.connections == 0:
                log.warning("drva_not_reached", drva=f"{c.host}:{c.port}", waited_s=self.opts.connect_wait_s,
                            error=c.last_error)
        if self.opts.seed_disks:
            for dom in [d for d in self.cluster.domains if d.name not in self.opts.isolated]:
                for i in range(len(self.disks[dom.name])):
                    await seed_disk(self.client_of[dom.name], self.filters[dom.name], i)
        if self.opts.nbd is not None:  # after the WELCOMEs: a domain continues on its DRVA's seqs
            self.nbd = NbdFace(self, self.opts.nbd)
            await self.nbd.start()

    def _workload(self, dom: DomainSpec) -> Workload:
        if self.opts.trace is not None and self.opts.trace_domain in (None, dom.name):
            return TraceWorkload(self.opts.trace, dom.disk_sizes, speed=self.opts.trace_speed, fit="wrap")
        if self.opts.workload is not None:
            options = {"seed": dom.id, **self.opts.workload_options}
            return make_workload(self.opts.workload, dom.disk_sizes, **options)
        return domain_workload(dom)

    async def run(self, duration_s: float | None, marks: list[tuple[float, str]] = ()) -> None:
        """Drive every workload for ``duration_s`` (None: until ``stop``), placing marks."""
        self.started = time.monotonic()
        loops = [asyncio.create_task(self._drive(name)) for name in self.workloads]
        for at_s, name in sorted(marks):
            if await self._sleep_until(self.started + at_s):
                break
            for dom in self.filters:
                await self.mark(dom, name)
        if duration_s is not None:
            await self._sleep_until(self.started + duration_s)
            self._stop.set()
        await asyncio.gather(*loops)
        if self.nbd is not None:
            await self._stop.wait()
            await self.nbd.stop_serving()  # writes already queued are still captured

    async def _sleep_until(self, t: float) -> bool:
        """Sleep until monotonic time ``t``; True if stopped first."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation
        # that lands in the iteration the stop event fires.
        try:
            async with asyncio.timeout(max(0.0, t - time.monotonic())):
                await self._stop.wait()
            return True
        except TimeoutError:
            return False

    def read_control(self) -> None:
        """Apply the control file (``RunOptions.control_path``): which domains are paused."""
        if self.opts.control_path is None:
            return
        try:
            doc = read_json_file(self.opts.control_path, CONTROL_BYTES_MAX, "a control file") or {}
        except ConfigError as exc:
            log.error("control_unreadable", path=str(self.opts.control_path), error=str(exc))
            return
        pause = doc.get("pause", []) if isinstance(doc, dict) else []
        self.pause = {d for d in pause if isinstance(d, str)} if isinstance(pause, list) else set()
        self.paused &= self.pause
        if self.nbd is not None:
            self.nbd.wake()
        log.info("control_read", pause=sorted(self.pause))

    async def _drive(self, name: str) -> None:
        wl, f = self.workloads[name], self.filters[name]
        while not self._stop.is_set() and not wl.done:
            if name in self.pause:
                self.paused.add(name)  # between batches: nothing of it is being captured
                await asyncio.sleep(0.02)
                continue
            batch = wl.paced_batch(BATCH_WRITES_MAX, BATCH_BYTES_MAX)
            if batch.count == 0:
                await asyncio.sleep(max(0.001, min(wl.delay_s(), 0.1)))
                continue
            if name in self.opts.isolated:
                f.write_only(batch.disk, batch.offset, batch.length, batch.kind, batch.payload)
            else:
                await f.capture_async(batch.disk, batch.offset, batch.length, batch.kind, batch.payload)
            await asyncio.sleep(0)  # let the clients send between batches

    def stop(self) -> None:
        """Stop the workloads; ``drain`` then waits for what was captured to be acked."""
        self._stop.set()

    def give_up(self) -> None:
        """Stop the workloads and stop waiting in ``drain`` (it returns False): for a user
        who will not wait for a DRVA that does not answer."""
        self._stop.set()
        self._give_up.set()

    async def mark(self, domain: str, name: str, wait_s: float = 30.0) -> int | None:
        """Place mark ``name`` in ``domain``, waiting (bounded) for normal mode."""
        f = self.filters[domain]
        deadline = time.monotonic() + wait_s
        while True:
            try:
                seq = f.mark(name)
                self._mark_placed(domain, name, seq)
                log.info("mark_placed", domain=domain, name=name, seq=seq)
                return seq
            except FilterError as exc:
                if time.monotonic() > deadline:
                    log.warning("mark_skipped", domain=domain, name=name, reason=str(exc))
                    return None
                await asyncio.sleep(0.1)

    def _requested_mark(self, domain_id: int, name: str, seq: int) -> None:
        """A mark the management server asked for (``cdp mark``): recorded like ours, with
        the primaries' sha256 at that very point (nothing ran since it was inserted)."""
        domain = next(n for n, f in self.filters.items() if f.domain == domain_id)
        self._mark_placed(domain, name, seq)

    def _mark_placed(self, domain: str, name: str, seq: int) -> None:
        """Record the mark just inserted: called before anything else runs on the loop, so
        the snapshot taken here is of the primaries exactly at the mark. Its hashes and
        its line in the marks log follow from the worker thread."""
        record: dict[str, Any] = {"domain": domain, "name": name, "seq": seq, "sha256": None}
        self.marks.append(record)
        job = self._snapshot(domain, name)
        settled = asyncio.wrap_future(self._hasher.submit(self._settle_mark, record, job))
        self._settling[settled] = job
        settled.add_done_callback(self._mark_settled)

    def _snapshot(self, domain: str, name: str) -> MarkHash | None:
        """The domain's disks as they are now, to hash (None: no hashes for this mark)."""
        if not self.opts.hash_marks:
            return None
        pending = sum(j is not None for j in self._settling.values())
        if pending >= MARK_HASHES_PENDING_MAX:
            log.warning("mark_not_hashed", domain=domain, name=name,
                        reason=f"{pending} marks are being hashed already")
            return None
        job = MarkHash(f"{domain}/{name}", self.disks[domain])
        for d, snap in zip(self.disks[domain], job.snapshots):
            d.snapshots = (*d.snapshots, snap)
        return job

    def _settle_mark(self, record: dict[str, Any], job: MarkHash | None) -> None:
        """(worker thread) Hash the mark's snapshot, then append its line to the log."""
        if job is not None:
            record["sha256"] = job.sha256()
            if record["sha256"] is None:
                log.warning("mark_not_hashed", domain=record["domain"], name=record["name"], reason=job.abandoned)
        try:
            self._record_mark(record)
        except OSError as exc:  # the mark is placed all the same: only its record is lost
            log.error("marks_log_failed", path=str(self.opts.marks_log), domain=record["domain"],
                      name=record["name"], error=str(exc))

    def _mark_settled(self, settled: asyncio.Future) -> None:
        """(loop) A mark is recorded: its snapshot stops keeping what writes overwrite."""
        job = self._settling.pop(settled)
        if job is not None:
            for d, snap in zip(job.disks, job.snapshots):
                d.snapshots = tuple(s for s in d.snapshots if s is not snap)
        if not settled.cancelled() and settled.exception() is not None:
            log.error("mark_record_failed", error=repr(settled.exception()))

    async def _settle_marks(self) -> None:
        """Wait until every mark placed is recorded: hashed within MARK_SETTLE_WAIT_S
        (none at all in a run given up, by a second signal), or without hashes."""
        if self._settling and not self._give_up.is_set():
            await asyncio.wait(list(self._settling), timeout=MARK_SETTLE_WAIT_S)
        for job in self._settling.values():
            if job is not None:
                job.abandon("the run stopped before its disks were hashed")
        await asyncio.gather(*self._settling, return_exceptions=True)
        self._hasher.shutdown(wait=False)

    def _record_mark(self, record: dict[str, Any]) -> None:
        """(worker thread) Append a mark's record to the marks log, durably."""
        if self.opts.marks_log is not None:
            # 0600 whatever the umask, never through a link, a regular file only (FORMAT.md §13.9).
            with open(open_regular(self.opts.marks_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as f:
                f.write(json.dumps(record).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())

    def status(self) -> dict[str, Any]:
        """What a supervisor reads: each domain's sequence numbers and mode."""
        paused = self.paused | (self.nbd.paused() if self.nbd is not None else set())
        return {"pid": os.getpid(), "time": time.time(), "site": self.cluster.site, "paused": sorted(paused),
                **({"nbd": self.nbd.status()} if self.nbd is not None else {}),
                "domains": {
            name: {"id": f.domain, "captured_seq": f.next_seq - 1, "acked_seq": f.acked_seq, "mode": f.mode,
                   "fenced": f.fenced,
                   "writes": f.stats["writes"], "bytes": f.stats["bytes"], "first_ack_time": f.first_ack_time}
            for name, f in self.filters.items()},
            "connections": sum(c.connections for c in self.clients)}

    async def _write_status_every(self, path: Path) -> None:
        """Rewrite the status every ``STATUS_INTERVAL_S``. A write that fails (a full or
        read-only state directory) is logged — each new error once, the same one again at
        most every ``STATUS_ERROR_LOG_EVERY_S`` — and the next tick tries again: the
        first ENOSPC once ended this task, and the supervisor then took the host for hung
        (a quiesce refused for good) or never saw it come up."""
        failing: StatusFailing | None = None
        while True:
            try:
                await asyncio.to_thread(atomic_write, path, json.dumps(self.status()).encode())
            except OSError as exc:
                failing = _status_failed(path, exc, failing)
            else:
                if failing is not None:
                    log.info("status_unwritable_cleared", path=str(path), failures=failing.count)
                failing = None
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _write_last_status(self, path: Path) -> None:
        """The status once more as the run ends; a write that fails is logged, and the
        close goes on (the disks are still to be synced and closed)."""
        try:
            await asyncio.to_thread(atomic_write, path, json.dumps(self.status()).encode())
        except OSError as exc:
            log.error("status_unwritable", path=str(path), error=exc.strerror or str(exc), last=True)

    async def drain(self, timeout_s: float = 120.0) -> bool:
        """Wait until every captured write of every domain is acked and no domain is in
        bitmap or resync mode — but for domains whose DRVA said they are fenced (they run
        at another site: nothing will ever ack them); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._give_up.is_set():
            if all(f.fenced or (f.mode == "normal" and f.acked_seq == f.next_seq - 1) for f in self.filters.values()):
                return True
            await asyncio.sleep(0.05)
        return False

    async def close(self) -> None:
        if self.nbd is not None:
            await self.nbd.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.opts.status_path is not None:  # the last word: what was acked when it stopped
            await self._write_last_status(self.opts.status_path)
        await self._settle_marks()  # before the disks close: the thread reads them
        for disks in self.disks.values():
            for d in disks:
                d.fsync()
                d.close()
        for name, f in self.filters.items():
            f.close_spill()
            if f.maps and not f.close_maps():
                log.warning("dirty_regions_kept", domain=name, bytes=sum(m.dirty_bytes() for m in f.maps),
                            acked_seq=f.acked_seq, captured_seq=f.next_seq - 1)

    def summary(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self.started)
        doms = {}
        for name, f in self.filters.items():
            doms[name] = {
                "id": f.domain, "writes": f.stats["writes"], "bytes": f.stats["bytes"],
                "mb_per_s": round(f.stats["bytes"] / elapsed / 1e6, 2),
                "captured_seq": f.next_seq - 1, "acked_seq": f.acked_seq, "mode": f.mode,
                "bitmap_entries": f.stats["bitmap_entries"], "resyncs": f.stats["resyncs_completed"],
                "spilled_frames": f.stats["spilled_frames"], "map_syncs": f.stats["map_syncs"],
                "spill_peak_bytes": f.spill.peak_bytes if f.spill is not None else 0,
                "sha256": [d.sha256() for d in self.disks[name]] if self.opts.hash_at_end else None,
            }
        return {"site": self.cluster.site, "elapsed_s": round(elapsed, 2), "domains": doms,
                "marks": self.marks, "connections": sum(c.connections for c in self.clients)}


@dataclass
class StatusFailing:
    """The status write's current error: what it is, since when it was last logged
    (monotonic), how many writes failed."""

    error: str
    logged_at: float
    count: int = 1


def _status_failed(path: Path, exc: OSError, was: StatusFailing | None) -> StatusFailing:
    """Count a failed status write; log it when the error is new, or every
    ``STATUS_ERROR_LOG_EVERY_S`` while it lasts."""
    error = exc.strerror or str(exc)
    now = time.monotonic()
    if was is not None and was.error == error:
        was.count += 1
        if now - was.logged_at < STATUS_ERROR_LOG_EVERY_S:
            return was
        was.logged_at = now
        log.error("status_unwritable", path=str(path), error=error, failures=was.count)
        return was
    log.error("status_unwritable", path=str(path), error=error)
    return StatusFailing(error, now)
