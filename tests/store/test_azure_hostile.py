"""AzureBlobStore against answers it must check rather than trust: a proxy in front of the
real Azurite changes them (``tests/store/hostile.py``), or a fake stands in for it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from cdp.errors import StoreError, StoreTimeout, StoreUnavailable
from cdp.ports import free_port
from cdp.store.azure import AzureBlobStore
from tests.conftest import make_azure_store, unique_name
from tests.services import AZURITE_ACCOUNT, AZURITE_KEY, Azurite, connection_string
from tests.store.hostile import Answer, AzuriteProxy, FakeHttp, StallingServer, gather_listing
from tests.waiting import EVENTUALLY_S

OBJECT = bytes(range(256)) * 4
MiB = 1024 * 1024


@pytest_asyncio.fixture(loop_scope="function")
async def proxy(azurite_service: Azurite) -> AsyncIterator[AzuriteProxy]:
    async with AzuriteProxy(f"http://127.0.0.1:{azurite_service.port}") as running:
        yield running


@pytest_asyncio.fixture(loop_scope="function")
async def store(proxy: AzuriteProxy) -> AsyncIterator[Any]:
    """A store through the proxy, one attempt: a refused answer is not asked again."""
    async with make_azure_store(connection_string(proxy.port, AZURITE_KEY), unique_name(),
                                max_attempts=1) as made:
        await made.create_container()
        yield made


def is_listing(request: web.Request) -> bool:
    return request.method == "GET" and request.query.get("comp") == "list"


# -- 1, 2. listings ---------------------------------------------------------------------


def blob_xml(name: str, size: int = 3) -> str:
    return (f"<Blob><Name>{name}</Name><Properties><Last-Modified>Mon, 01 Jan 2024 00:00:00 GMT"
            f"</Last-Modified><Etag>0x8D1</Etag><Content-Length>{size}</Content-Length>"
            f"<BlobType>BlockBlob</BlobType></Properties></Blob>")


@pytest.mark.parametrize(("extra", "rule"), [
    ("p/q/d/00000002/seg/b", "outside the asked prefix"),
    ("zz/evil", "outside the asked prefix"),
    ("p/q/d/00000001/seg/a", "listed twice"),
])
async def test_azure_a_listing_that_breaks_the_protocol_is_refused_before_any_delete(
    proxy: AzuriteProxy, store: Any, extra: str, rule: str
) -> None:
    await store.put("d/00000001/seg/a", b"one")
    await store.put("d/00000002/seg/b", b"two")

    async def edit(request: web.Request, body: bytes, answer: Answer | None) -> Answer | None:
        if answer is not None and is_listing(request):
            answer.body = answer.body.replace(b"</Blobs>", blob_xml(extra).encode() + b"</Blobs>")
        return answer

    proxy.edit = edit
    with pytest.raises(StoreError, match=rule) as caught:
        async for info in store.list("d/00000001/"):  # what a purge of domain 1 does
            await store.delete(info.key)
    assert repr(extra) in str(caught.value)
    proxy.edit = None
    assert [i.key async for i in store.list()] == ["d/00000001/seg/a", "d/00000002/seg/b"]


async def test_azure_the_same_marker_again_ends_the_listing(proxy: AzuriteProxy, store: Any) -> None:
    await store.put("k0", b"x")
    asked = 0

    async def edit(request: web.Request, body: bytes, answer: Answer | None) -> Answer | None:
        nonlocal asked
        if answer is not None and is_listing(request):
            asked += 1
            text = re.sub(r"<Blobs>.*</Blobs>|<Blobs\s*/>", "<Blobs />", answer.body.decode(), flags=re.S)
            text = re.sub(r"<NextMarker\s*/>|<NextMarker>.*?</NextMarker>", "", text)
            answer.body = text.replace("</EnumerationResults>",
                                       "<NextMarker>SAME</NextMarker></EnumerationResults>").encode()
        return answer

    proxy.edit = edit
    got, failed = await gather_listing(store)
    assert got == [] and isinstance(failed, StoreError) and "twice" in str(failed), failed
    assert asked == 2


# -- 3. redirects -----------------------------------------------------------------------


async def elsewhere_ok(request: web.Request, body: bytes) -> web.StreamResponse:
    return web.Response(status=201, body=b"OTHER", headers={
        "ETag": '"0x8DEVIL"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT",
        "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()})


@pytest.mark.parametrize(("method", "status"), [("PUT", 307), ("PUT", 308), ("GET", 302)])
async def test_azure_a_redirect_is_not_followed(proxy: AzuriteProxy, store: Any, method: str, status: int) -> None:
    async with FakeHttp(elsewhere_ok, host="localhost") as other:
        async def edit(request: web.Request, body: bytes, answer: Answer | None) -> Answer | None:
            if answer is None and request.method == method and request.path.endswith("/seg"):
                return Answer(status, {"Location": other.url + request.path_qs}, b"")
            return answer

        proxy.edit = edit
        with pytest.raises(StoreError, match=f"HTTP {status}.*not followed"):
            if method == "PUT":
                await store.put("seg", b"segment bytes", if_absent=True)
            else:
                await store.get("seg")
        assert other.seen == []


# -- 4. deadlines -----------------------------------------------------------------------

# The deadline of the slow calls: long enough for a request to reach the server on a busy
# machine, short enough to keep the test quick. It bounds the call, nothing waits on it.
DEADLINE_S = 2.0
SLOW_HEAD = b'HTTP/1.1 201 Created\r\nContent-Length: 0\r\nETag: "'  # and never the rest


def stalled_store(port: int, **options: Any) -> AzureBlobStore:
    return make_azure_store(connection_string(port, AZURITE_KEY), "cont", max_attempts=1,
                            read_timeout=600.0, **options)


@pytest.mark.parametrize("call", ["put", "get"])
async def test_azure_a_slow_loris_answer_ends_at_the_calls_deadline(call: str) -> None:
    # The read timeout (600 s) never fires: only the deadline (base + bytes / rate) ends it.
    async with StallingServer(SLOW_HEAD) as server, stalled_store(server.port, deadline_base_s=DEADLINE_S) as store:
        async with asyncio.timeout(EVENTUALLY_S):  # bounds a hang of the code under test
            with pytest.raises(StoreTimeout, match=f"{call} 'seg'.*deadline"):
                if call == "put":
                    await store.put("seg", b"x" * 100)
                else:
                    await store.get("seg")
        assert server.received.is_set()


async def test_azure_a_cancelled_call_is_cancelled_not_timed_out() -> None:
    async with StallingServer(SLOW_HEAD) as server, stalled_store(server.port, deadline_base_s=600.0) as store:
        task = asyncio.create_task(store.put("seg", b"x" * 100))
        async with asyncio.timeout(EVENTUALLY_S):
            await server.received.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- 5. ranged reads --------------------------------------------------------------------


def range_edit(kind: str) -> Any:
    async def edit(request: web.Request, body: bytes, answer: Answer | None) -> Answer | None:
        if answer is None or request.method != "GET" or answer.status != 206:
            return answer
        if kind == "whole200":
            answer.headers.pop("Content-Range", None)
            return Answer(200, answer.headers, OBJECT)
        if kind == "short206":
            answer.body = answer.body[: len(answer.body) // 2]
        elif kind == "shifted206":  # another range, and it says so
            size = len(answer.body)
            answer.headers["Content-Range"] = f"bytes 0-{size - 1}/{len(OBJECT)}"
            answer.body = OBJECT[:size]
        return answer
    return edit


@pytest.mark.parametrize("kind", ["whole200", "short206", "shifted206"])
async def test_azure_a_ranged_get_answered_with_other_bytes_fails(
    proxy: AzuriteProxy, store: Any, kind: str
) -> None:
    await store.put("obj", OBJECT)
    proxy.edit = range_edit(kind)
    with pytest.raises(StoreUnavailable, match=r"get 'obj': asked bytes=100-199"):
        await store.get("obj", 100, 100)


async def test_azure_reads_in_many_ranges_are_each_checked_and_whole(azurite: str) -> None:
    data = bytes(range(251)) * (7 * MiB // 2 // 251)
    async with make_azure_store(azurite, unique_name()) as store:
        await store.create_container()
        config = store._client._config
        config.max_single_get_size = config.max_chunk_get_size = 1 * MiB  # 4 ranged GETs
        await store.put("big", data)
        assert await store.get("big") == data
        assert await store.get("big", MiB - 3, 2 * MiB) == data[MiB - 3 : 3 * MiB - 3]
        assert await store.get("big", -5) == data[-5:]


# -- 6. no password of a BlobEndpoint is shown ------------------------------------------


async def test_azure_user_info_of_the_blob_endpoint_is_never_shown() -> None:
    secret = "TOPSECRETPW"
    endpoint = f"http://admin:{secret}@127.0.0.1:{free_port()}/{AZURITE_ACCOUNT}"
    async with AzureBlobStore("cont", "p", connection_string=f"BlobEndpoint={endpoint};SharedAccessSignature=sv=1&sig=S",
                              max_attempts=1, connect_timeout=2.0) as store:
        with pytest.raises(StoreUnavailable) as caught:
            await store.get("k")
        shown = " ".join([store.describe(), repr(store), str(caught.value)])
    assert secret not in shown and "admin" not in shown
    assert "***@127.0.0.1" in store.describe()


# -- 7. a put's answer must show the bytes were kept ------------------------------------


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


@pytest.mark.parametrize("answered", ["other", "none"])
async def test_azure_a_put_answered_with_another_md5_fails(proxy: AzuriteProxy, store: Any, answered: str) -> None:
    sent: list[dict[str, str]] = []

    async def edit(request: web.Request, body: bytes, answer: Answer | None) -> Answer | None:
        if answer is not None and request.method == "PUT" and request.path.endswith("/seg"):
            sent.append(dict(request.headers))
            answer.headers.pop("Content-MD5", None)
            if answered == "other":
                answer.headers["Content-MD5"] = md5_b64(b"something else")
        return answer

    proxy.edit = edit
    with pytest.raises(StoreUnavailable, match="put 'seg': the answer's Content-MD5 is"):
        await store.put("seg", b"hello world")
    assert sent[0]["Content-MD5"] == md5_b64(b"hello world")


async def test_azure_a_put_in_blocks_sends_each_blocks_md5(proxy: AzuriteProxy, store: Any) -> None:
    blocks: list[tuple[str, bytes]] = []

    async def edit(request: web.Request, body: bytes, answer: Answer | None) -> Answer | None:
        if answer is None and request.query.get("comp") == "block":
            blocks.append((request.headers.get("Content-MD5", ""), body))
        return answer

    proxy.edit = edit
    data = bytes(range(256)) * (5 * MiB // 2 // 256)  # blocks of 1 MiB (TEST_AZURE_BLOCK_BYTES)
    await store.put("seg", data)
    assert len(blocks) == 3 and all(md5 == md5_b64(body) for md5, body in blocks)
    proxy.edit = None
    assert await store.get("seg") == data
