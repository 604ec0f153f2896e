"""``gather_bounded``: ``asyncio.gather`` with at most ``limit`` awaitables in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any


async def gather_bounded(aws: Iterable[Awaitable[Any]], limit: int) -> list:
    """Await ``aws`` with at most ``limit`` running at once; results in order. (Store
    requests: enough in flight to hide latency, not so many that a large listing
    opens thousands of connections at once.)

    The first failure (or a cancellation of the caller) cancels the rest and waits for
    them before it is raised, as itself: no request of a failed batch goes on behind the
    caller's back, and a coroutine that never got its turn is closed, not left to warn
    that it was never awaited."""
    assert limit >= 1, limit
    sem = asyncio.Semaphore(limit)
    aws = list(aws)

    async def one(aw: Awaitable[Any]) -> Any:
        async with sem:
            return await aw

    tasks = [asyncio.ensure_future(one(a)) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        # A task cancelled before its first step never runs ``one``'s body (a caller
        # cancelled as soon as it started, say), so its coroutine is closed here: a no-op
        # for one that ran.
        for aw in aws:
            if asyncio.iscoroutine(aw):
                aw.close()
