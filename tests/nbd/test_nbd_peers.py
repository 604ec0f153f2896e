"""Who may connect to an NBD export (FORMAT.md §17.6, ``cdp.nbd.peers``,
``cdp.nbd.socket_dir``): root and the server's own uid, as the kernel tells at accept.

Before: every local user read (and, on a protected disk, wrote) any export served on TCP
127.0.0.1 — ``nobody`` listed and read a ``cdp mount``'s exports and wrote a protected
VM's disk with qemu-io; a Unix socket's 0600 mode was the only guard of that transport,
its directory was not looked at (a world-writable one was used), a missing one failed
the bind, and ``cdp mount --nbd 0.0.0.0:PORT`` served every disk to any host without a
word. "nobody" is uid 65534 here, switched to with setpriv (the tests run as root in CI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdp.errors import ConfigError
from cdp.msa.config import load_site_config
from cdp.nbd.server import NbdServer
from cdp.store.fs import FileStore
from iofilter_sim.nbd_site import NbdListen
from tests.mgmt.test_hv_places import refusal, write
from tests.nbd.capture_site import protected_site
from tests.nbd.conftest import run_process, tool
from tests.nbd.mount_fixtures import DISKS, build_domain, new_builder, run_mount_to_end, start_mount

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
EXPORTS = sorted(f"{vm}/{disk}" for vm, disk, _ in DISKS)
#: How long a mount expected to refuse its address may run: on a server that serves it
#: instead (no refusal), the test fails after this.
REFUSAL_TIMEOUT_S = 20.0
HOST_ENV = {"CDP_SITE_SECRET": "a site secret for the host processes"}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user (setpriv) takes root")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    """A domain (id 7, disks vm1/sys and vm2/data) in a file store, built once."""
    root = tmp_path_factory.mktemp("peers")

    async def build() -> None:
        await build_domain(await new_builder(FileStore(root / "store")), root / "store")

    asyncio.run(build())
    return f"file://{root / 'store'}"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory 0755 under /tmp: nobody may reach a socket in it (pytest's own
    temporary directories are 0700, which would stop nobody before any check of ours)."""
    path = Path(tempfile.mkdtemp(prefix="nbd-peers-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def list_exports(uri: str, *, as_nobody: bool) -> tuple[int, str, str]:
    """``nbdinfo --list URI``, as nobody or as ourselves: (exit status, stdout, stderr)."""
    return await run_process([*(AS_NOBODY if as_nobody else []), tool("nbdinfo"), "--list", uri])


async def read_as_nobody(uri: str) -> tuple[int, str, str]:
    """qemu-io reading the first 4 KiB of export ``uri`` as nobody, its bytes in hex."""
    return await run_process([*AS_NOBODY, tool("qemu-io"), "-r", "-f", "raw", "-c", "read -v 0 4k", uri])


def assert_refused(result: tuple[int, str, str]) -> None:
    code, out, err = result
    assert code != 0, f"nobody got in:\n{out}\n{err}"
    assert not any(name in out for name in EXPORTS) and "00000000:" not in out, out  # nothing listed or read


def peer_refusals(log: str, uid: int = NOBODY) -> list[str]:
    return [line for line in log.splitlines() if '"nbd_peer_refused"' in line and f'"uid":{uid}' in line]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --------------------------------------------------------------------------- real clients as nobody


@needs_root
async def test_nobody_is_refused_on_a_mounts_loopback_tcp_and_root_still_reads(store_url: str, tmp_path: Path) -> None:
    mounted = await start_mount(store_url, tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    try:
        port = mounted.serving["address"]["port"]
        assert_refused(await list_exports(f"nbd://127.0.0.1:{port}", as_nobody=True))
        assert_refused(await read_as_nobody(f"nbd://127.0.0.1:{port}/vm1/sys"))
        code, out, err = await list_exports(f"nbd://127.0.0.1:{port}", as_nobody=False)
        assert code == 0 and all(name in out for name in EXPORTS), err
    finally:
        await mounted.stop()
    refused = peer_refusals(mounted.stderr())
    assert len(refused) >= 2, mounted.stderr()[-3000:]
    assert '"peer":"127.0.0.1:' in refused[0] and '"transport":"tcp"' in refused[0], refused[0]


@needs_root
async def test_a_mounts_unix_socket_refuses_nobody_even_with_a_wrong_mode(store_url: str, tmp_path: Path,
                                                                         open_dir: Path) -> None:
    sock = open_dir / "mount.sock"
    mounted = await start_mount(store_url, tmp_path, "--latest", "--nbd", f"unix:{sock}")
    try:
        assert mode(sock) == 0o600
        uri = f"nbd+unix:///?socket={sock}"
        assert_refused(await list_exports(uri, as_nobody=True))  # the mode stops nobody
        sock.chmod(0o666)  # a mistake: the peer's credentials still do
        assert_refused(await list_exports(uri, as_nobody=True))
        assert_refused(await read_as_nobody(f"nbd+unix:///vm1/sys?socket={sock}"))
        code, out, err = await list_exports(uri, as_nobody=False)
        assert code == 0 and all(name in out for name in EXPORTS), err
    finally:
        await mounted.stop()
    refused = peer_refusals(mounted.stderr())
    assert len(refused) >= 2 and '"transport":"unix"' in refused[0], mounted.stderr()[-3000:]


@needs_root
async def test_nobody_neither_reads_nor_writes_a_protected_disk(open_dir: Path) -> None:
    """The hypervisor driver's listeners (iofilter-sim's NBD face): TCP 127.0.0.1 and the
    Unix socket, made 0666 by mistake. Root's writes land; nobody's do not."""
    async with protected_site(open_dir) as site:
        image = site.image("db/data")
        before = image.read_bytes()[:1 << 20]
        os.chmod(site.unix, 0o666)
        for uri in (site.uri("db/data"), site.uri("db/data", "unix")):
            assert_refused(await read_as_nobody(uri))
            code, out, err = await run_process([*AS_NOBODY, tool("qemu-io"), "-f", "raw", "-c",
                                                "write -P 0x41 0 64k", uri])
            assert code != 0 and "wrote" not in out, (uri, out, err)
        assert image.read_bytes()[:1 << 20] == before
        code, out, err = await run_process([tool("qemu-io"), "-f", "raw", "-c", "write -P 0x42 0 64k",
                                            site.uri("db/data")])
        assert code == 0, err
        assert image.read_bytes()[:64 << 10] == b"\x42" * (64 << 10)


async def test_a_refused_peer_gets_no_byte_of_the_greeting(tmp_path: Path, monkeypatch) -> None:
    """Refused at accept, before the server says NBDMAGIC: here even root is refused
    (no uid allowed), on TCP and on the Unix socket."""
    from cdp.nbd import peers

    monkeypatch.setattr(peers, "allowed_uids", lambda: frozenset())
    server = NbdServer({})
    host, port = await server.start_tcp("127.0.0.1", 0)
    sock = tmp_path / "s.sock"
    await server.start_unix(sock)
    try:
        for family, address in ((socket.AF_INET, (host, port)), (socket.AF_UNIX, str(sock))):
            reader, writer = await (asyncio.open_connection(host, port) if family == socket.AF_INET
                                    else asyncio.open_unix_connection(str(sock)))
            try:
                try:
                    got = await asyncio.wait_for(reader.read(), 10)
                except ConnectionResetError:
                    got = b""
                assert got == b"", (address, got)
            finally:
                writer.close()
        assert server.connection_count == 0
    finally:
        await server.close()


async def test_root_and_our_uid_are_let_in(tmp_path: Path) -> None:
    from cdp.nbd.peers import check_peer

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        check = check_peer(left)
    assert (check.transport, check.uid, check.pid, check.refused) == ("unix", os.geteuid(), os.getpid(), None)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                check = check_peer(accepted)
            client_port = client.getsockname()[1]
    assert check.transport == "tcp" and check.uid == os.geteuid() and check.refused is None, check
    assert check.address == f"127.0.0.1:{client_port}"


# --------------------------------------------------------------------------- the Unix socket's directory


async def test_a_missing_socket_directory_is_made_0700_and_the_socket_0600(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "nbd" / "s.sock"
    server = NbdServer({})
    before = os.umask(0)
    try:
        await server.start_unix(sock)
    finally:
        os.umask(before)
    try:
        assert (mode(tmp_path / "run"), mode(sock.parent), mode(sock)) == (0o700, 0o700, 0o600)
    finally:
        await server.close()


@needs_root
@pytest.mark.parametrize("setup,problem", [
    (lambda d: d.chmod(0o777), "may be written by other users (mode 0777)"),
    (lambda d: d.chmod(0o775), "may be written by other users (mode 0775)"),
    (lambda d: d.chmod(0o1777), "may be written by other users (mode 1777)"),  # sticky: others still make names
    (lambda d: os.chown(d, NOBODY, NOBODY), "is owned by uid 65534"),
])
async def test_a_socket_directory_others_control_is_refused(tmp_path: Path, setup, problem: str) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o700)
    setup(directory)
    with pytest.raises(ConfigError) as refused:
        await NbdServer({}).start_unix(directory / "s.sock")
    message = str(refused.value)
    assert message.startswith(f"NBD socket {directory / 's.sock'}: {directory} {problem}"), message
    assert "writable by no other user" in message and "owned by root" in message, message
    assert not (directory / "s.sock").exists()


@needs_root
async def test_a_socket_directory_through_a_link_of_another_user_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=re.escape(f"NBD socket {link}/s.sock: {link} is owned by uid 65534")):
        await NbdServer({}).start_unix(link / "s.sock")
    assert not (real / "s.sock").exists()


async def test_cdp_mount_refuses_a_world_writable_socket_directory(store_url: str, tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    code, out, err = await run_mount_to_end(store_url, tmp_path, "--latest", "--nbd", f"unix:{directory}/m.sock",
                                            timeout_s=REFUSAL_TIMEOUT_S)
    assert code == 2 and not out.strip(), (code, out, err)
    assert f"NBD socket {directory}/m.sock: {directory} may be written by other users (mode 0777)" in err, err


# --------------------------------------------------------------------------- TCP beyond loopback


async def test_cdp_mount_beyond_loopback_needs_the_opt_in(store_url: str, tmp_path: Path) -> None:
    code, out, err = await run_mount_to_end(store_url, tmp_path, "--latest", "--nbd", "0.0.0.0:0",
                                            timeout_s=REFUSAL_TIMEOUT_S)
    assert code == 2 and not out.strip(), (code, out, err)
    assert "--nbd 0.0.0.0:0: expected a loopback address" in err, err
    assert "carry no authentication: anyone who reaches it reads and writes" in err, err
    assert "say so with --nbd-allow-remote" in err and "Traceback" not in err, err
    code, out, err = await run_mount_to_end(store_url, tmp_path, "--latest", "--nbd", f"unix:{tmp_path}/m.sock",
                                            "--nbd-allow-remote", timeout_s=REFUSAL_TIMEOUT_S)
    assert code == 2 and "--nbd-allow-remote goes with --nbd HOST:PORT" in err, (code, err)


@needs_root
async def test_cdp_mount_with_the_opt_in_serves_yet_still_tells_local_users_apart(store_url: str,
                                                                                 tmp_path: Path) -> None:
    mounted = await start_mount(store_url, tmp_path, "--latest", "--nbd", "0.0.0.0:0", "--nbd-allow-remote")
    try:
        port = mounted.serving["address"]["port"]
        code, out, err = await list_exports(f"nbd://127.0.0.1:{port}", as_nobody=False)
        assert code == 0 and all(name in out for name in EXPORTS), err
        # Through the loopback address the client is still identified, and nobody refused.
        assert_refused(await list_exports(f"nbd://127.0.0.1:{port}", as_nobody=True))
    finally:
        await mounted.stop()
    assert '"nbd_listening_unauthenticated"' in mounted.stderr()


def test_iofilter_sim_beyond_loopback_needs_the_opt_in() -> None:
    with pytest.raises(ConfigError, match="say so with --nbd-allow-remote"):
        NbdListen(tcp=("0.0.0.0", 10809))
    assert NbdListen(tcp=("0.0.0.0", 10809), allow_remote=True).allow_remote
    with pytest.raises(ConfigError, match="--nbd-allow-remote goes with --nbd HOST:PORT"):
        NbdListen(unix=Path("/run/x.sock"), allow_remote=True)


def test_the_site_file_opt_in_reaches_the_hosts(tmp_path: Path) -> None:
    from cdp.hypervisor.nbd import NbdHypervisor

    message = refusal(write(tmp_path, hypervisor={"driver": "nbd", "nbd_listen": "0.0.0.0:10809"}))
    assert "hypervisor.nbd_listen: expected a loopback address" in message, message
    assert "say so with [hypervisor] nbd_allow_remote = true" in message, message
    cfg = load_site_config(write(tmp_path, hypervisor={"driver": "nbd", "nbd_listen": "0.0.0.0:10809",
                                                       "nbd_allow_remote": True}))
    assert cfg.hypervisor.nbd_allow_remote is True
    args = NbdHypervisor(cfg, HOST_ENV)._vm_args(SimpleNamespace(name="h1"))
    assert args[2:] == ("--nbd", "0.0.0.0:10809", "--nbd-allow-remote"), args
    loopback = load_site_config(write(tmp_path, hypervisor={"driver": "nbd", "nbd_listen": "127.0.0.1:0"}))
    assert NbdHypervisor(loopback, HOST_ENV)._vm_args(SimpleNamespace(name="h1"))[2:] == ("--nbd", "127.0.0.1:0")


@pytest.mark.parametrize("hypervisor,expected", [
    ({"driver": "nbd", "nbd_listen": "0.0.0.0:0", "nbd_allow_remote": "yes"},
     "hypervisor.nbd_allow_remote: expected true or false"),
    ({"driver": "nbd", "nbd_allow_remote": True},
     "hypervisor.nbd_allow_remote: expected nothing unless nbd_listen is set"),
])
def test_a_bad_opt_in_is_refused(tmp_path: Path, hypervisor: dict, expected: str) -> None:
    message = refusal(write(tmp_path, hypervisor=hypervisor))
    assert expected in message, message


# --------------------------------------------------------------------------- /proc/net/tcp, fixed samples

#: A little-endian kernel's /proc/net/tcp: a listener on 127.0.0.1:10809, a client of
#: uid 65534 at 127.0.0.1:41000 and the server's end of it (uid 0), an older connection
#: of the same ports in TIME_WAIT (uid column always 0), and a line that does not parse.
TCP_SAMPLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2A39 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1082 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A028 0100007F:2A39 06 00000000:00000000 03:000000B5 00000000     0        0 0 3 0000000000000000
   2: 0100007F:A028 0100007F:2A39 01 00000000:00000000 00:00000000 00000000 65534        0 5551 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:2A39 0100007F:A028 01 00000000:00000000 00:00000000 00000000     0        0 5552 1 0000000000000000 20 4 30 10 -1
   4: garbage
"""
#: /proc/net/tcp6: a client of uid 1000 on [::1]:41001 to [::1]:10809, and an IPv4
#: connection made by an IPv6 socket (uid 1001, ::ffff:127.0.0.1:41002).
TCP6_SAMPLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:A029 00000000000000000000000001000000:2A39 01 00000000:00000000 00:00000000 00000000  1000        0 6661 1 0000000000000000 20 4 30 10 -1
   1: 0000000000000000FFFF00000100007F:A02A 0000000000000000FFFF00000100007F:2A39 01 00000000:00000000 00:00000000 00000000  1001        0 6662 1 0000000000000000 20 4 30 10 -1
"""


def ip(text: str):
    import ipaddress

    return ipaddress.ip_address(text)


@pytest.mark.parametrize("text,byteorder,expected", [
    ("0100007F:2A39", "little", ("127.0.0.1", 10809)),
    ("7F000001:2A39", "big", ("127.0.0.1", 10809)),
    ("00000000000000000000000001000000:0050", "little", ("::1", 80)),
    ("0000000000000000FFFF00000100007F:1F90", "little", ("127.0.0.1", 8080)),  # IPv4-mapped: as IPv4
    ("B80D0120000000000000000001000000:01BB", "little", ("2001:db8::1", 443)),
])
def test_an_address_of_the_socket_table_decodes(text: str, byteorder: str, expected: tuple[str, int]) -> None:
    from cdp.nbd.peers import decode_endpoint

    assert decode_endpoint(text, byteorder) == (ip(expected[0]), expected[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["0100007F", "0100007F:", "100007F:2A39", "ZZ00007F:2A39"])
def test_an_address_that_is_not_the_tables_format_is_refused(text: str) -> None:
    from cdp.nbd.peers import decode_endpoint

    with pytest.raises(ValueError):
        decode_endpoint(text, "little")


def test_the_rows_of_a_sample_table() -> None:
    from cdp.nbd.peers import parse_tcp_table

    rows = list(parse_tcp_table(TCP_SAMPLE, "little"))
    assert [(str(r.local[0]), r.local[1], r.remote[1], r.state, r.uid) for r in rows] == [
        ("127.0.0.1", 10809, 0, 0x0A, 0), ("127.0.0.1", 41000, 10809, 0x06, 0),
        ("127.0.0.1", 41000, 10809, 0x01, NOBODY), ("127.0.0.1", 10809, 41000, 0x01, 0)]


def sample_tables(tmp_path: Path) -> tuple[Path, Path]:
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text(TCP_SAMPLE)
    tcp6.write_text(TCP6_SAMPLE)
    return tcp, tcp6


@pytest.mark.parametrize("ours,theirs,uid", [
    (("127.0.0.1", 10809), ("127.0.0.1", 41000), NOBODY),  # the client's row, not the TIME_WAIT one's 0
    (("::1", 10809), ("::1", 41001), 1000),
    (("127.0.0.1", 10809), ("127.0.0.1", 41002), 1001),  # an IPv6 socket's IPv4 connection
    (("127.0.0.1", 10809), ("127.0.0.1", 41003), None),  # no such connection
    (("127.0.0.2", 10809), ("127.0.0.1", 41000), None),  # the client's port, to another address
])
def test_the_uid_of_a_connection_is_its_clients_row(tmp_path: Path, ours, theirs, uid) -> None:
    from cdp.nbd.peers import tcp_peer_uid

    if sys.byteorder != "little":  # tcp_peer_uid reads the tables as this host's kernel writes them
        pytest.skip("the samples are a little-endian kernel's")
    found = tcp_peer_uid((ip(ours[0]), ours[1]), (ip(theirs[0]), theirs[1]), sample_tables(tmp_path))
    assert found == uid


def test_a_missing_table_is_skipped_and_no_table_finds_no_one(tmp_path: Path) -> None:
    from cdp.nbd.peers import tcp_peer_uid

    assert tcp_peer_uid((ip("127.0.0.1"), 1), (ip("127.0.0.1"), 2), [tmp_path / "none", tmp_path / "no6"]) is None


def test_the_kernels_table_names_the_uid_of_our_own_client() -> None:
    from cdp.nbd.peers import tcp_peer_uid

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.create_server((host, 0), family=family) as listener:
            with socket.create_connection(listener.getsockname()[:2]) as client:
                accepted, _ = listener.accept()
                with accepted:
                    ours, theirs = accepted.getsockname(), accepted.getpeername()
                    assert tcp_peer_uid((ip(ours[0]), ours[1]), (ip(theirs[0]), theirs[1])) == os.geteuid()
                    assert client.getsockname()[1] == theirs[1]
