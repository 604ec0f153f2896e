"""cdp.ports.free_port: free ports outside the kernel's ephemeral range."""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cdp import ports
from cdp.testing import drva_config


def test_free_ports_are_bindable_and_outside_the_ephemeral_range() -> None:
    lo, hi = ports._ephemeral_range()
    for _ in range(200):
        port = ports.free_port()
        assert ports.PORT_MIN <= port < lo or hi < port <= 65535, port
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: no EADDRINUSE


def test_a_port_in_use_is_not_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A port in use outside the range is never given: the candidates are the taken
    port and the few above it, and each is tried by binding it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        rng = tmp_path / "range"
        rng.write_text(f"{ports.PORT_MIN} {port - 1}\n")
        monkeypatch.setattr(ports, "EPHEMERAL_RANGE_PATH", rng)
        for _ in range(20):
            got = drva_config.free_port()
            assert got != port


def test_no_room_outside_the_range_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = tmp_path / "range"
    rng.write_text(f"{ports.PORT_MIN} 65535\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_PATH", rng)
    port = drva_config.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_tests_and_the_demo_take_the_same_function() -> None:
    from benchmarks import _common
    from cdp import demo
    assert drva_config.free_port is ports.free_port is _common.free_port
    assert demo.free_ports is ports.free_ports


def test_free_ports_are_distinct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two draws may give the same port: ``free_ports`` draws again until they differ."""
    draws = iter([20001, 20001, 20002, 20001, 20003])
    monkeypatch.setattr(ports, "free_port", lambda: next(draws))
    assert ports.free_ports(3) == [20001, 20002, 20003]


@pytest.fixture
def only_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Confine ``free_port``'s candidates to one free port outside the ephemeral range, in
    a process that has handed out and reserved nothing yet; gives (port, range file)."""
    reserved: collections.deque[socket.socket] = collections.deque()
    monkeypatch.setattr(ports, "_reserved", reserved)
    port = ports.free_port()  # free now, and reserved by no other process
    reserved.popleft().close()
    rng = tmp_path / "range"
    rng.write_text(f"{port + 1} 65535\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_PATH", rng)
    monkeypatch.setattr(ports, "PORT_MIN", port)
    monkeypatch.setattr(ports, "_given", set())
    yield port, rng
    for s in reserved:
        s.close()


def test_a_port_is_handed_out_once_per_process(only_port) -> None:
    """Two picks before either server binds (a site's DRVA and API ports, two sites of
    one test) never get the same port: the second takes another."""
    port, _ = only_port
    assert ports.free_port() == port
    again = ports.free_port()
    assert again != port


def test_a_port_another_process_picked_is_not_given_until_it_exits(only_port) -> None:
    """The port a process picked is reserved (not bound: its server starts later) and no
    other process gets it; once that process is gone, the port is free again."""
    port, rng = only_port
    code = ("import sys; from pathlib import Path; from cdp import ports; "
            "ports.EPHEMERAL_RANGE_PATH = Path(sys.argv[1]); ports.PORT_MIN = int(sys.argv[2]); "
            "print(ports.free_port(), flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code, str(rng), str(port)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and int(other.stdout.readline()) == port
        assert ports.free_port() != port
    finally:
        other.communicate("")
    assert other.returncode == 0
    assert ports.free_port() == port


def test_a_process_keeps_only_its_latest_reservations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "RESERVED_MAX", 3)
    reserved: collections.deque[socket.socket] = collections.deque()
    monkeypatch.setattr(ports, "_reserved", reserved)
    picked = [ports.free_port() for _ in range(5)]
    assert len(set(picked)) == 5 and len(reserved) == 3
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(f"\0cdp-port-{picked[0]}")  # released: the oldest picks
    for port in picked[2:]:
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
            s.bind(f"\0cdp-port-{port}")
    for s in reserved:
        s.close()
