"""How the S3 backend talks to its server: no redirect followed, and the server's
errors translated into the store's error tree (``cdp.errors``), from the status and
code only — an SDK's text may quote a URL, and never reaches the caller."""

from __future__ import annotations

from typing import Any

import aiohttp
import botocore.exceptions as bce
from aiobotocore.httpsession import AIOHTTPSession

from cdp.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from cdp.store.base import redirect_error

_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchBucket"}
_DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "403",
}
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
_THROTTLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequestsException", "ServiceUnavailable", "InternalError", "503", "500",
}
_TIMEOUT_CODES = {"RequestTimeout", "RequestTimeoutException"}
#: The body did not arrive as sent (S3 checked it against Content-MD5): send it again.
_DIGEST_CODES = {"BadDigest", "InvalidDigest"}


class _NoRedirects:
    """An aiohttp ClientSession whose requests never follow a redirect."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    def request(self, method: str, **options: Any) -> Any:
        return self._session.request(method, allow_redirects=False, **options)


class NoRedirectSession(AIOHTTPSession):
    """aiobotocore's HTTP session with redirects off, as botocore's own urllib3 session
    has them (``Retry(False)``): aiohttp follows 301/302/303/307/308 by default, which
    sent a PUT's body to whatever host the answer named and took its 200 as the store's.
    botocore still sees the 3xx (its S3 region redirector may re-sign for another region,
    against the same configured endpoint) and it becomes an error here."""

    async def _get_session(self, proxy_url: str | None) -> Any:
        return _NoRedirects(await super()._get_session(proxy_url))


assert hasattr(AIOHTTPSession, "_get_session"), "aiobotocore changed: see NoRedirectSession"


def no_region_redirect(context: dict[str, Any], **_: Any) -> None:
    """With a configured endpoint, no redirect at all: mark each call as redirected already,
    so that botocore's S3 region redirector leaves a 3xx alone (it would re-send the call
    for another region, and against a server that always redirects, ask HeadBucket for the
    region, be redirected, ask again... until RecursionError)."""
    redirect = context.get("s3_redirect")
    if isinstance(redirect, dict):
        redirect["redirected"] = True


def translate_error(where: str, bucket: str, exc: Exception, *, if_absent: bool = False,
                    if_match: str | None = None) -> StoreError:
    """An SDK error of a call (``where``: the store, the operation, the key) in the store
    error tree; its message built from the status and code only (module docstring)."""
    if isinstance(exc, bce.ClientError):
        code, status = error_code(exc), http_status(exc)
        said = f"HTTP {status}" if code == str(status) else f"HTTP {status} {code}"
        if status is not None and 300 <= status < 400:  # not followed (NoRedirectSession)
            return redirect_error(where, said, status, "the endpoint and region")
        if code == "NoSuchBucket":
            return NotFound(f"{where}: {said}: bucket {bucket!r} does not exist")
        if if_match is not None and (code in _CONFLICT_CODES or code in _NOT_FOUND_CODES
                                     or status in (404, 409, 412)):
            return PreconditionFailed(f"{where}: {said}: if_match put lost: the object is not"
                                      f" the one with etag {if_match} (replaced or gone)")
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(f"{where}: {said}: no such object")
        if code in _DENIED_CODES or status == 403:
            return PermissionDenied(f"{where}: {said}: credentials refused")
        if if_absent and (code in _CONFLICT_CODES or status == 412):
            return AlreadyExists(f"{where}: {said}: if_absent put lost, the object exists")
        if code in _TIMEOUT_CODES:
            return StoreTimeout(f"{where}: {said}: the server timed out")
        if code in _DIGEST_CODES:
            return StoreUnavailable(f"{where}: {said}: the body arrived changed (Content-MD5)")
        if code in _THROTTLE_CODES or (status or 0) >= 500 or status == 429:
            return StoreUnavailable(f"{where}: {said}: server busy or failing")
        return StoreError(f"{where}: {said}: unexpected error")
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return PermissionDenied(f"{where}: no usable credentials configured")
    if isinstance(exc, (bce.ConnectTimeoutError, bce.ReadTimeoutError, TimeoutError)):
        return StoreTimeout(f"{where}: no answer in time ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return StoreTimeout(f"{where}: no answer in time ({type(exc).__name__})")
    unreachable = (bce.ConnectionError, bce.HTTPClientError, aiohttp.ClientError, OSError)
    if isinstance(exc, unreachable):
        return StoreUnavailable(f"{where}: cannot reach the server ({type(exc).__name__})")
    return StoreError(f"{where}: unexpected error ({type(exc).__name__})")


def error_code(exc: bce.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_header(response: dict[str, Any], name: str) -> str | None:
    """An HTTP header of a botocore response (botocore lower-cases the names)."""
    return response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(name)


def http_status(exc: bce.ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None
