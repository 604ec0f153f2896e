"""What the ``cdp mount`` tests share: a domain with a base and segments of overwrites in
a store, ``cdp mount`` run as a user runs it (a subprocess), and the reference images of
``cdp recover`` (the library function the verb calls).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptions, recover
from tests.nbd.conftest import run_process
from tests.rocva.build import seed_initial

ROOT = Path(__file__).resolve().parents[2]
KiB, MiB = 1 << 10, 1 << 20
#: Disks of the test domain: (vm, disk, size). Export names are vm/disk.
DISKS = (("vm1", "sys", 4 * MiB), ("vm2", "data", 2 * MiB))
CHUNK_BYTES = 64 * KiB
BLOCK_RAW_BYTES = 16 * KiB
#: A mount gets this long to say it is serving, and to stop once signalled.
MOUNT_START_S = 30.0
MOUNT_STOP_S = 30.0


@dataclass
class Domain:
    builder: DomainBuilder
    store_dir: Path
    mark: str  # a mark in the middle of the history
    mark_seq: int
    middle_seq: int  # a plain seq between the first and last segments

    @property
    def url(self) -> str:
        return f"file://{self.store_dir}"


async def build_domain(builder: DomainBuilder, store_dir: Path, seed: int = 13) -> Domain:
    """A base of every disk at seq 0, then segments of random overlapping writes and zeros,
    large sequential overwrites, a mark, more overwrites."""
    rng = np.random.default_rng(seed)
    for disk in range(len(builder.disks)):
        await seed_initial(builder, disk, rng, chunk=CHUNK_BYTES)
    await random_workload(builder, rng, 160, seal_every=20, max_sectors=64, marks=False)
    builder.write(0, 1 * MiB, rng.bytes(512 * KiB))  # spans many segment blocks
    builder.write(1, 0, rng.bytes(256 * KiB))
    await builder.seal()
    middle = builder.seq
    await random_workload(builder, rng, 120, seal_every=15, max_sectors=32, marks=False)
    mark_seq = builder.mark("middle")
    await builder.seal()
    builder.write(0, 1 * MiB + 64 * KiB, rng.bytes(200 * KiB))  # overwrites part of the big write
    builder.zero(1, 64 * KiB, 64 * KiB)
    await random_workload(builder, rng, 120, seal_every=25, max_sectors=64, marks=False)
    return Domain(builder, store_dir, "middle", mark_seq, middle)


async def new_builder(store) -> DomainBuilder:
    return await DomainBuilder(store, disks=DISKS, block_raw_size=BLOCK_RAW_BYTES).start()


async def recovered(store, domain: int, seq: int, out: Path) -> dict[str, Path]:
    """``cdp recover``'s images of ``seq`` by export name (vm/disk)."""
    result = await recover(store, domain, RecoverOptions(seq, out))
    names = {f"{d['vm']}-{d['name']}.img": f"{d['vm']}/{d['name']}" for d in (
        {"vm": vm, "name": name} for vm, name, _ in DISKS)}
    return {names[Path(img["path"]).name]: Path(img["path"]) for img in result["images"]}


@dataclass
class Mounted:
    """A running ``cdp mount --json``: its "serving" event, later its other events."""

    proc: asyncio.subprocess.Process
    serving: dict[str, Any]
    stderr_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    def uri(self, name: str, tls_dir: Path | None = None) -> str:
        """libnbd's URI of export ``name`` (with TLS: ``nbds``, trusting ``tls_dir``'s ca-cert.pem)."""
        address = self.serving["address"]
        s = "s" if address.get("tls") else ""
        query = f"tls-certificates={tls_dir}" if tls_dir is not None else ""
        if address["transport"] == "unix":
            return f"nbd{s}+unix:///{name}?socket={address['path']}" + (f"&{query}" if query else "")
        return f"nbd{s}://{address['host']}:{address['port']}/{name}" + (f"?{query}" if query else "")

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def next_event(self, timeout_s: float = MOUNT_START_S) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            line = await self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"cdp mount ended without an event:\n{self.stderr()}")
        event = json.loads(line)
        self.events.append(event)
        return event

    async def stop(self) -> dict[str, Any]:
        """SIGTERM; the "stopped" summary (events before it are kept in ``events``)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(MOUNT_STOP_S):
            rest, _ = await self.proc.communicate()
        for line in rest.decode().splitlines():
            self.events.append(json.loads(line))
        assert self.proc.returncode == 0, f"cdp mount exited {self.proc.returncode}:\n{self.stderr()}"
        assert self.events and self.events[-1]["event"] == "stopped", self.events
        return self.events[-1]


def mount_command(url: str, *args: str, domain: str = "7") -> list[str]:
    return [sys.executable, "-m", "cdp.cli", "mount", domain, "--store", url, "--json", *args]


async def start_mount(url: str, work: Path, *args: str) -> Mounted:
    """Start ``cdp mount 7 --store URL --json ARGS`` and wait for its "serving" line."""
    stderr_path = work / f"mount-{os.urandom(4).hex()}.stderr"
    with open(stderr_path, "wb") as err:
        proc = await asyncio.create_subprocess_exec(*mount_command(url, *args), cwd=ROOT,
                                                    stdout=asyncio.subprocess.PIPE, stderr=err)
    mounted = Mounted(proc, {}, stderr_path)
    try:
        mounted.serving = await mounted.next_event()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    assert mounted.serving["event"] == "serving", mounted.serving
    return mounted


async def run_mount_to_end(url: str, work: Path, *args: str, domain: str = "7",
                           timeout_s: float = MOUNT_START_S) -> tuple[int, str, str]:
    """A mount expected to fail before serving: (exit status, stdout, stderr)."""
    return await run_process(mount_command(url, *args, domain=domain), timeout_s=timeout_s, cwd=ROOT)
