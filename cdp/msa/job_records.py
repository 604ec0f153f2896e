"""The small JSON records a job keeps per domain in the MSA's state directory
(``failovers/<domain>.json``, ``failbacks/<domain>.json``, ``handovers/<domain>.json``:
FORMAT.md §13.10, §13.12, §13.14), so that a rerun resumes where a crashed or failed job
stopped. A record is read as a regular file of at most its bound, never through a link."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cdp.bounded_read import pread_upto
from cdp.durable import atomic_write
from cdp.errors import ConfigError
from cdp.file_kinds import file_kind


def read_domain_record(path: Path, domain: str, *, version: int, bytes_max: int, what: str,
                       valid: Callable[[dict[str, Any]], bool] = lambda doc: True) -> dict[str, Any] | None:
    """The record at ``path`` (None: there is none). ``ConfigError`` naming the file when
    it is not a version-``version`` ``what`` record of ``domain`` that ``valid`` accepts,
    or not a regular file (``_read_bounded``)."""
    raw = _read_bounded(path, bytes_max, what)
    if raw is None:
        return None
    try:
        doc = json.loads(raw) if len(raw) <= bytes_max else None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        doc = None
    if not isinstance(doc, dict) or doc.get("version") != version or doc.get("domain") != domain or not valid(doc):
        raise ConfigError(f"{path}: not a {what} record of domain {domain} (version {version}); "
                          f"move it away to run the {what} again")
    return doc


def _read_bounded(path: Path, bytes_max: int, what: str) -> bytes | None:
    """At most ``bytes_max`` + 1 bytes of the regular file at ``path`` (None: there is
    none), opened without following a symbolic link or waiting for a FIFO's writer: a
    link to /dev/zero or a 2 GiB sparse file planted there was read whole, a FIFO hung
    the job."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symbolic link (ENXIO: a socket)
        kind = "a symbolic link" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
        raise ConfigError(f"{path}: {kind}, not a {what} record; move it away to run the {what} again") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: {file_kind(st.st_mode)}, not a {what} record; move it away to run the "
                              f"{what} again")
        return pread_upto(fd, bytes_max + 1)
    finally:
        os.close(fd)


def write_domain_record(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace the record at ``path`` atomically (whole old or whole new after a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, sort_keys=True, indent=1).encode())
