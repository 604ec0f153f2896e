"""Group commit: frames from every session become durable together, then get acked.

Sessions ``submit`` validated frames; a single task takes everything staged that fits
in the log, appends it with one ``append_batch`` (``pwritev`` + one ``fdatasync``, in a
worker thread so the event loop keeps receiving), then registers the entries with their
domains and wakes the sessions to ack. One commit is in flight at a time: frames that
arrive meanwhile form the next group, which is what makes acks cheap under load.

Bounds: staged bytes (``staging_bytes_max``; ``submit`` waits for room) and log usage
(above ``high_water`` sessions wait until it drops below ``low_water`` — back-pressure
that the filters feel as a slow socket and see as a flag in every ``ACK``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cdp.frame import Frame
from cdp.records import KIND_MARK, KIND_RESYNC_BEGIN
from cdp.replog import ReplicationLog
from drva.domain import DomainState, LogEntry


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

    # ------------------------------------------------------------------ back-pressure

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

    async def submit(self, domain: DomainState, raw: bytes, frame: Frame) -> None:
        """Stage a validated frame; waits while staging is full or the log is held."""
        while self.backpressure or (
            self._staged and self._staged_bytes + len(raw) > self.staging_bytes_max
        ):
            await self._wait_change()
        if domain.accepted_seq == domain.durable_seq:  # its first staged frame (rpo_lag_s)
            domain.staged_first = (frame.first_seq, int(frame.records["timestamp_ns"][0]), time.monotonic())
        self._staged.append(_Staged(domain, raw, frame))
        self._staged_bytes += len(raw)
        domain.accepted_seq = frame.last_seq
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
            if self.cache_bytes + entry.nbytes <= self.cache_bytes_max:
                entry.frame = s.frame
                self.cache_bytes += entry.nbytes
            s.domain.unsealed.append(entry)
            s.domain.durable_seq = s.frame.last_seq
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
