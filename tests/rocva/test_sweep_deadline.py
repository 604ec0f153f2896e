"""The chunk sweep's deletes land while its gc lock surely holds (FORMAT.md §11.1, §11.4).

The sweep checked its lock right before each delete, but nothing bounded how late the
delete reached the store: one store call may take 120 s (the SDK's retries), the whole
default ttl. A chunk writer on another host that saw the lock expired relied on the chunk
(it names it in a new manifest), then the delete landed: a manifest naming a missing
chunk. Now a delete must end before this host's clock reads ``expires_ns − skew``, or it
is cancelled and the sweep stops (LeaseLost); and a sweep that lost its lock while
deleting reports it, not success. Scaled: ttl 3 s, skew 0.5 s (default 120 s, 30 s).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cdp.base_image import chunk_stored, encode_chunk
from cdp.errors import Busy, LeaseLost
from cdp.layout import chunk_key
from cdp.locks import chunk_writer_lease, gc_prefix, recovery_lease
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from rocva import retention
from rocva.retention import sweep_chunks
from tests.waiting import EVENTUALLY_S, wait_until, wait_until_async

TTL_S, SKEW_S = 3.0, 0.5
#: How long the sweeper's chunk delete takes (SDK retries on a flapping link): it would
#: land well after the lock looks expired to the others (ttl + skew after it was written).
SLOW_DELETE_S = TTL_S + SKEW_S + 3.0


class SlowChunkDeletes(FaultyStore):
    """The sweeping host's view of the store, its link browning out as it deletes: each
    chunk delete takes ``delay_s`` before it reaches the store, and from the first one on
    the renewals of its gc lock fail. Records which deletes landed and which were
    cancelled on the way."""

    def __init__(self, inner, delay_s: float) -> None:
        super().__init__(inner)
        self.delay_s = delay_s
        self.landed: list[str] = []
        self.cancelled: list[str] = []

    async def delete(self, key: str) -> None:
        if key.startswith("c/"):
            self.set_error_rate("put", 1.0, seed=1, match=gc_prefix())
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.cancelled.append(key)
                raise
        await super().delete(key)
        if key.startswith("c/"):
            self.landed.append(key)


async def _garbage_chunk(store) -> tuple[str, bytes, int]:
    """A chunk no manifest names yet: garbage for the sweep, a dedup hit for a writer."""
    raw = bytes(range(256)) * 4096
    h, obj = encode_chunk(raw)
    await store.put(chunk_key(h), obj)
    return chunk_key(h), h, len(raw)


async def _writer_lease_elsewhere(store):
    """A chunk writer on another host: its lease, once no sweep looks live to it."""
    deadline = time.monotonic() + EVENTUALLY_S
    while True:
        try:
            return await chunk_writer_lease(store, owner="consolidation elsewhere", ttl_s=TTL_S, skew_s=SKEW_S,
                                            wait_s=0)
        except Busy:
            assert time.monotonic() < deadline, "the writer never got its lease"
            await asyncio.sleep(0.05)


async def test_a_delete_that_cannot_land_in_time_is_cancelled_not_landed_under_a_writer(tmp_path):
    inner = FileStore(tmp_path / "store")
    key, h, size = await _garbage_chunk(inner)
    sweeper = SlowChunkDeletes(inner, SLOW_DELETE_S)
    sweep = asyncio.create_task(sweep_chunks(sweeper, ttl_s=TTL_S, skew_s=SKEW_S))
    await wait_until_async(lambda: _has(inner, gc_prefix()), EVENTUALLY_S, "the sweep's gc lock")
    writer = await _writer_lease_elsewhere(inner)
    try:
        assert await chunk_stored(inner, key, h, size) is None  # the writer relies on it (dedup)
        [outcome] = await asyncio.gather(sweep, return_exceptions=True)
        writer.check()
        assert await chunk_stored(inner, key, h, size) is None, f"chunk {key}, relied on under a live writer lease"
    finally:
        await writer.release()
    assert isinstance(outcome, LeaseLost), outcome
    assert f"delete of {key} did not end within" in outcome.message and gc_prefix() in outcome.message
    assert sweeper.cancelled == [key] and sweeper.landed == []


async def _has(store, prefix: str) -> bool:
    return any([i async for i in store.list(prefix)])


async def test_a_sweep_that_loses_its_lock_while_deleting_reports_it(monkeypatch):
    """Another host took the gc lock (a higher ``n``) while the last delete ran: that delete
    ended in time, but the sweep did not hold its lock to the end; it said success."""
    held = {}
    real_gc_lock = retention.gc_lock

    async def keeping(*args, **kwargs):
        held["lease"] = await real_gc_lock(*args, **kwargs)
        return held["lease"]

    monkeypatch.setattr(retention, "gc_lock", keeping)
    store = MemoryStore()
    key, _, _ = await _garbage_chunk(store)
    real_delete = store.delete

    async def delete_while_superseded(k: str) -> None:
        if k.startswith("c/"):
            await store.put(f"{gc_prefix()}{0xFFFF:016x}.lock", b"taken by another host")
            await wait_until(lambda: held["lease"].lost is not None, EVENTUALLY_S, "the lock to be lost")
        await real_delete(k)

    store.delete = delete_while_superseded
    with pytest.raises(LeaseLost, match="superseded by"):
        await sweep_chunks(store, ttl_s=TTL_S, skew_s=0)
    assert not await _has(store, "c/")  # it did delete: only the report was wrong


# ------------------------------------------------------------------ Lease.bounded


async def test_an_action_under_a_lease_has_until_its_expiry_less_the_skew():
    lease = await recovery_lease(MemoryStore(), 7, owner="test", ttl_s=TTL_S, skew_s=SKEW_S)
    try:
        assert TTL_S - SKEW_S - 0.5 < lease.time_left_s() <= TTL_S - SKEW_S
        assert await lease.bounded(lambda: asyncio.sleep(0, "done"), "a test action") == "done"
    finally:
        await lease.release()


async def test_a_lease_too_short_for_its_skew_starts_nothing():
    lease = await recovery_lease(MemoryStore(), 7, owner="test", ttl_s=0.3)  # skew: the default 30 s
    calls = []
    try:
        with pytest.raises(LeaseLost, match=r"a test action not started: .* ttl of 0\.3 s, at least 3 × the skew"):
            await lease.bounded(lambda: calls.append(1), "a test action")
        assert calls == []
    finally:
        await lease.release()


async def test_a_timeout_of_the_action_itself_is_not_taken_for_the_deadline():
    lease = await recovery_lease(MemoryStore(), 7, owner="test", ttl_s=TTL_S, skew_s=SKEW_S)

    async def times_out() -> None:
        raise TimeoutError("the action's own")

    try:
        with pytest.raises(TimeoutError, match="the action's own"):
            await lease.bounded(times_out, "a test action")
    finally:
        await lease.release()
