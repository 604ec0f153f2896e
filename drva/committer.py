"""Group commit: frames from every session become durable together, then get acked.

Sessions stage validated frames: ``wait_room`` until there is room, then ``stage``, with
no await between the session's last check and ``stage`` (a resend on a new session
must not stage the seqs an older one staged meanwhile). A single task takes everything
staged that fits in the log, appends it with one ``append_batch`` (``pwritev`` + one
``fdatasync``, in a worker thread so the event loop keeps receiving), then registers the
entries with their domains and wakes the sessions to ack. One commit is in flight at a
time: frames that arrive meanwhile form the next group, which is what makes acks cheap
under load.

Bounds: staged bytes (``staging_bytes_max``; ``wait_room`` waits for room), log usage
(above ``high_water`` sessions wait until it drops below ``low_water`` — back-pressure
that the filters feel as a slow socket and see as a flag in every ``ACK``), and the
largest frame (``frame_len_max``: one the log can always take, refused above).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cdp.frame import Frame
from cdp.logfmt import BLOCK, ENTRY_HEADER_SIZE
from cdp.logs import get_logger
from cdp.records import KIND_MARK, KIND_RESYNC_BEGIN
from cdp.replog import ReplicationLog
from drva.domain import DomainState, LogEntry

log = get_logger("drva.committer")


@dataclass(slots=True)
class _Staged:
    domain: DomainState
    raw: bytes
    frame: Frame


class GroupCommitter:
    """Owns all appends to the replication log (invariant: one append at a time)."""

    def __init__(self, log: ReplicationLog, *, staging_bytes_max: int, high_water: float,
                 low_water: float, on_durable: Callable[[set[DomainState]], None],
                 cache_bytes_max: int = 0) -> None:
        self.log = log
        self.staging_bytes_max = staging_bytes_max
        self.high_water = high_water
        self.low_water = low_water
        self.on_durable = on_durable
        self._staged: list[_Staged] = []
        self._staged_bytes = 0
        self._changed = asyncio.Event()  # staged something, committed, or trimmed
        self._holding = False
        self.commits = 0
        self.commit_latency_s = 0.0
        self.durable_end = log.tail  # log end of the last registered entry
        # Frames kept in memory for the sealer (bounded; the log has them all anyway).
        self.cache_bytes_max = cache_bytes_max
        self.cache_bytes = 0

    # ------------------------------------------------------------------ bounds

    @property
    def frame_len_max(self) -> int:
        """The largest frame this log can always take: one whose entry fills at most half
        its data area. An entry never crosses the ring's end (FORMAT.md §3.3): with the
        log empty at ring offset x, an entry of stride s fits only if s <= data_size - x
        or, after a PAD to the end, s <= x; s <= data_size / 2 always does. A larger
        frame could wait forever for a trim that cannot make room — and every frame
        staged behind it with it — so it is refused before it is staged."""
        half = self.log.data_size // 2 // BLOCK * BLOCK
        return half - ENTRY_HEADER_SIZE

    def usage(self) -> float:
        st = self.log.stats()
        return st.used_bytes / st.data_size

    @property
    def backpressure(self) -> bool:
        """True while sessions are held back (log above high water, until below low)."""
        u = self.usage()
        if u >= self.high_water:
            self._holding = True
        elif u <= self.low_water:
            self._holding = False
        return self._holding

    def poke(self) -> None:
        """Something changed (a trim freed space): re-check waiting sessions."""
        self._changed.set()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    # ------------------------------------------------------------------ the two sides

    async def wait_room(self, nbytes: int) -> None:
        """Return once a frame of ``nbytes`` may be staged: the log is not held back and
        staging has room (or is empty). The caller stages with no await in between."""
        while self.backpressure or (
            self._staged and self._staged_bytes + nbytes > self.staging_bytes_max
        ):
            await self._wait_change()

    def stage(self, domain: DomainState, raw: bytes, frame: Frame) -> None:
        """Stage a validated frame that continues ``domain.accepted_seq``."""
        assert frame.first_seq == domain.accepted_seq + 1, (domain.id, frame.first_seq, domain.accepted_seq)
        if domain.accepted_seq == domain.durable_seq:  # its first staged frame (rpo_lag_s)
            domain.staged_first = (frame.first_seq, int(frame.records["timestamp_ns"][0]), time.monotonic())
        self._staged.append(_Staged(domain, raw, frame))
        self._staged_bytes += len(raw)
        domain.accepted_seq = frame.last_seq
        domain.accepted_ts = int(frame.records["timestamp_ns"][-1])
        self._changed.set()

    async def run(self) -> None:
        """Commit staged frames forever (cancel to stop)."""
        while True:
            while not self._staged:
                await self._wait_change()
            await self.step()

    async def step(self) -> int:
        """One group commit of what is staged and fits; returns the frames committed."""
        take = self.log.fits([len(s.raw) for s in self._staged])
        if take == 0:
            await self._wait_change()  # the log is full: wait for a trim
            return 0
        batch, self._staged = self._staged[:take], self._staged[take:]
        self._staged_bytes -= sum(len(s.raw) for s in batch)
        t0 = time.perf_counter()
        positions, tail = await asyncio.to_thread(self._append, [s.raw for s in batch])
        self.commit_latency_s = time.perf_counter() - t0
        self.commits += 1
        now = time.monotonic()
        touched: set[DomainState] = set()
        for s, pos in zip(batch, positions):
            entry = log_entry(s.frame, len(s.raw), pos, now)
            if not s.domain.add_durable(entry):
                # Staging keeps a domain's frames in seq order (``stage``): only a change
                # of timeline under a session (``Shipper._adopt``) gets here. Not acked.
                log.error("log_entry_out_of_order", domain=s.domain.id, first_seq=entry.first_seq,
                          last_seq=entry.last_seq, durable_seq=s.domain.durable_seq, pos=pos)
                continue
            if self.cache_bytes + entry.nbytes <= self.cache_bytes_max:
                entry.frame = s.frame
                self.cache_bytes += entry.nbytes
            touched.add(s.domain)
        self.durable_end = tail
        self._changed.set()
        self.on_durable(touched)
        return len(batch)

    def uncache(self, entries: list[LogEntry]) -> None:
        """The sealer is done with these entries' frames: free their cache budget."""
        for e in entries:
            if e.frame is not None:
                e.frame = None
                self.cache_bytes -= e.nbytes

    def _append(self, bodies: list[bytes]) -> tuple[list[int], int]:
        positions = self.log.append_batch([[b] for b in bodies])
        return positions, self.log.tail


def log_entry(frame: Frame, nbytes: int, pos: int, now: float) -> LogEntry:
    """What a domain keeps about a durable frame: seqs, times, marks, resync bounds."""
    rec = frame.records
    ts = rec["timestamp_ns"]
    marks: list[tuple[int, str, int]] = []
    resync: list[tuple[int, int]] = []
    special = np.flatnonzero(rec["kind"] >= KIND_MARK)
    if len(special):  # rare: marks and resync boundaries
        names = dict(frame.mark_names())
        for i in special:
            kind, seq = int(rec["kind"][i]), int(rec["seq"][i])
            if kind == KIND_MARK:
                marks.append((seq, names[seq], int(ts[i])))
            elif kind >= KIND_RESYNC_BEGIN:
                resync.append((kind, seq))
    return LogEntry(pos, frame.first_seq, frame.last_seq, nbytes,
                    int(ts[0]), int(ts[-1]), now, marks, resync)
