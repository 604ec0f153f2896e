"""A simulated host whose state directory fills up (found by the full-disk audit, with a
real ``iofilter-sim run`` whose log and status file are on a small tmpfs):

* the status writer ended at its first ENOSPC: after 2 s of a full disk the status was
  never rewritten again, so the MSA refused every later planned failover (a status
  40 s old) and a host started while the disk was full stayed ``starting`` for good.
  It now logs the error (once, then at most once a minute) and tries again each tick;
* SIGTERM's handler wrote its message to stderr (the log, on the full disk) before it
  told the runner to stop: the ENOSPC ended the handler, the host never drained and was
  SIGKILLed 60 s later. The runner is told first now, whatever the message does, and
  a summary that cannot be printed no longer turns a drained exit (0) into an error.

The domain runs ``--isolated`` (its VMs write their disks only): no DRVA is needed, and
its drain has nothing to wait for.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from cdp import site_files
from tests.drva.harness import ROOT, SECRET
from tests.full_fs import fill, free, tmpfs
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 4 << 20
STOP_S = 15.0  # a stop with nothing to drain takes well under a second; SIGKILL came after 60 s


def _cluster(tmp_path: Path) -> Path:
    return site_files.write_inventory(tmp_path / "cluster.toml", site_files.inventory(
        "site-a", ["esx-01"], [site_files.vm("vm1", "esx-01", [("d0", DISK)])],
        [site_files.domain("erp", 1, "127.0.0.1:9", ["vm1"], {"kind": "random", "rate_mb_s": 1})],
        state_dir=tmp_path / "disks"))


async def _start_host(cluster: Path, state: Path) -> asyncio.subprocess.Process:
    """``iofilter-sim run`` as the simulator driver runs it: its output appended to a log
    and its status rewritten, both in ``state``."""
    fd = os.open(state / "host.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iofilter_sim", "run", str(cluster), "--status", str(state / "status.json"),
            "--isolated", "erp", "--no-hashes", "--json", cwd=ROOT,
            env={**os.environ, "CDP_SITE_SECRET": SECRET, "CDP_LOG_LEVEL": "info"},
            stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
    finally:
        os.close(fd)


def _status_time(path: Path, pid: int) -> float | None:
    """The ``time`` of the status ``pid`` wrote last, None while there is none."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc["time"] if doc.get("pid") == pid else None


async def _stopped(proc: asyncio.subprocess.Process, within_s: float) -> int | None:
    """Its exit code, or None (then it is SIGKILLed) if it did not exit within ``within_s``."""
    try:
        async with asyncio.timeout(within_s):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None


async def test_the_status_is_written_again_once_a_full_disk_has_room(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    with tmpfs(tmp_path / "state", "2m") as state:
        proc = await _start_host(cluster, state)
        try:
            status = state / "status.json"
            await wait_until(lambda: _status_time(status, proc.pid) is not None, EVENTUALLY_S, "the first status")
            fill(state)
            await asyncio.sleep(2.0)  # four ticks of failed writes
            assert proc.returncode is None, "the host exited on a full disk"
            free(state)
            freed_at = time.time()
            await wait_until(lambda: (_status_time(status, proc.pid) or 0) > freed_at, 10.0,
                             "a status written after the disk had room again (the writer died at its ENOSPC)")
            log_text = (state / "host.log").read_text()
            assert log_text.count('"status_unwritable"') <= 2, "each failed write logged: the log fills the disk"
        finally:
            proc.send_signal(signal.SIGTERM)
            await _stopped(proc, STOP_S)


async def test_sigterm_stops_a_host_whose_log_is_on_a_full_disk(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    with tmpfs(tmp_path / "state", "2m") as state:
        proc = await _start_host(cluster, state)
        status = state / "status.json"
        await wait_until(lambda: _status_time(status, proc.pid) is not None, EVENTUALLY_S, "the first status")
        fill(state)
        proc.send_signal(signal.SIGTERM)
        code = await _stopped(proc, STOP_S)
        assert code is not None, f"SIGTERM did not stop the host within {STOP_S:g} s: its message hit ENOSPC first"
        assert code == 0, f"exit {code}: drained, it exits 0 (its summary is lost on the full disk, not its word)"
