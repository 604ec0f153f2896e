"""``cdp demo``: the whole cycle on the embedded default, in a temporary directory.

What it runs, as a user would (only the simulated hosts run inside this process):

1. A site in the directory: a simulated cluster (``cluster.toml``: one ESXi host pair, two
   VMs, three disks in protection domain ``erp``), a site file (``site.toml``: a file
   object store, one DRVA with its log partition in a local file, free ports), random
   secrets in the environment.
2. ``install`` (partitions, DRVA configuration, deployment record), then ``cdp daemon``
   as its own process: it starts and supervises the DRVA.
3. The simulated hosts write a database-like workload into the primary disk images and
   stream every write to the DRVA; half way, a mark is asked for through the daemon's
   REST API (``POST /v1/domains/erp/marks``), the way ``cdp mark`` does; the RPO lag is
   sampled from ``GET /v1/status`` meanwhile.
4. The writes drain (every one acked) and reach the store's catalog; the daemon stops.
5. From the store alone, ``rocva`` recovers the disks at the mark and at the latest point,
   and their sha256 are compared with the primaries' at those points (the mark's taken
   by the simulated host at the very moment it inserted the mark).

``"verified": true`` only when every recovered image matched.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp import site_files
from cdp.catalog import load_catalog
from cdp.errors import CdpError
from cdp.msa.client import MsaClient
from cdp.msa.config import load_site_config
from cdp.msa.install import install
from cdp.ports import free_ports
from cdp.store import open_store
from iofilter_sim.cluster import load_cluster
from iofilter_sim.runner import ClusterRunner
from rocva import RecoverOptions, Target, recover

DOMAIN, DOMAIN_ID, MARK_NAME = "erp", 1, "demo-mark"
RATE_MB_S = 64.0  # the workload's pace: well inside what one DRVA takes here
WRITE_S_MIN = 2.0
DAEMON_START_S = 30.0
COMMIT_WAIT_S = 60.0
STATUS_EVERY_S = 0.25


@dataclass
class DemoOptions:
    workdir: Path | None = None
    disk_size: int = 64 << 20
    writes_bytes: int = 256 * 10**6
    show_progress: bool = False
    seed: int = 1


def _write_site(root: Path, opts: DemoOptions, rate_mb_s: float) -> Path:
    # Outside the ephemeral range (cdp.ports): the filter starts reconnecting before the
    # DRVA listens, and one of its source ports could otherwise be the DRVA's.
    drva_port, api_port = free_ports(2)
    size = opts.disk_size
    drva_at = f"127.0.0.1:{drva_port}"
    workload = {"kind": "database", "log_disk": 1, "rate_mb_s": round(rate_mb_s, 3), "payload": "mixed",
                "seed": opts.seed}
    inventory = site_files.inventory(
        "demo", ["esx-01", "esx-02"],
        [site_files.vm("erp-db", "esx-01", [("data", size), ("log", size)]),
         site_files.vm("erp-app", "esx-02", [("disk0", size)])],
        [site_files.domain(DOMAIN, DOMAIN_ID, drva_at, ["erp-db", "erp-app"], workload)],
        state_dir="sim-state")
    site = site_files.site(
        "demo", state_dir="msa", api_listen=f"127.0.0.1:{api_port}",
        drvas=[site_files.drva("drva-1", drva_at, log_path="msa/drva-1.replog", log_size="256MiB",
                               meta_path="msa/drva-1.meta")],
        defaults={"consolidate_every": "1h"},  # not during the demo
        protect=[DOMAIN])
    return site_files.write_site(root, site, inventory)


async def run_demo(opts: DemoOptions) -> dict[str, Any]:
    root = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="cdp-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    # Secrets for this run only, handed to the daemon (and its DRVA) through the environment.
    env = {**os.environ, "CDP_SITE_SECRET": secrets.token_hex(16), "CDP_API_TOKEN": secrets.token_hex(16)}
    try:
        return await _run(opts, root, env)
    finally:
        if opts.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _say(opts: DemoOptions, text: str) -> None:
    if opts.show_progress:
        print(f"demo: {text}", file=sys.stderr, flush=True)


async def _run(opts: DemoOptions, root: Path, env: dict[str, str]) -> dict[str, Any]:
    t_start = time.monotonic()
    write_s = max(WRITE_S_MIN, opts.writes_bytes / (RATE_MB_S * 1e6))
    rate = opts.writes_bytes / 1e6 / write_s
    cfg = load_site_config(_write_site(root, opts, rate))
    _say(opts, f"site in {root}; installing")
    await install(cfg, env)
    daemon = subprocess.Popen([sys.executable, "-m", "cdp.cli", "daemon", "--config", str(cfg.path)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(root / "daemon.log", "ab"))
    try:
        async with MsaClient(cfg, env) as client:
            await _wait_daemon(client, daemon, root)
            _say(opts, f"daemon up; writing {opts.writes_bytes / 1e6:.0f} MB at {rate:.0f} MB/s")
            runner = ClusterRunner(load_cluster(cfg.cluster_path), cfg.secret(env))
            tasks: list[asyncio.Task] = []
            try:
                await runner.start()
                lags: list[float] = []
                tasks.append(sampler := asyncio.create_task(_sample_lag(client, lags)))
                tasks.append(work := asyncio.create_task(runner.run(None)))
                await asyncio.sleep(write_s / 2)
                job = await client.post(f"/v1/domains/{DOMAIN}/marks", {"name": MARK_NAME}, wait=True)
                if job.get("state") != "succeeded":
                    raise CdpError(f"demo: the mark job {job.get('id')} {job.get('state')}: {job.get('error')}")
                # The second half is timed from the mark, not from the start: on a loaded
                # machine the mark's job can take most of the run, and a mark after the
                # last write would show nothing of recovering to a point in the middle.
                await asyncio.sleep(write_s / 2)
                runner.stop()
                await work
                write_elapsed = time.monotonic() - runner.started
                _say(opts, "draining")
                if not await runner.drain(COMMIT_WAIT_S):
                    raise CdpError(f"demo: the filter did not drain in {COMMIT_WAIT_S:.0f} s (see {root}/msa/logs)")
                captured = runner.filters[DOMAIN].next_seq - 1
                state = await _wait_committed(cfg.store_url, captured)
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
                summary = runner.summary()
            finally:
                # On an error too: tasks left pending would only be cancelled by
                # asyncio.run's shutdown, after the daemon is gone, with the clients open.
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await runner.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(5)
    dom = summary["domains"][DOMAIN]
    mark = next(m for m in runner.marks if m["name"] == MARK_NAME)
    _say(opts, "recovering at the mark and at the latest point from the store alone")
    store = open_store(cfg.store_url)
    try:
        t0 = time.monotonic()
        at_mark = await recover(store, DOMAIN_ID,
                                RecoverOptions(Target.mark(MARK_NAME), root / "recovered-mark", checksum=True))
        mark_s = time.monotonic() - t0
        t0 = time.monotonic()
        latest = await recover(store, DOMAIN_ID,
                               RecoverOptions(Target.latest(), root / "recovered-latest", checksum=True))
        latest_s = time.monotonic() - t0
    finally:
        await store.close()
    ok_mark = at_mark["seq"] == mark["seq"] and [i["sha256"] for i in at_mark["images"]] == mark["sha256"]
    ok_latest = latest["seq"] == captured and [i["sha256"] for i in latest["images"]] == dom["sha256"]
    disk_bytes = sum(i["size"] for i in latest["images"])
    store_bytes = sum(p.stat().st_size for p in (root / "store").rglob("*") if p.is_file())
    return {
        "dir": str(root), "disks": len(latest["images"]), "disk_bytes": opts.disk_size,
        "writes": dom["writes"], "written_mb": round(dom["bytes"] / 1e6, 1),
        "ingest_mb_per_s": round(dom["bytes"] / 1e6 / write_elapsed, 1),
        "rpo_lag_p50_s": round(statistics.median(lags), 3) if lags else None,
        "rpo_lag_max_s": round(max(lags), 3) if lags else None,
        "mark_seq": mark["seq"], "committed_seq": state.timeline().committed_seq,
        "segments": state.timeline().segments,
        "stored_mb": round(store_bytes / 1e6, 1),
        "compression_ratio": round(dom["bytes"] / store_bytes, 2) if store_bytes else None,
        "recover_mark_s": round(mark_s, 3), "recover_latest_s": round(latest_s, 3),
        "recover_latest_mb_per_s": round(disk_bytes / 1e6 / latest_s, 1),
        "verified_mark": ok_mark, "verified_latest": ok_latest, "verified": ok_mark and ok_latest,
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }


async def _wait_daemon(client: MsaClient, daemon: subprocess.Popen, root: Path) -> None:
    deadline = time.monotonic() + DAEMON_START_S
    while True:
        if daemon.poll() is not None:
            raise CdpError(f"demo: the daemon exited with {daemon.returncode}; see {root / 'daemon.log'}")
        try:
            status = await client.get("/v1/status")
            if all(d.get("up") for d in status["drvas"] if d.get("domains")):
                return
        except CdpError:
            pass
        if time.monotonic() > deadline:
            raise CdpError(f"demo: the daemon or its DRVA did not come up in {DAEMON_START_S:.0f} s; "
                           f"see {root / 'daemon.log'} and {root / 'msa' / 'logs'}")
        await asyncio.sleep(0.1)


async def _sample_lag(client: MsaClient, lags: list[float]) -> None:
    while True:
        try:
            status = await client.get("/v1/status")
            for d in status["domains"]:
                if d.get("status") and d["status"].get("rpo_lag_s") is not None:
                    lags.append(float(d["status"]["rpo_lag_s"]))
        except CdpError:
            pass
        await asyncio.sleep(STATUS_EVERY_S)


async def _wait_committed(store_url: str, seq: int):
    store = open_store(store_url)
    try:
        deadline = time.monotonic() + COMMIT_WAIT_S
        while True:
            state, _ = await load_catalog(store, DOMAIN_ID)
            if state is not None and state.timeline().committed_seq >= seq:
                return state
            if time.monotonic() > deadline:
                got = state.timeline().committed_seq if state else 0
                raise CdpError(f"demo: the store's catalog holds seq {got} after {COMMIT_WAIT_S:.0f} s, "
                               f"the filter captured {seq}")
            await asyncio.sleep(0.1)
    finally:
        await store.close()


def format_summary(r: dict[str, Any]) -> str:
    lag = "-" if r["rpo_lag_p50_s"] is None else f"p50 {r['rpo_lag_p50_s']} s, max {r['rpo_lag_max_s']} s"
    rows = [
        ("disks", f"{r['disks']} x {r['disk_bytes'] >> 20} MiB"),
        ("writes captured", f"{r['writes']:,} ({r['written_mb']:,} MB)"),
        ("ingest (filter -> DRVA -> store)", f"{r['ingest_mb_per_s']:,} MB/s"),
        ("RPO lag", lag),
        ("segments", f"{r['segments']} ({r['stored_mb']} MB stored, {r['compression_ratio']}:1)"),
        (f"recover at mark (seq {r['mark_seq']})", f"{r['recover_mark_s']} s, "
                                                  + ("sha256 OK" if r["verified_mark"] else "MISMATCH")),
        ("recover latest", f"{r['recover_latest_s']} s ({r['recover_latest_mb_per_s']:,} MB/s), "
                           + ("sha256 OK" if r["verified_latest"] else "MISMATCH")),
        ("total", f"{r['elapsed_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("verified" if r["verified"] else "NOT VERIFIED")
    return "\n".join(lines)
