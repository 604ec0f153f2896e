"""Campaign 1, power loss: crash states of real workloads, reopened by the real code.

Two workloads, each recorded by ``fsrecord.Recorder`` (every operation that reaches the
file system below its root and, between them, what was acknowledged):

- ``own``: what a DRVA does to its three durable places, driven here step by step with
  the real classes: group commits of frames to the replication log
  (``ReplicationLog.append_batch``: ``pwritev`` then one ``fdatasync``; the seqs are
  acknowledged when it returns), and now and then a seal — the log's frames built into
  a segment and put in the file store (temp file, fsync, rename or link, directory
  fsync), the metadata repository updated, the log trimmed;
- ``drva``: a real DRVA in this process, fed frames over its socket; a seq is
  acknowledged when the DRVA builds the ACK carrying it (``tests/torture/power_drva.py``).

Crash points are taken before every sync (where the most is pending) and at the end. At
each, the states built are: only what was synced; everything issued; a prefix of the
pending pieces; random subsets of them (``fsrecord``). Each state is written out as real
files and reopened: ``ReplicationLog.open`` (the recovery scan of FORMAT.md §3.5),
``MetaRepository.open`` (§4), every segment in the store decoded whole (§5.6), and the
DRVA's catalog loaded (§8). Then:

- every acknowledged seq is in the log or in a segment, with exactly its bytes (``lost``
  counts those that are not, and any acknowledged object, metadata generation, or log
  that refuses to open — a ``LogCorruption`` where a torn tail was all there was);
- a segment visible in the store is whole, a reported trim stays done, the catalog
  loads and is not behind the metadata written after it, and what either says is
  committed is in the store (``failures``).
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

from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView
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
from tests.torture import fsrecord, power_drva
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
    commits: int  # group commits in the first workload
    drva_frames: int  # frames streamed to the DRVA of the second (tests/torture/power_drva.py)
    prefixes: int  # prefix states per crash point
    subsets: int  # random-subset states per crash point


QUICK = Plan(commits=50, drva_frames=30, prefixes=1, subsets=1)
LONG = Plan(commits=600, drva_frames=600, prefixes=3, subsets=6)


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


@dataclass(frozen=True)
class Layout:
    """Where a workload keeps its log, metadata and store, relative to its root;
    ``catalog``: the store holds a catalog (the DRVA's) to load and compare."""

    log: str
    meta: str
    meta_slot_bytes: int
    store: str
    catalog: bool


OWN = Layout("replog", "meta", META_SLOT_BYTES, "store", False)
DRVA = Layout(power_drva.LOG, power_drva.META, power_drva.META_SLOT_BYTES, power_drva.STORE, True)


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

    def check(self, where: str, dest: Path, acked: _Acked, layout: Layout) -> None:
        """Reopen the crash state at ``dest`` and count what it lost."""
        res = self.res
        found: set[int] = set()
        bad: set[int] = set()
        self._check_log(where, dest / layout.log, acked, found, bad)
        in_store = self._check_store(where, dest / layout.store, acked, found, bad)
        committed = self._check_meta(where, dest / layout.meta, layout.meta_slot_bytes, acked)
        if layout.catalog:
            committed = max(committed, self._check_catalog(where, dest / layout.store, committed))
        # The metadata is written after the catalog commit, the catalog after the segments
        # it names (FORMAT.md §4, §8): what either says is committed must be in the store.
        gone = [s for s in range(1, committed + 1) if s not in in_store]
        if gone:
            res.problem("failures", f"{where}: seq {committed} is said committed, the store lacks {len(gone)} "
                                    f"seqs up to it (first {gone[:5]})")
        res.acked_checked += acked.seq
        missing = [s for s in range(1, acked.seq + 1) if s not in found]
        if missing:
            res.problem("lost", f"{where}: {len(missing)} acknowledged seqs missing or wrong "
                                f"(first {missing[:5]}; wrong bytes: {sorted(bad)[:5]})", len(missing))

    def _check_log(self, where: str, path: Path, acked: _Acked, found: set[int], bad: set[int]) -> None:
        try:
            with ReplicationLog.open(path, readonly=True) as log:
                head = log.head
                for _, body in log.entries():
                    frame = decode_frame(body)
                    starts = frame.payload_starts()
                    for i, seq in enumerate(frame.records["seq"].tolist()):
                        n = int(frame.records["length"][i])
                        a = int(starts[i])
                        ok = bytes(frame.payload[a : a + n]) == self._payload(seq, n)
                        (found if ok else bad).add(seq)
        except LogCorruption as exc:
            self.res.problem("lost", f"{where}: the log refuses to open after a crash that only tore its tail: "
                                     f"{exc}")
            return
        if head < acked.trimmed_to:
            self.res.problem("failures", f"{where}: log head {head} is back before the reported trim to "
                                         f"{acked.trimmed_to}")

    def _check_meta(self, where: str, path: Path, slot_bytes: int, acked: _Acked) -> int:
        """The seq the metadata says committed (0 when it does not open: counted lost)."""
        try:
            with MetaRepository.open(path, slot_size=slot_bytes) as meta:
                if meta.generation < acked.meta_generation:
                    self.res.problem("lost", f"{where}: metadata generation {meta.generation}, "
                                             f"{acked.meta_generation} was reported durable")
                doc = meta.read()
        except CdpError as exc:
            self.res.problem("lost", f"{where}: the metadata repository does not open: {exc}")
            return 0
        return int(doc.get("domains", {}).get(str(DOMAIN), {}).get("committed_seq", 0))

    def _check_catalog(self, where: str, store: Path, meta_committed: int) -> int:
        """Load the catalog as a restarting DRVA would; the seq it says committed."""
        try:
            head, generation = asyncio.run(load_catalog(FileStore(store), DOMAIN))
        except CdpError as exc:
            self.res.problem("failures", f"{where}: the catalog does not load: {exc}")
            return 0
        committed = 0 if head is None else CatalogView(FileStore(store), head, generation).committed_seq
        if committed < meta_committed:
            self.res.problem("failures", f"{where}: the catalog is committed to seq {committed}, the metadata "
                                         f"(written after it) to {meta_committed}")
        return committed

    def _check_store(self, where: str, store: Path, acked: _Acked, found: set[int], bad: set[int]) -> set[int]:
        """Check every segment in the store; add the seqs they hold to ``found`` or ``bad``
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
                if not key.endswith(".seg"):
                    continue  # the catalog's objects: _check_catalog reads them
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


def _crash(name: str, tmp: Path, rec: fsrecord.Recorder, layout: Layout, plan: Plan, rng: random.Random,
           checker: _Checker, progress: Callable[[str], None]) -> dict:
    """Build and check the crash states of one recorded workload; what they were."""
    res, ops = checker.res, rec.ops
    log_dir, _, log_name = layout.log.rpartition("/")
    log_ino = rec.initial.dirs[log_dir][log_name][1]
    states = fsrecord.CrashStates(rec.initial, ops)
    points = [k for k, op in enumerate(ops) if isinstance(op, (fsrecord.Sync, fsrecord.SyncDir))]
    points.append(len(ops))
    progress(f"{NAME}: {name}: {len(ops)} operations recorded, {len(points)} crash points")
    acked = _Acked()
    at, first_state, torn_before = 0, res.crash_states, checker.torn_tails
    dest = tmp / "crash"
    for n, k in enumerate(points):
        if n and n % PROGRESS_POINTS == 0:
            progress(f"{NAME}: {name}: {n}/{len(points)} crash points, {res.crash_states} states, lost {res.lost}")
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
            checker.check(f"{name}: crash at operation {k} keeping {len(kept)}/{len(pending)} pending pieces",
                          dest, acked, layout)
            res.crash_states += 1
            if 0 < len(kept & log_pieces) < len(log_pieces) and res.lost == before:
                checker.torn_tails += 1
    fsrecord.fresh(dest)
    return {"operations": len(ops), "crash_points": len(points), "crash_states": res.crash_states - first_state,
            "acked_seqs": acked.seq, "torn_tails": checker.torn_tails - torn_before}


def _scratch() -> str | None:
    """A tmpfs for the crash states when there is one: each state is written out and
    removed again, hundreds of directories a second, and none of it needs a disk."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def run(quick: bool = True, seed: int = 14, progress: Callable[[str], None] = lambda s: None,
        workloads: tuple[str, ...] = ("own", "drva")) -> Result:
    """Both workloads' crash states (``workloads``: fewer, for a test that needs one)."""
    plan = QUICK if quick else LONG
    res = Result(NAME)
    t0 = time.monotonic()
    rng = random.Random(seed)
    checker = _Checker(res)
    with tempfile.TemporaryDirectory(prefix="torture-power-", dir=_scratch()) as tmp:
        if "own" in workloads:
            root = Path(tmp) / "own"
            root.mkdir()
            _prepare(root)
            with fsrecord.Recorder(root) as rec:
                asyncio.run(_workload(root, rec, rng, plan.commits))
            res.notes["own"] = _crash("own", Path(tmp), rec, OWN, plan, rng, checker, progress)
        if "drva" in workloads:
            root = Path(tmp) / "drva"
            root.mkdir()
            power_drva.prepare(root)
            with fsrecord.Recorder(root) as rec:
                asyncio.run(power_drva.workload(root, rec, rng, plan.drva_frames))
            res.notes["drva"] = _crash("drva", Path(tmp), rec, DRVA, plan, rng, checker, progress)
    res.notes["torn_tails"] = checker.torn_tails
    res.elapsed_s = time.monotonic() - t0
    return res
