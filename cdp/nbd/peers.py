"""Who may connect to an NBD export (docs/FORMAT.md §17.6).

The exports carry no authentication, and what serves them runs as root: a protected VM's
disk (a write there is captured and replicated as the VM's) or a recovered point. So
every listener lets a connection in only when the kernel says who made it, before the
first byte of the greeting:

- a Unix socket's peer: ``SO_PEERCRED`` (the socket's 0600 mode and its directory are
  the first guard; this one holds when a mode is wrong);
- a TCP connection to a loopback address: the client's end of it — the socket whose
  local address is the connection's peer and whose remote address is ours — looked up by
  its exact addresses with the kernel's socket diagnostics (``sock_diag(7)``, netlink),
  which say who made it (``uid``) and whether a file still refers to it (``inode``).

Only root, the server's own uid and the users the operator named (``--nbd-allow-user``,
``[hypervisor] nbd_allow_users``: QEMU run by libvirt as ``libvirt-qemu``, say) get in
(``allowed_uids``); any other uid, and a connection whose owner cannot be known, is
refused. A named user connects on the loopback TCP listener: the Unix socket's file and
directory stay root's and the server's alone (``cdp.nbd.socket_dir``). A client socket the kernel shows
with inode 0 is such a one: its owner closed it (it lingers as FIN_WAIT1, FIN_WAIT2,
CLOSING, LAST_ACK or TIME_WAIT to finish the connection), and its uid then says nothing:
the kernel reports 0, whoever made it (older kernels at once, newer ones from FIN_WAIT2
on) — while we still hold the bytes it sent. Taking that 0 for root let ``nobody`` send
a handshake, a WRITE and a FLUSH blind, close, and write a protected disk as root.

Why netlink and not the ``/proc/net/tcp`` tables: reading and parsing those costs
milliseconds per accept (the kernel prints every TCP socket of the host), on the event
loop that serves the disks, and any local user may make that as long as they like by
connecting in a loop; and a table read in chunks may miss a row under churn. One exact
sock_diag request is one round trip of tens of microseconds, whatever the host holds.
The tables remain the fallback, with the same rule, only where the netlink socket cannot
be made at all (a sandbox without ``NETLINK_SOCK_DIAG``).

A connection to any other address identifies no one: whoever reaches it gets in, so such
an address is served only when the operator asked for it in so many words
(``remote_listen_problem``).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cdp.errors import ConfigError

#: Host names taken for loopback without resolving them.
LOOPBACK_NAMES = frozenset({"localhost"})
#: The kernel's TCP socket tables, read only when no sock_diag netlink socket can be made
#: (``find_client_socket``); tcp6 also lists IPv4 connections made by IPv6 sockets (as
#: ::ffff:a.b.c.d). The one missing on a host without IPv6 is skipped.
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
#: The kernel's TCP states (include/net/tcp_states.h), named in refusals.
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
#: A TIME_WAIT socket is closed, and the kernel keeps no owner for it (uid 0, inode 0):
#: it is never a client that may be served.
TCP_STATE_TIME_WAIT = 0x06
TCP_STATE_LISTEN = 0x0A
#: ``struct ucred``: pid, uid, gid.
_UCRED = struct.Struct("3i")

# sock_diag(7): netlink protocol NETLINK_SOCK_DIAG, one SOCK_DIAG_BY_FAMILY request for
# one socket named by its exact addresses (no NLM_F_DUMP), answered by one
# ``struct inet_diag_msg`` or by an NLMSG_ERROR (-ENOENT: no such socket).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
#: How long the kernel's answer may take: it is queued before ``sendto`` returns, so this
#: bounds only a kernel that does not answer at all (the event loop waits that long).
DIAG_TIMEOUT_S = 0.1
#: The largest answer read: a ``struct inet_diag_msg`` and the few attributes the kernel
#: adds unasked (about 130 bytes); a longer one is cut short there, and refused.
DIAG_REPLY_MAX = 4096
#: Why a netlink socket for sock_diag cannot be made where the /proc tables still may be
#: read (a sandbox, a kernel without it); any other failure (no fd left) refuses the peer.
_NO_SOCK_DIAG = frozenset({errno.EPERM, errno.EACCES, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT,
                           errno.ESOCKTNOSUPPORT, errno.EINVAL})
#: ``struct nlmsghdr``: length, type, flags, seq, pid (native byte order).
_NLMSGHDR = struct.Struct("=IHHII")
#: ``struct inet_diag_req_v2`` before its sockid: family, protocol, ext, pad, states.
_DIAG_REQ = struct.Struct("=BBBBI")
#: ``struct inet_diag_msg`` before its sockid: family, state, timer, retrans.
_DIAG_MSG_HEAD = struct.Struct("=BBBB")
#: ``struct inet_diag_sockid``: sport, dport (big-endian), src, dst (4 big-endian words
#: each, an IPv4 address in the first), then if and cookie[2] (native).
_SOCKID_ADDR = struct.Struct(">HH16s16s")
_SOCKID_REST = struct.Struct("=III")
#: ``struct inet_diag_msg`` after its sockid: expires, rqueue, wqueue, uid, inode.
_DIAG_MSG_TAIL = struct.Struct("=IIIII")
_DIAG_MSG_SIZE = _DIAG_MSG_HEAD.size + _SOCKID_ADDR.size + _SOCKID_REST.size + _DIAG_MSG_TAIL.size  # 72
_NLMSGERR = struct.Struct("=i")  # struct nlmsgerr begins with the (negative) errno
_seqs = itertools.count(1)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]
ByteOrder = Literal["little", "big"]


@dataclass(frozen=True)
class PeerCheck:
    """Who is at the other end of an accepted connection, and whether they may stay."""

    transport: str  # "tcp" or "unix"
    address: str  # "HOST:PORT" of a TCP client; "unix" for a Unix socket's (it has no name)
    uid: int | None  # None: not known (no client socket, one its owner closed, or an address that names no one)
    pid: int | None = None  # a Unix socket's peer only
    refused: str | None = None  # why the connection is refused; None: it may go on


@dataclass(frozen=True)
class ClientSocket:
    """What the kernel says of the client's end of a TCP connection."""

    state: int  # TCP_STATES
    uid: int  # who made it; meaningless when ``inode`` is 0 (the kernel says 0 then, or soon)
    inode: int  # its socket inode; 0: no file refers to it any more (closed by its owner)

    def owner_unknown(self) -> str | None:
        """Why its uid does not say who made it, or None when it does: a socket no file
        refers to (its owner closed it; the kernel keeps it to finish the connection and
        reports uid 0 for it, whoever made it), and a TIME_WAIT one (closed; the same).
        The inode decides, not the state: a client may half-close (shutdown) and still
        hold its socket, in FIN_WAIT2, as its own uid."""
        state = TCP_STATES.get(self.state, f"state {self.state}")
        if self.state == TCP_STATE_TIME_WAIT or self.inode == 0:
            return f"the client closed its socket ({state}): its owner cannot be known"
        return None


