"""The state of one domain's catalog (FORMAT.md §8.2) and the rules a delta must follow.

``CatalogState`` is what a ``SNAPSHOT`` body holds; ``apply_delta`` moves it one
generation forward and refuses any change that would break an invariant. A domain can
hold 100 000+ segments, so they are kept as a ``SegmentTable`` (one numpy column per
field, amortised O(1) append and front removal, O(log n) lookup by seq) and never as one
Python object per segment; Python objects are made only for the JSON of a snapshot.

The rules for segments (documented here, enforced by ``apply_delta``):

- segments are sorted by ``first_seq``, contiguous (``first_seq = previous last_seq + 1``)
  and non-overlapping; ``committed_seq`` is the last one's ``last_seq``;
- ``add_segments`` only extends the end: the first added segment starts at
  ``committed_seq + 1`` (also when retention has removed every segment);
- ``remove_segments`` only removes existing segments, and only the oldest ones (a
  prefix of the list): retention makes a hole at the *front*, never in the middle, so
  what remains is still contiguous. (Replacing segments in the middle, e.g. merging
  small ones, is not a delta this version allows.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdp.errors import FormatError
from cdp.layout import (
    U32_MAX, U64_MAX, base_manifest_key, parse_segment_key, segment_key, segment_prefix,
)

SEGMENT_FIELDS = ("first_seq", "last_seq", "first_ts", "last_ts", "size", "payload_raw_len")
#: One catalog segment as a row (what ``segments_between`` returns).
SEGMENT_DTYPE = np.dtype([(name, "<u8") for name in SEGMENT_FIELDS])
WINDOW_KINDS = ("seeding", "resync")
#: §8.2: "seed": the disk joined with this content (nothing before it is known);
#: "consolidation": derived from the domain's own records (earlier points stay as they were).
BASE_ORIGINS = ("seed", "consolidation")
MARK_NAME_BYTES_MAX = 255  # §1
SNAPSHOT_KEYS = frozenset(
    ("domain", "disks", "segments", "bases", "marks", "windows", "committed_seq", "horizon_seq")
)
DELTA_KEYS = frozenset(
    ("add_segments", "remove_segments", "add_bases", "remove_bases", "add_marks",
     "set_windows", "disks", "committed_seq", "horizon_seq")
)
_CAPACITY_MIN = 64


# --------------------------------------------------------------------------- JSON checks


def _int(value: Any, what: str, where: str, limit: int = U64_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise FormatError(f"{where}: {what} is {value!r}, expected an integer in 0..{limit}")
    return value


def _str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{where}: {what} is {value!r}, expected a string")
    return value


def _list(value: Any, what: str, where: str) -> list:
    if not isinstance(value, list):
        raise FormatError(f"{where}: {what} is not a list")
    return value


def _obj(value: Any, keys: frozenset[str] | set[str], what: str, where: str) -> dict:
    """A JSON object with exactly ``keys``: an unknown key means a newer writer (§0)."""
    if not isinstance(value, dict) or set(value) != set(keys):
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise FormatError(f"{where}: {what} has keys {got}, expected {sorted(keys)}")
    return value


def _disks(value: Any, where: str) -> list[dict]:
    out = []
    for i, d in enumerate(_list(value, "disks", where)):
        d = _obj(d, {"disk", "vm", "name", "size"}, f"disks[{i}]", where)
        out.append({"disk": _int(d["disk"], f"disks[{i}].disk", where, U32_MAX),
                    "vm": _str(d["vm"], f"disks[{i}].vm", where),
                    "name": _str(d["name"], f"disks[{i}].name", where),
                    "size": _int(d["size"], f"disks[{i}].size", where)})
    if len({d["disk"] for d in out}) != len(out):
        raise FormatError(f"{where}: disks lists a disk index twice")
    return out


def _base(b: Any, i: int, domain: int, what: str, where: str) -> dict:
    b = _obj(b, {"seq", "disk", "key", "origin"}, f"{what}[{i}]", where)
    seq = _int(b["seq"], f"{what}[{i}].seq", where)
    disk = _int(b["disk"], f"{what}[{i}].disk", where, U32_MAX)
    if b["key"] != base_manifest_key(domain, seq, disk):
        raise FormatError(f"{where}: {what}[{i}].key {b['key']!r} is not the key of seq {seq}, disk {disk}")
    if b["origin"] not in BASE_ORIGINS:
        raise FormatError(f"{where}: {what}[{i}].origin {b['origin']!r} not in {BASE_ORIGINS}")
    return {"seq": seq, "disk": disk, "key": b["key"], "origin": b["origin"]}


def _marks(value: Any, after_seq: int, what: str, where: str) -> list[dict]:
    out = []
    for i, m in enumerate(_list(value, what, where)):
        m = _obj(m, {"name", "seq", "ts"}, f"{what}[{i}]", where)
        name = _str(m["name"], f"{what}[{i}].name", where)
        if not 1 <= len(name.encode("utf-8", "surrogatepass")) <= MARK_NAME_BYTES_MAX:
            raise FormatError(f"{where}: {what}[{i}].name is not 1..{MARK_NAME_BYTES_MAX} UTF-8 bytes")
        seq = _int(m["seq"], f"{what}[{i}].seq", where)
        if seq <= after_seq:
            raise FormatError(f"{where}: {what}[{i}].seq {seq} is not after the previous mark's {after_seq}")
        out.append({"name": name, "seq": seq, "ts": _int(m["ts"], f"{what}[{i}].ts", where)})
        after_seq = seq
    return out


def _windows(value: Any, where: str) -> list[dict]:
    out = []
    for i, w in enumerate(_list(value, "windows", where)):
        w = _obj(w, {"kind", "first_seq", "last_seq"}, f"windows[{i}]", where)
        if w["kind"] not in WINDOW_KINDS:
            raise FormatError(f"{where}: windows[{i}].kind {w['kind']!r} not in {WINDOW_KINDS}")
        first = _int(w["first_seq"], f"windows[{i}].first_seq", where)
        last = w["last_seq"]
        if last is not None and _int(last, f"windows[{i}].last_seq", where) < first:
            raise FormatError(f"{where}: windows[{i}] ends before it starts")
        out.append({"kind": w["kind"], "first_seq": first, "last_seq": last})
    return out


def _u64_column(items: list[dict], name: str, what: str, where: str) -> np.ndarray:
    """One integer field of every item as a u64 array; checked in bulk, blamed one by one."""
    col = [s[name] for s in items]
    try:
        if all(type(v) is int for v in col):  # not bool, not float
            return np.array(col, dtype=np.uint64)
    except OverflowError:
        pass
    for i, v in enumerate(col):
        _int(v, f"{what}[{i}].{name}", where)
    raise AssertionError("unreachable: some value failed the bulk check")


def _segment_columns(value: Any, domain: int, what: str, where: str) -> dict[str, np.ndarray]:
    """Validated columns of a JSON segment list: each key matches its seqs, seqs contiguous.

    A snapshot can list 100 000+ segments, so the checks run per column, not per value.
    """
    items = _list(value, what, where)
    want = {"key", *SEGMENT_FIELDS}
    for i, s in enumerate(items):
        if not isinstance(s, dict) or s.keys() != want:
            _obj(s, want, f"{what}[{i}]", where)
    arrays = {name: _u64_column(items, name, what, where) for name in SEGMENT_FIELDS}
    backwards = (arrays["last_seq"] < arrays["first_seq"]) | (arrays["last_ts"] < arrays["first_ts"])
    if backwards.any():
        raise FormatError(f"{where}: {what}[{int(np.flatnonzero(backwards)[0])}] ends before it starts")
    prefix = segment_prefix(domain)
    expected = [f"{prefix}{a:016x}-{b:016x}.seg"
                for a, b in zip(arrays["first_seq"].tolist(), arrays["last_seq"].tolist())]
    keys = [s["key"] for s in items]
    if keys != expected:
        i = next(i for i, (k, e) in enumerate(zip(keys, expected)) if k != e)
        raise FormatError(f"{where}: {what}[{i}].key {keys[i]!r} does not match its seqs (expected {expected[i]!r})")
    first, last = arrays["first_seq"], arrays["last_seq"]
    gap = np.flatnonzero(first[1:] != last[:-1] + np.uint64(1))
    if len(gap):
        i = int(gap[0]) + 1
        raise FormatError(
            f"{where}: {what}[{i}] starts at seq {int(first[i])}, expected {int(last[i - 1]) + 1} "
            f"(segments must be contiguous and non-overlapping)"
        )
    back = np.flatnonzero(arrays["first_ts"][1:] < arrays["last_ts"][:-1])
    if len(back):
        raise FormatError(f"{where}: {what}[{int(back[0]) + 1}] starts before the previous one ends in time")
    return arrays


# --------------------------------------------------------------------------- segments


class SegmentTable:
    """A domain's segments, one numpy column per field.

    Invariant: rows ``[lo, hi)`` of the columns are the segments, sorted by ``first_seq``
    and contiguous (``first_seq[i+1] = last_seq[i] + 1``); appending only extends the end
    and removal only drops rows at the front, so both are amortised O(1) per segment and
    a lookup by seq is one ``np.searchsorted`` on a contiguous column.
    """

    def __init__(self, columns: dict[str, np.ndarray] | None = None) -> None:
        n = len(columns["first_seq"]) if columns else 0
        cap = max(_CAPACITY_MIN, 2 * n)
        self._cols = {name: np.zeros(cap, dtype=np.uint64) for name in SEGMENT_FIELDS}
        if columns:
            for name in SEGMENT_FIELDS:
                self._cols[name][:n] = columns[name]
        self._lo, self._hi = 0, n

    def __len__(self) -> int:
        return self._hi - self._lo

    def column(self, name: str) -> np.ndarray:
        """A read-only view of one field of every segment, oldest first."""
        view = self._cols[name][self._lo : self._hi]
        view.flags.writeable = False
        return view

    def rows(self, i: int, j: int) -> np.ndarray:
        """Segments ``i..j-1`` as a ``SEGMENT_DTYPE`` array (a copy)."""
        out = np.empty(max(0, j - i), dtype=SEGMENT_DTYPE)
        for name in SEGMENT_FIELDS:
            out[name] = self._cols[name][self._lo + i : self._lo + j]
        return out

    def append(self, columns: dict[str, np.ndarray]) -> None:
        k = len(columns["first_seq"])
        cap = len(self._cols["first_seq"])
        if self._hi + k > cap:
            # Compact to the front and grow geometrically: amortised O(1) per segment.
            new_cap = max(_CAPACITY_MIN, 2 * (len(self) + k))
            for name in SEGMENT_FIELDS:
                grown = np.zeros(new_cap, dtype=np.uint64)
                grown[: len(self)] = self._cols[name][self._lo : self._hi]
                self._cols[name] = grown
            self._lo, self._hi = 0, len(self)
        for name in SEGMENT_FIELDS:
            self._cols[name][self._hi : self._hi + k] = columns[name]
        self._hi += k

    def drop_front(self, k: int) -> None:
        assert 0 <= k <= len(self), (k, len(self))
        self._lo += k

    def find(self, seq: int) -> int | None:
        """Position of the segment holding ``seq``, or None: O(log n)."""
        last = self._cols["last_seq"][self._lo : self._hi]
        i = int(np.searchsorted(last, np.uint64(seq), side="left"))
        if i < len(self) and self._cols["first_seq"][self._lo + i] <= seq:
            return i
        return None

    def overlapping(self, first: int, last: int) -> tuple[int, int]:
        """Positions ``[i, j)`` of the segments holding any seq in ``first..last``."""
        i = int(np.searchsorted(self._cols["last_seq"][self._lo : self._hi], np.uint64(first), "left"))
        j = int(np.searchsorted(self._cols["first_seq"][self._lo : self._hi], np.uint64(last), "right"))
        return i, max(i, j)

    def copy(self) -> SegmentTable:
        return SegmentTable({name: self.column(name) for name in SEGMENT_FIELDS})


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One catalog segment, as returned by ``CatalogState.segment_for_seq``."""

    key: str
    first_seq: int
    last_seq: int
    first_ts: int
    last_ts: int
    size: int
    payload_raw_len: int


