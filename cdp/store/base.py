"""The ObjectStore protocol: the one interface of every object-store backend.

Backends (``fs``, ``memory``, ``s3``, ``azure``, and the ``faulty`` wrapper)
implement the same six coroutines with the same semantics, checked by one
contract suite (tests/store/test_contract.py):

- ``put`` is atomic: a reader sees the whole old object, none, or the whole
  new one, never a part. ``if_absent=True`` creates only if no object exists,
  atomically against concurrent writers, else raises ``AlreadyExists``.
  ``if_match=etag`` replaces the object only if it is still the one with that
  etag (as ``put``, ``stat`` or ``list`` gave it), else raises
  ``PreconditionFailed`` — also when the object is gone. ``put`` returns the new
  object's etag (None only where a backend cannot tell).
- ``get`` reads the whole object or a byte range (see ``resolve_range``).
- ``list`` yields objects in ascending byte order of their keys.
- ``delete`` is idempotent; ``stat`` and ``get`` raise ``NotFound``.

Two more coroutines are optional (callers look them up with ``getattr`` and cope
with their absence); every backend here has them, and the contract suite checks them:

- ``server_time() -> float | None``: the store's own clock, seconds since the epoch,
  or None when the store cannot tell. S3 and Azure read the HTTP ``Date`` header of
  a cheap request (1 s resolution: the middle of the second it names); the file and
  memory stores are local and give this host's clock. ``cdp preflight system``
  compares it with the local clock, because store locks (FORMAT.md §11) allow only
  so much skew between hosts.
- ``ensure_container() -> None``: create the bucket, container or root directory if
  it does not exist yet (``cdp install``); idempotent.

Every key goes through ``cdp.store.keys.validate_key`` before any I/O. Keys
are relative to the store's root or prefix; ``list`` returns relative keys.
Errors are ``cdp.errors.StoreError`` subclasses; SDK errors never leak.
Stores do not take ``timeout=`` arguments: callers apply timeouts (a
cancelled call leaves no partial object behind).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

Bytes = bytes | bytearray | memoryview
MiB = 1024 * 1024

#: Operation names, as used by FaultyStore plans and error messages.
OPS = ("put", "get", "list", "delete", "stat")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a listing or stat knows of one object."""

    key: str
    size: int
    #: Last modification, seconds since the epoch, when the backend knows it.
    mtime: float | None = None
    #: Opaque version tag (changes when the object is replaced), if known.
    etag: str | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of immutable-by-convention byte objects."""

    async def put(self, key: str, data: Bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> str | None:
        """Store data under key atomically and return its etag; if_absent: AlreadyExists
        if present; if_match: PreconditionFailed unless the object has that etag.

        data must not change until put returns (backends may write it from
        another thread, or send it in parts).
        """
        ...

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return bytes [offset, offset+length) (see resolve_range); NotFound if missing."""
        ...

    def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        """Yield objects whose key starts with prefix and is > start_after, in byte order."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...

    async def stat(self, key: str) -> ObjectInfo:
        """Return the object's ObjectInfo; NotFound if missing."""
        ...

    async def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...

    def describe(self) -> str:
        """A secret-free description for logs and messages (a URL)."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class StoreBase:
    """Shared plumbing: async context manager, url/describe, repr."""

    #: Short backend name used in error messages ("file", "s3", ...).
    kind = "store"

    @property
    def url(self) -> str:
        """The store's secret-free URL (same as describe())."""
        return self.describe()

    def describe(self) -> str:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def check_conditions(if_absent: bool, if_match: str | None) -> None:
    """Refuse a put that is both a create and a replace (a programmer's error)."""
    if if_absent and if_match is not None:
        raise ValueError("put takes if_absent or if_match, not both")
    if if_match is not None and not if_match:
        raise ValueError("if_match must be a non-empty etag")


def check_range(offset: int, length: int | None) -> None:
    """Refuse range arguments no backend can honour (a programmer's error)."""
    if length is not None and length < 0:
        raise ValueError(f"length must be >= 0 or None, not {length}")
    if offset < 0 and length is not None:
        raise ValueError("a suffix range (offset < 0) takes no length")


def resolve_range(size: int, offset: int, length: int | None) -> tuple[int, int]:
    """Map get()'s range arguments onto an object of `size` bytes: [start, end).

    - ``offset >= 0``: from offset, ``length`` bytes or to the end. A range
      running past the end is cut at the end; an offset at or after the end
      gives an empty range (get returns b"").
    - ``offset < 0`` (``length`` None): the last ``-offset`` bytes, or the
      whole object if it is smaller (like HTTP ``Range: bytes=-N``).
    """
    check_range(offset, length)
    if offset < 0:
        return max(0, size + offset), size
    start = min(offset, size)
    end = size if length is None else min(size, offset + length)
    return start, max(start, end)


def http_date_seconds(value: str | None) -> float | None:
    """An HTTP ``Date`` header as seconds since the epoch, None if absent or unparsable.

    The header has a resolution of one second and names the second during which the
    server answered: the middle of that second is the best estimate of its clock.
    """
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110: an HTTP date is always GMT
        return None
    return when.timestamp() + 0.5
