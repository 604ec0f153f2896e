"""Recovery targets: ``--seq N``, ``--mark NAME``, ``--at TIME``, ``--latest`` -> one seq.

A seq ``S`` is a **recovery point** of a domain when all of these hold (FORMAT.md §8.2):

1. ``horizon_seq <= S <= committed_seq`` (retention);
2. ``S`` is in no not-consistent window (``seeding``/``resync``, ``first_seq..last_seq``
   inclusive, ``last_seq`` None = still open), and is not the seq of a fuzzy seeded base
   (a seeding window ``f..l`` means the base at ``f - 1`` was copied while the disk was
   written, so it is exact from ``l`` on only — §6.2);
3. every disk can be rebuilt at ``S``: its newest base at or below ``S`` is ``b`` (a disk
   with no ``seed`` base starts as zeros at ``b = 0`` — its ``consolidation`` bases are
   derived from its records and change none of its points; a disk that joined with a
   ``seed`` base cannot be rebuilt before it) and the segments hold every seq in
   ``(b, S]`` — the rows hold every seq from ``F = horizon_seq + 1`` to
   ``committed_seq`` (§8.2), so that means ``b == S`` or ``b + 1 >= F``.

Everything is read from one timeline of the catalog (a ``CatalogView``): its bases,
marks and windows, and its rows — the parent's up to the fork, then its own (§8.5).
A mark names its point only when the record at its seq is that mark (a ``MARK`` of its
name and time: one index and one block read), so a mark moved in the catalog is a
``FormatError``, not another point.

``recoverable_ranges`` computes the whole set as a few inclusive ranges, so a refusal
can name the nearest valid points on either side. Time targets map to the last record
whose ``timestamp_ns <= T``: a ``searchsorted`` down the page tree's ``first_ts``/``last_ts``
columns (a page per level), then, only when ``T`` falls inside a segment, one
``searchsorted`` over that segment's index (one index read). The horizon point's record
may be gone with its row: its time is the head's ``horizon_ts`` (§8.2), so ``T`` from
then until the next record's time is ``horizon_seq``; a catalog that does not know it
(written before it was kept) refuses such a ``T``, naming ``--seq horizon_seq``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction


from cdp.catalog_read import CatalogView, row_records
from cdp.errors import ConfigError, FormatError
from cdp.records import KIND_MARK, KIND_NAMES
from cdp.segment import SegmentIndex, read_payloads, read_segment_index
from rocva.errors import InconsistentPoint, InvalidTarget, OutsideRetention

#: An upper bound above every seq (seqs are u64): the end of an open range.
SEQ_INF = 1 << 64
TARGET_KINDS = ("seq", "mark", "at", "latest")
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)([smhd])")
_UNIT_NS = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: The latest time a target may name: numpy's int64 ns (2262-04-11T23:47:16Z).
TIME_NS_MAX = (1 << 63) - 1
_TIME_MAX_TEXT = "2262-04-11T23:47:16Z"
SEQ_MAX = (1 << 64) - 1  # seqs are u64 (FORMAT.md §1)
MARK_BYTES_MAX = 255  # FORMAT.md §13.6

Ranges = list[tuple[int, int]]  # sorted, disjoint, non-adjacent, inclusive (first, last)


class TargetSyntaxError(ConfigError):
    """A target written wrong; ``part`` names what: ``target`` (its form) or the kind
    (``seq``, ``mark``, ``at``) whose value is wrong."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


