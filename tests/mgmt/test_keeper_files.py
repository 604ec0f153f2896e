"""The files the keeper trusts (cdp/msa/keeper.py, FORMAT.md §13.3, §13.13): pid files that
are no pid file we wrote (a FIFO, a link, a megabyte) are refused at once and never acted
on; the directories the daemon makes for its children are 0755 whatever the umask, one
another user may write is refused before a pid file in it is read, and a log is never
opened through a link.

The FIFO tests run under an alarm: before the fix, ``open()`` of a FIFO waited for a
writer for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdp.errors import ConfigError
from cdp.hypervisor.simulator import SimulatorHypervisor
from cdp.msa.daemon import MsaDaemon
from cdp.msa.install_daemon import daemon_state
from cdp.msa.keeper import PID_FILE_BYTES_MAX, Kept, ProcessKeeper, pid_path, read_pid_file, start_ticks, write_pid_file
from cdp.msa.supervisor import Supervisor
from cdp.testing.site import make_site, running_daemon

SLEEPER = ["-c", "import time; time.sleep(120)"]
HELLO = ["-c", "print('hello from the child')"]
BLOCKED_S = 5.0


class Blocked(Exception):
    """Not an OSError: no ``except OSError`` on the way may take it for a read error."""


@pytest.fixture
def alarm() -> Iterator[None]:
    """A read that would block for ever fails the test after ``BLOCKED_S`` instead."""
    def fire(signum: int, frame: Any) -> None:
        raise Blocked(f"blocked for {BLOCKED_S:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, BLOCKED_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def umask_000() -> Iterator[None]:
    """The service runs under umask 000 (a unit with ``UMask=0000``)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def innocent() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def keeper() -> ProcessKeeper:
    return ProcessKeeper("test", os.environ, time.monotonic, stop_timeout_s=5.0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --------------------------------------------------------------------------- pid files we did not write


def test_a_pid_file_that_is_no_regular_file_is_refused_at_once(tmp_path: Path, alarm: None) -> None:
    fifo, link, big = tmp_path / "fifo.pid", tmp_path / "link.pid", tmp_path / "big.pid"
    os.mkfifo(fifo)
    write_pid_file(tmp_path / "real.pid", os.getpid())
    link.symlink_to(tmp_path / "real.pid")
    big.write_text(f"{os.getpid()} {start_ticks(os.getpid())}" + " " * PID_FILE_BYTES_MAX + "\n")
    for path, what in ((fifo, "a FIFO"), (link, "a symbolic link"),
                       (big, f"more than {PID_FILE_BYTES_MAX} bytes")):
        with pytest.raises(ValueError) as err:
            read_pid_file(path)
        assert str(err.value) == f"{path}: {what}, not a pid file cdp wrote"
    assert read_pid_file(tmp_path / "real.pid") == (os.getpid(), start_ticks(os.getpid()))
    assert read_pid_file(tmp_path / "none.pid") is None


def test_uninstall_and_the_daemon_are_not_held_by_a_fifo_at_msa_pid(tmp_path: Path, alarm: None) -> None:
    site = make_site(tmp_path / "site", install=True)
    pid_file = site.cfg.state_dir / "msa.pid"
    os.mkfifo(pid_file)
    with pytest.raises(ConfigError) as err:  # what cdp uninstall and its preflight read first
        daemon_state(site.cfg)
    assert err.value.message == f"{pid_file}: a FIFO, not a pid file cdp wrote"
    daemon = MsaDaemon(site.cfg, site.env)
    daemon.claim.take()  # a leftover: replaced by this daemon's
    try:
        assert read_pid_file(pid_file) == (os.getpid(), start_ticks(os.getpid()))
    finally:
        daemon.claim.release()


async def test_a_fifo_at_a_childs_pid_file_is_replaced_not_waited_on(tmp_path: Path, alarm: None) -> None:
    log = tmp_path / "logs" / "drva-1.log"
    log.parent.mkdir(mode=0o755)
    kept = Kept(name="drva-1", log_path=log)
    os.mkfifo(pid_path(kept))
    k = keeper()
    await k.spawn(kept, SLEEPER)
    try:
        assert kept.proc is not None and read_pid_file(pid_path(kept))[0] == kept.proc.pid
    finally:
        await k.stop(kept)


# --------------------------------------------------------------------------- directories and logs


async def test_the_childrens_directories_are_private_under_umask_000(tmp_path: Path) -> None:
    state = tmp_path / "state"
    kept = Kept(name="standby-erp", log_path=state / "logs" / "standby-erp.log",
                status_path=state / "standby" / "erp.status.json")
    k = keeper()
    with umask_000():
        await k.spawn(kept, SLEEPER)
    try:
        assert kept.proc is not None
        assert (mode(state), mode(state / "logs"), mode(state / "standby")) == (0o755, 0o755, 0o755)
        assert mode(kept.log_path) == 0o640
    finally:
        await k.stop(kept)


async def test_a_logs_dir_others_may_write_is_refused_before_its_pid_file_is_read(
        tmp_path: Path, innocent: subprocess.Popen) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)  # an older daemon made it under umask 000; anyone planted a pid file
    kept = Kept(name="drva-1", log_path=logs / "drva-1.log")
    write_pid_file(pid_path(kept), innocent.pid)
    k = keeper()
    await k.spawn(kept, SLEEPER)
    assert kept.proc is None and kept.state == "restarting"
    assert kept.last_error.startswith(f"cannot start: {logs} may be written by other users (mode 0777): ")
    assert kept.last_error.endswith(f"(chmod go-w) ({logs})")
    assert innocent.poll() is None and not kept.log_path.exists()


