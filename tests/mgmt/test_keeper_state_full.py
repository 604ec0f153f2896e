"""The keeper on a full (ENOSPC) or read-only (EROFS) state directory (``cdp.msa.keeper``,
found by the full-disk audit with real daemons):

* a restart whose start raised (its owner's control file, written first, hit ENOSPC)
  left the process ``restarting`` with no restart due, for good: it is tried again
  after the back-off now, as a crash is;
* a pid file that could not be removed (EROFS) raised out of ``reap`` — the DRVA that
  exited was never restarted — and out of ``stop`` — the daemon's stop ended there,
  its DRVAs left running: it is logged and left now (it names a process that is gone);
* the rotation of a running child's log copied it to ``<log>.1.tmp`` on a file system
  without room for it: the partial copy stayed, and was made again every 10 s, so the
  state directory stayed full. The copy is made only with room to spare now, a partial
  one is removed, a failed rotation is tried again less and less often, and the
  warning names the log.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from cdp.msa import keeper as keeper_mod
from cdp.msa.keeper import LOG_CHECK_INTERVAL_S, Kept, ProcessKeeper, pid_path, rotate_running
from tests.full_fs import fill, free, free_bytes, tmpfs

SLEEPER = ["-c", "import time; time.sleep(120)"]
MIB = 1 << 20


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def keeper(clock=time.monotonic) -> ProcessKeeper:
    return ProcessKeeper("test", os.environ, clock, stop_timeout_s=5.0)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True, timeout=60)


def write_log(path: Path, size: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (b'{"level":"info","event":"filler"}\n' * (size // 34 + 1))[:size]
    path.write_bytes(data)
    return data


# ---------------------------------------------------------------- a start that fails


async def test_a_restart_whose_start_raises_is_tried_again_after_the_backoff(tmp_path: Path) -> None:
    clock = Clock()
    k = keeper(clock)
    kept = Kept(name="host-esx-a1", log_path=tmp_path / "logs" / "host-esx-a1.log")
    control = tmp_path / "esx-a1.control.json"
    starts: list[float] = []

    async def start(kept: Kept) -> None:  # as the simulator's: a file first, then the spawn
        starts.append(clock.t)
        if len(starts) < 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(control))
        await k.spawn(kept, SLEEPER)

    k.schedule_restart(kept)  # it exited: restarting, due after the first back-off
    try:
        for attempt in range(3):
            assert kept.state == "restarting" and kept.restart_at is not None, \
                f"after {attempt} failed starts no restart is due: it stays down for good"
            clock.t = kept.restart_at
            await k.tend(kept, start)
            if attempt < 2:
                assert str(control) in (kept.last_error or ""), kept.last_error
        assert len(starts) == 3 and kept.proc is not None and kept.state == "starting"
        assert starts[2] - starts[1] > starts[1] - starts[0], "the back-off grows between failed starts"
    finally:
        await k.stop(kept)


async def test_a_prepare_step_that_fails_is_a_failed_start(tmp_path: Path) -> None:
    """``spawn``'s ``prepare`` (the simulator's control file) runs inside its error
    handling: a failure schedules the restart and names the file."""
    clock = Clock()
    k = keeper(clock)
    kept = Kept(name="host-esx-a1", log_path=tmp_path / "logs" / "host-esx-a1.log")
    control = tmp_path / "esx-a1.control.json"

    def prepare() -> None:
        raise OSError(errno.ENOSPC, "cannot write the host control file: No space left on device", str(control))

    await k.spawn(kept, SLEEPER, prepare=prepare)
    try:
        assert kept.proc is None and kept.state == "restarting" and kept.restart_at == clock.t + k.backoff_first_s
        assert str(control) in kept.last_error and "No space" in kept.last_error
    finally:
        await k.stop(kept)


# ---------------------------------------------------------------- pid files on a read-only directory


async def test_an_exit_seen_on_a_read_only_state_dir_is_restarted(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", "4m") as state:
        k = keeper()
        kept = Kept(name="drva-a1", log_path=state / "logs" / "drva-a1.log")
        await k.spawn(kept, SLEEPER)
        kept.proc.kill()
        await kept.proc.wait()
        remount(state, "ro")
        try:
            assert k.reap(kept)
            assert kept.state == "restarting" and kept.restart_at is not None and kept.proc is None
            assert pid_path(kept).exists()  # left: it names a process that is gone
        finally:
            remount(state, "rw")


async def test_a_stop_on_a_read_only_state_dir_completes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", "4m") as state:
        k = keeper()
        kept = Kept(name="host-esx-a1", log_path=state / "logs" / "host-esx-a1.log")
        await k.spawn(kept, SLEEPER)
        kept.proc.kill()  # exited (it held its log open for writing: no read-only remount before)
        await kept.proc.wait()
        remount(state, "ro")
        try:
            await k.stop(kept)
            assert kept.state == "stopped" and kept.proc is None and kept.last_exit == -9
        finally:
            remount(state, "rw")


# ---------------------------------------------------------------- log rotation on a full file system


def test_a_log_whose_copy_would_not_fit_is_not_copied(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", "32m") as state:
        log = state / "logs" / "drva-a1.log"
        data = write_log(log, 20 * MIB)  # 12 MiB left: no room for a copy and 16 MiB besides
        before = free_bytes(state)
        with pytest.raises(OSError) as caught:
            rotate_running(log, limit=MIB)
        assert caught.value.errno == errno.ENOSPC
        text = str(caught.value)
        assert str(log) in text and "MiB free" in text, text
        assert not log.with_name(log.name + ".1.tmp").exists() and not log.with_name(log.name + ".1").exists()
        assert free_bytes(state) == before, "the file system filled up"
        assert log.read_bytes() == data


def test_a_partial_copy_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that fails half-way (the room check passed, and then something else took
    the space) leaves no ``.1.tmp`` behind: left there, it kept the file system full."""
    monkeypatch.setattr(keeper_mod, "rotate_room_problem", lambda fd, size: None, raising=False)
    with tmpfs(tmp_path / "state", "16m") as state:
        log = state / "logs" / "drva-a1.log"
        data = write_log(log, 10 * MIB)
        before = free_bytes(state)
        with pytest.raises(OSError) as caught:
            rotate_running(log, limit=MIB)
        assert caught.value.errno == errno.ENOSPC and str(log) in str(caught.value), caught.value
        assert not log.with_name(log.name + ".1.tmp").exists(), "the partial copy stayed"
        assert free_bytes(state) == before
        assert log.read_bytes() == data and not log.with_name(log.name + ".1").exists()


