"""Scratch directories of long jobs: a killed job's is swept by the next, a running one's
never (cdp/scratch.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cdp.scratch import ORPHAN_AGE_S, OWNER_NAME, scratch_directory, sweep_stale
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva.consolidate import SCRATCH_PREFIX, consolidate

PREFIX = "consolidate-"
#: A process that makes a scratch directory, fills it, says where, and waits to be killed.
HOLDER = """
import sys, time
from cdp.scratch import scratch_directory
with scratch_directory(sys.argv[1], "consolidate-") as path:
    (path / "disk.img").write_bytes(b"x" * 65536)
    print(path, flush=True)
    time.sleep(120)
"""


def _holder(parent: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(parent)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    line = proc.stdout.readline().strip()
    assert line, "the holder did not start"
    return proc, Path(line)


def test_a_killed_jobs_directory_is_swept_and_a_running_ones_kept(tmp_path: Path) -> None:
    killed, dead_dir = _holder(tmp_path)
    running, live_dir = _holder(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert (dead_dir / "disk.img").exists()  # SIGKILL: nothing of the job's own cleanup ran
        with scratch_directory(tmp_path, PREFIX) as mine:
            assert not dead_dir.exists()
            assert (live_dir / "disk.img").exists()
            assert (mine / OWNER_NAME).is_file()
            # ... and this job's own directory is not another's stale one.
            assert sweep_stale(tmp_path, PREFIX) == []
        assert not mine.exists()
        assert live_dir.exists()
    finally:
        running.kill()
        running.wait()
        killed.stdout.close()
        running.stdout.close()
    assert sweep_stale(tmp_path, PREFIX) == [live_dir.name]  # dead once waited for: its lock went with it
    assert not live_dir.exists()


def test_only_our_own_directories_are_swept(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / OWNER_NAME).write_bytes(b"")
    (target / "keep").write_bytes(b"k")
    os.symlink(target, tmp_path / f"{PREFIX}link")  # a link: never followed
    other = tmp_path / f"{PREFIX}other-user"  # another user's (only root can make one here)
    if os.geteuid() == 0:
        other.mkdir()
        (other / OWNER_NAME).write_bytes(b"")
        os.chown(other, 65534, 65534)
    young = tmp_path / f"{PREFIX}young"  # between mkdtemp and its lock
    young.mkdir()
    old = tmp_path / f"{PREFIX}old"  # died in that instant, long ago
    old.mkdir()
    past = time.time() - ORPHAN_AGE_S - 60
    os.utime(old, (past, past))
    no_dir = tmp_path / f"{PREFIX}file"
    no_dir.write_bytes(b"f")
    owner_link = tmp_path / f"{PREFIX}owner-link"
    owner_link.mkdir()
    os.symlink(target / OWNER_NAME, owner_link / OWNER_NAME)

    swept = sweep_stale(tmp_path, PREFIX)

    assert swept == [old.name]
    assert (target / "keep").exists() and (tmp_path / f"{PREFIX}link").is_symlink()
    assert young.exists() and no_dir.exists() and owner_link.exists()
    assert other.exists() or os.geteuid() != 0


def test_a_missing_parent_sweeps_nothing(tmp_path: Path) -> None:
    assert sweep_stale(tmp_path / "absent", PREFIX) == []


async def test_a_consolidation_sweeps_a_killed_ones_scratch(tmp_path: Path) -> None:
    """The consolidation job uses it: a directory a killed job left (its lock gone) is
    removed by the next job, which leaves none of its own."""
    killed, dead_dir = _holder(tmp_path)
    killed.kill()
    killed.wait()
    killed.stdout.close()
    assert SCRATCH_PREFIX == PREFIX and dead_dir.exists()
    b = await DomainBuilder(MemoryStore()).start()
    await random_workload(b, np.random.default_rng(3), 20, seal_every=5)
    summary = await consolidate(b.store, b.domain, older_than_s=0, now_ns=2**62, scratch_dir=tmp_path)
    assert summary["consolidated_seq"] is not None
    assert not dead_dir.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)] == []
