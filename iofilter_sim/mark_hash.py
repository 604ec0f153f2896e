"""Hashes of a domain's primaries at a mark, read by a worker thread while the VMs write
on (``iofilter_sim.runner``'s marks: the oracle recovery at a mark is checked against).

Hashing a disk takes as long as reading it (a minute for 16 GiB): on the event loop it
stopped capture, acks and NBD serving of every domain of the host. Holding the VMs'
writes instead would stop them as long. So the disks are read as they were at the mark
by copy-on-write: a write first keeps the bytes it overwrites where the thread has not
read yet (``SnapshotDisk``, ``_DiskSnapshot``), bounded per mark (``MARK_KEPT_BYTES_MAX``).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from cdp.records import KIND_WRITE, KIND_ZERO, SECTOR
from iofilter_sim.disks import PrimaryDisk

# Mark hashes (module docstring). The thread reads a disk this much at a time, under a
# lock a write to that disk waits for: a write waits one such read at most.
SNAPSHOT_CHUNK_BYTES = 1 << 20
# Bytes a mark keeps for its hash (what writes overwrote before the thread read it):
# past it the mark is recorded without hashes rather than hold memory without bound.
MARK_KEPT_BYTES_MAX = 128 << 20
KEPT_PIECE_OVERHEAD = 128  # a kept piece's Python objects, counted against the bound
# Marks hashed or waiting for the thread at once; a mark past it is recorded without
# hashes (each waiting one keeps the bytes written after it, and a mark costs a read
# of every disk of its domain: a flood of marks must not queue hours of reading).
MARK_HASHES_PENDING_MAX = 4
# At close, how long marks still being hashed are waited for; the rest are recorded
# without hashes. A host stopping must not wait the minutes a big disk takes to read:
# the MSA kills one that has not exited 60 s after its SIGTERM (its dirty-region maps
# then left unclosed, a resync at its next start).
class SnapshotDisk(PrimaryDisk):
    """A primary disk that marks being hashed can read as it was at their mark: before a
    batch lands, each snapshot of it keeps the bytes the batch overwrites (module
    docstring). Every write of the simulator reaches a primary through ``write_batch``."""

    snapshots: tuple[_DiskSnapshot, ...] = ()  # replaced whole, on the loop only

    def write_batch(self, records: np.ndarray, payload: bytes | bytearray | memoryview,
                    no_hole: np.ndarray | None = None) -> None:
        for snap in self.snapshots:
            snap.keep(records)
        super().write_batch(records, payload, no_hole)


class MarkHash:
    """The sha256 of a domain's disks at one mark, one ``_DiskSnapshot`` each; the bytes
    its snapshots keep are bounded together (``MARK_KEPT_BYTES_MAX``)."""

    def __init__(self, what: str, disks: list[SnapshotDisk]) -> None:
        self.what = what
        self.disks = disks
        self.abandoned: str | None = None  # why there will be no hashes
        self.kept_bytes = 0
        self._lock = threading.Lock()  # kept_bytes: the loop adds, the thread takes off
        self.snapshots = [_DiskSnapshot(d, self) for d in disks]

    def sha256(self) -> list[str] | None:
        """(worker thread) Each disk's sha256 at the mark; None if abandoned."""
        out = []
        for snap in self.snapshots:
            digest = snap.sha256()
            if digest is None:
                return None
            out.append(digest)
        return out

    def take(self, nbytes: int) -> bool:
        """Count ``nbytes`` more kept; False (and abandoned) past the bound."""
        with self._lock:
            self.kept_bytes += nbytes
            if self.kept_bytes > MARK_KEPT_BYTES_MAX:
                self.abandon(f"writes after the mark overwrote more than {MARK_KEPT_BYTES_MAX} bytes "
                             f"before they were hashed")
            return self.abandoned is None

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.kept_bytes -= nbytes

    def abandon(self, why: str) -> None:
        """No hashes for this mark: its snapshots stop keeping, its thread stops reading."""
        if self.abandoned is None:
            self.abandoned = why


