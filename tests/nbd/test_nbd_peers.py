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
import errno
import os
import re
import shutil
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdp.errors import ConfigError
from cdp.msa.config import load_site_config
from cdp.nbd.server import NbdServer
from cdp.store.fs import FileStore
from iofilter_sim.nbd_site import NbdListen
from tests.drva.harness import ROOT
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


def ip(text: str):
    import ipaddress

    return ipaddress.ip_address(text)


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

    monkeypatch.setattr(peers, "allowed_uids", lambda extra=(): frozenset())
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


# --------------------------------------------------------------------------- users the operator names

#: The user named in the tests below: Debian's ``daemon`` (uid 1), a name every Debian
#: host has. Not ``nobody``: its uid is the kernel's overflow uid, refused as a named user.
NAMED, NAMED_UID = "daemon", 1
AS_NAMED = ["setpriv", f"--reuid={NAMED_UID}", f"--regid={NAMED_UID}", "--clear-groups"]


@needs_root
async def test_a_named_user_reads_a_mounts_loopback_tcp_and_no_one_else_does(store_url: str, tmp_path: Path,
                                                                             open_dir: Path) -> None:
    """QEMU run by libvirt as its own user: ``--nbd-allow-user daemon`` (a name) lets
    daemon in on TCP 127.0.0.1, and still no other uid (nobody); the refusal names who is
    allowed. The Unix socket stays ours alone: daemon is refused there even when its
    file's mode is wrong."""
    mounted = await start_mount(store_url, tmp_path, "--latest", "--nbd", "127.0.0.1:0", "--nbd-allow-user", NAMED)
    try:
        uri = f"nbd://127.0.0.1:{mounted.serving['address']['port']}"
        code, out, err = await run_process([*AS_NAMED, tool("nbdinfo"), "--list", uri])
        assert code == 0 and all(name in out for name in EXPORTS), (out, err)
        code, out, err = await run_process([*AS_NAMED, tool("qemu-io"), "-r", "-f", "raw", "-c", "read -v 0 4k",
                                            f"{uri}/vm1/sys"])
        assert code == 0 and "00000000:" in out, (out, err)
        assert_refused(await list_exports(uri, as_nobody=True))
    finally:
        await mounted.stop()
    assert peer_refusals(mounted.stderr(), NAMED_UID) == []
    refused = peer_refusals(mounted.stderr(), NOBODY)
    assert refused and f"nor an allowed user's (uids {NAMED_UID})" in refused[0], mounted.stderr()[-3000:]


@needs_root
async def test_a_named_user_writes_a_protected_disk_over_tcp_only(open_dir: Path) -> None:
    """The hypervisor driver's listeners with uid 1 allowed: its write on TCP lands on the
    primary and is captured like root's; nobody's does not; and on the Unix socket, made
    0666 by mistake, uid 1 is refused too (the named users are for TCP)."""
    async with protected_site(open_dir, allow_uids=frozenset({NAMED_UID})) as site:
        image = site.image("db/data")
        os.chmod(site.unix, 0o666)
        for uri, who in ((site.uri("db/data"), AS_NOBODY), (site.uri("db/data", "unix"), AS_NAMED)):
            code, out, err = await run_process([*who, tool("qemu-io"), "-f", "raw", "-c", "write -P 0x41 0 64k", uri])
            assert code != 0 and "wrote" not in out, (uri, out, err)
        seq_before = site.filt.next_seq
        code, out, err = await run_process([*AS_NAMED, tool("qemu-io"), "-f", "raw", "-c", "write -P 0x43 0 64k",
                                            "-c", "flush", site.uri("db/data")])
        assert code == 0 and "wrote 65536" in out, (out, err)
        assert image.read_bytes()[:64 << 10] == b"\x43" * (64 << 10)
        assert site.filt.next_seq > seq_before  # captured: the filter gave it a seq


