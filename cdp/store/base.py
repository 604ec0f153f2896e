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
- ``get`` reads the whole object or a byte range (see ``resolve_range``). With
  ``max_bytes``, an object larger than that is refused before its body is read
  (``TooLarge``, a FormatError naming the key, its size and the bound): a reader of
  an object that is small by its format (a lock, a manifest, a chunk) passes the
  format's bound, so that a planted or mangled giant cannot exhaust its memory.
  A reader calls ``get_bounded``; a wrapper passes the bound on to the store it wraps.
- ``list`` yields objects in ascending byte order of their keys.
- ``delete`` is idempotent; ``stat`` and ``get`` raise ``NotFound``.

Two more coroutines are optional (callers look them up with ``getattr`` and cope
with their absence); every backend here has them, and the contract suite checks them:

- ``server_time() -> float | None``: the store's own clock, seconds since the epoch,
  or None for a store that has none. S3 and Azure read the HTTP ``Date`` header of a
  cheap request (1 s resolution: the middle of the second it names); an answer
  without a usable one is StoreUnavailable, never None (``server_date``): a caller
  takes None for "no clock to compare" and would judge locks by its own clock
  alone. The file and memory stores are local and give this host's clock.
  ``cdp preflight system`` compares it with the local clock, because store locks
  (FORMAT.md §11) allow only so much skew between hosts.
- ``ensure_container() -> None``: create the bucket, container or root directory if
  it does not exist yet (``cdp install``); idempotent.

Every key goes through ``cdp.store.keys.validate_key`` before any I/O. Keys
are relative to the store's root or prefix; ``list`` returns relative keys.
Errors are ``cdp.errors.StoreError`` subclasses; SDK errors never leak.
Stores do not take ``timeout=`` arguments: callers apply timeouts (a
cancelled call leaves no partial object behind). The network backends (S3,
Azure) also bound every call of their own, whatever the caller does: a call
that moves ``n`` bytes ends within ``deadline_base_s + n /
transfer_bytes_per_s_min`` (``within``, constructor settings) or raises
``StoreTimeout``, so a server that answers a byte every few seconds — each
within the SDK's read timeout — cannot hold a call for ever. For a read, ``n`` is
what the server announces, counted up to ``ANNOUNCED_BYTES_MAX`` only
(``transfer_s``): announcing a terabyte buys no months of dripping.

What a network backend takes from its server is checked, not trusted: a listing
(``ListingGuard``) names only keys under the asked prefix, after ``start_after``,
in strictly ascending order, with a fresh continuation token for every further
page; a ranged read returns exactly the bytes asked for, with no content coding (an
answer the client would inflate); a 416 ("range not satisfiable") is an empty read
only where the object's size proves the range empty; a put's answer echoes the
MD5 of the bytes sent where the protocol says it must; a redirect is never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from cdp.errors import ConfigError, FormatError, StoreClockUnknown, StoreError, StoreTimeout, StoreUnavailable
from cdp.store.keys import is_valid_key, show_key

Bytes = bytes | bytearray | memoryview
MiB = 1024 * 1024

#: Operation names, as used by FaultyStore plans and error messages.
OPS = ("put", "get", "list", "delete", "stat")

#: A network store's call may take this long whatever it moves: connecting, the
#: server's first answer and the SDK's own retries (5 attempts, each bounded by the
#: read timeout, with backoff in between, fit in it for the usual settings).
DEADLINE_BASE_S = 120.0
#: On top of the base, one second per this many bytes the call moves. A transfer
#: slower than this is a broken link or a slow-loris answer (one byte every few
#: seconds, each within the read timeout), not a store worth waiting on: the call
#: raises StoreTimeout and the caller's retry starts afresh. 64 KiB/s is 512 kbit/s
#: per transfer, well below a WAN link shared by a recovery's parallel reads.
TRANSFER_BYTES_PER_S_MIN = 64 * 1024
#: The most bytes a read's deadline grows by, whatever size the server announces. No
#: object the engine writes comes near it (FORMAT.md §7: a segment is at most a seal of
#: 256 MiB plus one 64 MiB frame and its index, a chunk 64 MiB and its table, a manifest
#: of a 64 TiB disk in 4 MiB chunks 256 MiB): at the slowest acceptable rate, a call
#: may take 120 s + 4.6 h, not the 194 days a 1 TiB Content-Length would buy. A larger
#: object is still read, by a link faster than that rate.
ANNOUNCED_BYTES_MAX = 1 << 30
#: Names skipped by one listing that its log lines show (the rest are counted).
SKIPPED_NAMES_SHOWN = 3
#: Pages in a row that bring no name before a listing is refused: a server may answer
#: an empty page with a continuation token (Azure does when a scan runs out of time),
#: but one that keeps doing so would page for ever.
LIST_EMPTY_PAGES_MAX = 100
#: Below this, an MD5 on the event loop costs less than a hop to a worker thread;
#: above, it runs in one (16 MiB take ~30 ms, hashlib releases the GIL).
HASH_ON_LOOP_BYTES_MAX = 256 * 1024

