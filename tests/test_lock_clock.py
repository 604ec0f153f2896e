"""Locks and leases against clocks outside the skew (FORMAT.md §11.1).

A lock is judged by the clocks of hosts other than its holder's. A reader whose clock
was five minutes behind wrote a recovery lease that every other host already saw
expired: retention deleted the segments it was reading. A crashed host whose clock was
thirty days ahead left a maintenance lock that blocked every job for thirty days. Now a
host takes, renews and judges leases only while its clock is within the skew of the
store's, and a lock that claims times its store says no holder within the skew could
have written is not live."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import collect_generations
from cdp.errors import Busy, ConfigError, LeaseLost
from cdp.layout import segment_prefix
from cdp.locks import (
    KIND_MAINTENANCE, KIND_RECOVERY, SKEW_DEFAULT_S, TTL_MAX_S, LockInfo, chunk_writer_lease, encode_lock, gc_lock,
    live_locks, maintenance_lock, maintenance_prefix, recovery_lease, recovery_prefix,
)
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SECTOR, DomainBuilder
from rocva.consolidate import consolidate
from rocva.plan import load_state, plan_recovery
from rocva.recover import execute_plan
from rocva.retention import sweep_chunks, sweep_domain
from tests.rocva.build import seed_initial
from tests.waiting import EVENTUALLY_S, wait_until

KiB = 1 << 10
S = 1_000_000_000
DAY_NS = 86400 * S


class HostClock:
    """This host's wall clock, ``off_ns`` from the real one. The memory and file stores'
    ``server_time`` read ``time.time``: left alone, they keep the real time (a store with
    a clock of its own); ``store_follows`` moves it too (the store tells this host's time)."""

    def __init__(self, monkeypatch, *, store_follows: bool = False) -> None:
        self.off_ns = 0
        real_ns, real_s = time.time_ns, time.time
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + self.off_ns)
        if store_follows:
            monkeypatch.setattr(time, "time", lambda: real_s() + self.off_ns / 1e9)


async def _domain(store) -> DomainBuilder:
    b = await DomainBuilder(store, disks=(("vm", "d", 64 * KiB),), ns_per_seq=10 * S).start()
    rng = np.random.default_rng(3)
    await seed_initial(b, 0, rng)
    for i in range(40):
        b.write(0, (i % 32) * SECTOR * 4, rng.bytes(SECTOR * 4))
        if i % 4 == 3:
            await b.seal()
    await b.seal()
    return b


async def _keys(store, prefix: str) -> list[str]:
    return [i.key async for i in store.list(prefix)]


TAKERS = {
    "recovery": lambda store: recovery_lease(store, 7, owner="test"),
    "maintenance": lambda store: maintenance_lock(store, 7, owner="test"),
    "writer": lambda store: chunk_writer_lease(store, owner="test"),
    "gc": lambda store: gc_lock(store, owner="test"),
}


# ------------------------------------------------------------------ hole 2: takers and holders


@pytest.mark.parametrize("kind", sorted(TAKERS))
@pytest.mark.parametrize("off_s", [-300, 300])
async def test_a_host_whose_clock_is_off_from_the_stores_takes_no_lock(monkeypatch, kind, off_s):
    store = MemoryStore()
    clock = HostClock(monkeypatch)
    clock.off_ns = off_s * S
    with pytest.raises(ConfigError) as refused:
        await TAKERS[kind](store)
    text = refused.value.message
    way = "behind" if off_s < 0 else "ahead of"
    assert "not taken" in text and f"is 300.0 s {way} the store's" in text, text
    assert f"{SKEW_DEFAULT_S:g} s of skew" in text and "NTP" in text
    assert await _keys(store, "l/") == []


@pytest.mark.parametrize("kind", sorted(TAKERS))
@pytest.mark.parametrize("off_s", [-25, 25])
async def test_within_the_skew_every_lock_is_taken(monkeypatch, kind, off_s):
    store = MemoryStore()
    HostClock(monkeypatch).off_ns = off_s * S
    lease = await TAKERS[kind](store)
    await lease.release()


@pytest.mark.parametrize("behind_s", [25, 300])
async def test_retention_beside_a_recovery_on_a_slow_clock_host(monkeypatch, tmp_path, behind_s):
    """Host R (clock behind) recovers an old point while host M runs retention. Within
    the skew R's lease holds retention off; beyond it R takes no lease, and reads nothing."""
    store = MemoryStore()
    clock = HostClock(monkeypatch)
    b = await _domain(store)
    now = b.ts(b.seq)
    clock.off_ns = -behind_s * S
    if behind_s > SKEW_DEFAULT_S:
        with pytest.raises(ConfigError, match=f"is {behind_s}.0 s behind the store's"):
            await recovery_lease(store, b.domain, owner="cdp recover on host R")
        return
    lease = await recovery_lease(store, b.domain, owner="cdp recover on host R")
    try:
        plan = await plan_recovery(store, b.domain, 5)
        clock.off_ns = 0  # host M
        job = await consolidate(store, b.domain, older_than_s=60, retention_s=60, now_ns=now, scratch_dir=tmp_path)
        assert job["segments_removed"] > 0 and job["sweep"]["deferred"] > 0
        assert "host R" in job["sweep"]["deferred_by"]
        clock.off_ns = -behind_s * S
        lease.check()
        await execute_plan(store, plan, Path(tempfile.mkdtemp(dir=tmp_path)))
    finally:
        await lease.release()


