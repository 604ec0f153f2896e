"""Processes by pid, for the keeper and for uninstall: when a process started (so that a
pid reused by a later process is never taken for it), the pid files that name them
(FORMAT.md §13.13), the command lines in /proc, and the leftovers a killed daemon left
running, found and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from cdp.logs import get_logger
from cdp.small_file import NotRegularFile, read_small_file

log = get_logger("cdp.msa.keeper")  # its events are the keeper's

STOP_TIMEOUT_S = 20.0
LEFTOVER_POLL_S = 0.05
PID_FILE_BYTES_MAX = 256  # "PID START_TICKS\n" is under 50 bytes; more is not a pid file we wrote


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


def find_leftovers(logs_dir: Path, pid_glob: str, arg_prefixes: Sequence[Sequence[str]], *,
                   names: Collection[str] | None = None) -> list[Leftover]:
    """The children a killed daemon may have left running (module docstring), for
    ``cdp uninstall`` and the simulator's start: each process a pid file
    ``logs_dir/<pid_glob>`` (only those of ``names``, when given) names (same pid and
    start time; a file that is not one we wrote is never acted on), then each process
    owned by root or by us whose arguments after the interpreter begin with one of
    ``arg_prefixes`` (any interpreter: the daemon may have been started through another
    path to it). Reads only; the caller checked that ``logs_dir`` is ours alone."""
    found: dict[int, Leftover] = {}
    try:
        paths = sorted(p for p in logs_dir.glob(pid_glob)
                       if not p.name.startswith(".") and (names is None or p.name in names))
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
