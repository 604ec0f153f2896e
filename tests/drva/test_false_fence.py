"""One bad transfer of a catalog generation is not another writer (FORMAT.md §8.3).

A writer whose create of generation n + 1 landed but whose reply was lost reads n + 1
back to find its own writer id. When that one read came back damaged — a flipped byte,
a cut or empty body — the writer took the generation for another writer's and was
fenced: a DRVA stopped shipping the domain until a restart, and at start-up a damaged
read of the catalog stopped the domain the same way. Real moto behind
``tests.mangling_proxy``: a damaged read is read again; one that stays damaged is a
``CorruptGeneration`` that is retried later, never a fence; another writer's whole
generation still fences at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from cdp.catalog import CatalogState, CatalogWriter, CorruptGeneration, load_catalog
from cdp.errors import Fenced, StoreError
from cdp.layout import catalog_key
from cdp.store.crypt import EncryptedStore
from cdp.store.storekeys import StoreKey, StoreKeyring
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.conftest import make_s3_store, unique_name
from tests.drva.harness import SECRET, Disk, check_store, config, domain_doc, drva_doc, random_writes, running_drva
from tests.mangling_proxy import Exchange, ManglingProxy, Mangled, cut
from tests.test_catalog import DISKS, TS0, seg
from tests.waiting import EVENTUALLY_S, wait_until

if TYPE_CHECKING:
    from cdp.store.s3 import S3Store

DISK = 8 << 20
SPOILS = ("flip", "flip-magic", "short", "empty")
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}


def spoiled(body: bytes, how: str) -> bytes:
    """``body`` as a bad transfer gives it: a bit flipped in the JSON body, or in the magic
    (checked before any sum), half of it, or none."""
    if how == "short":
        return body[: len(body) // 2]
    if how == "empty":
        return b""
    data = bytearray(body)
    data[0 if how == "flip-magic" else min(100, len(data) - 1)] ^= 1
    return bytes(data)


class Faults:
    """The proxy's mangle for catalog objects under ``under`` (a URL path): the reply to
    the next create of a generation lost once (``lose_next_reply``; the store keeps it),
    then ``bad_reads`` reads of that generation spoiled; with ``first_reads``, the first
    read of every generation spoiled."""

    def __init__(self, under: str) -> None:
        self.under = under
        self.target: str | None = None
        self.lose_reply = False
        self.how = "flip"
        self.bad_reads = 0
        self.first_reads = False
        self.read_once: set[str] = set()
        self.cut = self.spoiled = self.reads = 0
        self.gets: dict[str, int] = {}  # GETs answered 200, by generation

    def lose_next_reply(self, how: str, bad_reads: int) -> None:
        self.target, self.lose_reply, self.how, self.bad_reads = None, True, how, bad_reads

    def __call__(self, exchange: Exchange) -> Mangled:
        where, reply = exchange.path.split("?")[0], exchange.reply
        if not where.startswith(self.under) or not where.endswith(".cat"):
            return None
        ok = reply.status == 200
        if exchange.method == "PUT" and ok and self.lose_reply:
            self.lose_reply, self.target = False, where
            self.cut += 1
            return cut
        if exchange.method != "GET" or not ok:
            return None
        self.reads += where == self.target
        self.gets[where] = self.gets.get(where, 0) + 1
        first = self.first_reads and where not in self.read_once
        self.read_once.add(where)
        if (where == self.target and self.bad_reads > 0) or first:
            self.bad_reads -= where == self.target
            self.spoiled += 1
            reply.body = spoiled(reply.body, self.how)
            return reply
        return None


async def commit_as_the_shipper(writer: CatalogWriter, make_delta) -> int:
    """``commit_shared``, retried on a StoreError as the shipper does (a lost reply
    surfaces as one when the client gives up on it)."""
    for _ in range(5):
        try:
            return await writer.commit_shared(make_delta)
        except StoreError:
            await asyncio.sleep(0.05)
    raise AssertionError("the store kept failing")


def ten_seqs(state: CatalogState):
    return None if state.timeline().committed_seq >= 10 else {"add_segments": seg(1, 10)}


@dataclass
class Proxied:
    """A new bucket on moto, reached through ``proxy`` by ``store``."""

    proxy: ManglingProxy
    store: S3Store

    def faults(self) -> Faults:
        """New ``Faults`` on the store's catalog objects, mangling from now on."""
        faults = self.proxy.mangle = Faults(f"/{self.store.bucket}/{self.store.prefix}")
        return faults