@dataclass(frozen=True)
class TcpRow:
    """One socket of a ``/proc/net/tcp`` table."""

    local: Endpoint
    remote: Endpoint
    state: int
    uid: int
    inode: int


class DiagReplyError(ValueError):
    """The kernel's answer to a sock_diag request is not one that can be read (or is an
    error other than "no such socket"): the peer is refused, the server goes on."""


def allowed_uids(extra: Iterable[int] = ()) -> frozenset[int]:
    """Root, whoever this server runs as, and the ``extra`` uids the operator allowed."""
    return frozenset({0, os.geteuid(), *extra})


#: The most users one listener may let in besides root and itself: a list that long is a
#: mistake (a group of users is not what the option is for).
ALLOW_USERS_MAX = 64


#: Where the kernel says which uid stands for every user it cannot map into our user
#: namespace (``overflowuid``, 65534 by default: ``nobody``'s).
OVERFLOW_UID_PATH = Path("/proc/sys/kernel/overflowuid")
OVERFLOW_UID_DEFAULT = 65534


def overflow_uid() -> int:
    try:
        return int(OVERFLOW_UID_PATH.read_text().strip())
    except (OSError, ValueError):
        return OVERFLOW_UID_DEFAULT


def is_uid_text(text: str) -> bool:
    """``text`` is written as a uid: ASCII digits only (``str.isdecimal`` also takes other
    scripts' digits: '١٢٣' would be uid 123, a user whose name it may be)."""
    return text.isascii() and text.isdigit()


#: The highest uid a user may be named by: (uid_t)-1 means "no user" to the kernel.
UID_MAX = 0xFFFFFFFE


class UserRefused(ValueError):
    """An allowed-user entry that cannot name one user; the text says what was expected."""


def overflow_refusal(uid: int, overflow: int) -> UserRefused | None:
    """Why ``uid`` cannot be allowed, or None: the kernel's overflow uid (``overflow_uid``;
    ``nobody``'s) — every process of another user namespace the kernel cannot map shows
    as that uid, on a Unix socket and in sock_diag alike, so allowing it would let all of
    them in."""
    if uid != overflow:
        return None
    return UserRefused(f"a uid other than the kernel's overflow uid {overflow} (every process of another "
                       f"user namespace shows as it, so it cannot name one user)")


