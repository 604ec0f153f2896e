"""Shared plumbing of the benchmarks: arguments, progress, timing, the JSON last line.

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


# ---------------------------------------------------------------- the machine and processes

def _run_text(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(path: Path) -> dict[str, Any]:
    """What the figures were measured on: cores, memory, and the disk and file system
    that hold ``path`` (durable figures on tmpfs would measure RAM, not a disk)."""
    path = Path(path)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    fstype, source = (_run_text("findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(path)).split() + ["?", "?"])[:2]
    disk = source
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