logger = logging.getLogger(__name__)


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

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        """Return bytes [offset, offset+length) (see resolve_range); NotFound if missing;
        TooLarge, before any of its body is read, if the object has more than max_bytes."""
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
    """An HTTP ``Date`` header as seconds since the epoch, None if absent or unparsable
    (a year or zone offset too large for a date is unparsable too: OverflowError).

    The header has a resolution of one second and names the second during which the
    server answered: the middle of that second is the best estimate of its clock.
    """
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:  # RFC 9110: an HTTP date is always GMT
            return None
        return when.timestamp() + 0.5
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def server_date(where: str, value: str | None) -> float:
    """The clock an answer's ``Date`` header tells (``http_date_seconds``); StoreUnavailable
    naming ``where`` when it has no usable one. Never None: a network store always tells
    its time, and a caller that took None for "this store has no clock" would judge
    leases by its own clock alone (FORMAT.md §11.1) — a host ahead would see live leases
    expired. Retryable: a proxy in the way may drop the header on one answer."""
    when = http_date_seconds(value)
    if when is None:
        shown = "none" if not value else show_key(value)
        raise StoreClockUnknown(f"{where}: the answer has no usable Date header ({shown}): the store's clock is"
                               f" unknown, so no lock is taken or judged by it")
    return when


class TooLarge(FormatError):
    """An object larger than its reader's bound (``get(..., max_bytes=)``), refused
    before its body was read. ``size`` and ``max_bytes`` as the message says them."""

    def __init__(self, where: str, size: int, max_bytes: int) -> None:
        super().__init__(f"{where}: the object is {size} bytes, at most {max_bytes} expected: refused unread")
        self.where, self.size, self.max_bytes = where, size, max_bytes


def check_size(where: str, size: int, max_bytes: int | None) -> None:
    """TooLarge unless an object of ``size`` bytes is within ``max_bytes`` (None: any)."""
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(where, size, max_bytes)


def empty_past_end(where: str, size: int, offset: int, length: int | None, max_bytes: int | None,
                   asked: str) -> bytes:
    """A 416 (range not satisfiable) answered to a read of ``[offset, offset+length)`` of
    an object of ``size`` bytes (as the answer or a HEAD proved it): the empty read it
    stands for when the range lies at or past the end; StoreUnavailable (retryable)
    when the object holds bytes of the range — a 416 then proves nothing."""
    check_size(where, size, max_bytes)
    start, end = resolve_range(size, offset, length)
    if start != end:
        raise StoreUnavailable(f"{where}: asked {asked}, got HTTP 416 (range not satisfiable), but the object"
                               f" has {size} bytes, which hold bytes [{start}, {end}) of that range")
    return b""


def check_max_bytes(max_bytes: int | None) -> None:
    """Refuse a bound no object can meet (a programmer's error)."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, not {max_bytes}")


async def get_bounded(store: ObjectStore, key: str, max_bytes: int, offset: int = 0,
                      length: int | None = None) -> Any:
    """``store.get(key, offset, length, max_bytes=max_bytes)``: what a reader of an object
    small by its format calls."""
    return await store.get(key, offset, length, max_bytes=max_bytes)


def check_deadline_settings(kind: str, deadline_base_s: float, transfer_bytes_per_s_min: float) -> None:
    """Refuse deadline settings that would make every call fail or never end."""
    if not deadline_base_s > 0 or not transfer_bytes_per_s_min > 0:
        raise ConfigError(f"{kind} deadline_base_s and transfer_bytes_per_s_min must be > 0")


def deadline_s(base_s: float, bytes_per_s_min: float, size: int) -> float:
    """The deadline of a call that moves `size` bytes (see TRANSFER_BYTES_PER_S_MIN)."""
    return base_s + size / bytes_per_s_min


def transfer_s(announced: int, bytes_per_s_min: float) -> float:
    """How much longer a read may take once the server announced ``announced`` bytes:
    counted up to ``ANNOUNCED_BYTES_MAX`` (the caller's bound, when it has one, was
    checked before: the announced size is then within it)."""
    return min(announced, ANNOUNCED_BYTES_MAX) / bytes_per_s_min


@contextlib.asynccontextmanager
async def within(seconds: float, where: str) -> AsyncIterator[asyncio.Timeout]:
    """Run the body for at most `seconds`, then cancel it and raise StoreTimeout naming
    `where`. The body may move the deadline (``reschedule``) once it knows how many bytes
    it moves. A cancellation from outside stays a CancelledError: ``asyncio.timeout``
    turns only its own into a TimeoutError, and only then does this raise StoreTimeout.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    limit = asyncio.timeout(seconds)
    try:
        async with limit:
            yield limit
    except TimeoutError as exc:
        if not limit.expired():
            raise  # someone else's TimeoutError: the caller maps it
        took = (limit.when() or loop.time()) - started
        raise StoreTimeout(f"{where}: no complete answer within the call's deadline of {took:.1f} s") from exc


