"""Group commit: frames from every session become durable together, then get acked.

Sessions stage validated frames: ``wait_room`` until there is room, then ``stage``, with
no await between the session's last check and ``stage`` (a resend on a new session
must not stage the seqs an older one staged meanwhile). A single task takes everything
staged that fits in the log (``_batch``: a domain's frames in seq order, none held behind
another domain's that the log cannot take), appends it with one ``append_batch``
(``pwritev`` + one ``fdatasync``, in a worker thread so the event loop keeps receiving),
then registers the entries with their domains and wakes the sessions to ack. One commit is in flight at a
time: frames that arrive meanwhile form the next group, which is what makes acks cheap
under load.

Bounds: frames received and not staged yet (``FrameBudget``: taken from a ``FRAME``'s
header before its body is read), staged bytes (``staging_bytes_max``; ``wait_room`` waits for room), log usage
(above ``high_water`` until it drops below ``low_water``, frames of the stores that hold
the log up wait — back-pressure that the filters feel as a slow socket and see as a flag
in their domains' ``ACK``s: ``held_back``), and the largest frame (``frame_len_max``:
one the log can always take, refused above).

Timestamps are bounded here too (``ts_ceiling``): a record is never staged stamped later
than this host's clock plus ``TS_AHEAD_MAX_S`` (the session stamps it there), so that one
record from a filter whose clock jumped to the year 2554 cannot make every later write of
its domain unreachable by time.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from cdp.frame import Frame
from cdp.locks import SKEW_DEFAULT_S
from cdp.logfmt import BLOCK, ENTRY_HEADER_SIZE, entry_stride
from cdp.logs import get_logger
from cdp.records import KIND_MARK, KIND_RESYNC_BEGIN
from cdp.replog import ReplicationLog
from drva.domain import DomainState, LogEntry

log = get_logger("drva.committer")

# How far ahead of this host's clock a record may be stamped (FORMAT.md §9.2); later ones
# are stamped at that bound. Well above the clock skew between hosts that store locks and
# `cdp preflight system` tolerate (SKEW_DEFAULT_S, 30 s), so that no filter on a host whose
# clock is merely skewed is rewritten; far below what a glitch does (one record stamped
# 2**64 - 1 ns put every later write of its domain past any time `--at` can name).
TS_AHEAD_MAX_S = 300.0
assert TS_AHEAD_MAX_S > SKEW_DEFAULT_S
TS_AHEAD_MAX_NS = int(TS_AHEAD_MAX_S * 1e9)
# A session waiting for room re-checks at least this often: a lane's share of the log
# also shrinks when the store commits its segments, and a commit the trim cannot follow
# (the log's oldest entry is another store's) wakes no one.
ROOM_RECHECK_S = 0.5


class FrameBudget:
    """Bytes of ``FRAME`` bodies received, or being received, and not staged yet — of the
    domains of one store lane (``drva.lanes``) — at most ``bytes_max`` (FORMAT.md §9.2).

    A session takes a frame's share from its header, before it reads the body, and gives
    it back once the frame is staged (the staging bound counts it from there), dropped or
    refused, or its session ended however it ended. A session whose share does not fit
    waits, and reads nothing meanwhile: its filter feels back-pressure on its socket, as
    for a full log. Without it each session held its frame while it waited for room (for
    as long as a store outage lasted): 40 domains of 64 MiB frames, 2.8 GB.

    First come, first served, and nothing overtakes a waiter (no barging): a frame larger
    than what is left waits at the head until the frames before it are given back; one
    larger than ``bytes_max`` then goes alone. So every frame gets through, a domain's
    big frames do not starve another's small ones (nor the reverse), and a frame waits
    at most for one frame of each session ahead of it: a session holds or waits with one
    frame at a time. Per lane, so that the frames of a store that holds the log up (they
    wait for room for the outage) never hold the budget the other stores' domains need.

    Changed on the loop only; ``give`` and ``leave`` are synchronous, so that a session
    cancelled or closed returns its share without awaiting anything."""

    def __init__(self, bytes_max: int) -> None:
        self.bytes_max = bytes_max
        self.held = 0  # bytes granted and not given back
        self._queue: collections.deque[tuple[int, object, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Sessions waiting for a share."""
        return sum(1 for _, _, fut in self._queue if not fut.done())

    @property
    def waiting_bytes(self) -> int:
        """The shares the waiting sessions wait for, in bytes (the status reports it: a
        budget held up by one frame larger than what is left shows here)."""
        return sum(nbytes for nbytes, _, fut in self._queue if not fut.done())

    def _fits(self, nbytes: int) -> bool:
        return self.held == 0 or self.held + nbytes <= self.bytes_max

    async def take(self, nbytes: int, owner: object) -> bool:
        """True once ``nbytes`` are ``owner``'s (give them back with ``give``); False if
        ``owner`` left meanwhile (``leave``: its session closed), nothing taken."""
        if not self._queue and self._fits(nbytes):
            self.held += nbytes
            return True
        fut = asyncio.get_running_loop().create_future()
        entry = (nbytes, owner, fut)
        self._queue.append(entry)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.result():
                self.give(nbytes)  # granted as it was cancelled
            else:
                self._drop(entry)
            raise

    def give(self, nbytes: int) -> None:
        self.held -= nbytes
        assert self.held >= 0, self.held
        self._grant()

    def leave(self, owner: object) -> None:
        """``owner`` stops waiting (its ``take`` returns False)."""
        for entry in [e for e in self._queue if e[1] is owner]:
            if not entry[2].done():
                entry[2].set_result(False)
            self._drop(entry)

    def _drop(self, entry: tuple[int, object, asyncio.Future]) -> None:
        try:
            self._queue.remove(entry)
        except ValueError:
            pass
        self._grant()  # it may have been the head, holding smaller ones back

    def _grant(self) -> None:
        while self._queue:
            nbytes, _, fut = self._queue[0]
            if fut.done():
                self._queue.popleft()
                continue
            if not self._fits(nbytes):
                return
            self._queue.popleft()
            self.held += nbytes
            fut.set_result(True)


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
        # Domains (ids) whose next staged frame the log could not take at the last group
        # commit (``_batch``; cleared by a trim): their lanes wait (``held_back``).
        self._blocked: set[int] = set()
        self.clock_ns: Callable[[], int] = time.time_ns  # this host's clock (tests inject one)
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
        """True while the log is above high water (until it drops below low water): the
        frames of the stores that hold it up wait (``held_back``)."""
        u = self.usage()
        if u >= self.high_water:
            self._holding = True
        elif u <= self.low_water:
            self._holding = False
        return self._holding

    def held_back(self, lanes: Sequence[Collection[DomainState]]) -> list[bool]:
        """For each of ``lanes`` (the DRVA's domains grouped by the store they ship to,
        ``drva.lanes``, in order): True while frames of its domains must wait for room.

        Only above high water (``backpressure``). Then a lane's share of the log is
        ``high_water`` of it in proportion to the lane's domains, and the lanes whose
        domains hold more than their share (``DomainState.log_bytes``: logged and not
        committed, or staged) wait, when any does: a store that is down holds back only
        its own domains, and the others are logged in the room above high water. When
        none is over its share (one store; or entries committed behind a stuck one, that
        the trim cannot pass) every lane waits until the log is below low water. And a
        lane waits while a frame of one of its domains is staged that the log cannot
        take (``_blocked``): nothing more of it is staged that only a trim could log.

        The others go on only while the log has room: its trim cannot pass the oldest
        entry a stuck store still needs, so the entries logged after it — committed or
        not — stay in the log until that store is back."""
        if not self.backpressure:
            return [False] * len(lanes)
        total = sum(len(group) for group in lanes)
        high = self.high_water * self.log.data_size
        held = []
        for group in lanes:
            over = len(group) > 0 and sum(d.log_bytes() for d in group) >= high * len(group) / total
            held.append(over or any(d.id in self._blocked for d in group))
        if any(held):
            return held
        return [True] * len(lanes)

    def ts_ceiling(self, domain: DomainState) -> int:
        """The latest timestamp a record of ``domain`` may be staged with now: this host's
        clock plus ``TS_AHEAD_MAX_NS`` — or the domain's newest accepted timestamp, if that
        is later (timestamps never go back along seqs; this host's clock stepped back, or
        a log older than this bound holds one)."""
        return max(self.clock_ns() + TS_AHEAD_MAX_NS, domain.accepted_ts)

    def poke(self) -> None:
        """Something changed (a trim freed space): re-check waiting sessions."""
        self._blocked.clear()
        self._changed.set()

    def wake(self) -> None:
        """Wake every waiting session to re-check (one closed: its frame is dropped)."""
        self._changed.set()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    # ------------------------------------------------------------------ the two sides

    async def wait_room(self, nbytes: int, held_back: Callable[[], bool] | None = None,
                        gone: Callable[[], bool] | None = None) -> bool:
        """True once a frame of ``nbytes`` may be staged: not ``held_back()`` and staging
        has room (or is empty); the caller stages with no await in between. False as
        soon as ``gone()`` (the session closed, or lost the domain): the caller drops
        the frame at once rather than hold it for room it will never use."""
        while gone is None or not gone():
            if not (held_back is not None and held_back()) and not (
                    self._staged and self._staged_bytes + nbytes > self.staging_bytes_max):
                return True
            try:
                async with asyncio.timeout(ROOM_RECHECK_S):
                    await self._wait_change()
            except TimeoutError:
                pass
        return False

    def stage(self, domain: DomainState, raw: bytes, frame: Frame) -> None:
        """Stage a validated frame that continues ``domain.accepted_seq``, its timestamps
        not before ``domain.accepted_ts`` nor (but for that) after ``ts_ceiling``."""
        assert frame.first_seq == domain.accepted_seq + 1, (domain.id, frame.first_seq, domain.accepted_seq)
        if domain.accepted_seq == domain.durable_seq:  # its first staged frame (rpo_lag_s)
            domain.staged_first = (frame.first_seq, int(frame.records["timestamp_ns"][0]), time.monotonic())
        self._staged.append(_Staged(domain, raw, frame))
        self._staged_bytes += len(raw)
        domain.staged_bytes += entry_stride(len(raw))
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
        batch = self._batch()
        if not batch:
            await self._wait_change()  # the log is full: wait for a trim
            return 0
        if batch[-1] is self._staged[len(batch) - 1]:  # a prefix: nearly always
            self._staged = self._staged[len(batch):]
        else:
            taken = {id(s) for s in batch}
            self._staged = [s for s in self._staged if id(s) not in taken]
        self._staged_bytes -= sum(len(s.raw) for s in batch)
        for s in batch:
            s.domain.staged_bytes -= entry_stride(len(s.raw))
        t0 = time.perf_counter()
        positions, tail = await asyncio.to_thread(self._append, [s.raw for s in batch])
        self.commit_latency_s = time.perf_counter() - t0
        self.commits += 1
        now = time.monotonic()
        touched: set[DomainState] = set()
        for s, pos in zip(batch, positions):
            entry = log_entry(s.frame, len(s.raw), pos, now)
            # Cached before the domain takes it: its unsealed queue keeps what the entry
            # holds as it goes in (a row past the first entries: drva.entry_queue). A
            # stopped domain's frames are never sealed here: they take none of the budget.
            cached = not s.domain.fenced and self.cache_bytes + entry.nbytes <= self.cache_bytes_max
            if cached:
                entry.frame = s.frame
            if not s.domain.add_durable(entry):
                # Staging keeps a domain's frames in seq order (``stage``): only a change
                # of timeline under a session (``Shipper._adopt``) gets here. Not acked.
                log.error("log_entry_out_of_order", domain=s.domain.id, first_seq=entry.first_seq,
                          last_seq=entry.last_seq, durable_seq=s.domain.durable_seq, pos=pos)
                continue
            if cached:
                self.cache_bytes += entry.nbytes
            touched.add(s.domain)
        self.durable_end = tail
        self._changed.set()
        self.on_durable(touched)
        return len(batch)

    def _batch(self) -> list[_Staged]:
        """The staged frames the log takes now, in staging order: as many as fit of them
        — or, when the first does not fit (the log is full, its trim held behind a store
        that is down), those of the other domains that do. A domain's frames keep their
        seq order (all of a domain whose next frame does not fit wait: ``_blocked``), but
        the frames of a domain that cannot be logged hold no other domain's back."""
        candidates = self._staged
        take = self.log.fits([len(s.raw) for s in candidates])
        self._blocked = set()
        while not take and candidates:
            self._blocked.add(candidates[0].domain.id)
            candidates = [s for s in candidates if s.domain.id not in self._blocked]
            take = self.log.fits([len(s.raw) for s in candidates])
        return candidates[:take]

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
