"""A DRVA serving a certificate of the site CA (``cdp.pki``) to filters that trust that CA
only (``cdp.tls``, ``iofilter-sim run --tls-ca``, the cluster file's ``[tls] ca``): a
plain filter and a filter trusting another CA are refused, each with an error that says
why, and the DRVA (a real process) goes on to serve the next good session."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import numpy as np

from cdp import site_files
from cdp.pki import LeafSpec, TlsFiles, ensure_site_pki, server_names
from cdp.store.fs import FileStore
from cdp.tls import client_context
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (
    ROOT, SECRET, Disk, DrvaProcess, check_store, domain_doc, drva_doc, free_port, random_writes,
)
from tests.drva.test_crash import wait_until_committed
from tests.waiting import EVENTUALLY_S, wait_until, wait_until_sync

SIM_EXIT_S = 120.0
DISK = 4 << 20


def _pki(tmp_path):
    site, other = TlsFiles(tmp_path / "tls"), TlsFiles(tmp_path / "other-tls")
    leaf = LeafSpec("drva-tls", "drva-tls", server_names("127.0.0.1", extra=("drva-tls",)))
    ensure_site_pki(site, "site-a", [leaf])
    ensure_site_pki(other, "site-z", [leaf])  # same names, another CA
    return site, other


def _cluster(tmp_path, name: str, port: int, tls: dict | None) -> str:
    doc = site_files.inventory(
        "site-a", ["h"], [site_files.vm("vm", "h", [("d0", DISK)])],
        [site_files.domain("erp", 1, f"127.0.0.1:{port}", ["vm"], {"kind": "random", "rate_mb_s": 2})],
        state_dir=tmp_path / "disks", tls=tls)
    path = tmp_path / name
    site_files.write_inventory(path, doc)
    return str(path)


async def test_a_tls_drva_refuses_plain_and_foreign_filters_and_serves_the_next(tmp_path):
    site, other = _pki(tmp_path)
    port = free_port()
    drva = DrvaProcess(drva_doc(tmp_path, "drva-tls", [domain_doc(1, "erp", [("vm", "d0", DISK)])], port=port,
                                tls={"cert": str(site.cert("drva-tls")), "key": str(site.key("drva-tls"))}),
                       tmp_path)
    drva.start()
    disk = Disk(tmp_path / "in-process.img", DISK)
    clients = []
    try:
        # A plain filter: the DRVA closes on it before a CHALLENGE; the error says what to do.
        plain = FilterClient([DomainFilter(1, [disk])], "127.0.0.1", port, SECRET.encode(), "plain")
        # A filter that trusts another CA: refused by the filter itself, saying so.
        foreign = FilterClient([DomainFilter(1, [disk])], "127.0.0.1", port, SECRET.encode(), "foreign",
                               tls=client_context(other.ca_cert))
        # A filter that dials a name the certificate does not hold.
        misnamed = FilterClient([DomainFilter(1, [disk])], "127.0.0.1", port, SECRET.encode(), "misnamed",
                                tls=client_context(site.ca_cert), server_name="elsewhere.example")
        clients = [asyncio.create_task(c.run()) for c in (plain, foreign, misnamed)]
        await wait_until(lambda: all(c.last_error for c in (plain, foreign, misnamed)), EVENTUALLY_S,
                         "every bad client to fail once")
        assert plain.connections == foreign.connections == misnamed.connections == 0
        assert "closed the connection before its CHALLENGE" in plain.last_error, plain.last_error
        assert "--tls-ca" in plain.last_error
        assert "is not signed by the CA 'cdp site CA site-z'" in foreign.last_error, foreign.last_error
        assert "not for the name dialled" in misnamed.last_error, misnamed.last_error
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        clients = []
        assert drva.proc.poll() is None, "a refused handshake took the DRVA down"

        # The cluster file trusting another CA: iofilter-sim keeps refusing the DRVA and
        # says why; it is stopped by hand (it never falls back to plain TCP).
        err, out_path = tmp_path / "sim-other.err", tmp_path / "sim-other.out"
        with open(err, "wb") as out, open(out_path, "wb") as stdout:
            sim = subprocess.Popen(
                [sys.executable, "-m", "iofilter_sim", "run",
                 _cluster(tmp_path, "cluster-other.toml", port, {"ca": other.ca_cert}), "--json"],
                cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": SECRET, "CDP_LOG_LEVEL": "warning"},
                stdout=stdout, stderr=out)
        try:
            wait_until_sync(lambda: "not signed by the CA 'cdp site CA site-z'" in err.read_text(), EVENTUALLY_S,
                            "iofilter-sim to say why it refuses the DRVA")
            assert "filter_tls_refused" in err.read_text()
        finally:
            sim.send_signal(signal.SIGTERM)
            try:
                # The second signal once the first is handled (it says so): two at once may count as one.
                wait_until_sync(lambda: "iofilter-sim: stopping" in err.read_text() or sim.poll() is not None,
                                EVENTUALLY_S, "iofilter-sim to begin its drain")
            finally:
                sim.send_signal(signal.SIGTERM)  # the second one gives the drain up
                sim.wait(SIM_EXIT_S)
        assert json.loads(out_path.read_text().splitlines()[-1])["domains"]["erp"]["acked_seq"] == 0

        # The next good session: iofilter-sim with --tls-ca streams, is acked, drains.
        r = subprocess.run([sys.executable, "-m", "iofilter_sim", "run", _cluster(tmp_path, "cluster.toml", port, None),
                            "--tls-ca", str(site.ca_cert), "--tls-server-name", "drva-tls",
                            "--duration", "1", "--json"],
                           cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": SECRET},
                           capture_output=True, text=True, timeout=SIM_EXIT_S)
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads(r.stdout.splitlines()[-1])
        dom = summary["domains"]["erp"]
        assert summary["drained"] and dom["writes"] > 0 and dom["acked_seq"] == dom["captured_seq"]
        store = FileStore(tmp_path / "store")
        await wait_until_committed(store, 1, dom["captured_seq"])
        assert drva.proc.poll() is None
    finally:
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        drva.stop()
    await check_store(store, 1, dom["sha256"], tmp_path)


async def test_an_in_process_filter_streams_over_tls_with_the_site_ca(tmp_path):
    """The library path (``FilterClient(tls=client_context(ca))``) that the runner uses."""
    from drva.daemon import Drva
    from tests.drva.harness import config

    site, _ = _pki(tmp_path)
    doc = drva_doc(tmp_path, "drva-tls", [domain_doc(1, "erp", [("vm", "d0", DISK)])],
                   tls={"cert": str(site.cert("drva-tls")), "key": str(site.key("drva-tls"))})
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    try:
        f = DomainFilter(1, [Disk(tmp_path / "p.img", DISK)])
        client = FilterClient([f], "localhost", d.port, SECRET.encode(), "h", tls=client_context(site.ca_cert))
        task = asyncio.create_task(client.run())
        f.capture(*random_writes(np.random.default_rng(2), [DISK], 32, 16))
        await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "acks over TLS (dialled as localhost)")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await d.stop()