# --------------------------------------------------------------------------- the state


@dataclass(eq=False)
class CatalogState:
    """The whole state of one domain at one catalog generation (§8.2).

    Invariants (checked by ``from_snapshot_body`` and kept by ``apply_delta``):
    ``segments`` contiguous and non-overlapping, sorted by seq, their keys the §7 keys of
    their seq ranges; ``committed_seq`` equals the last segment's ``last_seq`` (when there
    are segments) and never decreases, nor does ``horizon_seq``; bases are unique per
    (seq, disk); marks have strictly increasing seqs, none after ``committed_seq``.
    """

    domain: dict
    disks: list[dict] = field(default_factory=list)
    segments: SegmentTable = field(default_factory=SegmentTable)
    bases: list[dict] = field(default_factory=list)
    marks: list[dict] = field(default_factory=list)
    windows: list[dict] = field(default_factory=list)
    committed_seq: int = 0
    horizon_seq: int = 0

    @classmethod
    def new(cls, domain_id: int, name: str, created_ns: int) -> CatalogState:
        """The empty state of a new domain (its generation-1 snapshot)."""
        return cls({"id": domain_id, "name": name, "created_ns": created_ns})

    @property
    def domain_id(self) -> int:
        return self.domain["id"]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CatalogState):
            return NotImplemented
        return self.to_snapshot_body() == other.to_snapshot_body()

    def copy(self) -> CatalogState:
        """An independent copy. The dicts inside the lists are values that are never
        changed in place (a delta replaces or appends them), so the lists are copied
        shallowly: cheap even with tens of thousands of marks."""
        return CatalogState(
            dict(self.domain), list(self.disks), self.segments.copy(), list(self.bases),
            list(self.marks), list(self.windows), self.committed_seq, self.horizon_seq,
        )

    # ---- lookups

    def segment_key(self, i: int) -> str:
        """§7 key of segment ``i`` (0 = oldest)."""
        return segment_key(self.domain_id, int(self.segments.column("first_seq")[i]),
                           int(self.segments.column("last_seq")[i]))

    def segment_for_seq(self, seq: int) -> SegmentRef | None:
        """The segment holding ``seq``, or None: O(log n)."""
        i = self.segments.find(seq)
        if i is None:
            return None
        row = self.segments.rows(i, i + 1)[0]
        return SegmentRef(self.segment_key(i), *(int(row[name]) for name in SEGMENT_FIELDS))

    def segments_between(self, first: int, last: int) -> np.ndarray:
        """The segments holding any seq in ``first..last`` as a ``SEGMENT_DTYPE`` array."""
        return self.segments.rows(*self.segments.overlapping(first, last))

    def segment_keys(self, rows: np.ndarray) -> list[str]:
        """§7 keys of ``SEGMENT_DTYPE`` rows."""
        prefix = segment_prefix(self.domain_id)
        return [f"{prefix}{a:016x}-{b:016x}.seg"
                for a, b in zip(rows["first_seq"].tolist(), rows["last_seq"].tolist())]

    def maintenance_difference(self, new: CatalogState) -> str | None:
        """None when ``new`` is this state after consolidation and retention only (§8.3):
        bases added or removed, the oldest segments removed, the horizon moved (and the
        marks below it dropped). Otherwise what else changed: another writer owns the
        domain. The DRVA uses it to tell a maintenance job's generation from a fence."""
        if new.domain != self.domain or new.disks != self.disks or new.windows != self.windows:
            return "the domain, its disks or its windows changed"
        if new.committed_seq != self.committed_seq:
            return f"committed_seq moved from {self.committed_seq} to {new.committed_seq}"
        if new.horizon_seq < self.horizon_seq:
            return f"horizon_seq went back from {self.horizon_seq} to {new.horizon_seq}"
        k = len(self.segments) - len(new.segments)
        if k < 0 or any(not np.array_equal(self.segments.column(f)[k:], new.segments.column(f))
                        for f in SEGMENT_FIELDS):
            return "segments were added or replaced, not only the oldest ones removed"
        if new.marks != [m for m in self.marks if m["seq"] >= new.horizon_seq]:
            return "marks changed"
        return None

    # ---- snapshots

    def to_snapshot_body(self) -> dict:
        """The JSON body of a ``SNAPSHOT`` at this state (§8.2)."""
        cols = {name: self.segments.column(name).tolist() for name in SEGMENT_FIELDS}
        prefix = segment_prefix(self.domain_id)
        keys = [f"{prefix}{a:016x}-{b:016x}.seg" for a, b in zip(cols["first_seq"], cols["last_seq"])]
        segments = [
            {"key": k, **{name: cols[name][i] for name in SEGMENT_FIELDS}} for i, k in enumerate(keys)
        ]
        return {
            "domain": dict(self.domain), "disks": [dict(d) for d in self.disks],
            "segments": segments, "bases": [dict(b) for b in self.bases],
            "marks": [dict(m) for m in self.marks], "windows": [dict(w) for w in self.windows],
            "committed_seq": self.committed_seq,
            "horizon_seq": self.horizon_seq,
        }

    @classmethod
    def from_snapshot_body(cls, body: Any, where: str = "catalog snapshot") -> CatalogState:
        """Validate a ``SNAPSHOT`` body (§8.2) and build the state it describes."""
        body = _obj(body, SNAPSHOT_KEYS, "the snapshot body", where)
        dom = _obj(body["domain"], {"id", "name", "created_ns"}, "domain", where)
        domain = {"id": _int(dom["id"], "domain.id", where, U32_MAX),
                  "name": _str(dom["name"], "domain.name", where),
                  "created_ns": _int(dom["created_ns"], "domain.created_ns", where)}
        segments = SegmentTable(_segment_columns(body["segments"], domain["id"], "segments", where))
        bases = sorted((_base(b, i, domain["id"], "bases", where)
                        for i, b in enumerate(_list(body["bases"], "bases", where))),
                       key=lambda b: (b["seq"], b["disk"]))
        if len({(b["seq"], b["disk"]) for b in bases}) != len(bases):
            raise FormatError(f"{where}: bases lists a (seq, disk) twice")
        committed = _int(body["committed_seq"], "committed_seq", where)
        if len(segments) and committed != int(segments.column("last_seq")[-1]):
            raise FormatError(
                f"{where}: committed_seq {committed} is not the last segment's last_seq "
                f"{int(segments.column('last_seq')[-1])}"
            )
        marks = _marks(body["marks"], -1, "marks", where)
        if marks and marks[-1]["seq"] > committed:
            raise FormatError(f"{where}: a mark at seq {marks[-1]['seq']} is after committed_seq {committed}")
        return cls(domain, _disks(body["disks"], where), segments, bases, marks,
                   _windows(body["windows"], where), committed,
                   _int(body["horizon_seq"], "horizon_seq", where))

    # ---- deltas

    def apply_delta(self, body: Any, where: str = "catalog delta") -> None:
        """Apply a ``DELTA`` body (§8.2): all of it, or nothing (FormatError, state unchanged)."""
        if not isinstance(body, dict) or not set(body) <= DELTA_KEYS:
            extra = sorted(set(body) - DELTA_KEYS) if isinstance(body, dict) else type(body).__name__
            raise FormatError(f"{where}: not a delta body (unknown keys {extra})")
        drop = self._front_removal(body.get("remove_segments", []), where)
        added = _segment_columns(body.get("add_segments", []), self.domain_id, "add_segments", where)
        last = self.committed_seq if len(added["first_seq"]) == 0 else int(added["last_seq"][-1])
        if len(added["first_seq"]) and int(added["first_seq"][0]) != self.committed_seq + 1:
            raise FormatError(
                f"{where}: add_segments[0] starts at seq {int(added['first_seq'][0])}, expected "
                f"committed_seq + 1 = {self.committed_seq + 1} (segments only extend the end)"
            )
        committed = _int(body.get("committed_seq", last), "committed_seq", where)
        if committed != last:
            raise FormatError(
                f"{where}: committed_seq {committed}, expected {last} (the last segment's last_seq)"
            )
        horizon = _int(body.get("horizon_seq", self.horizon_seq), "horizon_seq", where)
        if horizon < self.horizon_seq:
            raise FormatError(f"{where}: horizon_seq {horizon} goes back from {self.horizon_seq}")
        bases = self._bases_after(body, where)
        after = self.marks[-1]["seq"] if self.marks else -1
        new_marks = _marks(body.get("add_marks", []), after, "add_marks", where)
        if new_marks and new_marks[-1]["seq"] > committed:
            raise FormatError(f"{where}: a mark at seq {new_marks[-1]['seq']} is after committed_seq {committed}")
        windows = _windows(body["set_windows"], where) if "set_windows" in body else self.windows
        disks = _disks(body["disks"], where) if "disks" in body else self.disks
        # Every check passed: change the state.
        self.segments.drop_front(drop)
        self.segments.append(added)
        self.committed_seq, self.horizon_seq = committed, horizon
        self.bases, self.windows, self.disks = bases, windows, disks
        self.marks.extend(new_marks)
        # Marks below the retention horizon are no recovery point any more (§8.2).
        self.marks = [m for m in self.marks if m["seq"] >= horizon]

    def _front_removal(self, value: Any, where: str) -> int:
        """How many of the oldest segments ``remove_segments`` names; refuse anything else."""
        keys = _list(value, "remove_segments", where)
        if not keys:
            return 0
        ranges = []
        for i, key in enumerate(keys):
            try:
                domain, first, last = parse_segment_key(key)
            except FormatError as exc:
                raise FormatError(f"{where}: remove_segments[{i}]: {exc}") from exc
            if domain != self.domain_id:
                raise FormatError(f"{where}: remove_segments[{i}] {key!r} is not a segment of this domain")
            ranges.append((first, last, key))
        ranges.sort()
        k = len(ranges)
        firsts = self.segments.column("first_seq")[:k].tolist()
        lasts = self.segments.column("last_seq")[:k].tolist()
        for j, (first, last, key) in enumerate(ranges):
            if j >= len(firsts) or (first, last) != (firsts[j], lasts[j]):
                held = self.segments.find(first)
                known = held is not None and (first, last) == (
                    int(self.segments.column("first_seq")[held]), int(self.segments.column("last_seq")[held]))
                why = ("would leave a hole in the middle: retention removes only the oldest segments"
                       if known else "is not in the catalog")
                raise FormatError(f"{where}: remove_segments {key!r} {why}")
        return k

    def _bases_after(self, body: dict, where: str) -> list[dict]:
        if "remove_bases" not in body and "add_bases" not in body:
            return self.bases
        bases = {(b["seq"], b["disk"]): b for b in self.bases}
        for i, r in enumerate(_list(body.get("remove_bases", []), "remove_bases", where)):
            r = _obj(r, {"seq", "disk"}, f"remove_bases[{i}]", where)
            if bases.pop((r["seq"], r["disk"]), None) is None:
                raise FormatError(f"{where}: remove_bases[{i}] (seq {r['seq']!r}, disk {r['disk']!r}) is not in the catalog")
        for i, b in enumerate(_list(body.get("add_bases", []), "add_bases", where)):
            b = _base(b, i, self.domain_id, "add_bases", where)
            if (b["seq"], b["disk"]) in bases:
                raise FormatError(f"{where}: add_bases[{i}] (seq {b['seq']}, disk {b['disk']}) is already in the catalog")
            bases[(b["seq"], b["disk"])] = b
        return sorted(bases.values(), key=lambda b: (b["seq"], b["disk"]))
