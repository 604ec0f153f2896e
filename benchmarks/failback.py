"""Failback: move only what changed, against a full rehydration and a checksum scan.

Setup (not timed): a domain ``erp`` of 3 disks of 1 GiB each (``--quick``: 128 MiB), its
bases realistic data (``PayloadSource("mixed")``) and a quarter of each disk again of
random 64 KiB writes sealed in 16 MiB segments (``benchmarks.failover.build``), in a
file store as site A's DRVA would have left it. At the fork point ``F`` (an unplanned
failover to site B), site A goes on writing: 64 KiB writes at 5 % of each disk's 64 KiB
blocks, distinct and spread at random, of which

- 60 % (3 % of the disk) reached the store: sealed segments of A's old timeline after F;
- 30 % (1.5 %) were acknowledged into A's replication log and never shipped: frames
  (``cdp.frame``) in a ``cdp.replog`` log file, read by the failback read-only;
- 10 % (0.5 %) reached A's disks and were never acknowledged: only A's dirty-region maps
  (``cdp.dirtymap``, ``<image>.dirty``, left unclosed as after a crash) flag them.

Site B forks timeline 2 at F, writes 64 KiB at another 5 % of each disk's blocks (drawn
on their own, so the two sets overlap only by chance) and commits the final mark
``failback`` (the target point). A's disks (images, maps) and log as they are then are
kept as pristine files; B's disks at the target are materialised as files, as B's
datastore would hold them. Each method below starts from a fresh (untimed) copy of A's
pristine disks; before each, dirty pages are written back and every file of the store,
of the copy, of B's disks and of A's log is dropped from the page cache (cold).

Fields (the last line of ``--json``):

- ``failback_s``: ``rocva.failback`` as the product runs it (ranges from both timelines'
  indexes, A's log and A's maps; read the target's content there from B's handed-back
  disks, served as extent streams by ``benchmarks._peer_site`` — B's extents route in its
  own process, on the same 2 cores — FORMAT.md §16; write it in place; fsync; fork a
  timeline for site A); ``failback_phases_s`` when each step ended. ``bytes_moved`` is its
  count of bytes in those ranges.
- ``failback_from_store_s``: the same failback reading the store instead (what it does
  when B cannot serve), ``failback_from_store_read_bytes`` what it read (``..._split``:
  base chunks, segments, the rest; ``full_copy_store_read_bytes`` the same for the full
  copy), ``speedup_vs_full_copy_from_store``.
  After each failback every disk must have been brought back as a delta (not rewritten
  whole), from the source asked for, and its sha256 must equal the target point's (the
  builder's model); the benchmark fails otherwise.
- ``changed_bytes``: from the images, in 4 KiB pages: where A's disks differ from the
  disks at F, united with where the target differs from them. ``moved_vs_changed`` =
  ``bytes_moved`` / ``changed_bytes``.
- ``full_copy_s``: ``rocva.recover`` of the target point into fresh files (A's disks
  rehydrated in full), fsync included. ``speedup_vs_full_copy`` = it / ``failback_s``.
- ``checksum_scan_s``: how a checksum-based delta sync works: read A's disks and B's in
  16 MiB chunks (two threads, one per side, the next chunk read while this one is
  compared), xxh3-64 of every 64 KiB block on both sides, ``pwrite`` B's block into A's
  disk where they differ, fsync. ``speedup_vs_checksum_scan`` = it / ``failback_s``;
  ``checksum_scan_moved_bytes`` what it wrote. Its result is checked like failback's.
- ``dirty_map_4k_ratio``: 4 KiB ingest with dirty-region maps over without, measured in
  this run by ``benchmarks.ingest`` (its whole run, at its ``--quick`` length with
  ``--quick``); ``writes_per_s_4k`` and ``writes_per_s_4k_dirty_map`` with it.

Each timed method runs 3 times (``--quick``: once), in turns, each from cold (B's disks
too); the ``..._s`` fields are the medians and ``rounds`` lists every time. Each failback
runs on a hard-linked copy of the store, as it forks the domain.

Targets (issue 12): ``moved_vs_changed`` <= 1.1, ``speedup_vs_checksum_scan`` >= 5,
``speedup_vs_full_copy`` >= 5, ``dirty_map_4k_ratio`` >= 0.9.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from benchmarks._common import emit, parse_args, progress, work_dir
from benchmarks._peer_site import TOKEN_ENV as PEER_TOKEN_ENV
from benchmarks.failover import DISKS, PER_SEGMENT, WRITE, linked_copy
from benchmarks.failover import build as build_domain
from benchmarks.ingest import bench as ingest_bench
from benchmarks.recovery import clear, evict
from cdp.digest import sha256_file
from cdp.dirtymap import DirtyMap, sidecar_path
from cdp.frame import encode_frame
from cdp.records import KIND_WRITE, empty_records
from cdp.replog import ReplicationLog
from cdp.store.base import ObjectStore
from cdp.store.fs import FileStore
from cdp.testing.domain import SITE as SITE_A
from cdp.testing.domain import DomainBuilder
from rocva import RecoverOptions, Target, recover
from rocva.failback import LocalDisk, failback
from rocva.peer_extents import Peer
from iofilter_sim.payloads import PayloadSource

MiB = 1 << 20
PAGE = 4096  # the granularity of changed_bytes
CHANGED_SHARE = 0.05  # of each disk's 64 KiB blocks, written by A after F, and again by B
SHIPPED_SHARE, LOGGED_SHARE = 0.6, 0.3  # of A's writes; the rest only its dirty maps know
FRAME_WRITES = 16  # 1 MiB frames in A's log
SCAN_CHUNK = 16 * MiB
SCAN_BLOCK = 64 << 10
MARK = "failback"
ROUNDS, ROUNDS_QUICK = 3, 1  # each method's runs; the ratios are of their medians
SITE_B = "site-b"


class CountingStore:
    """The store, counting the bytes its GETs return by kind of object (base chunks,
    segments, the rest); everything else passes through."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.bytes = {"chunks": 0, "segments": 0, "other": 0}

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        data = await self.inner.get(key, offset, length, max_bytes=max_bytes)
        kind = "chunks" if key.endswith(".chk") else "segments" if key.endswith(".seg") else "other"
        self.bytes[kind] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def names() -> list[str]:
    return [f"{vm}-{disk}.img" for vm, disk in DISKS]