async def test_named_users_are_checked_before_anything_is_served(store_url: str, tmp_path: Path) -> None:
    from cdp.nbd.peers import ALLOW_USERS_MAX, resolve_users

    assert resolve_users([NAMED, "0", "00002", "4294967294"], "--nbd-allow-user") == {0, NAMED_UID, 2, 4294967294}
    for user, expected in (("no-such-user-here", "'no-such-user-here': no such user on this host"),
                           ("4294967295", "4294967295: expected a uid of 0..4294967294"),
                           ("a\0b", "'a\\x00b': no such user on this host"),
                           # Other scripts' digits are no uid (str.isdecimal takes them): a name, looked up.
                           ("\u0661\u0662\u0663", "'\u0661\u0662\u0663': no such user on this host"),
                           (" 1", "' 1': no such user on this host"),
                           (True, "True: expected a user name or a uid"),
                           # Every process of another user namespace shows as the overflow uid.
                           ("nobody", "'nobody': its uid 65534: expected a uid other than the kernel's overflow uid"),
                           ("65534", "65534: expected a uid other than the kernel's overflow uid 65534")):
        with pytest.raises(ConfigError, match=re.escape(f"--nbd-allow-user {expected}")):
            resolve_users([user], "--nbd-allow-user")
    with pytest.raises(ConfigError, match=f"expected at most {ALLOW_USERS_MAX}"):
        resolve_users(map(str, range(ALLOW_USERS_MAX + 1)), "--nbd-allow-user")
    with pytest.raises(ConfigError, match="--nbd-allow-user goes with --nbd HOST:PORT"):
        NbdListen(unix=Path("/run/x.sock"), allow_uids=frozenset({NAMED_UID}))
    code, out, err = await run_mount_to_end(store_url, tmp_path, "--latest", "--nbd", f"unix:{tmp_path}/m.sock",
                                            "--nbd-allow-user", NAMED, timeout_s=REFUSAL_TIMEOUT_S)
    assert code == 2 and "--nbd-allow-user goes with --nbd HOST:PORT" in err, (code, err)
    code, out, err = await run_mount_to_end(store_url, tmp_path, "--latest", "--nbd", "127.0.0.1:0",
                                            "--nbd-allow-user", "no-such-user-here", timeout_s=REFUSAL_TIMEOUT_S)
    assert code == 2 and not out.strip() and "no such user on this host" in err and "Traceback" not in err, err


def test_the_site_files_named_users_reach_the_hosts_as_written(tmp_path: Path) -> None:
    """The site file checks how each entry is written, and looks no one up: its every read
    (a failover reloads it) must not wait on, or fail with, the host's user directory.
    Each host resolves them as it starts (``resolve_users``, refusing an unknown name)."""
    from cdp.hypervisor.nbd import NbdHypervisor

    cfg = load_site_config(write(tmp_path, hypervisor={"driver": "nbd", "nbd_listen": "127.0.0.1:0",
                                                       "nbd_allow_users": [NAMED, 1234, "libvirt-qemu"]}))
    assert cfg.hypervisor.nbd_allow_users == (NAMED, "1234", "libvirt-qemu")
    args = NbdHypervisor(cfg, HOST_ENV)._vm_args(SimpleNamespace(name="h1"))
    assert args[2:] == ("--nbd", "127.0.0.1:0", "--nbd-allow-user", NAMED, "--nbd-allow-user", "1234",
                        "--nbd-allow-user", "libvirt-qemu"), args
    for users, expected in ((None, "hypervisor.nbd_allow_users: expected nothing unless nbd_listen is set"),
                            ("daemon", "hypervisor.nbd_allow_users: expected a list"),
                            ([True], "hypervisor.nbd_allow_users[0]: expected a user name or a uid"),
                            ([-1], "hypervisor.nbd_allow_users[0]: expected a user name or a uid"),
                            (["ok", "-x"], "hypervisor.nbd_allow_users[1]: expected a user name or a uid"),
                            (["\u0661\u0662"], "hypervisor.nbd_allow_users[0]: expected a user name or a uid"),
                            ([4294967295], "hypervisor.nbd_allow_users[0]: expected a uid of 0..4294967294"),
                            (["4294967295"], "hypervisor.nbd_allow_users[0]: expected a uid of 0..4294967294"),
                            ([65534], "hypervisor.nbd_allow_users[0]: expected a uid other than the kernel's overflow")):
        hypervisor = {"driver": "nbd", "nbd_allow_users": ["daemon"]} if users is None else {
            "driver": "nbd", "nbd_listen": "127.0.0.1:0", "nbd_allow_users": users}
        message = refusal(write(tmp_path, hypervisor=hypervisor))
        assert expected in message, message


