"""Recovery throughput: a 256 MiB disk after ~256 MiB of random 64 KiB writes, FileStore.

    .venv/bin/python -m tests.rocva.bench_recover [--disk-mib 256] [--writes-mib 256] [--block-kib 1024] [--dir DIR]

Builds the domain with the library (16 MiB segments, 1 MiB blocks unless --block-kib), recovers the latest
point with ``rocva.recover`` and checks the image against the in-memory model. The page
cache is warm (the store was just written): this measures the recovery path, not a disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, file_sha256, sha256
from rocva import RecoverOptions, Target, recover

MiB = 1 << 20
WRITE = 64 << 10
PER_SEGMENT = 256  # 16 MiB of payload per segment


async def bench(root: Path, disk_mib: int, writes_mib: int, concurrency: int, block_kib: int = 1024) -> dict:
    size = disk_mib * MiB
    b = await DomainBuilder(FileStore(root / "store"), disks=(("vm", "disk0", size),),
                            block_raw_size=block_kib << 10).start()
    rng = np.random.default_rng(1)
    offsets = rng.integers(0, size // WRITE, writes_mib * MiB // WRITE) * WRITE
    pool = rng.bytes(64 * MiB)
    t = time.perf_counter()
    for i, off in enumerate(offsets.tolist()):
        at = int(rng.integers(0, (len(pool) - WRITE) // 512)) * 512
        b.write(0, off, pool[at : at + WRITE])
        if i % PER_SEGMENT == PER_SEGMENT - 1:
            await b.seal()
    await b.seal()
    build_s = time.perf_counter() - t
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), root / "out", concurrency=concurrency))
    ok = file_sha256(result["images"][0]["path"]) == sha256(b.model[0])
    return {"verified": ok, "disk_mib": disk_mib, "writes_mib": writes_mib, "segments": len(b.segment_keys),
            "build_s": round(build_s, 2), "recover_s": result["seconds"],
            "bytes_written": result["bytes_written"], "bytes_fetched": result["bytes_fetched"],
            "gets": result["gets"], "mb_per_s_written": result["mb_per_s"],
            "disk_mb_per_s": round(size / 1e6 / result["seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--writes-mib", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--block-kib", type=int, default=1024, help="segment block_raw_size")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        print(json.dumps(asyncio.run(bench(Path(root), args.disk_mib, args.writes_mib, args.concurrency,
                                                 args.block_kib)), indent=1))


if __name__ == "__main__":
    main()
