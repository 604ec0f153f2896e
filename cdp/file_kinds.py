"""What kind of file a mode is, in the words an error message uses ("a FIFO", "a
symbolic link"): for the places that refuse anything but a regular file or a directory
(the file store's confinement, cdp mount's lock file)."""

from __future__ import annotations

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
