"""End to end (issue acceptance): 2 DRVAs, 3 domains, 5 VMs, mixed workloads for 20 s,
driven by the ``iofilter-sim`` command. After the drain every segment decodes, seq
ranges have no gap or overlap, and replaying the store gives the primaries, at a mark
and at the end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdp import site_files
from cdp.replay import replay_reference
from cdp.store.fs import FileStore
from iofilter_sim.cluster import load_cluster
from tests.drva.harness import (
    ROOT, SECRET, DrvaProcess, check_store, domain_doc, drva_doc, free_port, sha256_file,
)
from tests.drva.test_crash import wait_until_committed

DURATION_S = 20
# After the workload: drain and summary (seconds), bounded for a hang.
DRAIN_S = 120.0

def inventory(state: Path, p1: int, p2: int) -> dict:
    """Five VMs in three domains on two DRVAs, each domain with its own kind of workload."""
    v = site_files.vm
    return site_files.inventory(
        "site-a", ["esx-01", "esx-02"],
        [v("erp-db", "esx-01", [("data", "32MiB"), ("log", "16MiB")]), v("erp-app", "esx-02", [("disk0", "32MiB")]),
         v("web-1", "esx-01", [("disk0", "32MiB")]), v("web-2", "esx-02", [("disk0", "32MiB")]),
         v("files", "esx-02", [("disk0", "32MiB"), ("disk1", "32MiB")])],
        [site_files.domain("erp", 1, f"127.0.0.1:{p1}", ["erp-db", "erp-app"],
                           {"kind": "database", "log_disk": 1, "rate_mb_s": 4, "payload": "mixed"}),
         site_files.domain("web", 2, f"127.0.0.1:{p1}", ["web-1", "web-2"],
                           {"kind": "zipf", "rate_mb_s": 3, "write_size": {"4KiB": 6, "64KiB": 3, "1MiB": 1}}),
         site_files.domain("files", 3, f"127.0.0.1:{p2}", ["files"],
                           {"kind": "burst", "rate_mb_s": 10, "on_s": 1.0, "off_s": 2.0})],
        state_dir=state)


@pytest.mark.slow
async def test_two_drvas_three_domains_five_vms(tmp_path):
    p1, p2 = free_port(), free_port()
    cluster_path = site_files.write_inventory(tmp_path / "cluster.toml", inventory(tmp_path / "disks", p1, p2))
    cluster = load_cluster(cluster_path)
    drvas = []
    for name, port in (("drva-1", p1), ("drva-2", p2)):
        doms = [domain_doc(d.id, d.name, [(x.vm.name, x.disk.name, x.disk.size) for x in d.disks])
                for d in cluster.domains if d.drva.port == port]
        drvas.append(DrvaProcess(drva_doc(tmp_path, name, doms, port=port, log_size="128MiB",
                                          seal_bytes="4MiB", seal_age_s=1.0), tmp_path))
    for d in drvas:
        d.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iofilter_sim", "run", str(cluster_path), "--duration", str(DURATION_S),
            "--mark", "8:mid-run", "--json", cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": SECRET},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        async with asyncio.timeout(DURATION_S + DRAIN_S):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        summary = json.loads(out.decode().splitlines()[-1])
        store = FileStore(tmp_path / "store")
        for d in cluster.domains:
            await wait_until_committed(store, d.id, summary["domains"][d.name]["captured_seq"])
    finally:
        for d in drvas:
            d.stop()
    assert summary["drained"] is True
    assert len(summary["marks"]) == 3
    total = 0
    for d in cluster.domains:
        s = summary["domains"][d.name]
        total += s["bytes"]
        assert s["writes"] > 100, f"domain {d.name} barely wrote"
        await check_store(store, d.id, s["sha256"], tmp_path)
        mark = next(m for m in summary["marks"] if m["domain"] == d.name)
        paths, _ = await replay_reference(store, d.id, tmp_path / f"mark-{d.name}", mark["seq"])
        assert [sha256_file(p) for p in paths] == mark["sha256"]
    assert total > 50e6

