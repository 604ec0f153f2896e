"""Who may connect to an NBD export (docs/FORMAT.md §17.6).

The exports carry no authentication, and what serves them runs as root: a protected VM's
disk (a write there is captured and replicated as the VM's) or a recovered point. So
every listener lets a connection in only when the kernel says who made it, before the
first byte of the greeting:

- a Unix socket's peer: ``SO_PEERCRED`` (the socket's 0600 mode and its directory are
  the first guard; this one holds when a mode is wrong);
- a TCP connection to a loopback address: the kernel's socket tables (``/proc/net/tcp``,
  ``/proc/net/tcp6``), whose row for the client's end — local address the connection's
  peer, remote address ours — has the uid of the process that made that socket.

Only root and the server's own uid get in (``allowed_uids``); any other uid, and a
connection whose owner cannot be found, is refused. A connection to any other address
identifies no one: whoever reaches it gets in, so such an address is served only when
the operator asked for it in so many words (``remote_listen_problem``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

#: Host names taken for loopback without resolving them.
LOOPBACK_NAMES = frozenset({"localhost"})
#: The kernel's TCP socket tables; tcp6 also lists IPv4 connections made by IPv6 sockets
#: (as ::ffff:a.b.c.d). The one missing on a host without IPv6 is skipped.
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
#: A TIME_WAIT row's uid column is always 0 (the kernel keeps no owner for it), and the
#: socket is closed: it is never the client that just connected.
TCP_STATE_TIME_WAIT = 0x06
#: ``struct ucred``: pid, uid, gid.
_UCRED = struct.Struct("3i")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]
ByteOrder = Literal["little", "big"]


@dataclass(frozen=True)
class PeerCheck:
    """Who is at the other end of an accepted connection, and whether they may stay."""

    transport: str  # "tcp" or "unix"
    address: str  # "HOST:PORT" of a TCP client; "unix" for a Unix socket's (it has no name)
    uid: int | None  # None: not known (no socket row found, or an address that identifies no one)
    pid: int | None = None  # a Unix socket's peer only
    refused: str | None = None  # why the connection is refused; None: it may go on


@dataclass(frozen=True)
class TcpRow:
    """One socket of a ``/proc/net/tcp`` table."""

    local: Endpoint
    remote: Endpoint
    state: int
    uid: int


def allowed_uids() -> frozenset[int]:
    """Root, and whoever this server runs as."""
    return frozenset({0, os.geteuid()})


def is_loopback_host(host: str) -> bool:
    """``host`` is a loopback name or address (``LOOPBACK_NAMES``, 127.0.0.0/8, ::1). Not
    ::ffff:127.0.0.1 written as a listen address: that binds an IPv6 socket, whatever it maps."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve to anything
        return False


def unauthenticated_tcp_problem(host: str) -> str | None:
    """Why serving protected disks without authentication on TCP ``host`` is refused, or
    None for a loopback address (``is_loopback_host``). A wildcard or any other address
    lets other machines read and write every disk; a name other than localhost may
    resolve to anything."""
    if is_loopback_host(host):
        return None
    return (f"{host} is reachable from other machines (or may be), and the NBD exports carry no "
            f"authentication: anyone who reaches it reads and writes every protected disk; serve on the "
            f"Unix socket, or on a loopback address reached through an authenticated tunnel (ssh -L)")


def remote_listen_problem(host: str, allow_remote: bool, opt_in: str) -> str | None:
    """Why a listener on TCP ``host`` may not start, or None: a loopback address always
    may (its clients are identified), any other only with ``allow_remote`` — the operator's
    explicit ``opt_in`` (a flag or key, named in the message), as no client there can be."""
    if allow_remote:
        return None
    why = unauthenticated_tcp_problem(host)
    return None if why is None else f"{why}; to serve it there anyway, say so with {opt_in}"


# ---------------------------------------------------------------------- accept


def check_peer(sock: Any) -> PeerCheck:
    """Who made the connection on accepted socket ``sock`` (a socket or asyncio's
    TransportSocket), and whether they may use the exports."""
    if sock is None:
        return PeerCheck("?", "?", None, refused="no socket to identify the peer by")
    if sock.family == socket.AF_UNIX:
        return _check_unix_peer(sock)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return _check_tcp_peer(sock)
    return PeerCheck("?", "?", None, refused=f"socket family {sock.family}: no way to identify its peer")


