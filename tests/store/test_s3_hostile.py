"""S3Store against servers that do not follow the protocol: listings, redirects, slow
answers, ranged reads and put answers it must check rather than trust.

Each server is an in-test fake (``tests/store/hostile.py``) on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from typing import Any

import pytest
from aiohttp import web

from cdp.catalog import find_domain
from cdp.errors import StoreError, StoreTimeout, StoreUnavailable
from tests.conftest import TEST_PART_BYTES, make_s3_store
from tests.store.hostile import FakeHttp, Seen, StallingServer, gather_listing, s3_listing
from tests.waiting import EVENTUALLY_S

OBJECT = bytes(range(256)) * 4  # 1024 bytes, each offset tells where it came from


def s3(url: str, **options: Any) -> Any:
    """A store on the fake at url: one attempt, so a refused answer is not asked again."""
    return make_s3_store(url, "bkt", prefix="p/q", max_attempts=1, **options)


def lists(seen: list[Seen]) -> list[Seen]:
    return [request for request in seen if request.method == "GET" and "list-type=2" in request.path_qs]


def listing_of(keys: list[str]) -> Any:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method == "DELETE":
            return web.Response(status=204)
        return s3_listing(keys)
    return answer


# -- 1. listings are checked, not trusted ---------------------------------------------


@pytest.mark.parametrize(
    ("listed", "rule"),
    [
        (["p/q/d/00000001/seg/a", "p/q/d/00000002/seg/b"], "outside the asked prefix"),
        (["p/q/d/00000001/seg/a", "zz/evil"], "outside the asked prefix"),  # was yielded as 'vil'
        (["p/q/d/00000001/seg/b", "p/q/d/00000001/seg/a"], "out of order"),
        (["p/q/d/00000001/seg/a", "p/q/d/00000001/seg/a"], "listed twice"),
    ],
    ids=["other-domain", "other-root", "unsorted", "duplicate"],
)
async def test_s3_a_listing_that_breaks_the_protocol_is_refused_before_any_delete(
    listed: list[str], rule: str
) -> None:
    async with FakeHttp(listing_of(listed)) as fake, s3(fake.url) as store:
        with pytest.raises(StoreError, match=rule) as caught:
            async for info in store.list("d/00000001/"):  # what a purge of domain 1 does
                await store.delete(info.key)
        assert repr(listed[-1]) in str(caught.value)
        assert [r for r in fake.seen if r.method == "DELETE"] == []


async def test_s3_names_that_are_not_keys_are_never_yielded() -> None:
    listed = ["p/q/d/00000001/", "p/q/d/00000001/seg/../../../etc/passwd", "p/q/d/00000001/seg/a\x00b",
              "p/q/d/00000001/seg/ok"]
    async with FakeHttp(listing_of(listed)) as fake, s3(fake.url) as store:
        keys, failed = await gather_listing(store, "d/00000001/")
    assert (keys, failed) == (["d/00000001/seg/ok"], None)


async def test_s3_a_server_that_ignores_start_after_is_refused() -> None:
    listed = ["p/q/d/00000001/seg/x", "p/q/d/00000002/seg/y"]  # whatever StartAfter says
    async with FakeHttp(listing_of(listed)) as fake, s3(fake.url) as store:
        keys, failed = await gather_listing(store, "d/", start_after="d/00000001/~")
        assert keys == []
        assert isinstance(failed, StoreError) and "start_after" in str(failed)
        assert repr("p/q/d/00000001/seg/x") in str(failed)
        asked = len(lists(fake.seen))
        with pytest.raises(StoreError):  # it walked this listing for ever
            await find_domain(store, "nosuch")
        assert len(lists(fake.seen)) - asked <= 2


# -- 2. pagination ends ------------------------------------------------------------------


@pytest.mark.parametrize("keys", [[], ["p/q/a"]], ids=["empty-pages", "same-page"])
async def test_s3_the_same_continuation_token_again_ends_the_listing(keys: list[str]) -> None:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return s3_listing(keys, truncated=True, token="SAME")

    async with FakeHttp(answer) as fake, s3(fake.url) as store:
        got, failed = await gather_listing(store)
    assert got == [key[4:] for key in keys]  # each once
    assert isinstance(failed, StoreError) and re.search("twice|listed twice", str(failed)), failed
    assert len(lists(fake.seen)) == 2


async def test_s3_a_truncated_listing_without_a_token_is_a_store_error() -> None:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return s3_listing(["p/q/a"], truncated=True)

    async with FakeHttp(answer) as fake, s3(fake.url) as store:
        got, failed = await gather_listing(store)
    assert got == ["a"]
    assert isinstance(failed, StoreError) and "no continuation token" in str(failed), failed


async def test_s3_empty_pages_with_new_tokens_do_not_page_for_ever() -> None:
    from cdp.store.base import LIST_EMPTY_PAGES_MAX

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return s3_listing([], truncated=True, token=f"t{len(fake.seen)}")

    async with FakeHttp(answer) as fake, s3(fake.url) as store:
        got, failed = await gather_listing(store)
    assert got == [] and isinstance(failed, StoreError) and "listed nothing" in str(failed), failed
    assert len(lists(fake.seen)) == LIST_EMPTY_PAGES_MAX + 1


# -- 3. redirects are not followed ------------------------------------------------------


def redirect_to(other: FakeHttp, status: int) -> Any:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": other.url + request.path_qs})
    return answer


async def elsewhere_ok(request: web.Request, body: bytes) -> web.StreamResponse:
    return web.Response(status=200, body=b"OTHER-BYTES",
                        headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})


@pytest.mark.parametrize("status", [301, 307, 308])
async def test_s3_a_redirected_put_fails_and_sends_nothing_elsewhere(status: int) -> None:
    async with FakeHttp(elsewhere_ok, host="localhost") as other, \
            FakeHttp(redirect_to(other, status)) as origin, s3(origin.url) as store:
        with pytest.raises(StoreError, match=f"HTTP {status}"):
            await store.put("d/00000001/seg/x", b"segment bytes", if_absent=True)
        assert other.seen == []


@pytest.mark.parametrize("status", [302, 307])
async def test_s3_a_redirected_get_fails_and_reads_nothing_elsewhere(status: int) -> None:
    async with FakeHttp(elsewhere_ok, host="localhost") as other, \
            FakeHttp(redirect_to(other, status)) as origin, s3(origin.url) as store:
        with pytest.raises(StoreUnavailable, match=f"HTTP {status}.*not followed"):
            await store.get("obj")
        assert other.seen == []


# -- 4. every call ends by its deadline -------------------------------------------------

# The deadline of the slow calls: long enough for a request to reach the server on a busy
# machine, short enough to keep the test quick. It bounds the call, nothing waits on it.
DEADLINE_S = 2.0
SLOW_HEAD = b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: "'  # and never the rest
SLOW_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nLast-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\nab"


@pytest.mark.parametrize(("start", "call"), [(SLOW_HEAD, "put"), (SLOW_BODY, "get")])
async def test_s3_a_slow_loris_answer_ends_at_the_calls_deadline(start: bytes, call: str) -> None:
    # The read timeout (600 s) never fires: only the deadline (base + bytes / rate) ends it.
    async with StallingServer(start) as server, \
            s3(f"http://127.0.0.1:{server.port}", read_timeout=600.0, deadline_base_s=DEADLINE_S) as store:
        await store._s3()  # the client, opened outside the call: the request reaches the server in time
        async with asyncio.timeout(EVENTUALLY_S):  # bounds a hang of the code under test
            with pytest.raises(StoreTimeout, match=f"{call} 'seg'.*deadline"):
                if call == "put":
                    await store.put("seg", b"x" * 100)
                else:
                    await store.get("seg")
        assert server.received.is_set()


async def test_s3_a_cancelled_call_is_cancelled_not_timed_out() -> None:
    async with StallingServer(SLOW_HEAD) as server, \
            s3(f"http://127.0.0.1:{server.port}", read_timeout=600.0, deadline_base_s=600.0) as store:
        task = asyncio.create_task(store.put("seg", b"x" * 100))
        async with asyncio.timeout(EVENTUALLY_S):
            await server.received.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- 5. a ranged get returns the range asked for, or fails ------------------------------


def serve_object(kind: str) -> Any:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        headers = {"ETag": '"e"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}
        first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
        start, end = int(first), int(last) + 1
        if kind == "whole200":
            return web.Response(status=200, body=OBJECT, headers=headers)
        if kind == "shifted206":  # another range, and it says so
            headers["Content-Range"] = f"bytes 0-{end - start - 1}/{len(OBJECT)}"
            return web.Response(status=206, body=OBJECT[: end - start], headers=headers)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(OBJECT)}"
        data = {"short206": OBJECT[start : (start + end) // 2], "long206": OBJECT[start:]}[kind]
        return web.Response(status=206, body=data, headers=headers)
    return answer


@pytest.mark.parametrize("kind", ["whole200", "short206", "long206", "shifted206"])
async def test_s3_a_ranged_get_answered_with_other_bytes_fails(kind: str) -> None:
    async with FakeHttp(serve_object(kind)) as fake, s3(fake.url) as store:
        with pytest.raises(StoreUnavailable, match=r"get 'obj': asked bytes=100-109.*\[100, 110\)"):
            await store.get("obj", 100, 10)


async def test_s3_a_200_is_right_when_the_whole_object_is_the_range() -> None:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=200, body=b"tiny", headers={"ETag": '"e"'})

    async with FakeHttp(answer) as fake, s3(fake.url) as store:
        assert await store.get("obj", 0, 100) == b"tiny"
        assert await store.get("obj", -100) == b"tiny"


# -- 7. a put's answer must show the bytes were kept ------------------------------------


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


async def test_s3_a_put_answered_with_another_etag_fails() -> None:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=200, headers={"ETag": '"' + "0" * 32 + '"'})  # kept nothing

    async with FakeHttp(answer) as fake, s3(fake.url) as store:
        with pytest.raises(StoreUnavailable, match="put 'seg'.*ETag '0{32}', not the MD5"):
            await store.put("seg", b"hello world")
    assert fake.seen[-1].headers["Content-MD5"] == md5_b64(b"hello world")
    # Only the MD5: botocore's default CRC32 of every body (on the event loop) is not added.
    assert not [h for h in fake.seen[-1].headers if h.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum"))]


@pytest.mark.parametrize("headers", [
    {"ETag": '"' + "a" * 32 + '"', "x-amz-server-side-encryption": "aws:kms"},  # SSE-KMS: no MD5
    {"ETag": '"v7"'},  # an S3-compatible store whose ETags are not MD5s
])
async def test_s3_etags_that_are_not_md5s_are_not_compared(headers: dict[str, str]) -> None:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=200, headers=headers)

    async with FakeHttp(answer) as fake, s3(fake.url) as store:
        assert await store.put("seg", b"hello world") == headers["ETag"].strip('"')


def multipart_server(bad: str) -> Any:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        query = request.query
        if request.method == "POST" and "uploads" in query:
            return web.Response(body=b"<InitiateMultipartUploadResult><Bucket>bkt</Bucket><Key>k</Key>"
                                     b"<UploadId>U1</UploadId></InitiateMultipartUploadResult>")
        if request.method == "PUT" and "partNumber" in query:
            etag = hashlib.md5(body).hexdigest()
            if bad == "part" and query["partNumber"] == "2":
                etag = hashlib.md5(b"something else").hexdigest()
            return web.Response(headers={"ETag": f'"{etag}"'})
        if request.method == "POST" and "uploadId" in query:
            return web.Response(body=b'<CompleteMultipartUploadResult><ETag>"' + b"1" * 32
                                     + b'-3"</ETag></CompleteMultipartUploadResult>')
        if request.method == "DELETE":
            return web.Response(status=204)
        return web.Response(status=400)
    return answer


@pytest.mark.parametrize(("bad", "step"), [("part", "part 2"), ("complete", "complete")])
async def test_s3_a_multipart_put_answered_with_other_etags_fails_and_aborts(bad: str, step: str) -> None:
    data = bytes(range(256)) * (2 * TEST_PART_BYTES // 256) + b"tail"  # 3 parts
    async with FakeHttp(multipart_server(bad)) as fake, s3(fake.url) as store:
        with pytest.raises(StoreUnavailable, match=f"put 'seg': {step} answered ETag"):
            await store.put("seg", data)
    parts = [r for r in fake.seen if r.method == "PUT"]
    assert parts and all(r.headers["Content-MD5"] == md5_b64(r.body) for r in parts)
    assert [r.method for r in fake.seen if "uploadId=U1" in r.path_qs][-1] == "DELETE"  # aborted


def test_s3_a_changed_body_is_retried_as_unavailable() -> None:
    import botocore.exceptions as bce

    store = s3("http://127.0.0.1:9")
    exc = bce.ClientError({"Error": {"Code": "BadDigest"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                          "PutObject")
    err = store._error("put", "seg", exc)
    assert type(err) is StoreUnavailable and "'seg'" in str(err)
