"""Campaign 1, power loss: crash states of a real workload, reopened by the real code.

The workload is what a DRVA does to its three durable places, with the real classes: group
commits of frames to the replication log (``ReplicationLog.append_batch``: ``pwritev`` then
one ``fdatasync``; the seqs are acknowledged when it returns), and now and then a seal —
the log's frames built into a segment and put in the file store (temp file, fsync,
rename or link, directory fsync), the metadata repository updated, the log trimmed.
``fsrecord.Recorder`` records every operation that reaches the file system and, between
them, what was acknowledged.

Crash points are taken before every sync (where the most is pending) and at the end. At
each, the states built are: only what was synced; everything issued; a prefix of the
pending pieces; random subsets of them (``fsrecord``). Each state is written out as real
files and reopened: ``ReplicationLog.open`` (the recovery scan of FORMAT.md §3.5),
``MetaRepository.open`` (§4), every segment in the store decoded whole (§5.6). Then:

- every acknowledged seq is in the log or in a segment, with exactly its bytes (``lost``
  counts those that are not, and any acknowledged object, metadata generation, or log
  that refuses to open — a ``LogCorruption`` where a torn tail was all there was);
- a segment visible in the store is whole, a reported trim stays done, and what the
  metadata says is committed is in the store (``failures``).
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from cdp.errors import CdpError, LogCorruption
from cdp.frame import decode_frame
from cdp.layout import segment_key
from cdp.logfmt import DATA_SIZE_MIN, DATA_START
from cdp.meta import MetaRepository
from cdp.records import KIND_WRITE
from cdp.replog import ReplicationLog
from cdp.segment import decode_segment
from cdp.segment_build import build_segment
from cdp.store.fs import FileStore
from tests.frames_gen import payload_for
from tests.log_crash_child import make_frame
from tests.torture import fsrecord
from tests.torture.result import Result

NAME = "power_loss"
DOMAIN = 1
TIMELINE = 1
LOG_BYTES = DATA_START + DATA_SIZE_MIN  # the smallest ring: the workload wraps it
META_SLOT_BYTES = 4096
FRAMES_PER_COMMIT_MAX = 3
RECORDS_PER_FRAME_MAX = 6
SECTORS_PER_RECORD_MAX = 12
SEAL_PROBABILITY = 0.15  # and always once the log is half full
PROGRESS_POINTS = 100  # a progress line every this many crash points


@dataclass(frozen=True)
class Plan:
    commits: int  # group commits in the workload
    prefixes: int  # prefix states per crash point
    subsets: int  # random-subset states per crash point


QUICK = Plan(commits=50, prefixes=1, subsets=1)
LONG = Plan(commits=600, prefixes=3, subsets=6)


# ------------------------------------------------------------------ the workload


async def _seal(log: ReplicationLog, meta: MetaRepository, store: FileStore, rec: fsrecord.Recorder,
                n: int) -> None:
    frames = [decode_frame(body) for _, body in log.entries()]
    if not frames:
        return
    first, last = frames[0].first_seq, frames[-1].last_seq
    key = segment_key(DOMAIN, TIMELINE, first, last)
    # Both publishing paths of the file store: rename over, and link if absent.
    await store.put(key, build_segment(DOMAIN, frames), if_absent=n % 2 == 1)
    rec.ack(("object", key))
    meta.write({"drva": "torture", "domains": {str(DOMAIN): {
        "committed_seq": last, "committed_ts": 0, "generation": n + 1, "timeline": TIMELINE}}})
    rec.ack(("meta", meta.generation))
    log.trim(log.tail)
    rec.ack(("trim", log.head))


async def _workload(root: Path, rec: fsrecord.Recorder, rng: random.Random, commits: int) -> int:
    """Run the workload; return the last seq acknowledged."""
    log = ReplicationLog.open(root / "replog")
    meta = MetaRepository.open(root / "meta", slot_size=META_SLOT_BYTES)
    store = FileStore(root / "store")
    seq, seals = 1, 0
    try:
        for _ in range(commits):
            frames = []
            for _ in range(rng.randint(1, FRAMES_PER_COMMIT_MAX)):
                lengths = [rng.randint(1, SECTORS_PER_RECORD_MAX) * 512
                           for _ in range(rng.randint(1, RECORDS_PER_FRAME_MAX))]
                frames.append(make_frame(seq, lengths))
                seq += len(lengths)
            log.append_batch(frames)  # the group commit: durable when it returns
            rec.ack(("seq", seq - 1))
            st = log.stats()
            if st.used_bytes > st.data_size // 2 or rng.random() < SEAL_PROBABILITY:
                await _seal(log, meta, store, rec, seals)
                seals += 1
    finally:
        log.close()
        meta.close()
    return seq - 1


def _prepare(root: Path) -> None:
    ReplicationLog.format(root / "replog", LOG_BYTES, label="torture")
    MetaRepository.format(root / "meta", slot_size=META_SLOT_BYTES)
    (root / "store").mkdir()


# ------------------------------------------------------------------ checking one state


@dataclass
class _Acked:
    seq: int = 0
    objects: list[str] = field(default_factory=list)
    meta_generation: int = 0
    trimmed_to: int = 0

    def take(self, what: tuple) -> None:
        kind, value = what
        if kind == "seq":
            self.seq = value
        elif kind == "object":
            self.objects.append(value)
        elif kind == "meta":
            self.meta_generation = value
        else:
            self.trimmed_to = value


class _Checker:
    """Reopens crash states and counts what they lost."""

    def __init__(self, res: Result) -> None:
        self.res = res
        self._expected: dict[tuple[int, int], bytes] = {}
        self._segments: dict[tuple[str, int], tuple[list[int], list[int]] | str] = {}
        self.torn_tails = 0  # states whose log kept part of an unsynced commit and opened quietly

    def _payload(self, seq: int, n: int) -> bytes:
        key = (seq, n)
        if key not in self._expected:
            self._expected[key] = payload_for(seq, n)
        return self._expected[key]

    def _segment(self, key: str, data: bytes) -> tuple[list[int], list[int]] | str:
        """(seqs with their exact bytes, seqs with other bytes) of a segment object, or why
        it does not decode. Crash states mostly hold the same objects: each content is
        decoded once."""
        digest = (key, xxhash.xxh3_128_intdigest(data))
        if digest not in self._segments:
            try:
                index, raw = decode_segment(key, data)
            except CdpError as exc:
                self._segments[digest] = str(exc)
            else:
                good, wrong = [], []
                rec = index.records
                for i, seq in enumerate(rec["seq"].tolist()):
                    a, n = int(rec["raw_pos"][i]), int(rec["length"][i])
                    ok = int(rec["kind"][i]) == KIND_WRITE and raw[a : a + n] == self._payload(seq, n)
                    (good if ok else wrong).append(seq)
                self._segments[digest] = (good, wrong)
        return self._segments[digest]

    def check(self, where: str, dest: Path, acked: _Acked) -> None:
        res = self.res
        found: set[int] = set()
        bad: set[int] = set()
        try:
            with ReplicationLog.open(dest / "replog", readonly=True) as log:
                head = log.head
                for _, body in log.entries():
                    frame = decode_frame(body)
                    starts = frame.payload_starts()
                    for i, seq in enumerate(frame.records["seq"].tolist()):
                        n = int(frame.records["length"][i])
                        a = int(starts[i])
                        ok = bytes(frame.payload[a : a + n]) == self._payload(seq, n)
                        (found if ok else bad).add(seq)
            if head < acked.trimmed_to:
                res.problem("failures", f"{where}: log head {head} is back before the reported trim to "
                                        f"{acked.trimmed_to}")
        except LogCorruption as exc:
            res.problem("lost", f"{where}: the log refuses to open after a crash that only tore its tail: {exc}")
        in_store = self._check_store(where, dest / "store", acked, found, bad)
        try:
            with MetaRepository.open(dest / "meta", slot_size=META_SLOT_BYTES) as meta:
                if meta.generation < acked.meta_generation:
                    res.problem("lost", f"{where}: metadata generation {meta.generation}, "
                                        f"{acked.meta_generation} was reported durable")
                doc = meta.read()
            # The metadata is written after the segment it names (FORMAT.md §4): what it
            # says is committed must be in the store.
            committed = doc.get("domains", {}).get(str(DOMAIN), {}).get("committed_seq", 0)
            gone = [s for s in range(1, committed + 1) if s not in in_store]
            if gone:
                res.problem("failures", f"{where}: the metadata says seq {committed} is committed, the store "
                                        f"lacks {len(gone)} seqs up to it (first {gone[:5]})")
        except CdpError as exc:
            res.problem("lost", f"{where}: the metadata repository does not open: {exc}")
        res.acked_checked += acked.seq
        missing = [s for s in range(1, acked.seq + 1) if s not in found]
        if missing:
            res.problem("lost", f"{where}: {len(missing)} acknowledged seqs missing or wrong "
                                f"(first {missing[:5]}; wrong bytes: {sorted(bad)[:5]})", len(missing))

    def _check_store(self, where: str, store: Path, acked: _Acked, found: set[int], bad: set[int]) -> set[int]:
        """Check every object in the store; add the seqs they hold to ``found`` or ``bad``
        and return the good ones."""
        present = set()
        in_store: set[int] = set()
        for dirpath, _, names in os.walk(store):
            for name in names:
                if name.startswith("."):
                    continue  # a temp file: never a key
                path = Path(dirpath) / name
                key = path.relative_to(store).as_posix()
                present.add(key)
                got = self._segment(key, path.read_bytes())
                if isinstance(got, str):
                    self.res.problem("failures", f"{where}: object {key} is visible but not whole: {got}")
                    continue
                in_store.update(got[0])
                bad.update(got[1])
        for key in acked.objects:
            if key not in present:
                self.res.problem("lost", f"{where}: object {key} was put (acknowledged) and is gone")
        found.update(in_store)
        return in_store


# ------------------------------------------------------------------ the campaign


def _selections(pending: list[fsrecord.Pending], plan: Plan, rng: random.Random) -> list[frozenset]:
    """Which pending pieces reach the disk, one set per crash state (no two alike)."""
    out = [frozenset()]
    if pending:
        out.append(frozenset(pending))
        for _ in range(plan.prefixes if len(pending) > 1 else 0):
            out.append(frozenset(pending[: rng.randint(1, len(pending) - 1)]))
        for _ in range(plan.subsets):
            out.append(frozenset(p for p in pending if rng.random() < 0.5))
    unique: list[frozenset] = []
    for s in out:
        if s not in unique:
            unique.append(s)
    return unique


def run(quick: bool = True, seed: int = 14, progress: Callable[[str], None] = lambda s: None) -> Result:
    plan = QUICK if quick else LONG
    res = Result(NAME)
    t0 = time.monotonic()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="torture-power-") as tmp:
        root = Path(tmp) / "site"
        root.mkdir()
        _prepare(root)
        with fsrecord.Recorder(root) as rec:
            last_seq = asyncio.run(_workload(root, rec, rng, plan.commits))
        ops = rec.ops
        log_ino = rec.initial.dirs[""]["replog"][1]
        states = fsrecord.CrashStates(rec.initial, ops)
        points = [k for k, op in enumerate(ops) if isinstance(op, (fsrecord.Sync, fsrecord.SyncDir))]
        points.append(len(ops))
        progress(f"{NAME}: {len(ops)} operations recorded, {last_seq} seqs acknowledged, "
                 f"{len(points)} crash points")
        checker = _Checker(res)
        acked = _Acked()
        at = 0
        dest = Path(tmp) / "crash"
        for n, k in enumerate(points):
            if n and n % PROGRESS_POINTS == 0:
                progress(f"{NAME}: {n}/{len(points)} crash points, {res.crash_states} states, lost {res.lost}")
            for what in fsrecord.acks_until(ops[at:k], k - at):
                acked.take(what)
            at = k
            pending = states.pending(k)
            log_pieces = {p for p in pending if getattr(ops[p.index], "ino", None) == log_ino}
            for kept in _selections(pending, plan, rng):
                image = states.build(k, set(kept))
                fsrecord.fresh(dest)
                image.materialize(dest)
                before = res.lost
                checker.check(f"crash at operation {k} keeping {len(kept)}/{len(pending)} pending pieces",
                              dest, acked)
                res.crash_states += 1
                if 0 < len(kept & log_pieces) < len(log_pieces) and res.lost == before:
                    checker.torn_tails += 1
        fsrecord.fresh(dest)
    res.notes = {"operations": len(ops), "crash_points": len(points), "acked_seqs": last_seq,
                 "torn_tails": checker.torn_tails}
    res.elapsed_s = time.monotonic() - t0
    return res
