"""Object stores against answers a mangling proxy (``tests/mangling_proxy.py``) makes of the
real moto and Azurite, byte for byte: what an audit found and what holds now.

1. An Azure answer in a content coding (a gzip body that inflates 256 times) is refused
   before its body is read, never inflated.
2. An answer without a usable ``Date`` (absent, garbage, a year that overflows) is a
   store error, never "no clock": a host whose clock is ahead judged live leases expired.
   No lease is judged or taken by this host's clock alone; the wrappers pass it on.
3. An overflowing ``Date`` does not kill a lease's renewal; an unexpected error there
   loses the lease, said (``wait_lost``); preflight's clock check fails, not crashes.
4. A 416 is an empty read only where the object's size proves the range past its end.
5. A get with ``max_bytes`` refuses a larger object before its body (a lock announced at
   256 MiB, a planted giant manifest or chunk); a read's deadline does not grow with
   whatever size a server announces; whole file-store reads hold the object once.
6. A listing full of names that are not keys logs a few lines, not one per name.

The bounds are asserted by their messages (``is N bytes, at most M expected``), whose
numbers FORMAT.md gives: a lock is at most 64 + 64 KiB (§11.1), a deployment record as
much (§12), a manifest 64 + 16 bytes per chunk of the smallest size (§6.2), a chunk its
header, table and raw bytes (§6.1).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import re
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import pytest_asyncio

from cdp.errors import CdpError, FormatError, LeaseLost, StoreTimeout, StoreUnavailable
from cdp.locks import live_locks, recovery_lease, recovery_prefix
from cdp.msa.deployment import deployment_key, read_deployment
from cdp.msa.preflight_system_checks import check_clock, check_store_writable
from cdp.replay import replay_reference
from cdp.store.crypt import EncryptedStore
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from cdp.store.storekeys import StoreKey, StoreKeyring
from cdp.testing.domain import DomainBuilder
from rocva import RecoverOptions, Target, plan_recovery, recover
from rocva.mount_cache import UnitCache
from rocva.mount_source import PlanSource
from rocva.verify import verify
from tests.conftest import make_azure_store, make_s3_store, unique_name
from tests.rocva.build import seed_initial
from tests.services import AZURITE_KEY, connection_string
from tests.mangling_proxy import Exchange, ManglingProxy, Reply, is_data_get

KiB, MiB = 1 << 10, 1 << 20
S = 1_000_000_000
#: FORMAT.md §11.1: a lock is its 64-byte header and a body of at most 64 KiB.
LOCK_BYTES_MAX = 64 + 64 * KiB
OVERFLOWING_DATE = "Mon, 01 Jan 99999999999 00:00:00 GMT"
LOCK_KEY = "l/recovery/00000001/0123456789abcdef0123456789abcdef.lock"


@dataclass
class Pair:
    """One bucket or container, reached directly (``direct``) and through ``proxy`` (``via``)."""

    kind: str
    proxy: ManglingProxy
    direct: Any
    via: Any
    make: Callable[..., Any]  # another store through the proxy, with options


@pytest_asyncio.fixture(params=["s3", "azure"], loop_scope="function")
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    kind = request.param
    server = request.getfixturevalue("moto_service" if kind == "s3" else "azurite_service")
    name = unique_name()
    async with ManglingProxy("127.0.0.1", server.port) as proxy:
        if kind == "s3":
            def make(**options: Any) -> Any:
                return make_s3_store(proxy.url, name, **{"max_attempts": 1, **options})
            direct = make_s3_store(server.endpoint, name, max_attempts=1)
            await direct.create_bucket()
        else:
            def make(**options: Any) -> Any:
                return make_azure_store(connection_string(proxy.port, AZURITE_KEY), name,
                                        **{"max_attempts": 1, **options})
            direct = make_azure_store(connection_string(server.port, AZURITE_KEY), name, max_attempts=1)
            await direct.create_container()
        via = make()
        try:
            yield Pair(kind, proxy, direct, via, make)
        finally:
            await via.close()
            await direct.close()


def with_date(value: str | None) -> Callable[[Exchange], Reply]:
    """Every answer with its Date header replaced by ``value`` (None: removed)."""
    return lambda exchange: exchange.reply.set_header("Date", value)


def announcing(exchange: Exchange, total: int, *, drip_s: float = 0.0) -> Callable:
    """The answer to a GET of an object, its headers saying the object has ``total``
    bytes (a 206 names the range asked of them), then zeros: as fast as the client
    reads them, or 64 KiB every ``drip_s`` seconds. The proxy counts what it sent."""
    reply = exchange.reply
    asked = next((v for k, v in exchange.request_headers if k.lower() in ("x-ms-range", "range")), None)
    if reply.status == 206 and asked:
        first, _, last = asked.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last), total - 1) if last else total - 1
        reply.set_header("Content-Range", f"bytes {start}-{end}/{total}")
        reply.length = end - start + 1
    else:
        reply.length = total
    reply.body = b""
    head = reply.raw()
    piece = bytes(64 * KiB if drip_s else MiB)

    async def send(writer: Any) -> None:
        writer.write(head)
        left = reply.length
        while left > 0:
            writer.write(piece[: min(left, len(piece))])
            await writer.drain()
            left -= len(piece)
            if drip_s:
                await asyncio.sleep(drip_s)

    return send


# -- 1. no content coding ------------------------------------------------------------------


async def test_azure_an_answer_in_a_content_coding_is_refused_before_it_is_inflated(
        request: pytest.FixtureRequest) -> None:
    """The SDK's default inflated a gzip body whatever it became (the audit: a 1 MiB
    answer, 1 GiB in memory). Here 256 KiB that inflate to 64 MiB; with its real bytes
    behind a ``Content-Encoding: identity`` the same read is right."""
    server = request.getfixturevalue("azurite_service")
    blob = os.urandom(256 * KiB)
    bomb = gzip.compress(bytes(64 * MiB), compresslevel=9)
    assert len(bomb) < len(blob)
    coding = {"value": "gzip"}

    def mangle(exchange: Exchange) -> Reply | None:
        if not is_data_get(exchange, "big/blob") or exchange.reply.status != 206:
            return None
        if coding["value"] == "gzip":
            exchange.reply.body = bomb + bytes(len(exchange.reply.body) - len(bomb))
        return exchange.reply.set_header("Content-Encoding", coding["value"])

    async with ManglingProxy("127.0.0.1", server.port) as proxy:
        async with make_azure_store(connection_string(proxy.port, AZURITE_KEY), unique_name(),
                                    max_attempts=1) as store:
            await store.create_container()
            await store.put("big/blob", blob)
            proxy.mangle = mangle
            with pytest.raises(StoreUnavailable, match="Content-Encoding 'gzip'") as caught:
                await store.get("big/blob")
            assert "'big/blob'" in caught.value.message
            coding["value"] = "identity"
            assert await store.get("big/blob") == blob


# -- 2. a store's clock is its Date, or an error -------------------------------------------


@pytest.mark.parametrize("date", [None, "yesterday-ish", OVERFLOWING_DATE,
                                  "Mon, 01 Jan 2024 00:00:00 +99999999999999999999"],
                         ids=["absent", "garbage", "year-overflow", "zone-overflow"])
async def test_without_a_usable_date_no_lease_is_judged_or_taken(pair: Pair, date: str | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A judge whose clock is five minutes ahead took the holder's live lease for expired
    when the store's answer had no usable Date (the check of §11.1 was skipped): a sweep
    would delete under a running recovery. Now the judge fails (retryable) and takes none."""
    holder = await recovery_lease(pair.direct, 1, owner="test recovery", ttl_s=120.0)
    try:
        pair.proxy.mangle = with_date(date)
        real_ns = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 300 * S)  # the judge's host: ahead
        with pytest.raises(StoreUnavailable, match="no usable Date"):
            await live_locks(pair.via, recovery_prefix(1))
        with pytest.raises(StoreUnavailable, match="no usable Date"):
            await recovery_lease(pair.via, 1, owner="test taker")
        with pytest.raises(StoreUnavailable, match="no usable Date"):
            await pair.via.server_time()
        monkeypatch.undo()
        pair.proxy.mangle = None
        assert [info.key async for info in pair.direct.list(recovery_prefix(1))] == [holder.key]
        assert [lock.key for lock in await live_locks(pair.via, recovery_prefix(1))] == [holder.key]
    finally:
        await holder.release()


