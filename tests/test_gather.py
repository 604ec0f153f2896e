"""``cdp.gather.gather_bounded``: order, the bound, and what a failure leaves behind."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

from cdp.gather import gather_bounded


async def test_results_keep_their_order_and_at_most_limit_run_at_once() -> None:
    running = peak = 0

    async def job(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (i % 3))
        running -= 1
        return i * i

    assert await gather_bounded((job(i) for i in range(40)), 4) == [i * i for i in range(40)]
    assert peak == 4


async def test_the_first_failure_is_raised_as_itself_and_stops_the_rest() -> None:
    finished = []

    async def job(i: int) -> int:
        if i == 3:
            raise KeyError("three")
        await asyncio.sleep(0.05)
        finished.append(i)
        return i

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyError, match="three"):
            await gather_bounded([job(i) for i in range(20)], 4)
        await asyncio.sleep(0.1)  # a job left running would finish meanwhile
        gc.collect()
    assert finished == []  # the three running beside it were cancelled, the rest never started
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]


async def test_a_cancelled_caller_cancels_every_job() -> None:
    started = []

    async def job(i: int) -> None:
        started.append(i)
        await asyncio.sleep(10)

    caller = asyncio.create_task(gather_bounded((job(i) for i in range(10)), 2))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert started == [0, 1]
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_a_caller_cancelled_before_any_job_ran_leaves_no_coroutine_unawaited() -> None:
    """The caller cancelled before the loop ran any job (an HTTP handler dropped at once,
    say): every task is cancelled before its first step, and its coroutine must still be
    closed (the suite once warned "coroutine 'FileStore.get' was never awaited")."""
    ran = []

    async def job(i: int) -> None:
        ran.append(i)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        caller = asyncio.create_task(gather_bounded([job(i) for i in range(8)], 2))
        await asyncio.sleep(0)  # the caller starts and creates its tasks; none of them has run
        caller.cancel()
        cancelled = False
        try:
            await caller
        except asyncio.CancelledError:
            cancelled = True
        del caller  # it (and pytest.raises' record) would hold the jobs' coroutines until then
        for _ in range(3):  # the cancelled tasks take their last step, and drop their coroutines
            await asyncio.sleep(0)
        gc.collect()
    assert cancelled
    assert ran == []
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