def test_a_host_refuses_a_named_user_it_cannot_find_before_serving(tmp_path: Path) -> None:
    """What the site file passed on unresolved: the host's ``iofilter-sim run`` exits 2
    naming the user, before it serves or connects to anything."""
    cluster = tmp_path / "cluster.toml"
    cluster.write_text("")
    proc = subprocess.run([sys.executable, "-m", "iofilter_sim", "run", str(cluster), "--nbd", "127.0.0.1:0",
                           "--nbd-allow-user", "no-such-user-here"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **HOST_ENV}, cwd=ROOT)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "--nbd-allow-user 'no-such-user-here': no such user on this host" in proc.stderr, proc.stderr


async def test_an_abstract_socket_serves_and_closes() -> None:
    """A name starting with NUL has no file (the peer check alone guards it): it serves,
    and close() stops it. Before, the listener's file was stat-ed after it listened: the
    call failed and left it listening."""
    name = f"\0cdp-test-{os.getpid()}-{time.monotonic_ns()}"
    server = NbdServer({})
    try:
        assert await server.start_unix(name) == name
        reader, writer = await asyncio.open_unix_connection(name)
        try:
            assert (await asyncio.wait_for(reader.readexactly(8), 10)) == b"NBDMAGIC"
        finally:
            writer.close()
    finally:
        await server.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_unix_connection(name)


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


async def test_the_server_itself_refuses_beyond_loopback_without_the_opt_in() -> None:
    """Every caller checks the address first; the server holds the same rule should one forget."""
    server = NbdServer({})
    try:
        for host in ("0.0.0.0", "::", "example.com"):
            with pytest.raises(ConfigError, match=re.escape(f"NBD: cannot listen on {host}: ")):
                await server.start_tcp(host, 0)
        assert server._servers == []
    finally:
        await server.close()
    server = NbdServer({}, allow_remote=True)
    try:
        assert (await server.start_tcp("0.0.0.0", 0))[1] > 0
    finally:
        await server.close()


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


# --------------------------------------------------------------------------- a client that closed its socket

#: Run as nobody: NBD_OPT_EXPORT_NAME, a 64 KiB WRITE of one byte at offset 0 and a FLUSH,
#: sent blind (no reply awaited), then — with "close" — the socket closed at once: the
#: kernel keeps it (FIN_WAIT*) to deliver those bytes, with inode 0 and (from FIN_WAIT2
#: on, here) uid 0, and the server still reads them. Before, that 0 was taken for root and the write landed on the
#: protected disk (4 runs in 4). First, idle loopback sockets (PAIRS pairs) and a burst of
#: open connections to the server (BURST), which made the server's accept slower then
#: (it read and parsed /proc/net/tcp for each): the attacking socket was closed by the
#: time its turn came. Without "close" (root's control): the replies are read first.
BLIND_WRITE = """
import socket, struct, sys, time
host, port, name, byte, pairs, burst, mode = sys.argv[1:8]
data = bytes([int(byte, 16)]) * 65536
msg = struct.pack(">I", 1 | 2)  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
msg += struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name.encode()  # IHAVEOPT, EXPORT_NAME
msg += struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, len(data)) + data  # WRITE
msg += struct.pack(">IHHQQI", 0x25609513, 0, 3, 8, 0, 0)  # FLUSH
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(1024)
keep = []
for _ in range(int(pairs)):
    c = socket.create_connection(listener.getsockname()); a, _ = listener.accept(); keep += [c, a]
for _ in range(int(burst)):
    s = socket.socket(); s.setblocking(False)
    try:
        s.connect((host, int(port)))
    except BlockingIOError:
        pass
    keep.append(s)
s = socket.create_connection((host, int(port)))
s.sendall(msg)
if mode == "close":
    s.close()
    time.sleep(2)  # the pairs and the burst stay open (a slow accept) while the server gets to the closed socket
else:
    s.settimeout(20)
    got = b""
    while len(got) < 18 + 10 + 2 * 16:  # greeting, export, two simple replies
        more = s.recv(4096)
        if not more:
            break
        got += more
    print("read", len(got))
print("sent", len(msg))
"""


