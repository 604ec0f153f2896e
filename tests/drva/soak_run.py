"""The catalog soak of ``test_catalog_soak.py``, run in a process of its own.

It lasts a fixed wall-clock time (``CDP_SOAK_S``, 60 s in CI) and keeps a core mostly
idle, so the test session starts it when it collects the soak test (``tests/conftest.py``)
and the test, ordered last, only waits for its report: the minute runs beside the rest of
the suite instead of after it. ``python -m tests.drva.soak_run REPORT DIR`` starts a moto
server of its own, runs the soak in ``DIR`` and writes the report (JSON) to ``REPORT``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

SOAK_S = float(os.environ.get("CDP_SOAK_S", "60"))
SEAL_S = float(os.environ.get("CDP_SOAK_SEAL_S", "0.25"))
LOST_REPLY_RATE = 0.2
PROBE_EVERY_S = 5.0
DISK = 8 << 20
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}
DRAIN_S = 60.0
ROOT = Path(__file__).resolve().parents[2]


async def soak(tmp_path: Path, endpoint: str) -> dict[str, Any]:
    """Run the soak against the S3 server at ``endpoint``; its report."""
    import drva.lanes
    from cdp.catalog import list_generations, load_catalog
    from cdp.store.faulty import FaultyStore
    from cdp.store.open import open_store
    from drva.daemon import Drva
    from iofilter_sim.client import FilterClient
    from iofilter_sim.filter import DomainFilter
    from tests.drva.harness import (
        SECRET, Disk, check_store, config, domain_doc, drva_doc, random_writes, wait_until,
    )

    os.environ.update(CREDS)
    bucket = f"soak-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/site-a?endpoint={endpoint}&region=us-east-1"
    admin = open_store(url)
    await admin.create_bucket()
    faulty: list[FaultyStore] = []

    def lossy_store(store_url: str) -> FaultyStore:
        # Lost replies above the S3 store: the put lands in moto, the DRVA hears an
        # error, and its next commit meets its own generation.
        store = FaultyStore(open_store(store_url), seed=7)
        store.set_error_rate("put", LOST_REPLY_RATE, after=True, match="/cat/")
        faulty.append(store)
        return store

    drva.lanes.open_store = lossy_store  # every store the DRVA opens (drva.lanes.open_lanes)
    doc = drva_doc(tmp_path, "drva-soak", [domain_doc(1, "erp", [("vm1", "d0", DISK)])], store=url,
                   seal_bytes="1MiB", seal_age_s=SEAL_S)
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    disk = Disk(tmp_path / "erp0.img", DISK)
    filt = DomainFilter(1, [disk])
    client = FilterClient([filt], "127.0.0.1", d.port, SECRET.encode(), "host-1")
    client_task = asyncio.create_task(client.run())
    probes: list[dict] = []
    try:
        rng = np.random.default_rng(3)
        t0 = next_probe = time.monotonic()
        while time.monotonic() - t0 < SOAK_S:
            filt.capture(*random_writes(rng, [DISK], 4, 16))
            if time.monotonic() >= next_probe:
                next_probe += PROBE_EVERY_S
                stats: dict = {}
                l0 = time.perf_counter()
                state, generation = await load_catalog(admin, 1, stats=stats)
                probes.append({"t_s": round(time.monotonic() - t0, 1), "load_s": time.perf_counter() - l0,
                               "generation": generation, "listed": stats["objects_listed"],
                               "read": stats.get("objects_read", 0),
                               "segments": state.timeline().segments if state else 0})
            await asyncio.sleep(0.05)
        await wait_until(lambda: d.domains[1].committed_seq == filt.next_seq - 1, DRAIN_S, "the drain")
        status = d.status()
    finally:
        client_task.cancel()
        await asyncio.gather(client_task, return_exceptions=True)
        await d.stop()
    result = await check_store(admin, 1, [disk.sha256()], tmp_path)  # every write reached the store
    generations = await list_generations(admin, 1)
    await admin.close()
    # A load reads the newest snapshot and the deltas after it (0..63): its cost is a
    # sawtooth with a period of 64 generations; compare the worst of the first and last thirds.
    third = max(1, len(probes) // 3)
    first, last = probes[:third], probes[-third:]
    return {"soak_s": SOAK_S, "seal_s": SEAL_S, "failure": repr(d.failure) if d.failure else None,
            "fenced": status["domains"][0]["fenced"],
            "lost_replies": faulty[0].injected["put"],  # each a generation that landed while the DRVA heard an error
            "generation": probes[-1]["generation"], "generations_stored": len(generations),
            "segments": result["segments"], "listed_max": max(p["listed"] for p in probes),
            "read_max": max(p["read"] for p in probes),
            "load_ms_first": round(max(p["load_s"] for p in first) * 1e3, 1),
            "load_ms_last": round(max(p["load_s"] for p in last) * 1e3, 1),
            "load_ms_median": round(statistics.median(p["load_s"] for p in probes) * 1e3, 1)}


class Background:
    """The soak running in a child process (``start``), and its report (``report``)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cdp-soak-"))
        self.report_path = self.dir / "report.json"
        self.log_path = self.dir / "soak.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.drva.soak_run", str(self.report_path),
                                          str(self.dir / "work")], cwd=ROOT, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

    def report(self, timeout_s: float) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the soak did not end within {timeout_s:g} s\n{self.log_tail()}") from None
        if code != 0 or not self.report_path.exists():
            raise AssertionError(f"the soak exited {code}\n{self.log_tail()}")
        return json.loads(self.report_path.read_text())

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    from tests.services import MotoServer

    report_path, work = Path(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    server = MotoServer()
    server.start()
    try:
        report = asyncio.run(soak(work, server.endpoint))
    finally:
        server.stop()
    tmp = report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, report_path)


if __name__ == "__main__":
    main()
