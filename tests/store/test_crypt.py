"""Encryption at rest (FORMAT.md §19, ``cdp.store.crypt``): the sealed format, ranges,
tampering, keys and rotation. The ObjectStore contract runs on EncryptedStore too (the
``encrypted`` backend of tests/conftest.py); the end-to-end runs are in
tests/drva/test_encrypted_store.py."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.base_image import chunk_namer_of, decode_chunk, encode_chunk
from cdp.catalog import decode_catalog_object, encode_catalog_object
from cdp.errors import ConfigError, IntegrityError, KeyUnavailable, NotEncrypted
from cdp.layout import chunk_key
from cdp.store import open_store
from cdp.store.base import resolve_range
from cdp.store.crypt import EncryptedStore
from cdp.store.sealed_format import (
    ENVELOPE, ENVELOPE_BYTES, PAGE_BYTES, PAGE_SHIFT, SEALED_PAGE_BYTES, TAG_BYTES, page_offset, plain_size, sealed_size,
)
from cdp.store.memory import MemoryStore
from cdp.store.storekeys import StoreKey, StoreKeyring
from cdp.summed import pack_summed

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def ring(*secrets: bytes) -> StoreKeyring:
    return StoreKeyring([StoreKey(s) for s in secrets], "test keys")


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- format


@given(st.integers(0, 50 * PAGE_BYTES))
def test_plain_size_inverts_sealed_size(n: int) -> None:
    assert plain_size(sealed_size(n)) == n


@given(st.integers(0, 50 * SEALED_PAGE_BYTES))
def test_a_size_no_sealed_object_has_is_refused(size: int) -> None:
    n = plain_size(size)
    assert n is None or sealed_size(n) == size


@SETTINGS
@given(body=st.binary(max_size=3 * PAGE_BYTES + 100), data=st.data())
def test_random_bodies_and_ranges_round_trip(body: bytes, data) -> None:
    async def check() -> None:
        inner = MemoryStore()
        writer = EncryptedStore(inner, ring(KEY_A))
        await writer.put("d/obj", body)
        assert len(await inner.get("d/obj")) == sealed_size(len(body))
        for _ in range(4):
            reader = EncryptedStore(inner, ring(KEY_A))  # cold: no envelope cached
            if data.draw(st.booleans()):
                offset, length = -data.draw(st.integers(1, len(body) + 10)), None
            else:
                offset = data.draw(st.integers(0, len(body) + 10))
                length = data.draw(st.none() | st.integers(0, len(body) + 10))
            start, end = resolve_range(len(body), offset, length)
            assert await reader.get("d/obj", offset, length) == body[start:end]
            assert await reader.get("d/obj", offset, length) == body[start:end]  # warm
        assert (await reader.stat("d/obj")).size == len(body)
    run(check())


def test_the_envelope_is_at_both_ends_and_nothing_is_in_the_clear() -> None:
    async def check() -> None:
        inner = MemoryStore()
        body = b"known plaintext pattern " * 10000
        await EncryptedStore(inner, ring(KEY_A)).put("d/x", body)
        raw = await inner.get("d/x")
        assert raw[:4] == b"CDPN" and raw[:ENVELOPE_BYTES] == raw[-ENVELOPE_BYTES:]
        assert raw[8:24] == StoreKey(KEY_A).key_id and struct.unpack_from("<Q", raw, 40)[0] == len(body)
        assert b"known plaintext" not in raw and KEY_A not in raw
        again = EncryptedStore(inner, ring(KEY_A))
        await again.put("d/y", body)
        assert (await inner.get("d/y"))[24:40] != raw[24:40]  # a fresh salt per object
    run(check())


# --------------------------------------------------------------------------- tampering


async def _sealed(body: bytes) -> tuple[MemoryStore, bytes]:
    inner = MemoryStore()
    await EncryptedStore(inner, ring(KEY_A)).put("d/obj", body)
    return inner, await inner.get("d/obj")


BODY = os.urandom(2 * PAGE_BYTES + 999)


async def _flipped(position: int, bit: int) -> tuple[MemoryStore, bytes]:
    """``BODY`` sealed as ``d/obj``, then stored again with bit ``bit`` of byte
    ``position`` flipped: the inner store, and the sealed bytes before the flip."""
    inner, raw = await _sealed(BODY)
    bad = bytearray(raw)
    bad[position] ^= 1 << bit
    await inner.put("d/obj", bytes(bad))
    return inner, raw


@SETTINGS
@given(position=st.integers(0, sealed_size(len(BODY)) - 1), bit=st.integers(0, 7))
def test_a_flipped_byte_anywhere_is_a_named_integrity_error(position: int, bit: int) -> None:
    async def check() -> None:
        inner, raw = await _flipped(position, bit)
        with pytest.raises(IntegrityError) as err:
            await EncryptedStore(inner, ring(KEY_A)).get("d/obj")
        assert "'d/obj'" in err.value.message
        if ENVELOPE_BYTES <= position < len(raw) - ENVELOPE_BYTES:
            page = (position - ENVELOPE_BYTES) // SEALED_PAGE_BYTES
            assert f"page {page} at offset {page_offset(page)}" in err.value.message
            # A ranged read of that page fails the same way, cold and warm.
            reader = EncryptedStore(inner, ring(KEY_A))
            with pytest.raises(IntegrityError, match=f"page {page}"):
                await reader.get("d/obj", page * PAGE_BYTES, 10)
    run(check())


def test_truncated_extended_swapped_and_moved_objects_are_refused() -> None:
    async def check() -> None:
        inner, raw = await _sealed(BODY)
        store = EncryptedStore(inner, ring(KEY_A))
        # Truncated by a whole page (the envelope copied to the new end): the size and
        # the envelope disagree; so does every ranged read of the tail.
        short = raw[: page_offset(2)] + raw[-ENVELOPE_BYTES:]
        await inner.put("d/obj", short)
        with pytest.raises(IntegrityError, match="truncated"):
            await store.get("d/obj")
        with pytest.raises(IntegrityError):
            await EncryptedStore(inner, ring(KEY_A)).get("d/obj", -10)
        await inner.put("d/obj", raw + b"x")
        with pytest.raises(IntegrityError):
            await EncryptedStore(inner, ring(KEY_A)).get("d/obj")
        # Pages 0 and 1 swapped (both full): each fails its tag, by index.
        p0, p1 = raw[page_offset(0) : page_offset(1)], raw[page_offset(1) : page_offset(2)]
        await inner.put("d/obj", raw[: page_offset(0)] + p1 + p0 + raw[page_offset(2) :])
        with pytest.raises(IntegrityError, match="page 0 at offset 64"):
            await EncryptedStore(inner, ring(KEY_A)).get("d/obj")
        with pytest.raises(IntegrityError, match="page 1"):
            await EncryptedStore(inner, ring(KEY_A)).get("d/obj", PAGE_BYTES + 5, 10)
        # An empty object is one empty page: its tag is still checked.
        await store.put("d/empty", b"")
        empty = await inner.get("d/empty")
        assert await EncryptedStore(inner, ring(KEY_A)).get("d/empty") == b""
        await inner.put("d/empty", empty[:70] + bytes([empty[70] ^ 1]) + empty[71:])
        with pytest.raises(IntegrityError, match="page 0 at offset 64"):
            await EncryptedStore(inner, ring(KEY_A)).get("d/empty")
        # A whole valid object moved to another key: its pages are bound to their name.
        await inner.put("d/other", raw)
        with pytest.raises(IntegrityError, match="'d/other'"):
            await EncryptedStore(inner, ring(KEY_A)).get("d/other")
        # A page of another object with the same key spliced in.
        await EncryptedStore(inner, ring(KEY_A)).put("d/obj2", BODY)
        raw2 = await inner.get("d/obj2")
        await inner.put("d/obj", raw[: page_offset(1)] + raw2[page_offset(1) : page_offset(2)] + raw[page_offset(2) :])
        with pytest.raises(IntegrityError, match="page 1"):
            await EncryptedStore(inner, ring(KEY_A)).get("d/obj")
    run(check())


def test_a_plaintext_object_is_refused_naming_it(caplog) -> None:
    async def check() -> None:
        inner = MemoryStore()
        store = EncryptedStore(inner, ring(KEY_A))
        planted = encode_catalog_object(1, 1, 2, {"writer": {"id": "0" * 32, "by": "test"}})
        await inner.put("d/00000001/cat/0000000000000001.cat", planted)
        for offset, length in ((0, None), (0, 10), (-10, None), (30, None)):
            with pytest.raises(NotEncrypted, match="cat/0000000000000001.cat"):
                await store.get("d/00000001/cat/0000000000000001.cat", offset, length)
        await inner.put("d/tiny", b"abc")  # no sealed object is 3 bytes long
        with pytest.raises(NotEncrypted, match="d/tiny"):
            await store.stat("d/tiny")
        # A listing leaves it out (one stray file must not stop a domain's catalog), and logs it.
        await store.put("d/sealed", BODY)
        with caplog.at_level(logging.WARNING, logger="cdp.store.crypt"):
            listed = [info.key async for info in store.list("d/")]
        assert "d/tiny" not in listed and "d/sealed" in listed, listed
        skipped = [r for r in caplog.records if r.getMessage() == "plaintext_object_skipped"]
        assert "'d/tiny'" in [r.fields["key"] for r in skipped], [r.fields for r in skipped]
    run(check())


# --------------------------------------------------------------------------- keys


def test_a_missing_or_unknown_key_names_the_object_and_key_id() -> None:
    async def check() -> None:
        inner = MemoryStore()
        key_id = StoreKey(KEY_A).key_id.hex()
        obj = encode_catalog_object(1, 1, 2, {"writer": {"id": "0" * 32, "by": "test"}})
        await EncryptedStore(inner, ring(KEY_A)).put("d/00000001/cat/0000000000000001.cat", obj)
        with pytest.raises(KeyUnavailable) as err:
            await EncryptedStore(inner, ring(KEY_B)).get("d/00000001/cat/0000000000000001.cat")
        assert key_id in err.value.message and "cat/0000000000000001.cat" in err.value.message
        assert StoreKey(KEY_B).key_id.hex() in err.value.message  # the ids this process has
        # With no key at all, the decoders see the envelope where their magic should be.
        raw = await inner.get("d/00000001/cat/0000000000000001.cat")
        with pytest.raises(KeyUnavailable) as err:
            decode_catalog_object("d/00000001/cat/0000000000000001.cat", raw)
        assert key_id in err.value.message and "CDP_STORE_KEY" in err.value.message
        assert err.value.exit_code == 2
    run(check())


def test_rotation_reads_old_objects_writes_with_the_newest_and_keeps_chunk_names() -> None:
    async def check() -> None:
        inner = MemoryStore()
        old = EncryptedStore(inner, ring(KEY_A))
        await old.put("d/a", b"sealed with A" * 1000)
        both = EncryptedStore(inner, ring(KEY_A, KEY_B))
        assert await both.get("d/a") == b"sealed with A" * 1000
        await both.put("d/b", b"sealed with B")
        assert (await inner.get("d/b"))[8:24] == StoreKey(KEY_B).key_id
        with pytest.raises(KeyUnavailable, match=StoreKey(KEY_B).key_id.hex()):
            await old.get("d/b")
        # Chunk names come from the first key: the same before and after the rotation,
        # so deduplication and whole-chunk checks hold across it.
        raw = os.urandom(200_000)
        h_old, obj_old = encode_chunk(raw, chunk_namer_of(old))
        h_new, _ = encode_chunk(raw, chunk_namer_of(both))
        assert h_old == h_new != encode_chunk(raw)[0]
        assert decode_chunk(chunk_key(h_old), obj_old, h_old, namer=chunk_namer_of(both)) == raw
        with pytest.raises(Exception, match="keyed chunk name"):
            decode_chunk(chunk_key(h_old), obj_old, h_old, namer=chunk_namer_of(EncryptedStore(inner, ring(KEY_B))))
    run(check())


def test_a_replaced_object_is_not_read_with_a_stale_cached_envelope() -> None:
    async def check() -> None:
        inner = MemoryStore()
        reader, writer = EncryptedStore(inner, ring(KEY_A)), EncryptedStore(inner, ring(KEY_A))
        await writer.put("l/gc/0000000000000001.lock", b"first" * 30000)
        assert await reader.get("l/gc/0000000000000001.lock", 10, 5) == (b"first" * 30000)[10:15]
        await writer.put("l/gc/0000000000000001.lock", b"again" * 20000)  # another process renews it
        assert await reader.get("l/gc/0000000000000001.lock", 10, 5) == (b"again" * 20000)[10:15]
        assert await reader.get("l/gc/0000000000000001.lock", -7) == (b"again" * 20000)[-7:]
        etag = (await reader.stat("l/gc/0000000000000001.lock")).etag
        assert etag and await reader.put("l/gc/0000000000000001.lock", b"x", if_match=etag)
    run(check())


def test_key_sources_and_what_they_never_show(tmp_path, monkeypatch) -> None:
    hex_a, b64_b = KEY_A.hex(), base64.b64encode(KEY_B).decode()
    assert StoreKeyring.from_env({}) is None
    one = StoreKeyring.from_env({"CDP_STORE_KEY": hex_a})
    assert one.writer.key_id == StoreKey(KEY_A).key_id
    path = tmp_path / "keys"
    path.write_text(f"# store keys, oldest first\n{hex_a}\n\n{b64_b}\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        StoreKeyring.from_file(path)
    path.chmod(0o600)
    keyring = StoreKeyring.from_env({"CDP_STORE_KEY_FILE": str(path)})
    assert keyring.key_ids() == [StoreKey(KEY_A).key_id.hex(), StoreKey(KEY_B).key_id.hex()]
    assert keyring.writer.key_id == StoreKey(KEY_B).key_id
    with pytest.raises(ConfigError, match="not both"):
        StoreKeyring.from_env({"CDP_STORE_KEY": hex_a, "CDP_STORE_KEY_FILE": str(path)})
    with pytest.raises(ConfigError) as err:
        StoreKeyring.from_env({"CDP_STORE_KEY": hex_a[:-2] + "zz"})
    assert hex_a[:20] not in err.value.message
    store = open_store("mem://crypt-env", env={"CDP_STORE_KEY_FILE": str(path)})
    assert isinstance(store, EncryptedStore)
    shown = " ".join([repr(store), repr(keyring), repr(keyring.keys[0]), repr(store.chunk_namer), store.describe()])
    for secret in (KEY_A, KEY_B):
        assert secret.hex() not in shown and base64.b64encode(secret).decode() not in shown
    assert not isinstance(open_store("mem://crypt-env", env={}), EncryptedStore)
    import pickle
    with pytest.raises(TypeError):
        pickle.dumps(keyring.keys[0])


def test_sizes_in_listings_are_plaintext_sizes_and_etags_pass_through() -> None:
    async def check() -> None:
        inner = MemoryStore()
        store = EncryptedStore(inner, ring(KEY_A))
        for n in (0, 1, PAGE_BYTES, PAGE_BYTES + 1):
            await store.put(f"s/{n:08d}", bytes(n))
        listed = [(i.key, i.size, i.etag) async for i in store.list("s/")]
        raw = [(i.key, i.size, i.etag) async for i in inner.list("s/")]
        assert [size for _, size, _ in listed] == [0, 1, PAGE_BYTES, PAGE_BYTES + 1]
        assert [etag for *_, etag in listed] == [etag for *_, etag in raw]
        assert [size for _, size, _ in raw] == [sealed_size(n) for n in (0, 1, PAGE_BYTES, PAGE_BYTES + 1)]
        assert sealed_size(0) == 2 * ENVELOPE_BYTES + TAG_BYTES
    run(check())


async def test_consolidation_retention_and_deep_verify_work_on_a_sealed_store(tmp_path) -> None:
    """The consolidation scenario of tests/rocva/test_consolidate.py through a sealed store:
    chunks named by the keyed hash are written, deduplicated, swept and verified whole."""
    from tests.rocva.test_consolidate import window_survives

    store = EncryptedStore(MemoryStore(), ring(KEY_A))
    await window_survives(store, tmp_path)
    names = [info.key async for info in store.list("c/")]
    assert names and all(raw[:4] == b"CDPN" for raw in [await store.inner.get(k) for k in names])


# --------------------------------------------------------------------------- unopened reads


@SETTINGS
@given(body=st.binary(max_size=3 * PAGE_BYTES + 100), data=st.data())
def test_unopened_ranges_open_to_what_get_returns(body: bytes, data) -> None:
    async def check() -> None:
        inner = MemoryStore()
        await EncryptedStore(inner, ring(KEY_A)).put("d/obj", body)
        reader = EncryptedStore(inner, ring(KEY_A))
        for _ in range(4):  # cold, then with the envelope cached
            if data.draw(st.booleans()):
                offset, length = 0, None
            else:
                offset, length = data.draw(st.integers(0, len(body) + 10)), data.draw(st.integers(0, len(body) + 10))
            start, end = resolve_range(len(body), offset, length)
            unopened = await reader.get_unopened("d/obj", offset, length)
            assert len(unopened) == end - start
            spare = data.draw(st.integers(-1, 5))  # -1: no buffer; else one with this many bytes to spare
            buf = None if spare < 0 else bytearray(b"\xee" * (end - start + spare))
            plain = unopened.open_into(buf)
            assert bytes(plain) == body[start:end] == await reader.get("d/obj", offset, length)
            if buf is not None and end > start:
                assert bytes(buf[: end - start]) == body[start:end]  # opened in place, not copied elsewhere
        with pytest.raises(ValueError):
            await reader.get_unopened("d/obj", -5)
    run(check())


@SETTINGS
@given(position=st.integers(0, sealed_size(len(BODY)) - 1), bit=st.integers(0, 7))
def test_an_unopened_read_refuses_a_flipped_byte_by_name(position: int, bit: int) -> None:
    async def check() -> None:
        inner, raw = await _flipped(position, bit)
        with pytest.raises(IntegrityError) as err:
            (await EncryptedStore(inner, ring(KEY_A)).get_unopened("d/obj")).open_into(bytearray(len(BODY)))
        assert "'d/obj'" in err.value.message
        if ENVELOPE_BYTES <= position < len(raw) - ENVELOPE_BYTES:
            page = (position - ENVELOPE_BYTES) // SEALED_PAGE_BYTES
            assert f"page {page} at offset {page_offset(page)}" in err.value.message
            with pytest.raises(IntegrityError, match=f"page {page}"):
                unopened = await EncryptedStore(inner, ring(KEY_A)).get_unopened("d/obj", page * PAGE_BYTES, 10)
                unopened.open_into()
    run(check())


def test_unopened_reads_land_in_a_lent_buffer_over_a_file_store(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a store that reads into buffers (a file store), ``get_unopened(..., into=buf)``
    reads the sealed pages into ``buf`` (with O_DIRECT from 1 MiB on, no copy), whole and
    ranged, cold and with the envelope cached, and they open to what ``get`` returns;
    over a store that does not, ``into`` is ignored."""
    from cdp.direct_io import ReadBuffer
    from cdp.store.fs import FileStore

    body = random.Random(5).randbytes(3 * (1 << 20) + 12345)  # sealed pages past 1 MiB: read direct
    into_calls: list[tuple[int, int | None]] = []
    real = FileStore.get_into

    async def counted(self, key, offset, length, buf, *, max_bytes=None):
        into_calls.append((offset, length))
        return await real(self, key, offset, length, buf, max_bytes=max_bytes)

    monkeypatch.setattr(FileStore, "get_into", counted)

    async def check() -> None:
        inner = FileStore(tmp_path / "store")
        await EncryptedStore(inner, ring(KEY_A)).put("d/obj", body)
        rng = random.Random(6)
        ranges = [(0, None), (0, len(body)), (5, 2 << 20), (PAGE_BYTES - 3, 10), (len(body) - 70_000, 70_000)]
        ranges += [(o, rng.randrange(1, len(body) - o + 1)) for o in (rng.randrange(len(body)) for _ in range(6))]
        for cached in (False, True):
            reader = EncryptedStore(inner, ring(KEY_A))
            assert reader.unopened_into
            if cached:
                await reader.get("d/obj", 0, 1)
            buf = ReadBuffer()
            for offset, length in ranges:
                into_calls.clear()
                start, end = resolve_range(len(body), offset, length)
                unopened = await reader.get_unopened("d/obj", offset, length, into=buf)
                assert into_calls, (offset, length)  # the pages went into the lent buffer
                assert bytes(unopened.open_into()) == body[start:end] == await reader.get("d/obj", offset, length)
        # A store that does not read into buffers: ``into`` is ignored.
        memory = MemoryStore()
        await EncryptedStore(memory, ring(KEY_A)).put("d/obj", body)
        reader = EncryptedStore(memory, ring(KEY_A))
        assert not reader.unopened_into
        assert bytes((await reader.get_unopened("d/obj", 7, 100_000, into=ReadBuffer())).open_into()) == body[7:100_007]
    run(check())


