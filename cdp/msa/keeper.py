"""Keep child processes running: spawn, stop in order, restart after a crash with a
growing back-off. The DRVA supervisor (``cdp.msa.supervisor``) and the simulator
hypervisor's host processes (``cdp.hypervisor.simulator``) are both built on it.

Each process gets its own session (a Ctrl-C meant for the daemon must not reach it
directly: the daemon stops its children in order) and its output appended to its log
file, which is moved to ``.1`` at a start when it grew past ``LOG_ROTATE_BYTES``.

States of one kept process: ``starting`` (spawned; the owner says when it is ``up``),
``up``, ``restarting`` (exited; waiting for its back-off), ``stopped``. A process that
stayed up for ``stable_after_s`` starts its next back-off from the first step.

While a process runs, ``<log stem>.pid`` beside its log names it (``PID START_TICKS``,
FORMAT.md §13.13). A daemon that was killed leaves its children running; the next one
finds them by these files and stops them (SIGTERM, then SIGKILL) before it starts its
own: two DRVAs on one replication log, or two hosts writing one disk, must never run.
The start time (``/proc/PID/stat`` field 22) tells a leftover from a process that got
its pid later. A daemon killed between spawning a child and writing its pid file leaves
a child no file names (the kills campaign hit that window in two runs of three: a
failover restarts the domain's DRVA as it starts); so a process running this very
command line (same interpreter, same arguments: the same configuration file) that is not
this daemon's child is a leftover too, found in ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cdp.logs import get_logger
from cdp.small_file import NotRegularFile, read_small_file

log = get_logger("cdp.msa.keeper")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # up this long: the next exit starts the back-off afresh
STOP_TIMEOUT_S = 20.0
LOG_ROTATE_BYTES = 64 << 20
LOG_TAIL_BYTES = 8192  # read back after an exit, to say why it exited
ERROR_TEXT_MAX = 400
LEFTOVER_POLL_S = 0.05
# A DRVA's status with 100 domains is about 200 KB; a larger file was not written by the
# process it names (a link to /dev/zero, a planted sparse file) and is not read whole.
STATUS_BYTES_MAX = 16 << 20
PID_FILE_BYTES_MAX = 256  # "PID START_TICKS\n" is under 50 bytes; more is not a pid file we wrote
#: Where ``python -m drva.daemon`` and ``python -m iofilter_sim`` find their packages.
CODE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Kept:
    """One kept process. Invariant: ``proc`` is None exactly when ``state`` is
    ``restarting`` or ``stopped``."""

    name: str
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    state: str = "stopped"
    state_since: float = 0.0  # monotonic
    restarts: int = 0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None  # monotonic, while restarting
    last_exit: int | None = None  # the exit code (negative: the signal)
    last_error: str | None = None  # the last error its log gave before it exited
    expected_exit: bool = field(default=False, repr=False)  # we are stopping it
    # The JSON status the process rewrites (None: it writes none), and its newest
    # document written by the current process (a restarted one's old status says
    # nothing about it).
    status_path: Path | None = None
    status: dict | None = None
    status_read_at: float | None = None  # monotonic


class ProcessKeeper:
    """Spawns, stops and restarts ``Kept`` processes. ``kind`` prefixes the log events
    (``drva_spawned``, ``host_exited``); ``clock`` is monotonic (tests move it)."""

    def __init__(self, kind: str, env: Mapping[str, str], clock: Callable[[], float], *,
                 backoff_first_s: float = BACKOFF_FIRST_S, backoff_max_s: float = BACKOFF_MAX_S,
                 stable_after_s: float = STABLE_AFTER_S, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.kind = kind
        self.env = dict(env)
        self.clock = clock
        self.backoff_first_s, self.backoff_max_s = backoff_first_s, backoff_max_s
        self.stable_after_s, self.stop_timeout_s = stable_after_s, stop_timeout_s

    def set_state(self, kept: Kept, state: str) -> None:
        kept.state, kept.state_since = state, self.clock()

    async def spawn(self, kept: Kept, args: Sequence[str], **fields: object) -> None:
        """Start ``python args...``; on failure the next ``reap`` retries after the back-off.
        A leftover of an earlier daemon under the same name is stopped first."""
        try:
            await self.stop_leftover(kept)
            await self.stop_same_command(kept, [sys.executable, *args])
            kept.log_path.parent.mkdir(parents=True, exist_ok=True)
            _rotate(kept.log_path)
            out = os.open(kept.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            try:
                kept.proc = await asyncio.create_subprocess_exec(
                    sys.executable, *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    env=self.env, cwd=CODE_ROOT, start_new_session=True)
            finally:
                os.close(out)
        except OSError as exc:
            kept.proc = None
            kept.last_error = f"cannot start: {exc.strerror or exc} ({exc.filename or sys.executable})"
            log.error(f"{self.kind}_start_failed", name=kept.name, error=kept.last_error)
            self.schedule_restart(kept)
            return
        kept.expected_exit = False
        try:
            write_pid_file(pid_path(kept), kept.proc.pid)
        except OSError as exc:  # it runs; only a later daemon's cleanup after a kill is lost
            log.warning(f"{self.kind}_pid_file_failed", name=kept.name, error=str(exc))
        self.set_state(kept, "starting")
        log.info(f"{self.kind}_spawned", name=kept.name, pid=kept.proc.pid, restarts=kept.restarts, **fields)

    async def stop(self, kept: Kept, *, sig: int = signal.SIGTERM, timeout_s: float | None = None) -> None:
        """Signal it (SIGTERM), wait, then SIGKILL after ``timeout_s`` (default ``stop_timeout_s``)."""
        proc = kept.proc
        kept.restart_at = None
        if proc is None:
            self.set_state(kept, "stopped")
            return
        kept.expected_exit = True
        if proc.returncode is None:
            send_signal(proc, sig)
            try:
                async with asyncio.timeout(self.stop_timeout_s if timeout_s is None else timeout_s):
                    await proc.wait()
            except TimeoutError:
                log.warning(f"{self.kind}_stop_timeout", name=kept.name, pid=proc.pid)
                send_signal(proc, signal.SIGKILL)
                await proc.wait()
        kept.proc = None
        kept.last_exit = proc.returncode
        pid_path(kept).unlink(missing_ok=True)
        self.set_state(kept, "stopped")
        log.info(f"{self.kind}_stopped", name=kept.name, pid=proc.pid, exit=exit_text(proc.returncode))

    async def stop_leftover(self, kept: Kept) -> None:
        """Stop the process ``kept``'s pid file names if an earlier daemon left it running
        (module docstring): SIGTERM, SIGKILL after ``stop_timeout_s``. Not our child: its
        exit is seen by polling (whoever inherited it reaps it)."""
        path = pid_path(kept)
        found = _leftover(path)
        if found is None:
            path.unlink(missing_ok=True)
            return
        pid, ticks = found
        log.warning(f"{self.kind}_leftover_stopping", name=kept.name, pid=pid, pid_file=str(path))
        await self._stop_process(pid, ticks, f"named by {path}")
        path.unlink(missing_ok=True)
        log.warning(f"{self.kind}_leftover_stopped", name=kept.name, pid=pid)

    async def stop_same_command(self, kept: Kept, argv: Sequence[str]) -> None:
        """Stop every process running ``argv`` exactly that is not this daemon's child
        (module docstring): SIGTERM, then SIGKILL after ``stop_timeout_s``."""
        ours = kept.proc.pid if kept.proc is not None and kept.proc.returncode is None else None
        for pid, ticks in _running_command(argv):
            if pid == ours:
                continue
            log.warning(f"{self.kind}_leftover_stopping", name=kept.name, pid=pid, found="by its command line")
            await self._stop_process(pid, ticks, f"running {' '.join(argv)[:200]}")
            log.warning(f"{self.kind}_leftover_stopped", name=kept.name, pid=pid)

    async def _stop_process(self, pid: int, ticks: int, what: str) -> None:
        """SIGTERM process ``pid`` (started at ``ticks``), SIGKILL it after
        ``stop_timeout_s``, and wait by polling until it is gone (it is not our child:
        whoever inherited it reaps it). ``OSError`` if it outlives SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + self.stop_timeout_s
            while same_process(pid, ticks) and time.monotonic() < deadline:
                await asyncio.sleep(LEFTOVER_POLL_S)
            if not same_process(pid, ticks):
                return
        raise OSError(f"process {pid} ({what}) outlived SIGKILL")

    def schedule_restart(self, kept: Kept) -> None:
        now = self.clock()
        if kept.state == "up" and now - kept.state_since >= self.stable_after_s:
            kept.backoff_s = self.backoff_first_s  # it had been fine for a while: not a crash loop
        kept.restart_at = now + kept.backoff_s
        self.set_state(kept, "restarting")
        log.warning(f"{self.kind}_restarting", name=kept.name, in_s=kept.backoff_s, restarts=kept.restarts + 1,
                    last_exit=exit_text(kept.last_exit), error=kept.last_error)
        kept.backoff_s = min(self.backoff_max_s, kept.backoff_s * 2)

    def reap(self, kept: Kept) -> bool:
        """True when it exited on its own (then a restart is scheduled)."""
        proc = kept.proc
        if proc is None or proc.returncode is None or kept.expected_exit:
            return False
        kept.proc, kept.last_exit = None, proc.returncode
        pid_path(kept).unlink(missing_ok=True)
        kept.last_error = last_error(kept.log_path)
        log.error(f"{self.kind}_exited", name=kept.name, pid=proc.pid, exit=exit_text(proc.returncode),
                  error=kept.last_error)
        self.schedule_restart(kept)
        return True

    async def tend(self, kept: Kept, start: Callable[[Kept], Awaitable[None]]) -> bool:
        """One supervision round for ``kept``: reap an exit (a restart is scheduled),
        restart it once its back-off is over (``start``), else read its status. True
        when this round saw it come up (its first status)."""
        if self.reap(kept):
            kept.status = None
        elif self.restart_due(kept):
            kept.status = None
            await start(kept)
        elif kept.proc is not None:
            return self.read_status(kept)
        return False

    def read_status(self, kept: Kept) -> bool:
        """Read ``kept.status_path`` if the current process wrote it; True when that made
        it ``up`` (its first status)."""
        if kept.status_path is None or kept.proc is None:
            return False
        try:
            raw = read_small_file(kept.status_path, STATUS_BYTES_MAX)[0]
            doc = json.loads(raw) if len(raw) <= STATUS_BYTES_MAX else None
        except (OSError, NotRegularFile, ValueError, RecursionError):
            return False  # not written yet, or between its writes: the next round reads it
        if not isinstance(doc, dict) or doc.get("pid") != kept.proc.pid:
            return False  # an earlier process's document
        kept.status, kept.status_read_at = doc, self.clock()
        if kept.state != "starting":
            return False
        self.set_state(kept, "up")
        kept.last_error = None
        return True

    def restart_due(self, kept: Kept) -> bool:
        due = kept.state == "restarting" and kept.restart_at is not None and self.clock() >= kept.restart_at
        if due:
            kept.restarts += 1
            kept.restart_at = None
        return due


