"""MemoryStore: a dict of immutable bytes, for tests.

Same semantics as every backend (see ``cdp.store.base``). Each coroutine does
its whole change without awaiting in between, so on one event loop every put
is atomic and ``if_absent`` is an atomic check-and-set. ``list`` pages through
a sorted snapshot of the keys taken when it starts (like an S3 listing, it may
miss objects created after it began).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cdp.errors import AlreadyExists, NotFound, PreconditionFailed
from cdp.store.base import Bytes, ObjectInfo, StoreBase, check_conditions, check_max_bytes, check_size, resolve_range
from cdp.store.keys import show_key, validate_key, validate_prefix

#: Keys yielded between two awaits of list(), like one page of a listing.
PAGE_KEYS_DEFAULT = 1000


@dataclass(frozen=True, slots=True)
class _Object:
    data: bytes
    mtime: float
    etag: str


class MemoryStore(StoreBase):
    """Objects held in a dict; `name` only labels the store in messages."""

    kind = "mem"

    def __init__(self, name: str = "", *, page_size: int = PAGE_KEYS_DEFAULT) -> None:
        assert page_size > 0, page_size
        self.name = name
        self.page_size = page_size
        self._objects: dict[str, _Object] = {}

    def describe(self) -> str:
        return f"mem://{self.name}"

    async def put(self, key: str, data: Bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> str:
        check_conditions(if_absent, if_match)
        validate_key(key)
        blob = bytes(data)  # copy: the caller may reuse its buffer
        if if_absent and key in self._objects:
            raise AlreadyExists(
                f"{self.describe()}: put if_absent {show_key(key)}: an object already exists"
            )
        if if_match is not None:
            old = self._objects.get(key)
            if old is None or old.etag != if_match:
                raise PreconditionFailed(
                    f"{self.describe()}: put if_match {show_key(key)}: "
                    f"{'the object is gone' if old is None else f'the object was replaced (etag {old.etag})'},"
                    f" expected etag {if_match}"
                )
        etag = hashlib.blake2b(blob, digest_size=8).hexdigest()
        self._objects[key] = _Object(blob, time.time(), etag)
        return etag

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        validate_key(key)
        check_max_bytes(max_bytes)
        obj = self._lookup("get", key)
        check_size(f"{self.describe()}: get {show_key(key)}", len(obj.data), max_bytes)
        start, end = resolve_range(len(obj.data), offset, length)
        return obj.data[start:end]

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        keys = sorted(k for k in self._objects if k.startswith(prefix))
        first = 0 if start_after is None else bisect.bisect_right(keys, start_after)
        for page_start in range(first, len(keys), self.page_size):
            for key in keys[page_start : page_start + self.page_size]:
                obj = self._objects.get(key)
                if obj is not None:  # deleted since the snapshot
                    yield ObjectInfo(key, len(obj.data), obj.mtime, obj.etag)
            await asyncio.sleep(0)

    async def delete(self, key: str) -> None:
        validate_key(key)
        self._objects.pop(key, None)

    async def server_time(self) -> float | None:
        """The store lives in this process: its clock is ours."""
        return time.time()

    async def ensure_container(self) -> None:
        """Nothing to create: the dict exists."""

    async def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        obj = self._lookup("stat", key)
        return ObjectInfo(key, len(obj.data), obj.mtime, obj.etag)

    def _lookup(self, op: str, key: str) -> _Object:
        try:
            return self._objects[key]
        except KeyError:
            raise NotFound(f"{self.describe()}: {op} {show_key(key)}: no such object") from None
