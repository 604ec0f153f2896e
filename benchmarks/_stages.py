"""The bare cost of each stage a DRVA performs, on the bytes the DRVA-only sender sends.

``bare_stages`` runs each stage alone, as directly as the libraries allow, over the frames
of ``benchmarks._sender.frame_pool`` (64 KiB writes, 1 MiB frames), and returns CPU
seconds per GB of payload for each (``bare_cpu_s_per_gb``; user + system time of the
thread or process doing it):

- ``socket_receive``: ``recv_into`` one preallocated buffer from a loopback TCP socket
  (the sending thread's time is not counted);
- ``frame_validation``: ``decode_frame`` (header, xxh3 of the body, record checks);
- ``log_write``: ``ReplicationLog.append_batch`` in 16 MiB group commits, each one
  ``pwritev`` + ``fdatasync`` (also its wall MB/s);
- ``lz4``: ``lz4.block.compress`` and the two xxh3 sums of every 64 KiB block (also the
  compression ratio, which sets the ceiling);
- ``segment_write``: the file store's ``put`` (temp file, fsync, rename, directory fsync)
  of segment-sized objects of the compressed bytes, per GB of payload they hold;
- ``catalog_commit``: one ``CatalogWriter`` generation naming one segment, per GB at one
  segment per ``seal_bytes``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import lz4.block
import numpy as np
import xxhash

from benchmarks._sender import POOL_BYTES, frame_pool, stamp
from cdp.catalog import CatalogWriter
from cdp.catalog_page import ROW_FIELDS
from cdp.catalog_state import CatalogState
from cdp.frame import decode_frame, encode_frame_parts
from cdp.layout import segment_key
from cdp.logfmt import DATA_START
from cdp.replog import ReplicationLog
from cdp.segment_format import BLOCK_RAW_SIZE_DEFAULT
from cdp.store.fs import FileStore

STAGES = ("socket_receive", "frame_validation", "log_write", "lz4", "segment_write", "catalog_commit")
GB = 1e9
LOG_RING_BYTES = 256 << 20
COMMIT_FRAMES = 16  # 16 x 1 MiB: the group commit of benchmarks.log_append
RECV_BUFFER_BYTES = 1 << 20


def _frames(total_bytes: int) -> list[tuple[bytes, memoryview, memoryview]]:
    """Encoded frames (header, table, payload) with consecutive seqs, cycling the pool."""
    pool = frame_pool(64 << 10, min(total_bytes, POOL_BYTES))
    out, seq, ts, n = [], 1, time.time_ns(), 0
    while n < total_bytes:
        records, payload = pool[len(out) % len(pool)]
        out.append(encode_frame_parts(1, stamp(records, seq, ts), payload))
        seq += len(records)
        n += len(payload)
    return out


def _receive(chunks: list[bytes], total: int) -> float:
    """CPU seconds of the receiving thread for ``total`` bytes over loopback TCP."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def send() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            sent = 0
            while sent < total:
                for c in chunks:
                    s.sendall(c)
                    sent += len(c)
                    if sent >= total:
                        break

    t = threading.Thread(target=send)
    t.start()
    conn, _ = listener.accept()
    buf = memoryview(bytearray(RECV_BUFFER_BYTES))
    got = 0
    cpu0 = time.thread_time()
    while got < total:
        n = conn.recv_into(buf)
        if not n:
            break
        got += n
    cpu = time.thread_time() - cpu0
    t.join()
    conn.close()
    listener.close()
    return cpu


