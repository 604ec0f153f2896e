"""Who may reach a protected disk's NBD export (FORMAT.md §17.5): the exports carry no
authentication, so a Unix socket is 0600 from the moment it exists whatever the umask,
and TCP is served on a loopback address only.

Before: the socket file took the process's umask (0777 under umask 000: any local user
wrote a VM's disk through it), and ``--nbd 0.0.0.0:PORT`` served every disk to any host."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from cdp.errors import ConfigError
from cdp.nbd.server import NbdServer
from iofilter_sim.nbd_site import NbdListen


async def test_a_unix_socket_is_0600_under_umask_000(tmp_path: Path) -> None:
    path = tmp_path / "h.nbd.sock"
    server = NbdServer({})
    before = os.umask(0)
    try:
        await server.start_unix(path)
    finally:
        os.umask(before)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as client:  # and it serves
            client.connect(str(path))
    finally:
        await server.close()
    assert not path.exists()


async def test_a_dead_servers_socket_is_replaced_and_a_file_is_not(tmp_path: Path) -> None:
    path = tmp_path / "h.nbd.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    server = NbdServer({})
    await server.start_unix(path)
    await server.close()
    path.write_bytes(b"precious")
    with pytest.raises(OSError):
        await NbdServer({}).start_unix(path)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "nbd.example.net"])
def test_tcp_beyond_loopback_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as refused:
        NbdListen(tcp=(host, 10809))
    message = str(refused.value)
    assert "expected a loopback address" in message and "carry no authentication" in message, message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_tcp_on_loopback_is_accepted(host: str) -> None:
    assert NbdListen(tcp=(host, 0)).tcp == (host, 0)