def written_uid(user: str, overflow: int) -> int | None:
    """The uid ``user`` is written as (``is_uid_text``), or None for a name to look up.
    UserRefused for a uid past ``UID_MAX`` or the overflow uid (``overflow_refusal``).
    Shared by the site file's syntax check and ``resolve_users``, so both refuse alike."""
    if not is_uid_text(user):
        return None
    uid = int(user)
    if uid > UID_MAX:
        raise UserRefused(f"a uid of 0..{UID_MAX}")
    if (refused := overflow_refusal(uid, overflow)) is not None:
        raise refused
    return uid


def resolve_users(users: Iterable[str], option: str) -> frozenset[int]:
    """The uids of ``users``: names of this host's users (``getpwnam``) or uids written in
    ASCII digits (``written_uid``). ConfigError naming ``option`` and the entry refused:
    neither of those, or a name whose uid is the overflow uid (``overflow_refusal``)."""
    import pwd

    uids: set[int] = set()
    overflow = overflow_uid()
    for user in users:
        if not isinstance(user, str):
            raise ConfigError(f"{option} {str(user)[:32]}: expected a user name or a uid")
        try:
            uid = written_uid(user, overflow)
        except UserRefused as e:
            raise ConfigError(f"{option} {user[:32]}: expected {e}") from None  # ASCII digits
        if uid is None:
            try:
                uid = pwd.getpwnam(user).pw_uid
            except (KeyError, ValueError):  # ValueError: a NUL in the name
                raise ConfigError(f"{option} {user[:64]!r}: no such user on this host "
                                  f"(expected a user name or a uid)") from None
            if (refused := overflow_refusal(uid, overflow)) is not None:
                raise ConfigError(f"{option} {user[:64]!r}: its uid {uid}: expected {refused}")
        uids.add(uid)
    if len(uids) > ALLOW_USERS_MAX:
        raise ConfigError(f"{option}: {len(uids)} users; expected at most {ALLOW_USERS_MAX}")
    return frozenset(uids)


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


def check_peer(sock: Any, allow_uids: frozenset[int] = frozenset()) -> PeerCheck:
    """Who made the connection on accepted socket ``sock`` (a socket or asyncio's
    TransportSocket), and whether they may use the exports: root, our uid, or on TCP one
    of ``allow_uids``. Synchronous, on the event loop: a loopback TCP client costs one
    sock_diag round trip (``find_client_socket``)."""
    if sock is None:
        return PeerCheck("?", "?", None, refused="no socket to identify the peer by")
    if sock.family == socket.AF_UNIX:
        return _check_unix_peer(sock)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return _check_tcp_peer(sock, allow_uids)
    return PeerCheck("?", "?", None, refused=f"socket family {sock.family}: no way to identify its peer")


def _check_unix_peer(sock: Any) -> PeerCheck:
    try:
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError as exc:
        return PeerCheck("unix", "unix", None, refused=f"SO_PEERCRED failed: {exc.strerror or exc}")
    # The named users are for TCP (the module docstring): here root and ours only, so a
    # socket file whose mode is wrong still lets no one else in.
    return PeerCheck("unix", "unix", uid, pid, _uid_refusal(uid, frozenset()))


