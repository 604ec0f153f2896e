"""cdp.ports.free_port: free ports outside the kernel's ephemeral range."""

from __future__ import annotations

import socket
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
