"""The ObjectStore contract (cdp/store/base.py), run against every backend.

The `store` fixture (tests/conftest.py) gives a fresh empty store of each
backend: memory, file, s3 (moto), azure (Azurite), faulty(memory).
"""

from __future__ import annotations

import array
import asyncio
import os
import time
from typing import Any

import pytest

from cdp.errors import AlreadyExists, InvalidKey, NotFound, PreconditionFailed
from cdp.store import ObjectInfo, ObjectStore
from tests.conftest import TEST_PAGE_SIZE, TEST_PART_BYTES

MiB = 1024 * 1024


def pattern(size: int, seed: int = 0) -> bytes:
    """size bytes that differ at every offset (so a misplaced range shows)."""
    unit = bytes((i * 7 + seed) % 251 for i in range(251))
    return (unit * (size // len(unit) + 1))[:size]


async def keys_of(store: Any, prefix: str = "", start_after: str | None = None) -> list[str]:
    return [info.key async for info in store.list(prefix, start_after=start_after)]


async def test_is_an_object_store(store: Any) -> None:
    assert isinstance(store, ObjectStore)
    assert store.describe() and store.url == store.describe()
    async with store as entered:
        assert entered is store


@pytest.mark.parametrize("size", [0, 1, 5 * MiB], ids=["empty", "1B", "5MiB"])
async def test_put_get_round_trip(store: Any, size: int) -> None:
    data = pattern(size)
    await store.put("obj/data.bin", data)
    assert await store.get("obj/data.bin") == data
    info = await store.stat("obj/data.bin")
    assert (info.key, info.size) == ("obj/data.bin", size)


async def test_object_over_multipart_threshold(store: Any) -> None:
    data = pattern(2 * TEST_PART_BYTES + 12345, seed=3)  # 3 parts on S3, many blocks on Azure
    await store.put("big/segment.seg", data)
    assert await store.get("big/segment.seg") == data
    assert await store.get("big/segment.seg", TEST_PART_BYTES - 5, 10) == data[
        TEST_PART_BYTES - 5 : TEST_PART_BYTES + 5
    ]
    assert (await store.stat("big/segment.seg")).size == len(data)


async def test_overwrite_replaces_the_whole_object(store: Any) -> None:
    await store.put("k", pattern(1000, seed=1))
    await store.put("k", b"short")
    assert await store.get("k") == b"short"
    assert (await store.stat("k")).size == 5


RANGES = [
    # (offset, length) -> expected slice of DATA (100 bytes)
    ((0, None), slice(0, 100)),
    ((0, 10), slice(0, 10)),
    ((40, 20), slice(40, 60)),
    ((90, 50), slice(90, 100)),  # runs past the end: the bytes that exist
    ((99, None), slice(99, 100)),
    ((100, None), slice(0, 0)),  # offset at the end
    ((100, 5), slice(0, 0)),
    ((150, None), slice(0, 0)),  # offset after the end
    ((10, 0), slice(0, 0)),  # zero length
    ((-1, None), slice(99, 100)),  # suffix shorter than the object
    ((-30, None), slice(70, 100)),
    ((-100, None), slice(0, 100)),
    ((-1000, None), slice(0, 100)),  # suffix longer than the object: all of it
]


async def test_ranged_gets(store: Any) -> None:
    data = pattern(100)
    await store.put("r", data)
    got = {args: await store.get("r", *args) for args, _ in RANGES}
    assert got == {args: data[want] for args, want in RANGES}


@pytest.mark.parametrize("args", [(0, None), (0, 5), (3, None), (-4, None), (0, 0)])
async def test_ranged_gets_of_an_empty_object(store: Any, args: tuple[int, int | None]) -> None:
    await store.put("empty", b"")
    assert await store.get("empty", *args) == b""


async def test_bad_range_arguments_are_refused(store: Any) -> None:
    await store.put("r", b"abc")
    with pytest.raises(ValueError):
        await store.get("r", 0, -1)
    with pytest.raises(ValueError):
        await store.get("r", -2, 1)


@pytest.mark.parametrize("args", [(0, None), (5, 10), (-3, None), (2, 0)])
async def test_missing_object_is_not_found(store: Any, args: tuple[int, int | None]) -> None:
    with pytest.raises(NotFound, match="missing/key"):
        await store.get("missing/key", *args)


async def test_stat(store: Any) -> None:
    with pytest.raises(NotFound, match="nothing"):
        await store.stat("nothing")
    await store.put("dir/x", b"12345")
    info = await store.stat("dir/x")
    assert isinstance(info, ObjectInfo)
    assert (info.key, info.size) == ("dir/x", 5)
    assert info.mtime is None or info.mtime > 0


async def test_delete_is_idempotent(store: Any) -> None:
    await store.delete("never/was")
    await store.put("d/x", b"1")
    await store.delete("d/x")
    await store.delete("d/x")
    with pytest.raises(NotFound):
        await store.get("d/x")
    assert await keys_of(store) == []


# Names around "/" in byte order: "-" 0x2d < "." 0x2e < "/" 0x2f < "0" 0x30 < "A" < "_" < "a".
# No key is also the "directory" of another (the file backend cannot hold both).
TRICKY_KEYS = [
    "a-b", "a.b", "a/b", "a/c/d", "a/c-d", "a/c.d", "a/c/d0", "a0", "a_b", "A", "Z9",
    "0", "9/x", "10", "b/a/c/d/e", "b/a-", "b-", "seg/000a", "seg/0009", "seg/00a0",
]


async def test_list_is_in_byte_order(store: Any) -> None:
    for key in TRICKY_KEYS:
        await store.put(key, key.encode())
    listed = [info async for info in store.list()]
    assert [info.key for info in listed] == sorted(TRICKY_KEYS)
    assert all(info.size == len(info.key) for info in listed)


@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/c", "a/c/", "b/a", "seg/00", "zz", "zz/"])
async def test_list_prefix(store: Any, prefix: str) -> None:
    for key in TRICKY_KEYS:
        await store.put(key, b"")
    want = sorted(k for k in TRICKY_KEYS if k.startswith(prefix))
    assert await keys_of(store, prefix) == want


async def test_list_start_after(store: Any) -> None:
    for key in TRICKY_KEYS:
        await store.put(key, b"")
    ordered = sorted(TRICKY_KEYS)
    starts = ordered + ["", "a", "a/", "a/c", "a/c/", "a/c/e", "b", "zzz", "#", "~"]
    for start_after in starts:
        want = [k for k in ordered if k > start_after]
        assert await keys_of(store, start_after=start_after) == want, start_after
        want_a = [k for k in want if k.startswith("a/")]
        assert await keys_of(store, "a/", start_after=start_after) == want_a, start_after


async def test_list_paginates(store: Any) -> None:
    keys = [f"p/{i:04x}" for i in range(4 * TEST_PAGE_SIZE + 3)]
    await asyncio.gather(*(store.put(key, b"x") for key in reversed(keys)))
    assert await keys_of(store) == keys
    assert await keys_of(store, "p/", start_after=keys[TEST_PAGE_SIZE]) == keys[TEST_PAGE_SIZE + 1 :]


async def test_list_of_an_empty_store(store: Any) -> None:
    assert await keys_of(store) == []
    assert await keys_of(store, "x/", start_after="x/1") == []


async def test_if_absent_creates_once(store: Any) -> None:
    await store.put("cat/0001", b"first", if_absent=True)
    with pytest.raises(AlreadyExists, match="cat/0001"):
        await store.put("cat/0001", b"second", if_absent=True)
    assert await store.get("cat/0001") == b"first"
    await store.delete("cat/0001")
    await store.put("cat/0001", b"third", if_absent=True)
    assert await store.get("cat/0001") == b"third"


async def test_if_absent_is_atomic_between_concurrent_writers(store: Any) -> None:
    for round_ in range(3):
        key = f"cat/{round_:04x}"
        writers = [store.put(key, b"writer-%d" % i, if_absent=True) for i in range(6)]
        results = await asyncio.gather(*writers, return_exceptions=True)
        winners = [i for i, result in enumerate(results) if not isinstance(result, BaseException)]
        assert len(winners) == 1, results
        assert all(isinstance(r, AlreadyExists) for i, r in enumerate(results) if i not in winners), results
        assert await store.get(key) == b"writer-%d" % winners[0]


async def test_if_absent_big_object(store: Any) -> None:
    data = pattern(2 * TEST_PART_BYTES + 1, seed=5)
    await store.put("big", data, if_absent=True)
    with pytest.raises(AlreadyExists):
        await store.put("big", pattern(2 * TEST_PART_BYTES + 1, seed=6), if_absent=True)
    assert await store.get("big") == data


async def test_put_returns_the_etag_that_stat_and_list_give(store: Any) -> None:
    first = await store.put("l/k", b"one")
    assert first and first == (await store.stat("l/k")).etag
    second = await store.put("l/k", b"two")
    assert second and second != first
    assert [i.etag async for i in store.list("l/")] == [second]


async def test_if_match_replaces_only_the_object_it_names(store: Any) -> None:
    etag = await store.put("l/k", b"mine")
    renewed = await store.put("l/k", b"mine, renewed", if_match=etag)
    assert await store.get("l/k") == b"mine, renewed"
    with pytest.raises(PreconditionFailed, match="l/k"):  # the etag of an older version
        await store.put("l/k", b"stale", if_match=etag)
    await store.put("l/k", b"someone else's")  # written over by another process
    with pytest.raises(PreconditionFailed, match="l/k"):
        await store.put("l/k", b"mine again", if_match=renewed)
    assert await store.get("l/k") == b"someone else's"


async def test_if_match_never_recreates_a_deleted_object(store: Any) -> None:
    etag = await store.put("l/gone", b"held")
    await store.delete("l/gone")
    with pytest.raises(PreconditionFailed, match="l/gone"):
        await store.put("l/gone", b"renewed", if_match=etag)
    with pytest.raises(NotFound):
        await store.stat("l/gone")
    with pytest.raises(ValueError):
        await store.put("l/gone", b"x", if_absent=True, if_match=etag)


async def test_if_match_is_atomic_between_concurrent_writers(store: Any) -> None:
    etag = await store.put("l/race", b"v0")
    writers = [store.put("l/race", b"writer-%d" % i, if_match=etag) for i in range(6)]
    results = await asyncio.gather(*writers, return_exceptions=True)
    winners = [i for i, result in enumerate(results) if not isinstance(result, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, PreconditionFailed) for i, r in enumerate(results) if i not in winners), results
    assert await store.get("l/race") == b"writer-%d" % winners[0]


async def test_buffer_inputs(store: Any) -> None:
    backing = bytearray(pattern(64))
    await store.put("ba", backing)
    await store.put("mv", memoryview(backing)[8:24])
    words = array.array("I", [1, 2, 3])
    await store.put("words", memoryview(words))
    backing[:] = b"\0" * 64  # the store must have copied
    assert await store.get("ba") == pattern(64)
    assert await store.get("mv") == pattern(64)[8:24]
    assert await store.get("words") == words.tobytes()


BAD_KEYS = [
    "", "/a", "a/", "a//b", ".", "..", "a/../b", "a/./b", ".tmp-x", "a/.hidden",
    "a b", "a\\b", "é", "a\nb", "a:b", "x" * 513, 7,
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:20])
async def test_invalid_keys_are_refused(store: Any, key: Any) -> None:
    calls = [
        store.put(key, b"x"),
        store.put(key, b"x", if_absent=True),
        store.get(key),
        store.get(key, -1),
        store.stat(key),
        store.delete(key),
    ]
    for call in calls:
        with pytest.raises(InvalidKey, match="invalid key"):
            await call
    assert await keys_of(store) == []


@pytest.mark.parametrize("prefix", ["/", "/a", "a//", "..", "a/../", ".tmp", "a b/"])
async def test_invalid_list_prefixes_are_refused(store: Any, prefix: str) -> None:
    with pytest.raises(InvalidKey, match="invalid list prefix"):
        await keys_of(store, prefix)


async def test_many_concurrent_puts_and_gets(store: Any) -> None:
    blobs = {f"c/{i:03d}": os.urandom(1000 + i) for i in range(40)}
    await asyncio.gather(*(store.put(k, v) for k, v in blobs.items()))
    got = await asyncio.gather(*(store.get(k) for k in blobs))
    assert dict(zip(blobs, got)) == blobs


# -- the optional coroutines: server_time and ensure_container ------------------------


async def test_server_time_is_the_stores_clock(store: Any) -> None:
    before = time.time()
    when = await store.server_time()
    after = time.time()
    assert when is not None
    # The local test servers share this host's clock; an HTTP Date has 1 s resolution.
    assert before - 1.0 <= when <= after + 1.0


async def test_ensure_container_is_idempotent(store: Any) -> None:
    await store.put("kept/k", b"v")
    await store.ensure_container()
    await store.ensure_container()
    assert await store.get("kept/k") == b"v"
    assert await keys_of(store) == ["kept/k"]


@pytest.mark.parametrize("kind", ["file", "s3", "azure"])
async def test_ensure_container_creates_a_missing_one(
    kind: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    from cdp.store import FileStore
    from tests.conftest import make_azure_store, make_s3_store, unique_name

    if kind == "file":
        made: Any = FileStore(tmp_path / "not" / "yet")
    elif kind == "s3":
        made = make_s3_store(request.getfixturevalue("moto_server"), unique_name())
    else:
        made = make_azure_store(request.getfixturevalue("azurite"), unique_name())
    async with made:
        # The server's clock is known even before the bucket exists.
        assert abs(await made.server_time() - time.time()) < 2.0
        await made.ensure_container()
        await made.ensure_container()
        await made.put("a/b", b"x")
        assert await made.get("a/b") == b"x"
