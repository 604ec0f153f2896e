"""Scratch directories of long jobs (a consolidation rebuilds whole disks in one), and
the sweep of those a dead process left behind.

A job's scratch directory holds an ``.owner`` file the job keeps ``flock``-ed while it
runs. The kernel lets go of the lock when the process dies however it died (SIGKILL,
OOM, power loss), so a later job that can take the lock of a sibling directory knows no
one uses it: it removes it. Without that, every consolidation killed midway left a
directory as large as the domain's disks in the MSA's ``<state_dir>/scratch`` (or in
/tmp), and nothing ever removed it.

Only directories that are ours are swept: the given prefix, a real directory (not a
symbolic link), owned by this user, holding an ``.owner`` regular file whose lock can
be taken. A directory without one (a job between ``mkdtemp`` and taking its lock) is
left alone until it is ``ORPHAN_AGE_S`` old.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cdp.logs import get_logger

log = get_logger("cdp.scratch")

OWNER_NAME = ".owner"
#: A scratch directory with no ``.owner`` yet is another job's first instant; one this
#: old is what a death in that instant left.
ORPHAN_AGE_S = 24 * 3600.0


@contextmanager
def scratch_directory(parent: Path | str | None, prefix: str) -> Iterator[Path]:
    """A fresh directory ``<parent>/<prefix>XXXXXXXX`` (``parent`` None: the system's
    temporary directory), locked for as long as the ``with`` lasts and removed after;
    stale siblings of the same prefix are swept first (module docstring)."""
    where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_stale(where, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    fd = -1
    try:
        fd = os.open(path / OWNER_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd >= 0:
            os.close(fd)


def sweep_stale(parent: Path, prefix: str, now: float | None = None) -> list[str]:
    """Remove the directories ``<parent>/<prefix>*`` no live process holds; their names."""
    now = time.time() if now is None else now
    swept = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return swept
    for name in names:
        path = parent / name
        if _stale(path, now):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(name)
            log.info("scratch_swept", path=str(path), reason="no live process holds it")
    return swept


def _stale(path: Path, now: float) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return False
    try:
        fd = os.open(path / OWNER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return now - st.st_mtime > ORPHAN_AGE_S
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a running job's
        return True
    finally:
        os.close(fd)  # the lock taken goes with it; the directory is removed next
