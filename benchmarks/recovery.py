"""Cold point-in-time recovery from the file store against ``cp``, ``restic restore`` and ``borg extract``.

Setup (not timed): one 1 GiB disk (``--quick``: 256 MiB) whose base image (4 MiB chunks)
holds realistic data (``PayloadSource("mixed")``), then as many bytes again of random
64 KiB writes of the same style, sealed in 16 MiB segments, with a mark half way; all
built with the library (``cdp.testing.domain.DomainBuilder``) in a ``FileStore``. The
disk as it is at the end (the model) is kept as a file: the primary image.

Timed, every read cold: before each run the page cache of every input file (all files
under the store; the primary image for ``cp``; the repository for restic and borg) and of the
previous run's output is dropped with ``posix_fadvise(DONTNEED)`` after an ``os.sync()``.
Each side is timed until its output is durable: recovery fsyncs its images itself, and
the ``cp --sparse=auto`` copy and restic's and borg's restored files are fsynced inside the timing.
Medians over rounds. The baselines are timed in the same rounds as the recoveries of
the latest point they divide, in turns (``cp``, restic, borg, recovery, the order
rotated each round; restic's and borg's backups and one untimed cp before the first
round; the recovered image checked after the last). Why: this VM's speed drifts with
its memory state (a page it gave back to the host costs a fault when touched again),
and a baseline timed after all the recoveries met a warmer machine than they did (in
one full run: the first rounds' recoveries took 2.33 s, the same recoveries later in
the run 1.67 s, and cp, timed after them all, 1.04 s).

Fields: ``mb_per_s`` (disk bytes / seconds to recover the latest point),
``middle_mb_per_s`` (the mark half way), ``ratio_vs_cp`` (our speed / cp's),
``ratio_vs_restic`` (restic restore seconds / ours; null without ``restic`` on PATH),
``borg_extract_s`` and ``ratio_vs_borg`` likewise (``borg extract`` of the newest archive
of an unencrypted repository, default lz4 compression; null without ``borg``),
``churn16_vs_churn1``: the same disk after 16x the writes, recovered latest *after
consolidation*, in seconds, over the 1x latest seconds. The consolidation is the real job
(``rocva.consolidate``, not timed in the ratio but reported as ``consolidate_s``) with
``older_than`` set so that the newest 1x of writes stays in segments and a retention
window of the same length, so the store afterwards holds a base and 1x of history, as a
domain consolidated on a schedule would.
``verified``: every recovered image's sha256 equals the model's at its point (untimed).
``encrypted_ratio``: the same 1x domain built again in a store with a key (every object
sealed, FORMAT.md §19); cold recoveries of the latest point from both stores, in turns
(plain, sealed, sealed, plain; three times); plain seconds over sealed seconds (the sealed
store's speed as a share of the plain one's), with ``encrypted_recover_latest_s`` and
``plain_recover_latest_s`` (medians of the turns). What the seal costs in CPU, which is
what decides the ratio on a busy machine: ``plain_recover_cpu_s`` and
``encrypted_recover_cpu_s`` (user + system seconds of this process during each turn's
recovery, medians) and their ratio ``encrypted_cpu_ratio``; ``encrypted_bytes_opened``
(plaintext bytes the sealed recovery read: every one is opened) and
``aes_gcm_open_gb_per_s`` (one core opening 64 KiB pages into a reused buffer, as the
recovery does, best of 5 passes over 16 MiB, measured in the run), whose quotient
``encrypted_aes_floor_s`` is the CPU time AES-GCM alone adds to a sealed recovery.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks._common import emit, parse_args, progress, work_dir
from benchmarks._peers import Borg, Restic
from cdp.digest import sha256_file
from cdp.memory import bound_malloc
from cdp.base_image import CHUNK_SIZE_DEFAULT
from cdp.segment_format import BLOCK_RAW_SIZE_DEFAULT
from cdp.store.base import ObjectStore
from cdp.store.crypt import EncryptedStore
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.store.storekeys import StoreKey, StoreKeyring
from cdp.testing.domain import DomainBuilder
from iofilter_sim.payloads import PayloadSource
from rocva import RecoverOptions, Target, recover
from rocva.consolidate import consolidate

MiB = 1 << 20
WRITE = 64 << 10
PER_SEGMENT = 256  # 256 × 64 KiB = 16 MiB of payload per segment
CONCURRENCY = 8
CHURN_FACTOR = 16


def evict(*roots: Path) -> None:
    """Write back dirty pages, then drop every file under ``roots`` from the page cache."""
    os.sync()
    for root in roots:
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear(path: Path) -> None:
    """Drop a previous run's output (from the cache first, then from the disk)."""
    if path.exists():
        evict(path)
        shutil.rmtree(path)


