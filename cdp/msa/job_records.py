"""The small JSON records a job keeps per domain in the MSA's state directory
(``failovers/<domain>.json``, ``failbacks/<domain>.json``, ``handovers/<domain>.json``:
FORMAT.md §13.10, §13.12, §13.14), so that a rerun resumes where a crashed or failed job
stopped. A record is read as a regular file of at most its bound, never through a link."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cdp import durable
from cdp.durable import atomic_write
from cdp.errors import ConfigError
from cdp.small_file import NotRegularFile, read_small_file


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
    none), never through a link nor waiting for a FIFO's writer (``read_small_file``): a
    link to /dev/zero or a 2 GiB sparse file planted there was read whole, a FIFO hung
    the job."""
    try:
        return read_small_file(path, bytes_max)[0]
    except FileNotFoundError:
        return None
    except NotRegularFile as exc:
        raise ConfigError(f"{path}: {exc}, not a {what} record; move it away to run the {what} again") from None


def write_domain_record(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace the record at ``path`` atomically (whole old or whole new after a crash).
    Its directory (``failovers/``…) is created if need be, and the state directory
    fsynced each time: a new directory's entry is durable only then, and a run killed
    between the mkdir and that fsync leaves a directory the next write must sync too.
    Without it a power loss took the directory, and the record in it, away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.fsync_dir(path.parent.parent)
    atomic_write(path, json.dumps(doc, sort_keys=True, indent=1).encode())
