"""A protected site whose disks are NBD exports: an in-process DRVA on a file store and a
``ClusterRunner`` serving domain ``erp`` (VMs ``db`` with disks ``data`` and ``log``)
over TCP and a Unix socket, in the test's own event loop — so real clients run as
subprocesses of it (``tests.nbd.conftest.run_tool``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp import site_files
from cdp.store.fs import FileStore
from iofilter_sim.cluster import load_cluster
from iofilter_sim.nbd_site import NbdListen
from iofilter_sim.runner import ClusterRunner, RunOptions
from tests.drva.harness import ROOT, SECRET, config, domain_doc, drva_doc, running_drva
from tests.drva.test_crash import wait_until_committed
from tests.nbd.conftest import run_process

MiB = 1 << 20
DOMAIN_ID = 7
DISKS = {"db/data": 16 * MiB, "db/log": 4 * MiB}


def inventory(state: Path, drva_port: int) -> dict[str, Any]:
    return site_files.inventory(
        "site-a", ["esx-01"],
        [site_files.vm("db", "esx-01", [(name.split("/")[1], size) for name, size in DISKS.items()])],
        [site_files.domain("erp", DOMAIN_ID, f"127.0.0.1:{drva_port}", ["db"], None)], state_dir=state)


def drva_config(tmp: Path, port: int = 0, **options: Any):
    doms = [domain_doc(DOMAIN_ID, "erp", [(n.split("/")[0], n.split("/")[1], s) for n, s in DISKS.items()])]
    return config(drva_doc(tmp, "drva-1", doms, port=port, seal_bytes="1MiB", seal_age_s=0.2, **options))


@dataclass
class Site:
    runner: ClusterRunner
    tcp: str
    unix: str
    store: FileStore
    tmp: Path

    def uri(self, name: str = "db/data", transport: str = "tcp") -> str:
        if transport == "tcp":
            return f"nbd://{self.tcp}/{name}"
        return f"nbd+unix:///{name}?socket={self.unix}"

    @property
    def filt(self):
        return self.runner.filters["erp"]

    def image(self, name: str) -> Path:
        return self.runner.cluster.state_dir / f"{name.replace('/', '-')}.img"

    async def committed(self) -> int:
        """Stop serving, wait until every captured write is in the store; the last seq."""
        self.runner.stop()
        await self.runner.run(0)
        assert await self.runner.drain(60.0), "the writes were not all acked"
        seq = self.filt.next_seq - 1
        await wait_until_committed(self.store, DOMAIN_ID, seq)
        return seq


@contextlib.asynccontextmanager
async def nbd_runner(tmp: Path, drva_port: int, **opts: Any) -> AsyncIterator[ClusterRunner]:
    sock = tmp / "nbd.sock"
    assert len(os.fsencode(sock)) < 100, f"{sock} is too long for a Unix socket address"
    cluster_path = site_files.write_inventory(tmp / "cluster.toml", inventory(tmp / "disks", drva_port))
    listen = NbdListen(tcp=("127.0.0.1", 0), unix=sock, flush_timeout_s=opts.pop("flush_timeout_s", None),
                       allow_uids=opts.pop("allow_uids", frozenset()))
    runner = ClusterRunner(load_cluster(cluster_path), SECRET.encode(),
                           RunOptions(nbd=listen, hash_at_end=False, **opts))
    await runner.start()
    try:
        yield runner
    finally:
        runner.give_up()
        await runner.close()


@contextlib.asynccontextmanager
async def protected_site(tmp: Path, **opts: Any) -> AsyncIterator[Site]:
    async with running_drva(drva_config(tmp)) as drva, nbd_runner(tmp, drva.port, **opts) as runner:
        assert runner.nbd is not None
        address = runner.nbd.address
        yield Site(runner, address["tcp"], address["unix"], FileStore(tmp / "store"), tmp)


async def wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def run_cdp(*args: str) -> tuple[int, str, str]:
    """``python -m cdp.cli ARGS`` as a subprocess of the running loop: (status, stdout, stderr)."""
    return await run_process([sys.executable, "-m", "cdp.cli", *args], cwd=ROOT)


async def recover(tmp: Path, out: Path, *point: str) -> dict[str, Path]:
    """``cdp recover erp --store file://TMP/store POINT --to OUT``: the images by export name."""
    code, stdout, stderr = await run_cdp("recover", "erp", "--store", f"file://{tmp / 'store'}", *point,
                                         "--to", str(out), "--json")
    assert code == 0, stderr[-3000:]
    json.loads(stdout.splitlines()[-1])
    return {name: out / f"{name.replace('/', '-')}.img" for name in DISKS}
