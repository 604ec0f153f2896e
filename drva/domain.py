"""Per-domain state of a DRVA: where each seq of the domain is on its way to the store.

Seqs of one domain move through four marks, never backwards:

    accepted_seq  >=  durable_seq  >=  sealed_seq  >=  committed_seq
    (staged for a     (in the log,     (in a segment   (named by a catalog
     group commit)     acked)           being uploaded)  generation in the store)

``unsealed`` holds the log entries in (sealed_seq, durable_seq] (an ``EntryQueue``: a
store that is down piles them up, so they cost 64 bytes each beyond the first few
thousand), ``inflight`` the segment jobs in (committed_seq, sealed_seq] (a few: the
uploaders' queue bounds them), both in seq order. The log may be trimmed only before the
first entry of either (``first_needed_pos``). ``log_bytes`` is what the domain holds of
the log meanwhile (its share decides back-pressure: ``drva.committer``).

Timestamps never go backwards along a domain's seqs (FORMAT.md §1): ``accepted_ts`` is
the timestamp of the record at ``accepted_seq``, and a frame stamped earlier is raised to
it before it is staged (``drva.session``). ``unsealed`` keeps the same rule for what a
log holds from before that rule (``add_durable``, ``raise_ts_floor``): such an entry gets
a ``ts_floor`` that the sealer applies (``entry_frame``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdp.frame import Frame
from drva.config import DomainConfig
from drva.entry_queue import EntryQueue

#: The filter's clock offset is the largest of its last this many readings (FILTER_STATE
#: ``now_ns``, one a second): a reading that waited in the stream (behind frames, or while
#: back-pressure stopped reading) makes the filter look behind by the wait, never ahead,
#: so the least delayed one is the nearest to the truth (``filter_clock_offset_ns``).
FILTER_CLOCK_SAMPLES = 60
#: What a FILTER_STATE says of one moment only, dropped when its session ends
#: (``filter_session_ended``); the rest stays true of the filter until it reports again.
FILTER_MOMENT_FIELDS = ("oldest_unacked_age_ms", "buffered_bytes")


@dataclass(slots=True)
class LogEntry:
    """One frame durable in the log (positions are log positions)."""

    pos: int
    first_seq: int
    last_seq: int
    nbytes: int
    first_ts: int
    last_ts: int
    arrived: float  # monotonic time it became durable
    marks: list[tuple[int, str, int]]  # (seq, name, ts)
    resync: list[tuple[int, int]]  # (kind, seq) of RESYNC_BEGIN/END records
    # The decoded frame while it is cached in memory (within the DRVA's budget), so the
    # sealer need not read it back from the log; None once evicted or after a restart.
    frame: Any = None
    # Timestamps below this are raised to it when sealed (0: none are): an entry logged
    # before this DRVA kept a domain's timestamps from going backwards.
    ts_floor: int = 0

    def raise_ts(self, floor: int) -> None:
        """Raise this entry's timestamps to at least ``floor`` (see ``ts_floor``)."""
        if self.first_ts >= floor:
            return
        self.ts_floor = floor
        self.first_ts = floor
        self.last_ts = max(self.last_ts, floor)
        self.marks = [(seq, name, max(ts, floor)) for seq, name, ts in self.marks]


def frame_from(frame: Frame, seq: int) -> Frame:
    """The records of ``frame`` from ``seq`` on, as views into it (no copy). Not
    re-encoded: its header's ``body_xxh3`` does not cover it, so it is never written
    anywhere as a frame — it is for what reads records (``log_entry``, the segment builder)."""
    skip = seq - frame.first_seq
    if skip == 0:
        return frame
    at = int(frame.payload_starts()[skip])
    records, payload = frame.records[skip:], frame.payload[at:]
    header = dataclasses.replace(frame.header, record_count=len(records), first_seq=seq, payload_len=len(payload))
    return Frame(header, records, payload)