@pytest.mark.parametrize("wrap", ["faulty", "encrypted"])
async def test_the_wrappers_pass_a_missing_date_on(pair: Pair, wrap: str) -> None:
    pair.proxy.mangle = with_date(None)
    store = FaultyStore(pair.via) if wrap == "faulty" else EncryptedStore(
        pair.via, StoreKeyring([StoreKey(bytes(range(32)))], "a test key"))
    with pytest.raises(StoreUnavailable, match="no usable Date"):
        await store.server_time()
    pair.proxy.mangle = None
    assert abs(await store.server_time() - time.time()) < 5


# -- 3. an overflowing Date, and what else a renewal may meet --------------------------------


async def test_an_overflowing_date_leaves_a_lease_renewed_or_lost_never_dead(pair: Pair) -> None:
    """The overflow escaped as an OverflowError: the renewal task died, silently, and the
    lease lapsed under a mount that waited on ``wait_lost``. Now the store's clock is
    unknown (a store error): on S3 the lease is renewed as after any store error; Azure's
    SDK cannot read any answer with that Date (the renewal's put included), so the lease
    is lost, and said."""
    lease = await recovery_lease(pair.via, 1, owner="test mount", ttl_s=3.0)
    try:
        first = lease.expires_ns
        pair.proxy.mangle = with_date(OVERFLOWING_DATE)
        await asyncio.sleep(2.6)  # renewals due at 1 s and 2 s; a lease not renewed is lost at 2 s
        assert lease._task is not None
        if pair.kind == "s3":
            assert not lease._task.done() and lease.lost is None and lease.expires_ns > first
            lease.check()
        else:
            async with asyncio.timeout(5):
                assert "not renewed" in await lease.wait_lost()
    finally:
        pair.proxy.mangle = None
        await lease.release()


