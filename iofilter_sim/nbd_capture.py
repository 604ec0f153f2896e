"""The filter's NBD face: each disk of a protected domain served as an NBD export whose
writes go through the capture path (FORMAT.md §17.5).

Writes from every connection and every disk of a domain go through one ``DomainCapture``:
a queue, bounded in bytes, drained in batches by a pipeline of two tasks — one takes a
batch and starts flagging its regions in the dirty-region maps
(``DomainFilter.flag_durably``), the other captures the flagged batches strictly in the
order they were taken (``DomainFilter.capture_flagged``), each only once its flags are
durable — so the domain's writes are numbered in the order they reach its primary
disks, whatever connection they came on, and a map sync overlaps the next batches
instead of holding them back (at most ``PIPELINE_BATCHES_MAX`` batches flagged ahead). A write is answered once it is captured: on its primary disk and in the
filter's buffer (or, in bitmap mode, its dirty bitmap). Reads come from the primary disk.

FLUSH, and FUA on a write, are answered only once every write answered before is
durable both on the primary disk (``fdatasync``, one for many callers) and in the DRVA's
log — so what a client flushed is protected (RPO 0 for flushed data):

* the filter stayed in normal mode since the flush arrived: its DRVA acked every seq
  captured before it;
* the filter was in bitmap or resync mode, or went into it since: some of those writes
  wait as dirty regions, not as frames; the flush waits for the resync that captures
  them again (a ``RESYNC_END`` numbered after the flush, acked).

A flush waits as long as that takes (the DRVA may be restarting: synchronous
replication semantics for flushed data), unless ``flush_timeout_s`` is set: then it fails
with EIO after it, and the client's file system sees a failed flush, not a false one.
A fenced domain (its DRVA says another site now owns it) fails flushes with EIO at once:
nothing written here can be protected any more. An isolated domain (a test failover's
copy) replicates nothing: its flushes sync the primary only.

TRIM is captured as a ``ZERO`` record like WRITE_ZEROES: its range reads back as zeros
at both sites, so the replica keeps equal to the primary byte for byte. A WRITE_ZEROES
with ``NO_HOLE`` is a ``ZERO`` record too, but its range on the primary is zeroed in
place, never deallocated (``PrimaryDisk.write_batch``'s ``no_hole``).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cdp.logs import get_logger
from cdp.nbd.backend import BlockSizes
from cdp.records import KIND_WRITE, KIND_ZERO, WRITE_LEN_MAX
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import FRAME_BYTES_MAX, DomainFilter, batch_records

log = get_logger("iofilter.nbd_capture")

#: Bytes of writes waiting to be captured, per domain; a writer beyond it waits (and its
#: connection stops reading: TCP pushes back on the client).
QUEUE_BYTES_MAX = 64 << 20
BATCH_RECORDS_MAX = 4096
BATCH_BYTES_MAX = 8 << 20
#: A WRITE is cut into records of at most this many bytes, so a frame stays near the
#: filter's frame size and a large write does not hold one frame of 32 MiB.
WRITE_RECORD_BYTES = FRAME_BYTES_MAX
#: Loop iterations a batch waits for more writes while the queue keeps growing.
GATHER_YIELDS_MAX = 8
#: Batches taken and being flagged while an older one is captured. One batch at a time
#: paid a dirty-map sync (a device flush, 4-12 ms on a shared disk) per batch with
#: nothing else moving: random 4 KiB writes at qd 32 ran at ~1,900 IOPS in batches of 19.
PIPELINE_BATCHES_MAX = 4
#: A flush waiting for the DRVA looks again at least this often (fenced, timed out).
DURABLE_RECHECK_S = 0.25
#: The block sizes every captured export advertises: records are 512-aligned.
CAPTURE_BLOCK_SIZES = BlockSizes(minimum=512, preferred=4096)


#: What a submitted write's submitter is told once it is captured (None) or failed.
WriteDone = Callable[[BaseException | None], None]


@dataclass(slots=True)
class _Write:
    disk: int
    offset: int
    length: int
    kind: int  # KIND_WRITE or KIND_ZERO
    data: bytes | memoryview | None  # KIND_WRITE only
    done: asyncio.Future[None] | None  # awaited by ``write``/``zero`` ...
    callback: WriteDone | None = None  # ... or called, for ``submit``
    no_hole: bool = False  # KIND_ZERO only: the primary keeps the range allocated (NBD's NO_HOLE)


@dataclass(slots=True)
class _Batch:
    """Writes taken together: their records and payload, and the task flagging their
    regions (None when the domain is isolated: it keeps no maps' promise)."""

    writes: list[_Write]
    records: np.ndarray
    payload: bytes | memoryview
    flagged: asyncio.Task[None] | None
    no_hole: np.ndarray | None = None  # per record, when any write of the batch has NO_HOLE


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What a flush must see durable: the filter's state when it arrived."""

    seq: int  # last seq captured
    normal: bool  # the filter was in normal mode
    bitmap_entries: int
    resyncs: int


class _GroupSync:
    """``fdatasync`` of one file for many callers: a caller returns after a sync that
    started after it called has finished, and callers that arrive during one sync share
    the next one."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._lock = asyncio.Lock()
        self.started = 0
        self.finished = 0

    async def __call__(self) -> None:
        ticket = self.started
        async with self._lock:
            if self.finished > ticket:  # one started after we called and is done
                return
            self.started += 1
            mine = self.started
            await asyncio.to_thread(self._sync)
            self.finished = mine


class DomainCapture:
    """Capture of one domain's NBD writes, in order, and their durability (module docstring)."""

    def __init__(self, filt: DomainFilter, disks: Sequence[PrimaryDisk], *, name: str, isolated: bool = False,
                 paused: Callable[[], bool] = lambda: False, queue_bytes_max: int = QUEUE_BYTES_MAX,
                 flush_timeout_s: float | None = None) -> None:
        self.filt = filt
        self.disks = list(disks)
        self.name = name
        self.isolated = isolated
        self.paused = paused
        self.queue_bytes_max = queue_bytes_max
        self.flush_timeout_s = flush_timeout_s
        self._intake_idle = True
        self.stats: collections.Counter[str] = collections.Counter()
        self._queue: collections.deque[_Write] = collections.deque()
        self._pipeline: collections.deque[_Batch] = collections.deque()  # taken, in order
        self._taken = asyncio.Event()  # the pipeline got a batch
        self._queued_bytes = 0
        self._room_waiters = 0
        self._work = asyncio.Event()
        self._room = asyncio.Event()
        self._acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._syncs = [_GroupSync(d.fsync) for d in self.disks]
        self._tasks: list[asyncio.Task[None]] = []
        filt.on_acked = self._on_acked

    @property
    def idle(self) -> bool:
        """No batch is being taken or captured (a pause has taken effect)."""
        return self._intake_idle and not self._pipeline

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._intake_loop(), name=f"nbd-intake-{self.name}"),
                       asyncio.create_task(self._capture_loop(), name=f"nbd-capture-{self.name}")]

    async def close(self) -> None:
        """Stop capturing; writes still queued or being flagged fail (their connections
        are closing)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        stopping = OSError(errno.ESHUTDOWN, f"domain {self.name}: the filter is stopping")
        while self._pipeline:
            b = self._pipeline.popleft()
            if b.flagged is not None:
                b.flagged.cancel()
                await asyncio.gather(b.flagged, return_exceptions=True)
            _fail(b.writes, stopping)
        _fail(self._queue, stopping)
        self._queue.clear()
        self._queued_bytes = 0

    def wake(self) -> None:
        """The pause state may have changed."""
        self._work.set()

    # ------------------------------------------------------------------ writes

    async def write(self, disk: int, offset: int, data: bytes | memoryview) -> None:
        await self._enqueue(_Write(disk, offset, len(data), KIND_WRITE, data,
                                   asyncio.get_running_loop().create_future()))

    async def zero(self, disk: int, offset: int, length: int, *, no_hole: bool = False) -> None:
        """Zeros on [offset, offset + length): a ZERO record; on the primary a hole, or with
        ``no_hole`` zeros in place."""
        await self._enqueue(_Write(disk, offset, length, KIND_ZERO, None, asyncio.get_running_loop().create_future(),
                                   no_hole=no_hole))

    def submit(self, disk: int, offset: int, data: bytes | memoryview, done: WriteDone) -> bool:
        """``write`` without a task or a future per write: queue it and return True, and
        ``done`` is called (on the loop, never from here) once it is captured or has failed;
        False, with nothing queued, when the queue has no room or writers wait for room
        (the caller then ``write``s, which waits its turn).

        Why: at 4 KiB and a queue depth of 32 the export was bound by its own Python per
        request, and a task, a future and the coroutines around them were a good part of it."""
        cost = len(data)
        if self._room_waiters or not self._has_room(cost):
            return False
        self._push(_Write(disk, offset, cost, KIND_WRITE, data, None, done), cost)
        return True

    async def _enqueue(self, w: _Write) -> None:
        cost = w.length if w.kind == KIND_WRITE else 0
        self._room_waiters += 1
        try:
            while not self._has_room(cost):
                self._room.clear()
                await self._room.wait()
        finally:
            self._room_waiters -= 1
        self._push(w, cost)
        assert w.done is not None
        await w.done  # a cancelled request leaves its write queued: it was sent, it may land

    def _has_room(self, cost: int) -> bool:
        """The queue takes ``cost`` more bytes (an empty queue takes any write)."""
        return not self._queued_bytes or self._queued_bytes + cost <= self.queue_bytes_max

    def _push(self, w: _Write, cost: int) -> None:
        self._queue.append(w)
        self._queued_bytes += cost
        self._work.set()

    async def _intake_loop(self) -> None:
        """Take batches, in order, and start flagging each (module docstring)."""
        while True:
            while not self._queue or self.paused() or len(self._pipeline) >= PIPELINE_BATCHES_MAX:
                self._intake_idle = True
                self._work.clear()
                await self._work.wait()
            self._intake_idle = False
            await self._gather_more()
            writes = self._take()
            disk, offset, length, kind = _records_of(writes)
            records = batch_records(disk, offset, length, kind)
            no_hole = _no_hole_of(writes) if any(w.no_hole for w in writes) else None
            datas = [w.data for w in writes if w.kind == KIND_WRITE]
            payload = datas[0] if len(datas) == 1 else b"".join(datas)  # type: ignore[arg-type]
            flagged = None
            if not self.isolated:
                flagged = asyncio.create_task(self.filt.flag_durably(records), name=f"nbd-flag-{self.name}")
            self._pipeline.append(_Batch(writes, records, payload, flagged, no_hole))
            self._taken.set()

    async def _capture_loop(self) -> None:
        """Capture the taken batches in the order they were taken, each once flagged."""
        while True:
            while not self._pipeline:
                self._taken.clear()
                await self._taken.wait()
            b = self._pipeline[0]
            try:
                if b.flagged is not None:
                    await b.flagged
                self._capture(b)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the writes fail with it; the domain goes on
                log.error("nbd_capture_failed", domain=self.name, writes=len(b.writes), error=str(exc))
                _fail(b.writes, exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc)))
            else:
                for w in b.writes:
                    _complete(w, None)
            self._pipeline.popleft()
            self._work.set()  # room in the pipeline; and a pause waits for it to empty

    async def _gather_more(self) -> None:
        """Let the writes that are already on their way in join the batch: yield to the
        loop while the queue still grows (each yield lets the connections parse what
        their sockets hold), at most ``GATHER_YIELDS_MAX`` times. Every batch costs a frame
        at the DRVA, a map check, a primary write call: fewer, larger batches are what
        a client's queue depth can buy (no timer: an idle queue is not waited on)."""
        seen = -1
        for _ in range(GATHER_YIELDS_MAX):
            if len(self._queue) == seen or self._queued_bytes >= BATCH_BYTES_MAX:
                return
            seen = len(self._queue)
            await asyncio.sleep(0)

    def _take(self) -> list[_Write]:
        """The oldest queued writes, up to a batch."""
        batch: list[_Write] = []
        records = nbytes = 0
        while self._queue:
            w = self._queue[0]
            pieces = -(-w.length // (WRITE_RECORD_BYTES if w.kind == KIND_WRITE else WRITE_LEN_MAX))
            cost = w.length if w.kind == KIND_WRITE else 0
            if batch and (records + pieces > BATCH_RECORDS_MAX or nbytes + cost > BATCH_BYTES_MAX):
                break
            batch.append(self._queue.popleft())
            records, nbytes = records + pieces, nbytes + cost
        self._queued_bytes -= nbytes
        self._room.set()
        return batch

    def _capture(self, b: _Batch) -> None:
        r = b.records
        if self.isolated:
            self.filt.write_only(r["disk"], r["offset"], r["length"], r["kind"], b.payload, b.no_hole)
        else:
            # A batch that fails once it may have reached the primary — its write, or
            # numbering and buffering after it, whatever the error — has its regions put
            # in the bitmap by the filter itself: a resync reads back what the disk holds.
            self.filt.capture_flagged(r, b.payload, b.no_hole)
        self.stats["writes"] += len(b.writes)
        self.stats["batches"] += 1

    # ------------------------------------------------------------------ durability

    def _on_acked(self) -> None:
        if not self._acked.done():
            self._acked.set_result(None)
        self._acked = asyncio.get_running_loop().create_future()

    def _snapshot(self) -> _Snapshot:
        f = self.filt
        return _Snapshot(f.next_seq - 1, f.mode == "normal", f.stats["bitmap_entries"], f.stats["resyncs_completed"])

    def _covered(self, snap: _Snapshot) -> bool:
        f = self.filt
        if snap.normal and f.stats["bitmap_entries"] == snap.bitmap_entries:
            return f.acked_seq >= snap.seq
        return (f.stats["resyncs_completed"] > snap.resyncs and f.mode == "normal"
                and f.acked_seq >= f.resync_end_seq)

    async def durable(self, disks: Sequence[int] | None = None) -> None:
        """Every write answered so far is durable on the primaries ``disks`` (default:
        all) and, unless isolated, in the DRVA's log."""
        snap = self._snapshot()
        started = time.monotonic()
        syncs = [self._syncs[d]() for d in (range(len(self.disks)) if disks is None else disks)]
        await asyncio.gather(*syncs, self._replicated(snap))
        self.stats["flushes"] += 1
        self.stats["flush_wait_ms"] += int((time.monotonic() - started) * 1000)

    async def _replicated(self, snap: _Snapshot) -> None:
        if self.isolated:
            return
        deadline = None if self.flush_timeout_s is None else time.monotonic() + self.flush_timeout_s
        while not self._covered(snap):
            if self.filt.fenced:
                raise OSError(errno.EIO, f"domain {self.name} is fenced: another site owns it; "
                                         f"writes here are not protected")
            wait = DURABLE_RECHECK_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    self.stats["flush_timeouts"] += 1
                    raise OSError(errno.EIO, f"domain {self.name}: writes not durable at the DRVA within "
                                             f"{self.flush_timeout_s:g} s (acked seq {self.filt.acked_seq}, "
                                             f"mode {self.filt.mode})")
            try:
                async with asyncio.timeout(wait):
                    await asyncio.shield(self._acked)
            except TimeoutError:
                pass


def _fail(writes: Iterable[_Write], exc: BaseException) -> None:
    for w in writes:
        _complete(w, exc)


def _complete(w: _Write, exc: BaseException | None) -> None:
    """Tell the write's submitter how it ended, once."""
    if w.callback is not None:
        callback, w.callback = w.callback, None
        try:
            callback(exc)
        except Exception:  # a bug of the caller's: the capture goes on
            log.error("nbd_write_callback_failed", exc_info=True)
    elif w.done is not None and not w.done.done():
        if exc is None:
            w.done.set_result(None)
        else:
            w.done.set_exception(exc)


def _pieces(w: _Write) -> int:
    """Records a write is cut into (``_records_of``)."""
    return -(-w.length // (WRITE_RECORD_BYTES if w.kind == KIND_WRITE else WRITE_LEN_MAX))


def _no_hole_of(batch: list[_Write]) -> np.ndarray:
    """Per record of ``_records_of(batch)``: its write's ``no_hole``."""
    return np.repeat(np.array([w.no_hole for w in batch], dtype=bool), [_pieces(w) for w in batch])


def _records_of(batch: list[_Write]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The batch as record columns: writes cut into WRITE_RECORD_BYTES pieces, zeroes
    into WRITE_LEN_MAX pieces (a record's limit), in order."""
    disks: list[int] = []
    offsets: list[int] = []
    lengths: list[int] = []
    kinds: list[int] = []
    for w in batch:
        piece = WRITE_RECORD_BYTES if w.kind == KIND_WRITE else WRITE_LEN_MAX
        for at in range(w.offset, w.offset + w.length, piece):
            disks.append(w.disk)
            offsets.append(at)
            lengths.append(min(piece, w.offset + w.length - at))
            kinds.append(w.kind)
    return (np.array(disks, dtype=np.uint32), np.array(offsets, dtype=np.uint64),
            np.array(lengths, dtype=np.uint32), np.array(kinds, dtype=np.uint8))


class CapturedDisk:
    """One primary disk of a domain as an NBD export (``NbdBackend``): reads from the
    disk, writes through the domain's ``DomainCapture``."""

    multi_conn_safe = True  # a flush covers the whole domain's writes, on every connection
    read_only = False
    block_sizes = CAPTURE_BLOCK_SIZES

    def __init__(self, capture: DomainCapture, index: int) -> None:
        self.capture = capture
        self.index = index
        self.disk = capture.disks[index]
        self.size = self.disk.size

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.disk.read, offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self.capture.write(self.index, offset, data)
        if fua:
            await self.capture.durable([self.index])

    def submit_write(self, offset: int, data: bytes | memoryview, done: WriteDone) -> bool:
        """A write without FUA, answered through ``done`` (``DomainCapture.submit``)."""
        return self.capture.submit(self.index, offset, data, done)

    async def flush(self) -> None:
        await self.capture.durable([self.index])

    async def trim(self, offset: int, length: int) -> None:
        await self.capture.zero(self.index, offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        await self.capture.zero(self.index, offset, length, no_hole=not may_trim)
        if fua:
            await self.capture.durable([self.index])
