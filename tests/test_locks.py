"""Lock objects (FORMAT.md §11.1): round trip, every corruption detected and named."""

from __future__ import annotations

import struct

import pytest

from cdp.errors import FormatError
from cdp.locks import KIND_RECOVERY, NO_DOMAIN, _HEADER, decode_lock, encode_lock
from tests.waiting import EVENTUALLY_S, wait_until

BODY = {"owner": "cdp recover", "host": "h", "pid": 42, "token": "ab" * 16, "created_ns": 5}
KEY = "l/recovery/00000007/" + "cd" * 16 + ".lock"


def test_header_layout_matches_the_spec_table() -> None:
    assert _HEADER.size == 64
    blob = encode_lock(KIND_RECOVERY, 7, 123, BODY)
    magic, version, kind, domain, body_len, expires = struct.unpack_from("<4sHHIIQ", blob)
    assert (magic, version, kind, domain, body_len, expires) == (b"CDPX", 1, 4, 7, len(blob) - 64, 123)


def test_round_trip_and_liveness() -> None:
    lk = decode_lock(KEY, encode_lock(KIND_RECOVERY, 7, 10_000_000_000, BODY))
    assert lk.body == BODY and lk.domain == 7 and lk.expires_ns == 10_000_000_000
    assert lk.live(10_000_000_000, skew_s=0) and not lk.live(10_000_000_001, skew_s=0)
    assert lk.live(10_000_000_001 + 10**9 - 2, skew_s=1)  # others allow for clock skew
    assert "cdp recover" in lk.describe() and KEY in lk.describe()
    assert decode_lock(KEY, encode_lock(1, NO_DOMAIN, 1, BODY)).domain == NO_DOMAIN


def test_every_flipped_byte_and_truncation_is_detected() -> None:
    blob = encode_lock(KIND_RECOVERY, 7, 123, BODY)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(FormatError, match=f"lock {KEY}"):
            decode_lock(KEY, bytes(bad))
    for n in range(len(blob)):
        with pytest.raises(FormatError):
            decode_lock(KEY, blob[:n])


def test_a_body_with_unknown_keys_is_refused() -> None:
    with pytest.raises(FormatError, match="body keys"):
        decode_lock(KEY, encode_lock(KIND_RECOVERY, 7, 1, {**BODY, "extra": 1}))


async def test_a_holder_paused_past_its_window_does_not_bring_its_lock_back(tmp_path) -> None:
    """A recovery lease whose holder stalled past its renewal window: meanwhile another
    process saw it expired and removed it. The holder's next renewal tick must not write
    it again (retention would then see a live recovery it already planned around), and
    the holder must learn that it lost it."""
    import time

    import pytest

    from cdp.errors import LeaseLost
    from cdp.locks import recovery_lease
    from cdp.store.fs import FileStore

    store = FileStore(tmp_path / "store")
    lease = await recovery_lease(store, 3, owner="test", ttl_s=0.3)
    try:
        lease.check()
        lease.expires_ns = time.time_ns() - 1  # as if the process had been stopped past its expiry
        await store.delete(lease.key)  # the others saw it expired
        # Its next renewal tick finds it past its window: it gives the lease up, and its task ends
        # (no later tick may write the lock either).
        await wait_until(lambda: lease.lost is not None and lease._task.done(), EVENTUALLY_S,
                         "the renewal tick to give the lease up")
        assert [i.key async for i in store.list("l/")] == []
        with pytest.raises(LeaseLost, match="paused"):
            lease.check()
    finally:
        await lease.release()


class _HeldRenewal:
    """A store whose next conditional put (a lease renewal) runs ``before`` first: what
    another process did while the renewing holder was stalled between its window check
    and its write."""

    def __init__(self, inner, before) -> None:
        self.inner, self.before, self.renewals = inner, before, 0

    async def put(self, key, data, *, if_absent=False, if_match=None):
        if if_match is not None:
            self.renewals += 1
            if self.before is not None:
                before, self.before = self.before, None
                await before()
        return await self.inner.put(key, data, if_absent=if_absent, if_match=if_match)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("backend", ["file", "memory"])
