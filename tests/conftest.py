"""Shared fixtures.

Object stores: the session-wide local S3 (moto) and Azure (Azurite) servers,
and ``store``, one fresh empty store per test over every backend. A service
that cannot start fails the tests that need it (never a skip).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from tests import lanes
from tests.services import Azurite, MotoServer, ServiceError

#: The backends of the `store` fixture; "faulty" is FaultyStore(MemoryStore) with no fault;
#: "encrypted" is EncryptedStore(MemoryStore) (FORMAT.md §19) with a test key.
STORE_BACKENDS = ("memory", "file", "s3", "azure", "faulty", "encrypted")
MiB = 1024 * 1024
#: Small settings so tests reach multipart uploads and several list pages cheaply.
TEST_PAGE_SIZE = 7
TEST_PART_BYTES = 5 * MiB  # the S3 minimum
TEST_AZURE_BLOCK_BYTES = 1 * MiB


def unique_name(kind: str = "t") -> str:
    """A fresh bucket / container name (valid for S3 and Azure)."""
    return f"{kind}-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_basetemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Temporary files made outside ``tmp_path`` (``tempfile`` in tests and in the code
    they run, and in the commands they start: ``TMPDIR``) go under this session's
    ``--basetemp``, which pytest removes after a passing session: left in /tmp, every
    run of the suite left ~50 directories there (consolidation scratch of killed
    ``cdp consolidate`` runs among them)."""
    path = tmp_path_factory.mktemp("tmp", numbered=False)
    before = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    yield
    tempfile.tempdir = before[0]
    if before[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[1]


def _start(service: Any) -> None:
    try:
        service.start()
    except ServiceError as exc:
        pytest.fail(f"test service unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def moto_service() -> Iterator[MotoServer]:
    """The session's moto S3 server; do not stop it (use `private_moto`)."""
    server = MotoServer()
    _start(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server(moto_service: MotoServer) -> str:
    """Endpoint URL of the session's moto S3 server."""
    return moto_service.endpoint


@pytest.fixture
def private_moto() -> Iterator[MotoServer]:
    """A moto server of this test's own, free to stop() and restart()."""
    server = MotoServer()
    _start(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite_service() -> Iterator[Azurite]:
    server = Azurite()
    _start(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(azurite_service: Azurite) -> str:
    """Connection string of the session's Azurite blob server."""
    return azurite_service.connection_string


def make_s3_store(endpoint: str, bucket: str, prefix: str = "p/q", **options: Any) -> Any:
    from cdp.store.s3 import S3Store

    settings: dict[str, Any] = dict(
        endpoint_url=endpoint,
        region="us-east-1",
        access_key="test-access-key",
        secret_key="test-secret-key",
        multipart_threshold=TEST_PART_BYTES,
        part_size=TEST_PART_BYTES,
        page_size=TEST_PAGE_SIZE,
        connect_timeout=2.0,
        read_timeout=10.0,
        max_attempts=2,
    )
    settings.update(options)
    return S3Store(bucket, prefix, **settings)


def make_azure_store(
    connection_string: str, container: str, prefix: str = "p/q", **options: Any
) -> Any:
    from cdp.store.azure import AzureBlobStore

    settings: dict[str, Any] = dict(
        connection_string=connection_string,
        max_single_put_size=TEST_AZURE_BLOCK_BYTES,
        block_size=TEST_AZURE_BLOCK_BYTES,
        page_size=TEST_PAGE_SIZE,
        connect_timeout=2.0,
        read_timeout=10.0,
        max_attempts=2,
    )
    settings.update(options)
    return AzureBlobStore(container, prefix, **settings)


@pytest_asyncio.fixture(params=STORE_BACKENDS, loop_scope="function")
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    """A fresh, empty store of each backend (unique bucket/container/prefix)."""
    from cdp.store import FaultyStore, FileStore, MemoryStore

    kind = request.param
    if kind == "memory":
        made: Any = MemoryStore("test", page_size=TEST_PAGE_SIZE)
    elif kind == "file":
        made = FileStore(tmp_path / "store")
    elif kind == "faulty":
        made = FaultyStore(MemoryStore("test", page_size=TEST_PAGE_SIZE))
    elif kind == "encrypted":
        from cdp.store.crypt import EncryptedStore
        from cdp.store.storekeys import StoreKey, StoreKeyring

        made = EncryptedStore(MemoryStore("test", page_size=TEST_PAGE_SIZE),
                              StoreKeyring([StoreKey(bytes(range(32)))], "a test key"))
    elif kind == "s3":
        made = make_s3_store(request.getfixturevalue("moto_server"), unique_name())
    elif kind == "azure":
        made = make_azure_store(request.getfixturevalue("azurite"), unique_name())
    else:
        raise AssertionError(kind)
    try:
        if kind == "s3":
            await made.create_bucket()
        elif kind == "azure":
            await made.create_container()
        yield made
    finally:
        await made.close()


SOAK_TEST = "tests/drva/test_catalog_soak.py::test_lost_catalog_replies_never_fence_and_loads_stay_flat"


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: a lane runs only what was selected
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[Any]) -> None:
    """Wall clock with a core mostly idle runs beside the rest, each in a process of its
    own started now and checked last: the two-site tests (``tests/lanes.py``) and the
    catalog soak (``tests/drva/soak_run.py``), which stays the very last."""
    lanes.split(config, items)
    soak = [item for item in items if item.nodeid == SOAK_TEST]
    if not soak or config.option.collectonly or os.environ.get(lanes.LANE_ENV):
        return
    from tests.drva.test_catalog_soak import start_soak

    items[:] = [item for item in items if item.nodeid != SOAK_TEST] + soak
    start_soak(config)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    lanes.report_phase(report)  # only in a lane's process


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.drva.test_catalog_soak import SOAK_KEY

    lanes.finish(config)
    soak = config.stash.get(SOAK_KEY, None)
    if soak is not None:
        soak.remove()  # a session that ended before the soak's test (-x, ^C)
