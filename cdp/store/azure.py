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
- Suffix ranges need the size: ``get`` stats the blob, then reads the range
  with ``If-Match`` on the etag it saw, and retries if the blob was replaced
  in between, so the bytes always come from one version.
- Keys are ``prefix + key``; callers only see keys relative to the prefix.

The connection string (which holds the account key or a SAS) goes straight
into the SDK client; ``describe()`` and error messages name only the account,
host, container, key, HTTP status and Azure error code.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
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
    ConfigError,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from cdp.store.base import MiB, Bytes, ObjectInfo, StoreBase, check_conditions, check_range, http_date_seconds
from cdp.store.keys import normalize_root_prefix, show_key, validate_key, validate_prefix

#: List Blobs returns at most this many blobs a request.
PAGE_BLOBS_MAX = 5000
#: Attempts at a suffix read while the blob keeps being replaced under it.
SUFFIX_READ_ATTEMPTS_MAX = 3

_CONTAINER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_TIMEOUT_CODES = {"OperationTimedOut"}
_BUSY_CODES = {"ServerBusy", "InternalError"}


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
    ) -> None:
        if _CONTAINER_NAME.fullmatch(container) is None:
            raise ConfigError(
                f"invalid Azure container name {container!r}: expected 3-63 of a-z 0-9 -"
            )
        if not 1 <= page_size <= PAGE_BLOBS_MAX:
            raise ConfigError(f"Azure page_size {page_size}: expected 1..{PAGE_BLOBS_MAX}")
        if max_concurrency < 1 or max_attempts < 1:
            raise ConfigError("Azure max_concurrency and max_attempts must be >= 1")
        self.container = container
        self.prefix = normalize_root_prefix(prefix)
        self.max_concurrency = max_concurrency
        self.page_size = page_size
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
            )
        except (ValueError, TypeError, AttributeError) as exc:
            # The SDK's text may quote the string: name only what was wrong.
            raise ConfigError(
                "invalid Azure connection string: expected "
                "'AccountName=...;AccountKey=...' or a BlobEndpoint with a SAS"
            ) from exc
        self.account = self._client.account_name or "?"
        self.host = self._client.primary_hostname

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
        try:
            # The blob client's upload (not the container's) answers with the new etag.
            reply = await self._client.get_blob_client(name).upload_blob(
                blob, overwrite=not if_absent, max_concurrency=self.max_concurrency, **extra
            )
        except Exception as exc:
            raise self._error("put", key, exc, if_absent=if_absent, if_match=if_match) from exc
        return (reply.get("etag") or "").strip('"') or None

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        name = self.prefix + validate_key(key)
        check_range(offset, length)
        if offset >= 0:
            return await self._read(key, name, offset, length, etag=None)
        for _ in range(SUFFIX_READ_ATTEMPTS_MAX):
            info = await self._properties("get", key)
            start = max(0, info.size + offset)
            try:
                return await self._read(key, name, start, None, etag=info.etag)
            except _Replaced:
                continue  # replaced between stat and read: read the new version
        raise StoreUnavailable(
            f"{self.describe()}: get {show_key(key)}: blob replaced during "
            f"{SUFFIX_READ_ATTEMPTS_MAX} suffix reads in a row"
        )

    async def _read(
        self, key: str, name: str, offset: int, length: int | None, *, etag: str | None
    ) -> bytes:
        if length == 0:
            await self._properties("get", key)  # NotFound if missing
            return b""
        extra: dict[str, Any] = {}
        if etag is not None:
            quoted = etag if etag.startswith('"') else f'"{etag}"'  # as the service sent it
            extra = {"etag": quoted, "match_condition": MatchConditions.IfNotModified}
        try:
            downloader = await self._client.download_blob(
                name, offset=offset, length=length, max_concurrency=self.max_concurrency, **extra
            )
            return await downloader.readall()
        except ResourceModifiedError as exc:
            raise _Replaced from exc
        except HttpResponseError as exc:
            if exc.status_code == 416:
                return b""  # the blob exists; the range starts at or after its end
            raise self._error("get", key, exc) from exc
        except Exception as exc:
            raise self._error("get", key, exc) from exc

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        cut = len(self.prefix)
        after = None if start_after is None else self.prefix + start_after
        blobs = self._client.list_blobs(
            name_starts_with=self.prefix + prefix, results_per_page=self.page_size
        )
        try:
            async for props in blobs:
                if after is not None and props.name <= after:
                    continue
                yield ObjectInfo(
                    key=props.name[cut:],
                    size=int(props.size),
                    mtime=props.last_modified.timestamp() if props.last_modified else None,
                    etag=(props.etag or "").strip('"') or None,
                )
        except Exception as exc:
            raise self._error("list", prefix, exc) from exc

    async def delete(self, key: str) -> None:
        name = self.prefix + validate_key(key)
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

    async def server_time(self) -> float | None:
        """The service's clock from the Date header of Get Container Properties. Any
        HTTP answer has one, so a missing container still tells the time."""
        dates: list[str | None] = []

        def keep_date(response: Any) -> None:
            dates.append(response.http_response.headers.get("Date"))

        try:
            await self._client.get_container_properties(raw_response_hook=keep_date)
        except Exception as exc:
            when = http_date_seconds(dates[-1]) if dates and isinstance(exc, HttpResponseError) else None
            if when is None:
                raise self._error("server_time", "", exc) from exc
            return when
        return http_date_seconds(dates[-1]) if dates else None

    async def ensure_container(self) -> None:
        """Create the container unless it exists (a SAS that may not create containers
        can still use an existing one)."""
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
        try:
            await self._client.create_container()
        except ResourceExistsError:
            return
        except Exception as exc:
            raise self._error("create_container", "", exc) from exc

    # -- errors ------------------------------------------------------------

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
        return StoreError(f"{where}: unexpected error ({type(exc).__name__})")


class _Replaced(Exception):
    """The blob changed between the stat and the read of a suffix get."""
