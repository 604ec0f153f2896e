"""Helpers to run DRVAs and filters in tests: configs, in-process daemons, subprocesses,
simple primary disks, and the checks every end-to-end test makes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView
from cdp.digest import sha256_file  # noqa: F401  (tests import it from here)
from cdp.replay import replay_reference
from cdp.segment import decode_segment
from cdp.testing.drva_config import (  # noqa: F401  (free_port: tests import it from here)
    SECRET, domain_doc, drva_doc, free_port, write_toml,
)
from drva.config import DrvaConfig, parse_drva_config
from iofilter_sim.disks import PrimaryDisk
from tests.waiting import EVENTUALLY_S, wait_until, wait_until_sync  # noqa: F401  (wait_until: tests import it from here)

ROOT = Path(__file__).resolve().parents[2]
# A SIGKILLed process is reaped at once; a SIGTERMed DRVA drains its tasks first.
KILLED_EXIT_S = 10.0
STOP_EXIT_S = 20.0
# One attempt to connect to a local port that is not listening yet fails at once.
CONNECT_PROBE_S = 0.2


def two_domains(tmp: Path, name: str, size: int = 8 << 20, **options: Any) -> dict[str, Any]:
    """A DRVA serving domains 1 (erp, vm1) and 2 (crm, vm2), one disk each."""
    return drva_doc(tmp, name, [domain_doc(1, "erp", [("vm1", "d0", size)]),
                                domain_doc(2, "crm", [("vm2", "d0", size)])], **options)


def config(doc: dict[str, Any]) -> DrvaConfig:
    return parse_drva_config(doc, "test config", {"CDP_SITE_SECRET": SECRET})


@contextlib.asynccontextmanager
async def running_drva(cfg: DrvaConfig, *, check_failure: bool = True, ready: bool = True):
    """An in-process DRVA, started (with ``ready``: every domain's catalog open, or the
    domain fenced), stopped on the way out; a task that failed while it ran fails the
    test (it would have ended a real DRVA with 70)."""
    from drva.daemon import Drva

    d = Drva(cfg, exit_on_task_failure=False)
    await d.start()
    try:
        # Ready to serve: a filter is refused (not_ready) until its domain's catalog is open.
        await wait_until(lambda: not ready or all(dom.catalog_ready or dom.fenced for dom in d.domains.values()),
                         EVENTUALLY_S, "every domain's catalog open")
        yield d
    finally:
        await d.stop()
    if check_failure:
        assert d.failure is None


def Disk(path: Path, size: int, fill_seed: int | None = None) -> PrimaryDisk:
    """A primary disk for tests; ``fill_seed`` gives it existing content (for seeding)."""
    if fill_seed is not None:
        rng = np.random.default_rng(fill_seed)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, size)
        for at in range(0, size, 1 << 20):
            if rng.random() < 0.6:
                os.pwrite(fd, rng.integers(0, 4, 1 << 20, dtype=np.uint8).tobytes(), at)
        os.close(fd)
    return PrimaryDisk(path, size)


async def stream_committed(drva: Any, filters: list[Any], rng: np.random.Generator, writes: int,
                           max_sectors: int = 128) -> None:
    """``writes`` more random writes per filter, streamed to the in-process ``drva`` until
    each domain has committed them all. Captured once the filter is welcomed: a new
    filter numbers its writes from the durable seq WELCOME gives it."""
    from iofilter_sim.client import FilterClient

    client = FilterClient(filters, "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter connected")
        for f in filters:
            f.capture(*random_writes(rng, [d.size for d in f.disks], writes, max_sectors))
        await wait_until(lambda: all(drva.domains[f.domain].committed_seq == f.next_seq - 1 for f in filters),
                         EVENTUALLY_S, "every write committed")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def random_writes(rng: np.random.Generator, disk_sizes: list[int], n: int, max_sectors: int = 128):
    """(disk, offset, length, kind, payload) of ``n`` random writes, some of them zero."""
    disk = rng.integers(0, len(disk_sizes), n).astype(np.uint32)
    length = (rng.integers(1, max_sectors + 1, n) * 512).astype(np.uint32)
    sizes = np.array(disk_sizes, dtype=np.int64)[disk]
    offset = (rng.integers(0, (sizes - length) // 512 + 1) * 512).astype(np.uint64)
    kind = np.where(rng.random(n) < 0.03, 1, 0).astype(np.uint16)
    total = int(length[kind == 0].sum())
    base = rng.integers(0, 8, total // 8 + 1, dtype=np.uint8)
    payload = np.repeat(base, 8)[:total].tobytes()
    return disk, offset, length, kind, payload


class DrvaProcess:
    """A DRVA in a subprocess (to SIGKILL it), on a fixed port so it can come back."""

    def __init__(self, doc: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.doc = doc
        self.path = write_toml(doc, tmp / f"{doc['name']}.toml")
        self.env = {**os.environ, "CDP_SITE_SECRET": SECRET, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / f"{doc['name']}.log"

    def start(self) -> None:
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "drva.daemon", "--config", str(self.path)],
                                     cwd=ROOT, env=self.env, stdout=out, stderr=out)
        out.close()
        host, port = self.doc["listen"].rsplit(":", 1)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"DRVA exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=CONNECT_PROBE_S):
                return True
            return False

        # A DRVA starts in about a second (imports, log recovery); more under coverage.
        wait_until_sync(listening, EVENTUALLY_S, f"DRVA {self.doc['name']} to listen on {host}:{port}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(KILLED_EXIT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_EXIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(KILLED_EXIT_S)

    def status(self) -> dict[str, Any]:
        import json
        return json.loads((Path(self.doc["state_dir"]) / "status.json").read_text())


async def check_store(store, domain: int, expected_sha256: list[str], tmp: Path,
                      initial: dict[int, Path] | None = None) -> dict[str, Any]:
    """Every segment decodes, seq ranges have no gap or overlap, and the replay of the
    store equals the primaries. Returns the catalog state's summary."""
    head, generation = await load_catalog(store, domain)
    assert head is not None, f"domain {domain} has no catalog"
    state = CatalogView(store, head, generation)
    rows = await state.rows_between(1, state.committed_seq)
    expected_first = int(rows["first_seq"][0]) if len(rows) else 1
    for row, key in zip(rows, state.segment_keys(rows)):
        first, last = int(row["first_seq"]), int(row["last_seq"])
        assert first == expected_first, f"gap or overlap at seq {first} (expected {expected_first})"
        index, _ = decode_segment(key, await store.get(key))
        assert index.first_seq == first and index.last_seq == last
        expected_first = last + 1
    out = tmp / f"replay-{domain}-{time.monotonic_ns()}"
    paths, _ = await replay_reference(store, domain, out, initial=initial)
    for expected, path in zip(expected_sha256, paths, strict=True):
        assert sha256_file(path) == expected, f"replayed {path.name} differs from its primary"
    return {"committed_seq": state.committed_seq, "segments": len(rows), "windows": state.windows,
            "marks": state.marks, "bases": state.bases}
