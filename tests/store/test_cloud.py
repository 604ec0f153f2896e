"""S3 and Azure specifics against the local servers: multipart abort, suffix reads, prefixes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_asyncio

from cdp.errors import ConfigError, NotFound, StoreUnavailable
from cdp.store import ObjectInfo
from tests.conftest import TEST_PART_BYTES, make_azure_store, make_s3_store, unique_name
from tests.services import AZURITE_KEY, connection_string

BIG = bytes(range(256)) * (3 * TEST_PART_BYTES // 256)  # 3 parts


@pytest_asyncio.fixture(loop_scope="function")
async def s3(moto_server: str) -> Any:
    async with make_s3_store(moto_server, unique_name()) as store:
        await store.create_bucket()
        yield store


async def open_uploads(store: Any) -> list[Any]:
    client = await store._s3()
    reply = await client.list_multipart_uploads(Bucket=store.bucket)
    return list(reply.get("Uploads", []))


async def test_s3_failed_part_aborts_the_upload(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await s3._s3()
    real = client.upload_part

    async def upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            raise ConnectionResetError("injected")
        return await real(**kwargs)

    monkeypatch.setattr(client, "upload_part", upload_part)
    with pytest.raises(StoreUnavailable):
        await s3.put("seg", BIG)
    with pytest.raises(NotFound):
        await s3.stat("seg")
    assert await open_uploads(s3) == []


async def test_s3_cancelled_upload_is_aborted(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await s3._s3()
    real = client.upload_part
    part_two_started = asyncio.Event()

    async def upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            part_two_started.set()
            await asyncio.Event().wait()  # hang until cancelled
        return await real(**kwargs)

    monkeypatch.setattr(client, "upload_part", upload_part)
    task = asyncio.create_task(s3.put("seg", BIG))
    await part_two_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(NotFound):
        await s3.stat("seg")
    assert await open_uploads(s3) == []


async def test_s3_prefix_is_transparent(moto_server: str) -> None:
    bucket = unique_name()
    async with make_s3_store(moto_server, bucket, prefix="") as root, \
            make_s3_store(moto_server, bucket, prefix="/tenant/a/") as scoped:
        await root.create_bucket()
        await scoped.put("x/1", b"1")
        await root.put("tenant/b/x/2", b"2")
        assert [i.key async for i in root.list()] == ["tenant/a/x/1", "tenant/b/x/2"]
        assert [i.key async for i in scoped.list()] == ["x/1"]
        assert (await scoped.stat("x/1")).key == "x/1"
        assert await root.get("tenant/a/x/1") == b"1"


@pytest.mark.parametrize(
    "options",
    [dict(part_size=1024), dict(multipart_threshold=5 * 2**20, part_size=6 * 2**20), dict(page_size=0)],
)
def test_s3_bad_settings_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_s3_store("http://127.0.0.1:9", "bucket", **options)


@pytest.mark.parametrize("bucket", ["", "ab", "Upper", "has_underscore", "x" * 64])
def test_s3_bad_bucket_names(bucket: str) -> None:
    with pytest.raises(ConfigError, match="bucket"):
        make_s3_store("http://127.0.0.1:9", bucket)


async def test_azure_suffix_read_retries_when_the_blob_changes(
    azurite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_azure_store(azurite, unique_name()) as store:
        await store.create_container()
        await store.put("k", b"0123456789")
        real_properties = store._properties
        stats = 0

        async def stale_properties(op: str, key: str) -> ObjectInfo:
            nonlocal stats
            stats += 1
            info = await real_properties(op, key)
            if stats == 1:  # as if the blob was replaced right after this stat
                return ObjectInfo(info.key, 3, info.mtime, "0x8DEADBEEF000000")
            return info

        monkeypatch.setattr(store, "_properties", stale_properties)
        assert await store.get("k", -4) == b"6789"
        assert stats == 2


async def test_azure_missing_container_is_not_found(azurite: str) -> None:
    async with make_azure_store(azurite, unique_name()) as store:
        with pytest.raises(NotFound, match="container"):
            await store.put("k", b"1")
        with pytest.raises(NotFound, match="container"):
            await store.delete("k")


@pytest.mark.parametrize("container", ["", "ab", "Upper", "a--b", "-ab", "x" * 64])
def test_azure_bad_container_names(container: str) -> None:
    with pytest.raises(ConfigError, match="container"):
        make_azure_store(connection_string(9, AZURITE_KEY), container)


def test_azure_bad_connection_string_is_a_config_error() -> None:
    secret = "AccountKey=SECRETSECRET"
    with pytest.raises(ConfigError) as caught:
        make_azure_store(f"nonsense;{secret}", "container")
    assert "SECRETSECRET" not in str(caught.value)


def test_azure_an_answer_cut_short_is_unavailable_not_unexpected() -> None:
    """The SDK raises a status-less HttpResponseError when a download's body is cut
    (the store-faults campaign's truncated GETs): a transfer failure, retried as such."""
    from azure.core.exceptions import DecodeError, IncompleteReadError

    store = make_azure_store(connection_string(9, AZURITE_KEY), "container")
    for exc in (IncompleteReadError("cut short"), DecodeError("unreadable")):
        err = store._error("get", "s/0001.seg", exc)
        assert type(err) is StoreUnavailable and "s/0001.seg" in str(err) and type(exc).__name__ in str(err), err
