"""Replay of block traces in the MSR Cambridge CSV format, as a workload.

Each line is ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime``:
Timestamp in Windows filetime (100 ns ticks), Type ``Read`` or ``Write``, Offset and Size
in bytes. There is no header (a first line starting with ``Timestamp`` is skipped); blank
lines are skipped; a ``.gz`` file is read through gzip.

Only writes are replayed, onto the disks of one domain:

- (Hostname, DiskNumber) picks the disk: through ``disk_map`` when given (pairs it does
  not name are dropped and counted), else by order of first appearance among the write
  lines, modulo the number of disks.
- The range is widened to sectors — offset down, end up, to multiples of 512 — then
  fitted to the disk. ``fit="clip"`` drops writes that start at or past the end of the
  disk and cuts the ones that cross it; ``fit="wrap"`` takes the offset modulo the disk
  size first (a 64 MiB simulated disk then sees all of a 100 GB volume's writes), then
  cuts at the end. A zero-byte write is dropped.
- A write longer than ``WRITE_SIZE_MAX`` becomes consecutive pieces of at most that.
- Its payload is ``payloads.trace_payload(n, length)`` where ``n`` is the 0-based number
  of its line among the trace's write lines, so a replay is the same every time (a
  piece carries the matching slice).

Timing: ``speed=None`` replays as fast as the caller asks; ``speed=s`` releases a write
once ``(its timestamp − the first line's) / s`` seconds have passed since the first
``paced_batch`` call (timestamps going backwards are treated as the latest seen so far).

The file is streamed ``lines_per_batch`` lines at a time: memory stays bounded whatever
its size. A malformed line raises ConfigError naming the file and the line number, or
with ``strict=False`` is skipped and counted in ``stats.malformed``.
"""

from __future__ import annotations

import gzip
import io
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cdp.errors import ConfigError
from cdp.records import KIND_WRITE, OFFSET_END_MAX, SECTOR
from iofilter_sim.payloads import STYLES, WRITE_SIZE_MAX, trace_payloads
from iofilter_sim.workloads import BATCH_WRITES_MAX, WriteBatch

FIELDS = ("Timestamp", "Hostname", "DiskNumber", "Type", "Offset", "Size", "ResponseTime")
FILETIME_TICK_S = 1e-7
LINES_PER_BATCH = 4096
FITS = ("clip", "wrap")
# A write is released up to this much (trace seconds) before it is due, so that sleeping
# exactly ``delay_s()`` (which aims at the due time) releases it despite float rounding.
DUE_SLACK_S = 1e-6


@dataclass
class TraceStats:
    """What the replay has read so far, by line and by fate."""

    lines: int = 0  # lines read, blank ones included
    reads: int = 0  # read lines (ignored)
    writes: int = 0  # write lines
    malformed: int = 0  # lines skipped because strict=False
    unmapped: int = 0  # writes on a (host, disk) that disk_map does not name
    beyond_end: int = 0  # writes starting at or past the end of their disk (fit="clip")
    empty: int = 0  # writes of 0 bytes
    pieces: int = 0  # writes handed out (a long write is several pieces)


class _Rows(NamedTuple):
    """The valid lines of one chunk, column by column."""

    ts: np.ndarray  # int64 filetime ticks
    host: np.ndarray  # bytes (S dtype)
    disk: np.ndarray  # int64 DiskNumber
    is_write: np.ndarray  # bool
    offset: np.ndarray  # int64 bytes
    size: np.ndarray  # int64 bytes


class _Pieces(NamedTuple):
    """Writes ready to hand out, in trace order."""

    disk: np.ndarray  # int64 disk index in the domain
    offset: np.ndarray  # int64
    length: np.ndarray  # int64
    due_s: np.ndarray  # float64 seconds after the first line, non-decreasing
    seq: np.ndarray  # int64 write-line number (the payload's key)
    piece_offset: np.ndarray  # int64 offset of this piece inside its write's payload


class _BadLine(Exception):
    pass