def run_as(as_nobody: bool, *argv: str) -> subprocess.CompletedProcess:
    """``python -I argv`` as nobody (setpriv) or as ourselves; the interpreter must be one
    nobody may run (this one: its directories are 0755)."""
    return subprocess.run([*(AS_NOBODY if as_nobody else []), sys.executable, "-I", *argv], capture_output=True,
                          text=True, timeout=60, check=True)


@pytest.mark.parametrize("as_nobody", [
    pytest.param(True, marks=needs_root, id="nobody"),
    pytest.param(False, id="ourselves"),  # even root's (our uid's) own: the rule is the inode, not the uid
])
def test_a_client_that_closed_its_socket_before_the_accept_is_refused(as_nobody: bool) -> None:
    """The client connects, sends, closes and exits before the server accepts: its
    socket lingers (FIN_WAIT2 once its FIN is acknowledged) while the server still reads
    its bytes, and the kernel shows it with inode 0 and uid 0, whoever made it. Its owner
    cannot be known: refused (before, it passed as root)."""
    from cdp.nbd.peers import check_peer, parse_tcp_table

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client_port = int(run_as(as_nobody, "-c", "import socket, sys\n"
                                 "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
                                 "print(s.getsockname()[1]); s.sendall(b'sent blind'); s.close()", str(port)).stdout)
        deadline = time.monotonic() + 10
        while True:  # its FIN acknowledged (the ACK may be delayed ~40 ms): the state the bypass used
            states = [row.state for row in parse_tcp_table(Path("/proc/net/tcp").read_text())
                      if row.local[1] == client_port and row.remote[1] == port]
            if states == [5] or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert states == [5], states  # FIN_WAIT2
        accepted, peer = listener.accept()
        with accepted:
            assert accepted.recv(64) == b"sent blind"  # what the server would have served
            check = check_peer(accepted)
    assert peer[1] == client_port
    assert check.refused == "the client closed its socket (FIN_WAIT2): its owner cannot be known", check
    assert check.uid is None and check.address == f"127.0.0.1:{client_port}", check


@needs_root
async def test_nobody_writing_blind_and_closing_does_not_reach_a_protected_disk(open_dir: Path) -> None:
    """The end-to-end bypass (see ``BLIND_WRITE``): nothing of nobody's write lands; the
    same bytes from root, who stays for the replies, do."""
    script = open_dir / "blind_write.py"
    script.write_text(BLIND_WRITE)
    script.chmod(0o644)
    async with protected_site(open_dir) as site:
        image = site.image("db/data")
        before = image.read_bytes()[:64 << 10]
        assert before != b"\x41" * (64 << 10)
        host, port = site.tcp.rsplit(":", 1)
        code, out, err = await run_process([*AS_NOBODY, sys.executable, "-I", str(script), host, port, "db/data",
                                            "41", "400", "60", "close"])
        assert code == 0 and "sent" in out, (code, out, err)
        for _ in range(60):  # before, it landed well within this
            await asyncio.sleep(0.05)
            assert image.read_bytes()[:64 << 10] == before, "uid 65534 wrote the protected disk"
        code, out, err = await run_process([sys.executable, "-I", str(script), host, port, "db/data", "42", "0",
                                            "0", "stay"])
        assert code == 0 and "read 60" in out, (code, out, err)  # the script's bytes are a real write
        async with asyncio.timeout(30):
            while image.read_bytes()[:64 << 10] != b"\x42" * (64 << 10):
                await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- sock_diag


def accepted_pair(listen_family: int, listen_host: str, client_family: int, client_host: str):
    """(listener, client, accepted): a loopback connection; the caller closes them."""
    listener = socket.create_server((listen_host, 0), family=listen_family, dualstack_ipv6=listen_host == "::")
    client = socket.socket(client_family, socket.SOCK_STREAM)
    client.connect((client_host, listener.getsockname()[1]))
    accepted, _ = listener.accept()
    return listener, client, accepted


