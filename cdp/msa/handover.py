"""``handovers/<domain>.json`` (FORMAT.md §13.14): what this site's last quiesce of a
domain handed over — the final mark and its seq — kept until the domain is protected
here again.

A quiesce (``MsaDaemon.quiesce``: for a planned failover at the protected site, for a
failback at the site the domain had failed over to) pauses the VMs, commits a final
mark, powers them off and stops protecting the domain. If the site that asked dies
before it records the answer, its rerun asks again; without this record the domain is
no longer protected here and the second quiesce could only be refused ("nothing to hand
over"), leaving the failover or failback unable to resume. With it, the same answer is
given again: the VMs have stayed off and unprotected since, so the mark is still the
domain's final point here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cdp.msa.job_records import read_domain_record, write_domain_record

VERSION = 1
RECORD_BYTES_MAX = 64 << 10


def handover_path(state_dir: Path, domain: str) -> Path:
    return state_dir / "handovers" / f"{domain}.json"


def _valid(doc: dict[str, Any]) -> bool:
    return (isinstance(doc.get("mark"), str) and isinstance(doc.get("seq"), int) and not isinstance(doc["seq"], bool)
            and doc["seq"] >= 0)


def read_handover(state_dir: Path, domain: str) -> dict[str, Any] | None:
    """The last handover of ``domain`` (None: none since it was last protected here);
    ``ConfigError`` naming the file when it is not a valid record."""
    return read_domain_record(handover_path(state_dir, domain), domain, version=VERSION,
                              bytes_max=RECORD_BYTES_MAX, what="handover", valid=_valid)


def write_handover(state_dir: Path, domain: str, mark: str, seq: int) -> None:
    write_domain_record(handover_path(state_dir, domain),
                        {"version": VERSION, "domain": domain, "mark": mark, "seq": int(seq), "ns": time.time_ns()})


def forget_handover(state_dir: Path, domain: str) -> None:
    """The domain is protected here again: a quiesce from now on hands over a new point."""
    handover_path(state_dir, domain).unlink(missing_ok=True)
