"""The in-flight budgets of the NBD server (docs/FORMAT.md §17.4): requests and payload
bytes held at once, per connection and over all connections together.

A request takes its share (its WRITE payload, or its READ's length) before its payload
is read and gives it back once its reply is queued and the replies waiting to be sent
are back under ``WRITE_BUFFER_HIGH`` (``cdp.nbd.server``). When a share does not fit,
the connection's reader waits, stops reading its socket, and TCP pushes back on the
client.
"""

from __future__ import annotations

import asyncio


class ServerBudget:
    """Payload bytes in flight over every connection of a server: at most ``bytes_max``
    (one request larger than that still runs, alone). Changed only by ``ConnectionBudget``."""

    def __init__(self, bytes_max: int) -> None:
        self.bytes_max = bytes_max
        self.bytes = 0
        self.changed = asyncio.Event()

    def fits(self, cost: int) -> bool:
        return self.bytes == 0 or self.bytes + cost <= self.bytes_max


class ConnectionBudget:
    """Requests and payload bytes in flight on one connection: at most ``requests_max``
    requests and ``bytes_max`` bytes (one request larger than ``bytes_max`` still runs,
    alone), and within the server's budget ``shared``.

    One taker (the connection's reader loop); ``give`` is synchronous so that a finishing
    or cancelled request returns its share without awaiting anything.
    """

    def __init__(self, requests_max: int, bytes_max: int, shared: ServerBudget) -> None:
        self.requests_max, self.bytes_max = requests_max, bytes_max
        self.shared = shared
        self.requests = 0
        self.bytes = 0
        self._changed = asyncio.Event()

    def _fits(self, cost: int) -> bool:
        return self.requests < self.requests_max and (self.bytes == 0 or self.bytes + cost <= self.bytes_max)

    async def take(self, cost: int) -> None:
        while True:
            if not self._fits(cost):
                changed = self._changed
            elif not self.shared.fits(cost):
                changed = self.shared.changed  # another connection's give() sets it
            else:
                break
            changed.clear()
            await changed.wait()
        self.requests += 1
        self.bytes += cost
        self.shared.bytes += cost

    def give(self, cost: int) -> None:
        self.requests -= 1
        self.bytes -= cost
        self.shared.bytes -= cost
        assert self.requests >= 0 and self.bytes >= 0 and self.shared.bytes >= 0, (self.requests, self.bytes)
        self._changed.set()
        self.shared.changed.set()