async def test_a_holder_whose_clock_steps_off_loses_its_lease_at_the_next_renewal(monkeypatch):
    store = MemoryStore()
    clock = HostClock(monkeypatch)
    lease = await recovery_lease(store, 7, owner="test", ttl_s=0.3)
    try:
        written = await store.get(lease.key)
        clock.off_ns = -300 * S  # NTP steps this host's clock back five minutes
        await wait_until(lambda: lease.lost is not None, EVENTUALLY_S, "the lease to be lost")
        with pytest.raises(LeaseLost, match=r"is 300\.\d s behind the store's .* 30 s of skew"):
            lease.check()
        assert await store.get(lease.key) == written, "no renewal was written by the stepped clock"
    finally:
        await lease.release()


# ------------------------------------------------------------------ hole 2: deleters


async def test_a_deleter_whose_clock_is_off_judges_no_lease(monkeypatch, tmp_path):
    store = MemoryStore()
    clock = HostClock(monkeypatch)
    b = await _domain(store)
    now = b.ts(b.seq)
    lease = await recovery_lease(store, b.domain, owner="cdp recover, right clock")
    try:
        job = await consolidate(store, b.domain, older_than_s=60, retention_s=60, now_ns=now, scratch_dir=tmp_path)
        assert job["sweep"]["deferred"] > 0
        segments = await _keys(store, segment_prefix(b.domain))
        state = await load_state(store, b.domain)
        clock.off_ns = DAY_NS  # the deleter's clock is a day ahead: the lease would look expired
        with pytest.raises(ConfigError, match="not judged: this host's clock .* ahead of the store's"):
            await live_locks(store, recovery_prefix(b.domain))
        with pytest.raises(ConfigError, match="not judged"):
            await sweep_domain(store, state.state, state.generation)
        with pytest.raises(ConfigError, match="not judged"):
            await collect_generations(store, b.domain, 200)  # past the early return (snapshots 64 apart)
        with pytest.raises(ConfigError, match="not taken"):
            await sweep_chunks(store)
        assert await _keys(store, segment_prefix(b.domain)) == segments
        clock.off_ns = 0
        assert [lk.key for lk in await live_locks(store, recovery_prefix(b.domain))] == [lease.key]
    finally:
        await lease.release()


# ------------------------------------------------------------------ hole 3: locks from the future


def _forged(kind: int, domain: int, ahead_ns: int, owner: str) -> bytes:
    at = time.time_ns() + ahead_ns
    return encode_lock(kind, domain, at + 120 * S, {"owner": owner, "host": "host-x", "pid": 4242,
                                                    "token": "ab" * 16, "created_ns": at})


async def test_an_abandoned_lock_of_a_fast_clock_host_blocks_nothing(tmp_path, caplog):
    store = MemoryStore()
    b = await _domain(store)
    now = b.ts(b.seq)
    # Host X, clock 30 days ahead, crashed holding the maintenance lock and a recovery lease.
    await store.put(f"{maintenance_prefix(b.domain)}{1:016x}.lock",
                    _forged(KIND_MAINTENANCE, b.domain, 30 * DAY_NS, "cdp consolidate on host X"))
    await store.put(f"{recovery_prefix(b.domain)}{'cd' * 16}.lock",
                    _forged(KIND_RECOVERY, b.domain, 30 * DAY_NS, "cdp recover on host X"))
    with caplog.at_level(logging.WARNING, logger="cdp.locks"):
        job = await consolidate(store, b.domain, older_than_s=60, retention_s=60, now_ns=now, scratch_dir=tmp_path)
    assert job["segments_removed"] > 0 and job["sweep"]["deferred"] == 0 and job["sweep"]["segments_deleted"] > 0
    assert await _keys(store, maintenance_prefix(b.domain)) == []  # the taker removed it, as an expired one
    said = {r.fields["owner"]: r.fields for r in caplog.records if r.getMessage() == "lock_from_future"}
    assert set(said) == {"cdp consolidate on host X", "cdp recover on host X"}  # named, with their times
    x = said["cdp recover on host X"]
    assert x["host"] == "host-x" and x["pid"] == 4242 and x["expires_ns"] > x["stored_ns"] + 29 * DAY_NS
    assert "outside the skew" in x["reason"] and x["created_ns"] > x["stored_ns"]