def test_a_log_with_room_to_spare_is_rotated(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", "64m") as state:
        log = state / "logs" / "drva-a1.log"
        data = write_log(log, 4 * MIB)
        assert rotate_running(log, limit=MIB)
        assert log.with_name(log.name + ".1").read_bytes() == data and log.stat().st_size == 0


async def test_a_failing_rotation_backs_off_and_names_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "state", "8m") as state:
        clock = Clock()
        k = keeper(clock)
        kept = Kept(name="drva-a1", log_path=state / "logs" / "drva-a1.log")
        await k.spawn(kept, SLEEPER)
        try:
            write_log(kept.log_path, 6 * MIB)  # past the limit, and no room for a copy
            fill(state)
            tries: list[float] = []
            real = keeper_mod.rotate_running

            def rotate(path: Path, limit: int | None = None) -> bool:
                tries.append(clock.t)
                return real(path, limit=MIB)

            monkeypatch.setattr(keeper_mod, "rotate_running", rotate)
            caplog.set_level(logging.WARNING)
            start = clock.t
            while clock.t - start < 15 * LOG_CHECK_INTERVAL_S:
                await k.tend(kept, k.spawn)
                clock.t += LOG_CHECK_INTERVAL_S
            assert 1 <= len(tries) <= 5, f"{len(tries)} copies tried in {15 * LOG_CHECK_INTERVAL_S:g} s: no back-off"
            warned = [r for r in caplog.records if r.getMessage() == "test_log_rotate_failed"]
            assert warned and all(getattr(r, "fields", {}).get("log") == str(kept.log_path) for r in warned)
            assert not kept.log_path.with_name(kept.log_path.name + ".1.tmp").exists()
        finally:
            free(state)
            await k.stop(kept)