def _parse_line(fields: list[bytes]) -> tuple[int, bytes, int, bool, int, int]:
    """One line's values, or _BadLine saying what is wrong with it."""
    if len(fields) != len(FIELDS):
        raise _BadLine(f"expected {len(FIELDS)} comma-separated fields "
                       f"({','.join(FIELDS)}), got {len(fields)}")
    values = []
    for i in (0, 2, 4, 5):
        try:
            value = int(fields[i])
        except ValueError:
            value = -1
        if not 0 <= value <= OFFSET_END_MAX:
            raise _BadLine(f"{FIELDS[i]}: expected an integer in 0..2**62, got {fields[i]!r}")
        values.append(value)
    if values[2] + values[3] > OFFSET_END_MAX:
        raise _BadLine(f"Offset + Size: expected at most 2**62, got {values[2] + values[3]}")
    kind = fields[3].strip().lower()
    if kind not in (b"read", b"write"):
        raise _BadLine(f"Type: expected Read or Write, got {fields[3]!r}")
    host = fields[1].strip()
    if not host:
        raise _BadLine("Hostname: expected a name, got nothing")
    return values[0], host, values[1], kind == b"write", values[2], values[3]


def _disk_map(mapping: Mapping[Any, int] | None, count: int) -> dict[tuple[bytes, int], int] | None:
    """``{(host, disk_number): index}`` from keys ``(host, n)`` or ``"host:n"``."""
    if mapping is None:
        return None
    out: dict[tuple[bytes, int], int] = {}
    for key, index in mapping.items():
        pair = key.rsplit(":", 1) if isinstance(key, str) else key
        try:
            host, number = pair
            pair_key = (str(host).encode(), int(number))
        except (TypeError, ValueError):
            raise ConfigError(f"disk_map key {key!r}: expected 'host:disk_number' "
                              f"or (host, disk_number)") from None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ConfigError(f"disk_map[{key!r}]: expected a disk index in 0..{count - 1}, "
                              f"got {index!r}")
        out[pair_key] = index
    return out


