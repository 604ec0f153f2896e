"""The head of one domain's catalog (FORMAT.md §8.2, §8.5) and the rules a delta must follow.

``CatalogState`` is what a ``SNAPSHOT`` body holds: the domain, its disks, the
``current`` timeline and every ``Timeline``. A timeline keeps its segment history as
page references (``refs``) and the newest rows (``tail``), never one Python object per
segment, so the head's size does not grow with history; the rows inside pages are read
on demand (``cdp.catalog_read``). ``apply_delta`` moves the head one generation forward
and refuses any change that would break an invariant, leaving it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdp.catalog_json import (
    OWNER_CHARS_MAX, check_base, check_disks, check_int, check_list, check_marks, check_obj,
    check_refs, check_rows, check_str, check_windows, check_writer, refs_json, rows_json,
)
from cdp.catalog_page import (
    Fold, apply_fold, empty_refs, empty_rows, plan_folds, refs_problem, rows_lineage_problem, rows_problem,
)
from cdp.errors import FormatError
from cdp.layout import U32_MAX

SNAPSHOT_KEYS = frozenset(("writer", "domain", "disks", "current", "timelines"))
TIMELINE_KEYS = frozenset(("id", "parent", "fork_seq", "owner", "created_ns", "committed_seq", "horizon_seq",
                           "pages", "tail", "bases", "marks", "windows"))
#: §8.2: keys a timeline holds only when they say something (``horizon_ts`` 0 is written as
#: no key): a head without them reads the same to a reader from before them (§10).
TIMELINE_OPTIONAL_KEYS = frozenset(("horizon_ts",))
DELTA_KEYS = frozenset(("writer", "timeline", "add_segments", "add_pages", "add_bases", "remove_bases",
                        "add_marks", "set_windows", "disks", "committed_seq", "horizon_seq", "horizon_ts",
                        "add_timeline"))
#: §8.3: what a consolidation/retention job's delta may hold.
MAINTENANCE_KEYS = frozenset(("writer", "timeline", "add_bases", "remove_bases", "horizon_seq", "horizon_ts"))
#: §8.2: the most marks a timeline's head keeps; past it the oldest leave the head
#: (``Timeline.drop_before_horizon``): their points stay recoverable by seq and time,
#: only the name is gone. 2^17: one mark a minute for three months (131,072 minutes =
#: 91 days). A DRVA-written mark is at most 575 bytes of snapshot body (a 255-byte name
#: of characters JSON escapes, 20-digit seq and ts) and ~75 bytes with a 20-byte name:
#: at most 75 MB of a snapshot's 256 MiB body (§8.1), ~10 MB typically, and ~45 MB of a
#: DRVA's memory per timeline (~85 MB with 255-byte names). Nothing bounded them before:
#: 8.1 M marks (1-byte names, from frames of 65,536 MARK records) took a DRVA to 4.7 GB,
#: and their snapshot past 256 MiB ended it, at every restart.
MARKS_MAX = 1 << 17


@dataclass(eq=False)
class Timeline:
    """One timeline of a domain (§8.2, §8.5).

    Invariants (checked by ``from_body``, kept by ``CatalogState.apply_delta``): the rows
    under ``refs`` then ``tail`` are contiguous and hold every seq from
    ``horizon_seq + 1`` to ``committed_seq`` (the last row's ``last_seq``), nothing whose
    ``last_seq <= horizon_seq`` is kept; each row and page reference starts no earlier in
    time than the one before it ends (§1: times are non-decreasing along seq); bases are
    unique per (seq, disk); marks have strictly increasing seqs in
    ``horizon_seq .. committed_seq``, at most ``MARKS_MAX`` of them once a delta was
    applied (a snapshot of an older writer may hold more: the next delta drops them).
    ``horizon_ts`` is the time of the record at ``horizon_seq`` (0: unknown, or no
    record: ``horizon_seq`` 0); no row after the horizon and no mark is older, and a row
    still holding the horizon record spans it.
    """

    id: int
    parent: int
    fork_seq: int
    owner: str
    created_ns: int
    committed_seq: int = 0
    horizon_seq: int = 0
    refs: np.ndarray = field(default_factory=empty_refs)
    tail: np.ndarray = field(default_factory=empty_rows)
    bases: list[dict] = field(default_factory=list)
    marks: list[dict] = field(default_factory=list)
    windows: list[dict] = field(default_factory=list)
    #: ``timestamp_ns`` of the record at ``horizon_seq`` (§8.2): once its row is dropped, the
    #: only record of when the horizon point was, which ``--at`` needs. 0 = unknown.
    horizon_ts: int = 0

    def copy(self) -> Timeline:
        """An independent copy. Arrays are replaced, never changed in place, and the dicts
        inside the lists are values that are never changed in place, so sharing them is
        safe and the copy costs the size of the head."""
        return Timeline(self.id, self.parent, self.fork_seq, self.owner, self.created_ns, self.committed_seq,
                        self.horizon_seq, self.refs, self.tail, list(self.bases), list(self.marks),
                        list(self.windows), self.horizon_ts)

    @property
    def segments(self) -> int:
        """Rows held (in pages and the tail), retained or not yet dropped."""
        return int(self.refs["segments"].sum(dtype=np.uint64)) + len(self.tail)

    @property
    def first_entry_seq(self) -> int | None:
        """``first_seq`` of the oldest page or row held, None when there is none."""
        if len(self.refs):
            return int(self.refs["first_seq"][0])
        return int(self.tail["first_seq"][0]) if len(self.tail) else None

    def fold_plan(self, domain: int) -> list[Fold]:
        """The pages folding would create now (§8.4)."""
        return plan_folds(domain, self.refs, self.tail)

    def to_body(self) -> dict:
        body = {"id": self.id, "parent": self.parent, "fork_seq": self.fork_seq, "owner": self.owner,
                "created_ns": self.created_ns, "committed_seq": self.committed_seq,
                "horizon_seq": self.horizon_seq, "pages": refs_json(self.refs), "tail": rows_json(self.tail),
                "bases": [dict(b) for b in self.bases], "marks": [dict(m) for m in self.marks],
                "windows": [dict(w) for w in self.windows]}
        if self.horizon_ts:  # absent = 0: a head retention never moved stays readable by older readers
            body["horizon_ts"] = self.horizon_ts
        return body

    @classmethod
    def from_body(cls, body: Any, domain: int, what: str, where: str) -> Timeline:
        t = check_obj(body, TIMELINE_KEYS, what, where, TIMELINE_OPTIONAL_KEYS)
        tl = cls(
            id=check_int(t["id"], f"{what}.id", where, U32_MAX),
            parent=check_int(t["parent"], f"{what}.parent", where, U32_MAX),
            fork_seq=check_int(t["fork_seq"], f"{what}.fork_seq", where),
            owner=check_str(t["owner"], f"{what}.owner", where, OWNER_CHARS_MAX),
            created_ns=check_int(t["created_ns"], f"{what}.created_ns", where),
            committed_seq=check_int(t["committed_seq"], f"{what}.committed_seq", where),
            horizon_seq=check_int(t["horizon_seq"], f"{what}.horizon_seq", where),
            refs=check_refs(t["pages"], f"{what}.pages", where),
            tail=check_rows(t["tail"], f"{what}.tail", where),
            horizon_ts=check_int(t.get("horizon_ts", 0), f"{what}.horizon_ts", where),
        )
        bases = [check_base(b, f"{what}.bases[{i}]", domain, where)
                 for i, b in enumerate(check_list(t["bases"], f"{what}.bases", where))]
        tl.bases = sorted(bases, key=lambda b: (b["seq"], b["disk"]))
        tl.marks = check_marks(t["marks"], -1, f"{what}.marks", where)
        tl.windows = check_windows(t["windows"], f"{what}.windows", where)
        tl.check(f"{where}: {what}")
        return tl

    def check(self, where: str) -> None:
        """The invariants of the class docstring; FormatError naming what breaks one."""
        if self.id < 1 or self.parent >= self.id:
            raise FormatError(f"{where}: timeline id {self.id}, parent {self.parent}: ids start at 1 and a "
                              f"parent is older than its child")
        problem = refs_problem(self.refs) or rows_problem(self.tail)
        if problem is None and len(self.refs) and len(self.tail) and (
                int(self.tail["first_seq"][0]) != int(self.refs["last_seq"][-1]) + 1):
            problem = "the tail does not continue the last page"
        if problem is None and len(self.refs) and len(self.tail) and (
                int(self.tail["first_ts"][0]) < int(self.refs["last_ts"][-1])):
            problem = (f"the tail starts at ts {int(self.tail['first_ts'][0])}, before the last page ends (ts "
                       f"{int(self.refs['last_ts'][-1])}): record times are non-decreasing along seq (FORMAT.md §1)")
        last = (int(self.tail["last_seq"][-1]) if len(self.tail)
                else int(self.refs["last_seq"][-1]) if len(self.refs) else None)
        first = self.first_entry_seq
        if problem is None and last is not None and last != self.committed_seq:
            problem = f"committed_seq {self.committed_seq} is not the last row's last_seq {last}"
        if problem is None and self.horizon_seq > self.committed_seq:
            problem = f"horizon_seq {self.horizon_seq} is after committed_seq {self.committed_seq}"
        if problem is None and first is not None and first > self.horizon_seq + 1:
            problem = f"the rows start at seq {first}, after horizon_seq + 1 = {self.horizon_seq + 1}"
        if problem is None and first is None and self.committed_seq != self.horizon_seq:
            problem = f"no rows, but seqs {self.horizon_seq + 1}..{self.committed_seq} are committed"
        if problem is None and len(self.refs) and int(self.refs["last_seq"][0]) <= self.horizon_seq:
            problem = "a page at or below horizon_seq is still referenced"
        if problem is None and not len(self.refs) and len(self.tail) and (
                int(self.tail["last_seq"][0]) <= self.horizon_seq):
            problem = "a row at or below horizon_seq is still held"
        if problem is None and len({(b["seq"], b["disk"]) for b in self.bases}) != len(self.bases):
            problem = "bases lists a (seq, disk) twice"
        if problem is None and any(b["timeline"] > self.id for b in self.bases):
            problem = "a base belongs to a newer timeline"
        if problem is None and self.marks and not (
                self.horizon_seq <= self.marks[0]["seq"] and self.marks[-1]["seq"] <= self.committed_seq):
            problem = f"a mark lies outside horizon_seq..committed_seq ({self.horizon_seq}..{self.committed_seq})"
        if problem is None and self.horizon_ts:
            problem = self._horizon_ts_problem()
        if problem is not None:
            raise FormatError(f"{where} (timeline {self.id}): {problem}")

    def _horizon_ts_problem(self) -> str | None:
        """Why ``horizon_ts`` (non-zero) cannot be the time of record ``horizon_seq``, or None.
        Times never go back along seq (§1), so the first entry after the horizon starts no
        earlier, an entry still holding the horizon record spans its time, and no mark (all
        at or after the horizon) is older. Exactness needs the segment (``cdp verify``)."""
        h, ts = self.horizon_seq, self.horizon_ts
        if h == 0:
            return f"horizon_ts {ts} with horizon_seq 0: seq 0 is no record and has no time (expected 0)"
        entry = self.refs[0] if len(self.refs) else self.tail[0] if len(self.tail) else None
        if entry is not None:
            first, first_ts, last_ts = int(entry["first_seq"]), int(entry["first_ts"]), int(entry["last_ts"])
            if first > h and ts > first_ts:
                return (f"horizon_ts {ts} (seq {h}) is after the first retained record's time {first_ts} "
                        f"(seq {first}): record times are non-decreasing along seq (FORMAT.md §1)")
            if first <= h and not first_ts <= ts <= last_ts:
                return (f"horizon_ts {ts} (seq {h}) is outside the times {first_ts}..{last_ts} of the entry "
                        f"holding seqs {first}..{int(entry['last_seq'])}, which holds the horizon record")
        for m in self.marks:
            if m["seq"] == h and m["ts"] != ts:
                return (f"mark {m['name']!r} at the horizon seq {h} has ts {m['ts']}, horizon_ts is {ts}: "
                        f"both are the time of that record")
            if m["ts"] < ts:
                return (f"mark {m['name']!r} at seq {m['seq']} has ts {m['ts']}, before horizon_ts {ts} (seq {h}): "
                        f"record times are non-decreasing along seq (FORMAT.md §1)")
        return None

    def drop_before_horizon(self) -> None:
        """Forget what the head no longer keeps (§8.2): the pages, rows and marks the
        horizon has passed, the windows that end below it, and the oldest marks past
        ``MARKS_MAX``.

        A window that ends below ``horizon_seq`` holds no point a recovery may ask for
        (they are all outside retention), so it goes — but a ``seeding`` window only once
        no base lies in it or at its fuzzy base (``first_seq - 1``): such a base, built
        from zeros and writes while the seed was copying, must still be known as one
        (``rocva.plan``). A window still open, or ending at or above the horizon, stays:
        the points at and above the horizon are judged as before."""
        h = self.horizon_seq
        self.refs = self.refs[self.refs["last_seq"] > np.uint64(h)]
        if not len(self.refs):
            self.tail = self.tail[self.tail["last_seq"] > np.uint64(h)]
        if self.marks and self.marks[0]["seq"] < h:
            self.marks = [m for m in self.marks if m["seq"] >= h]
        if len(self.marks) > MARKS_MAX:
            self.marks = self.marks[-MARKS_MAX:]
        if any(w["last_seq"] is not None and w["last_seq"] < h for w in self.windows):
            self.windows = [w for w in self.windows if not self._window_gone(w, h)]

    def _window_gone(self, w: dict, horizon: int) -> bool:
        """Does window ``w`` leave the head at ``horizon`` (``drop_before_horizon``)?"""
        last = w["last_seq"]
        if last is None or last >= horizon:
            return False
        if w["kind"] == "seeding":
            return not any(w["first_seq"] - 1 <= b["seq"] <= last for b in self.bases)
        return True


@dataclass(eq=False)
class CatalogState:
    """The head of a domain's catalog at one generation (§8.2).

    Invariant: every timeline satisfies ``Timeline.check``; ids are 1..n; ``current`` is
    one of them; a timeline's parent exists and its ``fork_seq`` is at most the parent's
    ``committed_seq``; its bases and tail rows lie in its history (``history``: its own
    seqs, and each ancestor's up to the fork that left it). Rows inside pages are held to
    the same rule as a ``CatalogView`` reads them (``cdp.catalog_read``).
    """

    domain: dict
    disks: list[dict] = field(default_factory=list)
    current: int = 1
    timelines: dict[int, Timeline] = field(default_factory=dict)
    #: The ``writer`` of the generation this head was read from (informational).
    writer: dict | None = None

    @classmethod
    def new(cls, domain_id: int, name: str, created_ns: int, owner: str) -> CatalogState:
        """The empty head of a new domain (its generation-1 snapshot): timeline 1, owned by ``owner``."""
        return cls({"id": domain_id, "name": name, "created_ns": created_ns}, [], 1,
                   {1: Timeline(1, 0, 0, owner, created_ns)})

    @property
    def domain_id(self) -> int:
        return self.domain["id"]

    def timeline(self, tl: int | None = None) -> Timeline:
        """Timeline ``tl`` (default: ``current``); KeyError if there is none."""
        return self.timelines[self.current if tl is None else tl]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CatalogState):
            return NotImplemented
        return self.to_snapshot_body(None) == other.to_snapshot_body(None)

    def copy(self) -> CatalogState:
        return CatalogState(dict(self.domain), list(self.disks), self.current,
                            {k: t.copy() for k, t in self.timelines.items()}, self.writer)

    def lineage(self, tl: int) -> list[tuple[int, int]]:
        """(timeline, last seq of its that ``tl``'s history holds) from ``tl`` back to
        timeline 1: ``tl`` holds its own seqs (to 2**64 - 1), then each ancestor's up to
        the fork that left it."""
        out, cap = [], (1 << 64) - 1
        while tl:
            out.append((tl, cap))
            t = self.timelines[tl]
            tl, cap = t.parent, min(cap, t.fork_seq)
        return out

    def history(self, tl: int) -> list[tuple[int, int, int]]:
        """(timeline, floor, cap) from ``tl`` back to timeline 1: ``tl``'s history holds
        that timeline's seqs ``floor + 1 .. cap`` — its own from its fork on, each
        ancestor's from that ancestor's own fork up to the fork that left it (§8.5). So
        a row of ``tl`` must be of one of them and lie within its part
        (``catalog_page.rows_lineage_problem``)."""
        out = []
        for t, cap in self.lineage(tl):
            timeline = self.timelines[t]
            out.append((t, timeline.fork_seq if timeline.parent else 0, cap))
        return out

    # ---- snapshots

    def to_snapshot_body(self, writer: dict | None) -> dict:
        """The JSON body of a ``SNAPSHOT`` at this head (§8.2), written by ``writer``."""
        return {"writer": writer, "domain": dict(self.domain), "disks": [dict(d) for d in self.disks],
                "current": self.current, "timelines": [self.timelines[k].to_body() for k in sorted(self.timelines)]}

    @classmethod
    def from_snapshot_body(cls, body: Any, where: str = "catalog snapshot") -> CatalogState:
        """Validate a ``SNAPSHOT`` body (§8.2) and build the head it describes."""
        body = check_obj(body, SNAPSHOT_KEYS, "the snapshot body", where)
        writer = check_writer(body["writer"], where)
        dom = check_obj(body["domain"], {"id", "name", "created_ns"}, "domain", where)
        domain = {"id": check_int(dom["id"], "domain.id", where, U32_MAX),
                  "name": check_str(dom["name"], "domain.name", where),
                  "created_ns": check_int(dom["created_ns"], "domain.created_ns", where)}
        timelines = {}
        for i, t in enumerate(check_list(body["timelines"], "timelines", where)):
            tl = Timeline.from_body(t, domain["id"], f"timelines[{i}]", where)
            if tl.id != i + 1:
                raise FormatError(f"{where}: timelines[{i}] has id {tl.id}, expected {i + 1}")
            timelines[tl.id] = tl
        state = cls(domain, check_disks(body["disks"], where),
                    check_int(body["current"], "current", where, U32_MAX), timelines, writer)
        state._check_links(where)
        return state

    def _check_links(self, where: str) -> None:
        if self.current not in self.timelines:
            raise FormatError(f"{where}: current timeline {self.current} does not exist")
        for t in self.timelines.values():
            parent = self.timelines.get(t.parent)
            if t.parent and (parent is None or t.fork_seq > parent.committed_seq):
                raise FormatError(f"{where}: timeline {t.id} forks from timeline {t.parent} at seq {t.fork_seq}, "
                                  f"which it does not hold")
            caps = dict(self.lineage(t.id))
            bad = next((b for b in t.bases if b["timeline"] not in caps or b["seq"] > caps[b["timeline"]]), None)
            if bad is not None:
                raise FormatError(f"{where}: timeline {t.id} lists base {bad['key']}, which is not in its history")
            problem = rows_lineage_problem(t.tail, self.history(t.id))
            if problem is not None:
                raise FormatError(f"{where}: timeline {t.id}: tail {problem}")

    # ---- deltas

    def apply_delta(self, body: Any, where: str = "catalog delta") -> None:
        """Apply a ``DELTA`` body (§8.2): all of it, or nothing (FormatError, head unchanged)."""
        if not isinstance(body, dict) or not set(body) <= DELTA_KEYS or "writer" not in body:
            extra = sorted(set(body) - DELTA_KEYS) if isinstance(body, dict) else type(body).__name__
            raise FormatError(f"{where}: not a delta body (unknown keys {extra}, or no writer)")
        writer = check_writer(body["writer"], where)
        if "add_timeline" in body:
            if set(body) != {"writer", "add_timeline"}:
                raise FormatError(f"{where}: add_timeline comes with other changes {sorted(set(body) - {'writer', 'add_timeline'})}")
            self._add_timeline(body["add_timeline"], where)
            self.writer = writer
            return
        tl_id = check_int(body.get("timeline", self.current), "timeline", where, U32_MAX)
        if tl_id not in self.timelines:
            raise FormatError(f"{where}: timeline {tl_id} does not exist")
        new = self.timelines[tl_id].copy()
        self._apply_rows(new, body, tl_id, where)
        if "remove_bases" in body or "add_bases" in body:
            new.bases = self._bases_after(new, body, where)
        after = new.marks[-1]["seq"] if new.marks else -1
        new.marks = new.marks + check_marks(body.get("add_marks", []), after, "add_marks", where)
        if "set_windows" in body:
            new.windows = check_windows(body["set_windows"], "set_windows", where)
        horizon = check_int(body.get("horizon_seq", new.horizon_seq), "horizon_seq", where)
        if horizon < new.horizon_seq:
            raise FormatError(f"{where}: horizon_seq {horizon} goes back from {new.horizon_seq}")
        new.horizon_ts = _horizon_ts_after(new, horizon, body, where)
        new.horizon_seq = horizon
        new.drop_before_horizon()
        new.check(where)
        caps = dict(self.lineage(tl_id))
        bad = next((b for b in new.bases if b["timeline"] not in caps or b["seq"] > caps[b["timeline"]]), None)
        if bad is not None:
            raise FormatError(f"{where}: base {bad['key']} is not in the history of timeline {tl_id}")
        disks = self._disks_after(check_disks(body["disks"], where), where) if "disks" in body else self.disks
        # Every check passed: change the head.
        self.timelines[tl_id] = new
        self.disks = disks
        self.writer = writer

    def _disks_after(self, disks: list[dict], where: str) -> list[dict]:
        """A ``disks`` delta may add disks and grow them, never drop nor shrink one (§8.2):
        the history holds that disk's writes, up to its old end, and a recovery of any
        point refuses records of a disk the catalog no longer lists or past its end."""
        new = {d["disk"]: d for d in disks}
        for old in self.disks:
            now = new.get(old["disk"])
            if now is None:
                raise FormatError(f"{where}: disks drops disk {old['disk']} ({old['vm']}/{old['name']}): a disk of "
                                  f"a domain is never removed from its catalog (its history holds its writes)")
            if now["size"] < old["size"]:
                raise FormatError(f"{where}: disks shrinks disk {old['disk']} ({old['vm']}/{old['name']}) from "
                                  f"{old['size']} to {now['size']} bytes: a disk never shrinks (its history "
                                  f"holds writes up to its old end)")
        return disks

    def _apply_rows(self, new: Timeline, body: dict, tl_id: int, where: str) -> None:
        """Append ``add_segments``, fold ``add_pages`` in, set ``committed_seq`` (§8.2)."""
        rows = check_rows(body.get("add_segments", rows_json(empty_rows())), "add_segments", where)
        if len(rows):
            if tl_id != self.current:
                raise FormatError(f"{where}: add_segments to timeline {tl_id}, which is not current ({self.current})")
            if (rows["timeline"] != tl_id).any() or (rows["object_last_seq"] != rows["last_seq"]).any():
                raise FormatError(f"{where}: add_segments holds a row of another timeline or a clipped row")
            problem = rows_problem(rows) or rows_lineage_problem(rows, self.history(tl_id))
            problem = None if problem is None else f"add_segments {problem}"
            if problem is None and int(rows["first_seq"][0]) != new.committed_seq + 1:
                problem = (f"add_segments starts at seq {int(rows['first_seq'][0])}, expected committed_seq + 1 "
                           f"= {new.committed_seq + 1} (segments only extend the end)")
            if problem is not None:
                raise FormatError(f"{where}: {problem}")
            if len(new.tail) and int(rows["first_ts"][0]) < int(new.tail["last_ts"][-1]):
                raise FormatError(f"{where}: add_segments starts at ts {int(rows['first_ts'][0])}, before the "
                                  f"previous segment ends (ts {int(new.tail['last_ts'][-1])})")
            new.tail = np.concatenate([new.tail, rows])
        pages = check_refs(body.get("add_pages", {"level": [], "first_seq": [], "last_seq": [], "first_ts": [],
                                                  "last_ts": [], "count": [], "segments": [], "bytes": [],
                                                  "hash": []}), "add_pages", where)
        for i in range(len(pages)):
            new.refs, new.tail = apply_fold(new.refs, new.tail, pages[i : i + 1], f"{where}: add_pages[{i}]")
        last = new.committed_seq if not len(rows) else int(rows["last_seq"][-1])
        committed = check_int(body.get("committed_seq", last), "committed_seq", where)
        if committed != last:
            raise FormatError(f"{where}: committed_seq {committed}, expected {last} (the last row's last_seq)")
        new.committed_seq = committed

    def _bases_after(self, new: Timeline, body: dict, where: str) -> list[dict]:
        bases = {(b["seq"], b["disk"]): b for b in new.bases}
        for i, r in enumerate(check_list(body.get("remove_bases", []), "remove_bases", where)):
            r = check_obj(r, {"seq", "disk"}, f"remove_bases[{i}]", where)
            r = {"seq": check_int(r["seq"], f"remove_bases[{i}].seq", where),
                 "disk": check_int(r["disk"], f"remove_bases[{i}].disk", where, U32_MAX)}
            if bases.pop((r["seq"], r["disk"]), None) is None:
                raise FormatError(f"{where}: remove_bases[{i}] (seq {r['seq']!r}, disk {r['disk']!r}) is not "
                                  f"in the catalog")
        for i, b in enumerate(check_list(body.get("add_bases", []), "add_bases", where)):
            b = check_base(b, f"add_bases[{i}]", self.domain_id, where)
            if (b["seq"], b["disk"]) in bases:
                raise FormatError(f"{where}: add_bases[{i}] (seq {b['seq']}, disk {b['disk']}) is already in "
                                  f"the catalog")
            bases[(b["seq"], b["disk"])] = b
        return sorted(bases.values(), key=lambda b: (b["seq"], b["disk"]))

    def _add_timeline(self, value: Any, where: str) -> None:
        """§8.5: a new timeline from ``parent`` at ``fork_seq``; it becomes current."""
        tl = Timeline.from_body(value, self.domain_id, "add_timeline", where)
        parent = self.timelines.get(tl.parent)
        if tl.id != max(self.timelines) + 1 or parent is None:
            raise FormatError(f"{where}: add_timeline: id {tl.id} from parent {tl.parent}; expected id "
                              f"{max(self.timelines) + 1} from an existing timeline")
        if not parent.horizon_seq <= tl.fork_seq <= parent.committed_seq or tl.committed_seq != tl.fork_seq:
            raise FormatError(f"{where}: add_timeline: fork_seq {tl.fork_seq} (committed_seq {tl.committed_seq}) "
                              f"is not a seq timeline {parent.id} holds "
                              f"({parent.horizon_seq}..{parent.committed_seq})")
        # The fork shares the parent's records up to fork_seq: the same horizon seq is the
        # same record, so the same time.
        if tl.horizon_seq == parent.horizon_seq and tl.horizon_ts != parent.horizon_ts:
            raise FormatError(f"{where}: add_timeline: horizon_ts {tl.horizon_ts} at horizon_seq {tl.horizon_seq}, "
                              f"but timeline {parent.id} has horizon_ts {parent.horizon_ts} there (the same record)")
        current = self.current
        self.timelines[tl.id], self.current = tl, tl.id
        try:
            self._check_links(where)
        except FormatError:
            del self.timelines[tl.id]
            self.current = current
            raise

    # ---- maintenance (§8.3)

    def maintenance_difference(self, new: CatalogState) -> str | None:
        """None when ``new`` is this head after consolidation and retention only (§8.3):
        bases added or removed, horizons moved (and the pages, rows, marks and windows
        below them dropped: ``Timeline.drop_before_horizon``). Otherwise what else
        changed: another writer owns the domain."""
        if new.domain != self.domain or new.disks != self.disks:
            return "the domain or its disks changed"
        if new.current != self.current or set(new.timelines) != set(self.timelines):
            added = sorted(set(new.timelines) - set(self.timelines))
            if added:
                t = new.timelines[added[-1]]
                return (f"FENCED: timeline {t.id} (owner {t.owner}) forked from timeline {t.parent} "
                        f"at seq {t.fork_seq}")
            return f"the current timeline moved from {self.current} to {new.current}"
        for k, old in self.timelines.items():
            t = new.timelines[k]
            if (t.parent, t.fork_seq, t.owner, t.created_ns) != (old.parent, old.fork_seq, old.owner, old.created_ns):
                return f"timeline {k} changed"
            if t.committed_seq != old.committed_seq:
                return f"timeline {k}: committed_seq moved from {old.committed_seq} to {t.committed_seq}"
            if t.horizon_seq < old.horizon_seq:
                return f"timeline {k}: horizon_seq went back from {old.horizon_seq} to {t.horizon_seq}"
            if t.horizon_seq == old.horizon_seq and t.horizon_ts != old.horizon_ts:
                return (f"timeline {k}: horizon_ts changed from {old.horizon_ts} to {t.horizon_ts} while "
                        f"horizon_seq stayed {t.horizon_seq}")
            expect = old.copy()
            expect.horizon_seq = t.horizon_seq
            expect.bases = list(t.bases)  # a maintenance delta may change them: windows follow them
            expect.drop_before_horizon()
            if not (np.array_equal(expect.refs, t.refs) and np.array_equal(expect.tail, t.tail)):
                return f"timeline {k}: segments were added or replaced, not only the oldest ones dropped"
            # Both sides as this reader keeps them: a writer of a release before the rules
            # of drop_before_horizon (windows, MARKS_MAX) keeps more in its snapshot.
            got = t.copy()
            got.drop_before_horizon()
            if got.windows != expect.windows:
                return f"timeline {k}: its windows changed"
            if got.marks != expect.marks:
                return f"timeline {k}: marks changed"
        return None


def _horizon_ts_after(tl: Timeline, horizon: int, body: dict, where: str) -> int:
    """``horizon_ts`` of ``tl`` after a delta that sets its horizon to ``horizon`` (§8.2).

    It belongs to the record at ``horizon_seq``: unchanged while the horizon stays (a
    delta may repeat it, not change it); when the horizon moves it is the delta's value,
    0 (unknown) when the delta gives none — the old one is another record's time — and
    never earlier than a known old one (times do not go back along seq, §1)."""
    given = check_int(body["horizon_ts"], "horizon_ts", where) if "horizon_ts" in body else None
    if horizon == tl.horizon_seq:
        if given is not None and given != tl.horizon_ts:
            raise FormatError(f"{where}: horizon_ts {given} changes the time of seq {horizon}, whose horizon_ts is "
                              f"{tl.horizon_ts}: it changes only with horizon_seq")
        return tl.horizon_ts
    ts = given or 0
    if ts and ts < tl.horizon_ts:
        raise FormatError(f"{where}: horizon_ts {ts} (seq {horizon}) goes back from {tl.horizon_ts} (seq "
                          f"{tl.horizon_seq}): record times are non-decreasing along seq (FORMAT.md §1)")
    return ts
