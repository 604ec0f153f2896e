"""``gather_bounded``: ``asyncio.gather`` with at most ``limit`` awaitables in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any


async def gather_bounded(aws: Iterable[Awaitable[Any]], limit: int) -> list:
    """Await ``aws`` with at most ``limit`` running at once; results in order. (Store
    requests: enough in flight to hide latency, not so many that a large listing
    opens thousands of connections at once.)"""
    assert limit >= 1, limit
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[Any]) -> Any:
        async with sem:
            return await aw

    return await asyncio.gather(*(one(a) for a in aws))
