"""What ``GET /v1/domains/{name}/points`` costs the MSA: bounded, shared, cached (FORMAT.md §13.5).

An answer is computed from the domain's catalog head (a load: the generations from the
snapshot on, decoded — 0.14 s of CPU and 18 MB for a head of 60,000 marks) and from the
store (the segment and bases of each mark given are looked up). The web console asks every
10 s per open tab, and 128 connections may ask at once (32 at once took 1,260 MB and 51 s
of CPU when every one loaded the head and gave every mark). So:

- at most ``LOADS_MAX`` answers are computed at once (their loads and store reads, on the
  event loop); other requests wait their turn;
- requests for one answer (domain, page, the DRVA's witness, newest generation) share one
  computation (single flight), and computations of one domain's head share its load;
- the newest head of the last ``HEADS_KEPT`` domains, and the last ``ANSWERS_KEPT``
  answers (their JSON text), are kept while their generation is still the newest in the
  store, for ``AGE_MAX_S`` at most.

Freshness: each request first asks the store which generation is the newest
(``newest_generation``: one listing from the generation known on, which shows a key or
two), so an answer never describes a catalog older than the newest generation in the
store when the request arrived: whatever the DRVA committed before it is in it. What an
answer says of other objects (a mark's ``missing`` objects, ``problems``) is at most
``AGE_MAX_S`` old. ``/v1/failover/{name}/points`` (a domain found by name) shares the
bound on computations at once and the single flight, not the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from cdp.catalog import ListingTooLong, list_generations, listed_generations, load_catalog
from cdp.errors import NotFound
from cdp.store import open_store
from cdp.store.base import ObjectStore

#: Answers computed at once (each may load a head: 0.14 s of CPU, 18 MB at 60,000 marks).
LOADS_MAX = 2
#: Domains whose newest head is kept (the head of a domain of 60,000 marks holds 18 MB).
HEADS_KEPT = 4
#: Answers kept (JSON text: ~0.2 MB for a page of 1,000 marks).
ANSWERS_KEPT = 16
#: The longest a kept head or answer is used: what an answer says of objects besides the
#: catalog (missing segments and bases, traces of a rollback) is never older.
AGE_MAX_S = 30.0
#: Keys the freshness listing reads past the known generation before it lists the
#: catalog's keys whole (``list_generations``) instead.
LISTED_AFTER_MAX = 1024


async def newest_generation(store: ObjectStore, domain: int, known: int | None) -> int:
    """The newest catalog generation of ``domain`` in ``store`` (0: none). With ``known``
    (a generation that was the newest) one listing from its key on, which shows it and
    any generation committed since; the whole listing of ``d/<domain>/cat/`` when none is
    known, or when ``known`` is gone with nothing after it (the catalog was rolled back)."""
    if known is not None:
        newest = 0
        try:  # strays are logged by the whole listing (loads), not at every freshness check
            async for generation in listed_generations(store, domain, start=known, keys_max=LISTED_AFTER_MAX,
                                                       log_strays=False):
                newest = max(newest, generation)
        except ListingTooLong:  # many generations since (or strays): the whole listing says
            newest = 0
        if newest >= known:
            return newest
    generations = await list_generations(store, domain)
    return max(generations) if generations else 0


@dataclass
class _Kept:
    generation: int
    made: float
    value: Any


class PointsCache:
    """The points route's computations (module docstring); one per API application.

    ``counts``: ``checks`` (freshness listings), ``loads`` (heads loaded), ``answers``
    (answers computed), ``hits`` (answers served as kept), ``joined`` (requests or
    computations that shared one in flight); ``busy_max``: the most computations at once."""

    def __init__(self, *, loads_max: int = LOADS_MAX, heads_kept: int = HEADS_KEPT,
                 answers_kept: int = ANSWERS_KEPT, age_max_s: float = AGE_MAX_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._gate = asyncio.Semaphore(loads_max)
        self.heads_kept, self.answers_kept, self.age_max_s, self._clock = heads_kept, answers_kept, age_max_s, clock
        self._heads: OrderedDict[Hashable, _Kept] = OrderedDict()
        self._answers: OrderedDict[Hashable, _Kept] = OrderedDict()
        self._flights: dict[Hashable, asyncio.Future[Any]] = {}
        self.counts: Counter[str] = Counter()
        self.busy = self.busy_max = 0

    async def domain_points(self, url: str, domain: int, page: Hashable, seen: Hashable,
                            compute: Callable[[ObjectStore, Any, int], Awaitable[str]]) -> str:
        """The answer (JSON text) for ``page`` of domain ``domain`` in the store at ``url``,
        as the DRVA's witness ``seen`` checks it: ``compute(store, head, generation)``
        makes it from a loaded head (``load_catalog``'s), unless a kept one is fresh."""
        head_key, answer_key = (url, domain), (url, domain, page, seen)
        known = self._heads.get(head_key) or self._answers.get(answer_key)
        store = open_store(url)
        try:
            newest = await newest_generation(store, domain, known.generation if known is not None else None)
        finally:
            await store.close()
        self.counts["checks"] += 1
        kept = self._fresh(self._answers, answer_key, newest)
        if kept is not None:
            self.counts["hits"] += 1
            return kept

        async def answer() -> str:
            async with self._slot():
                made = self._fresh(self._answers, answer_key, newest)  # while this one waited its turn
                if made is not None:
                    return made
                head, generation = await self._head(url, domain, newest)
                store = open_store(url)
                try:
                    text = await compute(store, head, generation)
                finally:
                    await store.close()
                self.counts["answers"] += 1
                self._keep(self._answers, answer_key, generation, text, self.answers_kept)
                return text

        return await self._single(("answer", answer_key, newest), answer)

    async def gated(self, key: Hashable, compute: Callable[[], Awaitable[str]]) -> str:
        """``compute()`` within the bound on computations at once, shared by the requests
        of one ``key`` while it runs; not kept."""
        async def run() -> str:
            async with self._slot():
                self.counts["answers"] += 1
                return await compute()

        return await self._single(("gated", key), run)

    async def _head(self, url: str, domain: int, newest: int) -> tuple[Any, int]:
        """(head, generation) of ``domain`` no older than ``newest``: kept, or loaded once
        for every computation that needs it now."""
        kept = self._fresh(self._heads, (url, domain), newest)
        if kept is not None:
            return kept

        async def load() -> tuple[Any, int]:
            store = open_store(url)
            try:
                head, generation = await load_catalog(store, domain)
                where = store.describe()
            finally:
                await store.close()
            self.counts["loads"] += 1
            if head is None:
                raise NotFound(f"domain {domain}: no catalog in {where}")
            self._keep(self._heads, (url, domain), generation, (head, generation), self.heads_kept)
            return head, generation

        return await self._single(("head", url, domain, newest), load)

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        async with self._gate:
            self.busy += 1
            self.busy_max = max(self.busy_max, self.busy)
            try:
                yield
            finally:
                self.busy -= 1

    async def _single(self, key: Hashable, work: Callable[[], Awaitable[Any]]) -> Any:
        """``work()``, or the same work already in flight. It runs as its own task: a
        request that goes away (its connection closed) cancels neither it nor the others
        waiting for it."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        else:
            self.counts["joined"] += 1
        return await asyncio.shield(flight)

    def _landed(self, key: Hashable, flight: asyncio.Future[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # taken: a flight whose requests all went away fails quietly

    def _fresh(self, kept: OrderedDict[Hashable, _Kept], key: Hashable, newest: int) -> Any:
        """The value kept under ``key`` when it is of ``newest`` (or newer: a commit landed
        after the listing) and young enough, else None."""
        entry = kept.get(key)
        if entry is None:
            return None
        if entry.generation < newest or self._clock() - entry.made > self.age_max_s:
            del kept[key]
            return None
        kept.move_to_end(key)
        return entry.value

    def _keep(self, kept: OrderedDict[Hashable, _Kept], key: Hashable, generation: int, value: Any,
              most: int) -> None:
        old = kept.get(key)
        if old is not None and old.generation > generation:
            return  # a newer one landed meanwhile
        kept[key] = _Kept(generation, self._clock(), value)
        kept.move_to_end(key)
        while len(kept) > most:
            kept.popitem(last=False)