class ClockThatBreaks:
    """A store whose clock, once ``broken``, fails as no store error does (a bug)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.broken = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def server_time(self) -> float:
        if self.broken:
            raise RuntimeError("https://account.example/container?sig=SECRET-SAS-TOKEN")
        return await self.inner.server_time()


async def test_a_renewal_that_fails_unexpectedly_loses_the_lease_and_says_so(moto_service: Any) -> None:
    async with make_s3_store(moto_service.endpoint, unique_name(), max_attempts=1) as inner:
        await inner.create_bucket()
        store = ClockThatBreaks(inner)
        lease = await recovery_lease(store, 1, owner="test mount", ttl_s=3.0)
        try:
            store.broken = True
            async with asyncio.timeout(10):
                reason = await lease.wait_lost()
            assert "RuntimeError" in reason and "SECRET" not in reason
            with pytest.raises(LeaseLost, match="RuntimeError"):
                lease.check()
        finally:
            await lease.release()


@pytest.mark.parametrize("date", [None, OVERFLOWING_DATE], ids=["absent", "overflow"])
async def test_preflight_fails_the_clock_check_on_an_unusable_date(pair: Pair, date: str | None) -> None:
    pair.proxy.mangle = with_date(date)
    check = await check_clock(pair.via)
    assert check.status == "fail" and "no usable Date" in check.reason, check


# -- 4. a 416 is empty only where the size proves it ------------------------------------------


async def test_genuine_416s_are_empty_reads(pair: Pair) -> None:
    await pair.via.put("e/ten", b"0123456789")
    await pair.via.put("e/empty", b"")
    assert await pair.via.get("e/ten", 20, 5) == b""
    assert await pair.via.get("e/ten", 10) == b""
    assert await pair.via.get("e/empty") == b""
    assert await pair.via.get("e/empty", -5) == b""
    assert await pair.via.get("e/empty", 0, 5) == b""
    assert await pair.via.get("e/ten", 2, 3) == b"234"


@pytest.mark.parametrize(("offset", "length", "names_size"), [(0, None, False), (2, 3, False), (2, 3, True)],
                         ids=["whole", "inside", "inside-size-named"])
async def test_a_416_that_proves_nothing_is_retryable_not_an_empty_object(
        pair: Pair, offset: int, length: int | None, names_size: bool) -> None:
    """The object has 10 bytes; a proxy answers 416. It was read as an empty object."""
    await pair.via.put("e/ten", b"0123456789")
    headers = [("Content-Type", "application/xml"), ("x-ms-error-code", "InvalidRange")]
    detail = ""
    if names_size:
        headers.append(("Content-Range", "bytes */10"))
        detail = "<ActualObjectSize>10</ActualObjectSize>"
    body = f"<Error><Code>InvalidRange</Code><Message>no</Message>{detail}</Error>".encode()
    pair.proxy.mangle = lambda exchange: (Reply(416, "Range Not Satisfiable", headers, body)
                                          if is_data_get(exchange, "e/ten") else None)
    with pytest.raises(StoreUnavailable, match="416") as caught:
        await pair.via.get("e/ten", offset, length)
    assert "'e/ten'" in caught.value.message


# -- 5. bounds -----------------------------------------------------------------------------


async def test_a_bounded_get_refuses_a_larger_object_and_names_both_sizes(store: Any) -> None:
    await store.put("o/k", bytes(1000))
    assert len(await store.get("o/k", max_bytes=1000)) == 1000
    assert await store.get("o/k", 10, 5, max_bytes=1000) == bytes(5)
    for offset, length in [(0, None), (10, 5), (-5, None), (0, 0)]:
        with pytest.raises(FormatError, match=r"'o/k'.*is 1000 bytes, at most 999 expected"):
            await store.get("o/k", offset, length, max_bytes=999)


async def test_a_lock_announced_huge_is_refused_before_its_body(pair: Pair) -> None:
    """A lock object read whole was read whatever its size (the audit: 1 GiB for one lock
    of every sweep). Here the answer announces 256 MiB: refused from its headers."""
    await pair.direct.put(LOCK_KEY, b"a lock")
    total = 256 * MiB
    pair.proxy.mangle = lambda exchange: announcing(exchange, total) if is_data_get(exchange, LOCK_KEY) else None
    started = time.monotonic()
    with pytest.raises(FormatError, match=rf"is {total} bytes, at most {LOCK_BYTES_MAX} expected") as caught:
        async with asyncio.timeout(60):
            await live_locks(pair.via, recovery_prefix(1), now_ns=time.time_ns())
    assert LOCK_KEY in caught.value.message
    assert pair.proxy.sent < 40 * MiB and time.monotonic() - started < 20


async def test_a_read_deadline_does_not_grow_with_the_size_a_server_announces(pair: Pair) -> None:
    """A server announcing a terabyte and dripping it (faster than the slowest rate a
    transfer may have) bought a deadline of months. Counted up to 1 GiB: with a rate of
    1 GiB/s and a base of 1 s, the call ends after about 2 s."""
    await pair.direct.put("big/one", b"small")
    pair.proxy.mangle = lambda exchange: (announcing(exchange, 1 << 40, drip_s=0.05)
                                          if is_data_get(exchange, "big/one") else None)
    async with pair.make(deadline_base_s=1.0, transfer_bytes_per_s_min=float(1 << 30)) as store:
        started = time.monotonic()
        with pytest.raises(StoreTimeout):
            async with asyncio.timeout(30):
                await store.get("big/one")
        assert time.monotonic() - started < 15


async def test_preflight_refuses_a_probe_read_back_huge_unread(pair: Pair) -> None:
    """The probe is 64 KiB: an answer announcing 256 MiB fails the check from its headers."""
    def mangle(exchange: Exchange) -> Callable | None:
        path = exchange.path.split("?")[0]
        if exchange.method == "GET" and "/preflight/" in path and path.endswith(".probe"):
            return announcing(exchange, 256 * MiB)
        return None

    pair.proxy.mangle = mangle
    check = await check_store_writable(SimpleNamespace(site="site-a"), pair.via)
    assert check.status == "fail" and f"is {256 * MiB} bytes, at most {64 * KiB} expected" in check.reason, check
    assert pair.proxy.sent < 40 * MiB


def plant(root: Path, key: str, size: int) -> None:
    """A sparse file of ``size`` bytes under ``key`` of the file store at ``root``."""
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


async def test_small_objects_planted_huge_in_a_file_store_are_refused_unread(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    plant(store.root, LOCK_KEY, 256 * MiB)
    plant(store.root, deployment_key("site-a"), 256 * MiB)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=rf"is {256 * MiB} bytes, at most {LOCK_BYTES_MAX} expected"):
            await live_locks(store, recovery_prefix(1))
        with pytest.raises(FormatError, match=rf"is {256 * MiB} bytes, at most {LOCK_BYTES_MAX} expected"):
            await read_deployment(store, "site-a")
        assert tracemalloc.get_traced_memory()[1] < 16 * MiB
    finally:
        tracemalloc.stop()


async def test_a_whole_buffered_file_store_read_holds_the_object_once(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Read in steps and joined, a whole read held the object twice at its peak."""
    monkeypatch.setattr("cdp.store.fs.read_direct", lambda fd, start, end: None)  # as where O_DIRECT is refused
    store = FileStore(tmp_path / "store")
    data = os.urandom(16 * MiB)
    await store.put("big/object", data)
    tracemalloc.start()
    try:
        got = await store.get("big/object")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == data and peak < 20 * MiB, peak