def test_an_unopened_read_with_a_stale_envelope_is_marked_and_get_reads_afresh() -> None:
    async def check() -> None:
        inner = MemoryStore()
        reader, writer = EncryptedStore(inner, ring(KEY_A)), EncryptedStore(inner, ring(KEY_A))
        await writer.put("d/obj", BODY)
        assert await reader.get("d/obj", 5, 10) == BODY[5:15]  # the envelope is cached
        fresh = await reader.get_unopened("d/obj", 5, 10)
        assert fresh.cached and bytes(fresh.open_into()) == BODY[5:15] and not fresh.stale
        other = bytes(reversed(BODY))
        await writer.put("d/obj", other)  # replaced: another salt, another page key
        unopened = await reader.get_unopened("d/obj", 5, 10)
        with pytest.raises(IntegrityError, match="page 0"):
            unopened.open_into()
        assert unopened.stale
        assert await reader.get("d/obj", 5, 10) == other[5:15]
        # An empty object read whole still has its one empty page checked.
        await writer.put("d/empty", b"")
        assert (await reader.get_unopened("d/empty")).open_into() == b""
        empty = await inner.get("d/empty")
        await inner.put("d/empty", empty[:70] + bytes([empty[70] ^ 1]) + empty[71:])
        with pytest.raises(IntegrityError, match="page 0 at offset 64"):
            (await EncryptedStore(inner, ring(KEY_A)).get_unopened("d/empty")).open_into(bytearray(8))
        # Not cached: a failure is the object's, not the envelope's.
        bad = bytearray(await inner.get("d/obj"))
        bad[ENVELOPE_BYTES + 3] ^= 1
        await inner.put("d/obj", bytes(bad))
        unopened = await EncryptedStore(inner, ring(KEY_A)).get_unopened("d/obj", 0, 10)
        with pytest.raises(IntegrityError):
            unopened.open_into()
        assert not unopened.cached and not unopened.stale
    run(check())


