"""What the three preflights share: a check's verdict (``Check``), running a list of
steps so that none raises (``_run_checks``), the report (``summarize``,
``format_checks``), and the small probes and helpers more than one preflight uses
(a directory writable, free bytes, the store opened and awaited within a bound).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.errors import CdpError, ConfigError
from cdp.msa.config import SiteConfig
from cdp.msa.install_dirs import check_state_dir
from cdp.store.base import ObjectStore

STATUSES = ("pass", "warn", "fail")
STORE_OP_TIMEOUT_S = 30.0

Progress = Callable[[str, int | None, int | None], None]


@dataclass(frozen=True)
class Check:
    """One check's verdict. ``details`` holds data for scripts (never a secret value)."""

    name: str
    status: str
    reason: str
    details: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: status {self.status!r} not in {STATUSES}")

    def line(self) -> str:
        return f"{self.status.upper()} {self.name}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "reason": self.reason}
        if self.details is not None:
            out["details"] = self.details
        return out


def summarize(kind: str, checks: list[Check], **extra: Any) -> dict[str, Any]:
    failures = sum(c.status == "fail" for c in checks)
    warnings = sum(c.status == "warn" for c in checks)
    return {"kind": kind, **extra, "checks": [c.to_dict() for c in checks], "ok": failures == 0,
            "warnings": warnings, "failures": failures}


def format_checks(summary: dict[str, Any]) -> str:
    """The human form: one line per check, then the verdict."""
    lines = [Check(c["name"], c["status"], c["reason"]).line() for c in summary["checks"]]
    verdict = "ok" if summary["ok"] else "NOT ok"
    lines.append(f"preflight {summary['kind']}: {verdict} — {len(summary['checks'])} checks, "
                 f"{summary['failures']} failed, {summary['warnings']} warnings")
    return "\n".join(lines)


def format_size(n: int) -> str:
    """Bytes for people, in binary units like the site file's ('256 MiB')."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def _no_progress(phase: str, done: int | None = None, total: int | None = None) -> None:
    return None


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _probe_writable(directory: Path) -> str | None:
    """None when a file can be created (and removed) in ``directory``, else why not.
    Creating one is the only honest test: access(2) says yes to root on any mode."""
    probe = directory / f".cdp-preflight-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror}"
    return None


async def _run_checks(steps: list[tuple[str, Callable[[], Any]]], progress: Progress) -> list[Check]:
    """Run each step (sync in a thread, or a coroutine function); a step returns one
    check or a list. A step that raises is a failed check, named after the step."""
    checks: list[Check] = []
    for i, (name, step) in enumerate(steps):
        progress(name, i, len(steps))
        try:
            got = await step() if inspect.iscoroutinefunction(step) else await asyncio.to_thread(step)
        except CdpError as exc:
            got = Check(name, "fail", exc.message)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            got = Check(name, "fail", f"{exc.strerror or exc}{where}")
        checks.extend(got if isinstance(got, list) else [got])
    progress("done", len(steps), len(steps))
    return checks


def _open_store(cfg: SiteConfig, env: Mapping[str, str], store: ObjectStore | None) -> tuple[Any, bool]:
    if store is not None:
        return store, False
    from cdp.store import open_store

    return open_store(cfg.store_url, env=env), True


async def _within(op: Awaitable[Any], timeout_s: float = STORE_OP_TIMEOUT_S) -> Any:
    """``await op``, TimeoutError after ``timeout_s``. ``asyncio.timeout`` rather than
    ``wait_for``, which on Python 3.11 can swallow a cancellation of the caller."""
    async with asyncio.timeout(timeout_s):
        return await op


def _state_dir_refused(cfg: SiteConfig) -> bool:
    try:
        check_state_dir(cfg)
    except ConfigError:
        return True
    return False


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))