def interleave(picks: list[np.ndarray], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(disk, block) of every pick, all disks mixed in a random order."""
    disk = np.concatenate([np.full(len(p), k) for k, p in enumerate(picks)])
    block = np.concatenate(picks)
    order = rng.permutation(len(disk))
    return disk[order].tolist(), block[order].tolist()


async def write_sealed(b: DomainBuilder, src: PayloadSource, rng: np.random.Generator, picks: list[np.ndarray],
                       bar) -> int:
    """64 KiB at each picked block, on the builder's current timeline, sealed every 16 MiB."""
    disk, block = interleave(picks, rng)
    for first in range(0, len(disk), PER_SEGMENT):
        count = min(PER_SEGMENT, len(disk) - first)
        payload = src.batch(np.full(count, WRITE))
        for i in range(count):
            b.write(disk[first + i], block[first + i] * WRITE, payload[i * WRITE : (i + 1) * WRITE])
        await b.seal()
        bar.update(count * WRITE)
    return len(disk) * WRITE


def write_log(path: Path, b: DomainBuilder, src: PayloadSource, rng: np.random.Generator,
              picks: list[np.ndarray], bar) -> int:
    """A's acked, never shipped writes: frames after the old timeline's last seq in a
    replication log at ``path``, applied to the builder's model (not to the store)."""
    disk, block = interleave(picks, rng)
    ReplicationLog.format(path, 2 * len(disk) * WRITE + 16 * MiB)
    seq = b.seq
    with ReplicationLog.open(path) as log:
        for first in range(0, len(disk), FRAME_WRITES):
            count = min(FRAME_WRITES, len(disk) - first)
            recs = empty_records(count)
            recs["seq"] = np.arange(seq + 1, seq + 1 + count)
            recs["timestamp_ns"] = [b.ts(s) for s in range(seq + 1, seq + 1 + count)]
            recs["kind"] = KIND_WRITE
            recs["disk"] = disk[first : first + count]
            recs["offset"] = np.array(block[first : first + count]) * WRITE
            recs["length"] = WRITE
            payload = src.batch(np.full(count, WRITE))
            log.append_batch([[encode_frame(b.domain, recs, payload)]])
            for i in range(count):
                off = block[first + i] * WRITE
                b.model[disk[first + i]][off : off + WRITE] = payload[i * WRITE : (i + 1) * WRITE]
            seq += count
            bar.update(count * WRITE)
    return len(disk) * WRITE


def write_unacked(b: DomainBuilder, src: PayloadSource, picks: list[np.ndarray]) -> int:
    """A's writes no DRVA acknowledged: in the model only; ``write_maps`` flags them."""
    for k, p in enumerate(picks):
        payload = src.batch(np.full(len(p), WRITE))
        for i, blk in enumerate(p.tolist()):
            b.model[k][blk * WRITE : (blk + 1) * WRITE] = payload[i * WRITE : (i + 1) * WRITE]
    return sum(len(p) for p in picks) * WRITE


def write_maps(paths: list[Path], sizes: list[int], domain: int, picks: list[np.ndarray]) -> None:
    """A's dirty-region maps as a crash left them: the unacked writes' regions flagged."""
    for path, size, p in zip(paths, sizes, picks):
        m = DirtyMap.open(path, size, domain)
        m.set_before_write(np.unique(p.astype(np.int64) * WRITE // m.region_bytes))
        m.close(clean=False)


def write_images(paths: list[Path], model: list[bytearray]) -> None:
    for path, content in zip(paths, model):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def changed_pages(path: Path, ref: bytearray, bar) -> np.ndarray:
    """Per 4 KiB page, whether the file at ``path`` differs from ``ref``."""
    want = np.frombuffer(ref, np.uint64).reshape(-1, PAGE // 8)
    out = np.zeros(len(want), bool)
    buf = np.empty(SCAN_CHUNK // 8, np.uint64)
    pos = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            pages = n // PAGE
            out[pos : pos + pages] = (buf[: n // 8].reshape(-1, PAGE // 8) != want[pos : pos + pages]).any(axis=1)
            pos += pages
            bar.update(n)
    assert pos == len(want), (path, pos, len(want))
    return out


async def setup(root: Path, size: int) -> dict[str, Any]:
    """The store, A's pristine disks/maps/log, B's disks at the target (module docstring)."""
    bar = progress(size * len(DISKS) * 5 // 4, "build the domain")
    b = await build_domain(root, size, bar)
    bar.close()
    fork = b.seq
    at_fork = [bytearray(m) for m in b.model]
    rng, src = np.random.default_rng(12), PayloadSource("mixed", seed=12)
    blocks = size // WRITE
    n = int(blocks * CHANGED_SHARE)
    cut1, cut2 = round(n * SHIPPED_SHARE), round(n * (SHIPPED_SHARE + LOGGED_SHARE))
    a_picks = [rng.choice(blocks, n, replace=False) for _ in DISKS]
    (root / "a").mkdir()
    bar = progress((cut2 + n) * WRITE * len(DISKS), "A's and B's writes after the fork")
    shipped = await write_sealed(b, src, rng, [p[:cut1] for p in a_picks], bar)
    logged = write_log(root / "a" / "replog", b, src, rng, [p[cut1:cut2] for p in a_picks], bar)
    unacked = write_unacked(b, src, [p[cut2:] for p in a_picks])
    a_paths = [root / "a" / name for name in names()]
    sizes = [size] * len(DISKS)
    write_images(a_paths, b.model)
    write_maps(a_paths, sizes, b.domain, [p[cut2:] for p in a_picks])
    b.model = []  # A's content is in its images now: room for the fork's copy
    await b.fork(fork, at_fork, SITE_B)
    b_picks = [rng.choice(blocks, n, replace=False) for _ in DISKS]
    b_written = await write_sealed(b, src, rng, b_picks, bar)
    target_seq = b.mark(MARK)
    await b.seal()
    bar.close()
    b_paths = [root / "b" / name for name in names()]
    write_images(b_paths, b.model)
    target_sha = [hashlib.sha256(m).hexdigest() for m in b.model]
    b.model = []
    bar = progress(2 * size * len(DISKS), "changed pages (A and B against F)")
    changed = 0
    for a_path, b_path, ref in zip(a_paths, b_paths, at_fork):
        changed += int((changed_pages(a_path, ref, bar) | changed_pages(b_path, ref, bar)).sum()) * PAGE
    bar.close()
    return {"domain": b.domain, "fork_seq": fork, "target_seq": target_seq, "target_sha": target_sha,
            "a_paths": a_paths, "b_paths": b_paths, "log": root / "a" / "replog", "changed_bytes": changed,
            "a_shipped_bytes": shipped, "a_logged_bytes": logged, "a_unacked_bytes": unacked,
            "b_written_bytes": b_written}


def fresh_copy(paths: list[Path], into: Path, maps: bool) -> list[Path]:
    """A copy of A's pristine disks (and their dirty-region maps) in ``into``, cleared first."""
    clear(into)
    into.mkdir(parents=True)
    out = []
    for path in paths:
        out.append(into / path.name)
        shutil.copyfile(path, out[-1])
        if maps:
            shutil.copyfile(sidecar_path(path), sidecar_path(out[-1]))
    return out


def check(paths: list[Path], want: list[str], what: str) -> None:
    got = [sha256_file(p) for p in paths]
    if got != want:
        bad = [str(p) for p, g, w in zip(paths, got, want) if g != w]
        raise RuntimeError(f"{what}: these disks do not hold the target point: {', '.join(bad)}")


def _read_hash(fd: int, buf: bytearray, offset: int) -> tuple[int, np.ndarray]:
    """Read up to ``len(buf)`` bytes at ``offset``; the xxh3-64 of each 64 KiB block."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    digests = np.fromiter((xxhash.xxh3_64_intdigest(view[i : i + SCAN_BLOCK]) for i in range(0, got, SCAN_BLOCK)),
                          np.uint64, count=-(-got // SCAN_BLOCK))
    return got, digests


def _scan_disk(pool: ThreadPoolExecutor, a_path: Path, b_path: Path, bar) -> int:
    fa = os.open(a_path, os.O_RDWR)
    fb = os.open(b_path, os.O_RDONLY)
    try:
        for fd in (fa, fb):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        size = os.fstat(fa).st_size
        bufs = [(bytearray(SCAN_CHUNK), bytearray(SCAN_CHUNK)) for _ in range(2)]
        offsets = list(range(0, size, SCAN_CHUNK))

        def submit(i: int) -> tuple[Future, Future]:
            ba, bb = bufs[i % 2]
            return pool.submit(_read_hash, fa, ba, offsets[i]), pool.submit(_read_hash, fb, bb, offsets[i])

        moved = 0
        pending = submit(0) if offsets else None
        for i, offset in enumerate(offsets):
            (n, da), (_, db) = pending[0].result(), pending[1].result()
            if i + 1 < len(offsets):
                pending = submit(i + 1)  # into the other pair of buffers, while this one is written
            diff = np.flatnonzero(da != db)
            if len(diff):
                src = memoryview(bufs[i % 2][1])
                heads = np.flatnonzero(np.diff(diff, prepend=-2) != 1)
                for lo, hi in zip(diff[heads].tolist(), (np.append(diff[heads[1:] - 1], diff[-1]) + 1).tolist()):
                    a, z = lo * SCAN_BLOCK, min(hi * SCAN_BLOCK, n)
                    os.pwrite(fa, src[a:z], offset + a)
                    moved += z - a
            bar.update(n)
        os.fsync(fa)
        return moved
    finally:
        os.close(fa)
        os.close(fb)


def checksum_scan(a_paths: list[Path], b_paths: list[Path], bar) -> int:
    """The checksum-based delta sync (module docstring); bytes written into A's disks."""
    with ThreadPoolExecutor(2, thread_name_prefix="scan") as pool:
        return sum(_scan_disk(pool, a, b, bar) for a, b in zip(a_paths, b_paths))


@contextlib.contextmanager
def peer_site(s: dict[str, Any], size: int) -> Iterator[Peer]:
    """Site B's extents route over B's disks at the target (``benchmarks._peer_site``), in
    its own process, as B's MSA would serve them."""
    token = secrets.token_hex(16)
    doc = {"domain": s["domain"], "seq": s["target_seq"],
           "files": {str(k): [str(p), size] for k, p in enumerate(s["b_paths"])}}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks._peer_site", json.dumps(doc)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={**os.environ, PEER_TOKEN_ENV: token})
    try:
        line = proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"site B's extents server did not start (it said {line!r})")
        yield Peer(f"http://127.0.0.1:{int(line.split()[1])}/extents", token, SITE_B)
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_methods(root: Path, s: dict[str, Any], size: int, rounds: int, peer: Peer) -> dict[str, Any]:
    """Each method ``rounds`` times, in turns (full copy, scan, failback), each from cold
    and on fresh copies of A's disks; their times, and the last round's reports. The
    medians make the ratios: one run of a few seconds on this machine moves by ±40 %
    with what the shared disk does meanwhile (measured 1.6 .. 4.0 s for one failback)."""
    store_dir, run, out = root / "store", root / "run", root / "full"
    cold = (store_dir, root / "b", s["log"])
    target = Target.mark(MARK)
    total = size * len(DISKS)
    times: dict[str, list[float]] = {"full_copy_s": [], "checksum_scan_s": [], "failback_s": [],
                                     "failback_from_store_s": []}
    reports: dict[str, Any] = {}
    for r in range(rounds):
        # A full rehydration of the target point. It needs no copy of A's disks, but one
        # is made and dropped first all the same: every method then starts right after
        # ~3 GiB of page cache was freed. On this machine's VM, memory that has been free
        # for a while was handed back to the host and costs kernel time to take again; a
        # full copy measured 5.5-5.9 s right after the setup had freed memory, and 9.9 to
        # 19 s in later rounds when only its own little cache was dropped before it.
        fresh_copy(s["a_paths"], run, maps=False)
        clear(out)
        evict(*cold, run)
        bar = progress(total, f"full copy (rocva.recover), round {r + 1}/{rounds}")
        t0 = time.perf_counter()
        full = await recover(FileStore(store_dir), s["domain"], RecoverOptions(target, out),
                                       progress=lambda done, all_: (setattr(bar, "n", done), bar.refresh()))
        times["full_copy_s"].append(time.perf_counter() - t0)
        bar.close()
        check([Path(i["path"]) for i in full["images"]], s["target_sha"], "full copy")
        clear(out)
        clear(run)

        # The checksum scan, on a fresh copy of A's disks.
        paths = fresh_copy(s["a_paths"], run, maps=False)
        evict(*cold, run)
        bar = progress(total, f"checksum scan, round {r + 1}/{rounds}")
        t0 = time.perf_counter()
        scan_moved = await asyncio.to_thread(checksum_scan, paths, s["b_paths"], bar)
        times["checksum_scan_s"].append(time.perf_counter() - t0)
        bar.close()
        check(paths, s["target_sha"], "checksum scan")

        # The failback, on a fresh copy of A's disks and maps, against a linked copy of
        # the store (a failback forks the domain: each round needs the store unforked):
        # as the product runs it, reading B's handed-back disks through B's extents route
        # (``failback_s``), then reading the store instead (``failback_from_store_s``).
        for key, via in (("failback_s", peer), ("failback_from_store_s", None)):
            paths = fresh_copy(s["a_paths"], run, maps=True)
            fork_dir = root / "store-round"
            clear(fork_dir)
            linked_copy(store_dir, fork_dir)
            evict(*cold, run, fork_dir)
            store = CountingStore(FileStore(fork_dir))
            bar = progress(total, f"{key[:-2].replace('_', ' ')}, round {r + 1}/{rounds}")
            t0 = time.perf_counter()
            fb = await failback(store, s["domain"], target, site=SITE_A,
                                disks=[LocalDisk(k, p, size) for k, p in enumerate(paths)], logs=[s["log"]],
                                progress=lambda done, all_: (setattr(bar, "total", all_), setattr(bar, "n", done),
                                                             bar.refresh()), peer=via)
            times[key].append(time.perf_counter() - t0)
            bar.close()
            whole = [d for d in fb["disks"] if d["mode"] != "delta"]
            if whole:
                raise RuntimeError(f"failback rewrote disks whole: {whole}")
            if fb["source"] != ("peer" if via else "store"):
                raise RuntimeError(f"failback read the {fb['source']}, not as asked: {fb['peer_error']}")
            check(paths, s["target_sha"], key)
            reports[key] = (fb, store.bytes)
            clear(run)
            clear(fork_dir)
    fb, _ = reports["failback_s"]
    _, from_store_bytes = reports["failback_from_store_s"]
    return {**{key: float(np.median(v)) for key, v in times.items()}, "rounds": times, "failback": fb,
            "failback_from_store_read_bytes": sum(from_store_bytes.values()),
            "failback_from_store_read_split": from_store_bytes, "full_copy_store_read_bytes": full["bytes_fetched"],
            "checksum_scan_moved_bytes": scan_moved}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    size = (128 if args.quick else 1024) * MiB
    t_start = time.perf_counter()
    with work_dir(args) as d:
        root = Path(d)
        s = asyncio.run(setup(root / "failback", size))
        with peer_site(s, size) as peer:
            m = asyncio.run(run_methods(root / "failback", s, size, ROUNDS_QUICK if args.quick else ROUNDS, peer))
        shutil.rmtree(root / "failback")  # the ingest run needs the room
        (root / "ingest").mkdir()
        ingest = asyncio.run(ingest_bench(root / "ingest", "quick" if args.quick else "full"))
    fb = m["failback"]
    ranges = {key: sum(disk["ranges"][key] for disk in fb["disks"]) for key in ("theirs", "ours", "log")}
    result = {
        "benchmark": "failback", "quick": args.quick, "disk_bytes": size, "disks": len(DISKS),
        "cold": "posix_fadvise DONTNEED on the store, A's disks and log, B's disks before each method, "
                "each right after a fresh copy of A's disks",
        "a_shipped_bytes": s["a_shipped_bytes"], "a_logged_bytes": s["a_logged_bytes"],
        "a_unacked_bytes": s["a_unacked_bytes"], "b_written_bytes": s["b_written_bytes"],
        "changed_bytes": s["changed_bytes"], "bytes_moved": fb["bytes_moved"],
        "bytes_written": fb["bytes_written"],
        "moved_vs_changed": round(fb["bytes_moved"] / s["changed_bytes"], 3),
        "ranges_bytes": ranges,
        "failback_s": round(m["failback_s"], 3), "full_copy_s": round(m["full_copy_s"], 3),
        "checksum_scan_s": round(m["checksum_scan_s"], 3),
        "rounds": {key: [round(t, 3) for t in v] for key, v in m["rounds"].items()},
        "speedup_vs_checksum_scan": round(m["checksum_scan_s"] / m["failback_s"], 3),
        "speedup_vs_full_copy": round(m["full_copy_s"] / m["failback_s"], 3),
        "failback_source": fb["source"], "failback_phases_s": fb["phases_s"],
        "failback_from_store_s": round(m["failback_from_store_s"], 3),
        "speedup_vs_full_copy_from_store": round(m["full_copy_s"] / m["failback_from_store_s"], 3),
        "failback_from_store_read_bytes": m["failback_from_store_read_bytes"],
        "failback_from_store_read_split": m["failback_from_store_read_split"],
        "full_copy_store_read_bytes": m["full_copy_store_read_bytes"],
        "checksum_scan_moved_bytes": m["checksum_scan_moved_bytes"],
        "dirty_map_4k_ratio": ingest["dirty_map_4k_ratio"],
        "dirty_map_4k_block_ratios": ingest["dirty_map_4k_block_ratios"], "writes_per_s_4k": ingest["writes_per_s_4k"],
        "writes_per_s_4k_dirty_map": ingest["writes_per_s_4k_dirty_map"],
        "verified": True, "seconds": round(time.perf_counter() - t_start, 1),
    }
    emit(args, result, [
        ("changed (A and B since the fork)", f"{result['changed_bytes'] / MiB:,.1f} MiB"),
        ("failback moved", f"{result['bytes_moved'] / MiB:,.1f} MiB (x{result['moved_vs_changed']} the changed)"),
        ("failback (B's handed-back disks)", f"{result['failback_s']:.2f} s"),
        ("failback from the store", f"{result['failback_from_store_s']:.2f} s (read "
                                    f"{result['failback_from_store_read_bytes'] / MiB:,.1f} MiB; full copy "
                                    f"x{result['speedup_vs_full_copy_from_store']})"),
        ("full copy (rocva.recover)", f"{result['full_copy_s']:.2f} s (failback x{result['speedup_vs_full_copy']})"),
        ("checksum scan (xxh3, 64 KiB)", f"{result['checksum_scan_s']:.2f} s "
                                         f"(failback x{result['speedup_vs_checksum_scan']})"),
        ("4 KiB ingest with / without dirty maps", f"{result['dirty_map_4k_ratio']}"),
    ])


if __name__ == "__main__":
    main()
