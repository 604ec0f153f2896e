"""Reading one timeline of a catalog: its segment rows, fetched page by page (FORMAT.md §8.4).

A ``CatalogView`` is a head (``CatalogState``) seen through one timeline. What is small
(disks, bases, marks, windows, seqs) is an attribute; the segment rows are behind async
methods that walk the page tree and fetch only the pages that overlap the seqs or time
asked for, each verified against the reference that led to it — and its rows against
the timeline's history (§8.5) — and kept in a bounded cache (pages are immutable, so a
cached page never goes stale).

Only rows that retention keeps (``last_seq > horizon_seq``) are returned.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator

import numpy as np

from cdp.catalog_page import (
    PAGE_ENTRIES_MAX, PAGE_ENTRY_BYTES, PAGE_HEADER_BYTES, Page, decode_page, empty_rows, ref_key,
    rows_lineage_problem,
)
from cdp.catalog_state import CatalogState, Timeline
from cdp.gather import gather_bounded
from cdp.layout import U64_MAX, segment_key, segment_prefix
from cdp.errors import FormatError
from cdp.segment import SegmentIndex, read_segment_index
from cdp.store.base import ObjectStore, get_bounded

#: Pages fetched at once.
PAGE_FETCH_CONCURRENCY = 8
#: Pages kept in a view's cache (a level-0 page is 16 KiB: 4 MiB at most).
PAGE_CACHE_MAX = 256


class CatalogView:
    """Timeline ``timeline`` (default: the current one) of ``state``, read from ``store``."""

    def __init__(self, store: ObjectStore, state: CatalogState, generation: int = 0,
                 timeline: int | None = None) -> None:
        self.store = store
        self.state = state
        self.generation = generation
        self.tl: Timeline = state.timeline(timeline)
        self._history = state.history(self.tl.id)
        self._cache: OrderedDict[str, Page] = OrderedDict()
        self.pages_read = 0

    # ---- the small part of the head

    @property
    def timeline_id(self) -> int:
        return self.tl.id

    @property
    def domain_id(self) -> int:
        return self.state.domain_id

    @property
    def domain(self) -> dict:
        return self.state.domain

    @property
    def disks(self) -> list[dict]:
        return self.state.disks

    @property
    def bases(self) -> list[dict]:
        return self.tl.bases

    @property
    def marks(self) -> list[dict]:
        return self.tl.marks

    @property
    def windows(self) -> list[dict]:
        return self.tl.windows

    @property
    def committed_seq(self) -> int:
        return self.tl.committed_seq

    @property
    def horizon_seq(self) -> int:
        return self.tl.horizon_seq

    @property
    def horizon_ts(self) -> int:
        """The time of the record at ``horizon_seq``; 0 when the catalog does not know it."""
        return self.tl.horizon_ts

    @property
    def segment_count(self) -> int:
        """Rows held, counted from the references (no page is read); may include a few
        that retention has passed but whose page is still partly needed."""
        return self.tl.segments

    def segment_keys(self, rows: np.ndarray) -> list[str]:
        """§7 keys of the segment objects of ``ROW_DTYPE`` rows."""
        return [segment_key(self.domain_id, t, a, b) for t, a, b in
                zip(rows["timeline"].tolist(), rows["first_seq"].tolist(), rows["object_last_seq"].tolist())]

    def segment_prefixes(self) -> list[str]:
        return [segment_prefix(self.domain_id, t) for t, _ in self.state.lineage(self.timeline_id)]

    # ---- pages

    async def page(self, ref: np.void) -> Page:
        key = ref_key(self.domain_id, ref)
        page = self._cache.get(key)
        if page is not None:
            self._cache.move_to_end(key)
            return page
        # Exactly a header and its entries (§8.4): a larger object is refused unread.
        size = PAGE_HEADER_BYTES + PAGE_ENTRY_BYTES * min(int(ref["count"]), PAGE_ENTRIES_MAX)
        page = decode_page(key, await get_bounded(self.store, key, size), ref)
        # Pages are shared and name no timeline: their rows must lie in this timeline's
        # history, or a forged page makes it recover another branch's segments.
        problem = rows_lineage_problem(page.entries, self._history) if page.level == 0 else None
        if problem is not None:
            raise FormatError(f"catalog page {key}: {problem}, read for timeline {self.tl.id}")
        self.pages_read += 1
        self._cache[key] = page
        if len(self._cache) > PAGE_CACHE_MAX:
            self._cache.popitem(last=False)
        return page

    async def _rows_under(self, refs: np.ndarray, first: int, last: int) -> list[np.ndarray]:
        """Rows overlapping ``first..last`` under the page references ``refs``, in order."""
        sel = refs[(refs["last_seq"] >= np.uint64(first)) & (refs["first_seq"] <= np.uint64(last))]
        pages = await gather_bounded((self.page(r) for r in sel), PAGE_FETCH_CONCURRENCY)
        out: list[np.ndarray] = []
        for page in pages:
            if page.level == 0:
                rows = page.entries
                out.append(rows[(rows["last_seq"] >= np.uint64(first)) & (rows["first_seq"] <= np.uint64(last))])
            else:
                out.extend(await self._rows_under(page.entries, first, last))
        return out

    async def rows_between(self, first: int, last: int) -> np.ndarray:
        """The retained rows holding any seq in ``first..last`` (``ROW_DTYPE``, in order)."""
        first = max(first, self.horizon_seq + 1)
        if first > last:
            return empty_rows()
        parts = await self._rows_under(self.tl.refs, first, last)
        tail = self.tl.tail
        parts.append(tail[(tail["last_seq"] >= np.uint64(first)) & (tail["first_seq"] <= np.uint64(last))])
        return np.concatenate(parts) if parts else empty_rows()

    async def row_for_seq(self, seq: int) -> np.void | None:
        """The retained row holding ``seq``, or None."""
        rows = await self.rows_between(seq, seq)
        return rows[0] if len(rows) else None

    async def iter_rows(self) -> AsyncIterator[np.ndarray]:
        """Every retained row, a level-0 page (or the tail) at a time, oldest first. A
        page under a reference that the horizon cuts through may lie wholly behind it:
        it is not read (the retention sweep may have deleted it)."""
        horizon = np.uint64(self.horizon_seq)

        async def walk(refs: np.ndarray) -> AsyncIterator[np.ndarray]:
            for ref in refs[refs["last_seq"] > horizon]:
                page = await self.page(ref)
                if page.level == 0:
                    rows = page.entries
                    yield rows[rows["last_seq"] > horizon]
                else:
                    async for rows in walk(page.entries):
                        yield rows

        async for rows in walk(self.tl.refs):
            yield rows
        yield self.tl.tail[self.tl.tail["last_seq"] > horizon]

    def row_key(self, row: np.void) -> str:
        """§7 key of the segment object of one row."""
        return segment_key(self.domain_id, int(row["timeline"]), int(row["first_seq"]), int(row["object_last_seq"]))

    async def record_time(self, row: np.void, seq: int) -> int:
        """``timestamp_ns`` of record ``seq`` of ``row``'s segment (reads its index
        unless ``seq`` ends or starts the row)."""
        if seq == int(row["last_seq"]):
            return int(row["last_ts"])
        if seq == int(row["first_seq"]):
            return int(row["first_ts"])
        key = self.row_key(row)
        recs = row_records(key, row, await read_segment_index(self.store, key))
        return int(recs["timestamp_ns"][seq - int(row["first_seq"])])

    async def time_of(self, seq: int) -> int | None:
        """``timestamp_ns`` of record ``seq``: ``horizon_ts`` at the horizon (when known),
        else from the retained row holding it (its segment's index unless ``seq`` ends or
        starts the row). None for seq 0 and for a seq whose time the head no longer holds."""
        if seq == self.horizon_seq:
            return self.horizon_ts or None
        row = await self.row_for_seq(seq) if seq > 0 else None
        return None if row is None else await self.record_time(row, seq)

    async def seq_at_time(self, t_ns: int) -> int | None:
        """The seq of the last record with ``timestamp_ns <= t_ns`` (None if none is held).

        The horizon point counts when its time is known (``horizon_ts``): from that time
        until the next record's it is the answer, though no row may hold it any more.
        Before the horizon, a seq below it (its segment may be gone) without reading it —
        not necessarily the exact one. Any int is asked: before the epoch nothing is held (a
        retention cutoff of now minus a window longer than since 1970), and after the u64
        times end, every record is."""
        if t_ns < 0:
            return None
        t_ns = min(t_ns, U64_MAX)
        seq = await self._seq_in_rows(t_ns)
        h, h_ts = self.horizon_seq, self.horizon_ts
        if not h_ts:
            return seq
        if t_ns < h_ts:  # before the horizon record, whatever a row straddling it says
            return None if seq is None else min(seq, h - 1)
        # At or after the horizon record: the rows answer from the record after it on.
        return seq if seq is not None and seq > h else h

    async def _seq_in_rows(self, t_ns: int) -> int | None:
        """``seq_at_time`` from the rows and pages the head references alone."""
        refs, rows = self.tl.refs, self.tl.tail
        while True:
            firsts = np.concatenate([refs["first_ts"], rows["first_ts"]])
            i = int(np.searchsorted(firsts, np.uint64(t_ns), side="right")) - 1
            if i < 0:
                return None
            entry = refs[i] if i < len(refs) else rows[i - len(refs)]
            if int(entry["last_ts"]) <= t_ns:
                # Entries do not overlap in time: nothing after this one is at or before t.
                return int(entry["last_seq"])
            if int(entry["last_seq"]) <= self.horizon_seq:
                # Some record before this entry's last (its time is after t), behind the
                # horizon: its segment may be gone, so which one is not read. Not the last:
                # an entry ending at the horizon would pass for the horizon point.
                return int(entry["last_seq"]) - 1
            if i >= len(refs):
                return await self._seq_in_segment(entry, t_ns)
            page = await self.page(entry)
            refs, rows = (page.entries, empty_rows()) if page.level else (self.tl.refs[:0], page.entries)

    async def _seq_in_segment(self, row: np.void, t_ns: int) -> int:
        key = self.row_key(row)
        recs = row_records(key, row, await read_segment_index(self.store, key))
        # row_records checked the first record's time is the row's first_ts <= t_ns: j >= 0.
        j = int(np.searchsorted(recs["timestamp_ns"], np.uint64(t_ns), side="right")) - 1
        return int(recs["seq"][j])


def row_records(key: str, row: np.void, index: SegmentIndex) -> np.ndarray:
    """The index records (a view) of catalog ``row``, whose segment ``key`` has ``index``,
    after checking that the two agree: ``payload_raw_len``, the row's seqs within the
    segment's, and the row's ``first_ts``/``last_ts`` equal to its first and last records'
    times. A segment rewritten with valid checksums but other times (or a catalog row that
    lies) is a FormatError naming both, not a wrong point in time for ``--at``."""
    first, last = int(row["first_seq"]), int(row["last_seq"])
    if index.payload_raw_len != int(row["payload_raw_len"]):
        raise FormatError(f"segment {key}: payload_raw_len {index.payload_raw_len}, the catalog "
                          f"says {int(row['payload_raw_len'])}")
    if not index.first_seq <= first <= last <= index.last_seq:
        raise FormatError(f"segment {key}: holds seqs {index.first_seq}..{index.last_seq}, the catalog "
                          f"row names {first}..{last}")
    recs = index.rows_for_seqs(first, last)
    got = (int(recs["timestamp_ns"][0]), int(recs["timestamp_ns"][-1]))
    said = (int(row["first_ts"]), int(row["last_ts"]))
    if got != said:
        raise FormatError(f"segment {key}: seqs {first}..{last} are timed {got[0]}..{got[1]} ns, the catalog "
                          f"says {said[0]}..{said[1]}")
    return recs
