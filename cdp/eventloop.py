"""The event loop every long-running process of ours runs on: uvloop where it is
installed, asyncio's own otherwise (or when ``CDP_NO_UVLOOP`` is set, to compare).

uvloop does a socket's reads, writes and polling in C: the NBD face of the filter spent
a quarter of its CPU in asyncio's Python transport writing replies and frames."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_wanted() -> bool:
    if os.environ.get("CDP_NO_UVLOOP"):
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:  # uvloop is optional on platforms that lack it
        return False
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop when it is wanted and installed."""
    if uvloop_wanted():
        import uvloop
        return uvloop.run(main)
    return asyncio.run(main)
