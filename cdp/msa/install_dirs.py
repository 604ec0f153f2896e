"""The directories ``cdp install`` and ``cdp uninstall`` write in, and whether they may.

Both run as root. Every directory they write in — ``state_dir``, ``[tls] dir``, each
partition's directory — must be ours alone (``dir_problem``: owned by us or root,
writable by no other user, reached only through directories and links no other user
controls, as ssh's StrictModes asks), or missing (install creates it, 0755). Anything
else is refused before anything is written: another user who controls a step of the
path chooses where root's writes land (FORMAT.md §13.15, "Directories").

The same check guards every writer of ``state_dir``: the CLI's job records
(``ensure_state_dir``, before the first record), the daemon's start, and the pid file
uninstall reads (``cdp.msa.install_daemon``).
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from cdp.errors import ConfigError
from cdp.msa.config import DrvaSpec, SiteConfig

SYMLINK_HOPS_MAX = 40  # Linux's MAXSYMLINKS: a longer chain of links is a loop
DIR_MODE = 0o755  # what install creates: no umask makes it writable by others


def drva_config_path(cfg: SiteConfig, drva: DrvaSpec) -> Path:
    return cfg.state_dir / "drvas" / f"{drva.name}.toml"


def jobs_dir(cfg: SiteConfig) -> Path:
    return cfg.state_dir / "jobs"


def who(uid: int) -> str:
    """``uid N (name)`` for messages; the name only when this host knows it."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def dir_problem(path: Path) -> str | None:
    """Why another user could change what lies at or below directory ``path``, or None.

    Walks ``path`` from ``/`` as the kernel resolves it: every directory on the way and
    every symbolic link must be owned by root or by us; a directory on the way that
    others may write must be sticky (as /tmp: no one else may rename or replace what is
    ours there), and ``path`` itself writable by no one else (in a sticky directory
    another user could still create the names we are about to). A missing tail is
    fine: install creates it. The rules of ssh's StrictModes, for the same reason: any
    other user who controls a step of the path chooses where root's writes land.
    """
    trusted = (0, os.geteuid())
    absolute = path if path.is_absolute() else Path.cwd() / path  # ".." kept: the kernel resolves it after links
    todo = list(reversed(absolute.parts[1:]))
    here, hops = Path("/"), 0
    while todo:
        name = todo.pop()
        if name == "..":
            here = here.parent
            continue
        step = here / name
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{step}: {exc.strerror}"
        if st.st_uid not in trusted:
            return f"{step} is owned by {who(st.st_uid)}"
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > SYMLINK_HOPS_MAX:
                return f"{step}: more than {SYMLINK_HOPS_MAX} symbolic links on the way (a loop)"
            target = os.readlink(step)
            if os.path.isabs(target):
                here = Path("/")
            todo.extend(reversed([part for part in Path(target).parts if part not in ("/", ".")]))
            continue
        if not stat.S_ISDIR(st.st_mode):
            return f"{step} is not a directory"
        if st.st_mode & 0o022 and (not todo or not st.st_mode & stat.S_ISVTX):
            return f"{step} may be written by other users (mode {stat.S_IMODE(st.st_mode):04o})"
        here = step
    return None


#: Who writes in the directories ``dir_error`` refuses, as its message says.
WRITER_INSTALL = "cdp install and uninstall write"


def dir_error(cfg: SiteConfig, field: str, path: Path, problem: str, writer: str = WRITER_INSTALL) -> ConfigError:
    """The refusal of directory ``path`` (site-file ``field``) for ``problem``;
    ``writer`` says who would write there ("<who> write(s)")."""
    return ConfigError(
        f"{field} in {cfg.path} ({path}): {problem}; {writer} there as "
        f"{who(os.geteuid())}, so every directory on the way must be owned by it or by root and "
        f"writable by no other user (a shared one like /tmp only if sticky), and the directory itself "
        f"by no one else at all: fix the owner or mode (chown, chmod go-w), or set {field} elsewhere")


def local_dirs(cfg: SiteConfig) -> list[tuple[str, Path]]:
    """(site-file field, directory) for each directory install writes in."""
    dirs = [("state_dir", cfg.state_dir), ("state_dir", cfg.state_dir / "drvas")]
    if cfg.tls is not None:
        dirs.append(("[tls] dir", cfg.tls.dir))
    for i, drva in enumerate(cfg.drvas):
        dirs += [("state_dir", cfg.drva_state_dir(drva)), (f"drvas[{i}].log.path", drva.log_path.parent),
                 (f"drvas[{i}].meta.path", drva.meta_path.parent)]
    return dirs


