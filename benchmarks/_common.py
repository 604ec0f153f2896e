"""Shared plumbing of the benchmarks: arguments, progress, timing, the JSON last line,
output files written without following a link (``write_at``), and the machine measured
on, its file system read from /proc/self/mountinfo (``mount_of``).

Every benchmark is ``python -m benchmarks.<name> [--quick] [--json] [--dir DIR]`` and
prints one JSON object as its last line. Speed is reported as ratios against a baseline
measured in the same run, because the machines are noisy and shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cdp import durable
from cdp.file_kinds import file_kind
from cdp.ports import free_port  # noqa: F401  (the benchmarks import it from here)


def parse_args(description: str,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common arguments; ``extra`` adds a benchmark's own to the parser."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds (CI)")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    p.add_argument("--dir", type=Path, default=None,
                   help="directory for benchmark files (default: a temp dir)")
    if extra is not None:
        extra(p)
    return p.parse_args()


def work_dir(args: argparse.Namespace) -> tempfile.TemporaryDirectory[str]:
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="cdp-bench-", dir=args.dir)


def progress(total: int, desc: str, unit: str = "B") -> tqdm:
    """A progress bar on stderr, shown only on a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)


def median_rate(rounds: int, amount: float, run: Callable[[], None]) -> float:
    """Median of ``amount / seconds`` over ``rounds`` runs of ``run``."""
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        rates.append(amount / (time.perf_counter() - t0))
    return statistics.median(rates)


def emit(args: argparse.Namespace, result: dict[str, Any], table: list[tuple[str, str]]) -> None:
    """Print a human table (unless --json) and the JSON object as the last line."""
    if not args.json:
        width = max(len(k) for k, _ in table)
        for k, v in table:
            print(f"{k:<{width}}  {v}")
    print(json.dumps(result, sort_keys=True))


# ---------------------------------------------------------------- files a benchmark writes

OUT_FILE_MODE = 0o644  # results and reports are for reading; less the umask
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Refused(Exception):
    """Bad input (an output or work directory, its file system): the caller says it in
    one line on stderr and exits 2, having run nothing."""


def write_at(dir_fd: int, name: str, data: str | bytes) -> None:
    """Create or replace ``name`` in the open directory ``dir_fd``: a new temporary file
    (``O_CREAT|O_EXCL|O_NOFOLLOW``) renamed over it (``durable.atomic_write_at``), so a
    symbolic link or hard link planted at ``name`` is replaced, never written through."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    durable.atomic_write_at(dir_fd, name, data, mode=OUT_FILE_MODE)


def write_beside(path: Path, data: str | bytes) -> None:
    """``write_at`` of ``path``'s name in its directory (opened for the one write)."""
    dir_fd = os.open(path.parent, OPEN_DIR)
    try:
        write_at(dir_fd, path.name, data)
    finally:
        os.close(dir_fd)


def kind_at(name: str | Path, dir_fd: int | None = None) -> str:
    """What is at ``name`` as a noun ("a regular file"), for a refusal."""
    try:
        return file_kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


def make_dir(path: Path, option: str) -> None:
    """``mkdir -p path``; Refused naming ``option`` when something else is there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir -p found a non-directory (or a dangling link) there
        raise Refused(f"{option} {path}: {kind_at(path)} is there: expected a directory") from None
    except OSError as exc:
        raise Refused(f"{option} {path}: cannot create the directory ({exc.strerror})") from None


# ---------------------------------------------------------------- the machine and processes

def _run_text(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


#: The file system type when the mount table cannot tell (unreadable, or no mount holds
#: the path): never taken for a disk.
FS_UNKNOWN = "?"
MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescaped(field: str) -> str:
    """A mountinfo field as the path it names: the kernel writes a space, tab, newline
    or backslash in it as an octal escape (``\\040`` for a space)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_in(table: str, path: str) -> tuple[str, str, str]:
    """(file system type, source, mount point) of the mount that holds the absolute,
    resolved ``path`` in ``table`` (the text of a ``/proc/<pid>/mountinfo``): the one
    with the longest mount point that is ``path`` or a directory above it, the later
    line of two at one point (it is mounted over the other). ``FS_UNKNOWN`` for each
    when no line holds it."""
    best = (FS_UNKNOWN, FS_UNKNOWN, FS_UNKNOWN)
    for line in table.splitlines():
        fields = line.split(" ")  # ID PARENT MAJ:MIN ROOT POINT OPTIONS [TAGS...] - TYPE SOURCE SUPER-OPTIONS
        if len(fields) < 10 or "-" not in fields[6:]:
            continue  # not a mountinfo line
        sep = fields.index("-", 6)
        point = _unescaped(fields[4])
        holds = path == point or point == "/" or path.startswith(point.rstrip("/") + "/")
        if holds and (best[2] == FS_UNKNOWN or len(point) >= len(best[2])):
            best = (fields[sep + 1], _unescaped(fields[sep + 2]), point)
    return best


def mount_of(path: Path) -> tuple[str, str, str]:
    """``mount_in`` this process's mount table for ``path`` (resolved): no external tool
    (``findmnt`` may be missing, and its absence must not pass tmpfs for a disk)."""
    try:
        table = MOUNTINFO.read_text(errors="surrogateescape")
    except OSError:
        return FS_UNKNOWN, FS_UNKNOWN, FS_UNKNOWN
    return mount_in(table, str(Path(path).resolve()))


def machine(path: Path) -> dict[str, Any]:
    """What the figures were measured on: cores, memory, and the disk and file system
    that hold ``path`` (durable figures on tmpfs would measure RAM, not a disk)."""
    path = Path(path)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    fstype, source, _ = mount_of(path)
    disk = source  # lsblk only describes it further, when it is there
    if source.startswith("/dev/"):
        listed = _run_text("lsblk", "-P", "-d", "-o", "NAME,MODEL,ROTA,SIZE", source)
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', listed))
        if pairs:
            kind = "rotational" if pairs.get("ROTA") == "1" else "non-rotational"
            disk = f"{pairs.get('NAME')} {pairs.get('MODEL') or ''} ({kind} as the kernel sees it, {pairs.get('SIZE')})"
    return {"cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "cpu": model,
            "memory_gib": round(mem_kib / (1 << 20), 1), "fs_type": fstype, "fs_source": source,
            "disk": " ".join(disk.split()), "path": str(path), "python": platform.python_version(),
            "kernel": platform.release(), "load_1m": round(os.getloadavg()[0], 2)}


#: How long a stopped daemon (SIGTERM) may take to drain before it is killed.
STOP_TIMEOUT_S = 60.0


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``; SIGKILL it if it has not exited within ``STOP_TIMEOUT_S``."""
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int, field: str = "VmRSS") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of process ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def last_json_line(text: str) -> dict[str, Any]:
    """The JSON object on the last line of a benchmark's output that holds one."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")
