"""The small JSON records a job keeps per domain in the MSA's state directory
(``failovers/<domain>.json``, ``failbacks/<domain>.json``: FORMAT.md §13.10, §13.12), so
that a rerun resumes where a crashed or failed job stopped."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cdp.durable import atomic_write
from cdp.errors import ConfigError


def read_domain_record(path: Path, domain: str, *, version: int, bytes_max: int, what: str,
                       valid: Callable[[dict[str, Any]], bool] = lambda doc: True) -> dict[str, Any] | None:
    """The record at ``path`` (None: there is none). ``ConfigError`` naming the file when
    it is not a version-``version`` ``what`` record of ``domain`` that ``valid`` accepts."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw) if len(raw) <= bytes_max else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("version") != version or doc.get("domain") != domain or not valid(doc):
        raise ConfigError(f"{path}: not a {what} record of domain {domain} (version {version}); "
                          f"move it away to run the {what} again")
    return doc


def write_domain_record(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace the record at ``path`` atomically (whole old or whole new after a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, sort_keys=True, indent=1).encode())
