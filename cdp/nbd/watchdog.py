"""The stall watchdog of an NBD connection (docs/FORMAT.md §17.4): a client that owes the
server bytes — the rest of a request, or the reading of replies queued for it — and
moves none for ``stall_timeout_s`` is dropped.

A timer per connection that looks four times per period, not an ``asyncio.timeout`` per
request: that cost 13 us a request. Idleness is not a stall: a client that owes nothing
is never dropped by the watchdog (the server evicts an idle one only at its connection
cap, ``cdp.nbd.refusal``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

#: How often the watchdog looks, per ``stall_timeout_s``: a stall is noticed between
#: one period and one period and a quarter after the last byte moved.
CHECKS_PER_PERIOD = 4


class StallWatchdog:
    """Calls ``on_stall`` once ``owes()`` has been true and ``progress()`` unchanged for
    ``stall_timeout_s``.

    ``progress()`` is any value that changes whenever a byte moves either way (the
    connection gives the bytes received and the bytes sent); ``owes()`` says whether the
    client owes bytes now. Invariant: at most one timer is pending, none after ``stop``
    or after ``on_stall`` was called.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stall_timeout_s: float, progress: Callable[[], Hashable],
                 owes: Callable[[], bool], on_stall: Callable[[], None]) -> None:
        self._loop = loop
        self.stall_timeout_s = stall_timeout_s
        self._progress_now, self._owes, self._on_stall = progress, owes, on_stall
        self._timer: asyncio.TimerHandle | None = None
        self._progress: Hashable = None
        self._quiet_since = 0.0

    def start(self) -> None:
        self._progress = self._progress_now()
        self._quiet_since = self._loop.time()
        self._timer = self._loop.call_later(self.stall_timeout_s / CHECKS_PER_PERIOD, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = self._loop.time()
        progress = self._progress_now()
        if progress != self._progress or not self._owes():
            self._progress, self._quiet_since = progress, now
        elif now - self._quiet_since >= self.stall_timeout_s:
            self._timer = None
            self._on_stall()
            return
        self._timer = self._loop.call_later(self.stall_timeout_s / CHECKS_PER_PERIOD, self._check)
