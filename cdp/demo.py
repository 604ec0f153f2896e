"""``cdp demo``: the data path end to end on the embedded default, in a temporary dir.

What it does, in the order data flows:

1. Three simulated disks (sparse primary images) take a mixed workload of writes of
   512 B .. 256 KiB with text-like, compressible payloads; each write is applied to its
   primary image and captured, in order, into frames of one domain.
2. The frames go into a replication-log partition (a local file) by group commit.
3. The log is closed without ceremony and reopened: the crash-recovery scan finds every
   frame again.
4. A sealer cuts the frames into segments (lz4 blocks + index), puts them into a file
   object store and commits the catalog after them; the log is trimmed behind it.
5. From the store alone — catalog, segment indexes, ranged block reads — the disks are
   replayed into new images at the mark and at the latest point and compared (sha256)
   with the primaries as they were at those points.

The replay here is ``cdp.replay.replay_reference`` (every record in seq order); the
point-in-time planner of ``rocva`` supersedes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdp.catalog import CatalogState, CatalogWriter
from cdp.digest import sha256_file
from cdp.frame import decode_frame, encode_frame_parts
from cdp.layout import segment_key
from cdp.logfmt import DATA_START
from cdp.records import KIND_MARK, KIND_WRITE, KIND_ZERO, SECTOR, empty_records
from cdp.replog import ReplicationLog
from cdp.replay import replay_reference
from cdp.segment import build_segment
from cdp.segment_format import parse_segment_tail
from cdp.store.fs import FileStore

DOMAIN = 1
DISKS = (("erp-db", "disk0"), ("erp-db", "disk1"), ("erp-app", "disk0"))
FRAME_BYTES_MAX = 1 << 20
COMMIT_FRAMES_MAX = 16
SEGMENT_BYTES_MAX = 16 << 20
LOG_RING_BYTES = 256 << 20
MARK_NAME = "demo-mark"


@dataclass
class DemoOptions:
    workdir: Path | None = None
    disk_size: int = 64 << 20
    writes_bytes: int = 256 * 10**6
    show_progress: bool = False
    seed: int = 1


class _Payloads:
    """Text-like payload bytes (lz4 gets about 2:1), sliced from a pool made once."""

    def __init__(self, rng: np.random.Generator, pool_bytes: int = 16 << 20) -> None:
        words = np.array([b"%-8s" % w for w in (b"block", b"write", b"seq", b"disk", b"vm",
                          b"commit", b"sector", b"data", b"zero", b"page")], dtype="S8")
        picks = words[rng.integers(0, len(words), pool_bytes // 16)].view(np.uint8)
        noise = rng.integers(0, 256, pool_bytes // 2, dtype=np.uint8)
        self.pool = np.stack([picks.reshape(-1, 8), noise.reshape(-1, 8)], axis=1).tobytes()
        self.rng = rng

    def take(self, length: int) -> bytes:
        at = int(self.rng.integers(0, len(self.pool) - length)) // 8 * 8
        return self.pool[at : at + length]


def _workload(opts: DemoOptions, primaries: list[int]):
    """Yield (records, payload) frames; apply each write to its primary image first.

    Half-way, yield the MARK frame; the caller checksums the primaries before resuming,
    so the checksums are those of the disks exactly at the mark.
    """
    rng = np.random.default_rng(opts.seed)
    payloads = _Payloads(rng)
    sectors = opts.disk_size // SECTOR
    seq, ts, written = 1, time.time_ns(), 0
    marked = False
    while written < opts.writes_bytes:
        n = int(rng.integers(8, 64))
        records = empty_records(n)
        parts = []
        for i in range(n):
            length = int(rng.choice([1, 8, 8, 16, 64, 128, 512])) * SECTOR
            hot = rng.random() < 0.7  # 70 % of writes land in the first tenth of the disk
            span = max(1, (sectors // 10 if hot else sectors) - length // SECTOR)
            offset = int(rng.integers(0, span)) * SECTOR
            disk = int(rng.integers(0, len(primaries)))
            kind = KIND_ZERO if rng.random() < 0.03 else KIND_WRITE
            data = bytes(length) if kind == KIND_ZERO else payloads.take(length)
            os.pwrite(primaries[disk], data, offset)
            records[i] = (seq, ts, offset, length, disk, kind, b"\0" * 6)
            if kind == KIND_WRITE:
                parts.append(data)
            seq, ts, written = seq + 1, ts + 1000, written + length
        yield records, b"".join(parts)
        if not marked and written >= opts.writes_bytes // 2:
            marked = True
            yield _mark_frame(seq, ts)
            seq, ts = seq + 1, ts + 1000


def _mark_frame(seq: int, ts: int) -> tuple[np.ndarray, bytes]:
    records = empty_records(1)
    name = MARK_NAME.encode()
    records[0] = (seq, ts, 0, len(name), 0, KIND_MARK, b"\0" * 6)
    return records, name


async def run_demo(opts: DemoOptions) -> dict[str, Any]:
    keep = opts.workdir is not None
    root = Path(opts.workdir or tempfile.mkdtemp(prefix="cdp-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return await _run(opts, root)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


async def _run(opts: DemoOptions, root: Path) -> dict[str, Any]:
    primary_paths = [root / f"primary-{vm}-{disk}.img" for vm, disk in DISKS]
    fds = []
    for p in primary_paths:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, opts.disk_size)
        fds.append(fd)
    log_path = root / "replog"
    ReplicationLog.format(log_path, DATA_START + LOG_RING_BYTES, label="demo-drva")
    store = FileStore(root / "store")

    # 1-2. capture and group-commit into the log, with a mark half-way.
    t0 = time.perf_counter()
    ingest_s, captured, mark_seq, mark_sums = 0.0, 0, 0, []
    with ReplicationLog.open(log_path) as log:
        batch: list[list] = []
        last_seq = 0
        for records, payload in _workload(opts, fds):
            batch.append(list(encode_frame_parts(DOMAIN, records, payload)))
            captured += len(payload)
            last_seq = int(records["seq"][-1])
            if records["kind"][0] == KIND_MARK:
                mark_seq = last_seq
                mark_sums = [sha256_file(p) for p in primary_paths]
            if len(batch) >= COMMIT_FRAMES_MAX:
                t = time.perf_counter()
                log.append_batch(batch)
                ingest_s += time.perf_counter() - t
                batch = []
        if batch:
            log.append_batch(batch)
    capture_s = time.perf_counter() - t0
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    latest_sums = [sha256_file(p) for p in primary_paths]

    # 3-4. reopen (recovery scan), seal segments, upload, commit the catalog, trim.
    t0 = time.perf_counter()
    writer = CatalogWriter(store, CatalogState.new(DOMAIN, "erp", time.time_ns()))
    disks = [{"disk": i, "vm": vm, "name": name, "size": opts.disk_size}
             for i, (vm, name) in enumerate(DISKS)]
    await writer.commit({"disks": disks})
    segments = stored = 0
    with ReplicationLog.open(log_path) as log, ThreadPoolExecutor(2) as pool:
        pending, pending_bytes, positions = [], 0, []
        for pos, body in log.entries():
            frame = decode_frame(body, f"{log_path} position {pos}")
            pending.append(frame)
            positions.append(pos)
            pending_bytes += len(body)
            if pending_bytes >= SEGMENT_BYTES_MAX:
                stored += await _seal(store, writer, pending, pool)
                log.trim(log.next_position(positions[-1]))
                segments += 1
                pending, pending_bytes, positions = [], 0, []
        if pending:
            stored += await _seal(store, writer, pending, pool)
            log.trim(log.tail)
            segments += 1
    seal_s = time.perf_counter() - t0

    # 5. replay from the store alone and compare.
    t0 = time.perf_counter()
    mark_ok = await _replay_and_compare(store, root / "recovered-mark", mark_seq, mark_sums)
    latest_ok = await _replay_and_compare(store, root / "recovered-latest", None, latest_sums)
    replay_s = time.perf_counter() - t0
    await store.close()
    mb = captured / 1e6
    return {
        "verified": mark_ok and latest_ok,
        "verified_mark": mark_ok,
        "verified_latest": latest_ok,
        "disks": len(DISKS),
        "disk_bytes": opts.disk_size,
        "writes": last_seq - 1,
        "written_mb": round(mb, 1),
        "capture_s": round(capture_s, 2),
        "log_append_mb_per_s": round(mb / ingest_s, 1) if ingest_s else None,
        "segments": segments,
        "stored_mb": round(stored / 1e6, 1),
        "compression_ratio": round(captured / stored, 2) if stored else None,
        "seal_upload_mb_per_s": round(mb / seal_s, 1),
        "replay_s": round(replay_s, 2),
        "mark_seq": mark_seq,
        "workdir": str(root) if opts.workdir else None,
    }


async def _seal(store, writer: CatalogWriter, frames: list, pool: ThreadPoolExecutor) -> int:
    data = build_segment(DOMAIN, frames, executor=pool)
    first, last = frames[0].first_seq, frames[-1].last_seq
    key = segment_key(DOMAIN, first, last)
    # Check what was built before it leaves (as the DRVA's sealer does); no read-back GET.
    index = parse_segment_tail(key, data, len(data))
    await store.put(key, data)
    delta: dict[str, Any] = {"add_segments": [{
        "key": key, "first_seq": first, "last_seq": last,
        "first_ts": int(frames[0].records["timestamp_ns"][0]),
        "last_ts": int(frames[-1].records["timestamp_ns"][-1]),
        "size": len(data), "payload_raw_len": index.payload_raw_len}]}
    marks = [{"name": name, "seq": seq, "ts": int(f.records["timestamp_ns"][0])}
             for f in frames for seq, name in f.mark_names()]
    if marks:
        delta["add_marks"] = marks
    await writer.commit(delta)
    return len(data)


async def _replay_and_compare(store, out: Path, upto: int | None, expected: list[str]) -> bool:
    """Reference replay of every record <= ``upto`` onto zero images; compare sha256."""
    paths, _ = await replay_reference(store, DOMAIN, out, upto)
    return [sha256_file(p) for p in paths] == expected


def format_summary(r: dict[str, Any]) -> str:
    rows = [
        ("disks", f"{r['disks']} x {r['disk_bytes'] >> 20} MiB"),
        ("writes captured", f"{r['writes']:,} ({r['written_mb']:,} MB)"),
        ("log append (durable)", f"{r['log_append_mb_per_s']:,} MB/s"),
        ("segments", f"{r['segments']} ({r['stored_mb']} MB stored, {r['compression_ratio']}:1)"),
        ("seal + upload", f"{r['seal_upload_mb_per_s']:,} MB/s"),
        ("replay (mark + latest)", f"{r['replay_s']} s"),
        (f"recovered at mark (seq {r['mark_seq']})", "sha256 OK" if r["verified_mark"] else "MISMATCH"),
        ("recovered at latest", "sha256 OK" if r["verified_latest"] else "MISMATCH"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("verified" if r["verified"] else "NOT VERIFIED")
    return "\n".join(lines)
