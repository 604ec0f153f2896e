"""Storage efficiency: what protecting a 10 % change of a disk adds to the store, next to
restic and borg backing up the same change.

A 1 GiB disk (``--quick``: 32 MiB) filled with realistic data (``PayloadSource("mixed")``,
about 1.5:1) is seeded through a DRVA (its own process, file store) by the filter's
initial seeding (base image chunks); then 10 % of the disk is changed by random 4 KiB
writes of incompressible data at distinct 4 KiB-aligned places (1 GiB: 26,214 writes,
107.4 MB), captured by the filter, which applies them to the primary image too. The
store's growth is measured once every write is committed (every file under the store,
apparent bytes): ``store_growth_bytes``, and ``growth_vs_changed`` over the changed bytes
(target <= 1.1); ``growth_by_kind``: segments, catalog (generations and pages), bases.

restic and borg (Debian packages, installed with apt-get when missing) back up the
primary image before the change and again after it, each into its own repository;
``restic_growth_vs_changed`` and ``borg_growth_vs_changed`` are their repositories'
growth over the same changed bytes (null with ``--no-peers``). Each changed 4 KiB block lands in one of their
content-defined chunks (about 1 MiB for restic, 2 MiB for borg), which is stored anew.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from benchmarks._common import emit, free_port, machine, parse_args, progress, stop_process, work_dir
from benchmarks._peers import Borg, PeerMissing, Restic, dir_bytes, ensure, version
from iofilter_sim.client import FilterClient
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter
from iofilter_sim.payloads import PayloadSource
from iofilter_sim.seeding import seed_disk

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-site-secret-0123456789"
MiB = 1 << 20
DISK_BYTES, DISK_BYTES_QUICK = 1 << 30, 32 * MiB
CHANGE_SHARE = 0.10
WRITE_BYTES = 4 << 10
BATCH_WRITES = 1024  # writes captured at a time (4 MiB)
INFLIGHT_BYTES = 32 << 20  # unacked bytes the filter holds at most before the next batch
COMMIT_TIMEOUT_S = 300.0
COLLECT_WAIT_S = 0.5  # after the last commit: the catalog collection it started ends
KINDS = {"seg": "segments", "cat": "catalog", "page": "catalog", "base": "bases", "c": "bases"}


def store_bytes_by_kind(store: Path) -> dict[str, int]:
    """Apparent bytes under the file store, by kind of object (FORMAT.md §7 layout)."""
    out = {"segments": 0, "catalog": 0, "bases": 0, "other": 0}
    for p in store.rglob("*"):
        if p.is_file():
            parts = p.relative_to(store).parts
            kind = parts[0] if parts[0] == "c" else (parts[2] if len(parts) > 2 and parts[0] == "d" else "")
            out[KINDS.get(kind, "other")] += p.stat().st_size
    return out


def fill_image(path: Path, size: int, bar) -> None:
    src = PayloadSource("mixed", seed=7, zero_share=0.0)
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(src.batch(np.full(64, 64 << 10)))
            bar.update(4 * MiB)
        f.flush()
        os.fsync(f.fileno())


def drva_toml(d: Path, port: int, size: int) -> Path:
    doc = {
        "name": "drva-storage", "listen": f"127.0.0.1:{port}", "state_dir": str(d / "state"),
        "store": f"file://{d / 'store'}", "status_interval_s": 0.2,
        "log": {"path": str(d / "state" / "replog"), "size": "512MiB"}, "meta": {"path": str(d / "state" / "meta")},
        "seal": {"bytes": "16MiB", "age_s": 1.0},
        "domains": [{"id": 1, "name": "storage", "disks": [{"vm": "vm", "name": "disk0", "size": size}]}],
    }
    path = d / "drva.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


async def committed(status: Path, seq: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + COMMIT_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the DRVA exited with {proc.returncode}")
        try:
            dom = json.loads(status.read_bytes())["domains"][0]
            if dom["catalog_ready"] and dom["committed_seq"] >= seq and dom["inflight_segments"] == 0:
                return
        except (OSError, ValueError, KeyError, IndexError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"seq {seq} not committed after {COMMIT_TIMEOUT_S} s")


def change(size: int) -> tuple[np.ndarray, bytes]:
    """Offsets (distinct, 4 KiB-aligned, random order) and incompressible payload of the change."""
    rng = np.random.default_rng(15)
    n = int(size * CHANGE_SHARE) // WRITE_BYTES
    offsets = rng.choice(size // WRITE_BYTES, n, replace=False).astype(np.uint64) * WRITE_BYTES
    return offsets, rng.bytes(n * WRITE_BYTES)


async def protect(d: Path, image: Path, size: int, offsets: np.ndarray, payload: bytes, bar) -> dict[str, Any]:
    """Seed ``image`` through a DRVA, then capture the change; store bytes before and after."""
    d.mkdir(parents=True)
    port = free_port()
    cfg = drva_toml(d, port, size)
    with open(d / "drva.log", "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "drva.daemon", "--config", str(cfg), "--log-level", "warning"],
                                cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": SECRET},
                                stdout=log_file, stderr=log_file)
    status = d / "state" / "status.json"
    disk = PrimaryDisk(image, size, create=False)
    f = DomainFilter(1, [disk], buffer_bytes_max=2 * INFLIGHT_BYTES)
    client = FilterClient([f], "127.0.0.1", port, SECRET.encode(), "storage-host")
    task = asyncio.create_task(client.run())
    try:
        await committed(status, 0, proc)  # the catalog is open
        t0 = time.perf_counter()
        seeded = await seed_disk(client, f, 0)
        await committed(status, f.next_seq - 1, proc)
        seed_s = time.perf_counter() - t0
        before = store_bytes_by_kind(d / "store")
        n = len(offsets)
        t0 = time.perf_counter()
        for i in range(0, n, BATCH_WRITES):
            while f.buffered_bytes > INFLIGHT_BYTES:
                await asyncio.sleep(0.002)
            k = min(BATCH_WRITES, n - i)
            f.capture(np.zeros(k, np.uint32), offsets[i:i + k], np.full(k, WRITE_BYTES, np.uint32),
                      np.zeros(k, np.uint16), payload[i * WRITE_BYTES:(i + k) * WRITE_BYTES])
            bar.update(k * WRITE_BYTES)
            await asyncio.sleep(0)
        await committed(status, f.next_seq - 1, proc)
        change_s = time.perf_counter() - t0
        # A catalog collection started by the last commit ends meanwhile.
        await asyncio.sleep(COLLECT_WAIT_S)
        after = store_bytes_by_kind(d / "store")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stop_process(proc)
        disk.fsync()
        disk.close()
    return {"before": before, "after": after, "seed_s": seed_s, "change_s": change_s, "seeded": seeded}


def bench(root: Path, quick: bool, peers: bool = True) -> dict[str, Any]:
    if peers:
        try:
            ensure(["restic", "borg"])
        except PeerMissing as exc:
            raise SystemExit(f"benchmarks.storage: {exc} (or run with --no-peers)") from None
    size = DISK_BYTES_QUICK if quick else DISK_BYTES
    image = root / "primary.img"
    offsets, payload = change(size)
    changed = len(payload)
    bar = progress(size * 3 + changed, "fill, back up, protect")
    fill_image(image, size, bar)
    repos = [Restic(root / "restic-repo").init(), Borg(root / "borg-repo").init()] if peers else []
    seeded: list[tuple[int, float]] = []  # per repository: bytes and seconds of the first backup
    for repo in repos:
        t0 = time.perf_counter()
        repo.backup(image)
        seeded.append((dir_bytes(repo.repo), time.perf_counter() - t0))
        bar.update(size)
    ours = asyncio.run(protect(root / "cdp", image, size, offsets, payload, bar))  # applies the change to the image
    grown = []
    for repo in repos:
        repo.backup(image)
        grown.append(dir_bytes(repo.repo))
    bar.close()
    growth = sum(ours["after"].values()) - sum(ours["before"].values())
    by_kind = {k: ours["after"][k] - ours["before"][k] for k in ours["after"]}
    peer: dict[str, Any] = {}
    for name, i in (("restic", 0), ("borg", 1)):
        have = i < len(repos)
        peer.update({
            f"{name}_version": version(name) if have else None,
            f"{name}_seed_bytes": seeded[i][0] if have else None,
            f"{name}_seed_backup_s": round(seeded[i][1], 2) if have else None,
            f"{name}_growth_bytes": grown[i] - seeded[i][0] if have else None,
            f"{name}_growth_vs_changed": round((grown[i] - seeded[i][0]) / changed, 4) if have else None,
        })
    return {
        "benchmark": "storage", "quick": quick, "machine": machine(root),
        "disk_bytes": size, "changed_bytes": changed, "writes": len(offsets), "write_bytes": WRITE_BYTES,
        "seed_store_bytes": sum(ours["before"].values()), "seed_s": round(ours["seed_s"], 2),
        "seed_chunks_stored": ours["seeded"].get("chunks_stored"),
        "change_protect_s": round(ours["change_s"], 2),
        "store_growth_bytes": growth, "growth_by_kind": by_kind,
        "growth_vs_changed": round(growth / changed, 4),
        **peer, "peers": peers,
        "target_met": growth / changed <= 1.1,
    }


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-peers", action="store_true", help="without restic and borg (their fields are null)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], options)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the DRVA is stopped on the way out
    with work_dir(args) as d:
        result = bench(Path(d), args.quick, not args.no_peers)
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    emit(args, result, [
        ("disk / changed", f"{mb(result['disk_bytes'])} / {mb(result['changed_bytes'])} "
                           f"({result['writes']:,} random 4 KiB writes, incompressible)"),
        ("store after the seed", mb(result["seed_store_bytes"])),
        ("store growth", f"{mb(result['store_growth_bytes'])}: {result['growth_vs_changed']} x the change "
                         f"({', '.join(f'{k} {mb(v)}' for k, v in result['growth_by_kind'].items() if v)})"),
        *[(f"{name} repository growth", "not measured (--no-peers)" if result[f"{name}_growth_bytes"] is None else
           f"{mb(result[f'{name}_growth_bytes'])}: {result[f'{name}_growth_vs_changed']} x "
           f"(after a seed of {mb(result[f'{name}_seed_bytes'])})") for name in ("restic", "borg")],
    ])


if __name__ == "__main__":
    main()
