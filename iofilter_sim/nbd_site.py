"""A simulated site's disks served over NBD: real block clients in place of workloads.

``ClusterRunner`` with ``RunOptions.nbd`` set builds one ``NbdFace``: a
``DomainCapture`` per domain (its filter's one writer) and an export per disk, named
``vm/disk``, on one ``NbdServer`` listening on TCP, a Unix socket, or both. The rest of
the runner is unchanged — the filters' clients, marks (placed by the runner or asked for
by the MSA), dirty-region maps, bitmap mode and resync, pause (a paused domain's writes
wait in its capture queue), status and drain — so a domain written by ``qemu-img`` or
``fio`` is protected exactly as a simulated one.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp.errors import ConfigError
from cdp.logs import get_logger
from cdp.nbd.peers import remote_listen_problem
from cdp.nbd.server import NbdServer
from cdp.nbd.socket_dir import prepare_socket_dir
from iofilter_sim.nbd_capture import CapturedDisk, DomainCapture

if TYPE_CHECKING:
    from iofilter_sim.runner import ClusterRunner

log = get_logger("iofilter.nbd_site")


@dataclass(frozen=True)
class NbdListen:
    """Where and what to serve."""

    tcp: tuple[str, int] | None = None  # (host, port); port 0 picks a free one
    unix: Path | None = None
    exports: frozenset[str] | None = None  # ``vm/disk`` names to serve; None: every disk
    flush_timeout_s: float | None = None  # None: a flush waits until the DRVA has the writes
    # TCP on an address other than loopback: no client there can be identified, so it is
    # served only when the operator says so (--nbd-allow-remote, [hypervisor] nbd_allow_remote).
    allow_remote: bool = False
    # Users let in on the TCP listener besides root and our uid (cdp.nbd.peers.resolve_users
    # of --nbd-allow-user, [hypervisor] nbd_allow_users); the Unix socket stays ours alone.
    allow_uids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.tcp is None and self.unix is None:
            raise ConfigError("NBD: give a TCP address, a Unix socket path, or both")
        if self.allow_remote and self.tcp is None:
            raise ConfigError("NBD: --nbd-allow-remote goes with --nbd HOST:PORT (a Unix socket is never remote)")
        if self.allow_uids and self.tcp is None:
            raise ConfigError("NBD: --nbd-allow-user goes with --nbd HOST:PORT (the Unix socket and its directory "
                              "are root's and ours alone)")
        if self.tcp is not None:
            host, port = self.tcp
            why = remote_listen_problem(host, self.allow_remote, "--nbd-allow-remote")
            if why is not None:
                raise ConfigError(f"NBD: --nbd {f'[{host}]' if ':' in host else host}:{port}: expected a loopback "
                                  f"address: {why}")


def export_name(vm: str, disk: str) -> str:
    return f"{vm}/{disk}"


class NbdFace:
    """The NBD server of a running site (module docstring)."""

    def __init__(self, runner: ClusterRunner, listen: NbdListen) -> None:
        self.runner = runner
        self.listen = listen
        self.captures: dict[str, DomainCapture] = {}
        self.server: NbdServer | None = None
        self.address: dict[str, Any] = {}

    def exports(self) -> dict[str, CapturedDisk]:
        """Build a capture per domain and the exports asked for; ConfigError for an
        export name that is no disk of the site."""
        out: dict[str, CapturedDisk] = {}
        for dom in self.runner.cluster.domains:
            name = dom.name
            capture = DomainCapture(self.runner.filters[name], self.runner.disks[name], name=name,
                                    isolated=name in self.runner.opts.isolated,
                                    paused=lambda n=name: n in self.runner.pause,
                                    flush_timeout_s=self.listen.flush_timeout_s)
            self.captures[name] = capture
            for d in dom.disks:
                out[export_name(d.vm.name, d.disk.name)] = CapturedDisk(capture, d.disk_index)
        if self.listen.exports is not None:
            unknown = sorted(self.listen.exports - set(out))
            if unknown:
                raise ConfigError(f"NBD: no disk named {', '.join(unknown)} in {self.runner.cluster.source} "
                                  f"(exports are vm/disk: {', '.join(sorted(out))})")
            out = {k: v for k, v in out.items() if k in self.listen.exports}
        return out

    async def start(self) -> dict[str, Any]:
        exports = self.exports()
        for c in self.captures.values():
            c.start()
        self.server = NbdServer(exports, descriptions={
            n: f"domain {b.capture.name}, disk {b.index}" for n, b in exports.items()}, allow_uids=self.listen.allow_uids,
            allow_remote=self.listen.allow_remote)
        try:
            if self.listen.tcp is not None:
                host, port = await self.server.start_tcp(*self.listen.tcp)
                self.address["tcp"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                self.address["port"] = port
            if self.listen.unix is not None:
                prepare_socket_dir(self.listen.unix)  # before anything at the path is touched
                _remove_stale_socket(self.listen.unix)
                self.address["unix"] = await self.server.start_unix(self.listen.unix)
        except OSError as exc:
            await self.close()
            raise ConfigError(f"NBD: cannot listen: {exc.strerror or exc}") from exc
        except ConfigError:  # a socket directory that is not ours alone: the TCP listener goes too
            await self.close()
            raise
        self.address["exports"] = {n: b.size for n, b in exports.items()}
        log.info("nbd_serving", **{k: v for k, v in self.address.items() if k != "exports"},
                 exports=sorted(exports))
        return self.address

    def wake(self) -> None:
        """The control file changed: paused domains stop taking writes, others resume."""
        for c in self.captures.values():
            c.wake()

    def paused(self) -> set[str]:
        """Paused domains whose capture has stopped (no batch in progress)."""
        return {n for n, c in self.captures.items() if n in self.runner.pause and c.idle}

    async def stop_serving(self) -> None:
        """No more requests: connections close, their queued writes are still captured."""
        if self.server is not None:
            await self.server.close()  # it removes its Unix socket file
            self.server = None

    async def close(self) -> None:
        await self.stop_serving()
        for c in self.captures.values():
            await c.close()

    def status(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.address.items()},
                "domains": {n: {**c.stats, "map_syncs": c.filt.stats["map_syncs"]} for n, c in self.captures.items()}}


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a process that died (a killed host): binding would fail
    with EADDRINUSE. Only a socket is removed; anything else at the path is an error."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"NBD: {path} exists and is not a socket: refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            os.unlink(path)  # nobody listens on it
            return
    raise ConfigError(f"NBD: {path}: another process is serving on it")