@pytest.mark.parametrize("planted", ["link", "fifo"])
async def test_a_log_path_that_is_no_regular_file_is_never_written(tmp_path: Path, alarm: None,
                                                                   planted: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    target = tmp_path / "root_only.conf"
    target.write_text("root-owned file, untouched\n")
    kept = Kept(name="drva-1", log_path=logs / "drva-1.log")
    if planted == "link":
        kept.log_path.symlink_to(target)
    else:
        os.mkfifo(kept.log_path)
    k = keeper()
    await k.spawn(kept, HELLO)
    assert kept.proc is None and kept.state == "restarting"
    what = "a symbolic link" if planted == "link" else "a FIFO or a socket"
    assert kept.last_error == f"cannot start: {what}, not a log file: never followed; move it away ({kept.log_path})"
    assert target.read_text() == "root-owned file, untouched\n"


def test_the_supervisor_and_the_simulator_make_their_directories_0755_under_umask_000(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", install=False)
    state = site.cfg.state_dir
    supervisor = Supervisor(site.cfg, site.env)
    spec = site.cfg.drvas[0]
    hypervisor = SimulatorHypervisor(site.cfg, site.env)
    with umask_000():
        supervisor._write_config(supervisor._new(spec, ("erp",)))
        hypervisor._write_inventory(hypervisor._new("esx-01", ("erp",)))
    drva_dir = site.cfg.drva_state_dir(spec)
    for path in (state, state / "drvas", drva_dir, drva_dir / "requests", state / "hypervisor"):
        assert mode(path) == 0o755, path


async def test_a_daemon_under_umask_000_leaves_nothing_others_may_write(tmp_path: Path) -> None:
    """The audit's run: the daemon and its DRVA under umask 000 (the site installed
    under the usual one)."""
    site = make_site(tmp_path / "site", install=True)
    state = site.cfg.state_dir
    with umask_000():
        async with running_daemon(site) as daemon:
            deadline = time.monotonic() + 60
            while (view := daemon.supervisor.view("drva-1")) is None or view.state != "up":
                assert time.monotonic() < deadline, view
                await asyncio.sleep(0.1)
            writable = [str(p) for p in [state, *state.rglob("*")] if p.is_dir() and not p.is_symlink()
                        and mode(p) & 0o022]
    assert writable == []


async def test_a_running_childs_log_is_rotated_and_the_child_writes_on(tmp_path: Path, monkeypatch) -> None:
    """A child's log was rotated only at its next start: a DRVA that ran for months grew
    one file without bound."""
    import cdp.msa.keeper as keeper_mod

    monkeypatch.setattr(keeper_mod, "LOG_ROTATE_BYTES", 64 << 10)
    monkeypatch.setattr(keeper_mod, "LOG_CHECK_INTERVAL_S", 0.0)
    log = tmp_path / "logs" / "talker.log"
    log.parent.mkdir(mode=0o755)
    kept = Kept(name="talker", log_path=log)
    k = keeper()
    chatty = ["-c", "import sys, time\nfor i in range(10**9):\n    print(f'line {i:08d}', flush=True)\n"
                    "    if i % 500 == 0: time.sleep(0.001)\n"]
    await k.spawn(kept, chatty)
    try:
        rotated = log.with_name(log.name + ".1")
        deadline = time.monotonic() + 60
        while not rotated.exists() and time.monotonic() < deadline:
            await k.tend(kept, k.spawn)
            await asyncio.sleep(0.01)
        assert rotated.exists() and rotated.stat().st_size > 64 << 10
        first_kept = rotated.read_text().splitlines()[0]
        assert first_kept == "line 00000000"
        sizes = []
        for _ in range(50):
            await k.tend(kept, k.spawn)
            sizes.append(log.stat().st_size)
            await asyncio.sleep(0.01)
        assert max(sizes) < 4 << 20 and kept.proc is not None and kept.proc.returncode is None
        # The child writes on, at the start of the cut file (O_APPEND). Its first line may
        # be the end of a line the cut split (a line can take two writes, as print's text
        # and its newline may), and its last one not written whole yet: the others are.
        lines = log.read_text().splitlines()
        assert len(lines) > 2 and all(line.startswith("line ") for line in lines[1:-1]), lines[:3]
    finally:
        await k.stop(kept)


def test_the_last_error_of_a_log_cut_just_before_the_exit_is_read_from_its_copy(tmp_path: Path) -> None:
    """The log of a child that logged its error and exited may be cut (copytruncate) before
    its exit is seen: the reason is in ``<log>.1``, and said so."""
    import json as json_mod

    from cdp.msa.keeper import last_error

    log = tmp_path / "drva-1.log"
    log.write_text("")
    (tmp_path / "drva-1.log.1").write_text(json_mod.dumps({"level": "error", "event": "log_error",
                                                           "error": "EIO reading the log"}) + "\n")
    assert last_error(log) == "log_error: EIO reading the log (in drva-1.log.1)"
    log.write_text(json_mod.dumps({"level": "error", "event": "meta_error", "error": "no slot"}) + "\n")
    assert last_error(log) == "meta_error: no slot"
