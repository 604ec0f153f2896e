"""Failover to a recovery site: recovery time cold and warm, planned loss, test-failover RPO.

Setup (not timed): a domain ``erp`` of 3 disks of 1 GiB each (``--quick``: 128 MiB) whose
bases hold realistic data (``PayloadSource("mixed")``) and a quarter of each disk again
of random 64 KiB writes (churn) sealed in 16 MiB segments, built with the library in a
file store as site A's DRVA would have left it (``cdp.testing.domain.DomainBuilder``).
Site B is the two-site fixture's pilot light (``cdp.testing.two_sites``): its MSA runs
in this process, its DRVA, simulated hosts and recovery appliance as subprocesses.

Fields (the last line of ``--json``):

- ``rto_cold_s``: ``cdp failover`` (the job) until the first write of a recovered VM is
  acknowledged by B's DRVA — rehydrate in the appliance, fork, register, protect, power
  on; the store's files are dropped from the page cache first. Median of 3 rounds, each
  on a fresh copy of the store (a failover forks the domain, so it runs once per store).
- ``recover_s`` and ``rto_cold_vs_recover``: ``rocva.recover`` of the same point (the
  ``benchmarks.recovery`` path, cold, same bytes) from a copy of the store made and
  dropped from the page cache as the failover's is (see ``cold``), timed in the same
  rounds, interleaved with the failovers; the median cold RTO over the median recovery.
- ``rto_warm_s``: the same with ``[[standby]] mode = "continuous"``: B's standby is
  built, follows 16 MiB more of churn, then 1 MiB more lands and the failover starts at
  once (the appliance applies the tail the standby had not); ``rto_warm_4x_s`` the same
  with disks 4x larger, ``rto_warm_growth`` = 4x / 1x. Each is the median of 3 rounds
  (``rto_warm_rounds_s``, ``rto_warm_4x_rounds_s``), each on a hard-linked copy of the
  built store with a fresh site B.
- ``planned_lost_writes``, ``planned_s``: site A and B both running (small disks), A's
  VMs writing; ``cdp failover --planned``: writes A acknowledged after the point B
  failed over at, and the job's seconds (quiesce, final mark, rehydrate, fork, start).
- ``test_failover_rpo_p99_s``: A's RPO lag (its DRVA's ``rpo_lag_s``, sampled every
  0.1 s) while a test failover at B rehydrates and runs its VMs, 99th percentile.

Targets (issue 11): ``rto_cold_vs_recover`` <= 1.3, ``rto_warm_s`` <= 5,
``rto_warm_growth`` <= 1.3, ``planned_lost_writes`` = 0, ``test_failover_rpo_p99_s`` <= 2.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import emit, parse_args, progress, work_dir
from benchmarks.recovery import clear, evict
from cdp.base_image import CHUNK_SIZE_DEFAULT
from cdp.catalog import CatalogWriter
from cdp.segment_format import BLOCK_RAW_SIZE_DEFAULT
from cdp.store.base import ObjectStore
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites
from iofilter_sim.payloads import PayloadSource
from rocva import RecoverOptions, Target, recover

MiB = 1 << 20
WRITE = 64 << 10
PER_SEGMENT = 256  # 16 MiB of payload per segment
DISKS = (("erp-db", "data"), ("erp-db", "log"), ("erp-app", "disk0"))
TAIL_BYTES = 16 * MiB
WAIT_S = 600.0
WARM_ROUNDS = 3


async def build(root: Path, size: int, bar) -> DomainBuilder:
    """Domain erp (id 1) of site A in ``root/store``: full bases, then churn."""
    b = await DomainBuilder(FileStore(root / "store"), domain=1, name="erp",
                            disks=tuple((vm, disk, size) for vm, disk in DISKS),
                            block_raw_size=BLOCK_RAW_SIZE_DEFAULT).start()
    src = PayloadSource("mixed", seed=1)
    for k in range(len(DISKS)):
        b.model[k][:] = src.batch(np.full(size // WRITE, WRITE))
        await b.add_base(k, chunk_size=CHUNK_SIZE_DEFAULT)
        bar.update(size)
    await churn(b, src, np.random.default_rng(1), size // 4 * len(DISKS), bar)
    return b


async def churn(b: DomainBuilder, src: PayloadSource, rng: np.random.Generator, nbytes: int, bar=None) -> None:
    writes = nbytes // WRITE
    slots = b.disks[0]["size"] // WRITE
    for first in range(0, writes, PER_SEGMENT):
        count = min(PER_SEGMENT, writes - first)
        payload = src.batch(np.full(count, WRITE))
        disks = rng.integers(0, len(b.disks), count).tolist()
        for i, slot in enumerate(rng.integers(0, slots, count).tolist()):
            b.write(disks[i], slot * WRITE, payload[i * WRITE : (i + 1) * WRITE])
        await b.seal()
        if bar is not None:
            bar.update(count * WRITE)


async def run_failover(daemon: Any, mode: str = "unplanned") -> dict[str, Any]:
    from cdp.msa.failover import run_failover as job_failover
    from cdp.msa.failover import run_test_failover

    if mode == "test":
        record = await daemon.start_job("failover", {"domain": "erp", "mode": "test"},
                                        lambda job: run_test_failover(daemon, "erp", "latest", job))
    else:
        record = await daemon.start_job("failover", {"domain": "erp", "mode": mode}, lambda job: job_failover(
            daemon, "erp", "latest", job, planned=mode == "planned"))
    record = await daemon.runner.wait(record["id"])
    if record["state"] != "succeeded":
        raise RuntimeError(f"failover job {record['state']}: {record.get('error')}")
    return record["output"]


async def cold(root: Path, size: int, rounds: int) -> dict[str, Any]:
    """Interleaved rounds: a recovery, then a failover to a fresh site B, each of a fresh
    copy of the pristine store (a failover forks the domain: it runs once per store).

    Both copies are made, and dropped from the page cache with the pristine store (their
    dirty pages written back), the same way just before each is timed. On this machine a
    run is much faster when the memory it fills with page cache was freed a moment before
    than when it has long been free: the VM hands free memory back to its host
    (virtio-balloon free page reporting), and taking it back costs kernel CPU, not I/O.
    A recovery of one copy measured 6-7 s right after 4.8 GiB of store pages were dropped,
    12 s with the pristine store left cached (system CPU 3.5-4 s vs 9-11 s). The old order
    (a recovery of the pristine store right after dropping it, a failover with it still
    cached by the copy) charged that to the failover alone."""
    bar = progress(size * len(DISKS) * 5 // 4, "build (cold)")
    b = await build(root / "src", size, bar)
    bar.close()
    pristine = root / "src" / "store"
    out = root / "recover-out"
    recover_s, rto_s, results = [], [], []
    for i in range(rounds):
        copy = root / "recover-store"
        await asyncio.to_thread(shutil.copytree, pristine, copy)
        evict(copy, pristine)
        t0 = time.perf_counter()
        await recover(FileStore(copy), b.domain, RecoverOptions(Target.latest(), out))
        recover_s.append(time.perf_counter() - t0)
        clear(out)
        clear(copy)
        run = root / f"failover-{i}"
        await asyncio.to_thread(shutil.copytree, pristine, run / "store")
        sites = make_two_sites(run, disk=size)
        async with running_daemon(sites.b) as daemon:
            evict(run / "store", pristine)
            result = await run_failover(daemon)
        rto_s.append(result["first_write_acked_s"])
        results.append(result)
        evict(run)
        await asyncio.to_thread(shutil.rmtree, run)
    median = results[sorted(range(rounds), key=lambda k: rto_s[k])[rounds // 2]]
    return {"rto_cold_s": statistics.median(rto_s), "recover_s": statistics.median(recover_s),
            "rehydrate_s": median["rehydrate_s"], "phases_s": median["phases_s"],
            "rto_cold_rounds_s": rto_s, "recover_rounds_s": [round(x, 3) for x in recover_s]}


async def clone_onto(b: DomainBuilder, store: ObjectStore) -> DomainBuilder:
    """``b`` writing on into ``store`` (a linked copy of its store) from where it stands:
    its own catalog writer and lists; the model is shared (a warm round checks nothing
    against it)."""
    c = copy.copy(b)
    c.store = store
    c.writer = await CatalogWriter.open(store, b.domain, by="test builder", owner=b.writer.owner,
                                        snapshot_every=b.writer.snapshot_every)
    c.windows, c.marks, c.segment_keys = [dict(w) for w in b.windows], list(b.marks), list(b.segment_keys)
    c.chunk_keys, c.base_keys = set(b.chunk_keys), list(b.base_keys)
    c._records, c._payload, c._new_marks = [], [], []
    return c


def linked_copy(src: Path, dst: Path) -> None:
    """``src``'s tree with every file hard-linked, without copying gigabytes a round (a
    FileStore replaces objects by rename, never in place: what a round adds or forks
    stays in its copy, the original stays as it was)."""
    shutil.copytree(src, dst, copy_function=os.link)


async def warm(root: Path, size: int, rounds: int) -> dict[str, Any]:
    """``rounds`` warm failovers of one domain, each on a linked copy of its store and a
    fresh site B whose standby is built cold and then follows; the median, each round's
    time, and the median round's phases. One failover of ~1.5 s moved by ±40 % from run
    to run on this machine (4x over 1x measured 0.81 and 1.61 with one round each)."""
    bar = progress(size * len(DISKS) * 5 // 4, f"build (warm, {size // MiB} MiB disks)")
    b = await build(root / "src", size, bar)
    bar.close()
    pristine = root / "src" / "store"
    rto_s, results = [], []
    for r in range(rounds):
        run = root / f"round-{r}"
        await asyncio.to_thread(linked_copy, pristine, run / "store")
        rb = await clone_onto(b, FileStore(run / "store"))
        sites = make_two_sites(run, disk=size, standby=True)
        async with running_daemon(sites.b) as daemon:
            def standby() -> dict[str, Any]:
                return next(v for v in daemon.status()["standby"] if v["domain"] == "erp")

            async def caught_up() -> None:
                deadline = time.monotonic() + WAIT_S
                while (standby()["seq"] or 0) < rb.seq:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the standby did not follow: {standby()}")
                    await asyncio.sleep(0.05)

            await caught_up()  # the cold build of the standby
            src, rng = PayloadSource("mixed", seed=2 + r), np.random.default_rng(2 + r)
            await churn(rb, src, rng, TAIL_BYTES)  # A goes on writing; the standby follows ...
            await caught_up()
            await churn(rb, src, rng, TAIL_BYTES // 16)  # ... and B fails over before it applied the last 1 MiB
            result = await run_failover(daemon)
        if not result["warm"]:
            raise RuntimeError("the failover did not use the standby")
        rto_s.append(result["first_write_acked_s"])
        results.append(result)
        await asyncio.to_thread(shutil.rmtree, run)
    median = results[sorted(range(rounds), key=lambda k: rto_s[k])[rounds // 2]]
    return {"rto_warm_s": statistics.median(rto_s), "rounds_s": [round(x, 3) for x in rto_s],
            "warm_rehydrate_s": median["rehydrate_s"], "phases_s": median["phases_s"]}


async def planned_and_test(root: Path) -> dict[str, Any]:
    from cdp.testing.two_sites import committed

    sites = make_two_sites(root, disk="16MiB", workload={"kind": "random", "rate_mb_s": 4, "write_size": "16KiB"})
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        deadline = time.monotonic() + WAIT_S
        while committed(a, "erp") < 200:
            if time.monotonic() > deadline:
                raise RuntimeError("site A's writes did not reach the store")
            await asyncio.sleep(0.1)

        lags: list[float] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                for v in a.supervisor.views():
                    for d in (v.status or {}).get("domains", []):
                        if d.get("name") == "erp" and isinstance(d.get("rpo_lag_s"), (int, float)):
                            lags.append(float(d["rpo_lag_s"]))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        await run_failover(b, "test")
        await asyncio.sleep(5.0)  # the test VMs run at B while A replicates
        stop.set()
        await sampler
        from cdp.msa.failover import cleanup_test_failover

        await cleanup_test_failover(b, "erp")

        t0 = time.perf_counter()
        planned = await run_failover(b, "planned")
        planned_s = time.perf_counter() - t0
    return {"planned_lost_writes": planned["handover"]["lost_writes"], "planned_s": planned_s,
            "test_failover_rpo_p99_s": float(np.percentile(lags, 99)) if lags else None,
            "rpo_samples": len(lags)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    size = (128 if args.quick else 1024) * MiB
    with work_dir(args) as d:
        root = Path(d)
        c = asyncio.run(cold(root / "cold", size, 3))
        shutil.rmtree(root / "cold")  # the 4x run needs the room
        w1 = asyncio.run(warm(root / "warm1", size, WARM_ROUNDS))
        shutil.rmtree(root / "warm1")
        w4 = asyncio.run(warm(root / "warm4", 4 * size, WARM_ROUNDS))
        shutil.rmtree(root / "warm4")
        p = asyncio.run(planned_and_test(root / "planned"))
    result = {
        "benchmark": "failover", "quick": args.quick, "disk_bytes": size, "disks": len(DISKS),
        "rto_cold_s": round(c["rto_cold_s"], 3), "rehydrate_cold_s": round(c["rehydrate_s"], 3),
        "recover_s": round(c["recover_s"], 3),
        "rto_cold_vs_recover": round(c["rto_cold_s"] / c["recover_s"], 3),
        "rto_warm_s": round(w1["rto_warm_s"], 3), "rto_warm_4x_s": round(w4["rto_warm_s"], 3),
        "rto_warm_growth": round(w4["rto_warm_s"] / w1["rto_warm_s"], 3),
        "planned_lost_writes": p["planned_lost_writes"], "planned_s": round(p["planned_s"], 3),
        "test_failover_rpo_p99_s": None if p["test_failover_rpo_p99_s"] is None
        else round(p["test_failover_rpo_p99_s"], 3),
        "rpo_samples": p["rpo_samples"], "cold_phases_s": c["phases_s"], "warm_phases_s": w1["phases_s"],
        "rto_cold_rounds_s": c["rto_cold_rounds_s"], "recover_rounds_s": c["recover_rounds_s"],
        "warm_4x_phases_s": w4["phases_s"], "rto_warm_rounds_s": w1["rounds_s"],
        "rto_warm_4x_rounds_s": w4["rounds_s"],
    }
    emit(args, result, [
        ("RTO cold (failover -> first write acked)", f"{result['rto_cold_s']:.2f} s"),
        ("recover the same point", f"{result['recover_s']:.2f} s (RTO cold / recover "
                                   f"{result['rto_cold_vs_recover']:.2f})"),
        ("RTO warm (continuous standby)", f"{result['rto_warm_s']:.2f} s; 4x disks "
                                          f"{result['rto_warm_4x_s']:.2f} s (x{result['rto_warm_growth']:.2f})"),
        ("planned failover", f"{result['planned_s']:.2f} s, {result['planned_lost_writes']} writes lost"),
        ("A's RPO during a test failover (p99)", f"{result['test_failover_rpo_p99_s']} s"),
    ])


if __name__ == "__main__":
    main()
