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


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o600, *, links_max: int | None = None) -> int:
    """``os.open(path, flags)`` that never follows a symbolic link at ``path`` nor waits
    for a FIFO's writer, and returns only a regular file's descriptor (with at most
    ``links_max`` hard links, if given): a disk image a daemon writes as root must be the
    file it was told, not what a link planted at its name points at. ``NotRegular`` (an
    ``OSError``) says what is there instead; other OSErrors (``FileNotFoundError``,
    ``EACCES``) pass through."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular(errno.ELOOP, "a symbolic link", path) from None
        if exc.errno == errno.ENXIO:  # a socket (or a FIFO opened for writing without a reader)
            raise NotRegular(errno.ENXIO, "a FIFO or a socket", path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, file_kind(st.st_mode), path)
        if links_max is not None and st.st_nlink > links_max:
            raise NotRegular(errno.EMLINK, f"a file with {st.st_nlink} links", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class NotRegular(OSError):
    """What ``open_regular`` found is not a regular file (of few enough links): ``kind``
    says what it is ("a symbolic link", "a FIFO", "a file with 2 links"), ``str()`` adds
    that a regular file was expected."""

    def __init__(self, code: int, kind: str, path: str | os.PathLike[str]) -> None:
        super().__init__(code, f"{kind}: expected a regular file", os.fspath(path))
        self.kind = kind