@dataclass(frozen=True, slots=True)
class Target:
    """What the user asked for; build one with ``Target.seq(n)``, ``.mark(name)``,
    ``.at(text)`` or ``.latest()`` (the CLI's four options map one to one), or read one
    written down with ``Target.parse``. Each checks its value (``TargetSyntaxError``)."""

    kind: str
    value: int | str | None = None

    def __post_init__(self) -> None:
        assert self.kind in TARGET_KINDS, self.kind

    @classmethod
    def seq(cls, n: int) -> Target:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= SEQ_MAX:
            raise TargetSyntaxError("seq", f"--seq {_shown(n)}: expected an integer in 0..{SEQ_MAX}")
        return cls("seq", n)

    @classmethod
    def mark(cls, name: str) -> Target:
        if not isinstance(name, str) or not 1 <= len(name.encode("utf-8", "replace")) <= MARK_BYTES_MAX \
                or "\0" in name:
            raise TargetSyntaxError("mark", f"--mark {_shown(name)}: expected a mark name of 1..{MARK_BYTES_MAX} "
                                            f"UTF-8 bytes")
        return cls("mark", name)

    @classmethod
    def at(cls, text: str) -> Target:
        try:
            parse_time(text, time.time_ns())  # refuse a malformed time now, not after loading the catalog
        except ConfigError as exc:
            raise TargetSyntaxError("at", exc.message) from None
        return cls("at", text)

    @classmethod
    def latest(cls) -> Target:
        return cls("latest")

    @classmethod
    def parse(cls, written: Target | int | str | dict) -> Target:
        """The one reader of a target written down, in any of its forms: a ``Target``; a
        bare seq; the text forms ``latest``, ``seq:N``, ``mark:NAME``, ``at:TIME`` (a
        recovery appliance's ``--target``, and ``text()``); the REST API's ``"latest"``,
        ``{"seq": N}``, ``{"mark": NAME}``, ``{"at": TIME}``. ``TargetSyntaxError``
        naming the part that is wrong."""
        if isinstance(written, Target):
            return written
        if isinstance(written, int) and not isinstance(written, bool):
            return cls.seq(written)
        if written == "latest":
            return cls.latest()
        if isinstance(written, dict) and len(written) == 1:
            ((kind, value),) = written.items()
        elif isinstance(written, str) and ":" in written:
            kind, _, value = written.partition(":")
            if kind == "seq" and value.isascii() and value.isdigit():
                value = int(value)
        else:
            kind, value = None, None
        build = {"seq": cls.seq, "mark": cls.mark, "at": cls.at}.get(kind)  # type: ignore[arg-type]
        if build is None:
            raise TargetSyntaxError("target", f"recovery target {_shown(written)}: expected latest, seq:N, "
                                              f"mark:NAME or at:TIME (REST: \"latest\", {{\"seq\": N}}, "
                                              f"{{\"mark\": NAME}} or {{\"at\": TIME}})")
        return build(value)

    def text(self) -> str:
        """The text form ``parse`` reads back: ``latest``, ``seq:N``, ``mark:NAME``, ``at:TIME``."""
        return "latest" if self.kind == "latest" else f"{self.kind}:{self.value}"

    def describe(self) -> str:
        return "--latest" if self.kind == "latest" else f"--{self.kind} {self.value}"


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    """A target resolved to ``seq``, a recovery point of the catalog it was resolved in."""

    seq: int
    target: Target
    #: The time asked for (``--at``), ns since the epoch.
    at_ns: int | None = None
    #: The mark (``--mark``): ``{"name", "seq", "ts"}``.
    mark: dict | None = None


def parse_time(text: str, now_ns: int) -> int:
    """ns since the epoch of ``text``: ISO 8601 with a timezone, or ``-15m``/``-2h``/
    ``-30s``/``-1d`` (also fractional, ``-1.5h``) before ``now_ns``. The result is a
    record timestamp (u64 ns, FORMAT.md §1) that numpy can hold: 1970-01-01 ..
    ``TIME_NS_MAX`` (2262-04-11); anything else is a ``ConfigError`` saying so."""
    if not isinstance(text, str):
        raise ConfigError(f"--at {text!r}: expected a time")
    shown = repr(text) if len(text) <= 64 else repr(text[:64]) + "..."
    m = _RELATIVE.fullmatch(text.strip())
    if m:
        try:
            ns = now_ns - int(Fraction(m.group(1)) * _UNIT_NS[m.group(2)])
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            ns = -1
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ConfigError(
                f"--at {shown}: expected ISO 8601 with a timezone (2024-05-01T12:00:00+02:00, …Z) "
                f"or a relative time (-30s, -15m, -2h, -1d)"
            ) from None
        if when.tzinfo is None:
            raise ConfigError(f"--at {shown}: no timezone; add Z or +HH:MM (a bare time is ambiguous)")
        try:
            ns = (when - _EPOCH) // timedelta(microseconds=1) * 1000
        except OverflowError:
            ns = -1
    if not 0 <= ns <= TIME_NS_MAX:
        raise ConfigError(f"--at {shown}: expected a time between 1970-01-01T00:00:00Z and "
                          f"{_TIME_MAX_TEXT} (record times are ns since 1970 in 63 bits)")
    return ns