@pytest_asyncio.fixture(loop_scope="function")
async def based(tmp_path: Path) -> DomainBuilder:
    """A domain in a file store: a disk of 1 MiB with a base of 64 KiB chunks, then writes."""
    b = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("vm", "d", MiB),)).start()
    rng = np.random.default_rng(5)
    await seed_initial(b, 0, rng, chunk=64 * KiB)
    b.write(0, 0, rng.bytes(4 * KiB))
    await b.seal()
    return b


async def object_keys(store: Any, prefix: str) -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def test_readers_of_a_manifest_refuse_a_planted_giant_unread(based: DomainBuilder, tmp_path: Path) -> None:
    """A manifest's bound: 64 + 16 bytes per chunk of the smallest size (64 KiB) of its
    disk: 320 bytes for 1 MiB. Planted: 256 MiB."""
    store = based.store
    [manifest] = await object_keys(store, f"d/{based.domain:08x}/base/")
    plant(store.root, manifest, 256 * MiB)
    refused = rf"is {256 * MiB} bytes, at most 320 expected"
    with pytest.raises(FormatError, match=refused):
        await plan_recovery(store, based.domain, Target.latest())
    with pytest.raises(FormatError, match=refused):
        await replay_reference(store, based.domain, tmp_path / "ref")
    report = await verify(store, based.domain)
    assert any(re.search(refused, p["problem"]) for p in report["problems"]), report["problems"]


