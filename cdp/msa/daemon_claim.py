"""A daemon's claim on its state directory: ``msa.lock`` flocked while it runs, and
``msa.pid`` naming it (FORMAT.md §13.3) — what makes a second daemon for the same state
directory refuse to start, and what ``cdp uninstall`` reads to stop the running one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cdp.errors import Busy
from cdp.logs import get_logger
from cdp.msa.keeper import read_pid_file, same_process, stale_reason, write_pid_file

log = get_logger("cdp.msa.daemon")  # its events are the daemon's (msa_pid_file_*), as they were

PID_NAME = "msa.pid"
LOCK_NAME = "msa.lock"  # flocked by the running daemon (FORMAT.md §13.3)


class DaemonClaim:
    """``take`` at start, ``release`` at stop. Invariant: ``lock_fd`` is the flocked
    ``msa.lock`` from a ``take`` that succeeded until the ``release`` after it, else None."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.pid_path = state_dir / PID_NAME
        self.lock_fd: int | None = None

    def take(self) -> None:
        """Refuse to start while another daemon runs for this state directory; else name
        this one in the pid file. The claim is an exclusive flock of ``msa.lock``, held
        while the daemon runs and dropped by the kernel when it dies: two daemons started
        at the same instant both read "no daemon" from the pid file, and both wrote it.
        The pid file stays what ``cdp uninstall`` reads: a file naming a process that is
        gone, or a process started at another time than the file says (its pid was
        reused), is a leftover of a killed daemon: replaced."""
        self._lock()
        try:
            self._name_this_daemon()
        except BaseException:
            os.close(self.lock_fd)
            self.lock_fd = None
            raise

    def release(self) -> None:
        """Remove ``msa.pid`` if it names this daemon, then drop the lock. A file that
        cannot be removed (a read-only state directory) is logged and left: it names a
        process that is gone, which the next daemon tells by its start time."""
        try:
            found = read_pid_file(self.pid_path)
        except (OSError, ValueError):
            found = None
        try:
            if found is not None and found[0] == os.getpid():
                self.pid_path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("msa_pid_file_not_removed", pid_file=str(self.pid_path), error=exc.strerror or str(exc))
        if self.lock_fd is not None:  # after the pid file: a daemon starting now finds it gone
            os.close(self.lock_fd)
            self.lock_fd = None

    def _name_this_daemon(self) -> None:
        try:
            found = read_pid_file(self.pid_path)
        except (OSError, ValueError) as exc:
            found = None  # unreadable: a leftover, replaced below
            log.warning("msa_pid_file_replaced", pid_file=str(self.pid_path), error=str(exc))
        if found is not None and found[0] != os.getpid() and same_process(*found):
            # The lock is ours, so this is a daemon that takes none (an older version).
            raise Busy(f"a daemon already runs for {self.state_dir} (pid {found[0]}, from {self.pid_path}); "
                       f"stop it first")
        if found is not None and found[0] != os.getpid():
            log.warning("msa_pid_file_stale", pid_file=str(self.pid_path), pid=found[0], why=stale_reason(*found))
        write_pid_file(self.pid_path, os.getpid())

    def _lock(self) -> None:
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"a daemon already runs for {self.state_dir} (it holds {LOCK_NAME} there); "
                       f"stop it first") from None
        except BaseException:
            os.close(fd)
            raise
        self.lock_fd = fd
