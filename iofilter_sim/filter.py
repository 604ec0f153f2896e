"""The I/O filter of one protection domain: capture in order, buffer until acked,
fall back to a dirty-region bitmap when the path is too slow, resync from the disk.

Modes (FORMAT.md §1 kinds RESYNC_BEGIN/END mark the windows in the stream):

* ``normal``: every write is applied to its primary disk, given the domain's next seq
  and a timestamp, and kept in a bounded buffer of frames until a DRVA acks it.
* ``bitmap``: the buffer was full, and so was the spill journal if there is one
  (``iofilter_sim.spill``: frames past the memory buffer wait in a bounded ring file
  beside the disks, numbered and in order, so a DRVA restart of a few seconds opens no
  window), or the journal lost frames (a short read, a checksum that fails). Frames
  never sent on any connection are dropped (their seqs are reused: no DRVA has seen
  them) and their regions, like every new write's, are marked in a bounded dirty bitmap.
  Frames ever sent stay until acked, to be resent: a DRVA may hold them staged from an
  older connection and make them durable later, so their seqs are never numbered again.
* ``resync``: the path is healthy again; a RESYNC_BEGIN record opens the window, dirty
  regions are read back from the primary disks and captured as ordinary writes (live
  writes keep being captured between them), and RESYNC_END closes the window when the
  bitmap is clean. Points inside the window are not crash-consistent.

Dirty-region maps (``cdp.dirtymap``, one per disk, optional): a write's regions are
flagged durably before it reaches the primary disk, and unflagged once every write to
them has been acked for ``MAP_KEEP_S`` (checked every ``MAP_CLEAR_EVERY_S``). Regions a map had flagged when it
was opened — writes of an earlier run that may never have reached a DRVA — start in the
bitmap, so they are resynced.

Invariants: seqs in the buffer are consecutive and start right after ``acked_seq``;
the frames before ``buffer[unsent_from]`` have been sent on the current connection and
the others not on it; ``acked_seq <= sent_seq < next_seq``, where ``sent_seq`` is the
highest seq ever sent on any connection (only frames above it are ever dropped, and
only their seqs reused — so a seq once on the wire names one write, for good);
``buffered_bytes <= buffer_bytes_max`` except for one frame (bytes in memory; a frame
in the spill journal counts in ``spilled_bytes`` instead, and keeps only its records in
memory); a region is either in a buffered frame, in the bitmap, or already acked.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cdp.dirtymap import DirtyMap, region_bytes_for, regions_of
from cdp.errors import FormatError
from cdp.frame import encode_frame_parts
from cdp.layout import U32_MAX, U64_MAX
from cdp.logs import get_logger
from cdp.records import (
    KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE, KIND_ZERO, MARK_NAME_CONTROL, empty_records,
    payload_lengths,
)
from iofilter_sim.spill import SpillJournal

log = get_logger("iofilter.filter")

FRAME_BYTES_MAX = 1 << 20
FRAME_RECORDS_MAX = 4096
BUFFER_BYTES_MAX = 64 << 20
RESYNC_STEP_BYTES = 4 << 20
# Acked regions are unflagged in the dirty-region maps at most this often (each clear
# scans every region), and only once their last write has been acked for MAP_KEEP_S: a
# region unflagged costs a synced set — a device cache flush, which also waits for the
# DRVA's log writes on a shared device — when it is written again. With 1 s (clears every
# 0.25 s), 4 KiB random writes flagged a cleared region in nearly every batch: ~30
# syncs a second and 0.83-0.86 of the ingest rate without maps (benchmarks.ingest); with
# 5 s (every 1 s), 0.94; with 30 s, 0.99. The price: after a crash the map also flags
# what was written and acked in the last MAP_KEEP_S, and a failback moves those regions
# too (those written after the fork it moves anyway, from the log or the store).
MAP_CLEAR_EVERY_S = 1.0
MAP_KEEP_S = 5.0
# A batch that must sync a map anyway also flags again the regions cleared in the last
# MAP_REFLAG_S (and not written since): the same page write and device flush cover them.
# A clear pass during random writes unflagged nearly every region a moment before the
# writes came back to it: 4 KiB qd-32 writes through NBD paid a sync in 180 of 237
# batches (benchmarks.nbd). The price: a region stays flagged at most MAP_REFLAG_S
# longer after its last ack (it is cleared again at the next pass, and is not flagged
# again once MAP_REFLAG_S has passed since its first clear).
MAP_REFLAG_S = MAP_KEEP_S


def batch_records(disk: np.ndarray, offset: np.ndarray, length: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """A batch's records, not yet stamped (no seq, no timestamp)."""
    records = empty_records(len(disk))
    records["disk"], records["offset"], records["length"], records["kind"] = disk, offset, length, kind
    return records