async def test_recovery_opens_in_its_pool_retries_stale_envelopes_and_refuses_a_flipped_byte(tmp_path) -> None:
    """rocva.fetch opens a sealed store's runs and chunks in its pool (``get_unopened``):
    the images equal the model; segments replaced after the plan cached their envelopes
    (same bytes, fresh salts) are read again with fresh ones; a flipped byte in a segment
    is an IntegrityError naming it, and no image is published."""
    import numpy as np

    from rocva import Target, plan_recovery
    from rocva.recover import execute_plan
    from tests.rocva.build import seed_initial
    from cdp.testing.domain import DomainBuilder, file_sha256, random_workload

    inner = MemoryStore()
    b = await DomainBuilder(EncryptedStore(inner, ring(KEY_A)), disks=(("vm", "d", 512 << 10),)).start()
    rng = np.random.default_rng(5)
    await seed_initial(b, 0, rng, chunk=64 << 10)
    await random_workload(b, rng, 120, seal_every=15)
    model = b.snapshot()
    store = EncryptedStore(inner, ring(KEY_A))
    plan = await plan_recovery(store, b.domain, Target.latest())
    result = await execute_plan(store, plan, tmp_path / "a")
    assert [file_sha256(im["path"]) for im in result["images"]] == model

    plan = await plan_recovery(store, b.domain, Target.latest())  # caches every segment's envelope
    writer = EncryptedStore(inner, ring(KEY_A))
    for key in b.segment_keys:
        await writer.put(key, await writer.get(key))  # the same plaintext, sealed afresh
    result = await execute_plan(store, plan, tmp_path / "b")
    assert [file_sha256(im["path"]) for im in result["images"]] == model

    key = b.segment_keys[-1]
    bad = bytearray(await inner.get(key))
    bad[ENVELOPE_BYTES + 100] ^= 4
    await inner.put(key, bytes(bad))
    reader = EncryptedStore(inner, ring(KEY_A))
    with pytest.raises(IntegrityError, match=f"{key}.*page 0 at offset {ENVELOPE_BYTES}"):
        await execute_plan(reader, plan, tmp_path / "c")
    assert not any(name.endswith(".img") for name in os.listdir(tmp_path / "c"))


