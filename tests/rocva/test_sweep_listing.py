"""The chunk sweep deletes on what a listing did *not* show: a listing the server (or a
proxy) ends early — a page marked the last that is not, no continuation token — made
it take another domain's base chunks for garbage and delete them (data loss). Real moto
behind ``tests.mangling_proxy``: the sweep now refuses, nothing is deleted, and every
base still recovers byte for byte; with the listing whole it deletes garbage as ever."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from cdp.base_image import encode_chunk, encode_manifest
from cdp.errors import StoreError
from cdp.layout import base_manifest_key, catalog_key, chunk_key
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder
from rocva import RecoverOptions, recover
from rocva.consolidate import consolidate
from rocva.retention import sweep_chunks
from tests.conftest import TEST_PAGE_SIZE, make_s3_store, unique_name
from tests.mangling_proxy import Exchange, ManglingProxy, Reply
from tests.rocva.build import seed_initial

KiB = 1 << 10
CHUNK = 64 * KiB
DISK = 256 * KiB
PREFIX = "p/q/"  # make_s3_store's
GARBAGE = "c/ab/" + "ab" * 16 + ".chk"  # a chunk no manifest names


def _listing_of(path: str, under: str) -> bool:
    """Is ``path`` (with its query) a ListObjectsV2 of a prefix starting with ``under``?"""
    return "list-type=2" in path and f"prefix={quote(PREFIX + under, safe='')}" in path


def first_page(path: str) -> bool:
    return "continuation-token" not in path and "start-after" not in path


def ended_early(exchange: Exchange) -> Reply | None:
    """Any page of a listing under ``d/`` that has more after it is answered as the last:
    no ``IsTruncated``, no token."""
    reply = exchange.reply
    if (exchange.method == "GET" and _listing_of(exchange.path, "d/")
            and b"<IsTruncated>true</IsTruncated>" in reply.body):
        body = reply.body.replace(b"<IsTruncated>true</IsTruncated>", b"<IsTruncated>false</IsTruncated>")
        reply.body = re.sub(rb"<NextContinuationToken>.*?</NextContinuationToken>", b"", body)
        return reply
    return None


async def history(b: DomainBuilder, rng: np.random.Generator, bases: int) -> dict[int, list[str]]:
    """A seed base at seq 0, then ``bases`` more bases between writes; {base seq: the
    disk's sha256 there}."""
    await seed_initial(b, 0, rng, chunk=CHUNK)
    shas = {0: b.snapshot()}
    for _ in range(bases):
        for _ in range(4):
            b.write(0, int(rng.integers(0, DISK // 512 - 8)) * 512, rng.bytes(8 * 512))
        await b.seal()
        await b.add_base(0, chunk_size=CHUNK, origin="consolidation")
        shas[b.seq] = b.snapshot()
    return shas


async def recovers(b: DomainBuilder, shas: dict[int, list[str]], work: Path) -> None:
    """Every point in ``shas`` recovers to its disk (sha256), from the store's bases."""
    for seq, expected in shas.items():
        out = Path(tempfile.mkdtemp(dir=work))
        result = await recover(b.store, b.domain, RecoverOptions(seq, out / "rec", checksum=True))
        assert [im["sha256"] for im in result["images"]] == expected, f"domain {b.domain} at seq {seq}"


async def chunks_of(store) -> set[str]:
    return {i.key async for i in store.list("c/")}


async def two_domains(store, rng: np.random.Generator):
    """Domain 1, with segments and one base; domain 2, whose manifests fill more than a
    listing page (TEST_PAGE_SIZE keys a page)."""
    one = await DomainBuilder(store, domain=1, disks=(("vm1", "d", DISK),), name="erp").start()
    shas_one = await history(one, rng, 1)
    two = await DomainBuilder(store, domain=2, disks=(("vm2", "d", DISK),), name="crm").start()
    shas_two = await history(two, rng, TEST_PAGE_SIZE + 1)
    return one, shas_one, two, shas_two


async def test_a_listing_ended_early_deletes_nothing_and_every_base_recovers(moto_service, tmp_path) -> None:
    rng = np.random.default_rng(11)
    async with ManglingProxy("127.0.0.1", moto_service.port) as proxy:
        async with make_s3_store(proxy.url, unique_name("sweep")) as store:
            await store.create_bucket()
            one, shas_one, two, shas_two = await two_domains(store, rng)
            await store.put(GARBAGE, b"garbage nobody names")
            before = await chunks_of(store)

            proxy.mangle = ended_early
            try:
                refused = await sweep_chunks(store, owner="test sweep")
            except StoreError as exc:
                refused = exc
            proxy.mangle = None
            # Domain 2's manifests were all past the first page of the listing of d/
            # (before the fix, its chunks were deleted: its bases no longer recovered).
            await recovers(two, shas_two, tmp_path)
            await recovers(one, shas_one, tmp_path)
            assert await chunks_of(store) == before
            assert isinstance(refused, StoreError), f"the sweep went on: {refused}"
            assert re.search("refused, nothing deleted.*cut the listing short", refused.message), refused.message

            # The listing whole again: the sweep goes on as before (only the garbage goes).
            result = await sweep_chunks(store, owner="test sweep")
            assert result["chunks_deleted"] == 1 and result["domains_read"] == 2
            assert await chunks_of(store) == before - {GARBAGE}
            await recovers(two, shas_two, tmp_path)


async def test_a_listing_ended_early_is_caught_when_the_catalog_names_all_it_showed(moto_service) -> None:
    """The manifests the cut hides are named by no catalog (a seeding about to commit, a
    job that died before its commit): only the listing's end check can tell."""
    rng = np.random.default_rng(12)
    async with ManglingProxy("127.0.0.1", moto_service.port) as proxy:
        async with make_s3_store(proxy.url, unique_name("sweep")) as store:
            await store.create_bucket()
            b = await DomainBuilder(store, domain=3, disks=(("vm3", "d", DISK),)).start()
            await seed_initial(b, 0, rng, chunk=CHUNK)  # named, and first in the listing
            unnamed = []
            for seq in range(1, TEST_PAGE_SIZE + 2):
                h, obj = encode_chunk(rng.bytes(CHUNK))
                await store.put(chunk_key(h), obj)
                key = base_manifest_key(3, 1, 1000 + seq, 0)
                await store.put(key, encode_manifest(3, 0, 1000 + seq, CHUNK, CHUNK,
                                                     np.frombuffer(h, np.uint8).reshape(1, 16)))
                unnamed.append(chunk_key(h))
            proxy.mangle = ended_early
            with pytest.raises(StoreError, match="listing of d/00000003/base/ ended at .* but "
                                                 "d/00000003/base/.* comes after it"):
                await sweep_chunks(store, owner="test sweep")
            proxy.mangle = None
            for key in unnamed:
                await store.stat(key)  # NotFound: a live chunk deleted


async def test_a_manifest_the_listing_left_out_is_named_by_the_catalog(moto_service, tmp_path) -> None:
    """A page that leaves one name out (and ends where it should): the listing's end
    is right, the catalog says what is missing."""
    rng = np.random.default_rng(13)
    dropped: list[bytes] = []

    def drop_first_manifest(exchange: Exchange) -> Reply | None:
        reply = exchange.reply
        if exchange.method == "GET" and _listing_of(exchange.path, "d/00000002/base/") and first_page(exchange.path):
            first = re.search(rb"<Contents>.*?</Contents>", reply.body, re.S)
            dropped.append(re.search(rb"<Key>(.*?)</Key>", first.group()).group(1))
            reply.body = reply.body[:first.start()] + reply.body[first.end():]
            return reply
        return None

    async with ManglingProxy("127.0.0.1", moto_service.port) as proxy:
        async with make_s3_store(proxy.url, unique_name("sweep")) as store:
            await store.create_bucket()
            one, shas_one, two, shas_two = await two_domains(store, rng)
            before = await chunks_of(store)
            proxy.mangle = drop_first_manifest
            seed = base_manifest_key(2, 1, 0, 0)
            with pytest.raises(StoreError, match=f"manifest {seed} .*named by generation \\d+ of domain 2's "
                                                 f"catalog, is not in the listing of d/00000002/base/"):
                await sweep_chunks(store, owner="test sweep")
            proxy.mangle = None
            assert dropped and dropped[0].decode() == PREFIX + seed
            assert await chunks_of(store) == before
            await recovers(two, {0: shas_two[0]}, tmp_path)


async def test_a_catalog_that_does_not_load_loses_only_the_cross_check(caplog) -> None:
    """A damaged or foreign domain does not stop the sweep of every other one's garbage:
    its listed manifests are all kept, and the lost check is said."""
    store = MemoryStore()
    b = await DomainBuilder(store, domain=4, disks=(("vm", "d", DISK),)).start()
    await seed_initial(b, 0, np.random.default_rng(14), chunk=CHUNK)
    await store.put(GARBAGE, b"garbage nobody names")
    key = catalog_key(4, b.writer.generation)
    raw = bytearray(await store.get(key))
    raw[70] ^= 1
    await store.put(key, bytes(raw))
    result = await sweep_chunks(store)
    assert result["chunks_deleted"] == 1 and result["manifests_read"] == 1
    assert await chunks_of(store) == b.chunk_keys
    assert "chunk_sweep_catalog_unreadable" in [r.getMessage() for r in caplog.records]


class _OneEmptyAnswer(MemoryStore):
    """Answers one listing call of ``d/`` that starts after ``after`` with nothing, as a
    server in error might: the walk of the domains (``domain_ids``) ends there."""

    def __init__(self) -> None:
        super().__init__()
        self.after: str | None = None

    def list(self, prefix: str, start_after: str | None = None, **kw):
        if self.after is not None and prefix == "d/" and start_after is not None and start_after > self.after:
            self.after = None
            return self._nothing()
        return super().list(prefix, start_after=start_after, **kw)

    async def _nothing(self):
        return
        yield


async def test_a_walk_of_the_domains_answered_short_deletes_nothing(tmp_path) -> None:
    """One listing call answered empty ended the walk of the domains before domain 2: its
    manifests were never read, and its chunks were taken for garbage."""
    store = _OneEmptyAnswer()
    rng = np.random.default_rng(21)
    one = await DomainBuilder(store, domain=1, disks=(("vm1", "d", DISK),)).start()
    await seed_initial(one, 0, rng, chunk=CHUNK)
    two = await DomainBuilder(store, domain=2, disks=(("vm2", "d", DISK),)).start()
    shas_two = await history(two, rng, 1)
    await store.put(GARBAGE, b"garbage nobody names")
    before = await chunks_of(store)
    store.after = "d/00000001/"
    with pytest.raises(StoreError, match="refused, nothing deleted: two walks of the store's domains differ"):
        await sweep_chunks(store, owner="test sweep")
    assert await chunks_of(store) == before
    await recovers(two, shas_two, tmp_path)
    result = await sweep_chunks(store, owner="test sweep")
    assert result["chunks_deleted"] == 1 and result["domains_read"] == 2


async def test_a_refused_chunk_sweep_defers_and_the_consolidation_stands(tmp_path) -> None:
    """A chunk sweep refused after the consolidation committed (here: two walks of the
    domains differ) deletes nothing and is reported deferred; the job used to fail, as
    if the committed consolidation had not happened."""
    store = _OneEmptyAnswer()
    rng = np.random.default_rng(22)
    one = await DomainBuilder(store, domain=1, disks=(("vm1", "d", DISK),), ns_per_seq=10**9).start()
    await seed_initial(one, 0, rng, chunk=CHUNK)
    for _ in range(8):
        one.write(0, int(rng.integers(0, DISK // 512 - 8)) * 512, rng.bytes(8 * 512))
    await one.seal()
    end, sha = one.seq, one.snapshot()
    for _ in range(4):  # later records, so the segment is older than the cutoff
        one.mark("later")
    await one.seal()
    two = await DomainBuilder(store, domain=2, disks=(("vm2", "d", DISK),)).start()
    shas_two = await history(two, rng, 1)
    await store.put(GARBAGE, b"garbage nobody names")
    before = await chunks_of(store)
    store.after = "d/00000001/"
    r = await consolidate(store, 1, older_than_s=0.5, now_ns=one.ts(one.seq), chunk_size=CHUNK,
                          scratch_dir=tmp_path, sweep_all_chunks=True)
    assert r["consolidated_seq"] == end and r["bases_added"] == 1, r
    assert "two walks of the store's domains differ" in r["chunk_sweep"]["deferred"], r["chunk_sweep"]
    assert before <= await chunks_of(store) and GARBAGE in await chunks_of(store)  # nothing deleted
    await recovers(one, {end: sha}, tmp_path)
    await recovers(two, shas_two, tmp_path)
