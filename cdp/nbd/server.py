"""An asyncio NBD server: named exports over TCP and Unix sockets (docs/FORMAT.md §17).

One task per connection (``cdp.nbd.connection``). A connection haggles options
(``cdp.nbd.handshake``; the codec is ``cdp.nbd.protocol``), then reads requests in order
and runs each as a task of its own (``cdp.nbd.commands``) — except a WRITE without FUA to a backend that has
``submit_write`` (the filter's capture), which is handed over with a callback that
answers it — within the in-flight budgets (``cdp.nbd.budget``): per connection
``inflight_max`` requests and ``inflight_bytes_max`` payload bytes, over all
``server_inflight_bytes_max``. Past a cap the reader stops reading and TCP pushes back on
the client. A request's share lasts until its reply is queued *and* the replies waiting
to be sent are at most ``WRITE_BUFFER_HIGH``, so a client that reads no replies makes us
hold no more than the caps plus that. Replies go out whole: each is queued in one piece.

Who may connect (§17.6, ``cdp.nbd.peers``): root and our uid, told by the kernel at
accept (SO_PEERCRED, or the socket tables for a loopback TCP client); anyone else is
closed before the greeting. A Unix socket is 0600, in a directory that is ours alone
(``cdp.nbd.socket_dir``).

Every request is checked against its export before the backend sees it. A client that
breaks the protocol loses its connection (its in-flight requests are cancelled and
awaited); the other connections carry on.

Time bounds (§17.4; every bound is in ``cdp.nbd.limits``): the handshake
(``handshake_timeout_s``, and ``first_option_timeout_s`` to its first option; at most
``handshakes_max`` connections haggle at once, and the one haggling longest is dropped to
make room — as it is at ``connections_max``, before an idle one is); a client that owes
us bytes and moves none for ``stall_timeout_s`` is dropped (``cdp.nbd.watchdog``); an idle connection is dropped only
when the server is full and it has been idle ``idle_timeout_s``, else the newcomer is
refused (``cdp.nbd.refusal``); a close waits at most ``close_linger_s`` for the last
replies to leave, and not at all when the server is closing or the client left, stalled
or was evicted (``Connection._linger_s``, ``cdp.nbd.streams.close_stream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import stat
from collections.abc import Mapping

from cdp.errors import ConfigError
from cdp.logs import get_logger
from cdp.nbd import protocol as nbd
from cdp.nbd.backend import NbdBackend
from cdp.nbd.budget import ServerBudget
from cdp.nbd.commands import nbd_errno
from cdp.nbd.connection import Connection, Export
from cdp.nbd.limits import (CLOSE_LINGER_S, CONNECTIONS_MAX, FIRST_OPTION_TIMEOUT_S, HANDSHAKE_EVICT_AFTER_S,
                            HANDSHAKE_TIMEOUT_S, HANDSHAKE_WAIT_S, HANDSHAKES_MAX, IDLE_TIMEOUT_S, INFLIGHT_BYTES_MAX, INFLIGHT_MAX,
                            OPTIONS_PER_CONNECTION_MAX, READ_BUFFER_BYTES, REFUSE_OPTIONS_MAX, REFUSE_TIMEOUT_S,
                            REFUSING_MAX, SERVER_INFLIGHT_BYTES_MAX, STALL_TIMEOUT_S, WRITE_BUFFER_HIGH,
                            check_bounds)
from cdp.nbd.peers import (
    LOOPBACK_NAMES, check_peer, is_loopback_host, remote_listen_problem, unauthenticated_tcp_problem,
)
from cdp.nbd.refusal import longest_idle, refuse
from cdp.nbd.socket_dir import prepare_socket_dir
from cdp.nbd.streams import CountingReader, close_stream, peer_name

# The bounds were defined here before cdp.nbd.limits held them: they stay importable.
__all__ = ["CLOSE_LINGER_S", "CONNECTIONS_MAX", "FIRST_OPTION_TIMEOUT_S", "HANDSHAKE_TIMEOUT_S", "HANDSHAKES_MAX",
           "IDLE_TIMEOUT_S", "INFLIGHT_BYTES_MAX", "INFLIGHT_MAX", "OPTIONS_PER_CONNECTION_MAX", "READ_BUFFER_BYTES",
           "REFUSE_OPTIONS_MAX", "REFUSE_TIMEOUT_S", "REFUSING_MAX", "SERVER_INFLIGHT_BYTES_MAX", "STALL_TIMEOUT_S",
           "WRITE_BUFFER_HIGH",
           "Export", "LOOPBACK_NAMES", "NbdServer", "SOCKET_MODE", "nbd_errno", "unauthenticated_tcp_problem"]

logger = get_logger("iofilter.nbd")

#: A Unix socket's file: the exports carry no authentication (FORMAT.md §17.6), so only
#: its owner (and root) may connect.
SOCKET_MODE = 0o600


class NbdServer:
    """Serves ``exports`` (name -> backend) to any number of listeners.

    Invariant: every connection task is in ``_connections`` until it has closed its
    socket and awaited every request task it started.
    """

    def __init__(self, exports: Mapping[str, NbdBackend], *, descriptions: Mapping[str, str] | None = None,
                 inflight_max: int = INFLIGHT_MAX, inflight_bytes_max: int = INFLIGHT_BYTES_MAX,
                 connections_max: int = CONNECTIONS_MAX, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 tls: ssl.SSLContext | None = None, server_inflight_bytes_max: int = SERVER_INFLIGHT_BYTES_MAX,
                 stall_timeout_s: float = STALL_TIMEOUT_S, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 close_linger_s: float = CLOSE_LINGER_S, handshakes_max: int = HANDSHAKES_MAX,
                 first_option_timeout_s: float = FIRST_OPTION_TIMEOUT_S,
                 allow_uids: frozenset[int] = frozenset(), allow_remote: bool = False) -> None:
        self.exports: dict[str, Export] = {}
        for name, backend in exports.items():
            try:
                nbd.parse_export_name(name.encode())  # the same rule a client's name meets
            except nbd.OptionInvalid as exc:
                raise ConfigError(f"NBD export name {name[:64]!r}: {exc.message}") from None
            backend.block_sizes.check(backend.size, f"export {name!r}")
            self.exports[name] = Export(name, backend, (descriptions or {}).get(name, ""))
        check_bounds(stall_timeout_s=stall_timeout_s, server_inflight_bytes_max=server_inflight_bytes_max,
                     idle_timeout_s=idle_timeout_s, close_linger_s=close_linger_s)
        self.inflight_max = inflight_max
        self.inflight_bytes_max = inflight_bytes_max
        self.connections_max = connections_max
        self.handshakes_max = max(1, handshakes_max)
        self._waiting = 0  # connections waiting for a handshake slot (_handshake_slot)
        self.handshake_timeout_s = handshake_timeout_s
        self.first_option_timeout_s = first_option_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.close_linger_s = close_linger_s
        self.budget = ServerBudget(server_inflight_bytes_max)
        # With a TLS context the server requires TLS (the protocol's FORCEDTLS): before
        # STARTTLS a client may only ABORT; no export name, size or byte goes in the clear.
        self.tls = tls
        # Users let in besides root and our uid (cdp.nbd.peers.resolve_users of the
        # operator's --nbd-allow-user): on a loopback TCP listener the kernel names them.
        self.allow_uids = frozenset(allow_uids)
        # TCP beyond loopback identifies no one: start_tcp refuses it unless the operator
        # said so (--nbd-allow-remote); every caller checks first, this holds if one forgets.
        self.allow_remote = allow_remote
        self._servers: list[asyncio.Server] = []
        # Each Unix socket bound, with the (st_dev, st_ino) of the socket file: close()
        # removes only that file, not whatever another process has put at the path since.
        self._unix_paths: list[tuple[str, tuple[int, int]]] = []
        self._connections: dict[asyncio.Task, Connection] = {}
        self._refusing: set[asyncio.Task] = set()
        self._closing = False

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        """asyncio.start_server's protocol, with a reader that counts what it is fed."""
        loop = asyncio.get_running_loop()
        return asyncio.StreamReaderProtocol(CountingReader(limit=READ_BUFFER_BYTES, loop=loop), self._accept,
                                            loop=loop)

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on TCP; port 0 picks a free one. Returns the bound (host, port).

        A client of a loopback address must be root, our uid or an allowed user's
        (``cdp.nbd.peers``); any other address identifies no one, and whoever reaches it
        gets in: served only with ``allow_remote`` (ConfigError otherwise, before anything
        listens: ``cdp.nbd.peers.remote_listen_problem``)."""
        if (why := remote_listen_problem(host, self.allow_remote, "--nbd-allow-remote")) is not None:
            raise ConfigError(f"NBD: cannot listen on {host}: {why}")
        server = await asyncio.get_running_loop().create_server(self._protocol, host, port)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        logger.info("nbd_listening", transport="tcp", host=bound[0], port=bound[1], exports=sorted(self.exports))
        if not is_loopback_host(host):
            logger.warning("nbd_listening_unauthenticated", host=bound[0], port=bound[1],
                           reason="not a loopback address: any client that reaches it may read and write "
                                  "the exports")
        return bound[0], bound[1]

    async def start_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on a Unix socket at ``path`` (a socket file there is replaced, as
        asyncio does), its file ``SOCKET_MODE`` from the moment it exists whatever the
        umask (``_bind_unix``), in a directory that is ours alone (made 0700 if missing;
        ConfigError naming it otherwise: ``cdp.nbd.socket_dir``): the exports carry no
        authentication, so who may connect is who may open that file — and, should its
        mode be wrong, still only root or our uid (``cdp.nbd.peers``)."""
        path = os.fspath(path)
        abstract = path.startswith("\0")  # no file: the peer check alone guards it
        if not abstract:
            prepare_socket_dir(path)
        sock = _bind_unix(path)
        try:
            server = await asyncio.get_running_loop().create_unix_server(self._protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        if not abstract:  # an abstract name has no file to stat, nor to remove at close
            st = os.lstat(path)
            self._unix_paths.append((path, (st.st_dev, st.st_ino)))
        logger.info("nbd_listening", transport="unix", path=path, exports=sorted(self.exports))
        return path

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def closing(self) -> bool:
        """``close`` has begun: a connection ending now does not linger for its replies."""
        return self._closing

    async def wait_connections(self) -> None:
        """Until every connection open now has ended (closed its socket, awaited its requests)."""
        await asyncio.gather(*list(self._connections), return_exceptions=True)

    async def close(self) -> None:
        """Stop listening, drop every connection (cancelling its requests, aborting its
        socket: a client that does not read cannot hold this up), wait for all."""
        self._closing = True
        for server in self._servers:
            server.close()
        tasks = [*self._connections, *self._refusing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path, identity in self._unix_paths:  # Python 3.11 leaves the socket file behind
            _unlink_if_ours(path, identity)
        self._unix_paths.clear()

    async def _accept(self, reader: CountingReader, writer: asyncio.StreamWriter) -> None:
        if not self._peer_admitted(writer):
            return
        task = asyncio.current_task()
        assert task is not None
        peer = peer_name(writer)
        try:
            if self._haggling() >= self.handshakes_max and not await self._handshake_slot():
                await self._refuse(reader, writer, peer)
                return
            if (len(self._connections) >= self.connections_max and not await self._evict_haggling("connections_max")
                    and not await self._evict_idle()):
                await self._refuse(reader, writer, peer)
                return
            if self._closing:  # accepted as close() began: close() does not wait for us
                writer.transport.abort()
                return
            connection = Connection(self, reader, writer, peer)
            self._connections[task] = connection
            try:
                await connection.run()
            finally:
                del self._connections[task]
        except asyncio.CancelledError:
            # close() cancelled us and waits for us; asyncio's stream callback would log a
            # cancelled handler task as an error. Any other cancellation goes through.
            if not self._closing:
                raise

    def _peer_admitted(self, writer: asyncio.StreamWriter) -> bool:
        """Whether the kernel says the client is root, our uid or an allowed user's
        (``cdp.nbd.peers``); anyone else is closed before any NBD byte is sent — and
        before it takes a handshake slot or evicts anyone."""
        check = check_peer(writer.get_extra_info("socket"), self.allow_uids)
        if check.refused is None:
            return True
        logger.warning("nbd_peer_refused", transport=check.transport, peer=check.address, uid=check.uid,
                       pid=check.pid, reason=check.refused)
        writer.transport.abort()
        return False

    def _haggling(self) -> int:
        """Connections in their handshake (not dropped yet)."""
        return sum(1 for c in self._connections.values() if c.haggling and c.dropped is None)

    async def _handshake_slot(self) -> bool:
        """At the handshake cap: True once a connection left its handshake or one haggling
        for ``HANDSHAKE_EVICT_AFTER_S`` was dropped for this one; False after
        ``HANDSHAKE_WAIT_S`` (then the newcomer is refused), or at once when as many wait
        as may haggle. Looks every 50 ms: only a connection over the cap waits here, and
        each holds nothing but its socket."""
        if self._haggling() < self.handshakes_max or await self._evict_haggling("handshakes_max"):
            return True
        if self._waiting >= self.handshakes_max:
            return False
        self._waiting += 1
        try:
            deadline = self._loop_time() + HANDSHAKE_WAIT_S
            while not self._closing and self._loop_time() < deadline:
                await asyncio.sleep(0.05)
                if self._haggling() < self.handshakes_max or await self._evict_haggling("handshakes_max"):
                    return True
            return False
        finally:
            self._waiting -= 1

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def _evict_haggling(self, cap: str) -> bool:
        """At a cap (``cap`` names it, for the log): drop the connection that has been in
        its handshake longest, if for ``HANDSHAKE_EVICT_AFTER_S`` at least, and wait until
        it is gone. False when none is."""
        old_enough = self._loop_time() - HANDSHAKE_EVICT_AFTER_S
        haggling = [(c.accepted_at, task) for task, c in self._connections.items()
                    if c.haggling and c.dropped is None and c.accepted_at <= old_enough]
        if not haggling:
            return False
        since, task = min(haggling, key=lambda pair: pair[0])
        victim = self._connections[task]
        logger.info("nbd_handshake_evicted", peer=victim.peer, cap=cap,
                    haggling_s=round(asyncio.get_running_loop().time() - since, 1),
                    handshakes_max=self.handshakes_max, connections_max=self.connections_max)
        victim.drop("evicted_handshake")
        await asyncio.wait([task])
        return True

    async def _evict_idle(self) -> bool:
        """At the connection cap: drop the connection idle longest, if one has been idle
        for ``idle_timeout_s``, and wait until it is gone. False when none has."""
        now = asyncio.get_running_loop().time()
        idlest = longest_idle(((task, c.idle_for(now)) for task, c in self._connections.items()),
                              self.idle_timeout_s)
        if idlest is None:
            return False
        task, seconds = idlest
        victim = self._connections[task]
        logger.info("nbd_idle_evicted", peer=victim.peer, idle_s=round(seconds, 1),
                    connections_max=self.connections_max)
        victim.drop("evicted_idle")
        await asyncio.wait([task])
        return True

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        """A client over the connection cap: refused in words (``cdp.nbd.refusal.refuse``),
        at most REFUSING_MAX at once (past that, or while closing, closed at once)."""
        logger.warning("nbd_connection_refused", peer=peer, reason="connections_max",
                       connections_max=self.connections_max)
        task = asyncio.current_task()
        if len(self._refusing) >= REFUSING_MAX or self._closing:
            writer.transport.abort()
            return
        self._refusing.add(task)
        message = f"the server is at its maximum of {self.connections_max} connections: try again later"
        try:
            await refuse(reader, writer, message)
        finally:
            self._refusing.discard(task)
            await close_stream(writer, None if self._closing else self.close_linger_s)


def _bind_unix(path: str) -> socket.socket:
    """A Unix stream socket bound at ``path``, its file ``SOCKET_MODE``. Linux makes the
    file with the socket inode's mode less the umask, so the mode is set before ``bind``
    (no moment in which others may connect, even under umask 000); a kernel that ignored
    it has the file set right after. A socket file already at the path (a dead server's)
    is removed first, never through a link; anything else there fails the bind."""
    abstract = path.startswith("\0")
    if not abstract:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):  # not every kernel lets a socket be chmod-ed
            os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(path)
        if not abstract and stat.S_IMODE(os.lstat(path).st_mode) & ~SOCKET_MODE:
            os.chmod(path, SOCKET_MODE)
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink_if_ours(path: str, identity: tuple[int, int]) -> None:
    """Remove the Unix socket file at ``path`` if it is still the one bound (``identity``:
    its st_dev, st_ino): a file put there since — another server's socket, anything — stays."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != identity or not stat.S_ISSOCK(st.st_mode):
        logger.warning("nbd_socket_replaced", path=path, reason="not the socket this server bound: left in place")
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