# --------------------------------------------------------------------------- range sets


def _normalize(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in sorted(r for r in ranges if r[0] <= r[1]):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(x: Ranges, y: Ranges) -> Ranges:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a <= b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(x: Ranges, holes: Ranges) -> Ranges:
    out = []
    for a, b in x:
        for h0, h1 in holes:
            if h1 < a or h0 > b:
                continue
            if h0 > a:
                out.append((a, h0 - 1))
            a = h1 + 1
            if a > b:
                break
        if a <= b:
            out.append((a, b))
    return out


def _first_segment_seq(state: CatalogView) -> int:
    """F: from this seq on, the rows hold every seq up to ``committed_seq`` (§8.2)."""
    return state.horizon_seq + 1


def _base_seqs(state: CatalogView, disk: int) -> list[int]:
    """The seqs ``disk`` can start a replay from: its bases, and 0 (all zeros) when it has
    no ``seed`` base (rule 3)."""
    mine = [b for b in state.bases if b["disk"] == disk]
    seqs = {b["seq"] for b in mine}
    if not any(b["origin"] == "seed" for b in mine):
        seqs.add(0)
    return sorted(seqs)


def _disk_ranges(state: CatalogView, disk: int, first: int) -> Ranges:
    """Seqs at which ``disk`` can be rebuilt (rule 3 of the module docstring)."""
    bases = _base_seqs(state, disk)
    ranges = [(b, b) for b in bases]  # the base itself, with no record to replay
    up = next((b for b in bases if b + 1 >= first), None)
    if up is not None:
        ranges.append((up, SEQ_INF))
    return _normalize(ranges)


def _window_holes(state: CatalogView) -> Ranges:
    base_seqs = {b["seq"] for b in state.bases}
    holes = []
    for w in state.windows:
        last = SEQ_INF if w["last_seq"] is None else w["last_seq"]
        first = w["first_seq"]
        if w["kind"] == "seeding" and first - 1 in base_seqs:
            first -= 1  # the fuzzy base itself (module docstring, rule 2)
        holes.append((first, last))
    return _normalize(holes)


def recoverable_ranges(state: CatalogView) -> Ranges:
    """Every recovery point of ``state``, as sorted inclusive (first, last) ranges."""
    if state.committed_seq < state.horizon_seq:
        return []
    ranges = [(state.horizon_seq, state.committed_seq)]
    first = _first_segment_seq(state)
    for d in state.disks:
        ranges = _intersect(ranges, _disk_ranges(state, d["disk"], first))
    return _subtract(ranges, _window_holes(state))


def nearest_points(ranges: Ranges, seq: int) -> tuple[int | None, int | None]:
    """(the largest recovery point < seq, the smallest > seq), None where there is none."""
    below = above = None
    for a, b in ranges:
        if a < seq:
            below = min(b, seq - 1)
        if b > seq and above is None:
            above = max(a, seq + 1)
    return below, above


def _nearest_text(near: tuple[int | None, int | None]) -> str:
    points = [f"seq {p}" for p in near if p is not None]
    if not points:
        return "the domain has no recovery point"
    return f"nearest consistent point{'s' if len(points) > 1 else ''}: {', '.join(points)}"


def _why_not(state: CatalogView, seq: int) -> tuple[type[InvalidTarget], str]:
    """Why ``seq`` is no recovery point: the first rule it breaks, in module-docstring order."""
    if seq > state.committed_seq or seq < state.horizon_seq:
        return OutsideRetention, (
            f"seq {seq} is outside retention (horizon seq {state.horizon_seq} .. committed "
            f"seq {state.committed_seq})")
    base_seqs = {b["seq"] for b in state.bases}
    for w in state.windows:
        last = w["last_seq"]
        span = f"{w['first_seq']}..{'(still open)' if last is None else last}"
        if w["first_seq"] <= seq and (last is None or seq <= last):
            return InconsistentPoint, f"seq {seq} is inside the {w['kind']} window {span}"
        if w["kind"] == "seeding" and seq == w["first_seq"] - 1 and seq in base_seqs:
            return InconsistentPoint, (
                f"seq {seq} is the fuzzy base of the seeding window {span}: the base is exact "
                f"only from the end of that window")
    first = _first_segment_seq(state)
    for d in state.disks:
        bases = _base_seqs(state, d["disk"])
        name = f"disk {d['disk']} ({d['vm']}/{d['name']})"
        below = [b for b in bases if b <= seq]
        if not below:
            return OutsideRetention, (
                f"seq {seq} is before the first point the catalog can rebuild: {name} has no "
                f"base at or below it (oldest base: seq {bases[0]})")
        b = below[-1]
        if b != seq and b + 1 < first:
            start = (f"its base at seq {b}" if any(x["seq"] == b and x["disk"] == d["disk"] for x in state.bases)
                     else "it has no base, so it replays from seq 1")
            return OutsideRetention, (
                f"seq {seq} is before the first point the catalog can rebuild: {name}: {start}, "
                f"but the oldest retained segment starts at seq {first}")
    raise AssertionError(f"seq {seq} is not in the recoverable ranges, but breaks no rule")


def check_point(state: CatalogView, seq: int, what: str = "") -> None:
    """Raise ``InvalidTarget`` (with the nearest valid points) unless ``seq`` is a recovery point."""
    ranges = recoverable_ranges(state)
    if any(a <= seq <= b for a, b in ranges):
        return
    error, why = _why_not(state, seq)
    near = nearest_points(ranges, seq)
    raise error(f"domain {state.domain_id}{_timeline_text(state)}: {what}{why}; {_nearest_text(near)}", near)


def mark_problem(index: SegmentIndex, mark: dict, name: bytes | None = None) -> str | None:
    """Why the record at ``mark``'s seq in ``index``'s segment (which holds that seq) is
    not that mark — a ``MARK`` record of its name at its time (FORMAT.md §1) — or None
    when it is. ``name`` is the record's payload when it was read; without it only the
    name's length is compared (the index alone)."""
    seq = mark["seq"]
    rec = index.rows_for_seqs(seq, seq)
    assert len(rec) == 1, (index.key, seq)
    kind, ts, length = int(rec["kind"][0]), int(rec["timestamp_ns"][0]), int(rec["length"][0])
    want = mark["name"].encode("utf-8", "surrogatepass")
    where = f"segment {index.key}: record seq {seq}"
    if kind != KIND_MARK:
        return f"{where} is a {KIND_NAMES[kind] if kind < len(KIND_NAMES) else kind} record, not a MARK"
    if ts != mark["ts"]:
        return f"{where} is a MARK of ts {ts}, the catalog's mark says ts {mark['ts']}"
    if length != len(want):
        return f"{where} is a MARK of a {length}-byte name, not {mark['name']!r}"
    if name is not None and name != want:
        return f"{where} is the MARK {name.decode('utf-8', 'replace')!r}, not {mark['name']!r}"
    return None


def mark_payload(index: SegmentIndex, payload: bytes | memoryview, seq: int) -> bytes:
    """The payload (a MARK's name) of record ``seq`` in ``index``'s whole payload stream."""
    rec = index.rows_for_seqs(seq, seq)
    pos = int(rec["raw_pos"][0])
    return bytes(payload[pos : pos + int(rec["length"][0])])


async def check_mark_record(state: CatalogView, mark: dict) -> None:
    """FormatError unless the record at ``mark``'s seq is that mark (``mark_problem``,
    the name read from its block): a catalog mark moved off its record must not name a
    point the domain never marked. A mark at the horizon, whose segment retention
    dropped, is taken as the catalog says."""
    row = await state.row_for_seq(mark["seq"])
    if row is None:
        return
    key = state.row_key(row)
    index = await read_segment_index(state.store, key)
    row_records(key, row, index)
    problem = mark_problem(index, mark)
    if problem is None:
        rec = index.rows_for_seqs(mark["seq"], mark["seq"])
        raw, starts, lengths = await read_payloads(state.store, index, rec)
        problem = mark_problem(index, mark, bytes(raw[int(starts[0]) : int(starts[0]) + int(lengths[0])]))
    if problem is not None:
        raise FormatError(f"catalog of domain {state.domain_id}{_timeline_text(state)}: mark {mark['name']!r} at "
                          f"seq {mark['seq']}: {problem}")


def _timeline_text(state: CatalogView) -> str:
    """", timeline N" when the domain has more than one timeline (else nothing)."""
    return f", timeline {state.timeline_id}" if len(state.state.timelines) > 1 else ""


async def resolve_target(state: CatalogView, target: Target | int | str, *,
                         now_ns: int | None = None) -> ResolvedTarget:
    """Resolve ``target`` on the timeline ``state`` reads; ``InvalidTarget`` unless it is
    a recovery point there. ``now_ns`` anchors relative times (default: the wall clock).
    """
    target = Target.parse(target)
    dom = f"domain {state.domain_id}{_timeline_text(state)}"
    if target.kind == "latest":
        seq = state.committed_seq
        check_point(state, seq, "--latest: ")
        return ResolvedTarget(seq, target)
    if target.kind == "seq":
        check_point(state, target.value)
        return ResolvedTarget(target.value, target)
    if target.kind == "mark":
        marks = [m for m in state.marks if m["name"] == target.value]
        if not marks:
            known = ", ".join(repr(m["name"]) for m in state.marks[-10:]) or "none"
            raise InvalidTarget(f"{dom}: no mark named {target.value!r} in retention (newest marks: {known})")
        mark = max(marks, key=lambda m: m["seq"])  # a name used twice: the newest one
        check_point(state, mark["seq"], f"mark {target.value!r}: ")
        await check_mark_record(state, mark)
        return ResolvedTarget(mark["seq"], target, mark=mark)
    if now_ns is None:
        now_ns = time.time_ns()
    t_ns = parse_time(target.value, now_ns)
    seq = await state.seq_at_time(t_ns)
    if seq is None or seq < state.horizon_seq:
        near = nearest_points(recoverable_ranges(state), -1)
        raise OutsideRetention(f"{dom}: --at {target.value} ({_iso(t_ns)}) {_before_retention(state, seq)}; "
                               f"{_nearest_text(near)}", near)
    check_point(state, seq, f"--at {target.value} ({_iso(t_ns)}) is seq {seq}: ")
    return ResolvedTarget(seq, target, at_ns=t_ns)


def _iso(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, timezone.utc).isoformat()


def _before_retention(state: CatalogView, seq: int | None) -> str:
    """Why a time whose last record is ``seq`` (None: none held; below the horizon: some
    seq there, ``CatalogView.seq_at_time``) names no point retention keeps."""
    h = state.horizon_seq
    if h == 0:
        return "is before the oldest retained record"
    if state.horizon_ts:
        return (f"is before the retention horizon (seq {h}, recorded at {_iso(state.horizon_ts)}): nothing older "
                f"is kept")
    if seq is not None:
        return f"is before the retention horizon (seq {h}): nothing older is kept"
    # A catalog written before horizon_ts (FORMAT.md §8.2): the horizon point's time is
    # gone with its row, so the time may lie before it or between it and the next record.
    return (f"is before every retained record, and the catalog does not record when the retention horizon, "
            f"seq {h}, was (written before horizon_ts was kept): if that is the point meant, --seq {h} takes it")
