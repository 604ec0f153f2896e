"""What kind of file a mode is, in the words an error message uses ("a FIFO", "a
symbolic link"): for the places that refuse anything but a regular file or a directory
(the file store's confinement, cdp mount's lock file), and an opener of regular files
only (``open_regular``)."""

from __future__ import annotations

import errno
import os
import stat

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISREG, "a regular file"),
)


def file_kind(mode: int) -> str:
    """``mode``'s file type as a noun phrase ("a FIFO"), for a message."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return f"a file of type {stat.S_IFMT(mode):o}"


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """``os.open(path, flags)`` that never follows a symbolic link at ``path`` nor waits
    for a FIFO's writer, and returns only a regular file's descriptor: a disk image a
    daemon writes as root must be the file it was told, not what a link planted at its
    name points at. ``NotRegular`` (an ``OSError``) says what is there instead."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular(errno.ELOOP, "a symbolic link, never followed: expected a regular file",
                             str(path)) from None
        raise
    st_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, f"{file_kind(st_mode)}: expected a regular file", str(path))
    os.set_blocking(fd, True)
    return fd


class NotRegular(OSError):
    """What ``open_regular`` found is not a regular file (``strerror`` says what it is)."""
