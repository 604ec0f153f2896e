"""Optional TLS on the filter stream, and ``iofilter-sim run --trace`` against a DRVA."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys

import numpy as np

from cdp.store.fs import FileStore
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (
    ROOT, SECRET, Disk, DrvaProcess, check_store, config, domain_doc, drva_doc, free_port,
    random_writes,
)
from tests.drva.test_crash import wait_until_committed
from tests.waiting import EVENTUALLY_S, wait_until

# The replay itself takes well under a second; the process also starts, connects and drains.
SIM_EXIT_S = 120.0


def self_signed(tmp_path):
    cert, key = tmp_path / "drva.crt", tmp_path / "drva.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_tls_stream(tmp_path):
    cert, key = self_signed(tmp_path)
    doc = drva_doc(tmp_path, "drva-tls", [domain_doc(1, "erp", [("vm1", "d0", 8 << 20)])],
                   tls={"cert": str(cert), "key": str(key)})
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    ctx = ssl.create_default_context(cafile=str(cert))
    disk = Disk(tmp_path / "p.img", 8 << 20)
    f = DomainFilter(1, [disk])
    client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1", tls=ctx)
    task = asyncio.create_task(client.run())
    f.capture(*random_writes(np.random.default_rng(1), [8 << 20], 64, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "acks over TLS")
    # A plain-TCP client cannot talk to the TLS listener.
    plain = FilterClient([DomainFilter(1, [disk])], "127.0.0.1", d.port, SECRET.encode(), "host-2")
    ptask = asyncio.create_task(plain.run())
    await wait_until(lambda: plain.last_error is not None, EVENTUALLY_S, "the plain client's first attempt to fail")
    assert plain.connections == 0, plain.last_error
    for t in (task, ptask):
        t.cancel()
    await asyncio.gather(task, ptask, return_exceptions=True)
    await d.stop()


async def test_iofilter_sim_replays_an_msr_trace(tmp_path):
    port = free_port()
    drva = DrvaProcess(drva_doc(tmp_path, "drva-tr", [domain_doc(1, "erp", [("vm", "d0", 16 << 20),
                                                                            ("vm", "d1", 16 << 20)])],
                                port=port), tmp_path)
    drva.start()
    lines = ["Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime"]
    rng = np.random.default_rng(3)
    t = 128166372000000000
    for i in range(400):
        t += int(rng.integers(1, 10000))
        kind = "Write" if i % 4 else "Read"
        lines.append(f"{t},src{i % 2},0,{kind},{int(rng.integers(0, 1 << 34))},{int(rng.integers(1, 64)) * 512 + i % 7},100")
    (tmp_path / "trace.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "cluster.toml").write_text(f"""
site = "s"
state_dir = "{tmp_path / 'disks'}"
[[hosts]]
name = "h"
[[vms]]
name = "vm"
host = "h"
disks = [{{ name = "d0", size = "16MiB" }}, {{ name = "d1", size = "16MiB" }}]
[[domains]]
name = "erp"
id = 1
drva = "127.0.0.1:{port}"
vms = ["vm"]
""")
    try:
        r = subprocess.run([sys.executable, "-m", "iofilter_sim", "run", str(tmp_path / "cluster.toml"),
                            "--trace", str(tmp_path / "trace.csv"), "--duration", "3", "--json"],
                           cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": SECRET},
                           capture_output=True, text=True, timeout=SIM_EXIT_S)
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads(r.stdout.splitlines()[-1])
        dom = summary["domains"]["erp"]
        assert dom["writes"] == 300  # the reads are not replayed
        store = FileStore(tmp_path / "store")
        await wait_until_committed(store, 1, dom["captured_seq"])
    finally:
        drva.stop()
    await check_store(store, 1, dom["sha256"], tmp_path)