def local_dir_errors(cfg: SiteConfig) -> list[ConfigError]:
    """Every refusal ``check_local_dirs`` could make, in its order. A problem several
    directories share (a parent of them all) is named once, for the first."""
    errors, seen = [], set()
    for field, path in local_dirs(cfg):
        problem = dir_problem(path)
        if problem is not None and problem not in seen:
            seen.add(problem)
            errors.append(dir_error(cfg, field, path, problem))
    if cfg.tls is not None and cfg.tls.dir.is_symlink():
        errors.append(ConfigError(
            f"[tls] dir in {cfg.path} ({cfg.tls.dir}): a symbolic link; install sets this directory's mode "
            f"and writes the CA key in it, never through a link: put the directory itself there, or set "
            f"[tls] dir to its own path"))
    return errors


def check_local_dirs(cfg: SiteConfig) -> None:
    """``ConfigError`` naming the first directory install writes in that is not ours
    alone (``dir_problem``), or a TLS directory that is a symbolic link (install sets
    its mode: never through a link)."""
    errors = local_dir_errors(cfg)
    if errors:
        raise errors[0]


def make_missing_dirs(path: Path, mode: int = DIR_MODE) -> None:
    """``mkdir -p path`` with ``mode`` (``DIR_MODE``: a umask only takes bits away, so none
    is writable by others; not chmod-ed after, which would follow a link put there
    meanwhile); one made meanwhile by someone else is left for the caller's
    ``dir_problem`` to judge."""
    missing = []
    here = path
    while not os.path.lexists(here):
        missing.append(here)
        here = here.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass


def made_dir_problem(path: Path, mode: int = DIR_MODE) -> str | None:
    """Create ``path`` and its missing parents (``make_missing_dirs``), then say why
    another user could change what lies in it (``dir_problem``: one someone else made
    first, in a race or not, or 0777 from an older release), or None. OSError when a
    directory cannot be made."""
    make_missing_dirs(path, mode)
    return dir_problem(path)


def ensure_dir(cfg: SiteConfig, field: str, path: Path, writer: str = WRITER_INSTALL) -> None:
    """``made_dir_problem`` of ``path``, refused as ``field`` of the site file says."""
    if (problem := made_dir_problem(path)) is not None:
        raise dir_error(cfg, field, path, problem, writer)


def _file_in_the_way(path: Path) -> bool:
    """Something other than a directory or a link is at ``path``: nothing can be written
    below it, and the job store says so itself, naming it (``cdp.msa.jobs``)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISDIR(mode) or stat.S_ISLNK(mode))


def check_state_dir(cfg: SiteConfig, writer: str = WRITER_INSTALL) -> None:
    """``ConfigError`` when ``state_dir`` or its job records' directory is not ours
    alone: a pid file or job record another user can replace aims our writes (and
    uninstall's SIGTERM) where they choose."""
    paths = [cfg.state_dir] if _file_in_the_way(jobs_dir(cfg)) else [cfg.state_dir, jobs_dir(cfg)]
    for path in paths:
        if (problem := dir_problem(path)) is not None:
            raise dir_error(cfg, "state_dir", path, problem, writer)


def ensure_state_dir(cfg: SiteConfig, writer: str = WRITER_INSTALL) -> None:
    """Check ``state_dir`` (``check_state_dir``) before anything is written in it, then
    create it and its ``jobs`` directory (``DIR_MODE``: under any umask, nothing the
    next check would refuse) and check them again, as install does (``ensure_dir``)."""
    check_state_dir(cfg, writer)
    jobs = jobs_dir(cfg)
    ensure_dir(cfg, "state_dir", cfg.state_dir if _file_in_the_way(jobs) else jobs, writer)


__all__ = [
    "DIR_MODE", "SYMLINK_HOPS_MAX", "WRITER_INSTALL", "check_local_dirs", "check_state_dir", "dir_error", "dir_problem",
    "drva_config_path", "ensure_dir", "ensure_state_dir", "jobs_dir", "local_dir_errors", "local_dirs", "who",
]
