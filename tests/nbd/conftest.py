"""Fixtures of the NBD tests: a server with file-backed exports over TCP and a Unix socket,
and a runner for the real clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio).

The clients run as subprocesses of the test's own event loop, so the server (in the same
loop) answers them. A missing tool fails the test with a message; `./dev test` installs
them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from cdp.nbd.backend import FileBackend
from cdp.nbd.server import NbdServer

MiB = 1 << 20
#: A real client gets this long; it needs well under a second here.
TOOL_TIMEOUT_S = 120.0
#: The exports every test gets: name -> size. "vm/ro" is read-only and filled with 0x5a.
EXPORT_SIZES = {"vm/disk": 8 * MiB, "vm/disk2": 4 * MiB, "vm/ro": 1 * MiB}
RO_BYTE = 0x5A


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: run ./dev test (as root it installs qemu-utils, libnbd-bin, "
                    f"fio, e2fsprogs) or apt-get install them", pytrace=False)
    return path


async def run_process(argv: list[str], *, timeout_s: float = TOOL_TIMEOUT_S, cwd: Path | None = None
                      ) -> tuple[int, str, str]:
    """Run ``argv`` as a subprocess of the test's loop (so a server in that loop answers
    it): (exit status, stdout, stderr); killed and reaped when it outlives ``timeout_s``."""
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


async def run_tool_status(name: str, *args: str) -> tuple[int, str, str]:
    """Run a real client: (exit status, stdout, stderr)."""
    return await run_process([tool(name), *args])


async def run_tool(name: str, *args: str) -> str:
    """Run a real client; its stdout, or the test fails with its stderr."""
    code, out, err = await run_tool_status(name, *args)
    if code != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {code}:\n{err}\n{out}", pytrace=False)
    return out


@dataclass
class Served:
    server: NbdServer
    files: dict[str, Path]
    backends: dict[str, FileBackend]
    tcp: tuple[str, int]
    unix: str

    def uri(self, name: str = "vm/disk", transport: str = "tcp") -> str:
        if transport == "tcp":
            return f"nbd://{self.tcp[0]}:{self.tcp[1]}/{name}"
        return f"nbd+unix:///{name}?socket={self.unix}"

    def file_bytes(self, name: str = "vm/disk") -> bytes:
        return self.files[name].read_bytes()


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    files: dict[str, Path] = {}
    backends: dict[str, FileBackend] = {}
    for name, size in EXPORT_SIZES.items():
        path = tmp_path / (name.replace("/", "_") + ".img")
        if name == "vm/ro":
            path.write_bytes(bytes([RO_BYTE]) * size)
        else:
            with open(path, "wb") as f:
                f.truncate(size)
        files[name] = path
        backends[name] = FileBackend(path, read_only=name == "vm/ro")
    server = NbdServer(backends, descriptions={"vm/disk": "first disk of vm"})
    sock = tmp_path / "nbd.sock"
    assert len(os.fsencode(sock)) < 100, f"{sock} is too long for a Unix socket address"
    tcp = await server.start_tcp("127.0.0.1", 0)
    await server.start_unix(sock)
    try:
        yield Served(server, files, backends, tcp, str(sock))
    finally:
        await server.close()
        for backend in backends.values():
            backend.close()