def test_large_puts_reuse_their_sealing_buffers_and_never_a_running_one(tmp_path) -> None:
    from cdp.store.fs import FileStore

    keys = [f"d/00000001/seg/00000001/{i:016x}-{i:016x}.seg" for i in range(1, 8)]
    bodies = [os.urandom(n) for n in (3 << 20, 1 << 20, 5 << 20, 2 << 20, (1 << 20) + 7, 4 << 20, 600_000)]

    async def check() -> None:
        for inner in (MemoryStore(), FileStore(tmp_path / "store")):
            store = EncryptedStore(inner, ring(KEY_A))
            for key, body in zip(keys, bodies):
                await store.put(key, body)
            # Sealed one after the other into the same few buffers: each object is its own.
            assert len(store._seal_buffers) <= 4
            for key, body in zip(keys, bodies):
                assert await EncryptedStore(inner, ring(KEY_A)).get(key) == body
            # Concurrent puts seal into distinct buffers.
            await asyncio.gather(*(store.put(k, b[::-1]) for k, b in zip(keys, bodies)))
            for key, body in zip(keys, bodies):
                assert await EncryptedStore(inner, ring(KEY_A)).get(key) == body[::-1]

        # A put cancelled while its inner put runs: that buffer may still be read by a
        # worker thread, and is not kept for the next put.
        class Stalled(MemoryStore):
            started = asyncio.Event()

            async def put(self, key, data, **kwargs):
                self.started.set()
                await asyncio.sleep(3600)

        store = EncryptedStore(Stalled(), ring(KEY_A))
        task = asyncio.create_task(store.put(keys[0], bodies[0]))
        await Stalled.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store._seal_buffers == []

    run(check())