def _check_unix_peer(sock: Any) -> PeerCheck:
    try:
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError as exc:
        return PeerCheck("unix", "unix", None, refused=f"SO_PEERCRED failed: {exc.strerror or exc}")
    return PeerCheck("unix", "unix", uid, pid, _uid_refusal(uid))


def _check_tcp_peer(sock: Any) -> PeerCheck:
    try:
        ours, theirs = _endpoint(sock.getsockname()), _endpoint(sock.getpeername())
    except OSError as exc:  # the client is gone already
        return PeerCheck("tcp", "?", None, refused=f"no peer address: {exc.strerror or exc}")
    address = f"[{theirs[0]}]:{theirs[1]}" if theirs[0].version == 6 else f"{theirs[0]}:{theirs[1]}"
    if not ours[0].is_loopback:
        # Reached through an address other machines can reach: nobody can be identified.
        # Every caller starts such a listener only on the operator's explicit opt-in
        # (remote_listen_problem), which says exactly that.
        return PeerCheck("tcp", address, None)
    uid = tcp_peer_uid(ours, theirs)
    if uid is None:
        return PeerCheck("tcp", address, None, refused=(
            f"no socket in {' or '.join(map(str, TCP_TABLES))} has local address {address} and remote "
            f"address {ours[0]}:{ours[1]}: the connecting process is unknown"))
    return PeerCheck("tcp", address, uid, refused=_uid_refusal(uid))


def _uid_refusal(uid: int) -> str | None:
    if uid in allowed_uids():
        return None
    return f"uid {uid} is neither root nor the server's (uid {os.geteuid()})"


def _endpoint(sockaddr: tuple) -> Endpoint:
    """(address, port) of a socket address, an IPv4-mapped IPv6 address as IPv4: the
    client may have made its socket either way."""
    return _unmapped(ipaddress.ip_address(sockaddr[0].split("%", 1)[0])), int(sockaddr[1])


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# ---------------------------------------------------------------------- /proc/net/tcp


def tcp_peer_uid(ours: Endpoint, theirs: Endpoint, tables: Iterable[Path] = TCP_TABLES) -> int | None:
    """The uid of the process that made the client end of a TCP connection between
    ``theirs`` (the client's address and port) and ``ours``: the row of the socket tables
    whose local address is theirs and whose remote address is ours. None when no table
    has one (the client closed already, or the tables cannot be read)."""
    for table in tables:
        try:
            text = table.read_text()
        except OSError:  # tcp6 on a host without IPv6; a /proc we may not read: no row from it
            continue
        for row in parse_tcp_table(text):
            if row.local == theirs and row.remote == ours and row.state != TCP_STATE_TIME_WAIT:
                return row.uid
    return None


def parse_tcp_table(text: str, byteorder: ByteOrder = sys.byteorder) -> Iterator[TcpRow]:
    """The rows of a ``/proc/net/tcp`` or ``tcp6`` table (a header line, then one socket a
    line: ``sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid
    timeout inode ...``). A line that does not parse is skipped: what cannot be read
    identifies nobody. ``byteorder``: the kernel's, which wrote the addresses."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        try:
            yield TcpRow(decode_endpoint(fields[1], byteorder), decode_endpoint(fields[2], byteorder),
                         int(fields[3], 16), int(fields[7]))
        except (IndexError, ValueError):
            continue


def decode_endpoint(text: str, byteorder: ByteOrder = sys.byteorder) -> Endpoint:
    """``0100007F:1F90`` -> (127.0.0.1, 8080). The kernel prints the address as 32-bit
    words (one for IPv4, four for IPv6), each the network-order bytes read as a native
    integer, and the port as a plain number; an IPv4-mapped address comes back as IPv4."""
    address_hex, port_hex = text.split(":")
    if len(address_hex) not in (8, 32):
        raise ValueError(f"address {address_hex!r}: expected 8 or 32 hex digits")
    raw = b"".join(int(address_hex[i:i + 8], 16).to_bytes(4, byteorder)
                   for i in range(0, len(address_hex), 8))
    return _unmapped(ipaddress.ip_address(raw)), int(port_hex, 16)
