"""Keep child processes running: spawn, stop in order, restart after a crash with a
growing back-off. The DRVA supervisor (``cdp.msa.supervisor``) and the simulator
hypervisor's host processes (``cdp.hypervisor.simulator``) are both built on it.

Each process gets its own session (a Ctrl-C meant for the daemon must not reach it
directly: the daemon stops its children in order) and its output appended to its log
file, which is moved to ``.1`` at a start when it grew past ``LOG_ROTATE_BYTES`` — and
while it runs, checked every ``LOG_CHECK_INTERVAL_S``: copied to ``.1`` and cut to nothing
(``rotate_running``; the child appends, ``O_APPEND``, so it writes on at the new end). A
DRVA that ran for months grew one log without bound. The copy is made only when its file
system has room for it and ``ROTATE_KEEP_FREE_*`` besides, a partial copy is removed, and
a rotation that failed is tried again after a growing back-off (to
``LOG_CHECK_BACKOFF_MAX_S``): a copy of a large log on a nearly full state directory once
filled it, and was made again every 10 s, keeping it full.

A start that fails (the state directory is full or read-only: its control file, its log,
its pid file) is tried again after the back-off, like an exit; a pid file that cannot be
removed is logged and left (it names a process that is gone: the next start sees that by
its start time). Before, either stopped the supervision of that process for good.

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
this daemon's child is a leftover too, found in ``/proc``. ``cdp uninstall`` stops the
same leftovers (``find_leftovers``, ``stop_leftovers``) before it removes the partitions
they hold open.

The logs directory is where those pid files are trusted, so it must be ours alone
(``cdp.msa.install_dirs.dir_problem``): a user who can write there could name any
process in a pid file (stopped at the next start) or put a link at a log path (appended
to by root). It is made ``DIR_MODE`` whatever the umask, a child is not started while it
is not ours alone, and a log is opened without following a link and only if it is a
regular file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cdp.file_kinds import NotRegular, open_regular
from cdp.logs import get_logger
from cdp.msa.install_dirs import made_dir_problem
from cdp.msa.processes import (  # noqa: F401 (re-exported: the keeper's callers and tests import them here)
    PID_FILE_BYTES_MAX, STOP_TIMEOUT_S, Leftover, _leftover, _running_command, find_leftovers, read_pid_file,
    same_process, stale_reason, start_ticks, stop_leftovers, stop_process, write_pid_file,
)
from cdp.small_file import NotRegularFile, read_small_file

log = get_logger("cdp.msa.keeper")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # up this long: the next exit starts the back-off afresh
LOG_ROTATE_BYTES = 64 << 20
LOG_CHECK_INTERVAL_S = 10.0  # a running child's log size is looked at this often
LOG_CHECK_BACKOFF_MAX_S = 600.0  # ... and, after failed rotations, at most this seldom
# A running child's log is copied only when this much stays free after the copy: the
# state directory also holds the daemon's job records and the children's status files.
# At least 16 MiB, 5 % of the file system on a larger one, but never more than 1 GiB (5 %
# of a large disk would stop every rotation long before it is nearly full).
ROTATE_KEEP_FREE_BYTES = 16 << 20
ROTATE_KEEP_FREE_FRACTION = 0.05
ROTATE_KEEP_FREE_MAX_BYTES = 1 << 30
LOG_TAIL_BYTES = 8192  # read back after an exit, to say why it exited
ERROR_TEXT_MAX = 400
# A DRVA's status with 100 domains is about 200 KB; a larger file was not written by the
# process it names (a link to /dev/zero, a planted sparse file) and is not read whole.
STATUS_BYTES_MAX = 16 << 20
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
    # Why the newest document at status_path is not used (no JSON, or refused by the
    # keeper's check_status), None when it is; and when its content last changed
    # (monotonic: a hung process's document says nothing true about its own age).
    status_problem: str | None = None
    status_digest: bytes | None = field(default=None, repr=False)
    status_changed_at: float | None = None
    log_checked_at: float = 0.0  # monotonic: when rotate_running last looked
    log_check_every_s: float = LOG_CHECK_INTERVAL_S  # grows while rotations fail


class ProcessKeeper:
    """Spawns, stops and restarts ``Kept`` processes. ``kind`` prefixes the log events
    (``drva_spawned``, ``host_exited``); ``clock`` is monotonic (tests move it);
    ``check_status`` says why a status document cannot be used (None: it can)."""

    def __init__(self, kind: str, env: Mapping[str, str], clock: Callable[[], float], *,
                 backoff_first_s: float = BACKOFF_FIRST_S, backoff_max_s: float = BACKOFF_MAX_S,
                 stable_after_s: float = STABLE_AFTER_S, stop_timeout_s: float = STOP_TIMEOUT_S,
                 check_status: Callable[[dict], str | None] | None = None) -> None:
        self.kind = kind
        self.check_status = check_status
        self.env = dict(env)
        self.clock = clock
        self.backoff_first_s, self.backoff_max_s = backoff_first_s, backoff_max_s
        self.stable_after_s, self.stop_timeout_s = stable_after_s, stop_timeout_s

    def set_state(self, kept: Kept, state: str) -> None:
        kept.state, kept.state_since = state, self.clock()

    async def spawn(self, kept: Kept, args: Sequence[str], *, prepare: Callable[[], None] | None = None,
                    **fields: object) -> None:
        """Start ``python args...``; on failure (``OSError``) a restart is scheduled after
        the back-off. A leftover of an earlier daemon under the same name is stopped first.
        ``prepare`` writes what the child reads as it starts (a host's control file): its
        failure is a failed start too."""
        try:
            check_private_dirs(kept)  # before its pid file is read or its log opened (module docstring)
            if prepare is not None:
                prepare()
            await self.stop_leftover(kept)
            await self.stop_same_command(kept, [sys.executable, *args])
            _rotate(kept.log_path)
            out = open_log(kept.log_path)
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
        self._remove_pid_file(kept)
        self.set_state(kept, "stopped")
        log.info(f"{self.kind}_stopped", name=kept.name, pid=proc.pid, exit=exit_text(proc.returncode))

    async def stop_leftover(self, kept: Kept) -> None:
        """Stop the process ``kept``'s pid file names if an earlier daemon left it running
        (module docstring): SIGTERM, SIGKILL after ``stop_timeout_s``. Not our child: its
        exit is seen by polling (whoever inherited it reaps it)."""
        path = pid_path(kept)
        found = _leftover(path)
        if found is None:  # none, or not one we wrote: removed, replaced at the spawn
            path.unlink(missing_ok=True)
            return
        pid, ticks = found
        log.warning(f"{self.kind}_leftover_stopping", name=kept.name, pid=pid, pid_file=str(path))
        await stop_process(pid, ticks, f"named by {path}", self.stop_timeout_s)
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
            await stop_process(pid, ticks, f"running {' '.join(argv)[:200]}", self.stop_timeout_s)
            log.warning(f"{self.kind}_leftover_stopped", name=kept.name, pid=pid)

    def _remove_pid_file(self, kept: Kept) -> None:
        """Remove ``kept``'s pid file, its process gone. A file that cannot be removed (a
        read-only state directory) is logged and left: it names a process that is gone,
        which the next start tells by its start time (``_leftover``). Raised, it ended a
        daemon's stop half-way, and left an exited DRVA never restarted."""
        path = pid_path(kept)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning(f"{self.kind}_pid_file_not_removed", name=kept.name, pid_file=str(path),
                        error=exc.strerror or str(exc))

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
        self._remove_pid_file(kept)
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
            await self._restart(kept, start)
        elif kept.proc is not None:
            if self.clock() - kept.log_checked_at >= kept.log_check_every_s and kept.proc.returncode is None:
                await self._rotate_log(kept)
            return self.read_status(kept)
        return False

    async def _restart(self, kept: Kept, start: Callable[[Kept], Awaitable[None]]) -> None:
        """``start(kept)`` after its back-off. One that raises before the process runs (its
        owner wrote a file first, on a full state directory) gets its next restart
        scheduled: else it stayed ``restarting`` with no restart due, for good."""
        try:
            await start(kept)
        except Exception as exc:
            if kept.proc is not None:  # it runs: whatever failed after the spawn, reap sees its exit
                raise
            kept.last_error = f"cannot start: {exc}"[:ERROR_TEXT_MAX]
            log.error(f"{self.kind}_start_failed", name=kept.name, error=kept.last_error)
            self.schedule_restart(kept)

    async def _rotate_log(self, kept: Kept) -> None:
        """``rotate_running`` on ``kept``'s log; while it fails (a full file system: the
        child's log goes on growing), looked at again less and less often."""
        kept.log_checked_at = self.clock()
        try:  # a copy of 64 MiB: off the event loop (the API and the supervision go on)
            await asyncio.to_thread(rotate_running, kept.log_path)
        except OSError as exc:
            kept.log_check_every_s = min(LOG_CHECK_BACKOFF_MAX_S, kept.log_check_every_s * 2)
            other = exc.filename if exc.filename not in (None, str(kept.log_path)) else None
            log.warning(f"{self.kind}_log_rotate_failed", name=kept.name, log=str(kept.log_path),
                        error=exc.strerror or str(exc), **({"file": other} if other else {}),
                        retry_in_s=kept.log_check_every_s)
        else:
            kept.log_check_every_s = LOG_CHECK_INTERVAL_S

    def read_status(self, kept: Kept) -> bool:
        """Read ``kept.status_path`` if the current process wrote it; True when that made
        it ``up`` (its first status). A document that is no JSON (NaN and Infinity are
        none), no object, or that ``check_status`` refuses, is unusable: none is kept, and
        ``status_problem`` says why (one that names an earlier process is only ignored).
        ``status_changed_at`` is when the content of the documents kept last changed, on
        this keeper's clock."""
        if kept.status_path is None or kept.proc is None:
            return False
        try:
            raw = read_small_file(kept.status_path, STATUS_BYTES_MAX)[0]
        except (OSError, NotRegularFile):
            return False  # not written yet: the next round reads it
        if len(raw) > STATUS_BYTES_MAX:
            return self._unusable(kept, f"is larger than {STATUS_BYTES_MAX} bytes")
        try:
            doc = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
        except (ValueError, RecursionError) as exc:
            return self._unusable(kept, f"is not JSON ({type(exc).__name__}: {exc})")
        if not isinstance(doc, dict):
            return self._unusable(kept, "is not a JSON object")
        if doc.get("pid") != kept.proc.pid:
            kept.status_problem = None
            return False  # an earlier process's document
        problem = self.check_status(doc) if self.check_status is not None else None
        if problem is not None:
            return self._unusable(kept, f"is unusable: {problem}")
        if kept.status_problem is not None:
            log.info(f"{self.kind}_status_usable", name=kept.name, was=kept.status_problem)
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest != kept.status_digest:
            kept.status_digest, kept.status_changed_at = digest, self.clock()
        kept.status, kept.status_read_at, kept.status_problem = doc, self.clock(), None
        if kept.state != "starting":
            return False
        self.set_state(kept, "up")
        kept.last_error = None
        return True

    def _unusable(self, kept: Kept, problem: str) -> bool:
        """Keep no status from this document; say why (logged when it changes)."""
        problem = problem[:ERROR_TEXT_MAX]
        if problem != kept.status_problem:
            log.warning(f"{self.kind}_status_unusable", name=kept.name, path=str(kept.status_path), problem=problem)
        kept.status, kept.status_problem = None, problem
        return False

    def restart_due(self, kept: Kept) -> bool:
        due = kept.state == "restarting" and kept.restart_at is not None and self.clock() >= kept.restart_at
        if due:
            kept.restarts += 1
            kept.restart_at = None
        return due


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is no JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise ValueError(f"{text[:40]} is out of range")
    return value


