"""Durable append throughput of the replication log against a raw write loop.

Both sides write the same bytes (1 MiB frames, half-compressible) to the same kind of
file — a preallocated file on the same file system — circularly, with a durability point
every 16 MiB: the log with ``append_batch`` of 16 frames (one group commit: ``pwritev``
+ one ``fdatasync``) and a trim every 64 MiB, as a DRVA does; the raw loop with
``os.write`` and ``fdatasync`` every 16 MiB. Fields: ``mb_per_s`` (the log) and
``ratio_vs_raw`` (log / raw), medians over alternating rounds.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from benchmarks._common import emit, parse_args, progress, work_dir
from cdp.durable import preallocate
from cdp.frame import encode_frame_parts
from cdp.logfmt import DATA_START
from cdp.replog import ReplicationLog
from cdp.testing.records import write_batch

FRAME_RECORDS = 16  # 16 × 64 KiB = 1 MiB frames
BATCH_FRAMES = 16  # 16 MiB per group commit
TRIM_EVERY_BATCHES = 4


def make_frames(count: int) -> list[list]:
    frames = []
    for i in range(count):
        records, payload = write_batch(1 + i * FRAME_RECORDS, FRAME_RECORDS, 65536)
        frames.append(list(encode_frame_parts(1, records, payload)))
    return frames


def run_log(path: Path, frames: list[list], total_batches: int, bar) -> float:
    """Seconds to append ``total_batches`` group commits (log already formatted)."""
    with ReplicationLog.open(path) as log:
        t0 = time.perf_counter()
        for b in range(total_batches):
            i = b * BATCH_FRAMES % len(frames)
            positions = log.append_batch(frames[i : i + BATCH_FRAMES])
            if b % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:
                log.trim(positions[0])
            bar.update(1)
        return time.perf_counter() - t0


def run_raw(path: Path, chunks: list[bytes], size: int, total_batches: int, bar) -> float:
    """Seconds for the raw loop: os.write the same bytes, fdatasync every 16 MiB."""
    fd = os.open(path, os.O_WRONLY)
    try:
        at = 0
        t0 = time.perf_counter()
        for b in range(total_batches):
            batch = chunks[b * BATCH_FRAMES % len(chunks) :][:BATCH_FRAMES]
            n = sum(len(c) for c in batch)
            if at + n > size:
                os.lseek(fd, 0, os.SEEK_SET)
                at = 0
            for c in batch:
                os.write(fd, c)
            at += n
            os.fdatasync(fd)
            bar.update(1)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    ring = 256 << 20
    total_batches, rounds = (16, 3) if args.quick else (64, 5)  # 256 MiB / 1 GiB per round
    frames = make_frames(64)
    chunks = [b"".join(bytes(p) for p in f) for f in frames]
    nbytes = sum(len(chunks[b * BATCH_FRAMES % 64 + k]) for b in range(total_batches)
                 for k in range(BATCH_FRAMES))
    log_rates, raw_rates = [], []
    with work_dir(args) as d:
        log_path, raw_path = Path(d) / "replog", Path(d) / "raw"
        ReplicationLog.format(log_path, DATA_START + ring)
        preallocate(raw_path, DATA_START + ring)
        bar = progress(2 * rounds * total_batches, "log vs raw", unit="commit")
        for _ in range(rounds):
            raw_rates.append(nbytes / run_raw(raw_path, chunks, ring, total_batches, bar))
            log_rates.append(nbytes / run_log(log_path, frames, total_batches, bar))
        bar.close()
    log_mbps = statistics.median(log_rates) / 1e6
    raw_mbps = statistics.median(raw_rates) / 1e6
    ratio = statistics.median(l / r for l, r in zip(log_rates, raw_rates))
    result = {
        "benchmark": "log_append",
        "mb_per_s": round(log_mbps, 1),
        "raw_mb_per_s": round(raw_mbps, 1),
        "ratio_vs_raw": round(ratio, 3),
        "frame_bytes": len(chunks[0]),
        "commit_bytes": len(chunks[0]) * BATCH_FRAMES,
        "quick": args.quick,
    }
    emit(args, result, [
        ("log append_batch (durable)", f"{log_mbps:,.0f} MB/s"),
        ("raw write + fdatasync/16 MiB", f"{raw_mbps:,.0f} MB/s"),
        ("ratio log / raw", f"{ratio:.2f}"),
    ])


if __name__ == "__main__":
    main()
