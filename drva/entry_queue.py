"""A domain's durable, unsealed log entries, in seq order, at a bounded cost per entry.

While a store is down, a domain's log entries pile up until the log is full: a 64 GiB log
of one-write 4 KiB frames is 16 M entries. Held as ``LogEntry`` objects (the object, its
ints, its two lists) they cost ~480 bytes each: 7.7 GB of RAM for that log. So the queue holds its oldest ``HOT_MAX`` entries
as objects, which is all of them while the store keeps up (the sealer's path is then the
same as with a plain deque), and the rest as rows of numpy blocks (``COLUMNS``, 64 bytes
an entry). What few entries have — marks, resync bounds, a cached frame — is kept beside
the rows in dicts keyed by the entry's number. Rows become objects a block at a time,
when the sealer has taken the objects before them (``popleft``).

Besides the entries, the queue keeps their payload bytes and their log strides as running
totals, so that the sealer's ``nbytes`` and the back-pressure's ``strides`` cost O(1).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from cdp.logfmt import entry_stride

#: Entries held as objects before the rest are held as rows (one segment of 4 KiB frames
#: at the default seal size is 4,096 entries).
HOT_MAX = 4096
#: Rows per numpy block of the entries beyond ``HOT_MAX``.
BLOCK_ROWS = 4096

COLUMNS = np.dtype([
    ("pos", "<i8"), ("first_seq", "<u8"), ("last_seq", "<u8"), ("nbytes", "<i8"),
    ("first_ts", "<u8"), ("last_ts", "<u8"), ("arrived", "<f8"), ("ts_floor", "<u8"),
])


class EntryQueue:
    """``LogEntry`` objects in, ``LogEntry`` objects out, first in first out (the deque
    operations the DRVA uses: ``append``, ``extend``, ``popleft``, ``clear``, ``[i]``,
    iteration, ``len``). An entry held as a row comes out as a new object equal to the
    one that went in (after ``raise_ts``): change an entry through the queue, never
    through an object that went into it."""

    def __init__(self, entries: Iterable[Any] = ()) -> None:
        self._reset()
        self.extend(entries)

    def _reset(self) -> None:
        self._hot: collections.deque[Any] = collections.deque()
        # Every block holds at least one row; all of its rows but the last block's are used.
        self._blocks: collections.deque[np.ndarray] = collections.deque()
        self._tail = 0  # rows used in _blocks[-1]
        self._cold_first = 0  # number of the first entry held as a row
        self._cold_len = 0
        # Of the entries held as rows, by number: what few of them have.
        self._marks: dict[int, list[tuple[int, str, int]]] = {}
        self._resync: dict[int, list[tuple[int, int]]] = {}
        self._frames: dict[int, Any] = {}
        self.nbytes = 0  # payload bytes of the entries held (LogEntry.nbytes)
        self.strides = 0  # log bytes they take (entry_stride of each)

    # ------------------------------------------------------------------ size

    def __len__(self) -> int:
        return len(self._hot) + self._cold_len

    def __bool__(self) -> bool:
        return bool(self._hot)  # never empty while rows are held (popleft thaws them)

    @property
    def rows(self) -> int:
        """How many entries are held as rows (the rest are objects)."""
        return self._cold_len

    # ------------------------------------------------------------------ in

    def append(self, entry: Any) -> None:
        self.nbytes += entry.nbytes
        self.strides += entry_stride(entry.nbytes)
        if not self._cold_len and len(self._hot) < HOT_MAX:
            self._hot.append(entry)
            return
        if not self._blocks or self._tail == BLOCK_ROWS:
            self._blocks.append(np.empty(BLOCK_ROWS, COLUMNS))
            self._tail = 0
        self._blocks[-1][self._tail] = (entry.pos, entry.first_seq, entry.last_seq, entry.nbytes,
                                        entry.first_ts, entry.last_ts, entry.arrived, entry.ts_floor)
        number = self._cold_first + self._cold_len
        if entry.marks:
            self._marks[number] = list(entry.marks)
        if entry.resync:
            self._resync[number] = list(entry.resync)
        if entry.frame is not None:
            self._frames[number] = entry.frame
        self._tail += 1
        self._cold_len += 1

    def extend(self, entries: Iterable[Any]) -> None:
        for entry in entries:
            self.append(entry)

    # ------------------------------------------------------------------ out

    def popleft(self) -> Any:
        entry = self._hot.popleft()  # IndexError when empty, as a deque's
        self.nbytes -= entry.nbytes
        self.strides -= entry_stride(entry.nbytes)
        if not self._hot and self._cold_len:
            self._thaw()
        return entry

    def clear(self) -> None:
        self._reset()

    def _thaw(self) -> None:
        """Make objects of the rows of the first block (the hot deque is empty)."""
        end = BLOCK_ROWS if len(self._blocks) > 1 else self._tail
        rows = self._blocks[0][:end]
        self._hot.extend(self._objects(rows, self._cold_first, pop=True))
        self._cold_first += len(rows)
        self._cold_len -= len(rows)
        self._blocks.popleft()
        if not self._blocks:
            self._tail = 0

    def _objects(self, rows: np.ndarray, first_number: int, pop: bool) -> Iterator[Any]:
        """``LogEntry`` objects of ``rows`` (numbered from ``first_number``)."""
        from drva.domain import LogEntry  # the queue's items; domain imports this module

        take = dict.pop if pop else dict.get
        columns = [rows[name].tolist() for name in COLUMNS.names]
        for i, (pos, first_seq, last_seq, nbytes, first_ts, last_ts, arrived, ts_floor) in enumerate(zip(*columns)):
            n = first_number + i
            # Copies while the row stays: what changes an object must not change the row.
            marks, resync = list(take(self._marks, n, ())), list(take(self._resync, n, ()))
            yield LogEntry(pos, first_seq, last_seq, nbytes, first_ts, last_ts, arrived, marks, resync,
                           take(self._frames, n, None), ts_floor)

    def _spans(self) -> Iterator[tuple[np.ndarray, int]]:
        """The live rows, a block at a time, with the number of each span's first row."""
        number = self._cold_first
        last = len(self._blocks) - 1
        for i, block in enumerate(self._blocks):
            rows = block[:self._tail if i == last else BLOCK_ROWS]
            yield rows, number
            number += len(rows)

    def cached(self) -> Iterator[Any]:
        """The entries that hold a frame of the committer's cache (objects made only of
        those rows that do): what to ``uncache`` before the queue is cleared."""
        yield from (entry for entry in self._hot if entry.frame is not None)
        for number in sorted(self._frames):
            yield self[len(self._hot) + number - self._cold_first]

    def drop_frames(self) -> list[Any]:
        """Take every cached frame out of the queue; the entries that held one (their
        ``frame`` still set, for the caller to ``uncache``). A row's object is made for
        this: its frame lives beside it, and an object alone would not drop it."""
        held = list(self.cached())
        self._frames.clear()
        return held

    def __iter__(self) -> Iterator[Any]:
        yield from self._hot
        for rows, number in self._spans():
            yield from self._objects(rows, number, pop=False)

    def __getitem__(self, index: int) -> Any:
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("EntryQueue index out of range")
        if index < len(self._hot):
            return self._hot[index]
        block, row = divmod(index - len(self._hot), BLOCK_ROWS)
        rows = self._blocks[block][row:row + 1]
        return next(self._objects(rows, self._cold_first + index - len(self._hot), pop=False))

    @property
    def last_ts(self) -> int:
        """``self[-1].last_ts``, without making an object of a row."""
        if self._cold_len:
            return int(self._blocks[-1][self._tail - 1]["last_ts"])
        return self._hot[-1].last_ts

    # ------------------------------------------------------------------ change

    def raise_ts(self, floor: int) -> int:
        """Raise every entry's timestamps to at least the newest timestamp before it, and
        to at least ``floor`` (``LogEntry.raise_ts``, entry after entry); return the
        newest timestamp of the last entry (``floor`` if there is none)."""
        for entry in self._hot:
            entry.raise_ts(floor)
            floor = entry.last_ts
        for rows, number in self._spans():  # never empty: every block holds a row
            last = rows["last_ts"]
            # The floor each entry is raised to: the newest last_ts before it, or floor.
            before = np.maximum.accumulate(np.concatenate(([np.uint64(floor)], last[:-1])))
            low = np.flatnonzero(rows["first_ts"] < before)
            if len(low):
                raised = before[low]
                rows["ts_floor"][low] = raised
                rows["first_ts"][low] = raised
                rows["last_ts"][low] = np.maximum(last[low], raised)
                for i, to in zip(low.tolist(), raised.tolist()):
                    marks = self._marks.get(number + i)
                    if marks:
                        self._marks[number + i] = [(seq, name, max(ts, to)) for seq, name, ts in marks]
            floor = int(rows["last_ts"][-1])
        return floor