@pytest.mark.parametrize("plain_len", [0, PAGE_BYTES, 3 * PAGE_BYTES + 10])
@pytest.mark.parametrize("read", ["suffix", "empty range", "to the end", "past the end"])
def test_a_forged_envelope_is_refused_by_reads_that_open_no_page(plain_len: int, read: str) -> None:
    """An envelope is only checksummed and its key id is public: one forged without the
    key (here with pages of random bytes before it) was taken for an object whose empty
    reads returned b"" (§19.2's tagged last page is opened for them now)."""
    keys = ring(b"k" * 32)
    inner = MemoryStore()
    forged = pack_summed(ENVELOPE, b"CDPN", 1, PAGE_SHIFT, 0, keys.writer.key_id, bytes(16), plain_len, 0)
    body = os.urandom(sealed_size(plain_len) - 2 * ENVELOPE_BYTES)
    run(inner.put("d/forged", forged + body + forged))
    reads = {"suffix": ("d/forged", -100), "empty range": ("d/forged", 0, 0),
             "to the end": ("d/forged", plain_len), "past the end": ("d/forged", plain_len, 10)}
    with pytest.raises(IntegrityError):
        run(EncryptedStore(inner, keys).get(*reads[read]))
    real = EncryptedStore(MemoryStore(), keys)  # a real object's empty reads still answer b""
    run(real.put("d/real", os.urandom(plain_len)))
    assert run(real.get("d/real", plain_len)) == b"" and run(real.get("d/real", 0, 0)) == b""


