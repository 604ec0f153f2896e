"""The decoded-unit cache of ``cdp mount``: bounded LRU, one fetch per unit at a time.

A *unit* is what one ranged GET and one decode give: a segment block's raw bytes or a
base chunk's raw bytes (``rocva.mount_source``). Units are immutable once decoded, so a
cached one is handed out as it is (a memoryview or bytes), never copied.

Invariants:

- ``bytes_cached <= bytes_max`` after every insertion (least recently used units are
  dropped first; a unit larger than ``bytes_max`` is served but not kept);
- at most one load per key runs at a time (``_loading``): concurrent readers of a unit
  wait for the one fetch. A load runs as a task of its own, so a reader whose request
  is cancelled (its client hung up) does not cancel the fetch the others wait for;
- at most ``loads_max`` loads hold the store at once (a semaphore taken inside the load
  task, so waiting loads hold no buffer).

A failed load is not cached: the next reader of that unit tries again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

Unit = bytes | bytearray | memoryview
#: A load returns the decoded unit and the stored bytes it fetched.
Loader = Callable[[], Awaitable[tuple[Unit, int]]]

CACHE_BYTES_MAX_DEFAULT = 256 << 20
LOADS_MAX_DEFAULT = 8


class UnitCache:
    """Decoded units by key (invariants in the module docstring)."""

    def __init__(self, bytes_max: int = CACHE_BYTES_MAX_DEFAULT, loads_max: int = LOADS_MAX_DEFAULT) -> None:
        assert bytes_max >= 0 and loads_max >= 1, (bytes_max, loads_max)
        self.bytes_max = bytes_max
        self.loads_max = loads_max
        self._units: OrderedDict[Hashable, Unit] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Task] = {}
        self._store_slots = asyncio.Semaphore(loads_max)
        self.bytes_cached = 0
        self.bytes_cached_peak = 0
        self.hits = 0
        self.misses = 0
        self.joined = 0  # readers that waited for a load another reader started
        self.evictions = 0
        self.fetches = 0
        self.bytes_fetched = 0  # stored bytes the loads returned
        self.failures = 0

    async def get(self, key: Hashable, load: Loader) -> Unit:
        """The unit under ``key``, from the cache or from ``load()`` (run once however many
        readers ask at the same time); ``load``'s error if it fails."""
        unit = self._units.get(key)
        if unit is not None:
            self._units.move_to_end(key)
            self.hits += 1
            return unit
        task = self._loading.get(key)
        if task is None:
            self.misses += 1
            task = asyncio.create_task(self._load(key, load))
            task.add_done_callback(_retrieve)
            self._loading[key] = task
        else:
            self.joined += 1
        return await asyncio.shield(task)

    async def _load(self, key: Hashable, load: Loader) -> Unit:
        try:
            async with self._store_slots:
                unit, fetched = await load()
            self.fetches += 1
            self.bytes_fetched += fetched
            self._keep(key, unit)
            return unit
        except Exception:
            self.failures += 1
            raise
        finally:
            self._loading.pop(key, None)

    def _keep(self, key: Hashable, unit: Unit) -> None:
        size = len(unit)
        if size > self.bytes_max:
            return
        while self._units and self.bytes_cached + size > self.bytes_max:
            _, old = self._units.popitem(last=False)
            self.bytes_cached -= len(old)
            self.evictions += 1
        self._units[key] = unit
        self.bytes_cached += size
        self.bytes_cached_peak = max(self.bytes_cached_peak, self.bytes_cached)
        assert self.bytes_cached <= self.bytes_max, (self.bytes_cached, self.bytes_max)

    async def close(self) -> None:
        """Cancel the loads still running and drop every unit."""
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._units.clear()
        self.bytes_cached = 0

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_joined": self.joined,
                "cache_evictions": self.evictions, "cache_bytes_max": self.bytes_max,
                "cache_bytes_peak": self.bytes_cached_peak, "fetches": self.fetches,
                "bytes_fetched": self.bytes_fetched, "fetch_failures": self.failures}


def _retrieve(task: asyncio.Task) -> None:
    """Mark a load's error as seen: every reader that waited got it already, and one whose
    readers all went away must not log "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()