@pytest.mark.parametrize("listen,client", [
    ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "127.0.0.1")),
    ((socket.AF_INET6, "::1"), (socket.AF_INET6, "::1")),
    ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::ffff:127.0.0.1")),  # an IPv6 socket's IPv4 connection
    ((socket.AF_INET6, "::"), (socket.AF_INET, "127.0.0.1")),  # asked for as ::ffff:127.0.0.1, as we see it
])
def test_sock_diag_finds_our_own_clients_socket(listen, client) -> None:
    from cdp.nbd.peers import check_peer, diag_client_socket, open_diag_socket

    listener, sock, accepted = accepted_pair(*listen, *client)
    with listener, sock, accepted:
        ours, theirs = accepted.getsockname(), accepted.getpeername()
        with open_diag_socket() as diag:
            found = diag_client_socket(diag, (ip(ours[0]), ours[1]), (ip(theirs[0]), theirs[1]))
        check = check_peer(accepted)
        assert found is not None and found.state == 1, found  # ESTABLISHED
        assert found.uid == os.geteuid() and found.inode == os.fstat(sock.fileno()).st_ino, found
        assert check.refused is None and check.uid == os.geteuid(), check


def test_a_client_that_only_half_closed_is_still_known() -> None:
    """shutdown(SHUT_WR) sends the client's FIN but keeps its socket (FIN_WAIT2, its inode
    still there): it is still the maker's, and it is let in — the state does not decide."""
    from cdp.nbd.peers import check_peer

    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()) as client:
        client.shutdown(socket.SHUT_WR)
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.recv(1) == b""  # the FIN is here
            check = check_peer(accepted)
    assert check.refused is None and check.uid == os.geteuid(), check


def test_sock_diag_finds_no_socket_where_there_is_none() -> None:
    """No socket has these addresses: None (the kernel's -ENOENT) — also when a listener
    holds the client's port (the kernel's exact lookup then answers with the listener)."""
    from cdp.nbd.peers import check_peer, diag_client_socket, open_diag_socket

    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # a port bound, not listening: no connection of it anywhere
        with open_diag_socket() as diag:
            for client_port in (unused.getsockname()[1], listener.getsockname()[1]):
                assert diag_client_socket(diag, (ip("127.0.0.1"), client_port), (ip("127.0.0.1"), 9)) is None
                assert diag_client_socket(diag, (ip("::1"), client_port), (ip("::1"), 9)) is None
        # A connection whose client went away (a reset, SO_LINGER 0) before the check.
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            check = check_peer(accepted)
    assert check.refused is not None and check.uid is None, check
    assert ("sock_diag knows no socket with local address 127.0.0.1:" in check.refused
            or check.refused.startswith("no peer address")), check  # the reset may reach the accept first


LOCAL = ("127.0.0.1", 41000)
REMOTE = ("127.0.0.1", 10809)


def diag_reply(*, seq: int = 5, kind: int = 20, length: int | None = None, family: int = socket.AF_INET,
               state: int = 1, local=LOCAL, remote=REMOTE, uid: int = 0, inode: int = 777, extra: bytes = b"",
               cut: int = 0) -> bytes:
    """A hand-built kernel answer: ``struct nlmsghdr`` + ``struct inet_diag_msg``."""
    def address(text: str) -> bytes:
        return ip(text).packed.ljust(16, b"\0")

    body = (struct.pack("=BBBB", family, state, 0, 0)
            + struct.pack(">HH16s16s", local[1], remote[1], address(local[0]), address(remote[0]))
            + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF) + struct.pack("=IIIII", 0, 0, 0, uid, inode) + extra)
    message = struct.pack("=IHHII", 16 + len(body) if length is None else length, kind, 0, seq, 4242) + body
    return message[:len(message) - cut]


def error_reply(error: int, *, seq: int = 5, length: int = 36) -> bytes:
    return struct.pack("=IHHII", length, 2, 0, seq, 4242) + struct.pack("=i", error) + bytes(16)


