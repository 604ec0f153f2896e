"""Catalog pages (FORMAT.md §8.4): the segment history as immutable, checksummed columns.

A timeline's segment rows live in an append-only tree of pages: a level-0 page holds up
to ``PAGE_ROWS`` rows, a level-``L`` page up to ``PAGE_FANOUT`` references to level-``L−1``
pages. The head (``cdp.catalog_state``) holds the references not yet folded into a
higher page and the newest rows (the tail), so its size does not grow with history.

This module is pure: the row and reference dtypes, the page codec, the checks a page and
a run of rows must pass, and ``plan_folds`` — which pages a writer must put after
appending rows. The I/O (putting, fetching, caching) is in ``cdp.catalog`` and
``cdp.catalog_read``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from cdp.errors import FormatError
from cdp.layout import U32_MAX, U64_MAX, page_key, parse_page_key
from cdp.summed import checked_body, pack_summed, unpack_summed
from cdp.sorted_find import find_keys

PAGE_MAGIC = b"CDPG"
PAGE_VERSION = 2  # the catalog's version (§8.4)
#: Rows per level-0 page, and the most rows a head's tail holds before it folds (§8.4).
PAGE_ROWS = 256
#: References per page of level >= 1 (§8.4).
PAGE_FANOUT = 64
#: Entries a page may hold (a reader's bound; writers use PAGE_ROWS / PAGE_FANOUT).
PAGE_ENTRIES_MAX = 65536
#: Levels a page tree may have: 256 * 64**7 segments is far beyond any history.
PAGE_LEVEL_MAX = 8

#: A segment row (§8.2): one segment object, or the part of it a timeline holds.
ROW_FIELDS = ("timeline", "first_seq", "last_seq", "object_last_seq", "first_ts", "last_ts",
              "size", "payload_raw_len")
ROW_DTYPE = np.dtype([(name, "<u8") for name in ROW_FIELDS])
#: A page reference (§8.2 ``pages``): ``level`` is the page's; inside a page body the
#: children's level is implied (one below the page's) and not stored.
REF_FIELDS = ("level", "first_seq", "last_seq", "first_ts", "last_ts", "count", "segments", "bytes", "hash")
REF_DTYPE = np.dtype([(name, "<u8") for name in REF_FIELDS])
CHILD_FIELDS = REF_FIELDS[1:]
assert ROW_DTYPE.itemsize == 64 and len(CHILD_FIELDS) * 8 == 64, "FORMAT.md §8.4: 64 bytes per entry"

# FORMAT.md §8.4: page header, 64 bytes; header_xxh3 (last field) covers [0, 56).
_HEADER = struct.Struct("<4sHBBIIQQQ16sQ")
assert _HEADER.size == 64, "FORMAT.md §8.4"
PAGE_HEADER_BYTES = _HEADER.size
PAGE_ENTRY_BYTES = ROW_DTYPE.itemsize
_HEADER_ZERO = {"reserved": (7, 1), "reserved2": (40, 16)}


def empty_rows() -> np.ndarray:
    return np.zeros(0, dtype=ROW_DTYPE)


def empty_refs() -> np.ndarray:
    return np.zeros(0, dtype=REF_DTYPE)


def ref_key(domain: int, ref: np.void) -> str:
    """The §7 key of the page ``ref`` (one ``REF_DTYPE`` entry) names."""
    return page_key(domain, int(ref["first_seq"]), int(ref["last_seq"]), int(ref["level"]), int(ref["hash"]))


def rows_problem(rows: np.ndarray) -> str | None:
    """What is wrong with a run of rows on their own (None: nothing): each row's ranges,
    and contiguity. Checked per column, not per row."""
    if not len(rows):
        return None
    bad = ((rows["last_seq"] < rows["first_seq"]) | (rows["object_last_seq"] < rows["last_seq"])
           | (rows["last_ts"] < rows["first_ts"]) | (rows["timeline"] < 1)
           | (rows["timeline"] > U32_MAX) | (rows["first_seq"] < 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return (f"row {i} is not a segment row (timeline {int(rows['timeline'][i])}, seqs "
                f"{int(rows['first_seq'][i])}..{int(rows['last_seq'][i])} of "
                f"..{int(rows['object_last_seq'][i])}, ts {int(rows['first_ts'][i])}..{int(rows['last_ts'][i])})")
    return _gap(rows, "row", "rows") or _backwards(rows, "row")


def refs_problem(refs: np.ndarray) -> str | None:
    """What is wrong with a run of page references on their own (None: nothing)."""
    if not len(refs):
        return None
    bad = ((refs["last_seq"] < refs["first_seq"]) | (refs["last_ts"] < refs["first_ts"])
           | (refs["count"] < 1) | (refs["count"] > PAGE_ENTRIES_MAX) | (refs["segments"] < refs["count"])
           | (refs["level"] >= PAGE_LEVEL_MAX) | (refs["first_seq"] < 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return (f"page reference {i} is not one (level {int(refs['level'][i])}, seqs "
                f"{int(refs['first_seq'][i])}..{int(refs['last_seq'][i])}, count {int(refs['count'][i])}, "
                f"segments {int(refs['segments'][i])})")
    return _gap(refs, "page reference", "pages") or _backwards(refs, "page reference")


def _gap(entries: np.ndarray, what: str, whats: str) -> str | None:
    """Where ``entries`` (rows or references) stop being contiguous in seq, if they do."""
    gap = np.flatnonzero(entries["first_seq"][1:] != entries["last_seq"][:-1] + np.uint64(1))
    if not len(gap):
        return None
    i = int(gap[0]) + 1
    return (f"{what} {i} starts at seq {int(entries['first_seq'][i])}, expected "
            f"{int(entries['last_seq'][i - 1]) + 1} ({whats} are contiguous)")


def _backwards(entries: np.ndarray, what: str) -> str | None:
    """Where ``entries`` (rows or references) go back in time, if they do: record times
    are non-decreasing along seq (§1), so each entry starts no earlier than the one
    before it ends — which is what lets ``--at`` binary-search the ``first_ts`` column."""
    back = np.flatnonzero(entries["first_ts"][1:] < entries["last_ts"][:-1])
    if not len(back):
        return None
    i = int(back[0]) + 1
    return (f"{what} {i} (seqs {int(entries['first_seq'][i])}..{int(entries['last_seq'][i])}) starts at ts "
            f"{int(entries['first_ts'][i])}, before {what} {i - 1} ends (ts {int(entries['last_ts'][i - 1])}): "
            f"record times are non-decreasing along seq (FORMAT.md §1)")


def rows_lineage_problem(rows: np.ndarray, history: list[tuple[int, int, int]]) -> str | None:
    """What is wrong with ``rows`` as rows of a timeline whose history is ``history``
    (``CatalogState.history``: per timeline of its lineage, ``(timeline, floor, cap)``:
    it holds that timeline's seqs ``floor + 1 .. cap``), None when nothing is: every
    row is of a timeline of the lineage and lies within that timeline's part, and only
    a row that ends at its part's end (the fork, §8.5) may be clipped
    (``object_last_seq > last_seq``). Checked per column, not per row."""
    if not len(rows):
        return None
    at, known = find_keys(np.array([t for t, _, _ in history], dtype=np.uint64), rows["timeline"])
    floor = np.array([f for _, f, _ in history], dtype=np.uint64)[at]
    cap = np.array([c for _, _, c in history], dtype=np.uint64)[at]
    bad = (~known | (rows["first_seq"] <= floor) | (rows["last_seq"] > cap)
           | ((rows["object_last_seq"] > rows["last_seq"]) & (rows["last_seq"] != cap)))
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    t = int(rows["timeline"][i])
    row = (f"row {i} (timeline {t}, seqs {int(rows['first_seq'][i])}..{int(rows['last_seq'][i])} of "
           f"..{int(rows['object_last_seq'][i])})")
    lineage = ", ".join(str(x) for x, _, _ in history)
    if not known[i]:
        return f"{row} is of no timeline of its lineage ({lineage})"
    part = f"{int(floor[i]) + 1}..{int(cap[i]) if int(cap[i]) != U64_MAX else ''}"
    if int(rows["first_seq"][i]) <= int(floor[i]) or int(rows["last_seq"][i]) > int(cap[i]):
        return f"{row} lies outside the seqs {part} that its history (lineage {lineage}) holds of timeline {t}"
    return f"{row} is clipped, but ends before the seqs {part} of timeline {t} in its history end"


def summary_ref(level: int, entries: np.ndarray, body_hash: int) -> np.ndarray:
    """The reference (one-element ``REF_DTYPE`` array) to a page of ``level`` holding
    ``entries`` (rows for level 0, references for higher levels)."""
    ref = np.zeros(1, dtype=REF_DTYPE)
    ref["level"] = level
    ref["first_seq"], ref["last_seq"] = entries["first_seq"][0], entries["last_seq"][-1]
    ref["first_ts"], ref["last_ts"] = entries["first_ts"][0], entries["last_ts"][-1]
    ref["count"] = len(entries)
    if level == 0:
        ref["segments"] = len(entries)
        ref["bytes"] = int(entries["size"].sum(dtype=np.uint64))
    else:
        ref["segments"] = int(entries["segments"].sum(dtype=np.uint64))
        ref["bytes"] = int(entries["bytes"].sum(dtype=np.uint64))
    ref["hash"] = body_hash
    return ref


def encode_page(domain: int, level: int, entries: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(page object, its reference) for ``entries``: ``ROW_DTYPE`` rows when ``level`` is 0,
    else ``REF_DTYPE`` references of level ``level - 1``."""
    assert 0 <= level < PAGE_LEVEL_MAX and 1 <= len(entries) <= PAGE_ENTRIES_MAX, (level, len(entries))
    fields = ROW_FIELDS if level == 0 else CHILD_FIELDS
    if level:
        assert (entries["level"] == level - 1).all(), "a page holds references of one level below it"
    body = b"".join(np.ascontiguousarray(entries[name], dtype="<u8").tobytes() for name in fields)
    body_hash = xxhash.xxh3_64_intdigest(body)
    header = pack_summed(_HEADER, PAGE_MAGIC, PAGE_VERSION, level, 0, domain, len(entries),
                         int(entries["first_seq"][0]), int(entries["last_seq"][-1]), body_hash, bytes(16))
    return header + body, summary_ref(level, entries, body_hash)


@dataclass(frozen=True, slots=True)
class Page:
    """A decoded page: ``entries`` are ``ROW_DTYPE`` rows (level 0) or ``REF_DTYPE``
    references of level ``level - 1``."""

    key: str
    level: int
    entries: np.ndarray


def decode_page(key: str, data: bytes | bytearray | memoryview, ref: np.void | None = None) -> Page:
    """Verify a page stored under ``key`` (and, given, against the reference that led to
    it); FormatError naming the key and the field otherwise (§8.4)."""
    where = f"catalog page {key}"
    key_domain, key_first, key_last, key_level, key_hash = parse_page_key(key)
    mv = memoryview(data).cast("B")
    level, _, domain, count, first, last, body_hash, _ = unpack_summed(
        _HEADER, mv, where=where, magic=PAGE_MAGIC, version=PAGE_VERSION, zero=_HEADER_ZERO)
    if (domain, first, last, level, body_hash) != (key_domain, key_first, key_last, key_level, key_hash):
        raise FormatError(f"{where}: the header says domain {domain}, seqs {first}..{last}, level {level}, "
                          f"hash {body_hash:016x}; the key says otherwise")
    if not 1 <= count <= PAGE_ENTRIES_MAX or level >= PAGE_LEVEL_MAX:
        raise FormatError(f"{where}: header at offset 6: level {level}, count {count} out of bounds")
    body = checked_body(mv, 64 * count, body_hash, where=where, what="body_xxh3")
    fields = ROW_FIELDS if level == 0 else CHILD_FIELDS
    entries = np.zeros(count, dtype=ROW_DTYPE if level == 0 else REF_DTYPE)
    for i, name in enumerate(fields):
        entries[name] = np.frombuffer(body, dtype="<u8", count=count, offset=8 * count * i)
    if level:
        entries["level"] = level - 1
    problem = rows_problem(entries) if level == 0 else refs_problem(entries)
    if problem is None and (int(entries["first_seq"][0]) != first or int(entries["last_seq"][-1]) != last):
        problem = f"its entries span seqs {int(entries['first_seq'][0])}..{int(entries['last_seq'][-1])}"
    if problem is None and ref is not None:
        want = summary_ref(level, entries, body_hash)[0]
        differ = [name for name in REF_FIELDS if int(want[name]) != int(ref[name])]
        if differ:
            problem = f"the reference that names it disagrees on {', '.join(differ)}"
    if problem is not None:
        raise FormatError(f"{where}: {problem}")
    return Page(key, level, entries)


@dataclass(frozen=True, slots=True)
class Fold:
    """One page a writer must put, and the reference to it (§8.4 folding)."""

    key: str
    data: bytes
    ref: np.ndarray  # one REF_DTYPE entry


def plan_folds(domain: int, refs: np.ndarray, tail: np.ndarray) -> list[Fold]:
    """The pages that folding creates from a head's ``refs`` and ``tail`` (§8.4), in the
    order their references are applied. Pure: ``apply_folds`` does the replacing."""
    folds: list[Fold] = []
    while len(tail) >= PAGE_ROWS:
        data, ref = encode_page(domain, 0, tail[:PAGE_ROWS])
        folds.append(Fold(ref_key(domain, ref[0]), data, ref))
        tail = tail[PAGE_ROWS:]
        refs = np.concatenate([refs, ref])
    for level in range(PAGE_LEVEL_MAX - 1):
        while True:
            run = _trailing_run(refs, level)
            if run < PAGE_FANOUT:
                break
            start = len(refs) - run
            data, ref = encode_page(domain, level + 1, refs[start : start + PAGE_FANOUT])
            folds.append(Fold(ref_key(domain, ref[0]), data, ref))
            refs = np.concatenate([refs[:start], ref, refs[start + PAGE_FANOUT :]])
    return folds


def _trailing_run(refs: np.ndarray, level: int) -> int:
    """How many references of ``level`` end ``refs`` (after any of a higher level)."""
    n = 0
    for lv in refs["level"][::-1].tolist():
        if lv == level:
            n += 1
        elif lv > level:
            break
    return n


def apply_fold(refs: np.ndarray, tail: np.ndarray, new: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(refs, tail) after the page reference ``new`` (a one-entry ``REF_DTYPE`` array)
    replaces what it covers (§8.2): the ``count`` oldest tail rows (level 0), or ``count``
    consecutive references of the level below. FormatError when it does not cover exactly
    that."""
    ref = new[0]
    level, count = int(ref["level"]), int(ref["count"])
    if level == 0:
        if count > len(tail):
            raise FormatError(f"{where}: a level-0 page of {count} rows, the tail holds {len(tail)}")
        covered, kind = tail[:count], "tail rows"
        want = summary_ref(0, covered, int(ref["hash"]))[0] if count else None
    else:
        firsts = refs["first_seq"]
        i = int(np.searchsorted(firsts, np.uint64(int(ref["first_seq"]))))
        covered, kind = refs[i : i + count], f"level-{level - 1} page references"
        if count == 0 or len(covered) != count or (covered["level"] != level - 1).any():
            want = None
        else:
            want = summary_ref(level, covered, int(ref["hash"]))[0]
    if want is None or any(int(want[name]) != int(ref[name]) for name in REF_FIELDS):
        raise FormatError(f"{where}: a level-{level} page of seqs {int(ref['first_seq'])}..{int(ref['last_seq'])} "
                          f"({count} entries) does not cover exactly {count} {kind}")
    if level == 0:  # the tail follows every page: the new page goes last
        return np.concatenate([refs, new]), tail[count:]
    return np.concatenate([refs[:i], new, refs[i + count :]]), tail
