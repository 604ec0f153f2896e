"""S3Store: objects in an S3 bucket (or an S3-compatible server) via aioboto3.

Invariants and how S3 gives them:

- Atomic put: S3 makes an object visible only when a PutObject or a
  CompleteMultipartUpload succeeds. Objects larger than
  ``multipart_threshold`` go up in ``part_size`` parts, at most
  ``max_concurrency`` at a time; any failure or cancellation aborts the
  upload, so no part is ever visible under the key.
- ``if_absent``: ``IfNoneMatch="*"`` on PutObject / CompleteMultipartUpload,
  which S3 evaluates atomically; 412 PreconditionFailed (or 409
  ConditionalRequestConflict, a concurrent conditional write) is AlreadyExists.
- ``if_match``: ``IfMatch=etag`` on the same requests; 412, 409 or 404 (the
  object is gone) is PreconditionFailed.
- ``list``: ListObjectsV2, ``page_size`` keys a request, StartAfter on the
  first; S3 returns keys in UTF-8 byte order. ``ListingGuard`` refuses a name
  outside the asked prefix, not after StartAfter, out of order or repeated, and
  a continuation token that is missing or repeated.
- Keys are ``prefix + key``; callers only see keys relative to the prefix.

What the server answers is checked (``cdp.store.base``): every put sends
``Content-MD5`` (S3 refuses a body that does not match it) and a plain-MD5 ETag
in the answer must be the MD5 of what was sent (of each part, and the
``md5-of-part-md5s-N`` of a multipart upload) — a mismatch is StoreUnavailable,
and the caller's retry puts again; SSE-KMS and SSE-C ETags are not MD5s and are
not compared. A ranged get needs a 206 whose Content-Range is the range asked
for (a 200 only when the whole object is the answer), reads at most one byte
more than that, and must get exactly it; a 416 is an empty read only when the
object's size (the error's ``ActualObjectSize``, else a HEAD) puts the range past
its end, and never for a whole-object get, which asks no range. A get with
``max_bytes`` refuses an object the answer's headers say is larger before reading
its body. HTTP redirects are never followed (the aiohttp session is told so): a
3xx is an error, never a success from another host. Every call ends within its
deadline (``within``): StoreTimeout. An answer to HeadBucket without a usable
``Date`` makes ``server_time`` fail (StoreUnavailable), never answer None.

One aioboto3 session and one client are opened on first use and reused until
``close()``. Credentials go straight into the session: they are never stored
on this object, never in ``describe()``, and never in an error message, which
is built from the operation, key, HTTP status and S3 error code only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import botocore.exceptions as bce
from aiobotocore.config import AioConfig

from cdp.bounded_read import read_at_most
from cdp.errors import (
    CdpError,
    ConfigError,
    PermissionDenied,
    StoreError,
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
    resolve_range,
    server_date,
    transfer_s,
    within,
)
from cdp.store.keys import normalize_root_prefix, show_key, validate_key, validate_prefix
from cdp.store.open import redact_url
from cdp.store.s3_protocol import (
    NoRedirectSession, error_code, http_header, http_status, no_region_redirect, translate_error,
)

log = logging.getLogger(__name__)

#: S3 refuses parts smaller than this (except the last one).
PART_BYTES_MIN = 5 * MiB
#: S3 allows at most this many parts in one upload.
PARTS_MAX = 10_000
#: ListObjectsV2 returns at most this many keys a request.
PAGE_KEYS_MAX = 1000

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

#: An ETag that is the MD5 of the object (single PUT, no SSE-KMS / SSE-C) and one that is
#: the MD5 of the part MD5s, then "-" and the part count (multipart).
_PLAIN_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_MULTIPART_ETAG = re.compile(r"[0-9a-f]{32}-[0-9]+")
#: Server-side encryption whose ETags are not MD5s of the content.
_OPAQUE_ETAG_SSE = {"aws:kms", "aws:kms:dsse"}
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)")




class S3Store(StoreBase):
    """Objects under `prefix` in S3 bucket `bucket`."""

    kind = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        multipart_threshold: int = 16 * MiB,
        part_size: int = 16 * MiB,
        max_concurrency: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        page_size: int = PAGE_KEYS_MAX,
        deadline_base_s: float = DEADLINE_BASE_S,
        transfer_bytes_per_s_min: float = TRANSFER_BYTES_PER_S_MIN,
    ) -> None:
        if _BUCKET_NAME.fullmatch(bucket) is None:
            raise ConfigError(f"invalid S3 bucket name {bucket!r}: expected 3-63 of a-z 0-9 . -")
        if part_size < PART_BYTES_MIN:
            raise ConfigError(f"S3 part_size {part_size} is below the S3 minimum {PART_BYTES_MIN}")
        if multipart_threshold < part_size:
            raise ConfigError(
                f"S3 multipart_threshold {multipart_threshold} is below part_size {part_size}"
            )
        if not 1 <= page_size <= PAGE_KEYS_MAX:
            raise ConfigError(f"S3 page_size {page_size}: expected 1..{PAGE_KEYS_MAX}")
        if max_concurrency < 1 or max_attempts < 1:
            raise ConfigError("S3 max_concurrency and max_attempts must be >= 1")
        check_deadline_settings("S3", deadline_base_s, transfer_bytes_per_s_min)
        self.bucket = bucket
        self.prefix = normalize_root_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.region = region or "us-east-1"
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.page_size = page_size
        self.deadline_base_s = deadline_base_s
        self.transfer_bytes_per_s_min = transfer_bytes_per_s_min
        self._session = aioboto3.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            region_name=self.region,
        )
        self._config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max(10, 2 * max_concurrency),
            s3={"addressing_style": "path"} if endpoint_url else None,
            http_session_cls=NoRedirectSession,
            # Every PUT carries its Content-MD5 (hashed off the loop) and every object its
            # own checksums: botocore's default CRC32 of each body, on the event loop, was
            # a second hash of every byte sent.
            request_checksum_calculation="when_required",
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} at {redact_url(self.endpoint_url)}" if self.endpoint_url else where

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _s3(self) -> Any:
        """The shared client, opened on first use."""
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    client = self._session.client(
                        "s3", endpoint_url=self.endpoint_url, config=self._config
                    )
                    self._client = await stack.enter_async_context(client)
                    if self.endpoint_url:
                        self._client.meta.events.register("before-call.s3", no_region_redirect)
                    self._stack = stack
        return self._client

    # -- the store ---------------------------------------------------------

    async def put(self, key: str, data: Bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> str | None:
        check_conditions(if_absent, if_match)
        name = self.prefix + validate_key(key)
        view = memoryview(data).cast("B")
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        if if_match is not None:
            extra["IfMatch"] = if_match if if_match.startswith('"') else f'"{if_match}"'
        async with self._within("put", key, len(view)):
            try:
                s3 = await self._s3()
                if len(view) > self.multipart_threshold:
                    reply = await self._put_multipart(s3, key, name, view, extra)
                else:
                    digest = await md5_digest(view)
                    reply = await s3.put_object(Bucket=self.bucket, Key=name, Body=bytes(view),
                                                ContentMD5=_base64(digest), **extra)
                    self._check_etag(key, "put", reply, digest.hex())
            except StoreError:
                raise
            except Exception as exc:
                raise self._error("put", key, exc, if_absent=if_absent, if_match=if_match) from exc
        return reply.get("ETag", "").strip('"') or None

    async def _put_multipart(self, s3: Any, key: str, name: str, view: memoryview,
                             extra: dict[str, str]) -> dict[str, Any]:
        part_size = max(self.part_size, -(-len(view) // PARTS_MAX))
        created = await s3.create_multipart_upload(Bucket=self.bucket, Key=name)
        upload_id = created["UploadId"]
        try:
            slots = asyncio.Semaphore(self.max_concurrency)

            async def upload_part(number: int, start: int) -> tuple[dict[str, Any], bytes]:
                async with slots:
                    body = bytes(view[start : start + part_size])
                    digest = await md5_digest(body)
                    reply = await s3.upload_part(
                        Bucket=self.bucket, Key=name, UploadId=upload_id,
                        PartNumber=number, Body=body, ContentMD5=_base64(digest),
                    )
                    self._check_etag(key, f"part {number}", reply, digest.hex())
                    return {"PartNumber": number, "ETag": reply["ETag"]}, digest

            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(upload_part(number, start))
                        for number, start in enumerate(range(0, len(view), part_size), start=1)
                    ]
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0]  # the first part that failed says why
            parts = [task.result() for task in tasks]
            reply = await s3.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload_id,
                MultipartUpload={"Parts": [part for part, _ in parts]}, **extra,
            )
            # S3's multipart ETag: the MD5 of the parts' binary MD5s, "-", the part count.
            whole = hashlib.md5(b"".join(digest for _, digest in parts)).hexdigest()
            self._check_etag(key, "complete", reply, f"{whole}-{len(parts)}", _MULTIPART_ETAG)
            return reply
        except BaseException as exc:
            await self._abort(s3, name, upload_id, exc)
            raise

    def _check_etag(self, key: str, step: str, reply: dict[str, Any], expected: str,
                    form: re.Pattern[str] = _PLAIN_MD5_ETAG) -> None:
        """StoreUnavailable unless the ETag S3 answered is `expected` (the MD5 of what was
        sent) where it has that ETag's form; with SSE-KMS or SSE-C an ETag is no MD5."""
        if reply.get("ServerSideEncryption") in _OPAQUE_ETAG_SSE or reply.get("SSECustomerAlgorithm"):
            return
        etag = str(reply.get("ETag", "")).strip('"')
        if form.fullmatch(etag) and etag != expected:
            raise StoreUnavailable(
                f"{self.describe()}: put {show_key(key)}: {step} answered ETag {show_key(etag)}, not the MD5"
                f" of the bytes sent ({expected}): the store did not keep what was sent"
            )

    async def _abort(self, s3: Any, name: str, upload_id: str, cause: BaseException) -> None:
        """Abort a failed upload so its parts neither show nor cost (best effort, within
        the base deadline: it may run after the put's own deadline passed)."""
        try:
            async with asyncio.timeout(self.deadline_base_s):
                await s3.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except Exception as exc:  # the original error matters more
            log.warning(
                "%s: could not abort multipart upload of %r after %s: %s",
                self.describe(), name, type(cause).__name__, type(exc).__name__,
            )

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        name = self.prefix + validate_key(key)
        check_range(offset, length)
        check_max_bytes(max_bytes)
        if length == 0:
            info = await self._head("get", key)  # NotFound if missing; S3 cannot ask for 0 bytes
            check_size(f"{self.describe()}: get {show_key(key)}", info.size, max_bytes)
            return b""
        extra = {}
        if offset < 0:
            extra["Range"] = f"bytes={offset}"
        elif length is not None:
            extra["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset > 0:
            extra["Range"] = f"bytes={offset}-"
        unsatisfiable: bce.ClientError | None = None
        async with self._within("get", key) as limit:
            try:
                s3 = await self._s3()
                reply = await s3.get_object(Bucket=self.bucket, Key=name, **extra)
                stream = reply["Body"]
                async with stream:  # left unread (the connection dropped) when an answer is refused
                    span = self._answered_span(key, extra.get("Range"), offset, length, reply, max_bytes)
                    limit.reschedule(limit.when() + transfer_s(span, self.transfer_bytes_per_s_min))
                    data = await read_at_most(stream, span + 1)
            except bce.ClientError as exc:
                if http_status(exc) != 416:
                    raise self._error("get", key, exc) from exc
                unsatisfiable = exc
            except CdpError:
                raise
            except Exception as exc:
                raise self._error("get", key, exc) from exc
        if unsatisfiable is not None:
            return await self._unsatisfiable(key, extra.get("Range"), offset, length, unsatisfiable, max_bytes)
        if len(data) != span:
            raise StoreUnavailable(f"{self.describe()}: get {show_key(key)}: the answer announced {span} bytes"
                                   f" and {'held more' if len(data) > span else f'ended after {len(data)}'}")
        return data

    async def _unsatisfiable(self, key: str, asked: str | None, offset: int, length: int | None,
                             exc: bce.ClientError, max_bytes: int | None) -> bytes:
        """What a 416 ("range not satisfiable") answered: an empty read when the object's
        size — the one the error names (``ActualObjectSize``), else a HEAD's — puts the
        range past its end; StoreUnavailable (retryable) otherwise. A whole-object get
        asks no range: a 416 to it is never an empty object."""
        where = f"{self.describe()}: get {show_key(key)}"
        if asked is None:
            raise StoreUnavailable(f"{where}: asked the whole object, got HTTP 416 (range not satisfiable)")
        size = _actual_object_size(exc)
        if size is None:
            size = (await self._head("get", key)).size
        return empty_past_end(where, size, offset, length, max_bytes, asked)

    def _answered_span(self, key: str, asked: str | None, offset: int, length: int | None,
                       reply: dict[str, Any], max_bytes: int | None = None) -> int:
        """How many bytes the answer to a get must hold, once its status and headers say
        it is the range asked for; StoreUnavailable naming both ranges if not, TooLarge
        if the object they describe has more than ``max_bytes``.

        A 206 must name, in Content-Range, the range asked for (cut at the object's end).
        A 200 is the whole object: right for a whole-object get, and for a range only when
        that range is the whole object (an empty object, or one inside the range asked).
        """
        status = reply.get("ResponseMetadata", {}).get("HTTPStatusCode")
        size = reply.get("ContentLength")
        where = f"{self.describe()}: get {show_key(key)}"
        if not isinstance(size, int) or size < 0:
            raise StoreUnavailable(f"{where}: the answer (HTTP {status}) has no Content-Length")
        if status == 200:
            check_size(where, size, max_bytes)
            start, end = resolve_range(size, offset, length)
            if asked is None or (start, end) == (0, size):
                return size
            raise StoreUnavailable(f"{where}: asked {asked}, got HTTP 200 with the whole object"
                                   f" ({size} bytes) instead of bytes [{start}, {end})")
        found = _CONTENT_RANGE.fullmatch(str(reply.get("ContentRange", "")))
        if status != 206 or asked is None or found is None:
            raise StoreUnavailable(f"{where}: asked {asked or 'the whole object'}, got HTTP {status}"
                                   f" Content-Range {show_key(reply.get('ContentRange'))}")
        first, last, total = (int(group) for group in found.groups())
        check_size(where, total, max_bytes)
        start, end = resolve_range(total, offset, length)
        if (first, last + 1) != (start, end) or size != end - start:
            raise StoreUnavailable(f"{where}: asked {asked} of a {total}-byte object, expected bytes"
                                   f" [{start}, {end}), got Content-Range bytes [{first}, {last + 1})"
                                   f" with {size} bytes")
        return size

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        request: dict[str, Any] = {
            "Bucket": self.bucket, "Prefix": self.prefix + prefix, "MaxKeys": self.page_size,
        }
        if start_after is not None:
            request["StartAfter"] = self.prefix + start_after
        guard = ListingGuard(f"{self.describe()}: list {show_key(prefix)}", self.prefix, prefix,
                             start_after, skip_to_start_after=False)
        while True:
            async with self._within("list", prefix):
                try:
                    s3 = await self._s3()
                    reply = await s3.list_objects_v2(**request)
                except Exception as exc:
                    raise self._error("list", prefix, exc) from exc
            items = reply.get("Contents", ())
            page = []  # the whole page is checked before any of it is yielded
            for item in items:
                key = guard.key(item.get("Key"))
                if key is not None:
                    page.append(_listed(guard.where, key, item))
            guard.page_done()
            for info in page:
                yield info
            if not reply.get("IsTruncated"):
                guard.done()
                return
            guard.next_page(reply.get("NextContinuationToken"), len(items))
            request["ContinuationToken"] = guard.token
            request.pop("StartAfter", None)

    async def delete(self, key: str) -> None:
        name = self.prefix + validate_key(key)
        async with self._within("delete", key):
            try:
                s3 = await self._s3()
                await s3.delete_object(Bucket=self.bucket, Key=name)
            except Exception as exc:  # S3 answers 204 for a missing key: no NotFound case
                raise self._error("delete", key, exc) from exc

    async def stat(self, key: str) -> ObjectInfo:
        return await self._head("stat", validate_key(key))

    async def _head(self, op: str, key: str) -> ObjectInfo:
        async with self._within(op, key):
            try:
                s3 = await self._s3()
                reply = await s3.head_object(Bucket=self.bucket, Key=self.prefix + key)
            except Exception as exc:
                raise self._error(op, key, exc) from exc
        return ObjectInfo(
            key=key,
            size=int(reply["ContentLength"]),
            mtime=reply["LastModified"].timestamp() if "LastModified" in reply else None,
            etag=reply.get("ETag", "").strip('"') or None,
        )

    async def server_time(self) -> float:
        """The server's clock from the Date header of a HeadBucket. Any HTTP answer has
        one, so a missing bucket or refused credentials still tell the time; one without
        a usable Date is an error (``server_date``), never None."""
        async with self._within("server_time", ""):
            try:
                s3 = await self._s3()
                reply = await s3.head_bucket(Bucket=self.bucket)
            except bce.ClientError as exc:
                when = http_date_seconds(http_header(exc.response, "date"))
                if when is None:
                    raise self._error("server_time", "", exc) from exc
                return when
            except Exception as exc:
                raise self._error("server_time", "", exc) from exc
        return server_date(f"{self.describe()}: server_time", http_header(reply, "date"))

    async def ensure_container(self) -> None:
        """Create the bucket unless HeadBucket finds it (a credential that may not
        create buckets can still use an existing one)."""
        async with self._within("ensure_container", ""):
            try:
                s3 = await self._s3()
                await s3.head_bucket(Bucket=self.bucket)
                return
            except bce.ClientError as exc:
                if http_status(exc) != 404:
                    raise self._bucket_error("ensure_container", exc) from exc
            except Exception as exc:
                raise self._error("ensure_container", "", exc) from exc
        await self.create_bucket()

    def _bucket_error(self, op: str, exc: bce.ClientError) -> StoreError:
        # HeadBucket answers without a body: a bare 403 is about the bucket, not a key.
        if http_status(exc) == 403:
            return PermissionDenied(f"{self.describe()}: {op}: HTTP 403: access to bucket "
                                    f"{self.bucket!r} refused")
        return self._error(op, "", exc)

    async def create_bucket(self) -> None:
        """Create the bucket if it does not exist (for install and tests)."""
        extra = {}
        if self.region != "us-east-1":
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        async with self._within("create_bucket", ""):
            try:
                s3 = await self._s3()
                await s3.create_bucket(Bucket=self.bucket, **extra)
            except bce.ClientError as exc:
                if error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                raise self._error("create_bucket", "", exc) from exc
            except Exception as exc:
                raise self._error("create_bucket", "", exc) from exc

    # -- deadlines and errors ---------------------------------------------

    def _deadline_s(self, size: int) -> float:
        return deadline_s(self.deadline_base_s, self.transfer_bytes_per_s_min, size)

    def _within(self, op: str, key: str, size: int = 0) -> contextlib.AbstractAsyncContextManager[Any]:
        """The deadline of one call that moves `size` bytes: StoreTimeout past it."""
        return within(self._deadline_s(size), f"{self.describe()}: {op} {show_key(key)}")

    def _error(self, op: str, key: str, exc: Exception, *, if_absent: bool = False,
               if_match: str | None = None) -> StoreError:
        """An SDK error of ``op`` on ``key`` as a store error (``s3_protocol.translate_error``)."""
        return translate_error(f"{self.describe()}: {op} {show_key(key)}", self.bucket, exc,
                               if_absent=if_absent, if_match=if_match)

def _actual_object_size(exc: bce.ClientError) -> int | None:
    """The object size S3 names in an InvalidRange error (``ActualObjectSize``), if any."""
    value = exc.response.get("Error", {}).get("ActualObjectSize")
    return int(value) if isinstance(value, str) and value.isdigit() and value.isascii() else None


def _base64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _listed(where: str, key: str, item: dict[str, Any]) -> ObjectInfo:
    """The ObjectInfo of one ListObjectsV2 entry; StoreError if it has no usable size."""
    size = item.get("Size")
    if not isinstance(size, int) or size < 0:
        raise StoreError(f"{where}: the server listed {show_key(key)} with size {show_key(size)}: listing refused")
    modified = item.get("LastModified")
    return ObjectInfo(
        key=key,
        size=size,
        mtime=modified.timestamp() if modified is not None else None,
        etag=str(item.get("ETag", "")).strip('"') or None,
    )
