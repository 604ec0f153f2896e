"""open_store(url): backend selection, environment, refused URLs, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp.errors import ConfigError
from cdp.store import FileStore, MemoryStore, open_store, redact_url
from cdp.store.open import check_store_url
from tests.services import AZURITE_KEY, connection_string


def test_file_urls_and_plain_paths(tmp_path: Path) -> None:
    for url in (f"file://{tmp_path}/s", f"file://localhost{tmp_path}/s", str(tmp_path / "s")):
        store = open_store(url)
        assert isinstance(store, FileStore)
        assert store.root == tmp_path / "s"
    relative = open_store("some/dir")
    assert isinstance(relative, FileStore) and relative.root == Path.cwd() / "some/dir"


def test_mem_urls_share_instances_by_name() -> None:
    first = open_store("mem://shared-test")
    assert isinstance(first, MemoryStore)
    assert open_store("mem://shared-test") is first
    assert open_store("mem://other-test") is not first
    assert open_store("mem://") is not open_store("mem://")


async def test_s3_url(moto_server: str) -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET-S3-KEY"}
    store = open_store(f"s3://bucket-one/tenant/x?endpoint={moto_server}&region=eu-west-1", env=env)
    async with store:
        assert store.bucket == "bucket-one"  # type: ignore[attr-defined]
        assert store.prefix == "tenant/x/"  # type: ignore[attr-defined]
        assert store.region == "eu-west-1"  # type: ignore[attr-defined]
        assert moto_server in store.describe()
        assert "SECRET-S3-KEY" not in store.describe() + repr(store)
        await store.create_bucket()  # type: ignore[attr-defined]
        await store.put("k", b"v")
        assert await store.get("k") == b"v"


def test_s3_endpoint_and_region_from_env() -> None:
    env = {"CDP_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "ap-south-1"}
    store = open_store("s3://bucket-two", env=env)
    assert store.endpoint_url == "http://127.0.0.1:9"  # type: ignore[attr-defined]
    assert store.region == "ap-south-1"  # type: ignore[attr-defined]
    assert store.prefix == ""  # type: ignore[attr-defined]


async def test_azure_url(azurite: str) -> None:
    store = open_store("azure://cont-one/pre", env={"AZURE_STORAGE_CONNECTION_STRING": azurite})
    async with store:
        assert store.describe().startswith("azure://cont-one/pre/")
        assert AZURITE_KEY not in store.describe() + repr(store)
        await store.create_container()  # type: ignore[attr-defined]
        await store.put("k", b"v")
        assert await store.get("k") == b"v"


def test_azure_cdp_variable_wins() -> None:
    env = {
        "AZURE_STORAGE_CONNECTION_STRING": "garbage",
        "CDP_AZURE_CONNECTION_STRING": connection_string(9, AZURITE_KEY),
    }
    assert open_store("azure://cont-two", env=env).describe().startswith("azure://cont-two/")


SECRET = "hunter2-SECRET"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("", "empty store URL"),
        ("ftp://host/x", "unknown scheme"),
        ("file://otherhost/x", "expected file:///absolute/path"),
        ("s3://", "no bucket"),
        ("s3://Bad_Bucket/x", "invalid S3 bucket name"),
        ("s3://bucket/a/../b", "store prefix"),
        (f"s3://AKID:{SECRET}@bucket/x", "credentials in the URL"),
        (f"s3://bucket/x?secret_key={SECRET}", "unknown query parameter"),
        (f"s3://bucket/x?endpoint=http://u:{SECRET}@h&region=r&token={SECRET}", "credentials in the URL"),
        ("azure://", "no container"),
        ("azure://cont-x?endpoint=x", "no query parameters"),
        ("azure://cont-x", "no connection string"),
    ],
)
def test_bad_urls_are_config_errors_without_secrets(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        open_store(url, env={})
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)
    if url:
        assert "store URL" in str(caught.value)


#: What the form of a URL shows (``check_store_url``); the rest needs the backend.
FORM_ERRORS = {"", "ftp://host/x", "file://otherhost/x", "s3://", f"s3://AKID:{SECRET}@bucket/x",
               f"s3://bucket/x?secret_key={SECRET}", "azure://", "azure://cont-x?endpoint=x"}


@pytest.mark.parametrize("url", sorted(FORM_ERRORS))
def test_check_store_url_refuses_by_form_as_open_store_does(url: str) -> None:
    with pytest.raises(ConfigError) as opening:
        open_store(url, env={})
    with pytest.raises(ConfigError) as checking:
        check_store_url(url)
    assert checking.value.message == opening.value.message and SECRET not in checking.value.message


def test_check_store_url_needs_no_credentials() -> None:
    for url in ("azure://cont-x/p", "s3://bucket/p?region=r", "file:///srv/store", "relative/dir", "mem://x"):
        check_store_url(url)  # no Azure connection string in the environment: open_store would refuse


def test_redact_url() -> None:
    assert redact_url(f"s3://k:{SECRET}@b/p?endpoint=http://x:1&sig={SECRET}#frag") == (
        "s3://***@b/p?endpoint=http://x:1&sig=***#***"
    )
    assert redact_url("/plain/path") == "/plain/path"