class TraceWorkload:
    """A workload (see workloads.py for the contract) that replays one trace file.

    Invariant: pieces come out in trace order, each 512-aligned, 512 B ..
    ``WRITE_SIZE_MAX`` and inside its disk; at most one chunk of parsed lines is held.
    """

    kind = "trace"

    def __init__(self, path: str | Path, disk_sizes: Sequence[int], *,
                 speed: float | None = None, clock: Callable[[], float] = time.monotonic,
                 disk_map: Mapping[Any, int] | None = None, fit: str = "clip",
                 strict: bool = True, payload: str = "text",
                 lines_per_batch: int = LINES_PER_BATCH) -> None:
        self.path = Path(path)
        self.disk_sizes = np.asarray(disk_sizes, dtype=np.int64)
        if not len(self.disk_sizes) or ((self.disk_sizes <= 0) | (self.disk_sizes % SECTOR)).any():
            raise ConfigError(f"trace {self.path}: disk sizes {list(disk_sizes)}: expected "
                              f"at least one, each a multiple of 512 > 0")
        if speed is not None and not (0 < speed < float("inf")):
            raise ConfigError(f"trace {self.path}: speed: expected a number > 0, got {speed!r}")
        if fit not in FITS:
            raise ConfigError(f"trace {self.path}: fit: expected one of {FITS}, got {fit!r}")
        if payload not in STYLES:
            raise ConfigError(f"trace {self.path}: payload: expected one of {STYLES}, "
                              f"got {payload!r}")
        self.speed, self.fit, self.strict, self.payload = speed, fit, strict, payload
        self.stats = TraceStats()
        self._clock = clock
        self._map = _disk_map(disk_map, len(self.disk_sizes))
        self._auto: dict[tuple[bytes, int], int] = {}
        self._lines_per_batch = max(1, lines_per_batch)
        try:
            opener = gzip.open if self.path.suffix == ".gz" else open
            self._file: io.BufferedIOBase | None = opener(self.path, "rb")
        except OSError as exc:
            raise ConfigError(f"trace {self.path}: cannot open: {exc.strerror}") from exc
        self._ts0: int | None = None  # the first line's timestamp
        self._due_s = 0.0  # the latest due time handed to the buffer
        self._next_seq = 0
        self._buf = _Pieces(*(np.zeros(0, np.int64) for _ in range(6)))
        self._head = 0
        self._start: float | None = None  # clock() at the first paced_batch

    # ------------------------------------------------------------------ parsing

    def _read_rows(self, lines: list[bytes], first_line: int) -> _Rows:
        """Parse a chunk; the numpy path first, line by line only to find a bad line."""
        numbered = [(first_line + i, line.strip()) for i, line in enumerate(lines)]
        if first_line == 1 and numbered and numbered[0][1].lower().startswith(b"timestamp"):
            numbered = numbered[1:]  # a header line
        numbered = [(n, line) for n, line in numbered if line]
        rows = [line.split(b",") for _, line in numbered]
        try:
            if any(len(row) != len(FIELDS) for row in rows):
                raise ValueError
            cols = list(zip(*rows)) or [()] * len(FIELDS)
            ts, disk, offset, size = (np.array(cols[i], dtype=bytes).astype(np.int64)
                                      for i in (0, 2, 4, 5))
            kind = np.char.lower(np.char.strip(np.array(cols[3], dtype=bytes)))
            host = np.char.strip(np.array(cols[1], dtype=bytes))
            is_write = kind == b"write"
            bad = ((ts | disk | offset | size) < 0) | (offset > OFFSET_END_MAX - size)
            bad |= ~(is_write | (kind == b"read")) | (np.char.str_len(host) == 0)
            if bad.any():
                raise ValueError  # let the line-by-line parse name the line
            return _Rows(ts, host, disk, is_write, offset, size)
        except (ValueError, OverflowError):
            pass
        good = []
        for (number, _), row in zip(numbered, rows):
            try:
                good.append(_parse_line(row))
            except _BadLine as exc:
                if self.strict:
                    raise ConfigError(f"{self.path}:{number}: {exc}") from None
                self.stats.malformed += 1
        cols = list(zip(*good)) or [()] * 6
        return _Rows(np.array(cols[0], np.int64), np.array(cols[1], dtype=bytes),
                     np.array(cols[2], np.int64), np.array(cols[3], bool),
                     np.array(cols[4], np.int64), np.array(cols[5], np.int64))

    def _disk_index(self, host: np.ndarray, number: np.ndarray) -> np.ndarray:
        """Disk index per write (−1: not in disk_map), one dict lookup per distinct pair."""
        hosts, host_code = np.unique(host, return_inverse=True)
        numbers, number_code = np.unique(number, return_inverse=True)
        pair = host_code.astype(np.int64) * len(numbers) + number_code
        pairs, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
        index = np.empty(len(pairs), dtype=np.int64)
        for i in np.argsort(first).tolist():  # first appearance order
            key = (bytes(hosts[pairs[i] // len(numbers)]), int(numbers[pairs[i] % len(numbers)]))
            if self._map is not None:
                index[i] = self._map.get(key, -1)
            else:
                index[i] = self._auto.setdefault(key, len(self._auto) % len(self.disk_sizes))
        return index[inverse]

    def _to_pieces(self, rows: _Rows) -> _Pieces:
        """Map, align, fit and split the write lines of a chunk."""
        if self._ts0 is None and len(rows.ts):
            self._ts0 = int(rows.ts[0])
        w = np.flatnonzero(rows.is_write)
        self.stats.reads += len(rows.ts) - len(w)
        self.stats.writes += len(w)
        seq = self._next_seq + np.arange(len(w), dtype=np.int64)
        self._next_seq += len(w)
        disk = self._disk_index(rows.host[w], rows.disk[w]) if len(w) else np.zeros(0, np.int64)
        start = rows.offset[w] // SECTOR * SECTOR
        end = -(-(rows.offset[w] + rows.size[w]) // SECTOR) * SECTOR
        size = self.disk_sizes[np.maximum(disk, 0)]
        if self.fit == "wrap":
            end, start = end - (start - start % size), start % size
        keep = (disk >= 0) & (rows.size[w] > 0) & (start < size)
        self.stats.unmapped += int((disk < 0).sum())
        self.stats.empty += int(((disk >= 0) & (rows.size[w] == 0)).sum())
        self.stats.beyond_end += int(((disk >= 0) & (rows.size[w] > 0) & (start >= size)).sum())
        end = np.minimum(end, size)
        # Due times follow every write line, kept or not, so a dropped write still moves
        # the replay's clock forward.
        rel_s = (rows.ts[w] - (self._ts0 or 0)) * FILETIME_TICK_S
        due = np.maximum.accumulate(np.append(self._due_s, rel_s))[1:]
        if len(due):
            self._due_s = float(due[-1])
        k = np.flatnonzero(keep)
        return self._split(disk[k], start[k], end[k] - start[k], due[k], seq[k])

    @staticmethod
    def _split(disk: np.ndarray, offset: np.ndarray, length: np.ndarray, due: np.ndarray,
               seq: np.ndarray) -> _Pieces:
        """Cut each write into pieces of at most WRITE_SIZE_MAX, vectorised."""
        count = -(-length // WRITE_SIZE_MAX)
        which = np.repeat(np.arange(len(length)), count)
        first = np.repeat(np.cumsum(count) - count, count)
        piece_offset = (np.arange(len(which)) - first) * WRITE_SIZE_MAX
        piece_length = np.minimum(length[which] - piece_offset, WRITE_SIZE_MAX)
        return _Pieces(disk[which], offset[which] + piece_offset, piece_length, due[which],
                       seq[which], piece_offset)

    def _fill(self) -> bool:
        """Parse chunks until some piece is pending; False at the end of the trace."""
        while self._head >= len(self._buf.length):
            if self._file is None:
                return False
            lines = list(itertools.islice(self._file, self._lines_per_batch))
            if not lines:
                self.close()
                return False
            first_line = self.stats.lines + 1
            self.stats.lines += len(lines)
            try:
                rows = self._read_rows(lines, first_line)
            except ConfigError:
                self.close()  # a strict replay ends at its first malformed line
                raise
            self._buf, self._head = self._to_pieces(rows), 0
        return True

    # ------------------------------------------------------------------ workload contract

    @property
    def done(self) -> bool:
        """True once every write of the trace has been handed out (may read ahead)."""
        return not self._fill()

    def _take(self, max_writes: int, max_bytes: int, due_s: float | None) -> WriteBatch:
        parts: list[_Pieces] = []
        max_writes = min(int(max_writes), BATCH_WRITES_MAX)
        while max_writes > 0 and max_bytes >= SECTOR and self._fill():
            rest = _Pieces(*(col[self._head :] for col in self._buf))
            k = min(max_writes, int(np.searchsorted(np.cumsum(rest.length), max_bytes, "right")))
            if due_s is not None:
                k = min(k, int(np.searchsorted(rest.due_s, due_s, "right")))
            if k == 0:
                break
            parts.append(_Pieces(*(col[:k] for col in rest)))
            self._head += k
            max_writes -= k
            max_bytes -= int(rest.length[:k].sum())
        if not parts:
            return WriteBatch.empty()
        p = _Pieces(*(np.concatenate(cols) for cols in zip(*parts)))
        self.stats.pieces += len(p.length)
        payload = trace_payloads(p.seq, p.piece_offset, p.length, self.payload)
        return WriteBatch(p.disk.astype(np.uint32), p.offset.astype(np.uint64),
                          p.length.astype(np.uint32),
                          np.full(len(p.length), KIND_WRITE, np.uint16), payload)

    def next_batch(self, max_writes: int, max_bytes: int) -> WriteBatch:
        """The next writes of the trace, whatever their timestamps."""
        return self._take(max_writes, max_bytes, None)

    def _trace_now_s(self) -> float:
        now = self._clock()
        if self._start is None:
            self._start = now
        assert self.speed is not None
        return (now - self._start) * self.speed

    def paced_batch(self, max_writes: int, max_bytes: int) -> WriteBatch:
        """The writes whose time has come (all of them with ``speed=None``)."""
        if self.speed is None:
            return self.next_batch(max_writes, max_bytes)
        return self._take(max_writes, max_bytes, self._trace_now_s() + DUE_SLACK_S)

    def delay_s(self) -> float:
        """Seconds until the next write is due (0 when one is, or the trace is over)."""
        if self.speed is None or not self._fill():
            return 0.0
        due_s = float(self._buf.due_s[self._head])
        now_s = self._trace_now_s()
        return 0.0 if due_s <= now_s + DUE_SLACK_S else (due_s - now_s) / self.speed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TraceWorkload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
