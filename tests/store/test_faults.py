"""Failures: FaultyStore's plan, S3/Azure outages, error translation, no secret leaks."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import botocore.exceptions as bce
import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseTimeoutError,
)

from cdp.errors import (
    AlreadyExists,
    InvalidKey,
    NotFound,
    PermissionDenied,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from cdp.store import FaultyStore, MemoryStore
from tests.conftest import make_azure_store, make_s3_store, unique_name
from tests.services import AZURITE_KEY, MotoServer, connection_string, free_port
from tests.waiting import EVENTUALLY_S, wait_until

# An injected delay: long enough that an in-memory call without it is far quicker, even
# on a slow machine (the check below is an upper bound, so the margin must be wide).
DELAY_S = 0.3
# A caller's timeout on a call that hangs for ever: any bound proves the same.
CALLER_TIMEOUT_S = 0.05
# Calls to a store that is down fail at once (connection refused); a hang would last
# the SDK's retries and timeouts, minutes.
UNAVAILABLE_WITHIN_S = 5.0

# -- FaultyStore ----------------------------------------------------------


@pytest.fixture
def faulty() -> FaultyStore:
    return FaultyStore(MemoryStore("inner"), seed=7)


async def test_fail_next_fails_exactly_n_calls(faulty: FaultyStore) -> None:
    faulty.fail_next("put", 2)
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="injected"):
            await faulty.put("k", b"1")
    with pytest.raises(NotFound):  # the failed puts did not reach the inner store
        await faulty.inner.get("k")
    await faulty.put("k", b"1")
    assert faulty.calls["put"] == 3
    assert await faulty.inner.get("k") == b"1"


async def test_fail_next_with_an_error_type(faulty: FaultyStore) -> None:
    faulty.fail_next("get", 1, PermissionDenied)
    await faulty.put("k", b"1")
    with pytest.raises(PermissionDenied):
        await faulty.get("k")
    assert await faulty.get("k") == b"1"


async def test_fail_after_the_call_is_a_lost_reply(faulty: FaultyStore) -> None:
    faulty.fail_next("put", 1, after=True)
    with pytest.raises(StoreUnavailable, match="after the call"):
        await faulty.put("k", b"landed")
    assert await faulty.get("k") == b"landed"


async def test_every_operation_can_fail(faulty: FaultyStore) -> None:
    await faulty.put("k", b"1")
    faulty.fail_next("*", 1, StoreTimeout)
    calls = [
        faulty.put("k", b"2"), faulty.get("k"), faulty.stat("k"), faulty.delete("k"),
        _drain(faulty.list()),
    ]
    for call in calls:
        with pytest.raises(StoreTimeout):
            await call
    assert dict(faulty.calls) == {"put": 2, "get": 1, "stat": 1, "delete": 1, "list": 1}
    assert await faulty.get("k") == b"1"


async def _drain(listing: Any) -> list[Any]:
    return [info async for info in listing]


async def test_delay(faulty: FaultyStore) -> None:
    faulty.set_delay("stat", DELAY_S)
    await faulty.put("k", b"1")
    started = time.monotonic()
    await faulty.stat("k")
    assert time.monotonic() - started >= DELAY_S
    faulty.set_delay("stat", 0)
    started = time.monotonic()
    await faulty.stat("k")
    assert time.monotonic() - started < DELAY_S


async def test_hang_until_the_callers_timeout(faulty: FaultyStore) -> None:
    faulty.hang("get")
    await faulty.put("k", b"1")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(CALLER_TIMEOUT_S):
            await faulty.get("k")
    waiting = asyncio.create_task(faulty.get("k"))
    await wait_until(lambda: faulty.calls["get"] == 2, EVENTUALLY_S, "the second get to start")
    assert not waiting.done()  # it hangs until released
    faulty.release("get")
    assert await waiting == b"1"
    assert await faulty.get("k") == b"1"


def failure_pattern(store: FaultyStore, op: str, n: int) -> list[bool]:
    async def run() -> list[bool]:
        pattern = []
        for i in range(n):
            try:
                await store.put(f"k{i}", b"") if op == "put" else await store.stat("k0")
                pattern.append(False)
            except StoreUnavailable:
                pattern.append(True)
        return pattern

    return asyncio.run(run())


def test_error_rate_is_deterministic_with_a_seed() -> None:
    def make() -> FaultyStore:
        store = FaultyStore(MemoryStore())
        store.set_error_rate("put", 0.3, seed=42)
        return store

    first, second = failure_pattern(make(), "put", 200), failure_pattern(make(), "put", 200)
    assert first == second
    assert 30 <= sum(first) <= 90  # about 60 of 200
    other = FaultyStore(MemoryStore())
    other.set_error_rate("put", 0.3, seed=43)
    assert failure_pattern(other, "put", 200) != first


def test_error_rate_bounds() -> None:
    never = FaultyStore(MemoryStore())
    never.set_error_rate("put", 0.0, seed=1)
    assert not any(failure_pattern(never, "put", 50))
    always = FaultyStore(MemoryStore())
    always.set_error_rate("put", 1.0, seed=1)
    assert all(failure_pattern(always, "put", 50))


async def test_an_error_rate_can_lose_replies_of_matching_keys_only() -> None:
    inner = MemoryStore()
    store = FaultyStore(inner)
    store.set_error_rate("put", 1.0, seed=1, after=True, match="/cat/")
    await store.put("d/1/seg/a", b"x")  # not matched: no fault
    with pytest.raises(StoreUnavailable, match="after the call"):
        await store.put("d/1/cat/b", b"y")
    assert await inner.get("d/1/cat/b") == b"y"  # the put landed: only its reply was lost


async def test_offline_and_online(faulty: FaultyStore) -> None:
    await faulty.put("k", b"1")
    faulty.offline()
    for call in (faulty.get("k"), faulty.put("k", b"2"), faulty.stat("k"), faulty.delete("k")):
        with pytest.raises(StoreUnavailable, match="offline"):
            await call
    with pytest.raises(StoreUnavailable):
        await _drain(faulty.list())
    with pytest.raises(InvalidKey):  # keys are checked first, even offline
        await faulty.get("../etc/passwd")
    faulty.online()
    assert await faulty.get("k") == b"1"


async def test_clear_removes_every_fault(faulty: FaultyStore) -> None:
    faulty.offline()
    faulty.fail_next("put", 3)
    faulty.set_error_rate("get", 1.0)
    faulty.set_delay("stat", 10)
    faulty.clear()
    await faulty.put("k", b"1")
    assert await faulty.get("k") == b"1"
    await faulty.stat("k")


def test_unknown_operation_is_refused(faulty: FaultyStore) -> None:
    with pytest.raises(ValueError, match="unknown store operation"):
        faulty.fail_next("putt")


# -- S3 outages against a real (local) server ---------------------------------

SECRET = "SECRET-d41d8cd98f00b204e9800998ecf8427e"


def assert_no_secret(exc: BaseException, store: Any, caplog: pytest.LogCaptureFixture) -> None:
    for text in (str(exc), repr(exc), repr(store), store.describe()):
        assert SECRET not in text, text
    for record in caplog.records:
        assert SECRET not in record.getMessage(), record.getMessage()


async def test_s3_outage_is_unavailable_not_a_hang(
    private_moto: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = make_s3_store(
        private_moto.endpoint, unique_name(), secret_key=SECRET, max_attempts=1,
        connect_timeout=1.0, read_timeout=2.0,
    )
    async with store:
        await store.create_bucket()
        await store.put("k", b"before")
        private_moto.stop()
        started = time.monotonic()
        for call in (store.get("k"), store.put("k", b"x"), store.stat("k"), store.delete("k"),
                     _drain(store.list())):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            assert caught.value.retryable
            assert_no_secret(caught.value, store, caplog)
        assert time.monotonic() - started < UNAVAILABLE_WITHIN_S
        private_moto.start()  # same port; moto's state is gone
        await store.create_bucket()
        await store.put("k", b"after")
        assert await store.get("k") == b"after"


async def test_s3_not_found_message_has_no_secret(
    moto_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with make_s3_store(moto_server, unique_name(), secret_key=SECRET) as store:
        await store.create_bucket()
        with pytest.raises(NotFound) as caught:
            await store.get("missing")
        assert "missing" in str(caught.value) and "404" in str(caught.value)
        assert_no_secret(caught.value, store, caplog)


async def test_s3_missing_bucket_is_not_found(moto_server: str) -> None:
    async with make_s3_store(moto_server, unique_name()) as store:
        with pytest.raises(NotFound, match="bucket"):
            await store.put("k", b"1")


async def test_s3_unreachable_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = f"http://127.0.0.1:{free_port()}"
    async with make_s3_store(endpoint, "bucket", secret_key=SECRET, max_attempts=1) as store:
        with pytest.raises(StoreUnavailable) as caught:
            await store.get("k")
        assert_no_secret(caught.value, store, caplog)
        with pytest.raises(InvalidKey):  # refused before any I/O
            await store.get("a//b")


class _RaisingClient:
    """Stands in for the aiobotocore client: every call raises `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Any:
        async def call(**_: Any) -> Any:
            raise self.error

        return call


def client_error(code: str, status: int) -> bce.ClientError:
    reply = {
        "Error": {"Code": code, "Message": f"echo of the request {SECRET}"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return bce.ClientError(reply, "GetObject")  # type: ignore[arg-type]


S3_ERRORS = [
    (client_error("NoSuchKey", 404), NotFound),
    (client_error("404", 404), NotFound),
    (client_error("AccessDenied", 403), PermissionDenied),
    (client_error("InvalidAccessKeyId", 403), PermissionDenied),
    (client_error("SignatureDoesNotMatch", 403), PermissionDenied),
    (client_error("ExpiredToken", 400), PermissionDenied),
    (client_error("SlowDown", 503), StoreUnavailable),
    (client_error("InternalError", 500), StoreUnavailable),
    (client_error("RequestTimeout", 400), StoreTimeout),
    (client_error("InvalidArgument", 400), StoreError),
    (bce.EndpointConnectionError(endpoint_url="http://h/" + SECRET), StoreUnavailable),
    (bce.ConnectTimeoutError(endpoint_url="http://h/" + SECRET), StoreTimeout),
    (bce.ReadTimeoutError(endpoint_url="http://h/" + SECRET), StoreTimeout),
    (bce.NoCredentialsError(), PermissionDenied),
    (asyncio.TimeoutError(), StoreTimeout),
    (aiohttp.ServerDisconnectedError(), StoreUnavailable),
    (ConnectionResetError(), StoreUnavailable),
]


def error_id(value: Any) -> str:
    return type(value).__name__ if isinstance(value, BaseException) else value.__name__


@pytest.mark.parametrize("error, expected", S3_ERRORS, ids=error_id)
async def test_s3_error_translation(error: BaseException, expected: type[StoreError]) -> None:
    store = make_s3_store("http://127.0.0.1:9", "bucket", secret_key=SECRET)
    store._client = _RaisingClient(error)  # no network: the translation alone
    with pytest.raises(StoreError) as caught:
        await store.get("some/key")
    assert type(caught.value) is expected
    assert caught.value.__cause__ is error
    assert "some/key" in str(caught.value)
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)


@pytest.mark.parametrize(
    "error", [client_error("PreconditionFailed", 412), client_error("ConditionalRequestConflict", 409)]
)
async def test_s3_conditional_put_conflict_is_already_exists(error: BaseException) -> None:
    store = make_s3_store("http://127.0.0.1:9", "bucket")
    store._client = _RaisingClient(error)
    with pytest.raises(AlreadyExists):
        await store.put("cat/1", b"x", if_absent=True)
    with pytest.raises(StoreError) as caught:  # without if_absent it is no conflict of ours
        await store.put("cat/1", b"x")
    assert not isinstance(caught.value, AlreadyExists)


# -- Azure ----------------------------------------------------------------------


#: A well-formed connection string that nothing uses (no request is sent).
OFFLINE_AZURE = connection_string(9, AZURITE_KEY)


def http_error(cls: type[HttpResponseError], status: int, code: str) -> HttpResponseError:
    error = cls(message=f"echo {SECRET}")
    error.status_code = status
    error.error_code = code
    return error


AZURE_ERRORS = [
    (http_error(ResourceNotFoundError, 404, "BlobNotFound"), NotFound),
    (http_error(ResourceNotFoundError, 404, "ContainerNotFound"), NotFound),
    (http_error(ClientAuthenticationError, 403, "AuthenticationFailed"), PermissionDenied),
    (http_error(HttpResponseError, 403, "AuthorizationPermissionMismatch"), PermissionDenied),
    (http_error(HttpResponseError, 503, "ServerBusy"), StoreUnavailable),
    (http_error(HttpResponseError, 500, "InternalError"), StoreUnavailable),
    (http_error(HttpResponseError, 500, "OperationTimedOut"), StoreTimeout),
    (http_error(HttpResponseError, 400, "InvalidHeaderValue"), StoreError),
    (ServiceRequestError(f"cannot connect {SECRET}"), StoreUnavailable),
    (ServiceResponseTimeoutError(f"timeout {SECRET}"), StoreTimeout),
    (asyncio.TimeoutError(), StoreTimeout),
]


@pytest.mark.parametrize("error, expected", AZURE_ERRORS, ids=error_id)
async def test_azure_error_translation(error: Exception, expected: type[StoreError]) -> None:
    store = make_azure_store(OFFLINE_AZURE, "container")
    translated = store._error("get", "some/key", error)
    assert type(translated) is expected
    assert "some/key" in str(translated)
    assert SECRET not in str(translated)
    await store.close()


def test_azure_conditional_put_conflict_is_already_exists() -> None:
    store = make_azure_store(OFFLINE_AZURE, "container")
    for error in (http_error(ResourceExistsError, 409, "BlobAlreadyExists"),
                  http_error(HttpResponseError, 412, "ConditionNotMet")):
        assert isinstance(store._error("put", "k", error, if_absent=True), AlreadyExists)
        assert not isinstance(store._error("put", "k", error), AlreadyExists)


def wrong_key_connection_string(port: int) -> str:
    import base64

    return connection_string(port, base64.b64encode(SECRET.encode()).decode())


async def test_azure_wrong_account_key_is_permission_denied(
    azurite_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    conn = wrong_key_connection_string(azurite_service.port)
    encoded_key = conn.split("AccountKey=")[1].split(";")[0]
    async with make_azure_store(conn, unique_name()) as store:
        with pytest.raises(PermissionDenied) as caught:
            await store.put("k", b"x")
    for text in (str(caught.value), repr(caught.value), repr(store)):
        assert encoded_key not in text and SECRET not in text and "AccountKey" not in text
    for record in caplog.records:
        assert encoded_key not in record.getMessage()


async def test_azure_unreachable_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    conn = wrong_key_connection_string(free_port())
    encoded_key = conn.split("AccountKey=")[1].split(";")[0]
    started = time.monotonic()
    async with make_azure_store(conn, "container", max_attempts=1, connect_timeout=1.0) as store:
        for call in (store.get("k"), store.put("k", b"x"), store.stat("k"), _drain(store.list())):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            assert encoded_key not in str(caught.value)
        with pytest.raises(InvalidKey):
            await store.put("/abs", b"x")
    assert time.monotonic() - started < UNAVAILABLE_WITHIN_S
    for record in caplog.records:
        assert encoded_key not in record.getMessage()
