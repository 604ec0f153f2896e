"""Scale per DRVA: one DRVA process with 1, 10 and 100 domains and up to 1,500 disks.

Each configuration runs on a fresh DRVA (its own log, metadata and file store) fed by a
light sender in this process: ``DomainFilter``s over disks that keep nothing
(``NullDisk``: no primary-disk I/O on the sending side), the real ``FilterClient`` wire
protocol over ``HOSTS_MAX`` connections at most (hosts), and the simulator's ``random``
workload (``iofilter_sim.workloads``: mixed write sizes 512 B .. 1 MiB, ``mixed`` payloads
of about 1.5:1, 1 % ZERO writes) paced to an aggregate ``RATE_MB_S`` shared evenly by the
domains. 15 disks per domain, so 100 domains have 1,500 disks (JetStream allows 500 vDisks
per DRVA, Zerto 1,500 volumes per VRA).

Per configuration, over the measured window (after a warm-up): ``mb_per_s`` (captured),
``cpu_s_per_gb`` (the DRVA's user + system seconds over GB captured), ``rss_mb_max`` (the
DRVA's peak RSS, ``VmHWM``, start-up included), RPO: each domain's ``rpo_lag_s`` as the
DRVA's status document reports it (from the recovery point in the store — just before
the oldest write not in it — to the newest write captured, and at least that oldest
write's wait: how far back a site loss would take the domain, ``drva.domain``), sampled
at each status rewrite; per domain its p99, then ``rpo_p99_s_max`` (the worst domain) and
``rpo_p99_s_median``; ``bitmap_domains`` (filters that fell back to dirty-region bitmaps:
should be 0); ``drain_s`` (from the end of the load until every captured write is
committed); ``load_1m_start``/``load_1m_end``: the machine's load around it (on a shared
2-core machine at a load of 8-10, the DRVA gets a fraction of the ~0.6 core 100 MB/s
needs, and its RPO shows that, not the design). The DRVA runs with the product's
defaults (16 MiB / 1 s seals, 4 uploaders) but a status rewrite every 0.5 s. The top-level ``rss_mb_max``, ``rpo_p99_s_max`` and ``cpu_s_per_gb`` are the
largest configuration's (targets: 100 domains / 1,500 disks, ``rss_mb_max`` <= 512,
``rpo_p99_s_max`` <= 2); ``rpo_series``: its RPO over time (seconds from the start of the
window, median and worst domain), for ``benchmarks.report``.

``--quick`` (CI): 10 domains (150 disks) at 20 MB/s for 1.5 s: fields, not figures.
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

from benchmarks._common import (
    emit, free_port, machine, parse_args, proc_cpu_s, proc_rss_mb, progress, stop_process, work_dir,
)
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from iofilter_sim.workloads import Workload, make_workload

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-site-secret-0123456789"
DISKS_PER_DOMAIN = 15
DISK_BYTES = 8 << 30  # only the offsets' range: a NullDisk keeps nothing
HOSTS_MAX = 8  # filter connections to the DRVA (one per simulated host)
RATE_MB_S, RATE_MB_S_QUICK = 100.0, 20.0
CONFIGS = (1, 10, 100)  # domains
CONFIGS_QUICK = (10,)
SECONDS, SECONDS_QUICK = 30.0, 1.5
WARMUP_S, WARMUP_S_QUICK = 3.0, 0.5
TICK_S = 0.05  # the sender's pace: each domain captures what its pacer allows every tick
BATCH_WRITES_MAX = 4096
BATCH_BYTES_MAX = 4 << 20
BATCHES_PER_TICK_MAX = 8  # a domain's pacer may allow more than one batch in a tick
# The filters' unacked bytes, all domains together: past their share a filter goes to
# bitmap mode, which the result counts (bitmap_domains).
FILTER_BUFFER_BYTES_TOTAL = 512 << 20
FILTER_BUFFER_BYTES_MIN = 8 << 20
STATUS_INTERVAL_S = 0.5
READY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 120.0


class NullDisk:
    """A primary disk that keeps nothing: the sender pays no disk I/O, only capture."""

    def __init__(self, size: int) -> None:
        self.size = size

    def write_batch(self, records: np.ndarray, payload: bytes | memoryview) -> None:
        pass

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


def drva_toml(d: Path, port: int, domains: int, quick: bool) -> Path:
    doc = {
        "name": "drva-scale", "listen": f"127.0.0.1:{port}", "state_dir": str(d / "state"),
        "store": f"file://{d / 'store'}", "status_interval_s": STATUS_INTERVAL_S,
        "log": {"path": str(d / "state" / "replog"), "size": "256MiB" if quick else "1GiB"},
        "meta": {"path": str(d / "state" / "meta")},
        "seal": {"bytes": "16MiB", "age_s": 1.0},
        "domains": [{"id": i, "name": f"dom{i}", "disks": [
            {"vm": f"vm{i}-{j // 3}", "name": f"disk{j}", "size": DISK_BYTES} for j in range(DISKS_PER_DOMAIN)]}
            for i in range(1, domains + 1)],
    }
    path = d / "drva.toml"
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None  # not written yet


class Site:
    """The sending side: one filter per domain over NullDisks, and their workloads."""

    def __init__(self, domains: int, rate_mb_s: float, port: int) -> None:
        buffer_bytes = max(FILTER_BUFFER_BYTES_MIN, FILTER_BUFFER_BYTES_TOTAL // domains)
        sizes = [DISK_BYTES] * DISKS_PER_DOMAIN
        self.filters = [DomainFilter(i, [NullDisk(DISK_BYTES) for _ in sizes], buffer_bytes_max=buffer_bytes)
                        for i in range(1, domains + 1)]
        self.workloads: list[Workload] = [
            make_workload("random", sizes, seed=f.domain, rate_mb_s=rate_mb_s / domains, payload="mixed")
            for f in self.filters]
        hosts = min(HOSTS_MAX, domains)
        self.clients = [FilterClient(self.filters[h::hosts], "127.0.0.1", port, SECRET.encode(), f"host-{h}")
                        for h in range(hosts)]
        self.tasks: list[asyncio.Task] = []

    async def connect(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.tasks = [asyncio.create_task(c.run()) for c in self.clients]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(c.connected for c in self.clients):
            if proc.poll() is not None:
                raise RuntimeError(f"the DRVA exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"filters not connected after {READY_TIMEOUT_S} s: "
                                   f"{[c.last_error for c in self.clients]}")
            await asyncio.sleep(0.05)

    async def drive(self, seconds: float) -> None:
        """Capture what each domain's pacer allows, every TICK_S, for ``seconds``."""
        t_end = time.monotonic() + seconds
        while (now := time.monotonic()) < t_end:
            for f, wl in zip(self.filters, self.workloads):
                for _ in range(BATCHES_PER_TICK_MAX):
                    batch = wl.paced_batch(BATCH_WRITES_MAX, BATCH_BYTES_MAX)
                    if not batch.count:
                        break
                    f.capture(batch.disk, batch.offset, batch.length, batch.kind, batch.payload)
            await asyncio.sleep(max(0.0, TICK_S - (time.monotonic() - now)))

    def captured_bytes(self) -> int:
        return sum(f.stats["bytes"] for f in self.filters)

    def captured_seqs(self) -> dict[int, int]:
        return {f.domain: f.next_seq - 1 for f in self.filters}

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def wait_ready(status_path: Path, domains: int, proc: subprocess.Popen, log_path: Path) -> float:
    """Seconds until every domain's catalog is open (the DRVA's start-up at this scale)."""
    t0 = time.monotonic()
    while True:
        doc = read_status(status_path)
        if doc is not None and len(doc["domains"]) == domains and all(x["catalog_ready"] for x in doc["domains"]):
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"the DRVA exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        if time.monotonic() - t0 > READY_TIMEOUT_S:
            raise TimeoutError(f"catalogs not all open after {READY_TIMEOUT_S} s")
        await asyncio.sleep(0.1)


