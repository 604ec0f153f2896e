"""AzureBlobStore: objects as block blobs in an Azure container (azure.storage.blob.aio).

Invariants and how Azure gives them:

- Atomic put: a block blob is replaced whole when Put Blob or Put Block List
  commits; staged blocks of an upload that fails are never visible (Azure
  drops uncommitted blocks).
- ``if_absent``: ``overwrite=False`` makes the SDK send ``If-None-Match: *``
  on the committing request, which Azure evaluates atomically; 409
  BlobAlreadyExists (or 412 ConditionNotMet) is AlreadyExists.
- ``if_match``: ``If-Match`` on the etag (``match_condition=IfNotModified``);
  412 ConditionNotMet or 404 (the blob is gone) is PreconditionFailed.
- ``list``: List Blobs returns names in lexical (byte) order; ``start_after``
  is applied on this side (the service has no portable "start after").
  ``ListingGuard`` refuses a name outside the asked prefix, out of order or
  repeated, and a continuation marker (``by_page``) that repeats.
- Suffix ranges need the size: ``get`` stats the blob, then reads the range
  with ``If-Match`` on the etag it saw, and retries if the blob was replaced
  in between, so the bytes always come from one version.
- Keys are ``prefix + key``; callers only see keys relative to the prefix.

The connection string (which holds the account key or a SAS) goes straight
into the SDK client; ``describe()`` and error messages name only the account,
host (user info of a BlobEndpoint replaced by ***), container, key, HTTP status
and Azure error code.

What the service answers is checked (``cdp.store.base``): a put of one Put Blob
sends ``Content-MD5`` and needs the answer's Content-MD5 to be the same (else
StoreUnavailable: the caller puts again); a put in blocks sends each block's MD5
(``validate_content``), which the service checks. Every answer to a ranged read
(the SDK reads in ranges, even a whole blob) must be a 206 whose Content-Range and
Content-Length are the range asked for, with no content coding, checked before its
body is read: the SDK is told not to decompress (its default inflates a gzip body
without limit: a 1 MiB answer became 1 GiB), and a ``Content-Encoding`` other than
identity is refused. A get with ``max_bytes`` refuses a blob the first answer says
is larger, before its body is read. A 416 is an empty read only when its
``Content-Range: bytes */N`` puts the range at or past the end (the SDK asks a
range even for a whole blob: an empty blob answers 416 ``bytes */0``). The SDK's
RedirectPolicy is off: a 3xx is an error. Every call ends within its deadline
(``within``): StoreTimeout. An answer without a usable ``Date`` makes
``server_time`` fail (StoreUnavailable), never answer None.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    DeserializationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.storage.blob.aio import ContainerClient, ExponentialRetry

from cdp.errors import (
    AlreadyExists,
    CdpError,
    ConfigError,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from cdp.store.base import (
    DEADLINE_BASE_S,
    empty_past_end,
    TRANSFER_BYTES_PER_S_MIN,
    MiB,
    Bytes,
    ListingGuard,
    ObjectInfo,
    StoreBase,
    check_conditions,
    check_deadline_settings,
    check_max_bytes,
    check_range,
    check_size,
    deadline_s,
    http_date_seconds,
    md5_digest,
    redirect_error,
    resolve_range,
    server_date,
    transfer_s,
    within,
)
from cdp.store.keys import normalize_root_prefix, show_key, validate_key, validate_prefix
from cdp.store.open import redact_host

#: List Blobs returns at most this many blobs a request.
PAGE_BLOBS_MAX = 5000
#: Attempts at a suffix read while the blob keeps being replaced under it.
SUFFIX_READ_ATTEMPTS_MAX = 3

_CONTAINER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_TIMEOUT_CODES = {"OperationTimedOut"}
_BUSY_CODES = {"ServerBusy", "InternalError", "Md5Mismatch"}  # Md5Mismatch: the body arrived changed
#: What the SDK raises when it cannot deserialize an answer's headers (OverflowError: a
#: date whose year has eleven digits).
_UNREADABLE = (DeserializationError, OverflowError)
_RANGE_ASKED = re.compile(r"bytes=([0-9]+)-([0-9]*)")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)")
#: The Content-Range of a 416: no range of the blob, whose size it names.
_UNSATISFIED_RANGE = re.compile(r"bytes \*/([0-9]+)")


class AzureBlobStore(StoreBase):
    """Objects under `prefix` in Azure Blob container `container`."""

    kind = "azure"

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        connection_string: str,
        max_concurrency: int = 4,
        max_single_put_size: int = 64 * MiB,
        block_size: int = 16 * MiB,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        page_size: int = PAGE_BLOBS_MAX,
        deadline_base_s: float = DEADLINE_BASE_S,
        transfer_bytes_per_s_min: float = TRANSFER_BYTES_PER_S_MIN,
    ) -> None:
        if _CONTAINER_NAME.fullmatch(container) is None:
            raise ConfigError(
                f"invalid Azure container name {container!r}: expected 3-63 of a-z 0-9 -"
            )
        if not 1 <= page_size <= PAGE_BLOBS_MAX:
            raise ConfigError(f"Azure page_size {page_size}: expected 1..{PAGE_BLOBS_MAX}")
        if max_concurrency < 1 or max_attempts < 1:
            raise ConfigError("Azure max_concurrency and max_attempts must be >= 1")
        check_deadline_settings("Azure", deadline_base_s, transfer_bytes_per_s_min)
        self.container = container
        self.prefix = normalize_root_prefix(prefix)
        self.max_concurrency = max_concurrency
        self.max_single_put_size = max_single_put_size
        self.page_size = page_size
        self.deadline_base_s = deadline_base_s
        self.transfer_bytes_per_s_min = transfer_bytes_per_s_min
        retry = ExponentialRetry(
            initial_backoff=1, increment_base=2, retry_total=max_attempts - 1, random_jitter_range=1
        )
        try:
            self._client = ContainerClient.from_connection_string(
                connection_string,
                container,
                retry_policy=retry,
                connection_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_single_put_size=max_single_put_size,
                max_block_size=block_size,
                permit_redirects=False,  # a 3xx is an error, never a success from elsewhere
            )
        except (ValueError, TypeError, AttributeError) as exc:
            # The SDK's text may quote the string: name only what was wrong.
            raise ConfigError(
                "invalid Azure connection string: expected "
                "'AccountName=...;AccountKey=...' or a BlobEndpoint with a SAS"
            ) from exc
        self.account = self._client.account_name or "?"
        # A BlobEndpoint may carry user info (http://user:password@host/...): never shown.
        self.host = redact_host(self._client.primary_hostname or "?")

    def describe(self) -> str:
        return f"azure://{self.container}/{self.prefix} (account {self.account} at {self.host})"

    async def close(self) -> None:
        await self._client.close()

    # -- the store ---------------------------------------------------------

    async def put(self, key: str, data: Bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> str | None:
        check_conditions(if_absent, if_match)
        name = self.prefix + validate_key(key)
        blob = data if isinstance(data, bytes) else bytes(data)
        extra: dict[str, Any] = {}
        if if_match is not None:
            quoted = if_match if if_match.startswith('"') else f'"{if_match}"'
            extra = {"etag": quoted, "match_condition": MatchConditions.IfNotModified}
        single = len(blob) <= self.max_single_put_size  # one Put Blob, as the SDK decides
        async with self._within("put", key, len(blob)):
            if single:
                digest = await md5_digest(blob)
                extra["headers"] = {"Content-MD5": base64.b64encode(digest).decode("ascii")}
            else:
                extra["validate_content"] = True  # each Put Block sends its MD5, checked by the service
            try:
                # The blob client's upload (not the container's) answers with the new etag.
                reply = await self._client.get_blob_client(name).upload_blob(
                    blob, overwrite=not if_absent, max_concurrency=self.max_concurrency, **extra
                )
            except Exception as exc:
                raise self._error("put", key, exc, if_absent=if_absent, if_match=if_match) from exc
        if single:
            # Put Blob answers the MD5 of the blob it stored (Put Block List's is of the list).
            echoed = reply.get("content_md5")
            if echoed is None or bytes(echoed) != digest:
                shown = "none" if echoed is None else bytes(echoed).hex()
                raise StoreUnavailable(
                    f"{self.describe()}: put {show_key(key)}: the answer's Content-MD5 is {shown}, not the MD5"
                    f" of the bytes sent ({digest.hex()}): the store did not keep what was sent"
                )
        return (reply.get("etag") or "").strip('"') or None

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        name = self.prefix + validate_key(key)
        check_range(offset, length)
        check_max_bytes(max_bytes)
        if offset >= 0:
            return await self._read(key, name, offset, length, max_bytes, etag=None)
        for _ in range(SUFFIX_READ_ATTEMPTS_MAX):
            info = await self._properties("get", key)
            check_size(f"{self.describe()}: get {show_key(key)}", info.size, max_bytes)
            start = max(0, info.size + offset)
            try:
                return await self._read(key, name, start, None, max_bytes, etag=info.etag)
            except _Replaced:
                continue  # replaced between stat and read: read the new version
        raise StoreUnavailable(
            f"{self.describe()}: get {show_key(key)}: blob replaced during "
            f"{SUFFIX_READ_ATTEMPTS_MAX} suffix reads in a row"
        )

    async def _read(
        self, key: str, name: str, offset: int, length: int | None, max_bytes: int | None, *, etag: str | None
    ) -> bytes:
        where = f"{self.describe()}: get {show_key(key)}"
        if length == 0:
            info = await self._properties("get", key)  # NotFound if missing
            check_size(where, info.size, max_bytes)
            return b""
        extra: dict[str, Any] = {}
        if etag is not None:
            quoted = etag if etag.startswith('"') else f'"{etag}"'  # as the service sent it
            extra = {"etag": quoted, "match_condition": MatchConditions.IfNotModified}
        async with self._within("get", key) as limit:
            answers = _RangeCheck(where, offset, length, max_bytes, limit, self.transfer_bytes_per_s_min)
            try:
                downloader = await self._client.download_blob(
                    name, offset=offset, length=length, max_concurrency=self.max_concurrency,
                    raw_response_hook=answers, decompress=False, **extra
                )
                data = await downloader.readall()
            except ResourceModifiedError as exc:
                raise _Replaced from exc
            except HttpResponseError as exc:
                if exc.status_code == 416:
                    return _unsatisfiable(where, exc, offset, length, max_bytes)
                raise self._error("get", key, exc) from exc
            except CdpError:
                raise
            except Exception as exc:
                raise self._error("get", key, exc) from exc
        answers.check_total(data)
        return data

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        guard = ListingGuard(f"{self.describe()}: list {show_key(prefix)}", self.prefix, prefix,
                             start_after, skip_to_start_after=True)
        pages = self._client.list_blobs(
            name_starts_with=self.prefix + prefix, results_per_page=self.page_size
        ).by_page()
        while True:
            async with self._within("list", prefix):
                try:
                    items = [props async for props in await anext(pages)]  # a page: one request
                except StopAsyncIteration:
                    guard.done()
                    return
                except Exception as exc:
                    raise self._error("list", prefix, exc) from exc
            page = []  # the whole page is checked before any of it is yielded
            for props in items:
                key = guard.key(props.name)
                if key is not None:
                    page.append(_listed(guard.where, key, props))
            guard.page_done()
            for info in page:
                yield info
            token = pages.continuation_token  # type: ignore[attr-defined]
            if token is None:
                guard.done()
                return  # the last page (the SDK ends on an empty NextMarker)
            guard.next_page(token, len(items))

    async def delete(self, key: str) -> None:
        name = self.prefix + validate_key(key)
        async with self._within("delete", key):
            try:
                await self._client.delete_blob(name)
            except ResourceNotFoundError as exc:
                if getattr(exc, "error_code", None) == "ContainerNotFound":
                    raise self._error("delete", key, exc) from exc
                return  # no such blob: delete is idempotent
            except Exception as exc:
                raise self._error("delete", key, exc) from exc

    async def stat(self, key: str) -> ObjectInfo:
        return await self._properties("stat", validate_key(key))

    async def _properties(self, op: str, key: str) -> ObjectInfo:
        blob = self._client.get_blob_client(self.prefix + key)
        async with self._within(op, key):
            try:
                props = await blob.get_blob_properties()
            except Exception as exc:
                raise self._error(op, key, exc) from exc
        return ObjectInfo(
            key=key,
            size=int(props.size),
            mtime=props.last_modified.timestamp() if props.last_modified else None,
            etag=(props.etag or "").strip('"') or None,
        )

    async def server_time(self) -> float:
        """The service's clock from the Date header of Get Container Properties. Any
        HTTP answer has one, so a missing container still tells the time; one without
        a usable Date is an error (``server_date``), never None."""
        dates: list[str | None] = []

        def keep_date(response: Any) -> None:
            dates.append(response.http_response.headers.get("Date"))

        where = f"{self.describe()}: server_time"
        async with self._within("server_time", ""):
            try:
                await self._client.get_container_properties(raw_response_hook=keep_date)
            except Exception as exc:
                when = http_date_seconds(dates[-1]) if dates and isinstance(exc, HttpResponseError) else None
                if when is not None:
                    return when
                if dates and isinstance(exc, _UNREADABLE):
                    server_date(where, dates[-1])  # the SDK could not read the answer's Date: that error
                raise self._error("server_time", "", exc) from exc
        return server_date(where, dates[-1] if dates else None)

    async def ensure_container(self) -> None:
        """Create the container unless it exists (a SAS that may not create containers
        can still use an existing one)."""
        async with self._within("ensure_container", ""):
            try:
                await self._client.get_container_properties()
                return
            except ResourceNotFoundError:
                pass
            except Exception as exc:
                raise self._error("ensure_container", "", exc) from exc
        await self.create_container()

    async def create_container(self) -> None:
        """Create the container if it does not exist (for install and tests)."""
        async with self._within("create_container", ""):
            try:
                await self._client.create_container()
            except ResourceExistsError:
                return
            except Exception as exc:
                raise self._error("create_container", "", exc) from exc

    # -- deadlines and errors ---------------------------------------------

    def _within(self, op: str, key: str, size: int = 0) -> contextlib.AbstractAsyncContextManager[Any]:
        """The deadline of one call that moves `size` bytes: StoreTimeout past it."""
        seconds = deadline_s(self.deadline_base_s, self.transfer_bytes_per_s_min, size)
        return within(seconds, f"{self.describe()}: {op} {show_key(key)}")

    def _error(self, op: str, key: str, exc: Exception, *, if_absent: bool = False,
               if_match: str | None = None) -> StoreError:
        """Translate an SDK error of `op` on `key` into the store error tree.

        Built from the status and error code only: the SDK's text may quote a
        URL with a SAS token, and never reaches the caller.
        """
        where = f"{self.describe()}: {op} {show_key(key)}"
        if isinstance(exc, HttpResponseError):
            status = exc.status_code
            code = getattr(exc, "error_code", None) or ""
            code = str(getattr(code, "value", code))  # a StorageErrorCode enum or a str
            said = f"HTTP {status} {code}".rstrip()
            if status is not None and 300 <= status < 400:  # not followed (permit_redirects=False)
                return redirect_error(where, said, status, "the BlobEndpoint")
            if code == "ContainerNotFound":
                return NotFound(f"{where}: {said}: container {self.container!r} does not exist")
            if if_match is not None and (isinstance(exc, (ResourceModifiedError, ResourceNotFoundError))
                                         or status in (404, 409, 412)):
                return PreconditionFailed(f"{where}: {said}: if_match put lost: the object is not"
                                          f" the one with etag {if_match} (replaced or gone)")
            if isinstance(exc, ResourceNotFoundError) or status == 404:
                return NotFound(f"{where}: {said}: no such object")
            if isinstance(exc, ClientAuthenticationError) or status == 403:
                return PermissionDenied(f"{where}: {said}: credentials refused")
            if if_absent and (isinstance(exc, ResourceExistsError) or status in (409, 412)):
                return AlreadyExists(f"{where}: {said}: if_absent put lost, the object exists")
            if code in _TIMEOUT_CODES or status == 408:
                return StoreTimeout(f"{where}: {said}: the server timed out")
            if code in _BUSY_CODES or status == 429 or (status or 0) >= 500:
                return StoreUnavailable(f"{where}: {said}: server busy or failing")
            if status is None:
                # No status: the SDK could not read the answer (a body cut short, a broken
                # stream: IncompleteReadError, DecodeError). The transfer failed, not the
                # request: retried like an unreachable server.
                return StoreUnavailable(f"{where}: the answer could not be read ({type(exc).__name__})")
            return StoreError(f"{where}: {said}: unexpected error")
        if isinstance(exc, (ServiceRequestTimeoutError, ServiceResponseTimeoutError, TimeoutError)):
            return StoreTimeout(f"{where}: no answer in time ({type(exc).__name__})")
        unreachable = (ServiceRequestError, ServiceResponseError, aiohttp.ClientError, OSError)
        if isinstance(exc, unreachable):
            return StoreUnavailable(f"{where}: cannot reach the server ({type(exc).__name__})")
        if isinstance(exc, _UNREADABLE):
            # The SDK could not read a header of the answer (a Date whose year overflows):
            # the call may have been done, its answer is lost; retried as such.
            return StoreUnavailable(f"{where}: the answer could not be read ({type(exc).__name__})")
        return StoreError(f"{where}: unexpected error ({type(exc).__name__})")


class _Replaced(Exception):
    """The blob changed between the stat and the read of a suffix get."""


def _unsatisfiable(where: str, exc: HttpResponseError, offset: int, length: int | None,
                   max_bytes: int | None) -> bytes:
    """What a 416 ("range not satisfiable") to a read from ``offset`` answered: an empty
    read when its ``Content-Range: bytes */N`` names a blob of N bytes that ends at or
    before ``offset`` (an empty blob read whole: ``bytes */0``); StoreUnavailable
    (retryable) otherwise — a 416 that proves nothing, or one to a range inside the blob."""
    shown = exc.response.headers.get("Content-Range") if exc.response is not None else None
    found = _UNSATISFIED_RANGE.fullmatch(shown or "")
    if found is None:
        raise StoreUnavailable(f"{where}: got HTTP 416 (range not satisfiable) with Content-Range"
                               f" {show_key(shown)}, which names no blob size")
    return empty_past_end(where, int(found.group(1)), offset, length, max_bytes, "a range")


class _RangeCheck:
    """The SDK's ``raw_response_hook`` for one get: checks every answer to a ranged
    Get Blob (the first, and each further chunk of a large read) before its body is read.

    Each must be a 206 whose Content-Range is the range its request asked for (cut at
    the blob's end), of the same blob size as the first, whose Content-Length is that
    range's length — so at most that many bytes are read (aiohttp stops there) — and
    with no Content-Encoding but identity (the bytes are the blob's as they are read).
    A refusal is StoreUnavailable naming the ranges, raised through the SDK (not an
    AzureError, so neither the SDK's retries nor its downloader catch it); the connection
    is dropped. The first answer names the blob's size: more than ``max_bytes`` is
    TooLarge, raised the same way; else the get's deadline grows by the bytes it will move.
    """

    def __init__(self, where: str, offset: int, length: int | None, max_bytes: int | None, limit: Any,
                 bytes_per_s_min: float) -> None:
        self.where = where
        self.offset = offset
        self.length = length
        self.max_bytes = max_bytes
        self.limit = limit
        self.bytes_per_s_min = bytes_per_s_min
        self.total: int | None = None

    def __call__(self, pipeline_response: Any) -> None:
        request, answer = pipeline_response.http_request, pipeline_response.http_response
        asked = request.headers.get("x-ms-range") or request.headers.get("Range")
        if request.method != "GET" or not asked or not 200 <= answer.status_code < 300:
            return  # not a ranged read, or an error the SDK reports
        try:
            problem = self._problem(asked, answer)
        except CdpError:
            self._drop(answer)
            raise
        if problem is not None:
            self._drop(answer)
            raise StoreUnavailable(f"{self.where}: asked {asked}, {problem}")

    @staticmethod
    def _drop(answer: Any) -> None:
        with contextlib.suppress(Exception):
            answer.internal_response.close()  # its body is never read

    def _problem(self, asked: str, answer: Any) -> str | None:
        wanted = _RANGE_ASKED.fullmatch(asked)
        shown = answer.headers.get("Content-Range")
        found = _CONTENT_RANGE.fullmatch(shown or "")
        if wanted is None or answer.status_code != 206 or found is None:
            return f"got HTTP {answer.status_code} Content-Range {show_key(shown)}"
        coding = answer.headers.get("Content-Encoding")
        if coding and coding.strip().lower() != "identity":
            return f"got Content-Encoding {show_key(coding)}: the body is not the blob's bytes as stored"
        first, last, total = (int(group) for group in found.groups())
        start = int(wanted.group(1))
        end = total if not wanted.group(2) else min(int(wanted.group(2)) + 1, total)
        length = answer.headers.get("Content-Length")
        if (first, last + 1) != (start, end) or length != str(end - start):
            return (f"expected bytes [{start}, {end}) of {total}, got Content-Range bytes [{first}, {last + 1})"
                    f" with Content-Length {show_key(length)}")
        if self.total is None:
            check_size(self.where, total, self.max_bytes)
            self.total = total
            start, end = resolve_range(total, self.offset, self.length)  # the whole read
            self.limit.reschedule(self.limit.when() + transfer_s(end - start, self.bytes_per_s_min))
        elif total != self.total:
            return f"got a blob of {total} bytes where the first answer had {self.total}"
        return None

    def check_total(self, data: bytes) -> None:
        """After the read: exactly the bytes asked for, of the blob the answers described."""
        if self.total is None:
            if data:
                raise StoreUnavailable(f"{self.where}: {len(data)} bytes came without a ranged answer")
            return  # no ranged answer came, and nothing with it
        start, end = resolve_range(self.total, self.offset, self.length)
        if len(data) != end - start:
            raise StoreUnavailable(f"{self.where}: expected bytes [{start}, {end}) of {self.total},"
                                   f" got {len(data)} bytes")


def _listed(where: str, key: str, props: Any) -> ObjectInfo:
    """The ObjectInfo of one listed blob; StoreError if it has no usable size."""
    size = props.size
    if not isinstance(size, int) or size < 0:
        raise StoreError(f"{where}: the server listed {show_key(key)} with size {show_key(size)}: listing refused")
    return ObjectInfo(
        key=key,
        size=size,
        mtime=props.last_modified.timestamp() if props.last_modified else None,
        etag=(props.etag or "").strip('"') or None,
    )
