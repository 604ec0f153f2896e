"""Is the MSA's state directory writable? Its file system full (ENOSPC, EDQUOT),
read-only (EROFS: ext4 remounts so after an error) or failing (EIO) stops every record
the MSA keeps there — job records, DRVA configurations, protection.json, power.json —
and the DRVAs' status.json beside them, while the DRVAs may go on replicating.

``StateFsWatch`` gathers what tells: the MSA's own writes (``failed`` with such an
error, ``succeeded``) and ``statvfs`` (``check``: full, no free inode, read-only). While
either says so, ``problem`` is the text of the ``state_dir_unwritable`` alarm
(``cdp.msa.alarms``). A failed write is believed until a write succeeds again — one of
ours, or the probe ``check`` makes every ``PROBE_EVERY_S`` (``<state_dir>/.write-probe``,
4 KiB written, fsynced and removed): a disk freed while the MSA is idle clears the alarm
too. One watch per state directory in a process (``watch``).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cdp.errors import CdpError
from cdp.logs import get_logger

log = get_logger("cdp.msa.state_fs")

#: The errors that say the file system, not the file, is at fault, with what to do.
UNWRITABLE: dict[int, str] = {
    errno.ENOSPC: "the file system is full: free space there",
    errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota",
    errno.EROFS: "the file system is read-only (an error made the kernel remount it so?): repair it, remount it "
                 "read-write and restart the daemon",
    errno.EIO: "the disk failed an I/O: check the device (dmesg)",
}
#: Less than this free (or no free inode) is a full file system: a job record is up to
#: ~40 KB, a DRVA's status with 100 domains ~200 KB.
FULL_BYTES_MIN = 256 << 10
CHECK_EVERY_S = 1.0
PROBE_EVERY_S = 2.0
PROBE_NAME = ".write-probe"
PROBE_BYTES = 4096
LOG_EVERY_S = 60.0  # the same unwritable error logged again at most this often


class StateUnwritable(CdpError):
    """A file of the MSA's state directory could not be written (``errno`` says why:
    the REST API answers 507 or 503 by it, FORMAT.md §13.5)."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.errno = code


def is_unwritable(exc: BaseException) -> bool:
    """An ``OSError`` (or ``StateUnwritable``) that says the file system cannot be written."""
    return getattr(exc, "errno", None) in UNWRITABLE


def error_text(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """``<file>: <strerror>`` (the file the error names, else ``path``), the style of
    every state-file error: ``<state_dir>/power.json: No space left on device``."""
    where = exc.filename if exc.filename is not None else path
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"{os.fsdecode(where)}: {cause}" if where is not None else cause


def hint(code: int | None) -> str:
    """What to do about an unwritable file system (``UNWRITABLE``), or ''."""
    return UNWRITABLE.get(code, "") if code is not None else ""


class StateFsWatch:
    """Invariant: ``failure`` is the newest unwritable error of a write since the last
    write that succeeded (None: none); ``fs_problem`` what ``statvfs`` said at the last
    ``check``. Called from the event loop and from worker threads: each update is one
    assignment, and the log's rate limit holds a lock."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = Path(state_dir)
        self.clock = clock
        self.failure: str | None = None
        self.fs_problem: str | None = None
        self.checked_at: float | None = None
        self.probed_at: float | None = None
        self._logged: dict[str, float] = {}  # error text -> when last logged
        self._log_lock = threading.Lock()

    @property
    def problem(self) -> str | None:
        """The alarm's text while the state directory is unwritable, else None."""
        if self.fs_problem is not None:
            return self.fs_problem
        if self.failure is not None:
            return f"a write failed: {self.failure}"
        return None

    def failed(self, path: str | os.PathLike[str] | None, exc: BaseException) -> bool:
        """A write of ours failed; True when its error says the file system is unwritable
        (then it counts until a write succeeds)."""
        if not is_unwritable(exc):
            return False
        text = error_text(exc, path) if isinstance(exc, OSError) else str(exc)
        code = getattr(exc, "errno", None)
        self.failure = f"{text} ({errno.errorcode.get(code, code)}; {hint(code)})"
        self._log_once(text)
        return True

    def succeeded(self) -> None:
        """A write of ours succeeded: the file system takes writes again."""
        if self.failure is not None:
            self.failure = None
            log.info("state_dir_writable_again", state_dir=str(self.state_dir))
            with self._log_lock:
                self._logged.clear()

    def due(self) -> bool:
        """Whether ``check`` would look again now (a caller spares a worker thread)."""
        return self.checked_at is None or self.clock() - self.checked_at >= CHECK_EVERY_S

    def check(self, *, force: bool = False) -> str | None:
        """Look at the file system (``statvfs``; at most every ``CHECK_EVERY_S``) and, while a
        failed write stands and ``statvfs`` sees nothing, probe it; return ``problem``.
        Blocking (a probe fsyncs): call it off the event loop."""
        now = self.clock()
        if not force and self.checked_at is not None and now - self.checked_at < CHECK_EVERY_S:
            return self.problem
        self.checked_at = now
        self.fs_problem = fs_problem(self.state_dir)
        if self.fs_problem is None and self.failure is not None and (
                force or self.probed_at is None or now - self.probed_at >= PROBE_EVERY_S):
            self.probed_at = now
            self._probe()
        return self.problem

    def _probe(self) -> None:
        """Write, fsync and remove a small file: a write that succeeds clears ``failure``."""
        path = self.state_dir / PROBE_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"\0" * PROBE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError as exc:
            self.failed(path, exc)
            return
        self.succeeded()

    def _log_once(self, text: str) -> None:
        """Each distinct error logged once, the same again at most every ``LOG_EVERY_S``."""
        now = self.clock()
        with self._log_lock:
            last = self._logged.get(text)
            if last is not None and now - last < LOG_EVERY_S:
                return
            self._logged[text] = now
        log.warning("state_dir_unwritable", state_dir=str(self.state_dir), error=text)


def fs_problem(state_dir: Path) -> str | None:
    """What ``statvfs`` says is wrong with the file system of ``state_dir``: read-only,
    full (less than ``FULL_BYTES_MIN`` free to us: root may use the reserved blocks), or
    out of inodes; None when it says nothing (or cannot be asked)."""
    try:
        st = os.statvfs(state_dir)
    except OSError:
        return None  # a missing directory is the writes' to report
    if st.f_flag & os.ST_RDONLY:
        return f"{state_dir}: mounted read-only ({hint(errno.EROFS)})"
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free < FULL_BYTES_MIN:
        return f"{state_dir}: {free} bytes free ({hint(errno.ENOSPC)})"
    if st.f_files > 0 and (st.f_ffree if os.geteuid() == 0 else st.f_favail) == 0:  # btrfs counts none
        return f"{state_dir}: no free inode ({hint(errno.ENOSPC)})"
    return None


_watches: dict[str, StateFsWatch] = {}
_watches_lock = threading.Lock()


def watch(state_dir: str | os.PathLike[str]) -> StateFsWatch:
    """The one watch of ``state_dir`` in this process (the job store, the supervisor and
    the API report to it; the alarms read it)."""
    key = os.path.abspath(state_dir)
    with _watches_lock:
        found = _watches.get(key)
        if found is None:
            found = _watches[key] = StateFsWatch(Path(key))
        return found