def entry_frame(entry: LogEntry, frame: Frame) -> Frame:
    """The records of ``frame`` (the log's, or the cache's) that ``entry`` stands for,
    for the segment builder: from ``entry.first_seq`` on (a frame logged twice, in part,
    by a DRVA that did not refuse such resends yet), timestamps raised to
    ``entry.ts_floor``. Nearly always ``frame`` itself."""
    frame = frame_from(frame, entry.first_seq)
    if not entry.ts_floor:
        return frame
    records = np.array(frame.records)
    np.maximum(records["timestamp_ns"], np.uint64(entry.ts_floor), out=records["timestamp_ns"])
    return Frame(frame.header, records, frame.payload)


@dataclass(slots=True)
class SegmentJob:
    """A sealed segment on its way: uploaded, then named by a catalog generation."""

    domain: int
    key: str
    data: bytes
    entries: list[LogEntry]
    payload_raw_len: int
    size: int
    strides: int = 0  # log bytes its entries take (entry_stride of each: DomainState.log_bytes)
    uploaded: bool = False
    upload_attempts: int = 0

    @property
    def first_seq(self) -> int:
        return self.entries[0].first_seq

    @property
    def last_seq(self) -> int:
        return self.entries[-1].last_seq


@dataclass
class DomainStats:
    frames_received: int = 0
    bytes_received: int = 0
    duplicates_dropped: int = 0
    frames_refused: int = 0
    segments_uploaded: int = 0
    bytes_uploaded: int = 0
    upload_errors: int = 0
    catalog_errors: int = 0
    upload_latency_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))
    last_error: str | None = None
    timestamps_raised: int = 0  # records stamped before the domain's newest earlier one (session)
    timestamps_clamped: int = 0  # records stamped too far ahead of the DRVA's clock (session)
    log_entries_skipped: int = 0  # log entries whose seqs an earlier entry held (recovery)