class Disk(Protocol):
    size: int

    # ``no_hole`` (given only when some record has it): one bool per record, the ZERO
    # records whose range must stay allocated (NBD's NO_HOLE), as PrimaryDisk.write_batch.
    def write_batch(self, records: np.ndarray, payload: bytes | memoryview,
                    no_hole: np.ndarray | None = None) -> None: ...
    def read(self, offset: int, length: int) -> bytes: ...


class FilterError(Exception):
    """An operation the filter cannot do in its current state (e.g. a mark in bitmap mode)."""


@dataclass(slots=True)
class BufferedFrame:
    first_seq: int
    last_seq: int
    parts: list  # empty when the frame is in the spill journal
    nbytes: int
    records: np.ndarray  # kept to mark regions dirty if the frame is dropped unsent
    spilled_at: int = -1  # its offset in the spill journal, or -1: in memory
    # The filter's monotonic time when its writes were captured: how long they have
    # waited unacked (``state``), whatever the wall clock that stamped them did.
    captured_at: float = 0.0


class DomainFilter:
    """Capture side of one domain (see the module docstring)."""

    def __init__(self, domain: int, disks: Sequence[Disk], *, buffer_bytes_max: int = BUFFER_BYTES_MAX,
                 frame_bytes_max: int = FRAME_BYTES_MAX, clock: Callable[[], int] = time.time_ns,
                 first_seq: int = 1, dirty_maps: Sequence[DirtyMap] | None = None,
                 spill: SpillJournal | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.domain = domain
        self.disks = list(disks)
        self.buffer_bytes_max = buffer_bytes_max
        self.frame_bytes_max = frame_bytes_max
        self.clock = clock  # stamps the records (a wall clock: it may step back, or jump)
        self.monotonic = monotonic  # ages the unacked writes (FILTER_STATE.oldest_unacked_age_ms)
        self.next_seq = first_seq
        self.acked_seq = first_seq - 1
        # The highest seq ever sent to a DRVA, on any connection. A DRVA may hold a frame
        # staged from a connection that dropped and make it durable after the WELCOME of
        # the next one said otherwise: no seq at or below this is ever numbered again,
        # and an ack above it is a lie (FilterClient refuses it).
        self.sent_seq = first_seq - 1
        # A frame was sent on some connection in this run: until then nothing of this
        # instance's can be at a DRVA, and its seqs may still be given again (``restart_after``).
        self.sent_any = False
        # Wall-clock time of the first ack of a write this instance numbered (the end of
        # a recovery time objective: a recovered VM's write is durable at its DRVA).
        self.first_ack_time: float | None = None
        self.last_ts = 0
        self.mode = "normal"
        self.window_open_seq: int | None = None
        self.buffer: collections.deque[BufferedFrame] = collections.deque()
        self.buffered_bytes = 0
        self.spill = spill
        self.spilled_bytes = 0
        self.unsent_from = 0
        self.region_bytes = [region_bytes_for(d.size) for d in self.disks]
        self.dirty = [np.zeros(-(-d.size // r), dtype=bool) for d, r in zip(self.disks, self.region_bytes)]
        self.backpressure = False
        # Its DRVA refused it as fenced (the domain runs at another site): its unacked
        # writes will never be acked, and a drain does not wait for them.
        self.fenced = False
        self.stats = collections.Counter()
        self.on_change: Callable[[], None] = lambda: None
        # Called after every ack and when the domain is fenced: whoever waits for a
        # write to be durable at the DRVA (an NBD FLUSH) looks again.
        self.on_acked: Callable[[], None] = lambda: None
        # The seq of the RESYNC_END that closed the last resync window: every write
        # captured before that window opened is durable once it is acked.
        self.resync_end_seq = 0
        self.maps = list(dirty_maps or [])
        if self.maps and len(self.maps) != len(self.disks):
            raise ValueError(f"domain {domain}: {len(self.maps)} dirty-region maps for {len(self.disks)} disks")
        # Per region, the seq of the last captured write to it (the map unflags a region
        # once that seq is acked and the region is not in the bitmap).
        self.last_seq = [np.zeros(len(m), dtype=np.uint64) for m in self.dirty] if self.maps else []
        self._cleared_at = 0.0
        # Per region, when a clear first unflagged it since its last write (0: not cleared).
        self._unflagged_at = [np.zeros(len(m), dtype=np.float64) for m in self.dirty] if self.maps else []
        self._acked_at: collections.deque[tuple[float, int]] = collections.deque()  # (when, acked_seq)
        for d, m in enumerate(self.maps):
            if m.region_bytes != self.region_bytes[d]:
                raise ValueError(f"{m.path}: regions of {m.region_bytes} bytes, "
                                 f"the filter's are {self.region_bytes[d]}")
            self.dirty[d] |= m.left
        if any(m.any() for m in self.dirty):  # writes of an earlier run that may never have been acked
            self.mode = "bitmap"
            self.stats["left_dirty_bytes"] = self.dirty_bytes()

    # ------------------------------------------------------------------ capture

    def capture(self, disk: np.ndarray, offset: np.ndarray, length: np.ndarray, kind: np.ndarray,
                payload: bytes) -> None:
        """Apply a batch of writes to the primary disks and capture them, in order."""
        if len(disk):
            self._capture(batch_records(disk, offset, length, kind), payload)

    def _capture(self, records: np.ndarray, payload: bytes, no_hole: np.ndarray | None = None) -> None:
        if self.maps:
            self._flag(records)
        try:
            self._apply(records, payload, no_hole)
            self.stats["writes"] += len(records)
            self.stats["bytes"] += int(records["length"].sum())
            if self.mode == "bitmap":
                self._mark_dirty(records)
                return
            self._capture_records(records, payload)
        except Exception:
            # The primary may hold the batch (or part of it) and the stream not: whatever
            # failed — the disk, or numbering and encoding after it — its regions go to
            # the bitmap and a resync reads back what the disk holds. A write that reached
            # the primary and neither the buffer nor the bitmap would never replicate.
            self._enter_bitmap(records)
            raise

    async def capture_async(self, disk: np.ndarray, offset: np.ndarray, length: np.ndarray, kind: np.ndarray,
                            payload: bytes) -> None:
        """``capture``, with the dirty-region maps synced in a worker thread first: the
        batch still reaches the disks only once its regions are durably flagged, but the
        event loop goes on sending frames and taking acks while the device flushes (a
        sync on the loop stalled the whole filter: ``benchmarks.ingest``). One caller
        per filter: a batch is captured before the next one is flagged."""
        if not len(disk):
            return
        records = batch_records(disk, offset, length, kind)
        await self.flag_durably(records)
        self.capture_flagged(records, payload)

    async def flag_durably(self, records: np.ndarray) -> None:
        """Flag the regions of a batch (``batch_records``) in the dirty-region maps and
        return once they are durable (syncs in worker threads). A caller may flag later
        batches while this one syncs, and capture them in order after
        (``capture_flagged``): a flag set early is always safe — it only guards more."""
        if not self.maps:
            return
        waits = []
        for d, idx in self._map_regions(records):
            m = self.maps[d]
            m.flag(self._with_recently_cleared(d, idx))
            waits.append(m.sync_covering(m.pending_set(idx)))
        synced = await asyncio.gather(*waits)
        self.stats["map_syncs"] += sum(synced)

    def capture_flagged(self, records: np.ndarray, payload: bytes | memoryview,
                        no_hole: np.ndarray | None = None) -> None:
        """``capture`` of a batch whose regions ``flag_durably`` has flagged. A region
        unflagged by an ack since is flagged (and synced, on this thread) again here.
        ``no_hole``: per record, a ZERO whose range the primary keeps allocated (NBD's
        NO_HOLE); the captured record is a ZERO all the same."""
        self._capture(records, payload, no_hole)

    def write_only(self, disk: np.ndarray, offset: np.ndarray, length: np.ndarray, kind: np.ndarray,
                   payload: bytes, no_hole: np.ndarray | None = None) -> None:
        """Apply a batch of writes to the primary disks without capturing them: a VM that
        runs isolated (a test failover's copy) writes locally and replicates nothing."""
        if len(disk) == 0:
            return
        records = batch_records(disk, offset, length, kind)
        self._apply(records, payload, no_hole)
        self.stats["writes"] += len(disk)
        self.stats["bytes"] += int(length.sum())

    def mark_unreplicated(self, disk: np.ndarray, offset: np.ndarray, length: np.ndarray, kind: np.ndarray) -> None:
        """A batch failed part way: the disks may hold some of it and the stream none, so
        its regions go to the bitmap; the resync reads them back from the disks.
        (``capture`` does this itself for a batch that fails inside it.)"""
        if len(disk):
            self._enter_bitmap(batch_records(disk, offset, length, kind))

    def _apply(self, records: np.ndarray, payload: bytes, no_hole: np.ndarray | None = None) -> None:
        lengths = payload_lengths(records)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        view = memoryview(payload)
        for d in np.unique(records["disk"]):
            sel = np.flatnonzero(records["disk"] == d)
            parts = b"".join(view[int(starts[i]) : int(starts[i] + lengths[i])] for i in sel
                             if lengths[i]) if len(sel) != len(records) else payload
            if no_hole is None:
                self.disks[int(d)].write_batch(records[sel], parts)
            else:
                self.disks[int(d)].write_batch(records[sel], parts, no_hole=no_hole[sel])

    def _stamp(self, records: np.ndarray) -> None:
        """Give records the next seqs and non-decreasing timestamps."""
        n = len(records)
        records["seq"] = np.arange(self.next_seq, self.next_seq + n, dtype=np.uint64)
        self.last_ts = max(self.last_ts, self.clock())
        records["timestamp_ns"] = self.last_ts
        self.next_seq += n

    def _capture_records(self, records: np.ndarray, payload: bytes | memoryview) -> bool:
        """Stamp and buffer records as frames; False (and bitmap mode) if they do not fit."""
        lengths = payload_lengths(records)
        if (self.spill is None and self.buffer
                and self.buffered_bytes + int(lengths.sum()) + 40 * len(records) > self.buffer_bytes_max):
            self._enter_bitmap(records)
            return False
        self._stamp(records)
        if self.maps:
            self._note_seqs(records)
        view = memoryview(payload)
        ends = np.cumsum(lengths)
        start_rec, start_byte = 0, 0
        while start_rec < len(records):
            # Cut frames at frame_bytes_max of payload or FRAME_RECORDS_MAX records.
            limit = start_byte + self.frame_bytes_max
            stop = int(np.searchsorted(ends, limit, side="right"))
            stop = max(start_rec + 1, min(stop, start_rec + FRAME_RECORDS_MAX, len(records)))
            end_byte = int(ends[stop - 1])
            if not self._buffer_frame(records[start_rec:stop], view[start_byte:end_byte], spillable=True):
                # Neither memory nor the journal holds it: this frame and the batch's
                # rest go to the bitmap, with every frame never sent (this batch's too).
                # Their seqs never reached a DRVA: the next write reuses them.
                self._enter_bitmap(records[start_rec:])
                return False
            start_rec, start_byte = stop, end_byte
        self.on_change()
        return True

    def _buffer_frame(self, records: np.ndarray, payload: memoryview, *, spillable: bool = False) -> bool:
        """Encode and keep one frame: in memory while the buffer has room (or is empty),
        else, if ``spillable``, in the spill journal. False if it went nowhere."""
        parts = list(encode_frame_parts(self.domain, records, payload))
        nbytes = sum(len(memoryview(p).cast("B")) for p in parts)
        first, last = int(records["seq"][0]), int(records["seq"][-1])
        now = self.monotonic()
        if spillable and self.buffer and self.buffered_bytes + nbytes > self.buffer_bytes_max:
            at = self.spill.append(parts, nbytes) if self.spill is not None else None
            if at is None:
                return False
            self.buffer.append(BufferedFrame(first, last, [], nbytes, records.copy(), at, captured_at=now))
            self.spilled_bytes += nbytes
            self.stats["spilled_frames"] += 1
            return True
        self.buffer.append(BufferedFrame(first, last, parts, nbytes, records.copy(), captured_at=now))
        self.buffered_bytes += nbytes
        return True

    def wire_parts(self, frame: BufferedFrame) -> list | None:
        """The encoded frame to send: its parts in memory, or its bytes read back from the
        spill journal and checked. None when the journal lost them: the filter then went
        to bitmap mode and the buffer changed (``_spill_lost``), so the caller looks at
        ``next_unsent`` again."""
        if frame.spilled_at < 0:
            return frame.parts
        try:
            data = self.spill.read_frame(frame.spilled_at, frame.nbytes, (frame.first_seq, frame.last_seq))
        except (OSError, FormatError) as exc:
            self._spill_lost(exc)
            return None
        return [data]

    def _spill_lost(self, exc: Exception) -> None:
        """The spill journal cannot give a frame back (EIO, truncated, overwritten): no
        frame in it is trusted again, and it takes no more. Frames never sent go to the
        bitmap, as when the buffer is full. A frame ever sent may be staged at a DRVA, or
        not: it is replaced by a filler of ``RESYNC_BEGIN`` records with its seqs — a
        DRVA that holds the original drops the filler as a duplicate, one that does not
        takes it and opens a resync window there — and its regions go to the bitmap too,
        so the resync writes them again after it, whichever happened."""
        spill = self.spill
        assert spill is not None
        lost = sum(1 for f in self.buffer if f.spilled_at >= 0)
        log.error("spill_journal_broken", path=str(spill.path), domain=self.domain, error=str(exc),
                  frames_lost=lost, sent_seq=self.sent_seq)
        self._enter_bitmap(empty_records(0))  # never-sent frames, the journal's among them
        for i, f in enumerate(self.buffer):
            if f.spilled_at >= 0:
                self._mark_dirty(f.records)
                self.buffer[i] = self._filler(f)
                self.buffered_bytes += self.buffer[i].nbytes
        spill.abandon(str(exc))
        self.spilled_bytes = 0
        self.stats["spill_frames_lost"] += lost

    def _filler(self, frame: BufferedFrame) -> BufferedFrame:
        """A frame of ``RESYNC_BEGIN`` records with ``frame``'s seqs and timestamps (see
        ``_spill_lost``); it keeps the original records, whose regions are dirty."""
        records = empty_records(len(frame.records))
        records["seq"], records["timestamp_ns"] = frame.records["seq"], frame.records["timestamp_ns"]
        records["kind"] = KIND_RESYNC_BEGIN
        parts = list(encode_frame_parts(self.domain, records, memoryview(b"")))
        nbytes = sum(len(memoryview(p).cast("B")) for p in parts)
        return BufferedFrame(frame.first_seq, frame.last_seq, parts, nbytes, frame.records,
                             captured_at=frame.captured_at)

    def _forget(self, frame: BufferedFrame, *, newest: bool) -> None:
        """Account for a frame leaving the buffer (acked: the oldest; dropped: the newest)."""
        if frame.spilled_at < 0:
            self.buffered_bytes -= frame.nbytes
            return
        self.spilled_bytes -= frame.nbytes
        self.spill.drop_newest() if newest else self.spill.release_oldest()

    def _special(self, kind: int, name: bytes = b"") -> int:
        records = empty_records(1)
        records["kind"] = kind
        records["length"] = len(name)
        self._stamp(records)
        self._buffer_frame(records, memoryview(name))
        self.on_change()
        return int(records["seq"][0])

    def mark(self, name: str) -> int:
        """Insert a named recovery point after every write captured so far; its seq."""
        if self.mode != "normal":
            raise FilterError(f"domain {self.domain} is in {self.mode} mode: a mark now would not be a consistent point")
        raw = name.encode()
        if not 1 <= len(raw) <= 255:
            raise FilterError(f"mark name must be 1..255 UTF-8 bytes, got {len(raw)}")
        if MARK_NAME_CONTROL.search(name):  # the DRVA refuses such a MARK (FORMAT.md §2.3)
            raise FilterError(f"mark name {name!r} holds a control character")
        return self._special(KIND_MARK, raw)

    # ------------------------------------------------------------------ acks and sending

    def continue_after(self, seq: int) -> None:
        """A new filter instance for a domain the DRVA already holds up to ``seq``: number
        from ``seq + 1`` on. Only before anything was captured — renumbering captured
        writes would change what was acked."""
        if self.next_seq != 1 or self.buffer:
            raise FilterError(f"domain {self.domain}: cannot continue after seq {seq}: "
                              f"this filter already numbered writes up to {self.next_seq - 1}")
        self._number_after(seq)

    def _number_after(self, seq: int) -> None:
        self.next_seq, self.acked_seq, self.sent_seq = seq + 1, seq, seq

    def restart_after(self, seq: int) -> None:
        """A DRVA holds the domain up to ``seq``, beyond anything this filter sent, and
        this filter never sent a frame: it numbered writes before any DRVA could tell it
        where the domain's seqs go on (it started while its DRVA was down). None of them
        reached a DRVA, so their seqs are given again: the buffered frames go to the
        bitmap — a resync captures their regions again from the primaries, and a FLUSH
        waits for it — and numbering goes on from ``seq + 1``."""
        if self.sent_any:
            raise FilterError(f"domain {self.domain}: cannot number on after seq {seq}: this filter sent "
                              f"writes up to seq {self.sent_seq}, which a DRVA may hold")
        if self.buffer:
            log.warning("numbered_before_welcome", domain=self.domain, durable_seq=seq,
                        numbered_to=self.next_seq - 1, frames=len(self.buffer),
                        reason="captured while no DRVA was reached: the writes go to the bitmap and are resynced")
            self._enter_bitmap(empty_records(0))  # every frame: none was ever sent
            assert not self.buffer, len(self.buffer)
            # Every region this run wrote is in the bitmap now: the seqs of its last
            # writes, given again from seq + 1, no longer name them (the resync notes new ones).
            for seqs in self.last_seq:
                seqs[:] = 0
        self._number_after(seq)

    def on_ack(self, durable_seq: int) -> None:
        while self.buffer and self.buffer[0].last_seq <= durable_seq:
            f = self.buffer.popleft()
            self._forget(f, newest=False)
            self.unsent_from = max(0, self.unsent_from - 1)
        if self.first_ack_time is None and durable_seq > self.acked_seq:
            self.first_ack_time = time.time()
        self.acked_seq = max(self.acked_seq, durable_seq)
        if self.maps and time.monotonic() - self._cleared_at >= MAP_CLEAR_EVERY_S:
            self.clear_acked_regions()
        self.on_acked()

    # ------------------------------------------------------------------ dirty-region maps

    def _data_by_disk(self, records: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """The WRITE and ZERO records of a batch, disk by disk (no copy in the usual case:
        a batch of writes to one disk)."""
        is_data = records["kind"] <= KIND_ZERO
        data = records if is_data.all() else records[is_data]
        if not len(data):
            return
        disks = data["disk"]
        if (disks == disks[0]).all():
            yield int(disks[0]), data
            return
        for d in np.unique(disks).tolist():
            yield d, data[disks == d]

    def _map_regions(self, records: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Per disk, the regions the batch's WRITE and ZERO records touch."""
        for d, sel in self._data_by_disk(records):
            yield d, regions_of(sel["offset"], sel["length"], self.region_bytes[d])[0]

    def _flag(self, records: np.ndarray) -> None:
        """Flag, durably, the regions these writes touch: before they reach the disks."""
        for d, idx in self._map_regions(records):
            if self.maps[d].set_before_write(self._with_recently_cleared(d, idx)):
                self.stats["map_syncs"] += 1

    def _with_recently_cleared(self, d: int, idx: np.ndarray) -> np.ndarray:
        """``idx``, and when it holds an unflagged region (a sync is due), the regions of
        disk ``d`` cleared in the last ``MAP_REFLAG_S`` and not flagged since: a flag set
        is always safe, and riding on a sync that is due anyway it costs none."""
        m = self.maps[d]
        if m.flags[idx].all():
            return idx
        since = self._unflagged_at[d]
        again = np.flatnonzero(since > time.monotonic() - MAP_REFLAG_S)
        if not len(again):
            return idx
        self.stats["map_reflagged"] += len(again)
        return np.concatenate((idx, again))

    def _note_seqs(self, records: np.ndarray) -> None:
        for d, sel in self._data_by_disk(records):
            idx, count = regions_of(sel["offset"], sel["length"], self.region_bytes[d])
            seqs = sel["seq"] if count is None else np.repeat(sel["seq"], count)
            np.maximum.at(self.last_seq[d], idx, seqs)  # seqs grow: a region keeps its last write's
            self._unflagged_at[d][idx] = 0.0

    def clear_acked_regions(self, keep_s: float = MAP_KEEP_S) -> int:
        """Unflag the regions whose every write was acked at least ``keep_s`` ago (and
        that are not waiting in the bitmap for a resync); how many."""
        now = self._cleared_at = time.monotonic()
        self._acked_at.append((now, self.acked_seq))
        acked = 0
        while self._acked_at and self._acked_at[0][0] <= now - keep_s:
            acked = self._acked_at.popleft()[1]
        if acked:
            self._acked_at.appendleft((now - keep_s, acked))  # still the bound until a newer one ages
        threshold = np.uint64(max(0, acked))
        cleared = 0
        for m, seqs, dirty, since in zip(self.maps, self.last_seq, self.dirty, self._unflagged_at):
            mask = (seqs <= threshold) & ~dirty
            first = np.flatnonzero(mask & m.flags & (since == 0))
            cleared += m.clear(mask)
            since[first] = now
        return cleared

    def close_maps(self) -> bool:
        """Close the dirty-region maps: clean (all unflagged) when every captured write is
        acked and nothing waits in the bitmap, else flagged as they are. True if clean."""
        clean = self.mode == "normal" and self.acked_seq == self.next_seq - 1 and not self.buffer
        for m in self.maps:
            m.close(clean=clean)
        return clean

    def close_spill(self) -> None:
        """Remove the spill journal (what it held is acked, or flagged in the dirty maps)."""
        if self.spill is not None:
            self.spill.close()

    def next_unsent(self) -> BufferedFrame | None:
        """The oldest frame not sent on this connection yet, if any."""
        return self.buffer[self.unsent_from] if self.unsent_from < len(self.buffer) else None

    def mark_sent(self) -> None:
        """``next_unsent`` went on the wire (its bytes may reach the DRVA from now on)."""
        self.sent_seq = max(self.sent_seq, self.buffer[self.unsent_from].last_seq)
        self.sent_any = True
        self.unsent_from += 1

    def rewind(self) -> None:
        """After a reconnect: every buffered frame must be sent again."""
        self.unsent_from = 0

    # ------------------------------------------------------------------ bitmap and resync

    def _enter_bitmap(self, records: np.ndarray) -> None:
        """The buffer is full: drop the frames never sent on any connection (their seqs
        are reused) into the bitmap. A frame sent on an older connection and rewound
        stays: the DRVA may have it staged and make it durable yet (its seqs are taken)."""
        self._mark_dirty(records)
        while len(self.buffer) > self.unsent_from and self.buffer[-1].first_seq > self.sent_seq:
            f = self.buffer.pop()
            self._forget(f, newest=True)
            self._mark_dirty(f.records)
            if self.window_open_seq is not None and self.window_open_seq >= f.first_seq:
                self.window_open_seq = None  # the RESYNC_BEGIN itself was never sent
            dropped_marks = int((f.records["kind"] == KIND_MARK).sum())
            self.stats["marks_dropped"] += dropped_marks
        # Number on right after what is kept (a batch that failed part way may have been
        # numbered past it), and never at or below a seq ever sent.
        kept = self.buffer[-1].last_seq if self.buffer else self.acked_seq
        self.next_seq = max(kept, self.sent_seq) + 1
        if self.mode != "bitmap":
            self.stats["bitmap_entries"] += 1
        self.mode = "bitmap"
        self.on_change()

    def _mark_dirty(self, records: np.ndarray) -> None:
        for d, sel in self._data_by_disk(records):
            self.dirty[d][regions_of(sel["offset"], sel["length"], self.region_bytes[d])[0]] = True

    def dirty_bytes(self) -> int:
        return sum(int(m.sum()) * r for m, r in zip(self.dirty, self.region_bytes))

    def healthy(self, connected: bool) -> bool:
        # Frames still waiting in the journal mean the path has not caught up yet.
        return (connected and not self.backpressure and not self.spilled_bytes
                and self.buffered_bytes < self.buffer_bytes_max // 4)

    def resync_step(self, connected: bool, step_bytes: int = RESYNC_STEP_BYTES) -> int:
        """Move up to ``step_bytes`` of dirty regions back into the stream; bytes moved."""
        if self.mode == "normal" or not self.healthy(connected):
            return 0
        # A step must fit the buffer beside what is in it (healthy: under a quarter), or
        # capturing it fails, drops the RESYNC_BEGIN just buffered, and the next step
        # does the same for ever: a buffer smaller than two steps livelocked the sender.
        step_bytes = min(step_bytes, self.buffer_bytes_max // 2)
        if self.mode == "bitmap":
            self.mode = "resync"
            if self.window_open_seq is None:
                self.window_open_seq = self._special(KIND_RESYNC_BEGIN)
        moved = 0
        for d, (mask, r) in enumerate(zip(self.dirty, self.region_bytes)):
            idx = np.flatnonzero(mask)[: max(1, (step_bytes - moved) // r)]
            if not len(idx):
                continue
            records, payload = self._read_regions(d, idx, r)
            if not self._capture_records(records, payload):
                return moved  # buffer full again: back in bitmap mode, regions still dirty
            mask[idx] = False
            moved += int(records["length"].sum())
            if moved >= step_bytes:
                return moved
        if not any(m.any() for m in self.dirty):
            self.resync_end_seq = self._special(KIND_RESYNC_END)
            self.window_open_seq = None
            self.mode = "normal"
            self.stats["resyncs_completed"] += 1
        return moved

    def _read_regions(self, d: int, idx: np.ndarray, r: int) -> tuple[np.ndarray, bytes]:
        """WRITE records with the current primary content of regions ``idx`` of disk ``d``."""
        size = self.disks[d].size
        records = empty_records(len(idx))
        records["disk"] = d
        records["kind"] = KIND_WRITE
        records["offset"] = idx.astype(np.uint64) * r
        records["length"] = np.minimum(r, size - idx.astype(np.int64) * r)
        parts = [self.disks[d].read(int(o), int(n)) for o, n in zip(records["offset"], records["length"])]
        return records, b"".join(parts)

    def state(self) -> dict[str, Any]:
        """The FILTER_STATE body (FORMAT.md §9)."""
        # now_ns: the clock that stamps the records, read as is (not the last stamp, which
        # never goes back): the DRVA compares it with its own and reports how far off it
        # is — a clock far behind stamps writes earlier than they were, and no other
        # figure shows it (FORMAT.md §9).
        doc = {"domain": self.domain, "mode": self.mode, "captured_seq": self.next_seq - 1,
               "captured_ts": self.last_ts, "buffered_bytes": self.buffered_bytes,
               "dirty_bytes": self.dirty_bytes(), "now_ns": min(max(self.clock(), 0), U64_MAX)}
        # Only while a write waits unacked: with none, there is no age to give (and a
        # filter older than the field gives none either; the DRVA takes both alike).
        if self.buffer:
            doc["oldest_unacked_age_ms"] = self.oldest_unacked_age_ms()
        return doc

    def oldest_unacked_age_ms(self) -> int:
        """How long the oldest write not acked yet (the buffer's first) has waited, on this
        filter's monotonic clock: the DRVA's RPO lag is at least that (``captured_ts``
        cannot say it once the wall clock stepped back: the stamps stand still until it
        catches up). At most U32_MAX ms (~49.7 days), the bound the DRVA takes."""
        waited_s = max(0.0, self.monotonic() - self.buffer[0].captured_at)
        return min(int(waited_s * 1000), U32_MAX)