@pytest.mark.parametrize("name", ["CDP_STORE_KEY", "CDP_STORE_KEY_FILE"])
@pytest.mark.parametrize("value", ["", "  "])
def test_a_key_variable_set_but_empty_is_refused(name: str, value: str) -> None:
    """``CDP_STORE_KEY=$(cat missing)`` meant a plaintext store, silently."""
    with pytest.raises(ConfigError, match=f"{name} is set but empty"):
        StoreKeyring.from_env({name: value})
    with pytest.raises(ConfigError, match="set but empty"):
        open_store("mem://crypt-empty", env={name: value})


def test_a_key_file_of_another_user_is_refused(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text(KEY_A.hex() + "\n")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)  # the tests run as root; nobody's file could get a key appended
    with pytest.raises(ConfigError, match="owned by uid 65534, not by root or by this user"):
        StoreKeyring.from_file(path)


def test_rotation_a_read_only_key_reads_and_never_seals(tmp_path) -> None:
    """Step 1 of a rotation (the new key read-only everywhere) seals with the old key, so
    a process not restarted yet still reads what the others write; step 2 seals with it."""
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A.hex()}\nread-only {KEY_B.hex()}\n")
    path.chmod(0o600)
    step1 = StoreKeyring.from_file(path)
    assert step1.writer.key_id == StoreKey(KEY_A).key_id and set(step1.by_id) == {
        StoreKey(KEY_A).key_id, StoreKey(KEY_B).key_id}
    path.write_text(f"{KEY_A.hex()}\n{KEY_B.hex()}\n")
    assert StoreKeyring.from_file(path).writer.key_id == StoreKey(KEY_B).key_id
    path.write_text(f"read-only {KEY_A.hex()}\n")
    with pytest.raises(ConfigError, match="every key is read-only"):
        StoreKeyring.from_file(path)


async def test_a_generation_sealed_with_a_key_not_held_is_a_key_error_not_a_fence() -> None:
    """A writer meeting another process's generation sealed with a newer key was fenced
    ("another writer created generation N") and its domain stopped for good."""
    from cdp.catalog import CatalogWriter
    from cdp.testing.domain import DomainBuilder

    inner = MemoryStore()
    old = EncryptedStore(inner, ring(KEY_A))
    new = EncryptedStore(inner, ring(KEY_A, KEY_B))
    b = await DomainBuilder(old, domain=1, disks=(("v", "d0", 64 << 10),)).start()
    b.write(0, 0, b"x" * 4096)
    await b.seal()
    maintenance = await CatalogWriter.open(new, 1, by="maintenance")  # restarted first, with both keys
    await maintenance.commit({"horizon_seq": maintenance.state.timeline().horizon_seq})
    b.write(0, 4096, b"y" * 4096)
    with pytest.raises(KeyUnavailable):
        await b.seal()