async def sample_rpo(status_path: Path, pid: int, t0: float, rpo: dict[int, list[float]],
                     series: list[list[float]], rss: list[float], backlog: dict[str, float]) -> None:
    """Each new status document's per-domain RPO lag (and the DRVA's RSS then); in
    ``backlog`` the most segments in flight and entries waiting for a seal seen at once
    (all domains), and the worst upload latency p99 a domain reported: where a lag is."""
    seen = None
    while True:
        await asyncio.sleep(STATUS_INTERVAL_S / 4)
        doc = read_status(status_path)
        if doc is None or doc["time"] == seen:
            continue
        seen = doc["time"]
        lags = [x["rpo_lag_s"] for x in doc["domains"]]
        for x in doc["domains"]:
            rpo[x["id"]].append(x["rpo_lag_s"])
        series.append([round(time.monotonic() - t0, 2), round(float(np.median(lags)), 3), round(max(lags), 3)])
        rss.append(proc_rss_mb(pid))
        for key, field in (("inflight_segments_max", "inflight_segments"),
                           ("unsealed_entries_max", "unsealed_entries")):
            backlog[key] = max(backlog.get(key, 0), sum(x[field] for x in doc["domains"]))
        uploads = [x["upload_latency_p99_s"] for x in doc["domains"] if x["upload_latency_p99_s"] is not None]
        backlog["upload_latency_p99_s_max"] = max([backlog.get("upload_latency_p99_s_max", 0.0), *uploads])


