"""The directory an NBD server's Unix socket is made in (docs/FORMAT.md §17.6).

Who may connect to a Unix socket is who may open its file (0600, ``cdp.nbd.server``) —
and who controls its directory: another user who may write there can remove our socket
and put one of their own at the path, so clients hand a VM's disk to them; one who owns
a link on the way chooses where the socket lands. So the directory must be ours alone,
by the rule install applies to every directory root writes in (``dir_problem``,
FORMAT.md §13.15: every step owned by root or us, none writable by others unless sticky,
the directory itself writable by no one else). A missing directory is made 0700.
"""

from __future__ import annotations

import os
from pathlib import Path

from cdp.errors import ConfigError

#: A directory made for a socket: no one else may even look in.
SOCKET_DIR_MODE = 0o700


def prepare_socket_dir(path: str | os.PathLike[str]) -> None:
    """Make the missing directories of socket ``path`` (``SOCKET_DIR_MODE``), then check
    that its directory is ours alone; ConfigError naming the socket, the step at fault
    and what was expected otherwise. Checked before anything is made too: nothing is
    created under a directory another user controls."""
    directory = Path(path).parent
    # Imported when used: cdp.msa.config imports cdp.nbd, so a module-level import is a cycle.
    from cdp.msa.install_dirs import make_missing_dirs

    _refuse_if_not_ours(path, directory)
    make_missing_dirs(directory, SOCKET_DIR_MODE)
    _refuse_if_not_ours(path, directory)  # one made meanwhile by someone else is judged as any other


def _refuse_if_not_ours(path: str | os.PathLike[str], directory: Path) -> None:
    # Imported when used: cdp.msa.config imports cdp.nbd, so a module-level import is a cycle.
    from cdp.msa.install_dirs import dir_problem, who

    problem = dir_problem(directory)
    if problem is None:
        return
    raise ConfigError(
        f"NBD socket {os.fspath(path)}: {problem}; the exports carry no authentication, so the socket's "
        f"directory must be ours alone: expected every directory on the way owned by root or "
        f"{who(os.geteuid())} and writable by no other user (a shared one like /tmp only if sticky), the "
        f"directory itself writable by no one else, and no link on the way owned by another user: fix the "
        f"owner or mode (chown, chmod go-w) or serve on a socket elsewhere")
