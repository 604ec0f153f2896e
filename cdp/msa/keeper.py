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
import fcntl
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cdp.file_kinds import file_kind
from cdp.logs import get_logger
from cdp.msa.install_dirs import dir_problem, make_missing_dirs
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
            check_private_dirs(kept)  # before its pid file is read or its log opened (module docstring)
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
        pid_path(kept).unlink(missing_ok=True)
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


def private_dir_problem(path: Path) -> str | None:
    """Create directory ``path`` and its missing parents (``DIR_MODE``: a umask only
    takes bits away, so none is writable by others), then say why another user could
    change what lies in it (``dir_problem``: one made by someone else first, or 0777 from
    an older daemon), or None."""
    make_missing_dirs(path)
    return dir_problem(path)


def check_private_dirs(kept: Kept) -> None:
    """Make the directories of ``kept``'s log, pid file and status (``private_dir_problem``);
    ``OSError`` naming the first one another user could write: what is read there is
    trusted (a pid file names a process to stop), what is written there is root's."""
    dirs = [kept.log_path.parent] + ([kept.status_path.parent] if kept.status_path is not None else [])
    for directory in dirs:
        if (problem := private_dir_problem(directory)) is not None:
            raise OSError(errno.EPERM, f"{problem}: the directories of its log, pid file and status must be "
                          f"owned by root or by uid {os.geteuid()} and writable by no other user (chmod go-w)",
                          str(directory))


def open_log(path: Path) -> int:
    """``path`` opened for appending (created 0640), never through a symbolic link
    (``O_NOFOLLOW``), nor waiting on a FIFO (``O_NONBLOCK``, cleared once it is known to
    be a regular file, which the child then writes to). ``OSError`` naming it otherwise."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        what = {errno.ELOOP: "a symbolic link", errno.ENXIO: "a FIFO or a socket"}.get(exc.errno or 0)
        if what is None:
            raise
        raise OSError(exc.errno, f"{what}, not a log file: never followed; move it away", str(path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{file_kind(mode)}, not a log file: move it away", str(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def stop_process(pid: int, ticks: int, what: str, timeout_s: float) -> None:
    """SIGTERM process ``pid`` (started at ``ticks``), SIGKILL it after ``timeout_s``, and
    wait by polling until it is gone (it is not our child: whoever inherited it reaps
    it). A process with that pid and another start time is never signalled. ``OSError``
    if it outlives SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not same_process(pid, ticks):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while same_process(pid, ticks) and time.monotonic() < deadline:
            await asyncio.sleep(LEFTOVER_POLL_S)
    if same_process(pid, ticks):
        raise OSError(f"process {pid} ({what}) outlived SIGKILL")


@dataclass(frozen=True)
class Leftover:
    """A child process a killed daemon left running: ``pid``, started at ``ticks``;
    ``found`` says how it was found (its pid file, or its command line)."""

    pid: int
    ticks: int
    found: str

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "found": self.found}


def find_leftovers(logs_dir: Path, pid_glob: str, arg_prefixes: Sequence[Sequence[str]]) -> list[Leftover]:
    """The children a killed daemon may have left running (module docstring), for
    ``cdp uninstall``: each process a pid file ``logs_dir/<pid_glob>`` names (same pid
    and start time; a file that is not one we wrote is never acted on), then each
    process owned by root or by us whose arguments after the interpreter begin with one
    of ``arg_prefixes`` (any interpreter: the daemon may have been started through
    another path to it). Reads only; the caller checked that ``logs_dir`` is ours alone."""
    found: dict[int, Leftover] = {}
    try:
        paths = sorted(p for p in logs_dir.glob(pid_glob) if not p.name.startswith("."))
    except OSError:  # no directory (nothing ever ran), or not one
        paths = []
    for path in paths:
        hit = _leftover(path)
        if hit is not None:
            found.setdefault(hit[0], Leftover(hit[0], hit[1], f"named by {path}"))
    prefixes = [[os.fsencode(a) for a in prefix] for prefix in arg_prefixes]
    for pid, args in _command_lines():
        if pid in found or not any(args[1:1 + len(p)] == p for p in prefixes):
            continue
        ticks = start_ticks(pid)
        if ticks is not None and _owner(pid) in (0, os.geteuid()):
            found[pid] = Leftover(pid, ticks, "running " + os.fsdecode(b" ".join(args))[:200])
    return list(found.values())


async def stop_leftovers(leftovers: Sequence[Leftover], timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop each of ``leftovers`` (``stop_process``, all at once); what survived SIGKILL,
    one line each (empty: all gone)."""
    async def stop(one: Leftover) -> str | None:
        log.warning("leftover_stopping", pid=one.pid, found=one.found)
        try:
            await stop_process(one.pid, one.ticks, one.found, timeout_s)
        except OSError as exc:
            return str(exc)
        log.warning("leftover_stopped", pid=one.pid)
        return None

    return [why for why in await asyncio.gather(*(stop(one) for one in leftovers)) if why is not None]


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
    file. ``ValueError`` naming the file when it holds neither, or is no pid file we
    wrote: not a regular file (a FIFO is not waited on, a link not followed), or longer
    than ``PID_FILE_BYTES_MAX``."""
    try:
        raw, _ = read_small_file(path, PID_FILE_BYTES_MAX)
    except FileNotFoundError:
        return None
    except NotRegularFile as exc:
        raise ValueError(f"{path}: {exc}, not a pid file cdp wrote") from None
    if len(raw) > PID_FILE_BYTES_MAX:
        raise ValueError(f"{path}: more than {PID_FILE_BYTES_MAX} bytes, not a pid file cdp wrote")
    text = raw.decode(errors="replace").strip()
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
    want = [os.fsencode(a) for a in argv]
    found = []
    for pid, args in _command_lines():
        if args == want and (ticks := start_ticks(pid)) is not None:
            found.append((pid, ticks))
    return found


CMDLINE_BYTES_MAX = 64 << 10  # ours are a few hundred bytes; a longer one is no child of ours


def _command_lines() -> list[tuple[int, list[bytes]]]:
    """(pid, arguments) of every process but this one whose command line can be read."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                raw = f.read(CMDLINE_BYTES_MAX + 1)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if raw and len(raw) <= CMDLINE_BYTES_MAX:
            out.append((int(entry.name), raw.removesuffix(b"\0").split(b"\0")))
    return out


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _leftover(path: Path) -> tuple[int, int] | None:
    """The pid and start ticks ``path`` names if that process still runs (same start
    time), else None: also when it is not a pid file we wrote (``read_pid_file``), which
    is logged and never acted on."""
    try:
        found = read_pid_file(path)
    except (OSError, ValueError) as exc:
        log.warning("pid_file_ignored", pid_file=str(path), error=str(exc))
        return None
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
        if os.lstat(path).st_size > LOG_ROTATE_BYTES:  # a link is not followed (open_log refuses it)
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass


def last_error(path: Path) -> str | None:
    """The last error a log holds (JSON lines from cdp.logs, or a plain traceback line)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None  # not the log we opened for the child: never waited on (a FIFO)
        lines = os.pread(fd, LOG_TAIL_BYTES, max(0, st.st_size - LOG_TAIL_BYTES)).decode(errors="replace").splitlines()
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