def _log_write(path: Path, frames: list, rounds: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of appending ``frames`` ``rounds`` times in group commits."""
    ReplicationLog.format(path, DATA_START + LOG_RING_BYTES)
    with ReplicationLog.open(path) as log:
        cpu0, t0 = time.process_time(), time.perf_counter()
        batches = 0
        for _ in range(rounds):
            for i in range(0, len(frames), COMMIT_FRAMES):
                positions = log.append_batch([list(f) for f in frames[i : i + COMMIT_FRAMES]])
                batches += 1
                if batches % 4 == 0:  # trim as a DRVA does, so the ring never fills
                    log.trim(positions[0])
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    path.unlink()
    return cpu, wall


def _lz4(payloads: list[memoryview]) -> tuple[float, int, list[bytes]]:
    """(CPU seconds, stored bytes, stored blocks) of packing every 64 KiB block."""
    stored, blocks = 0, []
    cpu0 = time.process_time()
    for p in payloads:
        for a in range(0, len(p), BLOCK_RAW_SIZE_DEFAULT):
            raw = p[a : a + BLOCK_RAW_SIZE_DEFAULT]
            xxhash.xxh3_64_intdigest(raw)
            packed = lz4.block.compress(raw, store_size=False)
            xxhash.xxh3_64_intdigest(packed)
            stored += min(len(packed), len(raw))
            blocks.append(packed)
    return time.process_time() - cpu0, stored, blocks


async def _segment_writes(root: Path, blocks: list[bytes], segment_raw_bytes: int, count: int) -> float:
    """CPU seconds of ``count`` file-store puts of one segment's compressed bytes."""
    per_segment = segment_raw_bytes // BLOCK_RAW_SIZE_DEFAULT
    data = b"".join(blocks[:per_segment])
    store = FileStore(root)
    cpu0 = time.process_time()
    for i in range(count):
        await store.put(segment_key(1, 1, 1 + i * 1000, 1000 + i * 1000), data)
    cpu = time.process_time() - cpu0
    await store.close()
    return cpu


async def _catalog_commits(root: Path, count: int, segment_raw_bytes: int) -> float:
    """CPU seconds of ``count`` catalog generations, each naming one segment."""
    store = FileStore(root)
    writer = CatalogWriter(store, CatalogState.new(1, "bench", time.time_ns(), "bench"), by="bench", owner="bench")
    await writer.commit({"disks": [{"disk": 0, "vm": "vm", "name": "disk0", "size": 1 << 30}]})
    tl = writer.state.timeline().id
    cpu0 = time.process_time()
    for i in range(count):
        first = 1 + i * 256
        row = {"timeline": tl, "first_seq": first, "last_seq": first + 255, "object_last_seq": first + 255,
               "first_ts": 10**18 + i, "last_ts": 10**18 + i, "size": segment_raw_bytes // 2,
               "payload_raw_len": segment_raw_bytes}
        await writer.commit_shared(lambda state, row=row: {"add_segments": {k: [row[k]] for k in ROW_FIELDS}})
    cpu = time.process_time() - cpu0
    await store.close()
    return cpu


def bare_stages(d: Path, total_bytes: int, seal_bytes: int) -> dict:
    """CPU seconds per GB of payload of each bare stage, the log's wall MB/s and the
    compression ratio (module docstring). ``d`` must be on the disk being measured."""
    d.mkdir(parents=True, exist_ok=True)
    frames = _frames(min(total_bytes, 64 << 20))
    rounds = max(1, total_bytes // (64 << 20))
    payloads = [memoryview(f[2]) for f in frames]
    pool_bytes = sum(len(p) for p in payloads)
    nbytes = pool_bytes * rounds
    joined = [b"".join(bytes(p) for p in f) for f in frames]
    wire = sum(len(c) for c in joined) * rounds
    cpu: dict[str, float] = {}
    cpu["socket_receive"] = _receive(joined, wire) / nbytes * GB
    t = time.process_time()
    for _ in range(rounds):
        for c in joined:
            decode_frame(c)
    cpu["frame_validation"] = (time.process_time() - t) / nbytes * GB
    log_cpu, log_wall = _log_write(d / "replog", frames, rounds)
    cpu["log_write"] = log_cpu / nbytes * GB
    lz4_cpu, stored, blocks = _lz4(payloads)
    cpu["lz4"] = lz4_cpu / pool_bytes * GB
    segments = max(2, min(8, nbytes // seal_bytes))
    seg_cpu = asyncio.run(_segment_writes(d / "store", blocks, seal_bytes, segments))
    cpu["segment_write"] = seg_cpu / (segments * seal_bytes) * GB
    commits = 8
    cat_cpu = asyncio.run(_catalog_commits(d / "catalog", commits, seal_bytes))
    cpu["catalog_commit"] = cat_cpu / commits * (GB / seal_bytes)
    return {"bare_cpu_s_per_gb": cpu, "log_mb_per_s": nbytes / log_wall / 1e6,
            "compression_ratio": pool_bytes / stored, "bytes": nbytes}


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    path = Path(path).resolve()
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1].replace("\\040", " ")
        if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, fields[2]
    return kind


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of its thread
    ``tid``, so far."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(xs: list[float]) -> float:
    return float(np.median(xs))