def _check_tcp_peer(sock: Any, allow_uids: frozenset[int]) -> PeerCheck:
    try:
        ours, theirs = _endpoint(sock.getsockname()), _endpoint(sock.getpeername())
    except OSError as exc:  # the client is gone already
        return PeerCheck("tcp", "?", None, refused=f"no peer address: {exc.strerror or exc}")
    address = _text(theirs)
    if not ours[0].is_loopback:
        # Reached through an address other machines can reach: nobody can be identified.
        # Every caller starts such a listener only on the operator's explicit opt-in
        # (remote_listen_problem), which says exactly that.
        return PeerCheck("tcp", address, None)
    try:
        where, found = find_client_socket(ours, theirs)
    except (OSError, DiagReplyError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return PeerCheck("tcp", address, None, refused=f"the kernel did not say who made the connection: {why}")
    if found is None:
        return PeerCheck("tcp", address, None, refused=(
            f"{where} knows no socket with local address {address} and remote address {_text(ours)}: "
            f"the connecting process is unknown (it is gone)"))
    unknown = found.owner_unknown()
    if unknown is not None:
        return PeerCheck("tcp", address, None, refused=unknown)
    return PeerCheck("tcp", address, found.uid, refused=_uid_refusal(found.uid, allow_uids))


def _uid_refusal(uid: int, allow_uids: frozenset[int]) -> str | None:
    if uid in allowed_uids(allow_uids):
        return None
    allowed = f", nor an allowed user's (uids {', '.join(map(str, sorted(allow_uids)))})" if allow_uids else ""
    return f"uid {uid} is neither root nor the server's (uid {os.geteuid()}){allowed}"


def _text(endpoint: Endpoint) -> str:
    address, port = endpoint
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _endpoint(sockaddr: tuple) -> Endpoint:
    """(address, port) of a socket address, an IPv4-mapped IPv6 address as IPv4: the
    client may have made its socket either way."""
    return _unmapped(ipaddress.ip_address(sockaddr[0].split("%", 1)[0])), int(sockaddr[1])


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def find_client_socket(ours: Endpoint, theirs: Endpoint) -> tuple[str, ClientSocket | None]:
    """The client's end of a TCP connection between ``theirs`` (the client's address and
    port) and ``ours``: the socket whose local address is theirs and whose remote address
    is ours, as (where it was looked for, the socket or None when there is none).

    Asks sock_diag (``diag_client_socket``); only when no netlink socket for it can be
    made (``_NO_SOCK_DIAG``: a sandbox, a kernel without it) reads the /proc tables
    (``proc_client_socket``). Raises ``OSError`` or ``DiagReplyError`` when the kernel's
    answer cannot be had or read: the caller refuses the peer."""
    try:
        diag = open_diag_socket()
    except OSError as exc:
        if exc.errno not in _NO_SOCK_DIAG:
            raise
        return " or ".join(map(str, TCP_TABLES)), proc_client_socket(ours, theirs, TCP_TABLES)
    with diag:
        return "sock_diag", diag_client_socket(diag, ours, theirs)


# ---------------------------------------------------------------------- sock_diag


def open_diag_socket() -> socket.socket:
    """A netlink socket for sock_diag requests, with ``DIAG_TIMEOUT_S`` to receive. A new
    one for each peer: no answer to an earlier request (one that timed out) can be left in
    it to be read as this one's."""
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    diag.settimeout(DIAG_TIMEOUT_S)
    return diag


def diag_client_socket(diag: socket.socket, ours: Endpoint, theirs: Endpoint) -> ClientSocket | None:
    """The client's end of the connection between ``theirs`` and ``ours`` by sock_diag
    netlink socket ``diag``, or None when the kernel has no such socket. An IPv4 client is
    asked for as AF_INET, then as AF_INET6 with IPv4-mapped addresses (an IPv6 socket's
    IPv4 connection, which kernels before 4.x find only so)."""
    for family, client, server in _diag_queries(ours, theirs):
        found = diag_lookup(diag, family, client, server)
        if found is not None:
            return found
    return None


def _diag_queries(ours: Endpoint, theirs: Endpoint) -> list[tuple[int, Endpoint, Endpoint]]:
    if theirs[0].version != ours[0].version:  # never from one connection's two ends (both unmapped)
        return []
    if theirs[0].version == 6:
        return [(socket.AF_INET6, theirs, ours)]
    return [(socket.AF_INET, theirs, ours),
            (socket.AF_INET6, (_mapped(theirs[0]), theirs[1]), (_mapped(ours[0]), ours[1]))]


def _mapped(address: IPAddress) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def diag_lookup(diag: socket.socket, family: int, local: Endpoint, remote: Endpoint) -> ClientSocket | None:
    """One sock_diag request on ``diag``: the TCP socket of ``family`` whose local address
    is ``local`` and whose remote address is ``remote``, or None (-ENOENT). Raises
    ``OSError`` (timeout included) and ``DiagReplyError`` (``parse_diag_reply``)."""
    seq = next(_seqs) & 0xFFFFFFFF
    diag.sendto(diag_request(family, local, remote, seq), (0, 0))
    reply, (sender, _groups) = diag.recvfrom(DIAG_REPLY_MAX)
    if sender != 0:  # only the kernel (netlink port 0) answers; only root could send us anything else
        raise DiagReplyError(f"an answer from netlink port {sender}, not the kernel")
    return parse_diag_reply(reply, seq, local, remote)


def diag_request(family: int, local: Endpoint, remote: Endpoint, seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request (``struct nlmsghdr`` + ``struct inet_diag_req_v2``)
    for the one TCP socket of ``family`` with these exact addresses, any state."""
    body = (_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + _SOCKID_ADDR.pack(local[1], remote[1], _diag_address(local[0]), _diag_address(remote[0]))
            + _SOCKID_REST.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body


def _diag_address(address: IPAddress) -> bytes:
    return address.packed.ljust(16, b"\0")  # an IPv4 address in the first of the four words


def parse_diag_reply(reply: bytes, seq: int, local: Endpoint, remote: Endpoint) -> ClientSocket | None:
    """The socket in the kernel's answer ``reply`` to request ``seq`` for the socket with
    ``local`` and ``remote`` addresses; None for the kernel's -ENOENT (no such socket).
    Anything else raises ``DiagReplyError``: a message cut short or longer than what was
    read, another type or seq, another errno, a family other than IPv4/IPv6, and a socket
    whose addresses are not the ones asked for — but for a listener on the local port,
    which the kernel's exact lookup answers with when no connection has them: None."""
    if len(reply) < _NLMSGHDR.size:
        raise DiagReplyError(f"an answer of {len(reply)} bytes, shorter than a netlink header")
    length, kind, _flags, got_seq, _port = _NLMSGHDR.unpack_from(reply)
    if not _NLMSGHDR.size <= length <= len(reply):
        raise DiagReplyError(f"a netlink message of {length} bytes in an answer of {len(reply)}")
    if got_seq != seq:
        raise DiagReplyError(f"the answer to request {got_seq}, not to {seq}")
    if kind == NLMSG_ERROR:
        if length < _NLMSGHDR.size + _NLMSGERR.size:
            raise DiagReplyError(f"an error message of {length} bytes")
        (error,) = _NLMSGERR.unpack_from(reply, _NLMSGHDR.size)
        if error == -errno.ENOENT:
            return None
        raise DiagReplyError(f"sock_diag failed: {os.strerror(-error) if error < 0 else f'status {error}'}")
    if kind != SOCK_DIAG_BY_FAMILY:
        raise DiagReplyError(f"a netlink message of type {kind}, not {SOCK_DIAG_BY_FAMILY}")
    if length < _NLMSGHDR.size + _DIAG_MSG_SIZE:
        raise DiagReplyError(f"a socket message of {length} bytes, shorter than struct inet_diag_msg")
    offset = _NLMSGHDR.size
    family, state, _timer, _retrans = _DIAG_MSG_HEAD.unpack_from(reply, offset)
    offset += _DIAG_MSG_HEAD.size
    sport, dport, src, dst = _SOCKID_ADDR.unpack_from(reply, offset)
    offset += _SOCKID_ADDR.size + _SOCKID_REST.size
    _expires, _rqueue, _wqueue, uid, inode = _DIAG_MSG_TAIL.unpack_from(reply, offset)
    if family == socket.AF_INET:
        found_local, found_remote = ipaddress.ip_address(src[:4]), ipaddress.ip_address(dst[:4])
    elif family == socket.AF_INET6:
        found_local, found_remote = _unmapped(ipaddress.ip_address(src)), _unmapped(ipaddress.ip_address(dst))
    else:
        raise DiagReplyError(f"a socket of family {family}")
    want = ((_unmapped(local[0]), local[1]), (_unmapped(remote[0]), remote[1]))
    if ((found_local, sport), (found_remote, dport)) != want:
        if state == TCP_STATE_LISTEN and sport == local[1]:  # no connection: the listener on its port
            return None
        raise DiagReplyError(f"a socket of {_text((found_local, sport))} to {_text((found_remote, dport))}, not the "
                             f"one asked for")
    return ClientSocket(state, uid, inode)


# ---------------------------------------------------------------------- /proc/net/tcp (the fallback)


def proc_client_socket(ours: Endpoint, theirs: Endpoint, tables: Iterable[Path] = TCP_TABLES) -> ClientSocket | None:
    """The client's end of a TCP connection between ``theirs`` and ``ours`` by the kernel's
    socket tables: the row whose local address is theirs and whose remote address is ours.
    None when no table has one (the client is gone, or the tables cannot be read). A
    TIME_WAIT row is passed over (an older connection of the same ports may be there too);
    a row for a socket its owner closed is returned, and refused by the caller. Only where
    sock_diag cannot be had: milliseconds per call, and a row may be missed under churn."""
    for table in tables:
        try:
            text = table.read_text()
        except OSError:  # tcp6 on a host without IPv6; a /proc we may not read: no row from it
            continue
        for row in parse_tcp_table(text):
            if row.local == theirs and row.remote == ours and row.state != TCP_STATE_TIME_WAIT:
                return ClientSocket(row.state, row.uid, row.inode)
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
                         int(fields[3], 16), int(fields[7]), int(fields[9]))
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