async def drained(status_path: Path, seqs: dict[int, int]) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < DRAIN_TIMEOUT_S:
        doc = read_status(status_path)
        if doc is not None and all(x["committed_seq"] >= seqs[x["id"]] for x in doc["domains"]):
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the DRVA did not commit every captured write within {DRAIN_TIMEOUT_S} s")


async def run_config(d: Path, domains: int, quick: bool, rate: float, seconds: float) -> dict[str, Any]:
    d.mkdir(parents=True)
    port = free_port()
    cfg = drva_toml(d, port, domains, quick)
    log_path = d / "drva.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "drva.daemon", "--config", str(cfg), "--log-level", "warning"],
                                cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": SECRET},
                                stdout=log_file, stderr=log_file)
    status_path = d / "state" / "status.json"
    warmup = WARMUP_S_QUICK if quick else WARMUP_S
    site = Site(domains, rate, port)
    load_start = round(os.getloadavg()[0], 2)  # the machine is shared: the load says how much
    try:
        ready_s = await wait_ready(status_path, domains, proc, log_path)
        await site.connect(proc, log_path)
        await site.drive(warmup)
        rpo: dict[int, list[float]] = {f.domain: [] for f in site.filters}
        series: list[list[float]] = []
        rss: list[float] = []
        backlog: dict[str, float] = {}
        cpu0, bytes0, t0 = proc_cpu_s(proc.pid), site.captured_bytes(), time.monotonic()
        sampler = asyncio.create_task(sample_rpo(status_path, proc.pid, t0, rpo, series, rss, backlog))
        try:
            await site.drive(seconds)
            cpu1, bytes1, t1 = proc_cpu_s(proc.pid), site.captured_bytes(), time.monotonic()
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        drain_s = await drained(status_path, site.captured_seqs())
        # The kernel's high-water mark, or a sample above it: RSS counters are summed
        # lazily per CPU, so a sample may read a few pages above a later VmHWM.
        rss_max = max([proc_rss_mb(proc.pid, "VmHWM"), *rss])
        bitmap = sum(1 for f in site.filters if f.stats["bitmap_entries"] or f.mode != "normal")
    finally:
        await site.close()
        stop_process(proc)
    gb = (bytes1 - bytes0) / 1e9
    p99 = [float(np.percentile(v, 99)) for v in rpo.values() if v]
    everything = [x for v in rpo.values() for x in v]
    return {
        "domains": domains, "disks": domains * DISKS_PER_DOMAIN, "hosts": len(site.clients),
        "rate_mb_s_target": rate, "mb_per_s": round((bytes1 - bytes0) / (t1 - t0) / 1e6, 1),
        "seconds": round(t1 - t0, 1), "ready_s": round(ready_s, 2),
        "cpu_s_per_gb": round((cpu1 - cpu0) / gb, 2) if gb else None,
        "drva_cpu_share": round((cpu1 - cpu0) / (t1 - t0), 3),
        "rss_mb_max": round(rss_max, 1), "rss_mb_end": round(rss[-1], 1) if rss else None,
        "rpo_p99_s_max": round(max(p99), 3) if p99 else None,
        "rpo_p99_s_median": round(float(np.median(p99)), 3) if p99 else None,
        "rpo_p50_s": round(float(np.percentile(everything, 50)), 3) if everything else None,
        "rpo_samples": len(series), "bitmap_domains": bitmap, "drain_s": round(drain_s, 2), **backlog,
        "load_1m_start": load_start, "load_1m_end": round(os.getloadavg()[0], 2),
        "rpo_series": series,
    }