class _DiskSnapshot:
    """One disk as it was at a mark, read by the worker thread chunk by chunk, in order,
    while the VMs write on (copy-on-write).

    A write (on the loop) first keeps the bytes it overwrites at or past ``cursor`` — the
    chunks the thread has not read — unless a write since the mark kept them already: the
    first write after the mark overwrites the mark's bytes, later ones only its own. The
    thread reads a chunk, puts the kept bytes over it and moves ``cursor`` past it under
    ``lock``: a chunk is read either wholly before a write kept anything of it (the
    write then keeps nothing there, it is behind ``cursor``) or with everything kept."""

    def __init__(self, disk: SnapshotDisk, job: MarkHash) -> None:
        self.disk = disk
        self.job = job
        self.lock = threading.Lock()
        self.cursor = 0  # [0, cursor) is hashed: a multiple of SNAPSHOT_CHUNK_BYTES, or the size
        self.kept: dict[int, list[tuple[int, bytes]]] = {}  # chunk -> (offset, the mark's bytes)
        self.covered: dict[int, np.ndarray] = {}  # chunk -> which of its sectors are kept

    # ---- the loop's side

    def keep(self, records: np.ndarray) -> None:
        """Keep the mark's bytes of the ranges the ``WRITE``/``ZERO`` records overwrite."""
        data = records[(records["kind"] == KIND_WRITE) | (records["kind"] == KIND_ZERO)]
        with self.lock:
            for offset, length in zip(data["offset"].tolist(), data["length"].tolist()):
                if self.job.abandoned is not None:
                    self._drop()
                    return
                self._keep_range(offset, offset + length)

    def _keep_range(self, start: int, end: int) -> None:
        # Whole sectors, clipped to what the thread has yet to read and to the disk (a
        # record past its end is refused by ``write_batch``, with nothing written).
        start = max(start - start % SECTOR, self.cursor)
        end = min(-(-end // SECTOR) * SECTOR, self.disk.size)
        while start < end:
            chunk = start // SNAPSHOT_CHUNK_BYTES
            stop = min(end, (chunk + 1) * SNAPSHOT_CHUNK_BYTES)
            if not self._keep_in_chunk(chunk, start, stop):
                return
            start = stop

    def _keep_in_chunk(self, chunk: int, start: int, stop: int) -> bool:
        base = chunk * SNAPSHOT_CHUNK_BYTES
        covered = self.covered.get(chunk)
        if covered is None:
            if not self.job.take(SNAPSHOT_CHUNK_BYTES // SECTOR):
                return False
            covered = self.covered[chunk] = np.zeros(SNAPSHOT_CHUNK_BYTES // SECTOR, dtype=bool)
        first, last = (start - base) // SECTOR, (stop - base) // SECTOR
        free = np.flatnonzero(~covered[first:last]) + first
        for run in np.split(free, np.flatnonzero(np.diff(free) != 1) + 1) if len(free) else ():
            at, nbytes = base + int(run[0]) * SECTOR, len(run) * SECTOR
            if not self.job.take(nbytes + KEPT_PIECE_OVERHEAD):
                return False
            self.kept.setdefault(chunk, []).append((at, self.disk.read(at, nbytes)))
            covered[run] = True
        return True

    def _drop(self) -> None:
        """Forget what is kept (under ``lock``): an abandoned mark frees its memory."""
        self.kept.clear()
        self.covered.clear()

    # ---- the thread's side

    def sha256(self) -> str | None:
        """The disk's sha256 at the mark; None if the mark was abandoned."""
        digest = hashlib.sha256()
        while data := self.next_chunk():
            digest.update(data)  # off the lock: hashlib lets the loop run meanwhile
        return digest.hexdigest() if data is not None else None

    def next_chunk(self) -> bytes | bytearray | None:
        """The next chunk as it was at the mark, b"" past the end; None if the mark was
        abandoned."""
        with self.lock:
            if self.job.abandoned is not None:
                self._drop()
                return None
            at = self.cursor
            if at >= self.disk.size:
                return b""
            chunk = at // SNAPSHOT_CHUNK_BYTES
            data = self.disk.read(at, min(SNAPSHOT_CHUNK_BYTES, self.disk.size - at))
            kept = self.kept.pop(chunk, [])
            if self.covered.pop(chunk, None) is not None:
                self.job.give_back(SNAPSHOT_CHUNK_BYTES // SECTOR)
            self.cursor = at + len(data)
        if not kept:
            return data
        out = bytearray(data)
        for offset, old in kept:
            out[offset - at : offset - at + len(old)] = old
            self.job.give_back(len(old) + KEPT_PIECE_OVERHEAD)
        return out