def pid_path(kept: Kept) -> Path:
    return kept.log_path.with_suffix(".pid")


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), None if it is gone or a
    zombie (exited: only waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    if not fields or fields[0] == b"Z" or len(fields) < 20:
        return None
    return int(fields[19])


def same_process(pid: int, ticks: int | None) -> bool:
    """Is process ``pid`` the one that started at ``ticks``? (Not if it is gone, a
    zombie, or a later process that was given the same pid.)"""
    return ticks is not None and start_ticks(pid) == ticks


def stale_reason(pid: int, ticks: int | None) -> str:
    """Why a pid file naming ``pid`` (started at ``ticks``) names no process of ours."""
    if start_ticks(pid) is None:
        return f"process {pid} is gone"
    if ticks is None:
        return (f"the file has no start time (an older cdp wrote it), so process {pid} cannot be told "
                f"from a later one given its pid: never signalled")
    return f"process {pid} started at another time than the file says (its pid was reused)"


def write_pid_file(path: Path, pid: int) -> None:
    """``PID START_TICKS`` (FORMAT.md §13.13), replaced by a rename so a reader never sees
    half of it. Not fsynced: after a power loss no process it could name is running."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")  # one per writer: two daemons never share one
    tmp.unlink(missing_ok=True)  # a crashed writer's, with our pid; O_EXCL never writes through a link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{pid} {start_ticks(pid) or 0}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_pid_file(path: Path) -> tuple[int, int | None] | None:
    """(pid, start ticks) a pid file names; ticks None when the file holds a bare pid
    (or a JSON ``{"pid": N}``), as files of older versions did. None when there is no
    file. ``ValueError`` naming the file when it holds neither."""
    try:
        with open(path, "rb") as f:
            text = f.read(PID_FILE_BYTES_MAX).decode(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if text.startswith("{"):
            pid, ticks = json.loads(text)["pid"], None
        else:
            words = text.split()
            pid, ticks = int(words[0]), (int(words[1]) if len(words) > 1 else None)
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"{path}: expected 'PID START_TICKS', got {text[:40]!r}") from None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or (ticks is not None and ticks < 0):
        raise ValueError(f"{path}: expected a process id > 0 and start ticks >= 0, got {text[:40]!r}")
    return pid, ticks


def _running_command(argv: Sequence[str]) -> list[tuple[int, int]]:
    """(pid, start ticks) of every live process whose command line is ``argv``, this
    process excepted."""
    want = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if f.read(len(want) + 1) != want:
                    continue
        except OSError:
            continue  # gone meanwhile, or not ours to read
        ticks = start_ticks(int(entry.name))
        if ticks is not None:
            found.append((int(entry.name), ticks))
    return found


def _leftover(path: Path) -> tuple[int, int] | None:
    """The pid and start ticks ``path`` names if that process still runs (same start
    time), else None."""
    try:
        found = read_pid_file(path)
    except (OSError, ValueError):
        return None  # not one we wrote: nothing to stop
    if found is None or found[1] is None:
        return None  # none, or no start time to tell the process by
    pid, ticks = found
    return (pid, ticks) if pid > 1 and pid != os.getpid() and same_process(pid, ticks) else None


def exit_text(code: int | None) -> str:
    if code is None:
        return "not exited"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def send_signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass  # already gone


def _rotate(path: Path) -> None:
    try:
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass


def last_error(path: Path) -> str | None:
    """The last error a log holds (JSON lines from cdp.logs, or a plain traceback line)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            if doc.get("level") == "error":
                text = f"{doc.get('event')}: {doc.get('error') or ''}".rstrip(": ")
                return text[:ERROR_TEXT_MAX]
            continue
        if ": error:" in line or "Error" in line:
            return line[:ERROR_TEXT_MAX]
    return None
