"""``points_cache.newest_generation``: the freshness check lists the catalog's keys from
the known generation on, at most ``LISTED_AFTER_MAX`` of them — stray keys counted, so
a prefix stuffed with them cannot make the check read without bound — and lists the
catalog whole when that bound is passed or the known generation is gone."""

from __future__ import annotations

import logging

from cdp.layout import catalog_key, catalog_prefix
from cdp.msa import points_cache
from cdp.store.memory import MemoryStore


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.keys_listed = 0
        self.listings = 0

    async def list(self, prefix, **kw):
        self.listings += 1
        async for info in super().list(prefix, **kw):
            self.keys_listed += 1
            yield info


async def _put_generations(store, domain: int, generations) -> None:
    for g in generations:
        await store.put(catalog_key(domain, g), b"x")


async def test_a_known_generation_is_checked_from_its_key_on():
    store = CountingStore()
    await _put_generations(store, 3, range(1, 501))
    store.keys_listed = 0
    assert await points_cache.newest_generation(store, 3, 500) == 500
    assert store.keys_listed == 1  # its own key, not the 499 before it
    await _put_generations(store, 3, [501, 502])
    assert await points_cache.newest_generation(store, 3, 500) == 502


async def test_strays_past_the_bound_make_it_list_the_catalog_whole(monkeypatch, caplog):
    monkeypatch.setattr(points_cache, "LISTED_AFTER_MAX", 16)
    store = CountingStore()
    await _put_generations(store, 3, [1, 2])
    for i in range(40):  # stray keys after generation 2's: not catalog keys
        await store.put(f"{catalog_prefix(3)}{2:016x}.stray{i:03d}", b"x")
    store.keys_listed = store.listings = 0
    with caplog.at_level(logging.WARNING):
        assert await points_cache.newest_generation(store, 3, 2) == 2
    # The check stopped after 17 keys, then the whole listing: 2 generations + 40 strays.
    assert store.listings == 2 and store.keys_listed == 17 + 42
    strays_logged = [r for r in caplog.records if r.getMessage().startswith("catalog_stray")]
    assert strays_logged, "the whole listing logs the strays"


async def test_a_known_generation_gone_lists_the_catalog_whole():
    store = CountingStore()
    await _put_generations(store, 3, [1, 2, 3])
    await store.delete(catalog_key(3, 3))  # rolled back
    assert await points_cache.newest_generation(store, 3, 3) == 2
    assert await points_cache.newest_generation(store, 3, None) == 2
