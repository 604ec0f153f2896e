"""Waiting in tests: until a condition holds, within a deadline, saying what was awaited.

A test never sleeps a fixed time for something to happen: it waits for the condition
itself. The deadline only bounds a hang, and it costs nothing when the condition comes
early, so it is sized for a slow machine (``pytest --cov`` is about 1.5x slower, CI
shares its cores), not for the speed seen on an idle laptop. A deadline that a slow
machine can miss is a flaky test; a condition that never comes is a bug, and the
message names it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

# The deadline for "should happen soon" (a connect, an ack, a commit, a status update):
# each takes well under a second on an idle machine; this bounds a hang, nothing else.
EVENTUALLY_S = 60.0
# How often a condition is re-checked: cheap checks, short enough not to slow a test.
POLL_S = 0.05


def _timed_out(timeout_s: float, what: str, last: Any = None) -> AssertionError:
    seen = "" if last is None else f" (last seen: {last!r})"
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{seen}")


async def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
                     step_s: float = POLL_S) -> None:
    """Return once ``predicate()`` is true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise _timed_out(timeout_s, what)
        await asyncio.sleep(step_s)


async def wait_until_async(probe: Callable[[], Awaitable[Any]], timeout_s: float, what: str,
                           step_s: float = POLL_S) -> Any:
    """Return the first true value of ``await probe()``; fail naming ``what`` (and the
    last value seen) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := await probe()):
        if time.monotonic() > deadline:
            raise _timed_out(timeout_s, what, value)
        await asyncio.sleep(step_s)
    return value


def wait_until_sync(predicate: Callable[[], Any], timeout_s: float, what: str,
                    step_s: float = POLL_S) -> Any:
    """``wait_until`` for code outside an event loop (subprocesses, threads); returns
    the first true value of ``predicate()``."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise _timed_out(timeout_s, what, value)
        time.sleep(step_s)
    return value