async def test_a_crashed_fast_host_on_a_file_store_does_not_block_for_days(monkeypatch, tmp_path):
    """The audit's scenario: the file store tells this host's clock (no check possible),
    but its files' times are the file system's."""
    store = FileStore(tmp_path / "store")
    clock = HostClock(monkeypatch, store_follows=True)
    b = await _domain(store)
    now = b.ts(b.seq)
    clock.off_ns = 30 * DAY_NS
    lk = await maintenance_lock(store, b.domain, owner="cdp consolidate on host X")
    rl = await recovery_lease(store, b.domain, owner="cdp recover on host X")
    for held in (lk, rl):  # killed: no renewal, no release
        held._task.cancel()
    await asyncio.gather(lk._task, rl._task, return_exceptions=True)
    clock.off_ns = 0  # the others, right clocks, at once (ttl 120 s): not thirty days later
    job = await consolidate(store, b.domain, older_than_s=60, retention_s=60, now_ns=now, scratch_dir=tmp_path)
    assert job["sweep"]["deferred"] == 0


async def test_a_legitimate_renewal_stays_live(monkeypatch):
    """A holder 25 s ahead (within the skew) renews: expires = its clock + ttl. Judged at
    once by a right clock, the lock is live and from no future."""
    store = MemoryStore()
    clock = HostClock(monkeypatch)
    clock.off_ns = 25 * S
    lease = await recovery_lease(store, 7, owner="ahead by 25 s", ttl_s=0.3)
    try:
        renewed = lease.expires_ns
        await wait_until(lambda: lease.expires_ns > renewed, EVENTUALLY_S, "a renewal")
        clock.off_ns = 0
        [lock] = await live_locks(store, recovery_prefix(7))
        assert lock.key == lease.key and lock.from_future() is None and lock.stored_ns is not None
    finally:
        await lease.release()


def test_the_future_is_judged_against_the_stores_time_of_the_write():
    stored = 1_750_000_000 * S
    slack = int((SKEW_DEFAULT_S + 1) * 1e9)
    body = {"owner": "o", "host": "h", "pid": 1, "token": "t", "created_ns": stored}
    lock = LockInfo("l/gc/x.lock", 1, 0, stored + int(TTL_MAX_S * 1e9) + slack, body, stored)
    assert lock.from_future() is None and lock.live(stored)
    later = dataclasses.replace(lock, expires_ns=lock.expires_ns + 1)
    assert "after the store wrote it" in later.from_future() and not later.live(stored)
    created = dataclasses.replace(lock, body={**body, "created_ns": stored + slack + 1})
    assert "created" in created.from_future() and not created.live(stored)
    # A judge whose own clock is far behind still sees the lock live (it is not from the future).
    assert lock.live(stored - 30 * DAY_NS)
    # No store time known: judged by expiry alone.
    assert dataclasses.replace(later, stored_ns=None).live(stored)


class _StaleListing:
    """A listing whose object times predate the version a get then reads (renewed since)."""

    def __init__(self, inner) -> None:
        self.inner, self.stats = inner, 0

    async def list(self, prefix):
        async for info in self.inner.list(prefix):
            yield dataclasses.replace(info, mtime=info.mtime - 86400)

    async def stat(self, key):
        self.stats += 1
        return await self.inner.stat(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_lock_renewed_after_the_listing_is_judged_by_its_own_write():
    inner = MemoryStore()
    lease = await recovery_lease(inner, 7, owner="renewing")
    try:
        store = _StaleListing(inner)
        assert [lk.key for lk in await live_locks(store, recovery_prefix(7))] == [lease.key]
        assert store.stats == 1  # looked like the future by the listing's time: the stat decided
    finally:
        await lease.release()


async def test_busy_still_names_a_live_holder():
    store = MemoryStore()
    held = await maintenance_lock(store, 7, owner="the real job")
    try:
        with pytest.raises(Busy, match="the real job"):
            await maintenance_lock(store, 7, owner="second")
    finally:
        await held.release()


class _NoTimeAfterTaking(MemoryStore):
    """A store whose clock stops answering once the lease is taken (a transient error)."""

    failing = False

    async def server_time(self):
        if self.failing:
            from cdp.errors import StoreUnavailable
            raise StoreUnavailable("server_time: 503")
        return await super().server_time()


async def test_a_renewal_goes_on_when_the_stores_clock_does_not_answer():
    store = _NoTimeAfterTaking()
    lease = await recovery_lease(store, 7, owner="test", ttl_s=0.3)
    try:
        store.failing = True
        first = lease.expires_ns
        await wait_until(lambda: lease.expires_ns > first + 100_000_000, EVENTUALLY_S, "two renewals")
        lease.check()
    finally:
        await lease.release()