def test_a_sock_diag_answer_is_read_field_by_field() -> None:
    from cdp.nbd.peers import ClientSocket, parse_diag_reply

    want = (ip(LOCAL[0]), LOCAL[1]), (ip(REMOTE[0]), REMOTE[1])
    assert parse_diag_reply(diag_reply(uid=NOBODY), 5, *want) == ClientSocket(1, NOBODY, 777)
    attributes = bytes.fromhex("0500080000000000")  # INET_DIAG_SHUTDOWN, as the kernel adds
    assert parse_diag_reply(diag_reply(extra=attributes), 5, *want) == ClientSocket(1, 0, 777)
    mapped = diag_reply(family=socket.AF_INET6, local=("::ffff:127.0.0.1", 41000), remote=("::ffff:127.0.0.1", 10809))
    assert parse_diag_reply(mapped, 5, *want) == ClientSocket(1, 0, 777)  # an IPv6 socket's IPv4 connection
    assert parse_diag_reply(error_reply(-errno.ENOENT), 5, *want) is None  # no such socket
    listener = diag_reply(state=10, remote=("0.0.0.0", 0))  # the kernel's fallback to a listener on the port
    assert parse_diag_reply(listener, 5, *want) is None
    orphan = parse_diag_reply(diag_reply(state=5, inode=0), 5, *want)
    assert orphan == ClientSocket(5, 0, 0) and orphan.owner_unknown() == (
        "the client closed its socket (FIN_WAIT2): its owner cannot be known")
    assert ClientSocket(6, 0, 1).owner_unknown() is not None  # TIME_WAIT, whatever the inode says
    assert ClientSocket(1, 0, 777).owner_unknown() is None


@pytest.mark.parametrize("reply,problem", [
    (b"", "an answer of 0 bytes, shorter than a netlink header"),
    (diag_reply()[:15], "shorter than a netlink header"),
    (diag_reply(cut=8), "a netlink message of 88 bytes in an answer of 80"),  # cut short
    (diag_reply(length=8), "a netlink message of 8 bytes"),
    (diag_reply(length=2 ** 32 - 1), "a netlink message of 4294967295 bytes"),
    (diag_reply(seq=6), "the answer to request 6, not to 5"),
    (diag_reply(kind=3), "a netlink message of type 3, not 20"),  # NLMSG_DONE
    (diag_reply(length=16 + 40), "shorter than struct inet_diag_msg"),
    (diag_reply(family=socket.AF_UNIX), "a socket of family 1"),
    (diag_reply(local=("127.0.0.1", 41001)), "a socket of 127.0.0.1:41001 to 127.0.0.1:10809, not the one asked for"),
    (diag_reply(remote=("127.0.0.2", 10809)), "not the one asked for"),
    (diag_reply(family=socket.AF_INET6, local=("::1", 41000), remote=("::1", 10809)), "not the one asked for"),
    (error_reply(-errno.EPERM), "sock_diag failed: Operation not permitted"),
    (error_reply(0), "sock_diag failed: status 0"),  # an acknowledgement, not an answer
    (error_reply(-errno.ENOENT, length=18), "an error message of 18 bytes"),
    (error_reply(-errno.ENOENT, seq=9), "the answer to request 9, not to 5"),
], ids=["empty", "short-header", "cut-short", "length-below-header", "length-huge", "other-seq", "other-type",
        "short-message", "other-family", "other-local-port", "other-remote", "other-v6-addresses", "other-errno",
        "ack", "short-error", "error-other-seq"])
def test_a_malformed_sock_diag_answer_is_refused(reply: bytes, problem: str) -> None:
    from cdp.nbd.peers import DiagReplyError, parse_diag_reply

    with pytest.raises(DiagReplyError) as refused:
        parse_diag_reply(reply, 5, (ip(LOCAL[0]), LOCAL[1]), (ip(REMOTE[0]), REMOTE[1]))
    assert problem in str(refused.value), refused.value


class FakeDiag:
    """A netlink socket that answers with ``reply`` (bytes, from port ``sender``) or raises it."""

    def __init__(self, reply, sender: int = 0) -> None:
        self.reply, self.sender, self.sent = reply, sender, []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def sendto(self, data: bytes, address) -> int:
        self.sent.append(data)
        return len(data)

    def recvfrom(self, size: int):
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply[:size], (self.sender, 0)


