"""Where a DRVA's CPU goes, by stage: exact CPU per thread, split by py-spy samples.

``thread_cpu`` reads each thread's CPU time from ``/proc/PID/task/TID/stat`` (exact);
``thread_groups`` names the threads (``py-spy dump``): the event loop (``main``: receive,
validation, staging, acks), the sealer (``seal``: segment builds, log read-backs), the
block compressors (``pack``: lz4 and its sums) and the workers of ``asyncio.to_thread``
(``worker``: log appends, store puts, catalog and status writes). ``attribute`` splits each
group's CPU among stages by the py-spy samples of that group (``ATTRIBUTION``).

py-spy counts a thread blocked in the kernel (``fdatasync``, ``fsync``: state D) as active,
so samples whose leaf is such a wait are left out; within the ``worker`` group the split
between log and segment writes is still only as good as that filter (a ``pwritev`` held
up by writeback looks like work).
"""

from __future__ import annotations

import asyncio
import linecache
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks._stages import cpu_s

ROOT = Path(__file__).resolve().parent.parent
PY_SPY_ATTACH_S = 0.5  # py-spy's start before the run it samples

#: py-spy stacks to stages: the first rule whose marker is in a stack wins.
ATTRIBUTION = (
    ("catalog_commit", ("commit_step", "commit_delta", "cdp/catalog", "cdp/meta.py", "meta_doc")),
    ("segment_write", ("_write_atomic", "cdp/store/")),
    ("lz4", ("_pack_block",)),
    ("segment_build", ("segment_build.py", "_build (drva/shipper.py")),
    ("log_write", ("cdp/replog.py", "_append (drva/committer.py")),
    ("frame_validation", ("decode_frame", "check_records", "_cut (drva/session.py")),
    ("socket_receive", ("read_message", "readexactly", "streams.py", "data_received")),
)
#: Leaves where a thread waits rather than works: py-spy counts a thread blocked in the
#: kernel (fdatasync, fsync: state D) as active, and now and then one waiting on a pool's
#: queue or on a condition (a build waiting for its blocks).
_WAIT_SOURCE = re.compile(r"fsync|fdatasync|sync_data|sync_file|work_queue.get|\.wait\(|waiter.acquire\(")
_FRAME = re.compile(r"(.*) \((.*):(\d+)\)$")


def _waiting(leaf: str) -> bool:
    m = _FRAME.match(leaf)
    if not m:
        return False
    path = m.group(2)
    for base in (ROOT, Path(os.__file__).parent):
        line = linecache.getline(str(base / path), int(m.group(3)))
        if line:
            return bool(_WAIT_SOURCE.search(line))
    return False


def _stage(stack: str, leaf: str) -> str:
    stage = next((name for name, marks in ATTRIBUTION if any(m in stack for m in marks)), None)
    if stage is not None:
        return stage
    # No Python frame below the loop: uvloop's own work (recv, send, polling).
    return "socket_receive" if ("runners.py" in leaf or "uvloop" in leaf or "daemon.py" in leaf) else "other"


def _group(stack: str) -> str:
    """The DRVA's thread group a py-spy stack ran on (``thread_groups``)."""
    if "_pack_blocks" in stack:
        return "pack"
    if "_build (drva/shipper.py" in stack:
        return "seal"
    return "worker" if "Thread._bootstrap" in stack else "main"


def thread_groups(pid: int) -> dict[int, str]:
    """tid -> group (main, seal, pack, worker) of the DRVA's threads, from their names."""
    spy = Path(sys.executable).parent / "py-spy"
    out = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    groups = {}
    for tid, name in re.findall(r'^Thread (\d+) \([^)]*\): "([^"]+)"', out, re.M):
        groups[int(tid)] = ("main" if name == "MainThread" else "seal" if name.startswith("drva-seal")
                            else "pack" if name.startswith("drva-pack") else "worker")
    return groups


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = cpu_s(pid, int(tid))
        except OSError:
            pass  # ended meanwhile
    return out


def attribute(raw: str, group_cpu: dict[str, float] | None) -> dict[str, float]:
    """Shares of the DRVA's CPU by stage. Each thread group's CPU (``group_cpu``, from
    /proc: exact) is split by the py-spy samples of that group, waits left out; without
    ``group_cpu``, the shares of the samples alone."""
    counts: dict[str, dict[str, int]] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if _waiting(leaf):
            continue
        g = counts.setdefault(_group(stack), {})
        stage = _stage(stack, leaf)
        g[stage] = g.get(stage, 0) + int(n)
    shares: dict[str, float] = {}
    if group_cpu is None:
        group_cpu = {g: float(sum(c.values())) for g, c in counts.items()}
    total_cpu = sum(group_cpu.values()) or 1.0
    for g, cpu in group_cpu.items():
        c = counts.get(g) or {"other": 1}
        n = sum(c.values())
        for stage, k in c.items():
            shares[stage] = shares.get(stage, 0.0) + cpu / total_cpu * k / n
    return dict(sorted(shares.items()))




async def profile_run(pid: int, run: Callable[[], Awaitable[None]], out: Path,
                      within_s: float) -> dict[str, float] | None:
    """Shares of process ``pid``'s CPU by stage while ``run()`` runs (``attribute``, with
    each thread group's exact CPU), or None without py-spy or when it could not attach.
    py-spy samples for at most ``within_s``."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return None
    rec = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                            "--nonblocking", "--output", str(out), "--duration", str(int(within_s))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(PY_SPY_ATTACH_S)
        cpu0 = thread_cpu(pid)
        await run()
        cpu1 = thread_cpu(pid)
    finally:
        rec.send_signal(signal.SIGINT)  # it writes what it has
        try:
            rec.wait(30)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait()
    if not out.exists():
        return None
    groups = thread_groups(pid)
    group_cpu: dict[str, float] | None = {}
    for tid, cpu in cpu1.items():
        if tid not in groups:
            group_cpu = None  # a thread we cannot name: the samples alone
            break
        group_cpu[groups[tid]] = group_cpu.get(groups[tid], 0.0) + cpu - cpu0.get(tid, 0.0)
    return attribute(out.read_text(), group_cpu)