class DomainState:
    """Everything a DRVA knows about one protection domain (see the module docstring)."""

    def __init__(self, cfg: DomainConfig) -> None:
        self.cfg = cfg
        # Disk sizes by index: the bounds of every WRITE and ZERO record (drva.session).
        self.disk_sizes = np.array([d.size for d in cfg.disks], dtype=np.uint64)
        self.accepted_seq = 0
        self.accepted_ts = 0  # timestamp of the record at accepted_seq (0: not known)
        self.durable_seq = 0
        self.sealed_seq = 0
        self.committed_seq = 0
        self.committed_ts = 0
        self.newest_received_ts = 0
        # Monotonic time of the last timestamps_raised and timestamps_clamped log line (drva.session).
        self.ts_logged = {"raised": -float("inf"), "clamped": -float("inf")}
        # Log bytes (entry strides) of frames staged for a group commit (``GroupCommitter``).
        self.staged_bytes = 0
        # (seq, timestamp, monotonic time) of the first frame staged for a group commit
        # while none of the domain's was: the oldest write not in the store when every
        # durable one is (``rpo_lag_s``).
        self.staged_first: tuple[int, int, float] | None = None
        self.unsealed = EntryQueue()
        self.inflight: collections.deque[SegmentJob] = collections.deque()
        # Set once the domain's catalog is open or the domain is fenced, whichever comes
        # first (both are for good: neither goes back to False): what waits for the
        # catalog (the seeder) waits on it, rather than polling.
        self.catalog_settled = asyncio.Event()
        self._catalog_ready = False
        self._fenced = False
        # The metadata repository holds a commit of this domain: its durable seq is known
        # here before the store's catalog is open (see Session._handshake).
        self.catalog_known = False
        # The timeline this DRVA last committed the domain on (its metadata repository);
        # 0: never. A different current timeline of this site's means a failback.
        self.meta_timeline = 0
        self.stats = DomainStats()
        self.session: Any = None  # the filter session streaming this domain, if any
        self.filter_state: dict[str, Any] = {}  # the filter's last FILTER_STATE
        # Its clock minus this host's, per FILTER_STATE of the current filter (newest last).
        self.filter_clock_offsets: collections.deque[int] = collections.deque(maxlen=FILTER_CLOCK_SAMPLES)
        self.filter_clock_skewed = False  # its offset was last logged as past the lock skew (drva.session)

    @property
    def id(self) -> int:
        return self.cfg.id

    @property
    def catalog_ready(self) -> bool:
        """The domain's catalog is open on this DRVA (``Shipper.open_catalog``)."""
        return self._catalog_ready

    @catalog_ready.setter
    def catalog_ready(self, value: bool) -> None:
        self._catalog_ready = value
        if value:
            self.catalog_settled.set()

    @property
    def fenced(self) -> bool:
        """Stopped on this DRVA until it restarts (``stop``; another owner, a catalog it
        cannot use): its catalog will not open here."""
        return self._fenced

    @fenced.setter
    def fenced(self, value: bool) -> None:
        self._fenced = value
        if value:
            self.catalog_settled.set()

    def stop(self, reason: str) -> None:
        """Stop the domain on this DRVA until it restarts (the caller logs why): its
        filter is refused (``ERROR fenced``, with ``reason``), nothing of it is shipped,
        and its log entries hold no log space back (``Shipper.trim``)."""
        self.fenced = True
        self.stats.last_error = reason

    def add_durable(self, entry: LogEntry) -> bool:
        """Append a durable log entry to ``unsealed`` if it continues ``durable_seq`` (the
        caller cut what overlapped), its timestamps raised to the last entry's; False
        (nothing changed) if it does not: a segment must hold every seq once, in order."""
        if entry.first_seq != self.durable_seq + 1:
            return False
        if self.unsealed:
            entry.raise_ts(self.unsealed.last_ts)
        self.unsealed.append(entry)
        self.durable_seq = entry.last_seq
        return True

    def log_bytes(self) -> int:
        """Bytes of the log this domain holds: its entries not committed yet (their
        strides, as the log counts them) and its frames staged for a group commit. A
        stopped domain holds none (its entries hold no log space back)."""
        if self.fenced:
            return 0
        return self.unsealed.strides + sum(job.strides for job in self.inflight) + self.staged_bytes

    def raise_ts_floor(self, floor: int) -> None:
        """Nothing after a timestamp of ``floor`` (the catalog's newest, when it opens)
        may be stamped earlier: raise the unsealed entries that are, and ``accepted_ts``."""
        self.accepted_ts = max(self.accepted_ts, self.unsealed.raise_ts(floor))

    def first_needed_pos(self) -> int | None:
        """Log position of the oldest entry not yet committed to the store, if any."""
        if self.inflight:
            return self.inflight[0].entries[0].pos
        if self.unsealed:
            return self.unsealed[0].pos
        return None

    def unsealed_bytes(self) -> int:
        return self.unsealed.nbytes

    def pending_bytes(self) -> int:
        return self.unsealed_bytes() + sum(sum(e.nbytes for e in j.entries) for j in self.inflight)

    def oldest_pending(self) -> LogEntry | None:
        """The oldest log entry not yet in the store, if any."""
        if self.inflight:
            return self.inflight[0].entries[0]
        if self.unsealed:
            return self.unsealed[0]
        return None

    def newest_seq_ts(self) -> tuple[int, int]:
        """(seq, ts) of the newest write captured: by the filter, or received here."""
        fs = self.filter_state
        seq, ts = self.accepted_seq, self.newest_received_ts
        if isinstance(fs.get("captured_seq"), int) and fs["captured_seq"] > seq:
            seq, ts = fs["captured_seq"], max(ts, fs.get("captured_ts") or 0)
        return seq, ts

    def rpo_lag_s(self, now: float | None = None) -> float:
        """How far back in time a site loss now would take the domain: from the recovery
        point the store holds to the newest write captured. 0 when everything captured
        is in the store.

        The store holds every write up to ``committed_seq``, and none was captured
        between that one and the next: the store equals the primary at any instant
        before the next write, so that write's time is the recovery point — when this
        DRVA holds it (its oldest pending entry, or the oldest frame staged for a group
        commit). Counting from the newest committed write instead made a quiet spell
        count as lag as soon as the next write came: a domain writing in bursts a second
        apart showed 2 s with a 1 s seal age, and an idle domain's first write raised an
        RPO alarm. When the next write is not here (still in the filter), its time is
        unknown and the lag counts from the newest committed write: never less than the
        truth — while the filter's clock runs forward.

        Writes that wait with none after them (a store outage on a quiet domain) still
        age: the lag is at least how long the oldest pending write has been here
        (``now``: ``time.monotonic()``), and at least how long the filter's oldest
        write not acked had waited there when it last said (``filter_waited_s``). The
        timestamps alone hid that once the filter's clock stepped back (NTP, a VM
        resumed): its stamps stand still until the clock catches up, so a backlog
        waiting in the filter (a slow link) showed as no lag. Each figure is a
        difference of one clock — the filter's timestamps, this host's monotonic clock,
        the filter's monotonic clock — so a skew between hosts cannot show as lag."""
        seq, ts = self.newest_seq_ts()
        if seq <= self.committed_seq:
            return 0.0
        floor = self.filter_waited_s()
        entry = self.oldest_pending()
        first = (entry.first_seq, entry.first_ts, entry.arrived) if entry is not None else self.staged_first
        if first is None or first[0] != self.committed_seq + 1:
            return max(floor, (ts - (self.committed_ts or ts)) / 1e9)
        waited = (time.monotonic() if now is None else now) - first[2]
        return max(floor, (ts - first[1]) / 1e9, waited)

    def filter_waited_s(self) -> float:
        """How long the filter's oldest write not acked had waited, on the filter's
        monotonic clock, when its last FILTER_STATE left (0: it said nothing, being
        older than ``oldest_unacked_age_ms`` or having no write unacked). A write not
        acked is not in the store, so the lag was at least that then. The age is of a
        write captured and waiting, never of the last one: a quiet spell before it is
        not counted. Not aged further here: the write may have been acked since, and
        the next report (every second) says how long the oldest one waits then."""
        return (self.filter_state.get("oldest_unacked_age_ms") or 0) / 1000

    def filter_session_ended(self) -> None:
        """The domain's filter session ended: drop what its last FILTER_STATE said of that
        moment only (``FILTER_MOMENT_FIELDS``). Were they kept, the age its oldest unacked
        write had then would stand in the RPO lag, never aged, for as long as no filter
        came back. Its mode, dirty bytes and captured seq stay: they change only through a
        session."""
        for key in FILTER_MOMENT_FIELDS:
            self.filter_state.pop(key, None)

    def filter_session_opened(self) -> None:
        """A new session took the domain over: its filter may run on another host, with
        another clock, so the readings of the one before no longer count."""
        self.filter_clock_offsets.clear()

    def note_filter_clock(self, offset_ns: int) -> None:
        """One reading of the filter's clock minus this host's (``FILTER_STATE.now_ns``
        less this host's clock when it was read)."""
        self.filter_clock_offsets.append(offset_ns)

    def filter_clock_offset_ns(self) -> int | None:
        """How far the filter's clock is ahead of this host's (negative: behind), from its
        latest readings (``FILTER_CLOCK_SAMPLES``); None when it never said (a filter
        older than ``now_ns``, or none yet). Kept after its session ends, until another
        takes the domain over: a clock stays as wrong while its filter reconnects."""
        return max(self.filter_clock_offsets) if self.filter_clock_offsets else None

    def rpo_lag_bytes(self) -> int:
        """Bytes captured that are not in the store yet (here, and buffered in the filter)."""
        if self.newest_seq_ts()[0] <= self.committed_seq:
            return 0
        buffered = self.filter_state.get("buffered_bytes") or 0
        return self.pending_bytes() + int(buffered)
