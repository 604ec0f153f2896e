"""The clean-up of test-failover areas that earlier versions left in the old layout.

A test failover's disks live in ``<datastore>/+test/<domain>/``
(``cdp.msa.failover.isolated_area``): no domain's folder (``<datastore>/<domain>/``, a
name of ``[A-Za-z0-9._-]``) can be there, so ``cdp failover-cleanup`` deletes that folder
whole. Earlier versions used ``<datastore>/test-<domain>/`` (``old_isolated_area``),
which is also the folder of a domain named ``test-<domain>`` — a real failover's disks, a
standby's — and the clean-up deleted it whole, the disks of a VM running there with it.

So from an area of the old layout ``cdp.msa.failover.cleanup_test_failover`` takes only
the files the test's recovery provably wrote (``clean_old_area``): the images its
registration names (``registered_images``: a test failover that came up), else, for a run
killed before registering, those a recovery state of the test's domain id names, with
that state and its temporary files. Each goes only if it is a regular file, with its
``.partial``, under the folder's recovery lock (taken and given up as ``rocva.recover``
does: no recovery runs there meanwhile); the folder itself only once empty, and never if
it is a domain's of the site or of a ``[[standby]]``. What else is there is kept and said
(FORMAT.md §13.10).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdp import durable


def old_isolated_area(datastore: Path, name: str) -> Path:
    """Where versions before ``cdp.msa.failover.ISOLATED_DIR`` put a test failover of domain
    ``name``: also domain ``test-<name>``'s folder."""
    return datastore / f"test-{name}"


def registered_images(reg: Mapping[str, Any], name: str) -> list[str]:
    """The image paths (relative to the datastore) of registered domain ``name``'s VMs:
    what an old-layout area may hold of a test failover that came up."""
    domain = next(d for d in reg["domains"] if d.get("name") == name)
    vms = set(domain.get("vms") or [])
    return [str(disk["image"]) for vm in reg["vms"] if vm.get("name") in vms
            for disk in vm.get("disks") or [] if isinstance(disk, dict) and "image" in disk]


def clean_old_area(cfg: Any, folder: Path, images: list[str] | None, domain_id: Any) -> tuple[list[str], str | None]:
    """What a test failover of an earlier version left in ``<datastore>/test-<name>/``,
    which is also the folder of a domain named ``test-<name>`` (a real failover's disks,
    a standby's): only what its recovery provably wrote goes (``_old_test_files``), each
    a regular file, under the folder's recovery lock (no recovery runs there meanwhile);
    then the folder, once empty, unless it is a domain's of the site. Returns the paths
    removed and why something of the test's area was kept (None: nothing was)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return [], None  # no area of ours: never followed, never removed
    except FileNotFoundError:
        return [], None
    removed: list[str] = []
    if _old_test_files(folder, images, domain_id):
        try:
            removed = _remove_old_test_files(folder, images, domain_id)
        except OSError as exc:
            return [], _lock_problem(exc)
    domains = {d.name for d in cfg.cluster.domains} | {sb.domain for sb in getattr(cfg, "standby", ())}
    if folder.name in domains:
        return removed, None  # its domain's disks stay; the test's, if any, are gone
    try:
        os.rmdir(folder)  # only once empty: an empty one is a killed test's, or nothing's
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not removed:
            return [], None  # nothing of the test was there: another folder, left as it is
        left = sorted(os.listdir(folder))
        return removed, (f"holds {len(left)} entries no test recovery of this domain provably wrote "
                         f"({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}): an earlier version's test "
                         f"failover may have shared it with domain {folder.name}'s disks; remove them by hand if "
                         f"they are not that domain's")
    durable.fsync_dir(folder.parent)
    return removed + [str(folder)], None


def _remove_old_test_files(folder: Path, images: list[str] | None, domain_id: Any) -> list[str]:
    """Unlink ``_old_test_files`` (regular files only) under the folder's recovery lock,
    durably; the paths removed. ``OSError`` when the lock cannot be taken."""
    from rocva.recover import LOCK_NAME

    lock = _hold_recovery_lock(folder / LOCK_NAME)
    try:
        removed = [str(folder / f) for f in _old_test_files(folder, images, domain_id) if _unlink_regular(folder / f)]
        if removed:
            durable.fsync_dir(folder)
        return removed
    finally:
        _release_recovery_lock(folder / LOCK_NAME, lock)


def _lock_problem(exc: OSError) -> str:
    from rocva.recover import LOCK_NAME

    if isinstance(exc, BlockingIOError) or exc.errno == errno.EBUSY:
        return f"a recovery is running there ({LOCK_NAME} is locked): run the clean-up again once it ended"
    return f"its recovery lock {LOCK_NAME} cannot be taken: {exc.strerror or exc}"


def _old_test_files(folder: Path, images: list[str] | None, domain_id: Any) -> list[str]:
    """The names in ``folder`` (an earlier version's test area) that the test's recovery
    provably wrote: the images its registration names (``images``: a test failover that
    came up), else those its recovery state names when that state is of the test's
    domain ``domain_id`` (a run killed before registering; a real failover of domain
    ``test-<name>`` has another id), with the state and its temporary files; each with
    its ``.partial``."""
    from rocva.resume import PARTIAL_SUFFIX, STATE_NAME

    if images is not None:
        names, recovery_files = [Path(i).name for i in images if Path(i).parent == Path(folder.name)], []
    else:
        names = _test_recovery_images(folder, domain_id)
        recovery_files = ([STATE_NAME] + [n for n in os.listdir(folder) if n.startswith(f".tmp-{STATE_NAME}-")]
                          if names else [])
    return [n + suffix for n in names for suffix in ("", PARTIAL_SUFFIX)] + recovery_files


def _hold_recovery_lock(path: Path) -> int:
    """Take a recovery directory's lock as a recovery does (``rocva.recover._lock``): the
    file, created if missing (never through a link), ``flock``ed without waiting, and
    still under its name. ``OSError`` when it cannot be (``BlockingIOError``: held)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st, named = os.fstat(fd), os.lstat(path)
        if (st.st_dev, st.st_ino) != (named.st_dev, named.st_ino):
            raise OSError(errno.EBUSY, "another recovery has just taken it", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release_recovery_lock(path: Path, fd: int) -> None:
    """Give the lock up as a recovery does (``rocva.recover._unlock``): its name removed
    while held, unless it now names another file."""
    try:
        st = os.fstat(fd)
        named = os.lstat(path)
        if (st.st_dev, st.st_ino) == (named.st_dev, named.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _test_recovery_images(folder: Path, domain_id: Any) -> list[str]:
    """The images the recovery state in ``folder`` names when the state is of domain
    ``domain_id`` (the test's: a real failover of domain ``test-<name>`` has another
    id); none otherwise — nothing there is provably the test's."""
    from cdp.small_file import NotRegularFile, read_small_file
    from rocva.resume import STATE_BYTES_MAX, STATE_NAME, parse_state

    if not isinstance(domain_id, int) or isinstance(domain_id, bool):
        return []
    try:
        raw = read_small_file(folder / STATE_NAME, STATE_BYTES_MAX)[0]
        doc = json.loads(raw)
        saved = parse_state(doc)
    except (OSError, NotRegularFile, ValueError, RecursionError):
        return []
    if saved.version == 1 or doc.get("domain") != domain_id:  # a version-1 state names no domain
        return []
    return list(saved.images)


def _unlink_regular(path: Path) -> bool:
    """Unlink ``path`` if it is a regular file (a link or anything else is left alone);
    True when it was."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