@pytest.mark.parametrize("diag,reason", [
    (FakeDiag(b"\x10\x00"), "an answer of 2 bytes"),
    (FakeDiag(diag_reply(), sender=99), "an answer from netlink port 99, not the kernel"),
    (FakeDiag(TimeoutError("timed out")), "timed out"),
    (FakeDiag(OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))), os.strerror(errno.ENOBUFS)),
], ids=["malformed", "not-the-kernel", "timeout", "recv-error"])
def test_check_peer_refuses_when_the_kernels_answer_cannot_be_read(monkeypatch, diag: FakeDiag,
                                                                   reason: str) -> None:
    from cdp.nbd import peers

    monkeypatch.setattr(peers, "open_diag_socket", lambda: diag)
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            check = peers.check_peer(accepted)
    assert check.uid is None and check.refused is not None, check
    assert check.refused.startswith("the kernel did not say who made the connection: ") and reason in check.refused


def test_the_socket_tables_are_the_fallback_only_when_sock_diag_cannot_be_had(monkeypatch) -> None:
    from cdp.nbd import peers

    def cannot(code: int):
        def open_diag_socket():
            raise OSError(code, os.strerror(code))
        return open_diag_socket

    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            for code in (errno.EPERM, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                monkeypatch.setattr(peers, "open_diag_socket", cannot(code))
                check = peers.check_peer(accepted)  # found in /proc/net/tcp
                assert check.refused is None and check.uid == os.geteuid(), (code, check)
            monkeypatch.setattr(peers, "open_diag_socket", cannot(errno.EMFILE))  # no fd left: no table read either
            check = peers.check_peer(accepted)
            assert check.uid is None and check.refused is not None and "Too many open files" in check.refused, check
            monkeypatch.setattr(peers, "open_diag_socket", cannot(errno.EPERM))
            monkeypatch.setattr(peers, "TCP_TABLES", (Path("/nonexistent/tcp"),))  # a table that cannot be read
            check = peers.check_peer(accepted)
            assert check.uid is None and check.refused is not None, check
            assert check.refused.startswith("/nonexistent/tcp knows no socket with local address 127.0.0.1:"), check


def test_the_cost_of_a_check(monkeypatch) -> None:
    """200 checks of real loopback connections by sock_diag, then by the /proc tables (the
    fallback); the medians are printed (run with -s), nothing about time is asserted."""
    from cdp.nbd import peers

    def medians() -> float:
        times = []
        with socket.create_server(("127.0.0.1", 0), backlog=256) as listener:
            for _ in range(200):
                with socket.create_connection(listener.getsockname()):
                    accepted, _ = listener.accept()
                    with accepted:
                        start = time.perf_counter()
                        check = peers.check_peer(accepted)
                        times.append(time.perf_counter() - start)
                assert check.refused is None and check.uid == os.geteuid(), check
        return statistics.median(times)

    diag = medians()
    monkeypatch.setattr(peers, "open_diag_socket", lambda: (_ for _ in ()).throw(PermissionError(errno.EPERM, "no")))
    proc = medians()
    with open("/proc/net/tcp") as table:
        sockets = sum(1 for _ in table) - 1
    print(f"\ncheck_peer median of 200: sock_diag {diag * 1e6:.0f} us, /proc tables {proc * 1e6:.0f} us "
          f"({sockets} sockets in /proc/net/tcp)")


# --------------------------------------------------------------------------- /proc/net/tcp, fixed samples

#: A little-endian kernel's /proc/net/tcp: a listener on 127.0.0.1:10809, a client of
#: uid 65534 at 127.0.0.1:41000 and the server's end of it (uid 0), an older connection
#: of the same ports in TIME_WAIT (uid column always 0), a client at 41004 that closed its
#: socket (FIN_WAIT2: uid 0 and inode 0, whoever made it), a row cut short before its
#: inode (41005), and a line that does not parse.
TCP_SAMPLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2A39 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1082 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A028 0100007F:2A39 06 00000000:00000000 03:000000B5 00000000     0        0 0 3 0000000000000000
   2: 0100007F:A028 0100007F:2A39 01 00000000:00000000 00:00000000 00000000 65534        0 5551 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:2A39 0100007F:A028 01 00000000:00000000 00:00000000 00000000     0        0 5552 1 0000000000000000 20 4 30 10 -1
   4: 0100007F:A02C 0100007F:2A39 05 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   5: 0100007F:A02D 0100007F:2A39 01 00000000:00000000 00:00000000 00000000     0        0
   6: garbage
"""
#: /proc/net/tcp6: a client of uid 1000 on [::1]:41001 to [::1]:10809, and an IPv4
#: connection made by an IPv6 socket (uid 1001, ::ffff:127.0.0.1:41002).
TCP6_SAMPLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:A029 00000000000000000000000001000000:2A39 01 00000000:00000000 00:00000000 00000000  1000        0 6661 1 0000000000000000 20 4 30 10 -1
   1: 0000000000000000FFFF00000100007F:A02A 0000000000000000FFFF00000100007F:2A39 01 00000000:00000000 00:00000000 00000000  1001        0 6662 1 0000000000000000 20 4 30 10 -1
"""


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
    assert [(str(r.local[0]), r.local[1], r.remote[1], r.state, r.uid, r.inode) for r in rows] == [
        ("127.0.0.1", 10809, 0, 0x0A, 0, 1082), ("127.0.0.1", 41000, 10809, 0x06, 0, 0),
        ("127.0.0.1", 41000, 10809, 0x01, NOBODY, 5551), ("127.0.0.1", 10809, 41000, 0x01, 0, 5552),
        ("127.0.0.1", 41004, 10809, 0x05, 0, 0)]  # the row without an inode is not read


def sample_tables(tmp_path: Path) -> tuple[Path, Path]:
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text(TCP_SAMPLE)
    tcp6.write_text(TCP6_SAMPLE)
    return tcp, tcp6


@pytest.mark.parametrize("ours,theirs,found", [
    (("127.0.0.1", 10809), ("127.0.0.1", 41000), (1, NOBODY, 5551)),  # the client's row, not the TIME_WAIT one
    (("::1", 10809), ("::1", 41001), (1, 1000, 6661)),
    (("127.0.0.1", 10809), ("127.0.0.1", 41002), (1, 1001, 6662)),  # an IPv6 socket's IPv4 connection
    (("127.0.0.1", 10809), ("127.0.0.1", 41004), (5, 0, 0)),  # closed by its owner: found, and refused
    (("127.0.0.1", 10809), ("127.0.0.1", 41003), None),  # no such connection
    (("127.0.0.2", 10809), ("127.0.0.1", 41000), None),  # the client's port, to another address
    (("127.0.0.1", 10809), ("127.0.0.1", 41005), None),  # a row without its inode
])
def test_the_client_socket_of_a_connection_is_its_clients_row(tmp_path: Path, ours, theirs, found) -> None:
    from cdp.nbd.peers import ClientSocket, proc_client_socket

    if sys.byteorder != "little":  # proc_client_socket reads the tables as this host's kernel writes them
        pytest.skip("the samples are a little-endian kernel's")
    got = proc_client_socket((ip(ours[0]), ours[1]), (ip(theirs[0]), theirs[1]), sample_tables(tmp_path))
    assert got == (None if found is None else ClientSocket(*found))
    if got is not None:
        assert (got.owner_unknown() is None) == (got.inode != 0), got


def test_a_missing_table_is_skipped_and_no_table_finds_no_one(tmp_path: Path) -> None:
    from cdp.nbd.peers import proc_client_socket

    assert proc_client_socket((ip("127.0.0.1"), 1), (ip("127.0.0.1"), 2), [tmp_path / "none", tmp_path / "no6"]) is None


def test_the_kernels_table_names_the_uid_and_inode_of_our_own_client() -> None:
    from cdp.nbd.peers import proc_client_socket

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.create_server((host, 0), family=family) as listener:
            with socket.create_connection(listener.getsockname()[:2]) as client:
                accepted, _ = listener.accept()
                with accepted:
                    ours, theirs = accepted.getsockname(), accepted.getpeername()
                    found = proc_client_socket((ip(ours[0]), ours[1]), (ip(theirs[0]), theirs[1]))
                    assert found is not None and found.uid == os.geteuid(), found
                    assert found.inode == os.fstat(client.fileno()).st_ino, found
                    assert client.getsockname()[1] == theirs[1]