async def test_a_renewal_stalled_before_its_put_cannot_recreate_a_taken_lock(tmp_path, backend) -> None:
    """An exclusive lock's holder passes its window check, then stalls; meanwhile a
    successor takes ``n + 1`` and deletes ``n``. The stalled put must not bring ``n``
    back (the conditional write refuses it) and the holder must learn it lost the lock."""
    import asyncio

    from cdp.errors import LeaseLost
    from cdp.locks import KIND_MAINTENANCE, acquire_exclusive, maintenance_prefix
    from cdp.store.fs import FileStore
    from cdp.store.memory import MemoryStore

    inner = FileStore(tmp_path / "store") if backend == "file" else MemoryStore("locks")
    prefix = maintenance_prefix(5)
    successor = []

    async def successor_takes_over() -> None:  # as acquire_exclusive does once n expired
        taken = await acquire_exclusive(inner, prefix, KIND_MAINTENANCE, 5, owner="successor", ttl_s=60,
                                        skew_s=-3600)  # sees every lock as expired
        successor.append(taken)

    store = _HeldRenewal(inner, successor_takes_over)
    lease = await acquire_exclusive(store, prefix, KIND_MAINTENANCE, 5, owner="stalled", ttl_s=0.3)
    try:
        for _ in range(100):
            if lease.lost is not None:
                break
            await asyncio.sleep(0.02)
        assert store.renewals == 1, "the holder tried exactly one renewal, and it was refused"
        assert [i.key async for i in inner.list(prefix)] == [successor[0].key]
        with pytest.raises(LeaseLost, match="deleted or replaced"):
            lease.check()
    finally:
        await lease.release()
        for taken in successor:
            await taken.release()


async def test_a_renewal_whose_reply_was_lost_keeps_the_lease(tmp_path) -> None:
    """A renewal the store wrote but whose answer never came back (a timeout after the
    write): the next conditional renewal finds a newer etag. It is the holder's own
    write (its token), so the lease goes on instead of being given up for nothing."""
    from cdp.errors import StoreTimeout
    from cdp.locks import recovery_lease
    from cdp.store.fs import FileStore

    inner = FileStore(tmp_path / "store")

    class LostReply:
        lost = 1

        async def put(self, key, data, *, if_absent=False, if_match=None):
            etag = await inner.put(key, data, if_absent=if_absent, if_match=if_match)
            if if_match is not None and self.lost:
                self.lost -= 1
                raise StoreTimeout(f"put {key}: injected: written, reply lost")
            return etag

        def __getattr__(self, name):
            return getattr(inner, name)

    # A ttl of whole seconds: the renewal window (ttl/3) must outlast a loaded machine's
    # stalls, or the test would measure the machine instead of the adoption.
    replies = LostReply()
    lease = await recovery_lease(replies, 3, owner="test", ttl_s=3.0)
    try:
        first, first_expires = lease.etag, lease.expires_ns
        # The lost reply, the adoption, then a renewal that moved the expiry.
        await wait_until(lambda: replies.lost == 0 and lease.expires_ns > first_expires or lease.lost is not None,
                         EVENTUALLY_S, "a renewal after the lost reply")
        lease.check()
        assert lease.lost is None
        assert lease.etag != first and lease.etag == (await inner.stat(lease.key)).etag
    finally:
        await lease.release()


async def test_an_exclusive_lock_whose_create_reply_was_lost_is_taken(tmp_path) -> None:
    """The conditional create of ``n + 1`` lands but its answer is lost, and the retry
    finds the object there (``AlreadyExists``): it is the taker's own (its token), so the
    lock is taken. It used to be refused as "taken at the same moment by another process",
    leaving the taker's own lock to block every taker, itself included, until it expired."""
    from cdp.errors import AlreadyExists, Busy
    from cdp.locks import KIND_MAINTENANCE, Lease, acquire_exclusive, maintenance_prefix
    from cdp.store import FaultyStore
    from cdp.store.fs import FileStore

    inner = FileStore(tmp_path / "store")
    store = FaultyStore(inner)
    store.fail_next("put", 1, AlreadyExists, after=True)  # written; the retry's answer
    prefix = maintenance_prefix(5)
    lease = await acquire_exclusive(store, prefix, KIND_MAINTENANCE, 5, owner="taker", ttl_s=60)
    try:
        lease.check()
        assert store.injected["put"] == 1
        assert lease.etag == (await inner.stat(lease.key)).etag
        with pytest.raises(Busy, match="held by taker"):  # and it holds it for the others
            await acquire_exclusive(inner, prefix, KIND_MAINTENANCE, 5, owner="other", ttl_s=60)
    finally:
        await lease.release()
    assert [i.key async for i in inner.list(prefix)] == []

    class RivalFirst:  # another process creates the same n + 1 just before this one does
        def __init__(self) -> None:
            self.rival: list[Lease] = []

        async def put(self, key, data, *, if_absent=False, if_match=None):
            if if_absent and not self.rival:
                self.rival.append(Lease(inner, key, KIND_MAINTENANCE, 5, owner="rival", ttl_s=60,
                                        exclusive_prefix=prefix))
                await self.rival[0].create(if_absent=True)
            return await inner.put(key, data, if_absent=if_absent, if_match=if_match)

        def __getattr__(self, name):
            return getattr(inner, name)

    racing = RivalFirst()
    try:
        with pytest.raises(Busy, match="at the same moment by another process"):
            await acquire_exclusive(racing, prefix, KIND_MAINTENANCE, 5, owner="late", ttl_s=60)
    finally:
        for rival in racing.rival:
            await rival.release()
