"""Handshake slots: the connections a DRVA holds between accept and WELCOME (FORMAT.md §9.1).

Before WELCOME a peer is a stranger, and strangers share ``HANDSHAKES_MAX`` slots. With
that cap alone, one peer holding sixteen idle connections (each reopened as the DRVA
drops it at its deadline) kept every filter out: each new connection was answered
``ERROR busy``. So one source may hold at most ``HANDSHAKES_PER_SOURCE_MAX`` of them —
a filter needs one connection per DRVA, and retries a refused one with backoff — and the
rest stay for the others: a stranger now has to come from four sources to fill them.

A source is a peer's IP address; an IPv6 one by its /64, the smallest block a site is
given, so that one host cannot take every slot by cycling through its own addresses
(``cdp.netaddr``, which the management API's per-address share uses too).
"""

from __future__ import annotations

import collections
from typing import Any

from cdp.netaddr import peer_ip, share_key

HANDSHAKES_MAX = 16
HANDSHAKES_PER_SOURCE_MAX = 4


def source_of(peername: Any) -> str:
    """The source a peer's handshakes count under (see the module docstring);
    ``peername`` as ``transport.get_extra_info("peername")`` gives it (None: unknown)."""
    ip = peer_ip(peername)
    if ip is None:  # a Unix socket's path, or nothing: one source
        return peername[0] if isinstance(peername, tuple) and peername else str(peername)
    return share_key(ip)


class HandshakeSlots:
    """Counts the slots taken, in all and per source.

    Invariant: ``taken <= total_max`` and no source holds more than ``per_source_max``;
    every ``take`` is matched by one ``release`` of the same source (the callers release
    when the connection is welcomed, refused, or closed)."""

    def __init__(self, total_max: int = HANDSHAKES_MAX, per_source_max: int = HANDSHAKES_PER_SOURCE_MAX) -> None:
        self.total_max = total_max
        self.per_source_max = per_source_max
        self.taken = 0
        self._by_source: collections.Counter[str] = collections.Counter()

    def refusal(self, source: str) -> str | None:
        """Why a connection from ``source`` gets no slot now (the ERROR busy message's
        reason), or None: it may ``take`` one."""
        if self.taken >= self.total_max:
            return f"{self.total_max} handshakes in progress"
        if self._by_source[source] >= self.per_source_max:
            return f"{self.per_source_max} handshakes in progress from {source}"
        return None

    def take(self, source: str) -> None:
        assert self.refusal(source) is None, "take() without a free slot"
        self.taken += 1
        self._by_source[source] += 1

    def release(self, source: str) -> None:
        assert self._by_source[source] > 0, f"release() of a slot {source} does not hold"
        self.taken -= 1
        self._by_source[source] -= 1
        if not self._by_source[source]:
            del self._by_source[source]

    def held_by(self, source: str) -> int:
        return self._by_source[source]
