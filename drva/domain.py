"""Per-domain state of a DRVA: where each seq of the domain is on its way to the store.

Seqs of one domain move through four marks, never backwards:

    accepted_seq  >=  durable_seq  >=  sealed_seq  >=  committed_seq
    (staged for a     (in the log,     (in a segment   (named by a catalog
     group commit)     acked)           being uploaded)  generation in the store)

``unsealed`` holds the log entries in (sealed_seq, durable_seq], ``inflight`` the segment
jobs in (committed_seq, sealed_seq], both in seq order. The log may be trimmed only
before the first entry of either (``first_needed_pos``).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from drva.config import DomainConfig


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


@dataclass(slots=True)
class SegmentJob:
    """A sealed segment on its way: uploaded, then named by a catalog generation."""

    domain: int
    key: str
    data: bytes
    entries: list[LogEntry]
    payload_raw_len: int
    size: int
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


class DomainState:
    """Everything a DRVA knows about one protection domain (see the module docstring)."""

    def __init__(self, cfg: DomainConfig) -> None:
        self.cfg = cfg
        self.accepted_seq = 0
        self.durable_seq = 0
        self.sealed_seq = 0
        self.committed_seq = 0
        self.committed_ts = 0
        self.newest_received_ts = 0
        # (seq, timestamp, monotonic time) of the first frame staged for a group commit
        # while none of the domain's was: the oldest write not in the store when every
        # durable one is (``rpo_lag_s``).
        self.staged_first: tuple[int, int, float] | None = None
        self.unsealed: collections.deque[LogEntry] = collections.deque()
        self.inflight: collections.deque[SegmentJob] = collections.deque()
        self.catalog_ready = False
        # The metadata repository holds a commit of this domain: its durable seq is known
        # here before the store's catalog is open (see Session._handshake).
        self.catalog_known = False
        self.fenced = False
        # The timeline this DRVA last committed the domain on (its metadata repository);
        # 0: never. A different current timeline of this site's means a failback.
        self.meta_timeline = 0
        self.stats = DomainStats()
        self.session: Any = None  # the filter session streaming this domain, if any
        self.filter_state: dict[str, Any] = {}  # the filter's last FILTER_STATE

    @property
    def id(self) -> int:
        return self.cfg.id

    def first_needed_pos(self) -> int | None:
        """Log position of the oldest entry not yet committed to the store, if any."""
        if self.inflight:
            return self.inflight[0].entries[0].pos
        if self.unsealed:
            return self.unsealed[0].pos
        return None

    def unsealed_bytes(self) -> int:
        return sum(e.nbytes for e in self.unsealed)

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
        truth.

        Writes that wait with none after them (a store outage on a quiet domain) still
        age: the lag is at least how long the oldest pending write has been here
        (``now``: ``time.monotonic()``). Both figures are differences of one clock — the
        filter's timestamps, this host's monotonic clock — so a skew between hosts
        cannot show as lag."""
        seq, ts = self.newest_seq_ts()
        if seq <= self.committed_seq:
            return 0.0
        entry = self.oldest_pending()
        first = (entry.first_seq, entry.first_ts, entry.arrived) if entry is not None else self.staged_first
        if first is None or first[0] != self.committed_seq + 1:
            return max(0.0, (ts - (self.committed_ts or ts)) / 1e9)
        waited = (time.monotonic() if now is None else now) - first[2]
        return max(0.0, (ts - first[1]) / 1e9, waited)

    def rpo_lag_bytes(self) -> int:
        """Bytes captured that are not in the store yet (here, and buffered in the filter)."""
        if self.newest_seq_ts()[0] <= self.committed_seq:
            return 0
        buffered = self.filter_state.get("buffered_bytes") or 0
        return self.pending_bytes() + int(buffered)
