"""FaultyStore: a wrapper that injects named faults into another store, for tests.

Every call is counted in ``calls[op]`` (op is one of ``cdp.store.base.OPS``),
its key validated, then checked against the plan, in this order:

1. ``offline()``: every call raises StoreUnavailable until ``online()``.
2. ``set_delay(op, s)``: the call sleeps s seconds first.
3. ``hang(op)``: the call waits until cancelled (or ``release(op)``), so a
   caller's timeout can be tested.
4. ``fail_next(op, n, exc_type, after=False)``: the next n calls raise
   exc_type; with ``after=True`` the inner call runs first and *then* the
   error is raised (a lost reply: the put happened, the caller thinks not).
5. ``set_error_rate(op, p, seed, after=False, match="")``: each call whose key
   contains ``match`` fails with probability p, drawn from a ``random.Random(seed)``
   of its own, so a run is reproducible; ``after`` as for ``fail_next``.

``server_time`` and ``ensure_container`` delegate to the inner store, uncounted;
of the plan only ``offline()`` applies to them. op may be "*" for every operation.
With no fault planned the wrapper is transparent: it passes the contract suite.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cdp.errors import StoreError, StoreUnavailable
from cdp.store.base import OPS, Bytes, ObjectInfo, ObjectStore, StoreBase
from cdp.store.keys import show_key, validate_key, validate_prefix


@dataclass(frozen=True)
class _Failure:
    exc_type: type[StoreError]
    after: bool


@dataclass
class _ErrorRate:
    probability: float
    exc_type: type[StoreError]
    rng: random.Random
    after: bool = False
    match: str = ""


class FaultyStore(StoreBase):
    """Delegates to `inner`, injecting the faults planned with its methods."""

    kind = "faulty"

    def __init__(self, inner: ObjectStore, *, seed: int = 0) -> None:
        self.inner = inner
        self.seed = seed
        #: Calls per operation, failed and injected ones included.
        self.calls: Counter[str] = Counter()
        #: Faults injected per operation.
        self.injected: Counter[str] = Counter()
        self._offline = False
        self._delay_s: dict[str, float] = {}
        self._hangs: dict[str, asyncio.Event] = {}
        self._failures: dict[str, deque[_Failure]] = {op: deque() for op in OPS}
        self._rates: dict[str, _ErrorRate] = {}

    def describe(self) -> str:
        return f"faulty+{self.inner.describe()}"

    # -- the plan ----------------------------------------------------------

    def offline(self) -> None:
        """Make every call raise StoreUnavailable until online()."""
        self._offline = True

    def online(self) -> None:
        self._offline = False

    def set_delay(self, op: str, seconds: float) -> None:
        """Delay each call of op by seconds (0 removes the delay)."""
        assert seconds >= 0, seconds
        for name in _ops(op):
            self._delay_s[name] = seconds

    def hang(self, op: str) -> None:
        """Make calls of op wait until cancelled or release(op)."""
        for name in _ops(op):
            self._hangs.setdefault(name, asyncio.Event())

    def release(self, op: str) -> None:
        """Let calls hanging in op go on, and stop hanging new ones."""
        for name in _ops(op):
            event = self._hangs.pop(name, None)
            if event is not None:
                event.set()

    def fail_next(
        self,
        op: str,
        n: int = 1,
        exc_type: type[StoreError] = StoreUnavailable,
        *,
        after: bool = False,
    ) -> None:
        """Make the next n calls of op raise exc_type (after the inner call if after)."""
        assert n >= 0, n
        for name in _ops(op):
            self._failures[name].extend([_Failure(exc_type, after)] * n)

    def set_error_rate(
        self,
        op: str,
        probability: float,
        seed: int | None = None,
        exc_type: type[StoreError] = StoreUnavailable,
        *,
        after: bool = False,
        match: str = "",
    ) -> None:
        """Make each call of op on a key containing ``match`` fail with the given
        probability (0 removes it); with ``after``, once the inner call is done."""
        assert 0.0 <= probability <= 1.0, probability
        for index, name in enumerate(_ops(op)):
            rng = random.Random((self.seed if seed is None else seed) * 31 + index)
            self._rates[name] = _ErrorRate(probability, exc_type, rng, after, match)

    def clear(self) -> None:
        """Remove every planned fault (counters are kept)."""
        self._offline = False
        self._delay_s.clear()
        self.release("*")
        for queue in self._failures.values():
            queue.clear()
        self._rates.clear()

    # -- the store ---------------------------------------------------------

    async def put(self, key: str, data: Bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> str | None:
        after = await self._before("put", validate_key(key))
        etag = await self.inner.put(key, data, if_absent=if_absent, if_match=if_match)
        self._after("put", key, after)
        return etag

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        after = await self._before("get", validate_key(key))
        data = await self.inner.get(key, offset, length, max_bytes=max_bytes)
        self._after("get", key, after)
        return data

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        after = await self._before("list", validate_prefix(prefix))
        async for info in self.inner.list(prefix, start_after=start_after):
            yield info
        self._after("list", prefix, after)

    async def delete(self, key: str) -> None:
        after = await self._before("delete", validate_key(key))
        await self.inner.delete(key)
        self._after("delete", key, after)

    async def stat(self, key: str) -> ObjectInfo:
        after = await self._before("stat", validate_key(key))
        info = await self.inner.stat(key)
        self._after("stat", key, after)
        return info

    async def server_time(self) -> float | None:
        """The inner store's clock (None only if it has none: a network store's missing
        Date is its error, passed on); fails while offline."""
        self._check_online("server_time")
        inner = getattr(self.inner, "server_time", None)
        return None if inner is None else await inner()

    async def ensure_container(self) -> None:
        self._check_online("ensure_container")
        inner = getattr(self.inner, "ensure_container", None)
        if inner is not None:
            await inner()

    async def close(self) -> None:
        await self.inner.close()

    def _check_online(self, op: str) -> None:
        if self._offline:
            raise StoreUnavailable(f"{self.describe()}: {op}: store offline (injected)")

    async def _before(self, op: str, key: str) -> _Failure | None:
        """Apply the plan before the inner call; return a failure due after it."""
        self.calls[op] += 1
        if self._offline:
            where = f"{self.describe()}: {op} {show_key(key)}"
            raise StoreUnavailable(f"{where}: store offline (injected)")
        if self._delay_s.get(op):
            await asyncio.sleep(self._delay_s[op])
        hang = self._hangs.get(op)
        if hang is not None:
            await hang.wait()
        failure = self._failures[op].popleft() if self._failures[op] else None
        if failure is None:
            rate = self._rates.get(op)
            if rate is not None and rate.match in key and rate.rng.random() < rate.probability:
                failure = _Failure(rate.exc_type, after=rate.after)
        if failure is not None and not failure.after:
            raise self._injected(failure, op, key)
        return failure

    def _after(self, op: str, key: str, failure: _Failure | None) -> None:
        if failure is not None:
            raise self._injected(failure, op, key)

    def _injected(self, failure: _Failure, op: str, key: str) -> StoreError:
        self.injected[op] += 1
        when = "after the call" if failure.after else "before the call"
        return failure.exc_type(f"{self.describe()}: {op} {show_key(key)}: injected fault ({when})")


def _ops(op: str) -> tuple[str, ...]:
    if op == "*":
        return OPS
    if op not in OPS:
        raise ValueError(f"unknown store operation {op!r}, expected one of {OPS} or '*'")
    return (op,)