def redirect_error(where: str, said: str, status: int, check: str) -> StoreError:
    """The error of a 3xx answer, never followed (the configured endpoint did not do the
    call): a permanent redirect (301, 308) is the configuration's to fix (``check``), the
    others may pass and are retried."""
    if status in (301, 308):
        return StoreError(f"{where}: {said}: permanently redirected elsewhere, not followed (check {check})")
    return StoreUnavailable(f"{where}: {said}: redirected elsewhere, not followed")


async def md5_digest(data: Bytes) -> bytes:
    """The MD5 of data, computed in a worker thread when it is large."""
    if len(data) <= HASH_ON_LOOP_BYTES_MAX:
        return hashlib.md5(data).digest()
    return await asyncio.to_thread(lambda: hashlib.md5(data).digest())


class ListingGuard:
    """Checks the names a server lists for one ``list`` call before any is yielded.

    Invariant: every name yielded is under ``root + prefix``, after ``root +
    start_after``, and strictly above every name the server listed before it (so a
    listing cannot repeat itself, and a page that brings nothing new cannot loop); a
    page that follows carries a continuation token different from the one before.
    A name that breaks one of these is a server (or a proxy) that does not follow the
    protocol: StoreError naming the name and the rule, and nothing further is yielded.
    A name under the prefix that is not a key (a console's "folder" marker ``d/``, a
    foreign file) is skipped, as the file store skips such names, and counted: the
    backend calls ``page_done`` after each page and ``done`` at the end, which log the
    count and the first few names in one line (not a line per name: a hostile listing
    of endless foreign names wrote 91 MB of log in 40 s).

    ``skip_to_start_after``: the server cannot start after a name (Azure), so names up
    to ``start_after`` are dropped here; otherwise (S3, which is asked ``StartAfter``)
    such a name is an error.
    """

    def __init__(self, where: str, root: str, prefix: str, start_after: str | None, *,
                 skip_to_start_after: bool) -> None:
        self.where = where
        self.root = root
        self.asked = root + prefix
        self.after = None if start_after is None else root + start_after
        self.skip_to_start_after = skip_to_start_after
        self.previous: str | None = None
        self.token: str | None = None
        self.empty_pages = 0
        self.skipped = 0  # names that are not keys, skipped
        self.skipped_shown: list[str] = []  # the first few of them, for the log
        self.skipped_logged = 0  # how many the last log line counted
        self.skipping_pages = 0  # pages that skipped a name

    def key(self, name: object) -> str | None:
        """The key of one listed name, or None when it is skipped; StoreError if refused."""
        if not isinstance(name, str):
            self._refuse(name, "which is not a name")
        if not name.startswith(self.asked):
            self._refuse(name, f"outside the asked prefix {show_key(self.asked)}")
        if self.previous is not None and name <= self.previous:
            rule = "listed twice" if name == self.previous else f"out of order (after {show_key(self.previous)})"
            self._refuse(name, rule)
        self.previous = name
        if self.after is not None and name <= self.after:
            if self.skip_to_start_after:
                return None
            self._refuse(name, f"not after start_after {show_key(self.after)} (the server ignored it)")
        key = name[len(self.root):]
        if not is_valid_key(key):
            self.skipped += 1
            if len(self.skipped_shown) < SKIPPED_NAMES_SHOWN:
                self.skipped_shown.append(show_key(name))
            return None
        return key

    def page_done(self) -> None:
        """After each page is checked: the names skipped so far are logged in one line on
        the 1st, 2nd, 4th, 8th... page that skipped any, so that a listing that never ends
        writes a few lines, not one per page."""
        if self.skipped > self.skipped_logged:
            self.skipping_pages += 1
            if self.skipping_pages & (self.skipping_pages - 1) == 0:
                self._log_skipped()

    def done(self) -> None:
        """At the end of the listing: the names skipped since the last line, if any."""
        if self.skipped > self.skipped_logged:
            self._log_skipped()

    def _log_skipped(self) -> None:
        logger.warning("%s: %d listed name(s) that are not keys skipped so far, e.g. %s", self.where,
                       self.skipped, ", ".join(self.skipped_shown))
        self.skipped_logged = self.skipped

    def next_page(self, token: str | None, names: int) -> None:
        """Before asking for the page after one that listed `names` names with `token`."""
        if not token:
            raise StoreError(f"{self.where}: the listing is cut short: more pages, no continuation token")
        if token == self.token:
            raise StoreError(f"{self.where}: the server sent continuation token {show_key(token)} twice:"
                             f" the listing would never end")
        self.empty_pages = 0 if names else self.empty_pages + 1
        if self.empty_pages > LIST_EMPTY_PAGES_MAX:
            raise StoreError(f"{self.where}: {self.empty_pages} pages in a row listed nothing:"
                             f" the listing would never end")
        self.token = token

    def _refuse(self, name: object, rule: str) -> None:
        raise StoreError(f"{self.where}: the server listed {show_key(name)}, {rule}: listing refused")