async def bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    configs = [int(x) for x in args.domains.split(",")] if args.domains else (CONFIGS_QUICK if quick else CONFIGS)
    rate = args.rate_mb_s or (RATE_MB_S_QUICK if quick else RATE_MB_S)
    seconds = args.seconds or (SECONDS_QUICK if quick else SECONDS)
    out = []
    bar = progress(len(configs), "configurations", unit="config")
    for n in configs:
        out.append(await run_config(root / f"domains-{n}", n, quick, rate, seconds))
        bar.update(1)
    bar.close()
    top = out[-1]
    series = top["rpo_series"]
    for c in out:
        del c["rpo_series"]
    return {
        "benchmark": "scale", "quick": quick, "machine": machine(root),
        "configs": out, "domains_max": top["domains"], "disks_max": top["disks"],
        "rss_mb_max": top["rss_mb_max"], "rpo_p99_s_max": top["rpo_p99_s_max"],
        "cpu_s_per_gb": top["cpu_s_per_gb"], "mb_per_s": top["mb_per_s"],
        "rpo_series": series,
        "targets_met": (not quick and top["domains"] >= 100 and top["rss_mb_max"] <= 512
                        and top["rpo_p99_s_max"] is not None and top["rpo_p99_s_max"] <= 2),
    }


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domains", default=None, help="configurations to run, e.g. 100 or 1,10,100 "
                                                   "(default: 1,10,100; --quick: 1,10)")
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per configuration")
    p.add_argument("--rate-mb-s", type=float, default=None, help="aggregate MB/s of the load")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], options)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the DRVA is stopped on the way out
    with work_dir(args) as d:
        result = asyncio.run(bench(Path(d), args))
    m = result["machine"]
    table = [("machine", f"{m['cores']} cores ({m['cpu']}), {m['fs_type']} on {m['disk']}, load {m['load_1m']}"),
             ("domains / disks", "MB/s | DRVA CPU s/GB | RSS max MiB | RPO p99 worst / median domain s | "
                                 "bitmap domains | drain s")]
    for c in result["configs"]:
        table.append((f"{c['domains']} / {c['disks']}",
                      f"{c['mb_per_s']} | {c['cpu_s_per_gb']} | {c['rss_mb_max']} | {c['rpo_p99_s_max']} / "
                      f"{c['rpo_p99_s_median']} | {c['bitmap_domains']} | {c['drain_s']}"))
    table.append(("targets (100 domains: RSS <= 512 MiB, RPO p99 <= 2 s)",
                  "met" if result["targets_met"] else "not met"))
    emit(args, result, table)


if __name__ == "__main__":
    main()
