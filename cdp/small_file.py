"""Reading a small record file that something else may have replaced.

The MSA's and the DRVA's state files (power, protection, job records, status and request
files) sit in directories they own, but a root daemon must not trust what it finds there:
a symbolic link planted in place of a record is not followed, a FIFO does not hang the
reader (``O_NONBLOCK``), a link to ``/dev/zero`` or a 2 GiB sparse file is not read whole.
One place does that for all of them; each caller turns ``NotRegularFile`` into its own
error and decides what a missing file means.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cdp.bounded_read import pread_upto
from cdp.errors import ConfigError
from cdp.file_kinds import NotRegular, open_regular

class NotRegularFile(Exception):
    """The name is not a regular file the caller may read; ``str()`` says what it is
    ("a symbolic link", "a FIFO", "unreadable (Permission denied)")."""


def read_small_file(path: Path | str, bytes_max: int) -> tuple[bytes, os.stat_result]:
    """At most ``bytes_max`` + 1 bytes of the regular file ``path`` and its ``fstat`` (a
    caller tells "more than its bound" by the length), never through a link.
    ``FileNotFoundError`` when there is none; ``NotRegularFile`` for anything else."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except NotRegular as exc:
        raise NotRegularFile(exc.kind) from None
    except OSError as exc:
        raise NotRegularFile(f"unreadable ({exc.strerror})") from None
    try:
        return pread_upto(fd, bytes_max + 1), os.fstat(fd)
    finally:
        os.close(fd)


def read_json_file(path: Path, bytes_max: int, what: str) -> Any | None:
    """The JSON document in the regular file ``path`` of at most ``bytes_max`` bytes (None:
    there is none); ``ConfigError`` naming the file and saying what it is otherwise."""
    try:
        raw, st = read_small_file(path, bytes_max)
    except FileNotFoundError:
        return None
    except NotRegularFile as exc:
        raise ConfigError(f"{path}: {exc}, not {what}") from None
    if len(raw) > bytes_max:
        raise ConfigError(f"{path}: {st.st_size} bytes, more than {what} can be ({bytes_max})")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{path}: unreadable as {what}: {type(exc).__name__}: {exc}") from None