@pytest.fixture
async def proxied(moto_service) -> AsyncIterator[Proxied]:
    async with ManglingProxy("127.0.0.1", moto_service.port) as proxy:
        async with make_s3_store(proxy.url, unique_name("fence")) as store:
            await store.create_bucket()
            yield Proxied(proxy, store)


async def new_catalog(store, by: str = "drva test") -> CatalogWriter:
    """Domain 7's catalog at generation 1 (its disks), and its writer."""
    w = CatalogWriter(store, CatalogState.new(7, "erp", TS0, "site-a"), by=by, owner="site-a")
    await w.commit({"disks": DISKS})
    return w


@pytest.mark.parametrize("how", SPOILS)
async def test_a_bad_read_of_its_own_lost_generation_is_read_again_not_a_fence(proxied, how) -> None:
    store = proxied.store
    w = await new_catalog(store)
    faults = proxied.faults()
    faults.lose_next_reply(how, bad_reads=1)
    assert await commit_as_the_shipper(w, ten_seqs) == 2  # not Fenced
    assert faults.cut == 1 and faults.spoiled == 1 and faults.target.endswith(catalog_key(7, 2))
    assert faults.reads == 2  # the spoiled read reached the writer, which read the generation again
    state, generation = await load_catalog(store, 7)
    assert generation == 2 and state.timeline().committed_seq == 10 == w.state.timeline().committed_seq


async def test_a_generation_that_stays_corrupt_is_said_so_and_retried_not_fenced(proxied) -> None:
    w = await new_catalog(proxied.store)
    faults = proxied.faults()
    faults.lose_next_reply("flip", bad_reads=10**9)
    key = catalog_key(7, 2)
    with pytest.raises(CorruptGeneration, match=f"catalog {key}: corrupt generation: .* on each of 4 reads"):
        await commit_as_the_shipper(w, ten_seqs)
    assert faults.reads == 4  # read again, a bounded number of times
    faults.bad_reads = 0  # the link heals: the same writer goes on, from its own generation
    assert await commit_as_the_shipper(w, ten_seqs) == 2


@pytest.mark.parametrize("bad_reads", [0, 1])
async def test_another_writers_whole_generation_still_fences_at_once(proxied, bad_reads) -> None:
    store = proxied.store
    a = await new_catalog(store, by="drva a")
    b = await CatalogWriter.open(store, 7, by="drva b", owner="site-a")
    await b.commit({"add_segments": seg(1, 5)})  # generation 2: not a maintenance delta
    faults = proxied.faults()
    faults.target, faults.bad_reads = f"/{store.bucket}/{store.prefix}{catalog_key(7, 2)}", bad_reads
    with pytest.raises(Fenced, match="generation 2 by drva b"):
        await a.commit_shared(ten_seqs)
    assert faults.reads == 1 + bad_reads  # a whole read fences: no read more than needed


@pytest.mark.parametrize("how", SPOILS)
async def test_a_bad_read_while_loading_the_catalog_is_read_again(proxied, how) -> None:
    await load_twice_spoiled(proxied.store, proxied, how)


@pytest.mark.parametrize("how", ["flip", "short"])
async def test_a_bad_read_of_an_encrypted_catalog_is_read_again(proxied, how) -> None:
    """The encrypted store finds the damage itself (IntegrityError, before any decode)."""
    store = EncryptedStore(proxied.store, StoreKeyring([StoreKey(bytes(range(32)))], "test keys"))
    await load_twice_spoiled(store, proxied, how)


async def load_twice_spoiled(store, proxied: Proxied, how: str) -> None:
    """Two generations, the first read of each spoiled: the load reads them again."""
    w = await new_catalog(store)
    await w.commit({"add_segments": seg(1, 10)})
    faults = proxied.faults()
    faults.first_reads, faults.how = True, how
    state, generation = await load_catalog(store, 7)
    assert faults.spoiled == 2 and generation == 2 and state == w.state
    # Each spoiled generation was read again: the damage reached the loader, which refused it.
    assert sorted(faults.gets.values()) == [2, 2], faults.gets


# ---------------------------------------------------------------- a DRVA on S3


