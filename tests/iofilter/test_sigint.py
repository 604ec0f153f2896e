"""``iofilter-sim run`` stops on SIGINT every time (issue 9), as a real process streaming
to a real DRVA: the first signal stops the workload, drains and exits 0 (every captured
write acked); a second one gives the drain up and exits 1.

A lost cancellation (``asyncio.wait_for`` on Python 3.11, see test_cancel.py) made the
stop a lottery: the process hung in closing its clients after the drain. One run rarely
shows it; hence several runs in a row, each continuing the domain the previous one wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from cdp import site_files
from tests.drva.harness import ROOT, SECRET, DrvaProcess, domain_doc, drva_doc, free_port
from tests.waiting import EVENTUALLY_S, wait_until

RUNS = 5
DISK = 8 << 20
# A drained stop takes well under a second (acks are due within a group commit); the
# bound is for a slow, shared machine. A lost cancellation never ends at all.
STOP_S = 30.0
# The message iofilter-sim prints on stderr when the first signal is taken.
STOPPING = "iofilter-sim: stopping"

def _setup(tmp_path: Path) -> tuple[DrvaProcess, Path]:
    port = free_port()
    drva = DrvaProcess(drva_doc(tmp_path, "drva-s", [domain_doc(1, "erp", [("vm1", "d0", DISK)])], port=port,
                                status_interval_s=0.1), tmp_path)
    cluster = site_files.write_inventory(tmp_path / "cluster.toml", site_files.inventory(
        "site-a", ["esx-01"], [site_files.vm("vm1", "esx-01", [("d0", DISK)])],
        [site_files.domain("erp", 1, f"127.0.0.1:{port}", ["vm1"], {"kind": "random", "rate_mb_s": 2})],
        state_dir=tmp_path / "disks"))
    return drva, cluster


def _durable_seq(drva: DrvaProcess) -> int:
    try:
        return int(drva.status()["domains"][0]["durable_seq"])
    except (OSError, ValueError, KeyError, IndexError):  # not written yet
        return 0


async def _start_sim(cluster: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iofilter_sim", "run", str(cluster), "--json", cwd=ROOT,
        env={**os.environ, "CDP_SITE_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def _exit(proc: asyncio.subprocess.Process, what: str) -> tuple[int, dict[str, Any], str]:
    """(exit code, summary, stderr) of ``proc``, which must exit within STOP_S."""
    try:
        async with asyncio.timeout(STOP_S):
            out, err = await proc.communicate()
    except TimeoutError:
        await _kill(proc)
        raise AssertionError(f"iofilter-sim did not exit within {STOP_S} s of {what}") from None
    lines = out.decode().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), err.decode()


@pytest.mark.slow
async def test_sigint_drains_and_exits_0_every_time(tmp_path):
    drva, cluster = _setup(tmp_path)
    drva.start()
    try:
        for run in range(RUNS):
            before = _durable_seq(drva)
            proc = await _start_sim(cluster)
            try:
                await wait_until(lambda: _durable_seq(drva) > before, EVENTUALLY_S,
                                 f"run {run}'s writes to reach the DRVA")
            except BaseException:
                await _kill(proc)
                raise
            proc.send_signal(signal.SIGINT)
            code, summary, err = await _exit(proc, f"SIGINT (run {run})")
            assert code == 0, f"run {run}: exit {code}: {err[-2000:]}"
            erp = summary["domains"]["erp"]
            assert summary["drained"] is True and erp["acked_seq"] == erp["captured_seq"] > before
    finally:
        drva.stop()


@pytest.mark.slow
async def test_a_second_sigint_gives_the_drain_up_and_exits_1(tmp_path):
    drva, cluster = _setup(tmp_path)
    drva.start()
    image = tmp_path / "disks" / "vm1-d0.img"
    assert drva.proc is not None
    try:
        proc = await _start_sim(cluster)
        try:
            await wait_until(lambda: _durable_seq(drva) > 0, EVENTUALLY_S, "writes to reach the DRVA")
            # The DRVA stops answering; a write the filter captures after that (it lands on
            # the primary image) cannot be acked, so the drain cannot finish.
            drva.proc.send_signal(signal.SIGSTOP)
            stopped_at_ns = image.stat().st_mtime_ns
            await wait_until(lambda: image.stat().st_mtime_ns > stopped_at_ns, EVENTUALLY_S,
                             "a write captured after the DRVA stopped")
            proc.send_signal(signal.SIGINT)
            assert proc.stderr is not None
            async with asyncio.timeout(STOP_S):  # the message says the first signal was taken
                while STOPPING not in (line := (await proc.stderr.readline()).decode()):
                    assert line, "iofilter-sim closed stderr without saying it was stopping"
        except BaseException:
            await _kill(proc)
            raise
        proc.send_signal(signal.SIGINT)
        code, summary, err = await _exit(proc, "a second SIGINT")
        assert code == 1, f"exit {code}: {err[-2000:]}"
        erp = summary["domains"]["erp"]
        assert summary["drained"] is False and erp["acked_seq"] < erp["captured_seq"]
    finally:
        drva.proc.send_signal(signal.SIGCONT)
        drva.stop()
