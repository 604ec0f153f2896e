"""Children a killed daemon left running (``cdp.msa.keeper``, FORMAT.md §13.13): the next
daemon stops them before it starts its own — never two DRVAs on one log, never two hosts
on one disk — and a pid file that names someone else's process is never acted on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cdp.msa.keeper import Kept, ProcessKeeper, _running_command, pid_path, start_ticks

SLEEPER = ["-c", "import time; time.sleep(120)"]
STUBBORN = ["-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(120)"]


def keeper(stop_timeout_s: float = 5.0) -> ProcessKeeper:
    return ProcessKeeper("test", os.environ, time.monotonic, stop_timeout_s=stop_timeout_s)


def pid_file(kept: Kept) -> tuple[int, int]:
    pid, ticks = map(int, pid_path(kept).read_text().split())
    return pid, ticks


async def test_a_leftover_of_a_killed_daemon_is_stopped_before_its_successor_starts(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "drva-a1.log"
    first = Kept(name="drva-a1", log_path=log)
    await keeper().spawn(first, SLEEPER)
    assert pid_file(first) == (first.proc.pid, start_ticks(first.proc.pid))
    # The daemon is SIGKILLed: nobody stops its child. The next daemon's keeper starts it.
    second = Kept(name="drva-a1", log_path=log)
    k = keeper()
    await k.spawn(second, SLEEPER)
    try:
        assert start_ticks(first.proc.pid) is None  # stopped (a zombie until reaped, then gone)
        assert await first.proc.wait() == -15  # by SIGTERM: an orderly stop was asked first
        assert pid_file(second)[0] == second.proc.pid != first.proc.pid
    finally:
        await k.stop(second)
    assert not pid_path(second).exists()


async def test_a_leftover_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "host-esx-a1.log"
    first = Kept(name="host-esx-a1", log_path=log)
    await keeper().spawn(first, STUBBORN)
    deadline = time.monotonic() + 30
    while "ready" not in log.read_text() and time.monotonic() < deadline:  # its SIGTERM handler is set
        time.sleep(0.02)
    second = Kept(name="host-esx-a1", log_path=log)
    k = keeper(stop_timeout_s=0.3)
    await k.spawn(second, SLEEPER)
    try:
        assert await first.proc.wait() == -9
    finally:
        await k.stop(second)


async def test_a_pid_file_naming_another_process_is_ignored(tmp_path: Path) -> None:
    log = tmp_path / "drva-b1.log"
    other = subprocess.Popen([sys.executable, *SLEEPER, "another command line"])
    try:
        for text in (f"{other.pid} {start_ticks(other.pid) + 1}\n",  # its pid, reused: not the same process
                     f"{other.pid}\n", "garbage", ""):
            pid_path(Kept(name="x", log_path=log)).write_text(text)
            kept = Kept(name="drva-b1", log_path=log)
            k = keeper()
            await k.spawn(kept, SLEEPER)
            try:
                assert other.poll() is None, text  # untouched
                assert pid_file(kept)[0] == kept.proc.pid
            finally:
                await k.stop(kept)
    finally:
        other.kill()
        other.wait()


async def test_a_leftover_no_pid_file_names_is_found_by_its_command_line(tmp_path: Path) -> None:
    """A daemon killed between spawning a child and writing its pid file: the child runs
    on, named by nothing; the next spawn of the same command line stops it first. A
    process of another command line is left alone."""
    log = tmp_path / "drva-b1.log"
    orphan = subprocess.Popen([sys.executable, *SLEEPER], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, *SLEEPER, "another command line"])
    try:
        # Popen returns once the exec began, and the kernel sets a process's argument
        # area a little later: a /proc scan in between reads an empty command line. A
        # leftover of a killed daemon ran long before; wait until this one is as visible.
        deadline = time.monotonic() + 30
        while orphan.pid not in dict(_running_command([sys.executable, *SLEEPER])):
            assert time.monotonic() < deadline, "the orphan's command line never showed in /proc"
            time.sleep(0.01)
        kept = Kept(name="drva-b1", log_path=log)
        k = keeper()
        await k.spawn(kept, SLEEPER)
        try:
            assert orphan.wait(30) == -15  # stopped by SIGTERM before the new one started
            assert bystander.poll() is None and kept.proc.returncode is None
        finally:
            await k.stop(kept)
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait()