@dataclass
class Site:
    """A DRVA's configuration (``config``) for domain 1, its store a new bucket on moto
    reached through ``proxy``, whose ``faults`` are on the domain's catalog objects; the
    domain's primary ``disk`` behind the filter ``f``."""

    moto: Any
    bucket: str
    proxy: ManglingProxy
    faults: Faults
    disk: Disk
    f: DomainFilter
    config: Any
    tmp_path: Path

    async def check(self) -> None:
        """The store, read without the proxy, replays to the primary."""
        async with make_s3_store(self.moto.endpoint, self.bucket, "site-a") as store:
            await check_store(store, 1, [self.disk.sha256()], self.tmp_path)


@pytest.fixture
async def site(moto_service, monkeypatch, tmp_path) -> AsyncIterator[Site]:
    for name, value in CREDS.items():
        monkeypatch.setenv(name, value)
    bucket = unique_name("fence")
    async with make_s3_store(moto_service.endpoint, bucket) as admin:
        await admin.create_bucket()
    async with ManglingProxy("127.0.0.1", moto_service.port) as proxy:
        faults = proxy.mangle = Faults(f"/{bucket}/site-a/d/00000001/cat/")
        disk = Disk(tmp_path / "erp.img", DISK)
        cfg = config(drva_doc(tmp_path, "drva-f", [domain_doc(1, "erp", [("vm1", "d0", DISK)])],
                              store=f"s3://{bucket}/site-a?endpoint={proxy.url}&region=us-east-1",
                              seal_bytes="1MiB", seal_age_s=0.1))
        yield Site(moto_service, bucket, proxy, faults, disk, DomainFilter(1, [disk]), cfg, tmp_path)


async def ship(d, f: DomainFilter, rng: np.random.Generator, writes: int = 32) -> None:
    """``writes`` more writes captured and streamed until the domain committed them; the
    domain must not be fenced meanwhile."""
    client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    dom = d.domains[1]
    try:
        await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter connected")
        f.capture(*random_writes(rng, [DISK], writes, 16))
        await wait_until(lambda: dom.fenced or dom.committed_seq == f.next_seq - 1, EVENTUALLY_S,
                         "every write committed")
        assert not dom.fenced, dom.stats.last_error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("how", ["flip", "short"])
async def test_a_drva_whose_own_generation_reads_back_bad_keeps_shipping(site, how) -> None:
    faults, f, rng = site.faults, site.f, np.random.default_rng(7)
    async with running_drva(site.config) as d:
        await ship(d, f, rng)
        faults.lose_next_reply(how, bad_reads=1)
        await ship(d, f, rng)  # its commit's reply is lost, and the read back is bad
        assert faults.cut == 1 and faults.spoiled == 1
        await ship(d, f, rng)  # and the domain goes on
        assert not d.domains[1].fenced and d.status()["domains"][0]["fenced"] is False
    await site.check()


async def test_a_drva_pauses_on_a_generation_that_stays_corrupt_then_goes_on(site) -> None:
    faults, f, rng = site.faults, site.f, np.random.default_rng(8)
    async with running_drva(site.config) as d:
        await ship(d, f, rng)
        dom = d.domains[1]
        faults.lose_next_reply("flip", bad_reads=10**9)
        client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        try:
            await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter connected")
            f.capture(*random_writes(rng, [DISK], 32, 16))
            await wait_until(lambda: dom.fenced or dom.stats.catalog_errors >= 2, EVENTUALLY_S,
                             "the corrupt generation met twice")
            assert not dom.fenced
            assert "CorruptGeneration" in dom.stats.last_error and faults.target.split("/site-a/")[1] \
                in dom.stats.last_error, dom.stats.last_error
            assert d.status()["domains"][0]["catalog_errors"] >= 2  # what raises the MSA's store_errors alarm
            faults.bad_reads = 0  # the link heals
            await wait_until(lambda: dom.fenced or dom.committed_seq == f.next_seq - 1, EVENTUALLY_S,
                             "the held writes committed")
            assert not dom.fenced
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await ship(d, f, rng)
    await site.check()


async def test_a_bad_read_of_the_catalog_at_start_up_does_not_stop_the_domain(site) -> None:
    faults, f, rng = site.faults, site.f, np.random.default_rng(9)
    async with running_drva(site.config) as d:
        await ship(d, f, rng)
    faults.first_reads = True  # every generation's first read at the next start is bad
    async with running_drva(site.config) as d:
        assert faults.spoiled >= 1
        assert d.domains[1].catalog_ready and not d.domains[1].fenced, d.domains[1].stats.last_error
        await ship(d, f, rng)
    await site.check()
