"""Free local TCP ports for servers started a moment later: the demo's, the tests' and
the benchmarks' DRVAs, MSAs and NBD servers, all on 127.0.0.1."""

from __future__ import annotations

import collections
import random
import socket
import sys
import threading
from pathlib import Path

#: Where the kernel picks the source ports of outgoing connections (and the ports of
#: ``bind(0)``); read from /proc where it can be.
EPHEMERAL_RANGE_PATH = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_RANGE_DEFAULT = (32768, 60999)
#: Ports below this are left to the system's services.
PORT_MIN = 10000
#: How many of its latest picks a process keeps reserved (one abstract Unix socket each).
RESERVED_MAX = 256
_ports = random.Random()
_lock = threading.Lock()
_given: set[int] = set()  # every port this process handed out: never handed out again
_reserved: collections.deque[socket.socket] = collections.deque()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in EPHEMERAL_RANGE_PATH.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return EPHEMERAL_RANGE_DEFAULT


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now and *outside* the kernel's ephemeral range.

    Why outside: tests stop and restart a server on the port they picked while its
    clients keep reconnecting. A port from the ephemeral range (what ``bind(0)`` hands
    out) can become, meanwhile, the source port of some outgoing connection — another
    test's, or even the reconnecting client's own (a TCP self-connect when nothing
    listens on a local port) — and the restart fails with EADDRINUSE: CI saw a DRVA
    started late by tests/nbd/test_capture.py fail so. Outside that range a port is
    taken only by an explicit bind; every test, and the demo, picks its ports here, at
    random.

    A port that is free now is not yet bound by whoever picked it: between the pick and
    the server's bind (a daemon's start: seconds), or while a test restarts a server on
    it, a second pick could return it again, and one of the two servers then fails with
    EADDRINUSE (CI saw a two-site test's second MSA refuse its API port so). So a port
    is handed out once per process, and reserved across processes while it is among the
    process's ``RESERVED_MAX`` latest picks: an abstract Unix socket named after it
    (Linux; no file, gone with the process) that other processes' picks find taken.
    Falls back to ``bind(0)`` when no port outside the range is free."""
    lo, hi = _ephemeral_range()
    spans = [(a, b) for a, b in ((PORT_MIN, lo - 1), (hi + 1, 65535)) if b >= a]
    total = sum(b - a + 1 for a, b in spans)
    with _lock:
        for _ in range(100 if total else 0):
            k = _ports.randrange(total)
            for a, b in spans:
                if k <= b - a:
                    port = a + k
                    break
                k -= b - a + 1
            if port in _given or not _bindable(port):
                continue  # handed out here before, in use (or in TIME_WAIT): another
            if not _reserve(port):
                continue  # another process picked it
            _given.add(port)
            return port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _reserve(port: int) -> bool:
    """Hold ``port``'s reservation (False: another process holds it). Where there are no
    abstract sockets (not Linux), nothing is reserved across processes."""
    if not sys.platform.startswith("linux"):
        return True
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(f"\0cdp-port-{port}")
    except OSError:
        s.close()
        return False
    _reserved.append(s)
    while len(_reserved) > RESERVED_MAX:
        _reserved.popleft().close()
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports from ``free_port``: for servers that each bind one of them
    later. ``free_port`` never gives a port twice in a process, except its ``bind(0)``
    fallback (no room outside the ephemeral range), which may: such a repeat is drawn again."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports
