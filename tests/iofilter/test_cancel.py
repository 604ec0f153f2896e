"""Every stop of a filter ends (issue 9): a cancellation that lands in the very loop
iteration in which the awaited event fires must not be lost.

On Python 3.11, ``asyncio.wait_for(inner, timeout)`` returns the inner result when the
inner future completes in the iteration that delivers the outer cancellation: the
cancellation is gone. ``FilterClient._send`` then loops on for ever, and whoever cancelled
the client waits for ever (CI hung in ``test_rerun``, ``benchmarks.ingest`` after its
last phase). The race is driven deterministically here, in loop iterations rather than
seconds: fire the event the task waits on, let exactly ``n`` iterations pass, cancel;
then the task must end *cancelled* within ``END_ITERATIONS_MAX`` iterations. Sweeping
``n`` over ``0 .. ITERATIONS_SWEPT`` covers the window of every implementation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from cdp import wire
from iofilter_sim.client import FilterClient
from iofilter_sim.cluster import parse_cluster
from iofilter_sim.filter import DomainFilter
from iofilter_sim.runner import ClusterRunner

ITERATIONS_SWEPT = 8
# A cancelled task that lets its cancellation through ends in a few iterations (the
# awaited future is cancelled, then the task); a lost one never ends.
END_ITERATIONS_MAX = 50
# Iterations for a new task to reach the wait it parks on.
SETTLE_ITERATIONS = 10


async def _iterations(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _stopped_cancelled(start: Callable[[], Coroutine[Any, Any, Any]], fire: Callable[[], None],
                             n: int) -> str | None:
    """Start a task, fire its event, cancel it ``n`` iterations later: None if it then
    ended cancelled (or had ended before the cancel), else what it did instead."""
    task = asyncio.create_task(start())
    await _iterations(SETTLE_ITERATIONS)
    assert not task.done(), f"the task ended before it was cancelled: {task}"
    fire()
    await _iterations(n)
    if not task.cancel():
        return None  # it finished before the cancellation: nothing to lose
    for _ in range(END_ITERATIONS_MAX):
        if task.done():
            break
        await asyncio.sleep(0)
    if task.done():
        if task.cancelled():
            return None
        return f"returned {task.result()!r} instead of ending cancelled"
    while not task.done():  # clean up: a second cancel is not lost unless unlucky again
        task.cancel()
        await _iterations(SETTLE_ITERATIONS)
    return f"still running {END_ITERATIONS_MAX} loop iterations after cancel()"


def _lost(results: dict[int, str | None]) -> dict[int, str]:
    return {n: why for n, why in results.items() if why is not None}


class _NullWriter:
    """A connection that takes everything at once."""

    def writelines(self, parts: Any) -> None:
        pass

    async def drain(self) -> None:
        pass


async def test_a_cancelled_sender_ends_even_as_it_is_woken() -> None:
    # The sender parks on its wake event; an ACK, a capture or a mark sets it (here via
    # the filter's on_change hook, which the client owns).
    results = {}
    for n in range(ITERATIONS_SWEPT):
        f = DomainFilter(1, [])
        client = FilterClient([f], "127.0.0.1", 9, b"s" * 16, "host-1")
        results[n] = await _stopped_cancelled(lambda: client._send(_NullWriter()), f.on_change, n)
    assert _lost(results) == {}, f"cancellation lost (key: iterations between wake and cancel): {_lost(results)}"


async def test_a_cancelled_handshake_ends_even_as_the_reply_arrives() -> None:
    reply = b"".join(wire.control(wire.CHALLENGE, {"drva": "drva-1", "nonce": "00" * wire.NONCE_BYTES}))
    results = {}
    for n in range(ITERATIONS_SWEPT):
        client = FilterClient([DomainFilter(1, [])], "127.0.0.1", 9, b"s" * 16, "host-1")
        reader = asyncio.StreamReader()
        results[n] = await _stopped_cancelled(lambda: client._expect(reader, wire.CHALLENGE, "t"),
                                              lambda: reader.feed_data(reply), n)
    assert _lost(results) == {}, f"cancellation lost (key: iterations between reply and cancel): {_lost(results)}"


async def test_a_cancelled_runner_sleep_ends_even_as_it_is_stopped(tmp_path) -> None:
    cluster = parse_cluster({
        "site": "s1", "state_dir": str(tmp_path), "hosts": [{"name": "h1"}],
        "vms": [{"name": "a", "host": "h1", "disks": [{"name": "d0", "size": "1MiB"}]}],
        "domains": [{"name": "p", "id": 1, "drva": "127.0.0.1:9", "vms": ["a"]}]}, "t.toml")
    results = {}
    for n in range(ITERATIONS_SWEPT):
        runner = ClusterRunner(cluster, b"s" * 16)
        far = time.monotonic() + 3600
        results[n] = await _stopped_cancelled(lambda: runner._sleep_until(far), runner.stop, n)
    assert _lost(results) == {}, f"cancellation lost (key: iterations between stop and cancel): {_lost(results)}"
