"""Names below a root directory, reached without following any symbolic link.

The file store's confinement (``cdp.store.fs``): the daemons run as root, so a link
planted in the store must not let them read, write or remove anything outside it. Every
name is opened relative to a directory fd of the root with ``openat2`` and
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``, or, where seccomp or
the kernel refuses ``openat2``, one ``O_NOFOLLOW`` component at a time. Only directories
and regular files pass; a name through or naming a link, a FIFO, a socket or a device is
``Unconfined``, an ``OSError`` that says which name it is.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat as stat_mode
import threading
from pathlib import Path
from typing import NamedTuple

from cdp import durable
from cdp.file_kinds import file_kind
from cdp.libc import libc_function
from cdp.store.keys import show_key


class Dir(NamedTuple):
    """A directory of the store, open. ``fd`` is what every operation in it goes through.
    The store never opens ``path``: it only says which directory this is (``os.fspath``)."""

    fd: int
    path: str

    def __fspath__(self) -> str:
        return self.path


class RootDir:
    """The root's directory fd, opened on first use and shared by the store's threads.

    Invariant: an fd is closed only while no thread holds it (``hold`` .. ``let_go``): a
    thread resolving a key against a closed fd number could resolve it against whatever
    directory the number was given to next. ``close`` and a root found replaced retire
    the fd; the last ``let_go`` closes it. The root's path is looked up again only to
    open it, and after an ENOENT (``forget_if_replaced``): never on the read path.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._users = 0
        self._retired: list[int] = []

    def hold(self, create: bool) -> Dir:
        with self._lock:
            if self._fd is None:
                if create:
                    make_root(self.path)
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._users += 1
            return Dir(self._fd, str(self.path))

    def let_go(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._close_retired()

    def forget_if_replaced(self) -> bool:
        """After an ENOENT: if the root's path no longer names the directory held (it was
        removed, or another one put in its place), retire the fd so that the next ``hold``
        opens the path again. True if the caller should retry."""
        with self._lock:
            if self._fd is None:
                return True  # another thread retired it already
            held = os.fstat(self._fd)
            try:
                now = os.stat(self.path)
            except OSError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return False
            self._retired.append(self._fd)
            self._fd = None
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._retired.append(self._fd)
                self._fd = None
            if self._users == 0:
                self._close_retired()

    def _close_retired(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def __del__(self) -> None:  # a store dropped without close(): no thread can hold it
        if self._fd is not None:
            self._retired.append(self._fd)
            self._fd = None
        self._close_retired()


class Unconfined(OSError):
    """A symbolic link or a special file below the root, where an object or a directory
    was expected (args[0]: which, and what it is)."""

    def __init__(self, rel: str, mode: int, expected: str) -> None:
        super().__init__(f"{show_key(rel)} is {file_kind(mode)}, where {expected} was expected")


OBJECT = "an object (a regular file)"
DIRECTORY = "a directory"


#: openat2(2): 437 on x86_64 and aarch64 (the unified syscall table); elsewhere keys are
#: opened one component at a time (_open_walking).
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())
_RESOLVE_NO_MAGICLINKS = 0x02  # <linux/openat2.h>
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
#: What an open fails with when a name is a symbolic link or a special file (or, from
#: openat2, would resolve outside the root): the walk then says which name it is.
_REFUSED_ERRNOS = frozenset((errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.ENODEV, errno.EXDEV))


class _OpenHow(ctypes.Structure):
    """struct open_how (<linux/openat2.h>)."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


assert ctypes.sizeof(_OpenHow) == 24, "struct open_how is 24 bytes (OPEN_HOW_SIZE_VER0)"

_syscall = libc_function(["syscall"], [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                        ctypes.c_size_t], ctypes.c_long)
#: None until the first open tells whether openat2 works in this process (seccomp
#: filters, as some container runtimes have, answer ENOSYS or EPERM to it).
_openat2_works: bool | None = None
#: One open_how per (flags, mode), made once: the read path opens with the same one.
_hows: dict[tuple[int, int], _OpenHow] = {}


def _openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    """The fd, or minus the errno (EINTR retried, as ``os.open`` does)."""
    how = _hows.get((flags, mode))
    if how is None:
        how = _hows.setdefault((flags, mode), _OpenHow(flags, mode, _RESOLVE))
    while True:
        fd = _syscall(_SYS_OPENAT2, dir_fd, rel.encode(), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return -err


def _probe_openat2(root_fd: int) -> bool:
    if _syscall is None or _SYS_OPENAT2 is None:
        return False
    fd = _openat2(root_fd, ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0)
    if fd < 0:
        return False  # ENOSYS (old kernel, seccomp), EPERM (seccomp): walk instead
    os.close(fd)
    return True


def open_beneath(root: Dir, rel: str, flags: int, expected: str, mode: int = 0) -> int:
    """Open ``rel`` (a key, its directory part, or ".") below the root, following no
    symbolic link; ``Unconfined`` if it goes through or names a link or special file."""
    global _openat2_works
    if _openat2_works is None:
        _openat2_works = _probe_openat2(root.fd)
    if _openat2_works:
        fd = _openat2(root.fd, rel, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        if fd >= 0:
            return fd
        if -fd not in _REFUSED_ERRNOS:
            raise OSError(-fd, os.strerror(-fd), rel)
        # openat2 does not say which name it refused: the walk does (or, if the link
        # is gone by now, opens the key as safely).
    return _open_walking(root.fd, rel, flags, expected, mode)


def _open_walking(root_fd: int, rel: str, flags: int, expected: str, mode: int = 0) -> int:
    """``open_beneath`` without openat2: each directory opened ``O_NOFOLLOW`` relative to the
    one before it."""
    *parents, name = rel.split("/")
    fd = root_fd
    try:
        for i, part in enumerate(parents):
            child = open_child(fd, part, os.O_PATH | os.O_DIRECTORY, "/".join(parents[: i + 1]), DIRECTORY)
            if fd != root_fd:
                os.close(fd)
            fd = child
        return open_child(fd, name, flags, rel, expected, mode)
    finally:
        if fd != root_fd:
            os.close(fd)


def open_child(dir_fd: int, name: str, flags: int, rel: str, expected: str, mode: int = 0) -> int:
    """Open the entry ``name`` of an open directory, not following it if it is a link."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        refused = special_entry(dir_fd, name, rel, expected) if exc.errno in _REFUSED_ERRNOS else None
        if refused is not None:
            raise refused from None
        raise


def special_entry(dir_fd: int, name: str, rel: str, expected: str) -> Unconfined | None:
    """The error to raise if the entry ``name`` is a symbolic link or a special file. A
    directory or a regular file passes: where the other was expected, the caller's own
    error (ENOTDIR, EISDIR) says so."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat_mode.S_ISDIR(st.st_mode) or stat_mode.S_ISREG(st.st_mode):
        return None
    return Unconfined(rel, st.st_mode, expected)


def open_object(root: Dir, key: str, flags: int) -> tuple[int, os.stat_result]:
    """(fd, status) of the regular file under ``key``; IsADirectoryError if it is a
    directory (no such object), ``Unconfined`` if it is anything else."""
    fd = open_beneath(root, key, flags, OBJECT)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if stat_mode.S_ISREG(st.st_mode):
        return fd, st
    os.close(fd)
    if stat_mode.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "not a regular file", key)
    raise Unconfined(key, st.st_mode, OBJECT)


#: (parent directory's path, name) -> (st_dev, st_ino) of a directory this process has
#: seen durably linked into its parent (made and synced, or synced when first found).
_linked: dict[tuple[str, str], tuple[int, int]] = {}
_linked_lock = threading.Lock()


def open_dir(root: Dir, rel: str, *, create: bool) -> Dir:
    """Open the directory ``rel`` below the root ("": the root), or, with ``create``,
    make it and its missing parents (``make_dirs``). The caller closes it. With
    ``create`` (a put), the directory is also durably linked into its parent, and each of
    its parents into theirs, before it is returned: finding it is not enough."""
    try:
        fd = open_beneath(root, rel or ".", os.O_RDONLY | os.O_DIRECTORY, DIRECTORY)
    except FileNotFoundError:
        if not create:
            raise
    else:
        found = Dir(fd, f"{root.path}/{rel}" if rel else root.path)
        if not create or not rel or _known_linked(root.path, rel, fd):
            return found
        os.close(fd)  # found, but maybe not durable yet: walked below, syncing as needed
    return make_dirs(root, rel)


def _known_linked(root_path: str, rel: str, fd: int) -> bool:
    parent, _, name = f"{root_path}/{rel}".rpartition("/")
    st = os.fstat(fd)
    with _linked_lock:
        return _linked.get((parent, name)) == (st.st_dev, st.st_ino)


def _note_linked(parent: Dir, name: str, fd: int, synced: bool) -> None:
    """Record that directory ``name`` (open as ``fd``) is durably linked into ``parent``,
    first syncing ``parent`` unless ``synced`` or already recorded for that very
    directory. A directory found there is not durable for being there: a concurrent
    put may have made it and not synced it yet, or a writer killed before its sync (a
    power cut then takes it, and every object put into it, away)."""
    st = os.fstat(fd)
    key, ident = (parent.path, name), (st.st_dev, st.st_ino)
    with _linked_lock:
        if not synced and _linked.get(key) == ident:
            return
    if not synced:
        fsync_dir(parent)
    with _linked_lock:
        _linked[key] = ident


def make_dirs(root: Dir, rel: str) -> Dir:
    """Open the directories of ``rel`` one by one, each relative to its parent's fd and
    ``O_NOFOLLOW``, creating the missing ones; each is durably linked into its parent
    (``_note_linked``: synced when made, or when found and not known durable); return the
    last one, open."""
    parent = root
    done: list[str] = []
    try:
        for part in rel.split("/"):
            done.append(part)
            flags = os.O_RDONLY | os.O_DIRECTORY
            try:
                fd = open_child(parent.fd, part, flags, "/".join(done), DIRECTORY)
                made = False
            except FileNotFoundError:
                try:
                    os.mkdir(part, dir_fd=parent.fd)
                except FileExistsError:
                    pass  # made by a concurrent writer: synced all the same, as ours would be
                fsync_dir(parent)  # the new directory is durable in its parent
                fd = open_child(parent.fd, part, flags, "/".join(done), DIRECTORY)
                made = True
            _note_linked(parent, part, fd, synced=made)
            if parent is not root:
                os.close(parent.fd)
            parent = Dir(fd, f"{parent.path}/{part}")
    except BaseException:
        if parent is not root:
            os.close(parent.fd)
        raise
    return parent


def make_root(directory: Path) -> None:
    """Create the root and its missing parents, each fsynced into its parent. The root's
    path is configuration, resolved as given (a symbolic link in it is the admin's)."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            os.mkdir(new)
        except FileExistsError:
            if not new.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(new)) from None
        durable.fsync_dir(new.parent)


def fsync_dir(directory: Dir) -> None:
    """Make the entries of an open store directory (creations, renames) durable."""
    durable.sync_dir(directory.fd)
