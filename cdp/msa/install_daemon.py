"""The daemon as ``cdp uninstall`` (and the preflights) see it: running or not, and how to
stop it without signalling anyone else.

``<state_dir>/msa.pid`` holds the daemon's pid and start time (FORMAT.md §13.3). It names
the daemon only while a process with that pid *and* that start time runs; a stale file
signals nothing. The file is read only in a state directory no other user can write
(``cdp.msa.install_dirs.dir_problem``): there, anyone could name any process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.errors import Busy, ConfigError
from cdp.logs import get_logger
from cdp.msa.config import SiteConfig
from cdp.msa.install_dirs import dir_error, dir_problem
from cdp.msa.keeper import read_pid_file, same_process, stale_reason

log = get_logger("cdp.msa.install")  # install and uninstall log as one, whichever module acts

DAEMON_STOP_TIMEOUT_S = 60.0


def pid_path(cfg: SiteConfig) -> Path:
    return cfg.state_dir / "msa.pid"


@dataclass(frozen=True)
class DaemonState:
    """What ``msa.pid`` says: ``running`` only while the process it names (``pid``,
    started at ``ticks``) is the one that wrote it; ``note`` says which case it is."""

    pid_file: Path
    pid: int | None
    running: bool
    note: str
    ticks: int | None = None  # its start time, from the pid file (FORMAT.md §13.3)

    def to_dict(self) -> dict[str, Any]:
        return {"pid_file": str(self.pid_file), "pid": self.pid, "running": self.running, "note": self.note}


def daemon_state(cfg: SiteConfig) -> DaemonState:
    """The daemon ``<state_dir>/msa.pid`` names, running only if that process is the one
    that wrote it (same pid and start time). ``ConfigError`` when the state directory is
    not ours alone: a pid file another user can write could aim our SIGTERM anywhere."""
    if (problem := dir_problem(cfg.state_dir)) is not None:
        raise dir_error(cfg, "state_dir", cfg.state_dir, problem)
    path = pid_path(cfg)
    try:
        found = read_pid_file(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable pid file ({exc.strerror})") from exc
    if found is None:
        return DaemonState(path, None, False, "no pid file")
    pid, ticks = found
    if not same_process(pid, ticks):
        return DaemonState(path, pid, False, f"stale pid file: {stale_reason(pid, ticks)}", ticks)
    return DaemonState(path, pid, True, f"running as process {pid}", ticks)


def signal_if_same(pid: int, ticks: int | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only while it is the process started at ``ticks``; False
    when it is not (any more). A pidfd pins the process between the check and the
    signal, so a pid reused in between is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd (Linux < 5.3): check, then kill; the window is the pid's reuse
        if not same_process(pid, ticks):
            return False
        os.kill(pid, sig)
        return True
    try:
        if not same_process(pid, ticks):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


async def stop_daemon(cfg: SiteConfig, timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> DaemonState:
    """SIGTERM the running daemon and wait until it exits (``Busy`` after ``timeout_s``).
    A stale pid file signals nothing (``daemon_state``)."""
    state = daemon_state(cfg)
    if not state.running or state.pid is None:
        return state
    log.info("daemon_stopping", pid=state.pid, pid_file=str(state.pid_file))
    if not signal_if_same(state.pid, state.ticks, signal.SIGTERM):
        return DaemonState(state.pid_file, state.pid, False, f"process {state.pid} exited", state.ticks)
    deadline = time.monotonic() + timeout_s
    while same_process(state.pid, state.ticks):
        if time.monotonic() >= deadline:
            raise Busy(f"the daemon (process {state.pid}, from {state.pid_file}) did not exit within "
                       f"{timeout_s:g} s of SIGTERM; stop it (kill {state.pid}) and run uninstall again")
        await asyncio.sleep(0.1)
    log.info("daemon_stopped", pid=state.pid)
    return DaemonState(state.pid_file, state.pid, False, f"stopped process {state.pid} (SIGTERM)", state.ticks)


__all__ = ["DAEMON_STOP_TIMEOUT_S", "DaemonState", "daemon_state", "pid_path", "signal_if_same", "stop_daemon"]
