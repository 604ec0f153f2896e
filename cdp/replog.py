"""The replication-log partition: a circular, checksummed, crash-safe log of frames.

Layout and rules are docs/FORMAT.md §3. This class does the I/O:

* ``format`` writes two superblocks on a preallocated file or an existing block device.
* ``open`` locks the partition (one writer, §3.2), picks the newest valid superblock,
  scans from ``head`` — reading the device, not the page cache — and stops at the first
  invalid entry: a torn tail is cut quietly, damage where durable data must be raises
  ``LogCorruption`` (§3.5). It then bumps the epoch durably before any append.
* ``append_batch`` is the group commit: every body of the batch is written with
  ``pwritev`` and made durable by one ``fdatasync``; when it returns, all of them are
  durable, and the caller may ack them. It never writes anything when the batch does not
  fit (``LogFull``).
* ``trim`` moves ``head`` forward durably; the freed bytes are reused only after that.

Invariants: ``head <= tail``; ``tail - durable_head <= data_size``; every position in
``[head, tail)`` that starts an entry holds a valid entry of this partition; ``_bounds``
lists those positions in order. One writer at a time: ``append_batch`` and ``trim`` take
a lock, so the daemon may run them in a worker thread while its event loop carries on.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

# Every write and sync goes through cdp.durable, looked up at each call: the one place
# that makes bytes durable, where tests record their order (test_durable_order.py).
from cdp import durable
from cdp.errors import LogCorruption, LogError, LogFull
from cdp.frame import FRAME_LEN_MAX
from cdp.logfmt import (
    BLOCK, DATA_START, EMPTY_XXH3, ENTRY_HEADER_SIZE, KIND_DATA, KIND_PAD,
    Superblock, align_up, entry_stride, pack_entry_header, pack_superblock,
    unpack_entry_header,
)
from cdp.replog_format import format_partition
from cdp.replog_reads import check_kind, pread_checked, read_superblocks, scan_source

COMMIT_BYTES_MAX_DEFAULT = 128 << 20
_ZEROS = memoryview(bytes(BLOCK))
_LOOKAHEAD_CHUNK = 1 << 20
#: The recovery scan reads the ring in chunks of this size (entries are 4 KiB and up: one
#: read per entry would cost one device round trip each through ``O_DIRECT``).
SCAN_CHUNK_BYTES = 1 << 20

Body = Sequence[bytes | bytearray | memoryview]


@dataclass(frozen=True, slots=True)
class LogStats:
    head: int
    tail: int
    data_size: int
    used_bytes: int
    free_bytes: int
    epoch: int


class ReplicationLog:
    """A replication-log partition opened for writing (see the module docstring)."""

    def __init__(self, path: Path, fd: int, sb: Superblock, direct: bool) -> None:
        self.path = path
        self._fd = fd
        self._sb = sb
        self._direct = direct
        self._lock = threading.Lock()
        self._bounds: collections.deque[int] = collections.deque()
        self._tail = sb.head
        self._durable_head = sb.head
        self._body_len_max = FRAME_LEN_MAX
        self._closed = False
        self._readonly = False
        # Reads go through ``_read``: ``_rfd``/``_rdirect`` is the recovery scan's own
        # source while it runs (``_scan_source``), and ``_window`` its read-ahead chunk.
        self._rfd = fd
        self._rdirect = direct
        self._window: tuple[int, bytes] | None = None
        self._rejected = ""  # why a superblock copy was refused at open ("": none)

    # ------------------------------------------------------------------ format / open

    @classmethod
    def format(cls, path: str | os.PathLike[str], size: int | None = None, *, label: str = "",
               commit_bytes_max: int = COMMIT_BYTES_MAX_DEFAULT, force: bool = False) -> None:
        """Create a partition: preallocate a regular file of ``size`` bytes (or use the
        whole block device at ``path``) and write both superblocks. Destroys the log;
        refused under a writer and, without ``force``, over data (``cdp.replog_format``)."""
        format_partition(Path(path), size, label=label, commit_bytes_max=commit_bytes_max, force=force)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, direct: bool = False, readonly: bool = False,
             check_label: Callable[[str], None] | None = None) -> "ReplicationLog":
        """Open for writing: lock, recover (§3.5), then bump the epoch durably.

        ``readonly`` recovers the same way but writes nothing and takes no lock
        (inspection tools); such a log refuses appends and trims. ``check_label`` sees
        the superblock's label before anything is scanned or written, and raises to
        refuse the partition (a DRVA refusing another's log leaves it as it was).
        """
        path = Path(path)
        # O_NONBLOCK only so that opening a FIFO planted at ``path`` does not wait for a
        # writer; ``_check_kind`` refuses it and clears the flag.
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NONBLOCK | (
            getattr(os, "O_DIRECT", 0) if direct else 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise LogError(f"log partition {path}: cannot open ({exc.strerror})") from exc
        try:
            check_kind(path, fd)
            if not readonly:
                durable.lock_exclusive(fd, LogError, f"log partition {path}")  # one writer (§3.2), until close
            size = os.lseek(fd, 0, os.SEEK_END)
            scan_fd, scan_direct = scan_source(path, fd, direct, sync=not readonly)
            try:
                sb, rejected = cls._read_superblocks(path, scan_fd, scan_direct, size)
                if check_label is not None:
                    check_label(sb.label)
                log = cls(path, fd, sb, direct)
                log._rejected = rejected
                log._rfd, log._rdirect = scan_fd, scan_direct
                log._window = (0, b"")
                log._recover()
            finally:
                if scan_fd != fd:
                    os.close(scan_fd)
            log._rfd, log._rdirect, log._window = fd, direct, None
            log._readonly = readonly
            if not readonly:
                log._write_superblock(log._sb.next(epoch=sb.epoch + 1, tail_hint=log._tail))
        except BaseException:
            os.close(fd)  # releases the lock too
            raise
        return log

    @staticmethod
    def _read_superblocks(path: Path, fd: int, direct: bool, size: int) -> tuple[Superblock, str]:
        return read_superblocks(path, fd, direct, size)

    def _phys(self, pos: int) -> int:
        return DATA_START + pos % self._sb.data_size

    def _recover(self) -> None:
        """Scan ``[head, …)`` and set ``tail`` (FORMAT.md §3.5)."""
        sb = self._sb
        pos, prev_epoch, reason = sb.head, 0, "end of ring"
        while pos - sb.head < sb.data_size:
            got = self._check_entry(pos, prev_epoch, sb.epoch)
            if isinstance(got, str):
                reason = got
                break
            stride, epoch, _ = got
            self._bounds.append(pos)
            prev_epoch = epoch
            pos += stride
        if pos < sb.tail_hint:
            raise LogCorruption(
                f"log partition {self.path}: invalid entry at position {pos} (offset "
                f"{self._phys(pos)}): {reason}; the superblock records durable data up to "
                f"position {sb.tail_hint}{self._fallback_note()}"
            )
        later = self._later_commit_after(pos, prev_epoch)
        if later is not None:
            raise LogCorruption(
                f"log partition {self.path}: invalid entry at position {pos} (offset "
                f"{self._phys(pos)}): {reason}; a later group commit starts at position "
                f"{later}, so this data was durable: damage in the middle of the log"
                f"{self._fallback_note()}"
            )
        self._tail = pos

    def _fallback_note(self) -> str:
        """For a corruption message: the superblock copy refused at open, if one was — the
        scan then started from the other, possibly older, copy's head (§3.2)."""
        if not self._rejected:
            return ""
        return (f" (superblock {self._rejected} — refused, so the scan used copy "
                f"{self._sb.copy_index()}, generation {self._sb.generation}, head {self._sb.head})")

    def _check_entry(self, pos: int, prev_epoch: int,
                     epoch_max: int) -> tuple[int, int, memoryview | None] | str:
        """(stride, epoch, body) of the valid entry at ``pos`` — body None for a PAD — or
        why there is none. Reads the entry once."""
        lap_left = self._sb.data_size - pos % self._sb.data_size
        raw = self._read(min(BLOCK, lap_left), self._phys(pos), pos)
        h = unpack_entry_header(raw, pos, self._sb.uuid, self._body_len_max)
        if isinstance(h, str):
            return h
        if not prev_epoch <= h.epoch <= epoch_max:
            return f"entry epoch {h.epoch} outside {prev_epoch}..{epoch_max}"
        if h.kind == KIND_PAD:
            return lap_left, h.epoch, None
        stride = entry_stride(h.body_len)
        if stride > lap_left:
            return f"entry of {stride} bytes crosses the end of the ring"
        body = self._read_body(pos, h.body_len, raw)
        if xxhash.xxh3_64_intdigest(body) != h.body_xxh3:
            return "entry body checksum mismatch"
        return stride, h.epoch, body

    def _read_body(self, pos: int, body_len: int, first_block: bytes | memoryview) -> memoryview:
        end = ENTRY_HEADER_SIZE + body_len
        if end <= len(first_block):
            return memoryview(first_block)[ENTRY_HEADER_SIZE:end]
        raw = self._read(align_up(end), self._phys(pos), pos)
        return memoryview(raw)[ENTRY_HEADER_SIZE:end]

    def _read(self, n: int, offset: int, pos: int) -> bytes | memoryview:
        """``n`` bytes at physical ``offset`` (logical ``pos``, for messages), never past
        the ring's end; ``LogError`` naming both on an I/O error. During the recovery scan
        it serves them from a read-ahead chunk of ``SCAN_CHUNK_BYTES``."""
        if self._window is None:
            return pread_checked(self.path, self._rfd, n, offset, self._rdirect, f"position {pos}")
        start, data = self._window
        if not start <= offset <= offset + n <= start + len(data):
            want = min(max(n, SCAN_CHUNK_BYTES), DATA_START + self._sb.data_size - offset)
            data = pread_checked(self.path, self._rfd, max(n, want), offset, self._rdirect,
                                  f"position {pos}")
            start = offset
            self._window = (start, data)
        return memoryview(data)[offset - start : offset - start + n]

    def _later_commit_after(self, end: int, last_epoch: int) -> int | None:
        """Position of a valid entry header in ``(end, end + commit_bytes_max]`` whose
        group commit started after ``end`` (proof that ``end`` was not the tail)."""
        sb = self._sb
        limit = min(end + sb.commit_bytes_max, sb.head + sb.data_size - BLOCK)
        b = end + BLOCK
        while b <= limit:
            lap_left = sb.data_size - b % sb.data_size
            n = min(_LOOKAHEAD_CHUNK, lap_left, align_up(limit - b + BLOCK))
            raw = memoryview(self._read(n, self._phys(b), b))
            for off in range(0, len(raw), BLOCK):
                if raw[off : off + 4] != b"CDPL":  # cheap pre-filter before the checksum
                    continue
                h = unpack_entry_header(raw[off : off + BLOCK], b + off, sb.uuid, self._body_len_max)
                if not isinstance(h, str) and h.epoch >= last_epoch and h.commit_pos > end:
                    return b + off
            b += n
        return None

    # ------------------------------------------------------------------ writing

    def append_batch(self, bodies: Sequence[Body]) -> list[int]:
        """Append every body as one group commit; return their positions, all durable.

        Each body is a sequence of buffers (e.g. the parts of ``encode_frame_parts``),
        written without being joined. Raises ``LogFull`` — writing nothing — when the
        batch does not fit behind the durable head.
        """
        if not bodies:
            return []
        with self._lock:
            self._check_open()
            plans = [(b, sum(len(memoryview(p).cast("B")) for p in b)) for b in bodies]
            for _, n in plans:
                if n > self._body_len_max:
                    raise LogError(f"log partition {self.path}: entry body of {n} bytes > {self._body_len_max}")
            self._check_space(plans)
            positions: list[int] = []
            run: list[tuple[Body, int]] = []
            run_bytes = 0
            for body, n in plans:
                stride = entry_stride(n)
                run_end = self._tail + run_bytes
                if run and run_end % self._sb.data_size == 0:
                    # The run ends exactly at the end of the lap: a commit is one
                    # physically contiguous write, so the next entry starts another.
                    positions += self._commit(run)
                    run, run_bytes = [], 0
                if stride > self._sb.data_size - run_end % self._sb.data_size:
                    positions += self._commit(run)
                    run, run_bytes = [], 0
                    self._commit_pad()
                elif run_bytes + stride > self._sb.commit_bytes_max:
                    positions += self._commit(run)
                    run, run_bytes = [], 0
                run.append((body, n))
                run_bytes += stride
            positions += self._commit(run)
            return positions

    def _planned_tails(self, body_lens: Sequence[int]) -> list[int]:
        """The tail after each body if they were appended now, PADs included."""
        ds = self._sb.data_size
        tail = self._tail
        tails = []
        for n in body_lens:
            stride = entry_stride(n)
            if stride > ds - tail % ds:
                tail += ds - tail % ds  # the PAD to the end of the lap
            tail += stride
            tails.append(tail)
        return tails

    def fits(self, body_lens: Sequence[int]) -> int:
        """How many of these bodies, in order, ``append_batch`` would take right now."""
        limit = self._durable_head + self._sb.data_size
        return sum(1 for t in self._planned_tails(body_lens) if t <= limit)

    def _check_space(self, plans: list[tuple[Body, int]]) -> None:
        ds = self._sb.data_size
        tails = self._planned_tails([n for _, n in plans])
        if tails[-1] - self._durable_head > ds:
            raise LogFull(
                f"log partition {self.path}: batch needs {tails[-1] - self._tail} bytes, "
                f"{ds - (self._tail - self._durable_head)} free of {ds}"
            )

    def _commit(self, run: list[tuple[Body, int]]) -> list[int]:
        """One group commit of DATA entries: contiguous in the ring, one fdatasync."""
        if not run:
            return []
        commit_pos = pos = self._tail
        iov: list[bytes | memoryview] = []
        positions = []
        for body, n in run:
            h = xxhash.xxh3_64()
            for part in body:
                h.update(part)
            iov.append(pack_entry_header(KIND_DATA, pos, commit_pos, self._sb.epoch, n,
                                         h.intdigest(), self._sb.uuid))
            iov.extend(memoryview(p).cast("B") for p in body)
            stride = entry_stride(n)
            pad = stride - ENTRY_HEADER_SIZE - n
            while pad:
                iov.append(_ZEROS[: min(pad, BLOCK)])
                pad -= len(iov[-1])
            positions.append(pos)
            pos += stride
        self._write(iov, commit_pos, pos - commit_pos)
        durable.sync_data(self._fd)  # only now may the caller ack these entries
        self._bounds.extend(positions)
        self._tail = pos
        return positions

    def _commit_pad(self) -> None:
        """Fill the rest of the lap with a PAD entry, as a commit of its own."""
        pos = self._tail
        header = pack_entry_header(KIND_PAD, pos, pos, self._sb.epoch, 0, EMPTY_XXH3, self._sb.uuid)
        self._write([header, _ZEROS[ENTRY_HEADER_SIZE:]], pos, BLOCK)
        durable.sync_data(self._fd)
        self._bounds.append(pos)
        self._tail = pos + self._sb.data_size - pos % self._sb.data_size

    def _write(self, iov: list, pos: int, nbytes: int) -> None:
        """Write ``nbytes`` (a multiple of BLOCK, inside one lap) at logical ``pos``."""
        offset = self._phys(pos)
        assert offset + nbytes <= DATA_START + self._sb.data_size, "a write crosses the ring end"
        if self._direct:
            buf = durable.aligned_buffer(nbytes)
            at = 0
            for part in iov:
                buf[at : at + len(part)] = part
                at += len(part)
            durable.pwrite_all(self._fd, [memoryview(buf)[:nbytes]], offset)
            buf.close()
        else:
            durable.pwrite_all(self._fd, iov, offset)

    def trim(self, pos: int) -> None:
        """Drop every entry before ``pos`` (an entry boundary or the tail), durably."""
        with self._lock:
            self._check_open()
            if pos == self._sb.head:
                return
            if not self._sb.head < pos <= self._tail:
                raise LogError(
                    f"log partition {self.path}: trim to {pos} outside [{self._sb.head}, {self._tail}]"
                )
            while self._bounds and self._bounds[0] < pos:
                self._bounds.popleft()
            if pos != self._tail and (not self._bounds or self._bounds[0] != pos):
                raise LogError(f"log partition {self.path}: trim to {pos}, not an entry boundary")
            self._write_superblock(self._sb.next(head=pos, tail_hint=self._tail))

    def _write_superblock(self, sb: Superblock) -> None:
        raw = pack_superblock(sb)
        durable.pwrite_all(self._fd, [_aligned_copy(raw) if self._direct else raw], sb.copy_index() * BLOCK)
        durable.sync_data(self._fd)
        self._sb = sb
        self._durable_head = sb.head

    # ------------------------------------------------------------------ reading

    def read(self, pos: int) -> bytes:
        """The body of the live DATA entry at ``pos``, checked again (§3.3)."""
        return bytes(self.read_view(pos))

    def read_view(self, pos: int) -> memoryview:
        """``read``, as a read-only view of the bytes read (no copy)."""
        if not self._sb.head <= pos < self._tail:
            raise LogError(f"log partition {self.path}: position {pos} outside [{self.head}, {self.tail})")
        body = self._checked_body(pos)
        if body is None:
            raise LogError(f"log partition {self.path}: position {pos} is a PAD entry")
        return body

    def _checked_body(self, pos: int) -> memoryview | None:
        """The body of the live entry at ``pos`` (None for a PAD), checked again (§3.3)."""
        got = self._check_entry(pos, 0, self._sb.epoch)
        if isinstance(got, str):
            raise LogCorruption(f"log partition {self.path}: entry at position {pos}: {got}")
        return got[2]

    def entries(self, start: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(position, body) of every live DATA entry from ``start`` (default ``head``)."""
        start = self._sb.head if start is None else start
        for pos in list(self._bounds):
            if pos < start:
                continue
            body = self._checked_body(pos)
            if body is not None:
                yield pos, bytes(body)

    def next_position(self, pos: int) -> int:
        """The entry boundary right after the entry at ``pos`` (the trim point once that
        entry's data is safe elsewhere)."""
        for b in self._bounds:
            if b > pos:
                return b
        return self._tail

    # ------------------------------------------------------------------ state

    @property
    def head(self) -> int:
        return self._sb.head

    @property
    def tail(self) -> int:
        return self._tail

    @property
    def data_size(self) -> int:
        return self._sb.data_size

    @property
    def epoch(self) -> int:
        return self._sb.epoch

    @property
    def label(self) -> str:
        return self._sb.label

    def stats(self) -> LogStats:
        used = self._tail - self._durable_head
        return LogStats(self.head, self._tail, self._sb.data_size, used,
                        self._sb.data_size - used, self._sb.epoch)

    def _check_open(self) -> None:
        if self._closed:
            raise LogError(f"log partition {self.path}: closed")
        if self._readonly:
            raise LogError(f"log partition {self.path}: opened read-only")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> "ReplicationLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _aligned_copy(raw: bytes) -> memoryview:
    buf = durable.aligned_buffer(len(raw))
    buf[: len(raw)] = raw
    return memoryview(buf)[: len(raw)]
