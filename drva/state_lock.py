"""A DRVA's claim on its state directory: an exclusive ``flock`` of the directory itself,
held while the DRVA runs and dropped by the kernel when it exits (or is killed).

Two DRVAs given one ``state_dir`` (a configuration copied and not edited) both started:
each replaced the other's ``status.json`` every second and took the other's requests
(``requests/``), so the MSA saw one of them and lost the other's marks. The directory is
locked rather than a file in it, so the claim leaves nothing there for ``cdp uninstall``
to remove (it empties a DRVA's state directory of what the DRVA writes, then removes it).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cdp.errors import Busy
from cdp.logs import get_logger
from drva.status import os_error_text

log = get_logger("drva")


class StateDirLock:
    """The flock of one state directory; ``release`` (or the process's end) drops it."""

    def __init__(self, state_dir: Path, fd: int | None) -> None:
        self.state_dir = state_dir
        self._fd = fd

    @classmethod
    def take(cls, state_dir: Path) -> "StateDirLock":
        """Lock ``state_dir`` (it exists) without waiting. ``Busy`` when another open of it
        holds the lock: another DRVA runs with this state directory. A directory that
        cannot be opened or takes no lock (a file system without ``flock``) is logged
        (``state_dir_unlocked``) and the DRVA runs without the claim: the directory holds
        side files only, which never stop the DRVA."""
        try:
            fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("state_dir_unlocked", state_dir=str(state_dir), error=os_error_text(exc))
            return cls(state_dir, None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"state_dir {state_dir}: another DRVA runs with this state directory (it holds its "
                       f"lock): two would replace each other's status.json and take each other's requests; "
                       f"give each DRVA a state_dir of its own") from None
        except OSError as exc:
            os.close(fd)
            log.warning("state_dir_unlocked", state_dir=str(state_dir), error=os_error_text(exc))
            return cls(state_dir, None)
        return cls(state_dir, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