def pid_path(kept: Kept) -> Path:
    return kept.log_path.with_suffix(".pid")


def check_private_dirs(kept: Kept) -> None:
    """Make the directories of ``kept``'s log, pid file and status (``made_dir_problem``);
    ``OSError`` naming the first one another user could write: what is read there is
    trusted (a pid file names a process to stop), what is written there is root's."""
    dirs = [kept.log_path.parent] + ([kept.status_path.parent] if kept.status_path is not None else [])
    for directory in dirs:
        if (problem := made_dir_problem(directory)) is not None:
            raise OSError(errno.EPERM, f"{problem}: the directories of its log, pid file and status must be "
                          f"owned by root or by uid {os.geteuid()} and writable by no other user (chmod go-w)",
                          str(directory))


def open_log(path: Path) -> int:
    """``path`` opened for appending (created 0640), only as a regular file
    (``open_regular``: never through a symbolic link, never waiting on a FIFO), which
    the child then writes to. ``OSError`` naming it otherwise."""
    try:
        return open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    except NotRegular as exc:
        raise OSError(exc.errno, f"{exc.kind}, not a log file: never followed; move it away", str(path)) from None


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
        if os.lstat(path).st_size > LOG_ROTATE_BYTES:  # a link is not followed (open_log refuses it)
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass


def rotate_running(path: Path, limit: int | None = None) -> bool:
    """The log of a running child, past ``limit`` bytes (``LOG_ROTATE_BYTES``): copied to
    ``<log>.1`` (replacing it) and cut to nothing; True when it was. The child appends
    (``O_APPEND``), so it writes on at the new end; what it writes between the copy's
    last read and the cut — microseconds — is lost, as with logrotate's copytruncate.
    Never through a link (``open_regular``); the logs directory is ours alone.
    ``OSError`` naming the log when its file system has no room for the copy
    (``rotate_room_problem``: nothing is written then) or the copy failed (the partial
    copy is removed: left, it kept the file system full)."""
    limit = LOG_ROTATE_BYTES if limit is None else limit
    try:
        fd = open_regular(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size <= limit:
            return False
        if (problem := rotate_room_problem(fd, size)) is not None:
            raise OSError(errno.ENOSPC, f"not copied to {path.name}.1: {problem}", str(path))
        tmp = path.with_name(path.name + ".1.tmp")
        tmp.unlink(missing_ok=True)
        try:
            _copy_log(fd, tmp)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # a read-only file system: there is no copy to remove
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.filename is None:  # sendfile names no file
                raise OSError(exc.errno, f"{exc.strerror}: copying it to {tmp.name}", str(path)) from exc
            raise
        os.replace(tmp, path.with_name(path.name + ".1"))
        os.ftruncate(fd, 0)
        return True
    finally:
        os.close(fd)


def rotate_room_problem(fd: int, size: int) -> str | None:
    """Why a copy of ``size`` bytes of the log open at ``fd`` would leave its file system
    too full (less free than ``ROTATE_KEEP_FREE_*`` say), or None."""
    st = os.fstatvfs(fd)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    keep = max(ROTATE_KEEP_FREE_BYTES, min(ROTATE_KEEP_FREE_MAX_BYTES, int(total * ROTATE_KEEP_FREE_FRACTION)))
    if free - size >= keep:
        return None
    return (f"a copy of its {_mib(size)} would leave less than {_mib(keep)} free on its file system "
            f"({_mib(free)} free of {_mib(total)}); free some space there")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _copy_log(fd: int, tmp: Path) -> None:
    """Copy the file open at ``fd`` to the new file ``tmp``: to its end as it is now,
    then again for what the child appended meanwhile."""
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        copied = 0
        while True:
            end = os.fstat(fd).st_size
            while copied < end:
                n = os.sendfile(out, fd, copied, end - copied)
                if not n:
                    break
                copied += n
            if os.fstat(fd).st_size == copied or copied < end:
                break
    finally:
        os.close(out)


def last_error(path: Path) -> str | None:
    """The last error a log holds (JSON lines from cdp.logs, or a plain traceback line) —
    or, when it holds none, ``<log>.1``'s: the log may have been cut (``rotate_running``)
    just before the child's exit was seen."""
    found = _last_error_in(path)
    if found is not None:
        return found
    older = path.with_name(path.name + ".1")
    found = _last_error_in(older)
    return None if found is None else f"{found} (in {older.name})"[:ERROR_TEXT_MAX + 32]


def _last_error_in(path: Path) -> str | None:
    try:
        fd = open_regular(path, os.O_RDONLY)  # not the log we opened for the child (a FIFO): None
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        lines = os.pread(fd, LOG_TAIL_BYTES, max(0, size - LOG_TAIL_BYTES)).decode(errors="replace").splitlines()
    except OSError:
        return None
    finally:
        os.close(fd)
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