async def test_readers_of_a_chunk_refuse_a_planted_giant_unread(based: DomainBuilder, tmp_path: Path) -> None:
    """A chunk's bound: its header, table and raw bytes (64 + 32 + 65536 for 64 KiB)."""
    store = based.store
    chunk = (await object_keys(store, "c/"))[0]
    plant(store.root, chunk, 256 * MiB)
    refused = rf"is {256 * MiB} bytes, at most {64 + 32 + 64 * KiB} expected"
    with pytest.raises(CdpError) as caught:
        await recover(store, based.domain, RecoverOptions(Target.latest(), tmp_path / "rec"))
    assert re.search(refused, str(caught.value)), caught.value
    report = await verify(store, based.domain, deep=True)
    assert any(re.search(refused, p["problem"]) for p in report["problems"]), report["problems"]
    plan = await plan_recovery(store, based.domain, Target.latest())
    cache = UnitCache(1 << 20)
    try:
        with ThreadPoolExecutor(2) as executor:
            source = PlanSource(store, plan.disks[0], plan.segments, cache, executor)
            with pytest.raises(OSError) as caught:  # a mount's read fails as EIO, naming why
                for offset in range(0, MiB, 64 * KiB):
                    await source.read(offset, 512)
            assert re.search(refused, str(caught.value)), caught.value
    finally:
        await cache.close()


# -- 6. names that are not keys --------------------------------------------------------------


def s3_page(names: list[str], token: str | None) -> bytes:
    items = "".join(f"<Contents><Key>{quote(name, safe='/')}</Key><LastModified>2024-01-01T00:00:00.000Z"
                    f"</LastModified><ETag>\"e\"</ETag><Size>1</Size></Contents>" for name in names)
    return ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>b</Name><EncodingType>url</EncodingType><IsTruncated>{'true' if token else 'false'}</IsTruncated>"
            + (f"<NextContinuationToken>{token}</NextContinuationToken>" if token else "")
            + items + "</ListBucketResult>").encode()


async def test_a_listing_of_endless_foreign_names_logs_a_few_lines(moto_service: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Forty pages of 250 names that are not keys (a space in each), then one key: it
    logged one line per name (an endless such listing wrote 91 MB in 40 s)."""
    pages = {"served": 0}

    def mangle(exchange: Exchange) -> Reply | None:
        if exchange.method != "GET" or "list-type=2" not in exchange.path:
            return None
        n = pages["served"] = pages["served"] + 1
        if n > 40:
            return Reply(200, "OK", [("Content-Type", "application/xml")], s3_page(["p/q/d/zz"], None))
        names = [f"p/q/d/x {n:03d}-{i:03d}" for i in range(250)]
        return Reply(200, "OK", [("Content-Type", "application/xml")], s3_page(names, f"token-{n}"))

    async with ManglingProxy("127.0.0.1", moto_service.port) as proxy:
        proxy.mangle = mangle
        async with make_s3_store(proxy.url, unique_name(), max_attempts=1) as store:
            with caplog.at_level(logging.WARNING, logger="cdp.store.base"):
                assert await object_keys(store, "d/") == ["d/zz"]
    lines = [r.getMessage() for r in caplog.records if r.name == "cdp.store.base"]
    assert 1 <= len(lines) <= 8, len(lines)
    assert "250 listed name(s)" in lines[0] and "'p/q/d/x 001-000'" in lines[0]
    assert "10000 listed name(s)" in lines[-1]