async def write_history(b: DomainBuilder, src: PayloadSource, rng: np.random.Generator, nbytes: int,
                        bar, mark_at: int | None = None) -> str | None:
    """``nbytes`` of random 64 KiB writes, sealed every 16 MiB; a mark after ``mark_at``
    writes, whose disk sha256 is returned."""
    mark_sha = None
    writes = nbytes // WRITE
    slots = b.disks[0]["size"] // WRITE
    for first in range(0, writes, PER_SEGMENT):
        count = min(PER_SEGMENT, writes - first)
        payload = src.batch(np.full(count, WRITE))
        for i, slot in enumerate(rng.integers(0, slots, count).tolist()):
            b.write(0, slot * WRITE, payload[i * WRITE : (i + 1) * WRITE])
            if mark_at is not None and first + i + 1 == mark_at:
                b.mark("half")
                mark_sha = hashlib.sha256(b.model[0]).hexdigest()
        await b.seal()
        bar.update(count * WRITE)
    return mark_sha


def sealed(store_dir: Path, keyring: StoreKeyring | None) -> ObjectStore:
    """The file store at ``store_dir``, sealed with ``keyring`` when there is one."""
    return FileStore(store_dir) if keyring is None else EncryptedStore(FileStore(store_dir), keyring)


async def build(root: Path, size: int, bar, keyring: StoreKeyring | None = None,
                store_name: str = "store") -> tuple[DomainBuilder, PayloadSource, np.random.Generator, str]:
    """The 1x domain: a base at seq 0, ``size`` bytes of writes; returns the mark's sha256."""
    b = await DomainBuilder(sealed(root / store_name, keyring), disks=(("vm", "disk0", size),),
                            block_raw_size=BLOCK_RAW_SIZE_DEFAULT).start()
    src = PayloadSource("mixed", seed=1)
    rng = np.random.default_rng(1)
    b.model[0][:] = src.batch(np.full(size // WRITE, WRITE))
    await b.add_base(0, chunk_size=CHUNK_SIZE_DEFAULT)
    bar.update(size)
    half_sha = await write_history(b, src, rng, size, bar, mark_at=size // WRITE // 2)
    return b, src, rng, half_sha


def cpu_seconds() -> float:
    """User + system seconds of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_recover(store_dir: Path, domain: int, target: Target, out: Path, rounds: int,
                 keyring: StoreKeyring | None = None, cpu: list[float] | None = None,
                 results: list[dict] | None = None) -> tuple[float, Path]:
    """Median seconds of ``rounds`` cold recoveries; the last image's path. ``cpu``: gets
    each recovery's CPU seconds; ``results``: each recovery's summary."""
    times = []
    for _ in range(rounds):
        clear(out)
        evict(store_dir)
        c0, t0 = cpu_seconds(), time.perf_counter()
        result = asyncio.run(recover(sealed(store_dir, keyring), domain,
                                     RecoverOptions(target, out, concurrency=CONCURRENCY)))
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(cpu_seconds() - c0)
        if results is not None:
            results.append(result)
    return statistics.median(times), Path(result["images"][0]["path"])


def aes_gcm_open_gb_per_s(keyring: StoreKeyring) -> float:
    """One core opening sealed 64 KiB pages (``Unopened.open_into`` a reused buffer, as a
    recovery's pool thread does): GB/s, best of 5 passes over 16 MiB of random data."""
    data = os.urandom(16 * MiB)

    async def unopened():
        store = EncryptedStore(MemoryStore(), keyring)
        await store.put("d/aes-benchmark", data)
        return await store.get_unopened("d/aes-benchmark")

    pages, out = asyncio.run(unopened()), bytearray(len(data))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        pages.open_into(out)
        best = min(best, time.perf_counter() - t0)
    assert out == data
    return len(data) / best / 1e9


def time_cp(primary: Path, out: Path) -> float:
    """Seconds of one cold ``cp`` of ``primary`` until the copy is durable."""
    clear(out)
    out.mkdir()
    evict(primary)
    dst = out / "copy.img"
    t0 = time.perf_counter()
    subprocess.run(["cp", "--sparse=auto", str(primary), str(dst)], check=True)
    fsync_file(dst)
    seconds = time.perf_counter() - t0
    clear(out)
    return seconds


def time_peer(peer: Restic | Borg, primary: Path, out: Path) -> float:
    """Seconds of one cold restore of ``primary`` by ``peer`` (restic or borg:
    ``benchmarks._peers``, its backup made), until the restored file is durable."""
    clear(out)
    evict(peer.repo)
    t0 = time.perf_counter()
    peer.restore_latest(out)
    fsync_file(out / primary.relative_to(primary.anchor))
    seconds = time.perf_counter() - t0
    clear(out)
    return seconds


def time_latest_and_baselines(store_dir: Path, domain: int, primary: Path, root: Path, rounds: int,
                              model_sha: str) -> tuple[float, dict[str, float | None], bool]:
    """(recovery seconds, baseline seconds by name, verified): ``rounds`` cold recoveries of
    the latest point and, in the same rounds, in turns, cp and each peer installed (its
    backup made first); medians. A missing peer's seconds are None."""
    peers: dict[str, Restic | Borg] = {}
    if shutil.which("restic"):
        peers["restic"] = Restic(root / "restic-repo")
    if shutil.which("borg"):
        peers["borg"] = Borg(root / "borg-repo")
    for peer in peers.values():
        peer.init()
        peer.backup(primary)
    turns: dict[str, Callable[[], float]] = {"cp": lambda: time_cp(primary, root / "cp-out")}
    for name, peer in peers.items():
        turns[name] = lambda peer=peer, name=name: time_peer(peer, primary, root / f"{name}-out")
    recovered: list[Path] = []

    def recover_once() -> float:
        seconds, image = time_recover(store_dir, domain, Target.latest(), root / "out", 1)
        recovered.append(image)
        return seconds

    turns["recovery"] = recover_once
    times: dict[str, list[float]] = {name: [] for name in turns}
    order = list(turns)
    turns["cp"]()  # untimed: the first turn after the build met a colder machine (2.7 s against 1.0)
    for k in range(rounds):
        for name in order[k % len(order):] + order[: k % len(order)]:
            times[name].append(turns[name]())
    # Checked after the rounds: reading the image back just before a turn slowed that
    # turn (a cp, 1.0 s to 2.0 s).
    verified = sha256_file(recovered[-1]) == model_sha
    for peer in peers.values():
        shutil.rmtree(peer.repo)
    medians: dict[str, float | None] = {name: statistics.median(t) for name, t in times.items()}
    for name in ("restic", "borg"):
        medians.setdefault(name, None)
    return medians.pop("recovery"), medians, verified


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    bound_malloc()  # the recoveries run in this process, under the policy of cdp recover
    size = (256 if args.quick else 1024) * MiB
    rounds = 3
    with work_dir(args) as d:
        root = Path(d)
        bar = progress(2 * size, "build 1x")
        b, src, rng, half_sha = asyncio.run(build(root, size, bar))
        bar.close()
        primary = root / "primary.img"
        primary.write_bytes(b.model[0])
        fsync_file(primary)
        model_sha = sha256_file(primary)
        store_dir = root / "store"
        store_bytes = sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file())
        half_seq = b.marks[0]["seq"]

        latest_s, baselines, verified = time_latest_and_baselines(store_dir, b.domain, primary, root, rounds,
                                                                  model_sha)
        cp_s, restic_s, borg_s = baselines["cp"], baselines["restic"], baselines["borg"]
        middle_s, image = time_recover(store_dir, b.domain, Target.mark("half"), root / "out", rounds)
        verified &= sha256_file(image) == half_sha
        clear(root / "out")
        # The same domain in a sealed store; both recovered in turns (plain, sealed, ...).
        keyring = StoreKeyring([StoreKey(os.urandom(32))], "benchmark key")
        bar = progress(2 * size, "build 1x, sealed")
        b_sealed, *_ = asyncio.run(build(root, size, bar, keyring, "store-sealed"))
        bar.close()
        del b_sealed
        turns: dict[bool, list[float]] = {False: [], True: []}
        turns_cpu: dict[bool, list[float]] = {False: [], True: []}
        sealed_results: list[dict] = []
        for with_key in [False, True, True, False] * 3:
            seconds, image = time_recover(root / ("store-sealed" if with_key else "store"), b.domain,
                                          Target.latest(), root / "out", 1, keyring if with_key else None,
                                          cpu=turns_cpu[with_key], results=sealed_results if with_key else None)
            turns[with_key].append(seconds)
            verified &= sha256_file(image) == model_sha
        plain_turn_s, sealed_turn_s = statistics.median(turns[False]), statistics.median(turns[True])
        plain_cpu_s, sealed_cpu_s = statistics.median(turns_cpu[False]), statistics.median(turns_cpu[True])
        bytes_opened = sealed_results[-1]["bytes_fetched"]
        aes_gb_s = aes_gcm_open_gb_per_s(keyring)
        shutil.rmtree(root / "store-sealed")
        clear(root / "out")

        # 16x the churn: continue the history to 16x the writes, then consolidate all but
        # the newest 1x of writes and apply a retention window of that length.
        bar = progress((CHURN_FACTOR - 1) * size, "build 16x")
        asyncio.run(write_history(b, src, rng, (CHURN_FACTOR - 1) * size, bar))
        bar.close()
        store_bytes_16x = sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file())
        now_ns = b.ts(b.seq)
        keep_s = (now_ns - b.ts(b.seq - size // WRITE)) / 1e9
        bar = progress(2 * size, "consolidate")
        t0 = time.perf_counter()
        job = asyncio.run(consolidate(
            FileStore(store_dir), b.domain, older_than_s=keep_s, retention_s=keep_s, now_ns=now_ns,
            scratch_dir=root, concurrency=CONCURRENCY,
            progress=lambda phase, done, total: (setattr(bar, "n", done), bar.refresh())))
        consolidate_s = time.perf_counter() - t0
        bar.close()
        store_bytes_after = sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file())
        churn16_s, image = time_recover(store_dir, b.domain, Target.latest(), root / "out", rounds)
        verified &= sha256_file(image) == hashlib.sha256(b.model[0]).hexdigest()
        clear(root / "out")

    mbps = size / 1e6 / latest_s
    result = {
        "benchmark": "recovery",
        "quick": args.quick,
        "disk_bytes": size,
        "writes_bytes": size,
        "store_bytes_1x": store_bytes,
        "segments_16x": len(b.segment_keys),
        "rounds": rounds,
        "cold": "posix_fadvise DONTNEED on every input and previous output before each run",
        "sync": "included: recovery fsyncs its images; cp's copy and restic's and borg's files are fsynced "
                "in the timing",
        "recover_latest_s": round(latest_s, 3),
        "recover_middle_s": round(middle_s, 3),
        "middle_seq": half_seq,
        "mb_per_s": round(mbps, 1),
        "middle_mb_per_s": round(size / 1e6 / middle_s, 1),
        "cp_s": round(cp_s, 3),
        "cp_mb_per_s": round(size / 1e6 / cp_s, 1),
        "ratio_vs_cp": round(cp_s / latest_s, 3),
        "restic_restore_s": None if restic_s is None else round(restic_s, 3),
        "ratio_vs_restic": None if restic_s is None else round(restic_s / latest_s, 3),
        "borg_extract_s": None if borg_s is None else round(borg_s, 3),
        "ratio_vs_borg": None if borg_s is None else round(borg_s / latest_s, 3),
        "churn16_recover_s": round(churn16_s, 3),
        "churn16_vs_churn1": round(churn16_s / latest_s, 3),
        "consolidation": "rocva.consolidate",
        "consolidate_s": round(consolidate_s, 3),
        "consolidated_seq": job["consolidated_seq"],
        "horizon_seq": job["horizon_seq"],
        "segments_removed": job["segments_removed"],
        "store_bytes_16x": store_bytes_16x,
        "store_bytes_after_consolidation": store_bytes_after,
        "plain_recover_latest_s": round(plain_turn_s, 3),
        "encrypted_recover_latest_s": round(sealed_turn_s, 3),
        "encrypted_ratio": round(plain_turn_s / sealed_turn_s, 3),
        "plain_recover_cpu_s": round(plain_cpu_s, 3),
        "encrypted_recover_cpu_s": round(sealed_cpu_s, 3),
        "encrypted_cpu_ratio": round(plain_cpu_s / sealed_cpu_s, 3),
        "encrypted_bytes_opened": bytes_opened,
        "aes_gcm_open_gb_per_s": round(aes_gb_s, 2),
        "encrypted_aes_floor_s": round(bytes_opened / 1e9 / aes_gb_s, 3),
        "verified": bool(verified),
    }
    emit(args, result, [
        ("recover latest (cold)", f"{mbps:,.0f} MB/s ({latest_s:.2f} s)"),
        ("recover middle mark (cold)", f"{middle_s:.2f} s"),
        ("cp --sparse=auto + fsync", f"{cp_s:.2f} s (ratio ours/cp {cp_s / latest_s:.2f})"),
        ("restic restore", "absent" if restic_s is None else f"{restic_s:.2f} s"),
        ("borg extract", "absent" if borg_s is None else f"{borg_s:.2f} s"),
        ("consolidation at 16x", f"{consolidate_s:.2f} s, {job['segments_removed']} segments dropped, "
                                 f"store {store_bytes_16x / 1e9:.2f} -> {store_bytes_after / 1e9:.2f} GB"),
        ("16x churn after consolidation", f"{churn16_s:.2f} s ({churn16_s / latest_s:.2f}x)"),
        ("recover latest, sealed store", f"{sealed_turn_s:.2f} s vs {plain_turn_s:.2f} s plain "
                                         f"(ratio {plain_turn_s / sealed_turn_s:.2f})"),
        ("  CPU, sealed vs plain", f"{sealed_cpu_s:.2f} s vs {plain_cpu_s:.2f} s (ratio {plain_cpu_s / sealed_cpu_s:.2f}); "
                                  f"AES-GCM {aes_gb_s:.2f} GB/s a core: {bytes_opened / 1e9 / aes_gb_s:.3f} s "
                                  f"for {bytes_opened / 1e6:,.0f} MB"),
        ("verified", str(bool(verified))),
    ])


if __name__ == "__main__":
    main()
