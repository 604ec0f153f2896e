"""Locks and leases in the object store (FORMAT.md §11).

Objects that retention and chunk garbage collection delete may be in use by another
process that only *reads* the store: a recovery planned from an older catalog
generation, or a seeder/consolidation about to name an existing chunk in a new
manifest. Both sides announce themselves with small lock objects under ``l/``, and every
rule below is "create your own object first, then list the other side's": of two
processes racing, at least one sees the other (the stores are strongly consistent for
list-after-put).

- ``l/recovery/<domain>/<id>.lock`` (shared): a recovery reads that domain's objects.
  Retention deletes nothing of the domain while one is live.
- ``l/writer/<id>.lock`` (shared): a chunk writer may rely on chunks it saw in the store.
  The chunk sweep does not run while one is live; a writer waits while a sweep runs.
- ``l/gc/<n>.lock`` and ``l/maint/<domain>/<n>.lock`` (exclusive): the live lock with the
  highest ``n`` holds; a new holder creates ``n + 1`` with a conditional put, so two
  takers of an expired lock cannot both win.

A lock lives until ``expires_ns`` (+ ``skew_s`` for everyone but its holder, for clock
skew between hosts); the holder rewrites it every ``ttl / 3`` and stops relying on it
(``check()`` raises ``LeaseLost``) once its own clock passes ``expires_ns − ttl / 3``
without a renewal, or, for an exclusive lock, when a higher ``n`` appears. A holder that
wakes up past that point (paused, stalled) does not renew: the others may have acted on
the expiry, and a renewal would make the lock live again under them. A renewal is also a
conditional write (``if_match`` on the etag of the holder's last write): a holder paused
*between* that check and its put still cannot recreate a lock its successor deleted or
replace one written over it. What a holder does to the store under its lock (the chunk
sweep's deletes) must also end before the others may act on the expiry: ``Lease.bounded``
cancels it once this host's clock reads ``expires_ns − skew``.

Clocks (§11.1): every host's clock is within ``skew_s`` of the store's. A lease is taken
and renewed only by a host whose clock is (``check_clock_skew`` against the store's
``server_time()``, where the backend has one), and a deleter judges leases only then
(``live_locks``): a host whose clock is behind would otherwise write leases the others
already see expired, and one ahead would see live leases expired. A lock whose expiry
lies more than ``TTL_MAX_S`` + skew after the time the store wrote it (or whose
``created_ns`` lies more than the skew after it) was written by a clock outside the skew
— a crashed host whose clock was days ahead — and is not live (``LockInfo.from_future``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import xxhash

from cdp.errors import (
    AlreadyExists, Busy, CdpError, ConfigError, FormatError, LeaseLost, NotFound, PreconditionFailed, StoreClockUnknown,
    StoreError,
)
from cdp.layout import U32_MAX
from cdp.logs import get_logger
from cdp.store.base import ObjectStore, get_bounded
from cdp.summed import checked_json_body, pack_summed, unpack_summed

log = get_logger("cdp.locks")
T = TypeVar("T")

LOCK_MAGIC = b"CDPX"  # "CDPL" is the log entry (§3.3)
LOCK_VERSION = 1
KIND_GC, KIND_MAINTENANCE, KIND_WRITER, KIND_RECOVERY = 1, 2, 3, 4  # §11.1
KIND_NAMES = {KIND_GC: "gc", KIND_MAINTENANCE: "maintenance", KIND_WRITER: "writer",
              KIND_RECOVERY: "recovery"}
NO_DOMAIN = U32_MAX  # §11.1: the domain field of store-wide locks
BODY_LEN_MAX = 64 << 10
TTL_DEFAULT_S = 120.0
#: How far the clocks of two hosts may disagree: a lock is someone else's until this long
#: after its expiry. ``cdp preflight system`` checks the skew against the store.
SKEW_DEFAULT_S = 30.0
#: The longest ttl a lease is taken with (``Lease`` refuses more). A holder writes its
#: clock plus its ttl as the expiry: a lock that claims more than this (plus the skew)
#: after the time the store wrote it came from a clock outside the skew (§11.1).
TTL_MAX_S = 600.0
#: The store's object times (S3 ``LastModified``) and its ``Date`` header have whole seconds.
STORE_TIME_RESOLUTION_S = 1.0
WRITER_WAIT_DEFAULT_S = 600.0
#: After a failed renewal, the next attempt comes after ttl / 12, at most this long.
RENEW_RETRY_S_MAX = 5.0

# FORMAT.md §11.1: lock header, 64 bytes; header_xxh3 (last field) covers [0, 56).
_HEADER = struct.Struct("<4sHHIIQQ24sQ")
assert _HEADER.size == 64, "FORMAT.md §11.1"
_HEADER_ZERO = {"reserved": (32, 24)}
#: The largest lock object (§11.1: header and body): a larger one is refused before it is
#: read, not read whole and then found wrong (a planted 2 GiB lock took every sweep's memory).
LOCK_BYTES_MAX = _HEADER.size + BODY_LEN_MAX
_BODY_KEYS = frozenset(("owner", "host", "pid", "token", "created_ns"))


def gc_prefix() -> str:
    return "l/gc/"


def maintenance_prefix(domain: int) -> str:
    return f"l/maint/{domain:08x}/"


def writer_prefix() -> str:
    return "l/writer/"


def recovery_prefix(domain: int) -> str:
    return f"l/recovery/{domain:08x}/"


# --------------------------------------------------------------------------- codec


@dataclass(frozen=True)
class LockInfo:
    """One decoded lock object."""

    key: str
    kind: int
    domain: int
    expires_ns: int
    body: dict
    #: When the store wrote this version of the lock, by the store's clock (None: unknown).
    stored_ns: int | None = None

    def live(self, now_ns: int, skew_s: float = SKEW_DEFAULT_S) -> bool:
        """Seen by anyone but its holder: still held at ``now_ns``."""
        return self.from_future(skew_s) is None and now_ns <= self.expires_ns + int(skew_s * 1e9)

    def from_future(self, skew_s: float = SKEW_DEFAULT_S) -> str | None:
        """Why no holder whose clock was within ``skew_s`` of the store's can have written
        this lock, or None. Its expiry is its holder's clock at a write plus a ttl of at
        most ``TTL_MAX_S``; ``created_ns`` precedes every write. Judged against the time
        the store wrote it, not the judge's clock: a judge whose clock is behind must not
        take every live lock for one from the future."""
        if self.stored_ns is None:
            return None
        slack_ns = int((max(skew_s, 0.0) + STORE_TIME_RESOLUTION_S) * 1e9)
        ahead_s = (self.expires_ns - self.stored_ns) / 1e9
        if self.expires_ns > self.stored_ns + int(TTL_MAX_S * 1e9) + slack_ns:
            return (f"it expires {_iso(self.expires_ns)}, {ahead_s:.0f} s after the store wrote it "
                    f"({_iso(self.stored_ns)}; a ttl is at most {TTL_MAX_S:g} s, the skew {skew_s:g} s)")
        created = self.body.get("created_ns")
        if isinstance(created, int) and created > self.stored_ns + slack_ns:
            return (f"it was created {_iso(created)}, {(created - self.stored_ns) / 1e9:.0f} s after the "
                    f"store wrote it ({_iso(self.stored_ns)}; the skew is {skew_s:g} s)")
        return None

    def describe(self) -> str:
        b = self.body
        since = _iso(b["created_ns"]) if isinstance(b["created_ns"], int) else repr(b["created_ns"])
        return f"{b['owner']} (host {b['host']}, pid {b['pid']}, since {since}, lock {self.key})"


def encode_lock(kind: int, domain: int, expires_ns: int, body: dict) -> bytes:
    """A lock object (§11.1): header, then ``body`` as compact, key-sorted UTF-8 JSON."""
    if kind not in KIND_NAMES:
        raise ValueError(f"lock kind {kind} not in {sorted(KIND_NAMES)}")
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(data) > BODY_LEN_MAX:
        raise ValueError(f"lock body of {len(data)} bytes > {BODY_LEN_MAX}")
    return pack_summed(_HEADER, LOCK_MAGIC, LOCK_VERSION, kind, domain, len(data), expires_ns,
                       xxhash.xxh3_64_intdigest(data), bytes(24)) + data


def decode_lock(key: str, data: bytes | bytearray | memoryview) -> LockInfo:
    """Verify the lock object stored under ``key`` (FormatError naming it otherwise)."""
    mv = memoryview(data).cast("B")
    where = f"lock {key}"
    kind, domain, body_len, expires_ns, body_xxh3, _ = unpack_summed(
        _HEADER, mv, where=where, magic=LOCK_MAGIC, version=LOCK_VERSION, zero=_HEADER_ZERO)
    if kind not in KIND_NAMES:
        raise FormatError(f"{where}: header at offset 6: kind {kind}, expected 1..4")
    body = checked_json_body(mv, body_len, body_xxh3, where=where, body_len_max=BODY_LEN_MAX, keys=_BODY_KEYS)
    return LockInfo(key, kind, domain, expires_ns, body)


def _iso(ns: int) -> str:
    """A wall-clock time in a message, UTC to the second (any int: a lock's field may be wild)."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))
    except (OverflowError, OSError, ValueError):
        return f"{ns} ns"


def _stored_ns(mtime: float | None) -> int | None:
    return int(mtime * 1e9) if mtime is not None and math.isfinite(mtime) else None


async def list_locks(store: ObjectStore, prefix: str, skew_s: float = SKEW_DEFAULT_S) -> list[LockInfo]:
    """Every lock object under ``prefix``, in key order, with the time the store wrote it.
    A lock that vanishes between the listing and the read is skipped (its holder released
    it). One from the future (``LockInfo.from_future``) is logged, naming its holder."""
    out = []
    async for info in store.list(prefix):
        try:
            lock = dataclasses.replace(decode_lock(info.key, await get_bounded(store, info.key, LOCK_BYTES_MAX)),
                                       stored_ns=_stored_ns(info.mtime))
            if lock.from_future(skew_s) is not None:
                # The listing may predate the version read (a renewal in between): the
                # store's time of a version at least as new as the one read decides.
                lock = dataclasses.replace(lock, stored_ns=_stored_ns((await store.stat(info.key)).mtime))
        except NotFound:
            continue
        why = lock.from_future(skew_s)
        if why is not None:
            b = lock.body
            log.warning("lock_from_future", key=lock.key, owner=b.get("owner"), host=b.get("host"),
                        pid=b.get("pid"), created_ns=b.get("created_ns"), expires_ns=lock.expires_ns,
                        stored_ns=lock.stored_ns, reason=f"not live: its holder's clock was outside the skew: {why}")
        out.append(lock)
    return out


async def live_locks(store: ObjectStore, prefix: str, *, now_ns: int | None = None,
                     skew_s: float = SKEW_DEFAULT_S) -> list[LockInfo]:
    """The locks under ``prefix`` live at ``now_ns``. Without ``now_ns`` they are judged
    by this host's clock, and only while it is within ``skew_s`` of the store's
    (``ConfigError`` otherwise, naming both): a deleter whose clock is ahead would take
    live leases for expired ones."""
    if now_ns is None:
        await check_clock_skew(store, skew_s, f"the locks under {prefix} are not judged")
        now_ns = time.time_ns()
    return [lk for lk in await list_locks(store, prefix, skew_s) if lk.live(now_ns, skew_s)]


# --------------------------------------------------------------------------- clocks

class ClockSkewed(ConfigError):
    """This host's clock is off from the store's by more than the skew locks allow (§11.1)."""



@dataclass(frozen=True)
class ClockReading:
    """This host's clock against the store's, read once (``read_store_clock``)."""

    host_ns: int  # this host's clock in the middle of the round trip
    store_ns: int
    uncertainty_s: float  # half the round trip, and half a second of an HTTP Date

    @property
    def offset_s(self) -> float:
        """How far this host's clock is ahead of the store's (negative: behind)."""
        return (self.host_ns - self.store_ns) / 1e9

    def beyond(self, skew_s: float) -> bool:
        """Certainly off from the store's clock by more than ``skew_s`` (a negative skew, as
        a test uses to see every lock expired, allows none)."""
        return abs(self.offset_s) > max(skew_s, 0.0) + self.uncertainty_s

    def describe(self, skew_s: float) -> str:
        way = "ahead of" if self.offset_s >= 0 else "behind"
        return (f"this host's clock ({_iso(self.host_ns)}) is {abs(self.offset_s):.1f} s {way} the store's "
                f"({_iso(self.store_ns)}), more than the {skew_s:g} s of skew that store locks allow "
                f"(FORMAT.md §11.1): synchronise the clocks (NTP)")


async def read_store_clock(store: ObjectStore) -> ClockReading | None:
    """The store's clock (``server_time()``) against this host's; None when the store
    has none. The file and memory stores answer with this host's clock: for them the
    reading says nothing (offset 0). A network store that cannot tell its time on this
    answer (no usable Date) raises StoreClockUnknown, a StoreUnavailable (one that did not
    answer at all raises its own): nothing is judged by this clock alone."""
    server_time = getattr(store, "server_time", None)
    if server_time is None:
        return None
    host0_ns, mono0_ns = time.time_ns(), time.monotonic_ns()
    theirs = await server_time()  # StoreClockUnknown without a usable Date (server_date)
    half_ns = (time.monotonic_ns() - mono0_ns) // 2
    if theirs is None or not math.isfinite(theirs):
        return None
    return ClockReading(host0_ns + half_ns, int(theirs * 1e9), half_ns / 1e9 + STORE_TIME_RESOLUTION_S / 2)


async def check_clock_skew(store: ObjectStore, skew_s: float, what: str) -> ClockReading | None:
    """Read the store's clock (``read_store_clock``); ``ClockSkewed`` (a ConfigError)
    saying ``what`` is refused when this host's is off from it by more than ``skew_s``."""
    reading = await read_store_clock(store)
    if reading is not None and reading.beyond(skew_s):
        log.error("clock_skew_refused", what=what, host_ns=reading.host_ns, store_ns=reading.store_ns,
                  offset_s=round(reading.offset_s, 3), skew_s=skew_s)
        raise ClockSkewed(f"{what}: {reading.describe(skew_s)}")
    return reading


# --------------------------------------------------------------------------- holding


class Lease:
    """A lock object this process holds, renewed in the background until ``release``."""

    def __init__(self, store: ObjectStore, key: str, kind: int, domain: int, *, owner: str,
                 ttl_s: float = TTL_DEFAULT_S, skew_s: float = SKEW_DEFAULT_S,
                 exclusive_prefix: str | None = None) -> None:
        assert 0 < ttl_s <= TTL_MAX_S, ttl_s
        self.store = store
        self.key = key
        self.kind = kind
        self.domain = domain
        self.ttl_s = ttl_s
        self.skew_s = skew_s
        self.exclusive_prefix = exclusive_prefix
        self.body = {"owner": owner, "host": socket.gethostname()[:255], "pid": os.getpid(),
                     "token": uuid.uuid4().hex, "created_ns": time.time_ns()}
        self.expires_ns = 0
        #: The etag of this holder's last write of the lock: renewals replace only that
        #: object (None where a backend cannot tell: renewals are then unconditional).
        self.etag: str | None = None
        self.lost: str | None = None
        self._lost_event = asyncio.Event()  # set with ``lost``: ``wait_lost``
        self._task: asyncio.Task | None = None

    def _object(self) -> tuple[bytes, int]:
        expires = time.time_ns() + int(self.ttl_s * 1e9)
        return encode_lock(self.kind, self.domain, expires, self.body), expires

    async def create(self, *, if_absent: bool = False) -> None:
        """Write the lock and start renewing it. Refused (``ConfigError``) when this host's
        clock is off from the store's by more than the skew: the others would judge the
        lease by clocks it does not share."""
        await check_clock_skew(self.store, self.skew_s, f"lock {self.key} not taken")
        data, expires = self._object()
        try:
            self.etag = await self.store.put(self.key, data, if_absent=if_absent)
            self.expires_ns = expires
        except AlreadyExists:
            # A conditional create whose reply was lost, retried (by the SDK or a caller),
            # finds the object it wrote itself: ours, not a rival's that took it first.
            if not await self._adopt_own_write():
                raise
        self._task = asyncio.create_task(self._renew_loop(), name=f"lease {self.key}")

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this lease is certainly still held."""
        if self.lost is None and time.time_ns() > self.expires_ns - int(self.ttl_s / 3 * 1e9):
            self._lose(f"not renewed since {self.ttl_s * 2 / 3:.0f} s before its expiry")
        if self.lost is not None:
            raise LeaseLost(f"lock {self.key} lost: {self.lost}")

    def time_left_s(self) -> float:
        """How long from now an action under this lease may take to land: until this
        host's clock reads ``expires_ns − skew``. Every host's clock is within the skew of
        the store's (§11.1), so that moment comes no later than true time ``expires_ns``;
        another host acts on the expiry only once its clock passes ``expires_ns + skew``,
        which is no earlier than true time ``expires_ns``. After a passing ``check()`` (this
        clock at most ``expires_ns − ttl/3``) that leaves at least ``ttl/3 − skew`` (10 s by
        default); not ``ttl/3 + skew``: two hosts' clocks may differ by twice the skew."""
        return (self.expires_ns - int(max(self.skew_s, 0.0) * 1e9) - time.time_ns()) / 1e9

    async def bounded(self, action: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``action()`` under this lease: ``check()`` first, and it must end within
        ``time_left_s``: a store call may otherwise take its own deadline (minutes of SDK
        retries) and land after the others acted on this lease's expiry (§11.1). Past that
        it is cancelled and ``LeaseLost`` names ``what``: its caller stops, and does nothing
        more under this lease."""
        self.check()
        left_s = self.time_left_s()
        if left_s <= 0:
            raise LeaseLost(f"lock {self.key}: {what} not started: the lease leaves it no time (a ttl of "
                            f"{self.ttl_s:g} s, at least 3 × the skew of {self.skew_s:g} s expected)")
        limit = asyncio.timeout(left_s)
        try:
            async with limit:
                return await action()
        except TimeoutError:
            if not limit.expired():
                raise
            raise LeaseLost(f"lock {self.key}: {what} did not end within {left_s:.1f} s, before the others may "
                            f"take the lock for expired (FORMAT.md §11.1): cancelled, and nothing more is done "
                            f"under it") from None

    async def wait_lost(self) -> str:
        """Return (why) once this lease is lost. A holder that must not go on without one
        (a mount serving for days) takes a new one then, and checks what it relies on."""
        await self._lost_event.wait()
        assert self.lost is not None
        return self.lost

    def _lose(self, reason: str) -> None:
        """The lease is lost (the first reason stays): logged, and ``wait_lost`` returns."""
        if self.lost is None:
            self.lost = reason
            log.error("lock_lost", key=self.key, reason=reason)
        self._lost_event.set()

    async def _renew_loop(self) -> None:
        delay = self.ttl_s / 3
        while True:
            await asyncio.sleep(delay)
            if time.time_ns() > self.expires_ns - int(self.ttl_s / 3 * 1e9):
                # Paused past the renewal window (a stopped process, a stalled loop): the
                # others may already have taken the lock or acted on its expiry. Renewing
                # now would bring it back to life under them; the lease is lost instead,
                # and check() says so at the holder's next step.
                self._lose(f"not renewed in time: paused {self._late_s():.1f} s past its window")
                return
            try:
                try:
                    reading = await read_store_clock(self.store)
                except StoreError as exc:  # checked when taken and at the next renewal: renew now
                    log.warning("lock_clock_unchecked", key=self.key, error=exc.message)
                    reading = None
                if reading is not None and reading.beyond(self.skew_s):
                    # Stepped since the lease was taken: behind, this renewal would already
                    # look expired to the others; ahead, it may have let lapse what they hold.
                    self._lose(reading.describe(self.skew_s))
                    return
                if self.exclusive_prefix is not None:
                    newer = [i.key async for i in self.store.list(self.exclusive_prefix) if i.key > self.key]
                    if newer:
                        self._lose(f"superseded by {newer[-1]}")
                        return
                # The expiry is fixed before the put: a put delayed past it writes a lock
                # that is already expired for everyone, and for this holder too.
                data, expires = self._object()
                try:
                    self.etag = await self.store.put(self.key, data, if_match=self.etag)
                except PreconditionFailed:
                    if not await self._adopt_own_write():
                        raise
                    continue  # our last write landed after all: renew on the next tick
                self.expires_ns = expires
                delay = self.ttl_s / 3
            except PreconditionFailed as exc:
                self._lose(f"deleted or replaced by another process ({exc.message})")
                return
            except StoreError as exc:  # retried soon; check() tells when it is too late
                log.warning("lock_renew_failed", key=self.key, error=exc.message)
                # A full tick later would be the very end of the window: one transient
                # store error would cost the lease. Retry well inside it.
                delay = min(self.ttl_s / 12, RENEW_RETRY_S_MAX)
            except Exception as exc:
                # Anything else (a bug, an answer no one foresaw) would end this task
                # silently: the holder would go on, and ``wait_lost`` never return, while
                # the lock expires under it. Lost, said now. A foreign error's text may
                # quote what it should not (an SDK's URL): only our own messages are shown.
                said = exc.message if isinstance(exc, CdpError) else "no message shown"
                self._lose(f"renewal failed unexpectedly: {type(exc).__name__} ({said})")
                return

    async def _adopt_own_write(self) -> bool:
        """After a conditional renewal lost: is the object our own earlier renewal, whose
        reply was lost (a timeout after the store had written it)? Then take its etag
        and expiry as ours. Anything else there — nothing, or another holder's token —
        and the lease is lost."""
        try:
            info = await self.store.stat(self.key)
            current = decode_lock(self.key, await get_bounded(self.store, self.key, LOCK_BYTES_MAX))
        except (NotFound, FormatError):
            return False
        if current.body.get("token") != self.body["token"] or info.etag is None:
            return False
        # Only the holder writes its token under this key, so the stat and the get saw
        # the same object: ours.
        self.etag, self.expires_ns = info.etag, current.expires_ns
        return True

    def _late_s(self) -> float:
        return (time.time_ns() - (self.expires_ns - int(self.ttl_s / 3 * 1e9))) / 1e9

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.store.delete(self.key)
        except StoreError as exc:  # it expires by itself
            log.warning("lock_release_failed", key=self.key, error=exc.message)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()


def _exclusive_number(prefix: str, key: str) -> int:
    name = key[len(prefix):]
    if len(name) != 21 or not name.endswith(".lock") or not all(c in "0123456789abcdef" for c in name[:16]):
        raise FormatError(f"lock {key}: expected {prefix}<n: 16 hex digits>.lock (FORMAT.md §11.2)")
    return int(name[:16], 16)


async def acquire_exclusive(store: ObjectStore, prefix: str, kind: int, domain: int, *, owner: str,
                            ttl_s: float = TTL_DEFAULT_S, skew_s: float = SKEW_DEFAULT_S) -> Lease:
    """Hold the exclusive lock under ``prefix`` (§11.2), or raise ``Busy`` naming its holder."""
    locks = await list_locks(store, prefix, skew_s)
    now = time.time_ns()  # judged only if the lock is then taken: Lease.create checks this clock
    n = 0
    if locks:
        top = locks[-1]
        if top.live(now, skew_s):
            raise Busy(f"{KIND_NAMES[kind]} lock held by {top.describe()}")
        n = _exclusive_number(prefix, top.key)
    key = f"{prefix}{n + 1:016x}.lock"
    lease = Lease(store, key, kind, domain, owner=owner, ttl_s=ttl_s, skew_s=skew_s, exclusive_prefix=prefix)
    try:
        await lease.create(if_absent=True)
    except AlreadyExists:
        raise Busy(f"{KIND_NAMES[kind]} lock {key} was taken at the same moment by another process") from None
    for old in locks:  # expired predecessors: nobody relies on them
        await store.delete(old.key)
    return lease


async def recovery_lease(store: ObjectStore, domain: int, *, owner: str, ttl_s: float = TTL_DEFAULT_S,
                         skew_s: float = SKEW_DEFAULT_S) -> Lease:
    """Announce a recovery reading ``domain`` (§11.3). Take it *before* loading the catalog."""
    lease = Lease(store, f"{recovery_prefix(domain)}{uuid.uuid4().hex}.lock", KIND_RECOVERY, domain,
                  owner=owner, ttl_s=ttl_s, skew_s=skew_s)
    await lease.create()
    return lease


async def maintenance_lock(store: ObjectStore, domain: int, *, owner: str, ttl_s: float = TTL_DEFAULT_S,
                           skew_s: float = SKEW_DEFAULT_S) -> Lease:
    """The one consolidation/retention job of ``domain`` at a time (§11.2)."""
    return await acquire_exclusive(store, maintenance_prefix(domain), KIND_MAINTENANCE, domain,
                                   owner=owner, ttl_s=ttl_s, skew_s=skew_s)


async def chunk_writer_lease(store: ObjectStore, *, owner: str, ttl_s: float = TTL_DEFAULT_S,
                             skew_s: float = SKEW_DEFAULT_S,
                             wait_s: float = WRITER_WAIT_DEFAULT_S) -> Lease:
    """Announce a chunk writer (§11.4): create ours, then make sure no sweep runs.

    While a chunk sweep holds the gc lock, ours is withdrawn and we wait (sweeps are
    short) up to ``wait_s``, then ``Busy``. Chunks seen in the store before this returns
    must not be relied on: look again under the lease.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        lease = Lease(store, f"{writer_prefix()}{uuid.uuid4().hex}.lock", KIND_WRITER, NO_DOMAIN,
                      owner=owner, ttl_s=ttl_s, skew_s=skew_s)
        await lease.create()
        try:
            sweeps = await live_locks(store, gc_prefix(), skew_s=skew_s)
        except BaseException:
            await lease.release()
            raise
        if not sweeps:
            return lease
        await lease.release()
        if time.monotonic() >= deadline:
            raise Busy(f"chunk writer: a chunk sweep still runs after {wait_s:.0f} s: {sweeps[-1].describe()}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def gc_lock(store: ObjectStore, *, owner: str, ttl_s: float = TTL_DEFAULT_S,
                  skew_s: float = SKEW_DEFAULT_S) -> Lease:
    """The store-wide chunk-sweep lock (§11.4): exclusive, and only while no chunk writer
    is live (``Busy`` naming one otherwise, the lock released)."""
    lease = await acquire_exclusive(store, gc_prefix(), KIND_GC, NO_DOMAIN, owner=owner,
                                    ttl_s=ttl_s, skew_s=skew_s)
    try:
        writers = await live_locks(store, writer_prefix(), skew_s=skew_s)
    except BaseException:
        await lease.release()
        raise
    if writers:
        await lease.release()
        raise Busy(f"chunk sweep: {len(writers)} chunk writer(s) active, e.g. {writers[0].describe()}")
    return lease


__all__ = [
    "KIND_GC", "KIND_MAINTENANCE", "KIND_NAMES", "KIND_RECOVERY", "KIND_WRITER", "ClockReading", "Lease",
    "ClockSkewed", "LockInfo", "NO_DOMAIN", "SKEW_DEFAULT_S", "StoreClockUnknown",
    "TTL_DEFAULT_S", "TTL_MAX_S", "acquire_exclusive",
    "check_clock_skew", "chunk_writer_lease", "decode_lock", "encode_lock", "gc_lock", "gc_prefix", "list_locks",
    "live_locks", "maintenance_lock", "maintenance_prefix", "read_store_clock", "recovery_lease",
    "recovery_prefix", "writer_prefix",
]
